/**
 * What the library's statements read and write beside a key's row: an abandoned flow as the
 * recovery worker lists it, everything about one key for `inspect`, a flow's lock and its
 * renewals, and the counts for monitoring.
 */
import type { Encoded } from './codec/store.js'
import type { RowId } from './dialect.js'

/** An unfinished atomic-phases row whose lock expired, as `Statements.abandoned` reads it. */
export interface AbandonedRow {
  readonly id: RowId
  readonly scope: unknown
  readonly key: unknown
  readonly point: unknown
  readonly phases: unknown
  readonly codec: unknown
  readonly age: unknown
  readonly idle: unknown
  readonly flow: unknown
  readonly failures: unknown
  /** The recovery worker may pick the flow now. */
  readonly due: unknown
  readonly fingerprint: unknown
}

/** Everything about one key, as `Statements.inspect` reads it: times in epoch milliseconds. */
export interface InspectedRow {
  readonly id: RowId
  readonly point: unknown
  readonly phases: unknown
  readonly codec: unknown
  readonly flow: unknown
  readonly failures: unknown
  readonly expired: unknown
  readonly locked: unknown
  readonly created: unknown
  readonly ran: unknown
  readonly expires: unknown
  readonly lockedUntil: unknown
}

/** A lock held by one atomic-phases attempt: the row and the attempt's token. */
export interface Lease {
  readonly id: RowId
  readonly token: string
}

/** How far a lock and the key's life are pushed from now, in milliseconds. */
export interface Extension {
  /** Milliseconds the lock lasts. */
  readonly lease: number
  /** Milliseconds until the key expires; at least `lease`, so that a held key never expires. */
  readonly expiresIn: number
}

/** New lock values and flow state for a takeover or a recorded phase. */
export interface Renewal extends Extension {
  /** The whole `phase_results`, encoded. */
  readonly phases: Encoded
}

/** How many keys the table holds in each state; see `Statements.counts`. */
export interface KeyCounts {
  /** Unfinished atomic-phases flows an attempt holds. */
  readonly live: number
  /** Finished keys still replayable. */
  readonly finished: number
  /** Keys past their lifetime, waiting for `prune`. */
  readonly expired: number
  /** Unfinished atomic-phases flows whose lock expired or was released. */
  readonly abandoned: number
}
