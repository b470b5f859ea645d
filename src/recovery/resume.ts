/**
 * The recovery worker's attempt at one abandoned flow: taken over as a retrying client would
 * (fenced), run to its end with its stored request and, when a finisher serves it, under that
 * finisher's rules.
 */
import type { Kysely } from 'kysely'
import type { Coalescer } from '../coalesce.js'
import { IdempotencyConflictError, IdempotencyLockLostError } from '../errors.js'
import type { KeyTable } from '../keytable.js'
import type { NormalizedKey } from '../keys.js'
import type { Observer } from '../observe.js'
import { bounded } from '../options.js'
import type { FlowRunner } from '../flow/claim.js'
import { isFailure, type Flow } from '../flow/handle.js'
import { NotResumable, readStarted, text, type FlowSettings } from '../flow/state.js'
import type { Settings } from '../retries.js'
import type { AbandonedRow } from '../rows.js'
import type { RecoveryFailure } from './backoff.js'
import type { Definition } from './registry.js'

/** How long the worker leaves a flow whose finisher is not registered here before it looks again. */
const UNBOUND_POSTPONE = 60_000

/** What the worker's attempts need of the instance. */
export interface ResumeContext {
  /** The instance's Kysely instance, plugins and all, for the flow's own phases. */
  readonly db: Kysely<unknown>
  /** The same, without plugins, for the library's statements. */
  readonly plain: Kysely<unknown>
  readonly table: KeyTable
  readonly coalescer: Coalescer
  readonly runner: FlowRunner
  readonly observer: Observer
  /** The instance's settings, with `ttl` in place of its own when given. */
  settings(call: { readonly ttl?: number | undefined }): Settings
  /** The instance's lease. */
  readonly lockTimeout: number
}

/**
 * Takes over one abandoned flow of `definition` as the recovery worker, and runs it to its end;
 * if the run fails, the flow backs off as `failure` says. `skipped` when someone else holds,
 * finished or took over the flow, or when its finisher is not registered here.
 */
export async function resumeFlow(
  context: ResumeContext,
  row: AbandonedRow,
  definition: Definition,
  failure: RecoveryFailure,
): Promise<'finished' | 'skipped'> {
  const { db, plain, table, coalescer, runner, observer } = context
  const key = { scope: text(row.scope), key: text(row.key), fingerprint: String(row.fingerprint) }
  const outcome = await observer
    .observe(
      'idempotency.recover',
      'recover',
      { ...key, flowName: definition.name },
      async () => {
        const started = readStarted(table.values, String(row.phases), row.codec == null ? null : String(row.codec))
        // A flow served with a finisher is finished by that finisher's rules only.
        const finisher = started.finisher === undefined ? undefined : definition.finishers.get(started.finisher)
        if (started.finisher !== undefined && !finisher) return 'unbound'
        const normalized: NormalizedKey = { ...key, request: started.request }
        // The run's own lease and lifetime, which a worker with other defaults must not shorten.
        const resolved = context.settings({ ttl: started.ttl ?? definition.options.ttl })
        const flowSettings: FlowSettings = {
          ...resolved,
          lockTimeout: bounded('lockTimeout', started.lockTimeout ?? definition.options.lockTimeout ?? context.lockTimeout),
          flow: definition.name,
          finisher: finisher?.id ?? null,
          resumeOnly: true,
          failure,
          operation: 'recover',
        }
        const body = async (flow: Flow<unknown, unknown>) => {
          const handle = finisher ? { ...flow, fail: (response: unknown) => flow.fail(finisher.finish(response, resolved.ttl)) } : flow
          try {
            const result = await definition.fn(handle as never, started.request)
            return finisher ? finisher.finish(result, resolved.ttl) : result
          } catch (error) {
            // Whatever the flow's own code throws is its failure, even a conflict of another key.
            if (isFailure(error)) throw error
            throw new FlowCodeError(error)
          }
        }
        // No wait for an attempt in flight: it is not abandoned. Its phases still wait on row locks as usual.
        await coalescer.coalesced(normalized, { ...resolved, conflictWait: 0 }, (slot) => runner.run(db, normalized, body, flowSettings, slot))
        return 'finished'
      },
      (result) =>
        'value' in result
          ? result.value === 'finished'
            ? { type: 'recovered', recoveryPoint: 'finished' }
            : undefined
          : skippedBy(result.error)
            ? undefined
            : { type: 'recovery_failed', error: result.error instanceof FlowCodeError ? result.error.cause : result.error },
    )
    .catch((error: unknown) => {
      if (skippedBy(error)) return 'skipped' as const
      throw error
    })
  if (outcome === 'unbound') {
    // Not this process's to finish: look again later, not at every pass before the others.
    const statements = await table.statements(plain)
    await table.translated(undefined, () => statements.postpone(plain, row.id, UNBOUND_POSTPONE)).catch(touchedElsewhere)
    return 'skipped'
  }
  return outcome
}

/**
 * A conflict on the worker's own bookkeeping of one flow (a count, a postponement) means another
 * worker or a client acted on that flow meanwhile: that flow's turn is over, not the pass.
 */
export function touchedElsewhere(error: unknown): void {
  if (!(error instanceof IdempotencyConflictError)) throw error
}

/**
 * What makes the recovery worker leave a flow alone: someone else holds it, finished it or took
 * it over. (The flow's own code cannot throw these: its errors come wrapped in {@link FlowCodeError}.)
 */
function skippedBy(error: unknown): boolean {
  return error instanceof NotResumable || error instanceof IdempotencyConflictError || error instanceof IdempotencyLockLostError
}

/** An error of a defined flow's own code, as the recovery worker runs it. */
class FlowCodeError extends Error {
  constructor(cause: unknown) {
    super(cause instanceof Error ? cause.message : String(cause), { cause })
  }
}
