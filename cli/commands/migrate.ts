import { defineCommand } from 'citty'
import { connectionArgs, withDatabase } from '../args.js'

export const migrate = defineCommand({
  meta: { name: 'migrate', description: 'Create the idempotency table or bring it to the latest schema (safe to repeat and to run from several processes)' },
  args: connectionArgs,
  run: ({ args }) =>
    withDatabase(args, { create: true }, async ({ idempotency, table }) => {
      const { results = [] } = await idempotency.migrate()
      for (const r of results) console.log(`[✓] ${r.migrationName}`)
      console.log(results.length ? `The table "${table}" is up to date.` : `The table "${table}" was already up to date.`)
    }),
})
