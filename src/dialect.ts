import type { TableName } from './table.js'
import { sql, type ColumnDataType, type ColumnDefinitionBuilder, type DialectAdapter, type Expression, type Kysely, type RawBuilder } from 'kysely'

/**
 * A column type as Kysely's schema builder takes it.
 * @inline
 */
export type DataTypeExpression = ColumnDataType | Expression<unknown>

/** Database errors the library reacts to, as each dialect module classifies them. */
export type DatabaseErrorKind =
  /** A concurrent transaction committed something this one depended on (retryable). */
  | 'serialization_failure'
  /** The database broke a lock cycle by aborting this transaction (retryable). */
  | 'deadlock'
  /** A lock was not granted within the configured wait. */
  | 'lock_timeout'
  /**
   * A statement ran past a timeout the caller set on the session (Postgres `statement_timeout`,
   * MariaDB `max_statement_time`, MySQL `max_execution_time`): for the library's statements,
   * a wait for a key another transaction holds, which the caller bounded more tightly.
   */
  | 'statement_timeout'
  /** The idempotency table does not exist. */
  | 'undefined_table'

/**
 * The surrogate key of a row, exactly as the driver returned it.
 * @inline
 */
export type RowId = string | number

/** The state of one key as the database has it. */
export interface KeyRow {
  readonly id: RowId
  readonly fingerprint: string
  readonly recoveryPoint: string
  /** The stored response as text for the codec; `null` until finished. */
  readonly response: string | null
  /** The codec that wrote `response` and `phases`; `null` for rows written before codecs (plain JSON). */
  readonly codec: string | null
  /** `expires_at` has passed on the database clock. */
  readonly expired: boolean
  /** An atomic-phases attempt holds a lock that has not expired on the database clock. */
  readonly locked: boolean
  /** The lock token of the atomic-phases attempt that holds or last held the key, if any. */
  readonly token: string | null
  /** `phase_results` as text for the codec; `null` for keys of single-transaction calls. */
  readonly phases: string | null
}

/** The outcome of trying to insert a key: either it is ours, or here is what is there. */
export type Claim =
  | { readonly claimed: RowId }
  /** `row` is absent when the competing row is not visible yet to the claim statement. */
  | { readonly claimed: null; readonly row: KeyRow | undefined }

/** Values every claim needs. */
export interface ClaimValues {
  readonly scope: string
  readonly key: string
  readonly fingerprint: string
  /** Milliseconds from now until the key expires. */
  readonly expiresIn: number
  /** How long to wait for a concurrent holder of the same key, in milliseconds. */
  readonly wait: number
  /** Atomic phases only: the new attempt's lock token, else `null`. */
  readonly token: string | null
  /** Atomic phases only: how long the lock lasts, in milliseconds, else `null`. */
  readonly lease: number | null
  /** Atomic phases only: the initial `phase_results` text, else `null`. */
  readonly phases: string | null
  /** Atomic phases only: the codec that wrote `phases`, else `null`. */
  readonly codec: string | null
  /** A flow defined by name (`defineFlow`) only: its name, else `null`. */
  readonly flow: string | null
  /** A flow defined by name only: milliseconds from now until the recovery worker may pick it, else `null`. */
  readonly recoverIn: number | null
}

/**
 * The claim of a single-transaction key: no lock, no flow state. It lives `expiresIn` ms, and
 * waits at most `wait` ms for a competing insert of the same key.
 */
export function plainClaim(key: Pick<ClaimValues, 'scope' | 'key' | 'fingerprint'>, expiresIn: number, wait: number): ClaimValues {
  const { scope, key: name, fingerprint } = key
  return { scope, key: name, fingerprint, expiresIn, wait, token: null, lease: null, phases: null, codec: null, flow: null, recoverIn: null }
}

