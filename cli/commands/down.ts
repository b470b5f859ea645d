import { defineCommand } from 'citty'
import { Migrator } from 'kysely'
import { idempotencyMigrations, migrationTables } from '../../migrations/index.js'
import { connectionArgs, withDatabase } from '../args.js'

export const down = defineCommand({
  meta: { name: 'down', description: 'Undo the last applied migration of the idempotency table (the first one drops the table)' },
  args: connectionArgs,
  run: ({ args }) =>
    withDatabase(args, { create: false }, async ({ db, table }) => {
      const migrator = new Migrator({ db, provider: idempotencyMigrations({ tableName: table }), ...migrationTables(table) })
      const { error, results = [] } = await migrator.migrateDown()
      if (error) throw error
      for (const r of results) console.log(`[✓] ${r.migrationName} undone`)
      if (!results.length) console.log(`No migration of "${table}" to undo.`)
    }),
})
