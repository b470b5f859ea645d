/**
 * How the recovery worker backs off a flow that keeps failing: written by the same statement
 * that counts the failure, from the count the row holds then (a count read earlier may be stale).
 */
import { sql, type RawBuilder } from 'kysely'

/**
 * A failed recovery: the worker looks again 1 s after the first failure, doubling up to an hour,
 * and leaves the flow alone (`recover_after` null) at the `maxFailures`th.
 */
export interface RecoveryFailure {
  readonly maxFailures: number
}

/** 1 s, doubled at each failure, and an hour after 12. */
const FIRST = 1000
const DOUBLINGS = 12
const CAP = 60 * 60 * 1000

/** The `set` assignments that count one more failure and back the flow off; `later(ms)` is the database clock plus `ms`. */
export function backOffAssignments(later: (ms: RawBuilder<unknown>) => RawBuilder<unknown>, maxFailures: RawBuilder<unknown>): RawBuilder<unknown> {
  // `recover_after` before `recovery_failures`: MySQL evaluates each assignment with the ones before it done.
  return sql`recover_after = case when recovery_failures + 1 >= ${maxFailures} then null
      else ${later(sql`(case when recovery_failures >= ${sql.lit(DOUBLINGS)} then ${sql.lit(CAP)} else ${sql.lit(FIRST)} * (1 << recovery_failures) end)`)} end,
    recovery_failures = recovery_failures + 1`
}
