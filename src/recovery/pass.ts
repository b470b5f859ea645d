/** One pass of the recovery worker over the abandoned flows of the names defined here. */
import { bounded, DEFAULTS } from '../options.js'
import type { Settings } from '../retries.js'
import type { RecoveryFailure } from './backoff.js'
import type { FlowRegistry } from './registry.js'
import { resumeFlow, touchedElsewhere, type ResumeContext } from './resume.js'
import type { RecoverOptions, RecoveryReport } from './worker.js'

/**
 * Takes over each due flow of a defined name, oldest first, and runs it to its end; a failure is
 * counted and backs the flow off. What the pass itself cannot do (the database is down) rejects.
 * Once `stopped` says so, the pass takes no further flow.
 */
export async function recoveryPass(
  context: ResumeContext & { readonly registry: FlowRegistry; readonly defaults: Settings },
  options: RecoverOptions | undefined,
  stopped: () => boolean,
): Promise<RecoveryReport> {
  const { plain: db, table, registry } = context
  const limit = bounded('limit', options?.limit ?? DEFAULTS.abandonedLimit)
  const olderThan = bounded('olderThan', options?.olderThan ?? 0)
  const failure: RecoveryFailure = { maxFailures: bounded('maxFailures', options?.maxFailures ?? DEFAULTS.maxFailures) }
  const statements = await table.statements(db)
  const names = registry.names
  // A SERIALIZABLE database may cancel even a read under concurrent passes and clients: read again.
  const read = <T>(statement: () => Promise<T>) => table.retrying(context.defaults, () => table.translated(undefined, statement))
  const rows = await read(() => statements.recoverable(db, names, olderThan, limit))
  let skipped = await read(() => statements.unknownFlows(db, names, olderThan))
  let finished = 0
  let failed = 0
  for (const row of rows) {
    if (stopped()) break
    const definition = registry.get(String(row.flow))
    if (!definition) {
      skipped++
      continue
    }
    try {
      if ((await resumeFlow(context, row, definition, failure)) === 'finished') finished++
      else skipped++
    } catch {
      // resumeFlow() reported the error to the event hook; here it only counts, and backs off.
      failed++
      // Usually the failed attempt counted itself as it let go of the flow; this counts a failure
      // before any takeover, and does nothing if the count moved meanwhile.
      const seen = Number(row.failures ?? 0)
      await read(() => statements.recoveryFailed(db, row.id, seen, failure)).catch(touchedElsewhere)
    }
  }
  return { finished, failed, skipped }
}
