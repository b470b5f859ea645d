/**
 * Migration 0002: stored values name the codec that wrote them (rows from before hold plain JSON,
 * codec null); MySQL tables become utf8mb4 with a binary collation whatever the database default.
 */
import type { Kysely } from 'kysely'
import { IdempotencyMigrationError } from '../src/errors.js'
import { qualified } from '../src/table.js'
import type { MigrationContext } from './context.js'
import type { IdempotencyMigration } from './history.js'

export function codec({ table, mode, open }: MigrationContext): IdempotencyMigration {
  return {
    async up(db: Kysely<unknown>) {
      const { plain, where, dialect } = open(db)
      const unicode = dialect.upgrades.unicode
      if (mode === 'print') {
        await plain.schema.alterTable(qualified(where)).addColumn('codec', dialect.columnTypes.text).execute()
        return unicode?.apply(plain, where)
      }
      const columns = await dialect.upgrades.columns(plain, where)
      if (mode === 'baseline' && !columns.includes('codec')) {
        throw new IdempotencyMigrationError(
          `The table "${table}" predates migration 0002_codec (it has no codec column), so there is nothing to record; ` +
            'run `kysely-idempotency migrate` without --baseline (or idempotency.migrate()) to add the column.',
        )
      }
      if (!columns.includes('codec')) await plain.schema.alterTable(qualified(where)).addColumn('codec', dialect.columnTypes.text).execute()
      if (!unicode || (await unicode.applied(plain, where))) return
      if (mode === 'baseline') {
        throw new IdempotencyMigrationError(
          `The table "${table}" is not in utf8mb4 with the utf8mb4_bin collation (migration 0002_codec); ` +
            'apply the DDL that `kysely-idempotency sql` prints, or migrate without baseline.',
        )
      }
      await unicode.apply(plain, where)
    },
    async down(db: Kysely<unknown>) {
      const { plain, where } = open(db)
      await plain.schema.alterTable(qualified(where)).dropColumn('codec').execute()
    },
  }
}
