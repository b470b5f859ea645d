import { readFileSync } from 'node:fs'
const p = JSON.parse(readFileSync(process.argv[2], 'utf8'))
const self = new Map(); const dt = p.timeDeltas; const byId = new Map(p.nodes.map(n => [n.id, n]))
const counts = new Map(); for (const s of p.samples) counts.set(s, (counts.get(s) ?? 0) + 1)
let total = 0
for (const [id, c] of counts) { const n = byId.get(id); const f = n.callFrame; const k = `${f.functionName || '(anon)'} ${f.url.replace(/.*\/work\/main\//, '')}:${f.lineNumber}`; self.set(k, (self.get(k) ?? 0) + c); total += c }
const top = [...self].sort((a, b) => b[1] - a[1]).slice(0, Number(process.argv[3] ?? 30))
for (const [k, c] of top) console.log((100 * c / total).toFixed(1).padStart(5), k)
// by file
const files = new Map(); for (const [k, c] of self) { const f = k.split(' ')[1].replace(/:\d+$/, '').replace(/node_modules\/([^/]+)\/.*/, 'nm:$1'); files.set(f, (files.get(f) ?? 0) + c) }
console.log('--- by file'); for (const [f, c] of [...files].sort((a, b) => b[1] - a[1]).slice(0, 20)) console.log((100 * c / total).toFixed(1).padStart(5), f)