/** The statements a dialect writes itself, compiled for one table. */
export interface DialectStatements {
  /**
   * Inserts the key, waiting at most `wait` ms for an uncommitted insert of the same key
   * by another transaction. When the key exists, returns the row if the statement can see it.
   */
  claim(db: Kysely<unknown>, values: ClaimValues): Promise<Claim>
  /**
   * Reads the latest committed version of a key inside the current transaction, when a plain
   * read would not (a snapshot that predates the competing commit). Without it, the plain
   * read is used.
   */
  latest?(db: Kysely<unknown>, scope: string, key: string, wait: number): Promise<KeyRow | undefined>
  /**
   * Reads the latest committed version of a key and locks it until the transaction ends, so
   * that nothing else changes it in between (SQLite: takes the database's write lock). Waits
   * at most `wait` ms for another holder.
   */
  lock(db: Kysely<unknown>, scope: string, key: string, wait: number): Promise<KeyRow | undefined>
  /**
   * {@link lock} that does not wait: while another transaction holds the key (an attempt
   * claimed it and has not committed), it fails at once with an error classified as
   * `lock_timeout`, instead of waiting for that attempt to commit.
   */
  lockNow(db: Kysely<unknown>, scope: string, key: string): Promise<KeyRow | undefined>
  /** Runs `statements` with row-lock waits bounded to `wait` ms, then restores the setting. */
  withLockWait<T>(db: Kysely<unknown>, wait: number, statements: () => Promise<T>): Promise<T>
  /** Deletes up to `limit` expired, unlocked rows; returns how many. */
  pruneBatch(db: Kysely<unknown>, limit: number): Promise<number>
}

/** An index of the idempotency table, as migrations that find the table in place check it. */
export interface TableIndex {
  readonly unique: boolean
  /** Its columns in index order, named as in {@link TableUpgrades.columns}. */
  readonly columns: readonly string[]
}

/** What a dialect knows about the table's schema, for migrations that find it in place. */
export interface TableUpgrades {
  /**
   * The columns of `table` as the library's statements would see it, in lower case where the
   * database compares column names without case; empty when there is no such table.
   */
  columns(db: Kysely<unknown>, table: TableName): Promise<readonly string[]>
  /** The plain indexes of `table` (unique constraints included; partial and expression indexes left out). */
  indexes(db: Kysely<unknown>, table: TableName): Promise<readonly TableIndex[]>
  /** Drops the index `name` of `table` (MySQL names the table, the others must not). */
  dropIndex(db: Kysely<unknown>, table: TableName, name: string): Promise<void>
  /**
   * Takes, in the transaction that migrates, the lock Kysely's own `Migrator` takes, so that the
   * library's migrations and a user's `Migrator` (kysely-ctl at deploy, say) never run at once.
   * For databases with transactional DDL; released when the transaction ends.
   */
  migrationLock?(db: Kysely<unknown>): Promise<void>
  /**
   * Migration 0002: makes every text column store any Unicode text and compare bytes exactly,
   * whatever the database's defaults (MySQL: `utf8mb4` with a binary collation).
   */
  readonly unicode?: {
    applied(db: Kysely<unknown>, table: TableName): Promise<boolean>
    apply(db: Kysely<unknown>, table: TableName): Promise<void>
  }
}

/** Column types of the idempotency table in one dialect. */
export interface ColumnTypes {
  readonly id: DataTypeExpression
  /** Makes the id column a generated primary key. */
  identity(column: ColumnDefinitionBuilder): ColumnDefinitionBuilder
  readonly scope: DataTypeExpression
  readonly key: DataTypeExpression
  readonly text: DataTypeExpression
  readonly json: DataTypeExpression
  readonly time: DataTypeExpression
}

/**
 * Everything that differs between databases, in one object per dialect (see `dialects/`).
 * The core never asks which database it talks to; it asks the dialect.
 */
export interface IdempotencyDialect {
  /** For messages only. */
  readonly name: string
  /** Whether the table may live in a schema other than the connection's default (`db.withSchema(…)`). */
  readonly schemas: boolean
  /** Whether this module fits the adapter of a Kysely instance. */
  supports(adapter: DialectAdapter): boolean
  /** The database clock, in the representation of `ColumnTypes.time`. */
  readonly clock: RawBuilder<unknown>
  /** The database clock plus `ms` milliseconds. */
  later(ms: RawBuilder<unknown>): RawBuilder<unknown>
  /** Milliseconds from the time in `column` to the database clock's now, as a number. */
  elapsed(column: RawBuilder<unknown>): RawBuilder<unknown>
  /** The time in `column` as milliseconds since the Unix epoch (UTC), as a number; `NULL` stays `NULL`. */
  epochMs(column: RawBuilder<unknown>): RawBuilder<unknown>
  /** A JSON column as JSON text, whatever the driver would parse it into. */
  jsonText(column: RawBuilder<unknown>): RawBuilder<unknown>
  /**
   * JSON text (a parameter) as a value of a JSON column, whatever the driver makes of a parameter
   * the server types as JSON (postgres.js would encode the text as a JSON string of its own).
   */
  json(text: RawBuilder<unknown>): RawBuilder<unknown>
  readonly columnTypes: ColumnTypes
  /** Table changes this database needs beyond the portable schema. */
  readonly upgrades: TableUpgrades
  /**
   * Compiles the dialect's statements for `table` (may ask the server what it is, once);
   * `table` is as `sql.table()` takes it, `schema.name` when it has a schema.
   */
  prepare(db: Kysely<unknown>, table: string): Promise<DialectStatements>
  /** Classifies a driver error, or returns `undefined` for anything the library does not handle. */
  classify(error: unknown): DatabaseErrorKind | undefined
}

