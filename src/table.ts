import type { Kysely } from 'kysely'
import type { IdempotencyDialect } from './dialect.js'
import { IdempotencySetupError } from './errors.js'

/** Where the idempotency table is: its name, and the schema a `withSchema` instance puts it in. */
export interface TableName {
  /** The schema of `db.withSchema(schema)`; `undefined` for the connection's default (Postgres: `search_path`). */
  readonly schema: string | undefined
  readonly name: string
}

export const DEFAULT_TABLE = 'idempotency_keys'
const TABLE_NAME = /^[A-Za-z_][A-Za-z0-9_]{0,47}$/
const SCHEMA_NAME = /^[A-Za-z_][A-Za-z0-9_]{0,62}$/

/** Table names are spliced into SQL as identifiers, so only plain ones are accepted. */
export function checkTableName(name: unknown): string {
  if (typeof name !== 'string' || !TABLE_NAME.test(name)) {
    throw new IdempotencySetupError(
      `The table name ${JSON.stringify(name)} is not a plain identifier: use 1 to 48 letters, digits and underscores, not starting with a digit.`,
    )
  }
  return name
}

/**
 * The table `name` as `db` would name it: in the schema of `db.withSchema(…)`, if any. The
 * library's own statements run without the instance's plugins (a `CamelCasePlugin` must not
 * rename its columns), so the schema is read here, once, by letting the plugins name a table;
 * a plugin that renames tables otherwise is refused rather than silently left out.
 */
export function locateTable(db: Kysely<unknown>, name: string): TableName {
  checkTableName(name)
  const node = db
    .selectFrom(name as never)
    .selectAll()
    .toOperationNode() as { from?: { froms?: readonly unknown[] } }
  const table = node.from?.froms?.[0] as { kind?: unknown; table?: { schema?: { name?: unknown }; identifier?: { name?: unknown } } } | undefined
  const named = table?.kind === 'TableNode' ? table.table?.identifier?.name : undefined
  if (named !== name) {
    throw new IdempotencySetupError(
      `A plugin of this Kysely instance renames the table "${name}"${typeof named === 'string' ? ` to "${named}"` : ''}; the library names its table itself. ` +
        'Pass the name the database should use as tableName, and create the instance from a Kysely instance without that plugin (db.withoutPlugins(), then .withSchema(…) if you need one).',
    )
  }
  const schema = table?.table?.schema?.name
  if (schema === undefined) return { schema: undefined, name }
  if (typeof schema !== 'string' || !SCHEMA_NAME.test(schema)) {
    throw new IdempotencySetupError(
      `The schema ${JSON.stringify(schema)} of this Kysely instance (withSchema) is not a plain identifier: the idempotency table needs 1 to 63 letters, digits and underscores, not starting with a digit.`,
    )
  }
  return { schema, name }
}

/** `schema.name`, or `name`: what `sql.table()` and Kysely's schema builder take. */
export function qualified(table: TableName, name: string = table.name): string {
  return table.schema === undefined ? name : `${table.schema}.${name}`
}

/** Where `db` puts the table `name`; a schema (`withSchema`) only where the dialect has schemas. */
export function placeTable(db: Kysely<unknown>, name: string, dialect: Pick<IdempotencyDialect, 'name' | 'schemas'>): TableName {
  const table = locateTable(db, name)
  if (table.schema !== undefined && !dialect.schemas) {
    throw new IdempotencySetupError(
      `This Kysely instance puts tables in the schema "${table.schema}" (withSchema), which ${dialect.name} cannot hold the idempotency table in; ` +
        'create the idempotency instance from a Kysely instance without withSchema.',
    )
  }
  return table
}
