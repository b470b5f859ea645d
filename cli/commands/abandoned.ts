import { defineCommand } from 'citty'
import { connectionArgs, withDatabase } from '../args.js'
import { CliError } from '../errors.js'

export const abandoned = defineCommand({
  meta: { name: 'abandoned', description: 'List unfinished atomic-phases flows whose lock expired; resume one by calling run() with its key' },
  args: {
    ...connectionArgs,
    'older-than': { type: 'string', description: 'Only flows idle for at least this many seconds', default: '0', valueHint: 's' },
    limit: { type: 'string', description: 'At most this many flows', default: '100', valueHint: 'n' },
    json: { type: 'boolean', description: 'Print JSON (one array) instead of a table', default: false },
  },
  run: ({ args }) => {
    const olderThan = Number(args['older-than'])
    const limit = Number(args.limit)
    if (!Number.isFinite(olderThan) || olderThan < 0) throw new CliError(`--older-than must be a number of seconds, got "${args['older-than']}".`)
    if (!Number.isSafeInteger(limit) || limit <= 0) throw new CliError(`--limit must be a positive integer, got "${args.limit}".`)
    return withDatabase(args, { create: false }, async ({ idempotency }) => {
      const flows = await idempotency.abandoned({ olderThan: Math.round(olderThan * 1000), limit })
      if (args.json) return console.log(JSON.stringify(flows))
      if (!flows.length) return console.log('No abandoned flows.')
      const rows = [
        ['scope', 'key', 'recovery point', 'attempts', 'idle'],
        ...flows.map((f) => [f.scope, f.key, f.recoveryPoint, f.attempts === null ? '?' : String(f.attempts), `${Math.round(f.idle / 1000)}s`]),
      ]
      const widths = rows[0]!.map((_, i) => Math.max(...rows.map((r) => r[i]!.length)))
      for (const r of rows)
        console.log(
          r
            .map((cell, i) => cell.padEnd(widths[i]!))
            .join('  ')
            .trimEnd(),
        )
      const unreadable = flows.filter((f) => f.unreadable !== null)
      if (unreadable.length) {
        console.log(
          `${unreadable.length} of these cannot be read here (attempts "?"): ${unreadable[0]!.unreadable} Pass the app's codec with --codec.`,
        )
      }
    })
  },
})
