/** The recovery worker in the background: a pass every so often, until it is stopped. */
import type { IdempotencyOperation, Observer } from '../observe.js'

/** Options of `idempotency.recover`. */
export interface RecoverOptions {
  /** At most this many flows per pass, those waiting longest first. Default 100; at most 10000. */
  readonly limit?: number
  /** Only flows idle (nothing recorded) for at least this many milliseconds. Default 0. */
  readonly olderThan?: number
  /**
   * After this many failed recoveries of a flow the worker leaves it alone (it stays listed by
   * `abandoned()`, and a client's retry still resumes it). Failures back off: 1 s, 2 s, 4 s… up
   * to 1 hour. Default 5; at most 100.
   */
  readonly maxFailures?: number
}

/** What one pass of the recovery worker did. */
export interface RecoveryReport {
  /** Flows it finished. */
  readonly finished: number
  /** Flows whose attempt failed; each is tried again after a back-off, up to `maxFailures` times. */
  readonly failed: number
  /**
   * Flows it did not touch: their name is not defined in this process, or by the time it got
   * there another attempt held, finished or dropped them.
   */
  readonly skipped: number
}

/** Options of `idempotency.startRecovery`. */
export interface StartRecoveryOptions extends RecoverOptions {
  /** Milliseconds between the end of one pass and the start of the next. Default 30000; from 10 ms to 24 hours. */
  readonly every?: number
}

/** Options of {@link RecoveryWorker.stop}. */
export interface StopOptions {
  /**
   * How long to wait for a running pass, in milliseconds. Default: the instance's
   * `lockTimeout`; from 0 to 24 hours.
   */
  readonly timeout?: number
}

/** A recovery worker running in the background (see `idempotency.startRecovery`). */
export interface RecoveryWorker {
  /**
   * Stops the worker: no pass starts any more. Resolves `true` once a running pass has ended,
   * or `false` when `timeout` ran out first: a flow of that pass hangs (a step that never
   * answers). It is left running, and holds its key only until its lease ends; then a client's
   * retry or another worker takes the flow over, and whatever the hung attempt tries to record
   * afterwards is refused by the fence (`IdempotencyLockLostError`), so it can change nothing.
   */
  stop(options?: StopOptions): Promise<boolean>
}

/**
 * Runs `pass` every `every` ms until stopped; a pass that rejects is reported, never thrown.
 * `stop` waits `stopTimeout(options)` ms at most for a running pass, which takes no further
 * flow once stopped, even when the wait ran out.
 */
export function startWorker(
  every: number,
  pass: (stopped: () => boolean) => Promise<unknown>,
  operation: IdempotencyOperation,
  stopTimeout: (options: StopOptions | undefined) => number,
  observer: Observer,
): RecoveryWorker {
  let stopped = false
  let timer: ReturnType<typeof setTimeout> | undefined
  let running: Promise<void> = Promise.resolve()
  const tick = () => {
    running = (async () => {
      const started = performance.now()
      try {
        await pass(() => stopped)
      } catch (error) {
        observer.emit({ type: 'recovery_failed', operation, durationMs: performance.now() - started, error })
      }
      // The worker never keeps the process alive by itself: the app (a server) does.
      if (!stopped) (timer = setTimeout(tick, every)).unref()
    })()
  }
  tick()
  return {
    async stop(options) {
      const timeout = stopTimeout(options)
      stopped = true
      clearTimeout(timer)
      let waited: ReturnType<typeof setTimeout> | undefined
      const ended = await Promise.race([
        running.then(() => true),
        new Promise<boolean>((resolve) => (waited = setTimeout(() => resolve(false), timeout))),
      ])
      clearTimeout(waited)
      return ended
    },
  }
}
