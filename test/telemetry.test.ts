import { context, trace } from '@opentelemetry/api'
import { AsyncLocalStorageContextManager } from '@opentelemetry/context-async-hooks'
import { BasicTracerProvider, InMemorySpanExporter, SimpleSpanProcessor, type ReadableSpan } from '@opentelemetry/sdk-trace-base'
import { afterAll, afterEach, beforeAll, beforeEach, describe, expect, it } from 'vitest'
import { openFixture, selectedTargets, targetsFor, type Fixture } from './support/harness.js'

// One provider for the file, as an app registers one: the library finds it through the API.
const exporter = new InMemorySpanExporter()
beforeAll(() => {
  context.setGlobalContextManager(new AsyncLocalStorageContextManager().enable())
  trace.setGlobalTracerProvider(new BasicTracerProvider({ spanProcessors: [new SimpleSpanProcessor(exporter)] }))
})
afterAll(() => {
  trace.disable()
  context.disable()
})

const named = (name: string) => exporter.getFinishedSpans().filter((span) => span.name === name)
const parentOf = (span: ReadableSpan) => span.parentSpanContext?.spanId

// Nothing here waits on a row lock, so one of the MySQL lock-wait paths is enough.
for (const target of targetsFor('OpenTelemetry spans', ['statement-paths'])) {
  describe(`OpenTelemetry spans: ${target.id}`, () => {
    let fx: Fixture
    beforeEach(async () => {
      fx = await openFixture(target)
      exporter.reset()
    })
    afterEach(async () => {
      await fx.close()
    })

    it('runs each entry point in a span with its outcome, and leaves the key out unless asked', async () => {
      await fx.idempotency.transaction({ key: 'secret-key', scope: 'user-1', request: 1 }, async (trx) => fx.effect(trx, 'x').then(() => 1))
      await fx.idempotency.transaction({ key: 'secret-key', scope: 'user-1', request: 1 }, async () => 2)
      await expect(fx.idempotency.transaction({ key: 'secret-key', scope: 'user-1', request: 2 }, async () => 3)).rejects.toThrow()
      await expect(fx.idempotency.transaction({ key: 'fails', request: 1 }, async () => Promise.reject(new Error('boom')))).rejects.toThrow('boom')
      const spans = named('idempotency.transaction')
      expect(spans.map((s) => [s.attributes['idempotency.outcome'], s.attributes['idempotency.replayed']])).toEqual([
        ['executed', false],
        ['replayed', true],
        ['key_reuse', undefined],
        ['failed', undefined],
      ])
      expect(spans[3]!.status).toMatchObject({ code: 2, message: 'boom' })
      expect(spans[3]!.events.map((e) => e.name)).toEqual(['exception'])
      for (const span of exporter.getFinishedSpans()) {
        expect(JSON.stringify(span.attributes)).not.toContain('secret-key')
        expect(JSON.stringify(span.attributes)).not.toContain('user-1')
      }
      exporter.reset()
      await fx.with({ traceKeys: true }).transaction({ key: 'secret-key', scope: 'user-1', request: 1 }, async () => 1)
      expect(named('idempotency.transaction')[0]!.attributes).toMatchObject({
        'idempotency.key': 'secret-key',
        'idempotency.scope': 'user-1',
        'idempotency.outcome': 'replayed',
      })
    })

    it('puts the spans of a flow, its phases and steps under one another, and marks recorded ones on resume', async () => {
      const ride = fx.idempotency.defineFlow('ride', async (flow, request: { fail: boolean }) => {
        await flow.phase('ride_created', async (trx) => fx.effect(trx, 'ride').then(() => 1))
        await flow.step('charge_created', async () => {
          if (request.fail) throw new Error('provider down')
          return 'ch_1'
        })
        return 'done'
      })
      await expect(ride.run({ key: 'r', request: { fail: true } })).rejects.toThrow('provider down')
      const [failedRun] = named('idempotency.run')
      expect(failedRun!.attributes).toMatchObject({ 'idempotency.outcome': 'failed', 'idempotency.flow': 'ride' })
      for (const child of [...named('idempotency.phase'), ...named('idempotency.step')]) expect(parentOf(child)).toBe(failedRun!.spanContext().spanId)
      expect(named('idempotency.step')[0]!.attributes).toMatchObject({ 'idempotency.phase': 'charge_created', 'idempotency.outcome': 'failed' })
      exporter.reset()
      await expect(ride.run({ key: 'r2', request: { fail: false } })).resolves.toBe('done')
      expect(named('idempotency.phase')[0]!.attributes).toMatchObject({ 'idempotency.phase': 'ride_created', 'idempotency.outcome': 'executed' })
      exporter.reset()
      // On resume the phase comes from the record, and its span says so.
      await expect(ride.run({ key: 'r', request: { fail: true } })).rejects.toThrow('provider down')
      expect(named('idempotency.phase')[0]!.attributes).toMatchObject({ 'idempotency.phase': 'ride_created', 'idempotency.outcome': 'replayed' })
    })

    it('traces the recovery worker and prune', async () => {
      const flaky = { fail: true }
      const ride = fx.idempotency.defineFlow('ride', async (flow) => {
        await flow.step('call', async () => {
          if (flaky.fail) throw new Error('down')
          return 1
        })
        return 'done'
      })
      await expect(ride.run({ key: 'w', request: null })).rejects.toThrow('down')
      flaky.fail = false
      exporter.reset()
      expect(await fx.idempotency.recover()).toEqual({ finished: 1, failed: 0, skipped: 0 })
      const [recovered] = named('idempotency.recover')
      expect(recovered!.attributes).toMatchObject({ 'idempotency.outcome': 'recovered', 'idempotency.flow': 'ride' })
      expect(parentOf(named('idempotency.step')[0]!)).toBe(recovered!.spanContext().spanId)
      await fx.idempotency.prune()
      expect(named('idempotency.prune')[0]!.attributes).toMatchObject({ 'idempotency.outcome': 'pruned', 'idempotency.count': 0 })
    })
  })
}

describe('OpenTelemetry spans: an SDK registered late', () => {
  it('makes no span while no SDK is registered, and finds one registered after the first calls', async () => {
    const fx = await openFixture(selectedTargets()[0]!)
    try {
      trace.disable()
      exporter.reset()
      expect(await fx.idempotency.transaction('late', async () => 1)).toBe(1)
      expect(exporter.getFinishedSpans()).toEqual([])
      trace.setGlobalTracerProvider(new BasicTracerProvider({ spanProcessors: [new SimpleSpanProcessor(exporter)] }))
      expect(await fx.idempotency.transaction('late', async () => 2)).toBe(1)
      expect(named('idempotency.transaction').map((s) => s.attributes['idempotency.outcome'])).toEqual(['replayed'])
    } finally {
      await fx.close()
    }
  })
})
