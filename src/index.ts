export { createIdempotency, withIdempotency } from './idempotency.js'
export type {
  AbandonedOptions,
  CallOptions,
  Idempotency,
  IdempotencyOptions,
  MigrateOptions,
  PruneOptions,
  RunOptions,
  TransactionOptions,
  WithIdempotencyOptions,
} from './idempotency.js'
export type { AbandonedFlow, Flow } from './phases.js'
export type {
  DefinedFlow,
  DefinedFlowKey,
  DefinedRunOptions,
  DefineFlowOptions,
  FlowFunction,
  RecoverOptions,
  RecoveryReport,
  RecoveryWorker,
  StartRecoveryOptions,
  StopOptions,
} from './flows.js'
export type { KeyInspection, KeyReference } from './inspect.js'
export type { ErrorClass } from './survived.js'
export type { IdempotencyEvent, IdempotencyEventType, IdempotencyOperation, ObserveOptions } from './observe.js'
export type { KeyCounts } from './statements.js'
export type { Execution } from './core.js'
export {
  IdempotencyConflictError,
  IdempotencyError,
  IdempotencyFlowError,
  IdempotencyKeyReuseError,
  IdempotencyLockLostError,
  IdempotencyMigrationError,
  IdempotencySerializationError,
  IdempotencySetupError,
  InvalidIdempotencyKeyError,
} from './errors.js'
export type { ConflictReason, IdempotencyErrorCode } from './errors.js'
export { problemDetails } from './problem.js'
export type { ProblemDetails, ProblemDocument } from './problem.js'
export { canonicalJson, fingerprint } from './request.js'
export type { IdempotencyKeyInput } from './request.js'
export { defaultCodec } from './codec.js'
export type { Codec, Storable } from './codec.js'
export type { ColumnTypes, DatabaseErrorKind, IdempotencyDialect } from './dialect.js'
export { postgresDialect } from '../dialects/postgres.js'
export { mysqlDialect } from '../dialects/mysql.js'
export type { MysqlDialectOptions } from '../dialects/mysql.js'
export { sqliteDialect } from '../dialects/sqlite.js'
export { idempotencyMigrations, migrationTables } from '../migrations/index.js'
export type {
  IdempotencyMigration,
  IdempotencyMigrationProvider,
  IdempotencyMigrationsOptions,
  MigrationResult,
  MigrationResultSet,
} from '../migrations/index.js'
