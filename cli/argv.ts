/**
 * Checks the command line against the commands before citty runs them: a mistyped command or
 * option is one line that names it, with the likely one, instead of a screen of help with the
 * error last (a mistyped command) or nothing at all (citty ignores an unknown option).
 */

/** A command's options as citty declares them. */
type Options = Readonly<Record<string, { readonly type?: string }>>

const GLOBAL = new Set(['help', 'h', 'version', 'v'])

/** Why `argv` (without node and the script) is not a command line of `commands`, or `undefined`. */
export function checkArgv(argv: readonly string[], commands: Readonly<Record<string, { readonly args?: Options }>>): string | undefined {
  const [first, ...rest] = argv
  if (first === undefined) return undefined
  if (first.startsWith('-')) return GLOBAL.has(first.replace(/^--?/, '')) ? undefined : `Unknown option "${first}"; run kysely-idempotency --help.`
  const command = commands[first]
  if (!Object.hasOwn(commands, first) || !command) {
    return `Unknown command "${first}"${suggestion(first, Object.keys(commands))}; the commands are ${Object.keys(commands).join(', ')}.`
  }
  const options = command.args ?? {}
  for (let i = 0; i < rest.length; i++) {
    const token = rest[i]!
    if (!token.startsWith('-'))
      return `Unexpected argument "${token}" for ${first}: its options are named (--url, --table…); run kysely-idempotency ${first} --help.`
    if (token === '-h') continue
    const [raw = '', inline] = token.replace(/^--?/, '').split(/=(.*)/s)
    const name = options[raw] === undefined && raw.startsWith('no-') && options[raw.slice(3)]?.type === 'boolean' ? raw.slice(3) : raw
    if (name === 'help') continue
    const option = options[name]
    if (!option || !token.startsWith('--'))
      return `Unknown option "${token.split('=')[0]}" for ${first}${suggestion(name, Object.keys(options), '--')}; run kysely-idempotency ${first} --help.`
    // A string option takes the next argument as its value, unless it was given with `=`.
    if (option.type === 'string' && inline === undefined) i++
  }
  return undefined
}

/** `; did you mean "…"?` for the closest of `known`, when one is close enough to be a typo. */
function suggestion(given: string, known: readonly string[], prefix = ''): string {
  let best: string | undefined
  let distance = Infinity
  for (const candidate of known) {
    const d = editDistance(given.toLowerCase(), candidate.toLowerCase())
    if (d < distance) [best, distance] = [candidate, d]
  }
  return best !== undefined && distance <= Math.max(2, Math.floor(given.length / 3)) ? `; did you mean "${prefix}${best}"?` : ''
}

function editDistance(a: string, b: string): number {
  let previous = Array.from({ length: b.length + 1 }, (_, j) => j)
  for (let i = 1; i <= a.length; i++) {
    const current = [i]
    for (let j = 1; j <= b.length; j++)
      current[j] = Math.min(previous[j]! + 1, current[j - 1]! + 1, previous[j - 1]! + (a[i - 1] === b[j - 1] ? 0 : 1))
    previous = current
  }
  return previous[b.length]!
}
