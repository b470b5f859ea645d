import type { Generated, Kysely } from 'kysely'
import { migrationTables } from '../migrations/index.js'
import type { DatabaseName } from '../test/support/databases.js'

/** The soak's tables, apart from any an application uses. */
export const SOAK_TABLES = { keys: 'soak_keys', charges: 'soak_charges', rides: 'soak_rides', calls: 'soak_calls' } as const

/** The business tables: every side effect leaves a row, keyed by `scope:key`. */
export interface SoakDB {
  soak_charges: { id: Generated<number>; k: string; amount: number }
  soak_rides: { id: Generated<number>; k: string; charged: number }
  /** Every call the pretend provider got, with the key it was given. */
  soak_calls: { id: Generated<number>; k: string; step_key: string }
}

/** What the soak hands each app server. */
export interface AppArgs {
  readonly database: DatabaseName
  readonly location: string
  readonly lockTimeout: number
  /** Do one thing as a process of its own, then exit: a prune, or one pass of the recovery worker. */
  readonly once?: 'prune' | 'recover'
}

/** Drops whatever an earlier soak left, then creates the business tables (the caller migrates the keys table). */
export async function createTables(db: Kysely<SoakDB>, database: DatabaseName): Promise<void> {
  await dropTables(db)
  for (const table of ['soak_charges', 'soak_rides', 'soak_calls'] as const) {
    let create = db.schema
      .createTable(table)
      .addColumn('id', database === 'postgres' ? 'serial' : 'integer', (c) =>
        database === 'postgres' ? c.primaryKey() : c.primaryKey().autoIncrement(),
      )
      .addColumn('k', 'varchar(600)', (c) => c.notNull())
    create =
      table === 'soak_charges'
        ? create.addColumn('amount', 'integer')
        : table === 'soak_rides'
          ? create.addColumn('charged', 'integer')
          : create.addColumn('step_key', 'varchar(255)')
    await create.execute()
  }
}

export async function dropTables(db: Kysely<SoakDB>): Promise<void> {
  const { migrationTableName, migrationLockTableName } = migrationTables(SOAK_TABLES.keys)
  for (const table of [...Object.values(SOAK_TABLES), migrationTableName, migrationLockTableName])
    await db.schema.dropTable(table).ifExists().execute()
}
