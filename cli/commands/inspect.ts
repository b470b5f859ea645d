import { defineCommand } from 'citty'
import { connectionArgs, keyArgs, requiredKey, withDatabase } from '../args.js'

export const inspect = defineCommand({
  meta: { name: 'inspect', description: 'Show what the table holds for one key: its state, recovery point, flow, attempts and times' },
  args: {
    ...connectionArgs,
    ...keyArgs,
    json: { type: 'boolean', description: 'Print one JSON object (null when there is no such key) instead of text', default: false },
  },
  run: ({ args }) => {
    const key = requiredKey(args)
    return withDatabase(args, { create: false }, async ({ idempotency, table }) => {
      const found = await idempotency.inspect({ key, scope: args.scope })
      if (args.json) return console.log(JSON.stringify(found ?? null))
      if (!found) return console.log(`No key "${key}" in scope "${args.scope}" in "${table}".`)
      const lines: Array<[string, string]> = [
        ['state', found.state],
        ['recovery point', found.recoveryPoint],
        ['flow', found.flowName ?? '-'],
        ['attempts', found.attempts === null ? `? (${found.unreadable} Pass the app's codec with --codec.)` : String(found.attempts)],
        ['recovery failures', String(found.recoveryFailures)],
        ['created', found.createdAt.toISOString()],
        ['last run', found.lastRunAt.toISOString()],
        ['expires', found.expiresAt.toISOString()],
        ['locked until', found.lockedUntil?.toISOString() ?? '-'],
      ]
      for (const [name, value] of lines) console.log(`${name.padEnd(18)}${value}`)
    })
  },
})
