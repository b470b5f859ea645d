import { createInterface } from 'node:readline/promises'
import { defineCommand } from 'citty'
import { countKeys, dropTable } from '../../migrations/index.js'
import { detectDialect } from '../../dialects/registry.js'
import { connectionArgs, withDatabase } from '../args.js'
import { CliError } from '../errors.js'

export const down = defineCommand({
  meta: {
    name: 'down',
    description: 'Drop the idempotency table with its keys, and its migration history; asks first, or pass --yes',
  },
  args: {
    ...connectionArgs,
    yes: { type: 'boolean', description: 'Drop without asking (needed when not run from a terminal)', default: false },
  },
  run: ({ args }) =>
    withDatabase(args, { create: false }, async ({ db, table, where }) => {
      const keys = await countKeys(db.withoutPlugins(), where, detectDialect(db))
      const what =
        keys === undefined
          ? `the migration history of "${table}" (there is no such table)`
          : `the table "${table}" with its ${plural(keys)}, and its migration history`
      if (!args.yes) {
        if (!process.stdin.isTTY || !process.stdout.isTTY) throw new CliError(`down drops ${what}; pass --yes to confirm.`)
        const prompt = createInterface({ input: process.stdin, output: process.stdout })
        const answer = await prompt.question(`Drop ${what}? Replays of those keys are lost. [y/N] `).finally(() => prompt.close())
        if (!/^y(es)?$/i.test(answer.trim())) return console.log('Nothing dropped.')
      }
      await dropTable(db.withoutPlugins(), where)
      console.log(`Dropped ${what}.`)
    }),
})

function plural(keys: number): string {
  return `${keys} ${keys === 1 ? 'key' : 'keys'}`
}