/**
 * Whether `adapter` is a `base` (or extends it), also when it comes from another copy of Kysely:
 * the CommonJS and ES module builds, or two versions installed side by side, are different
 * classes with the same names.
 */
export function isAdapter(adapter: DialectAdapter, base: abstract new () => DialectAdapter): boolean {
  if (adapter instanceof base) return true
  for (let proto: unknown = Object.getPrototypeOf(adapter); proto && proto !== Object.prototype; proto = Object.getPrototypeOf(proto)) {
    if ((proto as { constructor?: { name?: unknown } }).constructor?.name === base.name) return true
  }
  return false
}

export const STARTED = 'started'
export const FINISHED = 'finished'

/** The table under its statement alias `k`, which {@link keyRowColumns} refers to. */
export function aliased(table: string): RawBuilder<unknown> {
  return sql`${sql.table(table)} as k`
}

/**
 * The select list every statement that reads a key uses; decode rows with {@link decodeKeyRow}.
 * The two flags are bare comparisons (a boolean on Postgres, 1/0/NULL elsewhere), not `CASE`,
 * which costs SQLite more to prepare than the rest of the statement, on every read.
 */
export function keyRowColumns(dialect: Pick<IdempotencyDialect, 'clock' | 'jsonText'>): RawBuilder<unknown> {
  const now = dialect.clock
  return sql`k.id as id, k.fingerprint as fingerprint, k.recovery_point as point,
    ${dialect.jsonText(sql.ref('k.response'))} as response, k.codec as codec,
    k.expires_at <= ${now} as expired,
    k.lock_token is not null and k.locked_until > ${now} as locked,
    k.lock_token as token, ${dialect.jsonText(sql.ref('k.phase_results'))} as phases`
}

export function decodeKeyRow(row: Readonly<Record<string, unknown>>): KeyRow {
  return {
    id: row.id as RowId,
    fingerprint: String(row.fingerprint),
    recoveryPoint: String(row.point),
    response: row.response == null ? null : String(row.response),
    codec: row.codec == null ? null : String(row.codec),
    expired: Number(row.expired) === 1,
    locked: Number(row.locked) === 1,
    token: row.token == null ? null : String(row.token),
    phases: row.phases == null ? null : String(row.phases),
  }
}

/** The error's own code property, or `undefined`; drivers put SQLSTATEs and names there. */
export function errorProperty(error: unknown, name: 'code' | 'errno'): unknown {
  return typeof error === 'object' && error !== null && name in error ? (error as Record<string, unknown>)[name] : undefined
}

/** The slots of a claim statement that {@link insertedColumns} and {@link insertedValues} use. */
export const CLAIM_SLOTS = ['scope', 'key', 'fingerprint', 'expiresIn', 'token', 'lease', 'phases', 'codec', 'flow', 'recoverIn'] as const
export type ClaimSlot = (typeof CLAIM_SLOTS)[number]

/** The column list of a claim's insert, in the order of {@link insertedValues}. */
export const insertedColumns = sql`(scope, ${sql.ref('key')}, fingerprint, recovery_point, phase_results, codec, lock_token, locked_until, created_at, last_run_at, expires_at, flow_name, recover_after)`

/** The values of a claim's insert, without parentheses (for `values (…)` or `select …`). */
export function insertedValues(
  dialect: Pick<IdempotencyDialect, 'clock' | 'later' | 'json'>,
  p: Readonly<Record<ClaimSlot, RawBuilder<unknown>>>,
): RawBuilder<unknown> {
  const now = dialect.clock
  return sql`${p.scope}, ${p.key}, ${p.fingerprint}, ${sql.lit(STARTED)}, ${dialect.json(p.phases)}, ${p.codec}, ${p.token}, ${dialect.later(p.lease)}, ${now}, ${now}, ${dialect.later(p.expiresIn)}, ${p.flow}, ${dialect.later(p.recoverIn)}`
}
