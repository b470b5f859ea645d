import { defineCommand } from 'citty'
import { migrationStates } from '../../migrations/history.js'
import { idempotencyMigrations } from '../../migrations/index.js'
import { detectDialect } from '../../dialects/registry.js'
import { connectionArgs, withDatabase } from '../args.js'
import { EXIT } from '../errors.js'

export const status = defineCommand({
  meta: {
    name: 'status',
    description:
      'Show applied and pending migrations and how many keys are live, finished, expired or abandoned; exits 2 while migrations are pending',
  },
  args: {
    ...connectionArgs,
    json: { type: 'boolean', description: 'Print one JSON object instead of text', default: false },
  },
  run: ({ args }) =>
    withDatabase(args, { create: false }, async ({ db, table, where, idempotency }) => {
      const dialect = detectDialect(db)
      const states = await migrationStates(db, dialect, where, await idempotencyMigrations({ tableName: where.name }).getMigrations())
      const migrations = states.map((m) => ({ name: m.name, appliedAt: m.executedAt?.toISOString() ?? null }))
      const pending = migrations.some((m) => m.appliedAt === null)
      const exists = !pending || (await dialect.upgrades.columns(db.withoutPlugins(), where)).length > 0
      // A table made from the printed DDL, or migrated with another history, is in place but unrecorded.
      const inPlace = exists && migrations.every((m) => m.appliedAt === null)
      const keys = pending ? null : await idempotency.counts()
      if (pending) process.exitCode = EXIT.pending
      if (args.json) return console.log(JSON.stringify({ table, upToDate: !pending, tableExists: exists, migrations, keys }))
      for (const m of migrations) console.log(m.appliedAt ? `[✓] ${m.name}  applied ${m.appliedAt}` : `[ ] ${m.name}  pending`)
      if (keys) return console.log(`keys: ${keys.live} live, ${keys.finished} finished, ${keys.expired} expired, ${keys.abandoned} abandoned`)
      console.log(
        inPlace
          ? `The table "${table}" exists without a record of these migrations: run kysely-idempotency migrate (it records what the table has and makes only what it lacks; --baseline makes nothing).`
          : `The table "${table}" needs migrating: run kysely-idempotency migrate.`,
      )
    }),
})
