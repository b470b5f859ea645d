/** Migration 0001: the table, its unique key and the index prune uses. */
import type { Kysely } from 'kysely'
import { qualified } from '../src/table.js'
import { expectColumns, expectIndexes, type MigrationContext } from './context.js'
import type { IdempotencyMigration } from './history.js'

/** The columns migration 0001 creates. */
export const CREATED = [
  'id',
  'scope',
  'key',
  'fingerprint',
  'recovery_point',
  'phase_results',
  'response',
  'lock_token',
  'locked_until',
  'created_at',
  'last_run_at',
  'expires_at',
]

export function create({ table, mode, open }: MigrationContext): IdempotencyMigration {
  return {
    async up(db: Kysely<unknown>) {
      const { plain, where, dialect } = open(db)
      if (mode !== 'print') {
        const columns = await dialect.upgrades.columns(plain, where)
        if (columns.length || mode === 'baseline') {
          expectColumns(table, columns, CREATED, '0001_create')
          return expectIndexes(plain, where, dialect, mode)
        }
      }
      const types = dialect.columnTypes
      await plain.schema
        .createTable(qualified(where))
        .addColumn('id', types.id, (c) => types.identity(c))
        .addColumn('scope', types.scope, (c) => c.notNull())
        .addColumn('key', types.key, (c) => c.notNull())
        .addColumn('fingerprint', types.text, (c) => c.notNull())
        .addColumn('recovery_point', types.text, (c) => c.notNull())
        .addColumn('phase_results', types.json)
        .addColumn('response', types.json)
        .addColumn('lock_token', types.text)
        .addColumn('locked_until', types.time)
        .addColumn('created_at', types.time, (c) => c.notNull())
        .addColumn('last_run_at', types.time, (c) => c.notNull())
        .addColumn('expires_at', types.time, (c) => c.notNull())
        .addUniqueConstraint(`${table}_scope_key`, ['scope', 'key'])
        .execute()
      await plain.schema.createIndex(`${table}_expires_at`).on(qualified(where)).column('expires_at').execute()
    },
    async down(db: Kysely<unknown>) {
      const { plain, where } = open(db)
      await plain.schema.dropTable(qualified(where)).execute()
    },
  }
}
