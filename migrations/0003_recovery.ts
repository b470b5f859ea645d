/**
 * Migration 0003: flows defined by name are stored with it, so that the recovery worker can
 * finish them; `recover_after` is set only while such a flow is unfinished (its index holds
 * nothing else).
 */
import type { Kysely } from 'kysely'
import { IdempotencyMigrationError } from '../src/errors.js'
import { qualified } from '../src/table.js'
import type { MigrationContext } from './context.js'
import type { IdempotencyMigration } from './history.js'

/** The columns migration 0003 adds. */
const RECOVERY = ['flow_name', 'recovery_failures', 'recover_after'] as const

export function recovery({ table, mode, open }: MigrationContext): IdempotencyMigration {
  return {
    async up(db: Kysely<unknown>) {
      const { plain, where, dialect } = open(db)
      const types = dialect.columnTypes
      const added: Record<(typeof RECOVERY)[number], (alter: ReturnType<Kysely<unknown>['schema']['alterTable']>) => { execute(): Promise<void> }> = {
        flow_name: (alter) => alter.addColumn('flow_name', types.text),
        recovery_failures: (alter) => alter.addColumn('recovery_failures', 'integer', (c) => c.notNull().defaultTo(0)),
        recover_after: (alter) => alter.addColumn('recover_after', types.time),
      }
      const index = () => plain.schema.createIndex(`${table}_recover_after`).on(qualified(where)).column('recover_after').execute()
      if (mode === 'print') {
        for (const column of RECOVERY) await added[column](plain.schema.alterTable(qualified(where))).execute()
        return index()
      }
      const columns = await dialect.upgrades.columns(plain, where)
      const missing = RECOVERY.filter((column) => !columns.includes(column))
      const indexed = (await dialect.upgrades.indexes(plain, where)).some((i) => i.columns[0] === 'recover_after')
      if (mode === 'baseline' && (missing.length || !indexed)) {
        throw new IdempotencyMigrationError(
          `The table "${table}" predates migration 0003_recovery (it lacks ${missing.length ? missing.join(', ') : 'the index on recover_after'}), ` +
            'so there is nothing to record; run `kysely-idempotency migrate` without --baseline (or idempotency.migrate()) to add it.',
        )
      }
      for (const column of missing) await added[column](plain.schema.alterTable(qualified(where))).execute()
      if (!indexed) await index()
    },
    async down(db: Kysely<unknown>) {
      const { plain, where, dialect } = open(db)
      await dialect.upgrades.dropIndex(plain, where, `${table}_recover_after`)
      for (const column of [...RECOVERY].reverse()) await plain.schema.alterTable(qualified(where)).dropColumn(column).execute()
    },
  }
}
