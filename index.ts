/**
 * The package entry: the core (`src/`, which names no database and no framework), wired to the
 * databases the package knows (`dialects/registry.ts`) and the table's migrations
 * (`migrations/`), and the public names of each.
 */
import type { Transaction } from 'kysely'
import { detectDialect } from './dialects/registry.js'
import { migrateTable } from './migrations/index.js'
import type { Storable } from './src/codec/values.js'
import type { Idempotency } from './src/api.js'
import { assembleIdempotency, withIdempotencyDetecting } from './src/assemble.js'
import type { IdempotencyOptions, WithIdempotencyOptions } from './src/options.js'
import type { IdempotencyKeyInput } from './src/keys.js'

/**
 * Creates an idempotency store for one Kysely instance and table. Bad options throw here;
 * every method reports bad input as a rejected promise.
 *
 * ### Examples
 *
 * ```ts
 * import { createIdempotency } from 'kysely-idempotency'
 * import { body, createOrder, db } from './app'
 *
 * const idempotency = createIdempotency({ db })
 * await idempotency.migrate()
 * const result = await idempotency.transaction({ key: 'order-42', request: body }, (trx) => createOrder(trx, body))
 * ```
 */
export function createIdempotency<DB>(options: IdempotencyOptions<DB>): Idempotency<DB> {
  return assembleIdempotency(options, { detect: detectDialect, migrate: migrateTable })
}

/**
 * {@link Idempotency.withIdempotency} without creating an instance first: runs `fn` at most
 * once per key inside `trx`, using the table `idempotency_keys` unless told otherwise. The
 * dialect is chosen from the transaction's adapter.
 *
 * ### Examples
 *
 * ```ts
 * import { withIdempotency } from 'kysely-idempotency'
 * import { body, createOrder, db, key, userId } from './app'
 *
 * await db.transaction().execute((trx) =>
 *   withIdempotency(trx, { key, scope: userId, request: body }, (trx) => createOrder(trx, body)))
 * ```
 */
export async function withIdempotency<DB, T>(
  trx: Transaction<DB>,
  key: IdempotencyKeyInput,
  fn: (trx: Transaction<DB>) => Promise<T & Storable<T>>,
  options?: WithIdempotencyOptions,
): Promise<T> {
  return withIdempotencyDetecting<DB, T>(detectDialect, trx, key, fn, options)
}

export type {
  AbandonedOptions,
  CallOptions,
  IdempotencyOptions,
  MigrateOptions,
  PruneOptions,
  Reuse,
  RunOptions,
  TransactionOptions,
  WithIdempotencyOptions,
} from './src/options.js'
export type { Execution, Idempotency } from './src/api.js'
export type { AbandonedFlow, Flow } from './src/flow/handle.js'
export type {
  DefinedFlow,
  DefinedFlowKey,
  DefinedRunOptions,
  DefineFlowOptions,
  FlowFunction,
} from './src/recovery/registry.js'
export type {
  RecoverOptions,
  RecoveryReport,
  RecoveryWorker,
  StartRecoveryOptions,
  StopOptions,
} from './src/recovery/worker.js'
export type { KeyInspection, KeyReference } from './src/operations.js'
export type { ConsumeOptions, Delivery, Message } from './src/consume.js'
export type { ErrorClass } from './src/flow/survived.js'
export type { IdempotencyEvent, IdempotencyEventType, IdempotencyOperation, ObserveOptions } from './src/observe.js'
export type { KeyCounts } from './src/rows.js'
export {
  IdempotencyConflictError,
  IdempotencyError,
  IdempotencyFlowError,
  IdempotencyKeyReuseError,
  IdempotencyKeyUsedError,
  IdempotencyLockLostError,
  IdempotencyMigrationError,
  IdempotencySerializationError,
  IdempotencySetupError,
  InvalidIdempotencyKeyError,
} from './src/errors.js'
export type { ConflictReason, IdempotencyErrorCode } from './src/errors.js'
export { problemDetails } from './http/problem.js'
export type { ProblemDetails, ProblemDocument } from './http/problem.js'
export { canonicalJson, fingerprint } from './src/fingerprint.js'
export type { IdempotencyKeyInput } from './src/keys.js'
export { defaultCodec } from './src/codec/codec.js'
export type { Codec } from './src/codec/codec.js'
export type { Storable } from './src/codec/values.js'
// What a dialect module is made of, for authors of one (docs: Adding a database).
export type {
  Claim,
  ClaimValues,
  ColumnTypes,
  DatabaseErrorKind,
  DialectStatements,
  IdempotencyDialect,
  KeyRow,
  TableIndex,
  TableUpgrades,
} from './src/dialect.js'
export type { TableName } from './src/table.js'
export { postgresDialect } from './dialects/postgres.js'
export { mysqlDialect } from './dialects/mysql.js'
export type { MysqlDialectOptions } from './dialects/mysql.js'
export { sqliteDialect } from './dialects/sqlite.js'
export { idempotencyMigrations, migrationTables } from './migrations/index.js'
export type {
  IdempotencyMigration,
  IdempotencyMigrationProvider,
  IdempotencyMigrationsOptions,
} from './migrations/index.js'
export type { MigrationResult, MigrationResultSet } from './src/migrate.js'
