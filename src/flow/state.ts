/**
 * A flow's state as the table holds it (`phase_results`: its id, attempts, request and recorded
 * phases, through the codec), how each attempt writes it anew, and the settings of one run.
 */
import { randomBytes } from 'node:crypto'
import type { ValueStore } from '../codec/store.js'
import { FINISHED, STARTED, type KeyRow } from '../dialect.js'
import { IdempotencyFlowError } from '../errors.js'
import type { NormalizedKey } from '../keys.js'
import type { IdempotencyOperation } from '../observe.js'
import type { RecoveryFailure } from '../recovery/backoff.js'
import type { Settings } from '../retries.js'
import type { Extension, Renewal } from '../rows.js'
import type { RecordedFailure } from './survived.js'

/** Settings of one `run`. */
export interface FlowSettings extends Settings {
  readonly lockTimeout: number
  /** The name the flow was defined with, for the recovery worker; `null` for a flow run without one. */
  readonly flow: string | null
  /**
   * The id of the `Finisher` that makes the flow's result its stored answer, stored with the
   * flow so that the recovery worker finishes it the same way; `null` when the result is stored as it is.
   */
  readonly finisher: string | null
  /** Only take over an unfinished flow that no attempt holds (the recovery worker); anything else is {@link NotResumable}. */
  readonly resumeOnly: boolean
  /** The recovery worker's attempt: if it fails, its release counts the failure and backs the flow off. */
  readonly failure?: RecoveryFailure
  /** The method the attempt serves, for its events. */
  readonly operation: IdempotencyOperation
}

/** A flow the recovery worker meant to resume was finished, expired, held or gone by the time it looked. */
export class NotResumable extends Error {
  constructor() {
    super('The flow is no longer waiting to be resumed.')
  }
}

/** What `phase_results` holds for a flow, written by the instance's codec. */
export interface FlowState {
  /** Random id the step keys derive from; a new one when the key starts over for a new request. */
  readonly flow: string
  readonly attempt: number
  readonly request: unknown
  /**
   * Recorded phases and steps in the order they were recorded: each with its value, or, for
   * a failure the flow went on from (SPEC §4.3.6), `null` and the failure.
   */
  readonly phases: ReadonlyArray<Entry>
  /** Present when a finisher makes the flow's answer ({@link FlowSettings.finisher}). */
  readonly finisher?: string
  /** The finisher's id as flows stored it before finishers were named (only ever read). */
  readonly answer?: string
  /** The lease and lifetime of the run that started the flow, for the recovery worker to keep. */
  readonly lockTimeout?: number
  readonly ttl?: number
}

/** A recorded phase or step: its name and value, or its name and the failure the flow survived. */
export type Entry = readonly [name: string, value: unknown] | readonly [name: string, value: null, failure: RecordedFailure]

/** `phase_results` as version 0.1.0 wrote it: plain JSON, phase names beside the flow's `$` members. */
interface LegacyPhaseMap {
  readonly $flow: string
  readonly $attempt: number
  readonly $request: unknown
  readonly [name: string]: unknown
}

/** A flow's, a phase's or a step's name: stored with the key, so it must stay the same across deploys. */
const NAME = /^[A-Za-z][A-Za-z0-9_.:-]{0,99}$/

/** How a new key of the flow is marked for the recovery worker: by its name, due as soon as no attempt holds it. */
export function named(settings: FlowSettings): { flow: string | null; recoverIn: number | null } {
  return settings.flow === null ? { flow: null, recoverIn: null } : { flow: settings.flow, recoverIn: 0 }
}

export function flowNameOf(settings: FlowSettings): { flowName?: string } {
  return settings.flow === null ? {} : { flowName: settings.flow }
}

/** What the recovery worker needs of a stored flow state: its request, its mark, and the lease and lifetime it was started with. */
export function readStarted(values: ValueStore, text: string, codec: string | null): Pick<FlowState, 'request' | 'finisher' | 'lockTimeout' | 'ttl'> {
  const { request, finisher, answer, lockTimeout, ttl } = readState(values, text, codec)
  const finishedBy = finisher ?? answer
  return { request, ...(finishedBy ? { finisher: finishedBy } : {}), ...(lockTimeout ? { lockTimeout } : {}), ...(ttl ? { ttl } : {}) }
}

/** What `read` gives, or why it cannot be read: a message, for a listing that goes on. */
export function readable<T>(read: () => T): { value: T } | { error: string } {
  try {
    return { value: read() }
  } catch (error) {
    return { error: error instanceof Error ? error.message : String(error) }
  }
}

/** The attempts a stored flow state counts. */
export function readAttempts(values: ValueStore, text: string, codec: string | null): number {
  return readState(values, text, codec).attempt
}

/** The lock and lifetime a flow's statements set: a held key outlives its lock by `ttl`. */
export function extension(settings: FlowSettings): Extension {
  return { lease: settings.lockTimeout, expiresIn: settings.lockTimeout + settings.ttl }
}

export function renewal(values: ValueStore, settings: FlowSettings, state: FlowState): Renewal {
  return { ...extension(settings), phases: values.encode(state) }
}

/** Reads `phase_results`, whichever version wrote it. */
export function readState(values: ValueStore, text: string, codec: string | null): FlowState {
  const stored = values.decode(text, codec)
  if (codec !== null) return stored as FlowState
  const { $flow, $attempt, $request, ...phases } = stored as LegacyPhaseMap
  return { flow: $flow, attempt: $attempt, request: $request, phases: Object.entries(phases) }
}

/** A row that `run` continues: a flow's, same request, not finished or expired, nobody holding it. */
export function resumable(row: KeyRow, key: NormalizedKey): boolean {
  return !row.expired && !row.locked && row.phases !== null && row.fingerprint === key.fingerprint && row.recoveryPoint !== FINISHED
}

export function fresh(key: NormalizedKey, settings: FlowSettings): FlowState {
  const how = { ...(settings.finisher ? { finisher: settings.finisher } : {}), lockTimeout: settings.lockTimeout, ttl: settings.ttl }
  return { flow: randomBytes(16).toString('base64url'), attempt: 1, request: key.request, phases: [], ...how }
}

export function newToken(): string {
  return randomBytes(16).toString('hex')
}

export function checkFlowName(name: unknown): string {
  if (typeof name !== 'string' || !NAME.test(name)) {
    throw new TypeError(
      `${JSON.stringify(name)} is not a valid flow name: use 1 to 100 letters, digits, "_", ".", ":" or "-", starting with a letter.`,
    )
  }
  return name
}

export function checkName(name: string): string {
  if (typeof name !== 'string' || !NAME.test(name) || name === STARTED || name === FINISHED) {
    throw new IdempotencyFlowError(
      `${JSON.stringify(name)} is not a valid phase or step name: use 1 to 100 letters, digits, "_", ".", ":" or "-", starting with a letter, other than "started" and "finished".`,
    )
  }
  return name
}

/** A text column as a string: MySQL returns `VARBINARY` columns (`scope`, `key`) as bytes. */
export function text(value: unknown): string {
  return value instanceof Uint8Array ? new TextDecoder().decode(value) : String(value)
}
