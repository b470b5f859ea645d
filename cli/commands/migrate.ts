import { defineCommand } from 'citty'
import { connectionArgs, withDatabase } from '../args.js'

export const migrate = defineCommand({
  meta: {
    name: 'migrate',
    description:
      'Create the idempotency table or bring it to the latest schema (safe to repeat and to run from several processes); what the table already has is recorded, not made again',
  },
  args: {
    ...connectionArgs,
    baseline: {
      type: 'boolean',
      description:
        'Change nothing: record as applied what the table already has (made from the `sql` DDL by Flyway, Prisma, Atlas…), and fail on anything it lacks',
      default: false,
    },
  },
  run: ({ args }) =>
    withDatabase(args, { create: !args.baseline }, async ({ idempotency, table }) => {
      const { results } = await idempotency.migrate({ baseline: args.baseline })
      for (const r of results) console.log(`[✓] ${r.migrationName}${args.baseline ? ' recorded' : ''}`)
      console.log(results.length ? `The table "${table}" is up to date.` : `The table "${table}" was already up to date.`)
    }),
})
