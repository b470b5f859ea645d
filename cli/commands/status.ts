import { defineCommand } from 'citty'
import { Migrator } from 'kysely'
import { idempotencyMigrations, migrationTables } from '../../migrations/index.js'
import { connectionArgs, withDatabase } from '../args.js'

export const status = defineCommand({
  meta: { name: 'status', description: 'Show applied and pending migrations and how many keys are live, finished, expired or abandoned' },
  args: connectionArgs,
  run: ({ args }) =>
    withDatabase(args, { create: false }, async ({ db, table, idempotency }) => {
      const migrator = new Migrator({ db, provider: idempotencyMigrations({ tableName: table }), ...migrationTables(table) })
      const migrations = await migrator.getMigrations()
      for (const m of migrations) console.log(m.executedAt ? `[✓] ${m.name}  applied ${m.executedAt.toISOString()}` : `[ ] ${m.name}  pending`)
      if (migrations.some((m) => !m.executedAt)) {
        console.log(`The table "${table}" needs migrating: run kysely-idempotency migrate.`)
        return
      }
      const c = await idempotency.counts()
      console.log(`keys: ${c.live} live, ${c.finished} finished, ${c.expired} expired, ${c.abandoned} abandoned`)
    }),
})
