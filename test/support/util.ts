/** Helpers shared by tests and by the child-process worker (which runs outside vitest). */

export const sleep = (ms: number) => new Promise<void>((resolve) => setTimeout(resolve, ms))

/** Outcome of one call, as the concurrency tests compare them. */
export type Answer = { value: unknown; replayed: boolean } | { error: string; reason?: string }

export async function answer(call: Promise<{ value: unknown; replayed: boolean }>): Promise<Answer> {
  try {
    const { value, replayed } = await call
    return { value, replayed }
  } catch (error) {
    const e = error as Error & { reason?: string }
    return { error: e.name, ...(e.reason ? { reason: e.reason } : {}) }
  }
}

/** Arguments of the child-process worker in test/fixtures/worker.ts. */
export interface WorkerArgs {
  readonly target: string
  readonly location: string
  readonly table: string
  readonly action: 'storm' | 'hold' | 'migrate' | 'ride' | 'defined-ride' | 'clean-exit' | 'consume' | 'enqueue'
  readonly key?: string
  readonly count?: number
  /**
   * `ride`, `defined-ride`: where to print `at:<point>` and then wait to be killed (`ride`: or stall for `stall` ms).
   * `consume`: `handler` to wait inside the handler, else the process waits after the commit, before acknowledging.
   * `enqueue`: `before-commit` to wait after enqueuing in the handler, else the process waits after the commit.
   */
  readonly stopAt?: string
  readonly stall?: number
  /** `ride`: the lock timeout of the flow, in milliseconds. */
  readonly lockTimeout?: number
  /** `enqueue`: where the job goes, graphile-worker's `add_job` (task `<table>_receipt`) or the table `<table>_outbox`. */
  readonly queue?: 'graphile' | 'outbox'
  /** Epoch ms at which to start, so that several processes fire together. */
  readonly startAt?: number
}
