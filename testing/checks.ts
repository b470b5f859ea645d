/**
 * The promises of the dialect contract (`IdempotencyDialect` in `src/dialect.ts`), one check
 * each. A check that needs a second transaction running at the same time is `competing`.
 */
import { sql } from 'kysely'
import { dropTable, migrateTable, schemaMigrations } from '../migrations/index.js'
import { STARTED } from '../src/dialect.js'
import { ContractViolation, describeError, expectClassified, expectThat, rejection, settled, shown, sleep, type Scratch } from './scratch.js'

export type CheckId =
  | 'claim-absent'
  | 'claim-committed'
  | 'claim-waits'
  | 'claim-wait-zero'
  | 'claim-wait-bounded'
  | 'lock-latest'
  | 'lock-wait-bounded'
  | 'lock-wait-restored'
  | 'classify-deadlock'
  | 'classify-serialization'
  | 'classify-undefined-table'
  | 'classify-others'
  | 'prune-batches'
  | 'prune-skips-locked'
  | 'clock'
  | 'json'
  | 'upgrade-0001'

interface Check {
  readonly id: CheckId
  readonly title: string
  readonly competing: boolean
  run(s: Scratch): Promise<void>
}

/** The wait a bounded check gives, and how far past it the failure may come (MySQL counts whole seconds, and MySQL proper waits at least 1 s). */
const BOUNDED_WAIT = 1000
const BOUND_SLACK = 3000

export const CHECKS: readonly Check[] = [
  {
    id: 'claim-absent',
    title: 'claim inserts an absent key and returns its id; the row reads back as written',
    competing: false,
    async run(s) {
      const phases = '{"$flow":"f","a":[1.5,"ü 💳",null]}'
      const plain = await s.statements.claim(s.db, s.values('plain'))
      const flow = await s.statements.claim(s.db, s.values('flow', { token: 'tok', lease: 60_000, phases, codec: 'c1', flow: 'f', recoverIn: 0 }))
      for (const [key, claim] of [
        ['plain', plain],
        ['flow', flow],
      ] as const) {
        expectThat(claim.claimed !== null, `claim of the absent key "${key}" returned ${shown(claim)} instead of the new row's id.`)
      }
      const [a, b] = [await s.read('plain'), await s.read('flow')]
      expectThat(
        a !== undefined && String(a.id) === String(plain.claimed),
        `the claimed id ${shown(plain.claimed)} is not the row's id ${shown(a?.id)}.`,
      )
      expectThat(
        a.fingerprint === 'fingerprint of plain' &&
          a.recoveryPoint === STARTED &&
          !a.expired &&
          !a.locked &&
          a.token === null &&
          a.phases === null &&
          a.codec === null,
        `a new single-transaction key reads back as ${shown(a)}: expected started, not expired, not locked, no token, phases or codec.`,
      )
      expectThat(
        b?.locked === true && !b.expired && b.token === 'tok' && b.codec === 'c1' && b.phases !== null && sameJson(b.phases, phases),
        `a new flow key reads back as ${shown(b)}: expected locked by "tok", codec c1, and its phases as JSON equal to ${phases}.`,
      )
    },
  },
  {
    id: 'claim-committed',
    title: 'claim of a committed key inserts nothing, and returns the row when the statement can see it',
    competing: false,
    async run(s) {
      await s.statements.claim(s.db, s.values('k'))
      const again = await s.statements.claim(s.db, s.values('k', { fingerprint: 'another request' }))
      expectThat(again.claimed === null, `a second claim of a committed key returned ${shown(again)} instead of claimed: null.`)
      expectThat(
        again.row === undefined || again.row.fingerprint === 'fingerprint of k',
        `the row a second claim returned is not the committed one: ${shown(again.row)}.`,
      )
      const { rows } = await sql<{ n: unknown }>`select count(*) as n from ${sql.table(s.table)}`.execute(s.db)
      expectThat(Number(rows[0]?.n) === 1, `the table holds ${shown(rows[0]?.n)} rows after two claims of one key, not 1.`)
    },
  },
  {
    id: 'claim-waits',
    title: 'claim waits for a competing uncommitted insert of the key: it finds the key once that commits, and takes it once that rolls back',
    competing: true,
    async run(s) {
      for (const end of ['commit', 'rollback'] as const) {
        const key = `waits-${end}`
        const holder = await s.hold(s.db, (trx) => s.statements.claim(trx, s.values(key)))
        const started = performance.now()
        let ended = Number.POSITIVE_INFINITY
        const waiting = settled(
          s.statements.claim(s.competitor, s.values(key, { wait: 10_000 })).finally(() => {
            ended = performance.now()
          }),
          `a claim waiting for a competing insert that ends with ${end}`,
        )
        await sleep(300)
        await (end === 'commit' ? holder.trx.commit() : holder.trx.rollback()).execute()
        const outcome = await waiting
        // When the claim itself ended: it must not return before the competing insert ends.
        const ms = ended - started
        expectThat(ms >= 250, `a claim of a key another transaction had just inserted ended after ${Math.round(ms)} ms, without waiting for it.`)
        if ('error' in outcome) {
          // Under REPEATABLE READ or SERIALIZABLE, a key committed after the claim's snapshot is a
          // serialization failure, which the core retries; anything else is an error.
          if (end === 'commit' && s.dialect.classify(outcome.error) === 'serialization_failure') continue
          throw new ContractViolation(`a claim waiting for a competing insert that ends with ${end} failed: ${describeError(outcome.error)}.`)
        }
        if (end === 'commit')
          expectThat(
            outcome.value.claimed === null,
            `a claim found the key a competing transaction committed and still returned ${shown(outcome.value)}.`,
          )
        else expectThat(outcome.value.claimed !== null, `a claim did not take a key whose competing insert rolled back: ${shown(outcome.value)}.`)
      }
    },
  },
  {
    id: 'claim-wait-zero',
    title: 'claim with wait 0 gives up at once on a competing uncommitted insert, with an error classified lock_timeout',
    competing: true,
    async run(s) {
      const holder = await s.hold(s.db, (trx) => s.statements.claim(trx, s.values('k')))
      const { error, ms } = await rejection(
        s.statements.claim(s.competitor, s.values('k', { wait: 0 })),
        'a claim with wait 0 of a key another transaction holds',
      )
      await holder.trx.rollback().execute()
      expectClassified(s.dialect, error, ['lock_timeout'], 'a claim with wait 0 of a held key')
      expectThat(ms < BOUND_SLACK, `a claim with wait 0 gave up after ${Math.round(ms)} ms.`)
    },
  },
  {
    id: 'claim-wait-bounded',
    title: `claim waits at most its wait (${BOUNDED_WAIT} ms) for a competing uncommitted insert, then fails with lock_timeout`,
    competing: true,
    async run(s) {
      const holder = await s.hold(s.db, (trx) => s.statements.claim(trx, s.values('k')))
      const { error, ms } = await rejection(
        s.statements.claim(s.competitor, s.values('k', { wait: BOUNDED_WAIT })),
        `a claim with wait ${BOUNDED_WAIT}`,
      )
      await holder.trx.rollback().execute()
      expectClassified(s.dialect, error, ['lock_timeout'], `a claim with wait ${BOUNDED_WAIT} of a held key`)
      expectThat(ms >= BOUNDED_WAIT * 0.8 && ms < BOUNDED_WAIT + BOUND_SLACK, `a claim with wait ${BOUNDED_WAIT} gave up after ${Math.round(ms)} ms.`)
    },
  },
  {
    id: 'lock-latest',
    title:
      'lock holds the latest committed row until its transaction ends: lockNow elsewhere fails at once with lock_timeout, then reads what was committed',
    competing: true,
    async run(s) {
      await s.statements.claim(s.db, s.values('k'))
      const holder = await s.hold(s.db, (trx) => s.statements.lock(trx, 'contract', 'k', 5000))
      expectThat(holder.value?.fingerprint === 'fingerprint of k', `lock read ${shown(holder.value)} instead of the committed row.`)
      await sql`update ${sql.table(s.table)} set recovery_point = 'finished' where scope = 'contract' and ${sql.ref('key')} = 'k'`.execute(holder.trx)
      const attempt = s.competitor.transaction().execute((trx) => s.statements.lockNow(trx, 'contract', 'k'))
      const { error, ms } = await rejection(attempt, 'lockNow of a row another transaction locked')
      expectClassified(s.dialect, error, ['lock_timeout'], 'lockNow of a locked row')
      expectThat(ms < BOUND_SLACK, `lockNow of a locked row gave up after ${Math.round(ms)} ms, not at once.`)
      // A transaction that read the row before the holder committed: its locking read must see the
      // commit (or, under REPEATABLE READ or SERIALIZABLE, fail as a serialization failure), never
      // the row as its snapshot had it.
      const reader = await s.hold(s.competitor, async (trx) => {
        await sql`select recovery_point from ${sql.table(s.table)} where ${sql.ref('key')} = 'k'`.execute(trx)
      })
      await holder.trx.commit().execute()
      const after = await settled(s.statements.lockNow(reader.trx, 'contract', 'k'), 'lockNow after the holder committed')
      await reader.trx.rollback().execute()
      if ('error' in after) expectClassified(s.dialect, after.error, ['serialization_failure'], 'lockNow of a row changed since the snapshot')
      else
        expectThat(
          after.value?.recoveryPoint === 'finished',
          `lockNow after the holder committed read ${shown(after.value)}, not the committed change.`,
        )
    },
  },
  {
    id: 'lock-wait-bounded',
    title: `lock waits at most its wait (${BOUNDED_WAIT} ms) for another holder, then fails with lock_timeout`,
    competing: true,
    async run(s) {
      await s.statements.claim(s.db, s.values('k'))
      const holder = await s.hold(s.db, (trx) => s.statements.lock(trx, 'contract', 'k', 5000))
      const attempt = s.competitor.transaction().execute((trx) => s.statements.lock(trx, 'contract', 'k', BOUNDED_WAIT))
      const { error, ms } = await rejection(attempt, `lock with wait ${BOUNDED_WAIT} of a locked row`)
      await holder.trx.rollback().execute()
      expectClassified(s.dialect, error, ['lock_timeout'], `lock with wait ${BOUNDED_WAIT} of a locked row`)
      expectThat(ms >= BOUNDED_WAIT * 0.8 && ms < BOUNDED_WAIT + BOUND_SLACK, `lock with wait ${BOUNDED_WAIT} gave up after ${Math.round(ms)} ms.`)
    },
  },
  {
    id: 'lock-wait-restored',
    title:
      "withLockWait puts the session's lock wait back after its statements, whether they succeed or fail: a later plain statement waits as before",
    competing: true,
    async run(s) {
      await s.statements.claim(s.db, s.values('k'))
      // A plain update of a row another transaction holds for 1.5 s must wait for it, not give up
      // after the bounded wait (which MySQL rounds up to 1 s). The holder only locks the row: a change would be a serialization
      // failure for a competitor whose snapshot predates it (a SERIALIZABLE default).
      const waitsAsBefore = async (on: typeof s.db, after: string) => {
        const holder = await s.hold(s.db, (trx) => s.statements.lock(trx, 'contract', 'k', 5000))
        const update = settled(s.touch(on, 'k'), `a plain update ${after}`)
        await sleep(1500)
        await holder.trx.commit().execute()
        const outcome = await update
        if ('error' in outcome)
          throw new ContractViolation(`a plain update ${after} did not wait for the row as before: ${describeError(outcome.error)}.`)
      }
      const fails = () => sql`select * from ${sql.table(`${s.table}_missing`)}`.execute(s.competitor)
      await s.competitor.connection().execute(async (conn) => {
        await conn.transaction().execute(async (trx) => {
          await s.statements.withLockWait(trx, 1, () => sql`select 1`.execute(trx))
          await waitsAsBefore(trx, 'in the transaction where withLockWait(1 ms) succeeded')
        })
        await s.statements.withLockWait(conn, 1, () => sql`select 1`.execute(conn))
        await waitsAsBefore(conn, 'after withLockWait(1 ms) succeeded')
        await s.statements.withLockWait(conn, 1, () => fails()).catch(() => undefined)
        await waitsAsBefore(conn, 'after withLockWait(1 ms) failed')
        await conn
          .transaction()
          .execute((trx) => s.statements.withLockWait(trx, 1, () => sql`select * from ${sql.table(`${s.table}_missing`)}`.execute(trx)))
          .catch(() => undefined)
        await waitsAsBefore(conn, 'after a transaction whose withLockWait(1 ms) failed')
      })
    },
  },
  {
    id: 'classify-deadlock',
    title: 'classify maps a deadlock (two transactions locking two rows in opposite orders) to deadlock',
    competing: true,
    async run(s) {
      await s.statements.claim(s.db, s.values('a'))
      await s.statements.claim(s.db, s.values('b'))
      const one = await s.hold(s.db, (trx) => s.touch(trx, 'a'))
      const two = await s.hold(s.competitor, (trx) => s.touch(trx, 'b'))
      const crossed = Promise.all([
        settled(s.touch(one.trx, 'b'), 'the first transaction locking its second row'),
        sleep(100).then(() => settled(s.touch(two.trx, 'a'), 'the second transaction locking its second row')),
      ])
      const outcomes = await crossed
      for (const holder of [one, two]) await holder.trx.rollback().execute()
      const errors = outcomes.flatMap((o) => ('error' in o ? [o.error] : []))
      expectThat(errors.length > 0, 'two transactions locked two rows in opposite orders and neither failed.')
      for (const error of errors) expectClassified(s.dialect, error, ['deadlock'], 'a transaction in a lock cycle')
    },
  },
  {
    id: 'classify-serialization',
    title:
      'classify maps the failure of a SERIALIZABLE transaction whose read another one changed to serialization_failure (or deadlock, where the database breaks it so)',
    competing: true,
    async run(s) {
      await s.statements.claim(s.db, s.values('k'))
      const serializable = await s.db.startTransaction().setIsolationLevel('serializable').execute()
      try {
        await sql`select fingerprint from ${sql.table(s.table)} where ${sql.ref('key')} = 'k'`.execute(serializable)
        const writer = settled(
          sql`update ${sql.table(s.table)} set recovery_point = 'changed elsewhere' where ${sql.ref('key')} = 'k'`.execute(s.competitor),
          'a change of the row the serializable transaction read',
        )
        await Promise.race([writer, sleep(300)])
        const own = await settled(
          sql`update ${sql.table(s.table)} set recovery_point = 'changed' where ${sql.ref('key')} = 'k'`.execute(serializable),
          'the serializable transaction writing the row it read',
        )
        const other = await writer
        const errors = [own, other].flatMap((outcome) => ('error' in outcome ? [outcome.error] : []))
        if (!('error' in own)) await serializable.commit().execute()
        expectThat(errors.length > 0, 'a serializable transaction wrote a row that another transaction changed after its read, and nothing failed.')
        for (const error of errors) expectClassified(s.dialect, error, ['serialization_failure', 'deadlock'], 'a serialization conflict')
      } finally {
        if (!serializable.isCommitted && !serializable.isRolledBack) await serializable.rollback().execute()
      }
    },
  },
  {
    id: 'classify-undefined-table',
    title: 'classify maps a statement on a missing idempotency table to undefined_table',
    competing: false,
    async run(s) {
      const missing = await s.dialect.prepare(s.db, `${s.table}_missing`)
      const { error } = await rejection(missing.claim(s.db, s.values('k')), 'a claim on a missing table')
      expectClassified(s.dialect, error, ['undefined_table'], 'a claim on a missing table')
    },
  },
  {
    id: 'classify-others',
    title: 'classify leaves every other error unclassified: a duplicate key, a syntax error, values that are not errors',
    competing: false,
    async run(s) {
      await s.statements.claim(s.db, s.values('k'))
      const duplicate = await rejection(
        sql`insert into ${sql.table(s.table)} (scope, ${sql.ref('key')}, fingerprint, recovery_point, created_at, last_run_at, expires_at)
          select scope, ${sql.ref('key')}, fingerprint, recovery_point, created_at, last_run_at, expires_at from ${sql.table(s.table)}`.execute(s.db),
        'an insert of a duplicate key',
      )
      const syntax = await rejection(sql`selec 1`.execute(s.db), 'a statement with a syntax error')
      for (const [what, error] of [
        ['a duplicate key', duplicate.error],
        ['a syntax error', syntax.error],
        ['an Error', new Error('boom')],
        ['undefined', undefined],
        ['null', null],
        ['a string', '40001'],
        ['an object with a code', { code: 42 }],
      ] as const) {
        const kind = s.dialect.classify(error)
        expectThat(kind === undefined, `classify() maps ${what} (${describeError(error)}) to '${kind}'; the core would handle it as that.`)
      }
    },
  },
  {
    id: 'prune-batches',
    title: 'pruneBatch deletes expired keys that no attempt holds, at most its limit at a time, and keeps held and live keys',
    competing: false,
    async run(s) {
      for (let n = 0; n < 5; n++) await s.statements.claim(s.db, s.values(`expired-${n}`, { expiresIn: 1 }))
      await s.statements.claim(s.db, s.values('held', { expiresIn: 1, token: 'tok', lease: 60_000 }))
      await s.statements.claim(s.db, s.values('live'))
      await sleep(50)
      const batches = [await s.statements.pruneBatch(s.db, 2)]
      while (batches.at(-1)! > 0 && batches.length < 10) batches.push(await s.statements.pruneBatch(s.db, 2))
      expectThat(shown(batches) === shown([2, 2, 1, 0]), `pruneBatch(2) deleted ${shown(batches)} rows in successive batches, not [2, 2, 1, 0].`)
      const { rows } = await sql<{ key: unknown }>`select ${sql.ref('key')} as ${sql.ref('key')} from ${sql.table(s.table)}`.execute(s.db)
      // A binary key column (MySQL) comes back as bytes.
      const left = rows.map((r) => String(r.key)).sort()
      expectThat(shown(left) === shown(['held', 'live']), `after pruning, the table holds the keys ${shown(left)}, not the held and the live one.`)
    },
  },
  {
    id: 'prune-skips-locked',
    title: 'pruneBatch does not wait for an expired key another transaction has locked: it deletes the others and leaves that one',
    competing: true,
    async run(s) {
      for (const key of ['locked', 'free']) await s.statements.claim(s.db, s.values(key, { expiresIn: 1 }))
      await sleep(50)
      const holder = await s.hold(s.db, (trx) => s.statements.lock(trx, 'contract', 'locked', 5000))
      const started = performance.now()
      const outcome = await settled(s.statements.pruneBatch(s.competitor, 10), 'pruneBatch beside a locked expired key')
      const ms = performance.now() - started
      await holder.trx.rollback().execute()
      if ('error' in outcome)
        throw new ContractViolation(`pruneBatch beside a locked expired key failed after ${Math.round(ms)} ms: ${describeError(outcome.error)}.`)
      expectThat(
        outcome.value === 1 && ms < BOUND_SLACK,
        `pruneBatch beside a locked expired key deleted ${outcome.value} rows after ${Math.round(ms)} ms, not 1 at once.`,
      )
      expectThat((await s.read('locked')) !== undefined, 'pruneBatch deleted the key another transaction had locked.')
    },
  },
  {
    id: 'clock',
    title: 'clock, later, elapsed and epochMs agree with each other and with UTC, also through the time columns',
    competing: false,
    async run(s) {
      const d = s.dialect
      const { rows } = await sql<Record<string, unknown>>`select ${d.epochMs(d.clock)} as now, ${d.epochMs(d.later(sql.lit(60_000)))} as later,
        ${d.elapsed(d.later(sql.lit(-1500)))} as elapsed`.execute(s.db)
      const now = Number(rows[0]?.now)
      const later = Number(rows[0]?.later) - now
      const elapsed = Number(rows[0]?.elapsed)
      expectThat(Math.abs(later - 60_000) <= 5, `epochMs(later(60000)) - epochMs(clock) is ${later} ms, not 60000.`)
      expectThat(Math.abs(elapsed - 1500) <= 5, `elapsed(later(-1500)) is ${elapsed} ms, not 1500.`)
      const skew = now - Date.now()
      expectThat(
        Math.abs(skew) < 5 * 60_000,
        `epochMs(clock) is ${Math.round(skew / 60_000)} min off this process's clock: hours mean a local time read as UTC.`,
      )
      await s.statements.claim(s.db, s.values('k', { token: 'tok', lease: 30_000, expiresIn: 90_000 }))
      const stored = await sql<
        Record<string, unknown>
      >`select ${d.epochMs(sql.ref('created_at'))} as created, ${d.epochMs(sql.ref('locked_until'))} as locked,
        ${d.epochMs(sql.ref('expires_at'))} as expires, ${d.elapsed(sql.ref('created_at'))} as age from ${sql.table(s.table)}`.execute(s.db)
      const row = stored.rows[0] ?? {}
      const [created, locked, expires, age] = [row.created, row.locked, row.expires, row.age].map(Number) as [number, number, number, number]
      expectThat(
        Math.abs(locked - created - 30_000) <= 5 && Math.abs(expires - created - 90_000) <= 5,
        `times stored by a claim (lease 30000, expiresIn 90000) read back as created ${created}, locked until +${locked - created}, expires +${expires - created}.`,
      )
      expectThat(age >= 0 && age < 60_000, `elapsed(created_at) of a key just claimed is ${age} ms.`)
      expectThat(Math.abs(created - now) < 60_000, `created_at of a key just claimed is ${created - now} ms from the clock read before it.`)
    },
  },
  {
    id: 'json',
    title: 'JSON text stored by claim and read through jsonText is the same JSON, whatever the driver parses',
    competing: false,
    async run(s) {
      const phases = '{"b":1,"a":[1.5,"ü 💳",null,{"z":true}],"n":12345678901234567890,"s":"{\\"not\\":\\"parsed\\"}"}'
      await s.statements.claim(s.db, s.values('k', { phases, codec: 'c' }))
      const row = await s.read('k')
      expectThat(typeof row?.phases === 'string' && sameJson(row.phases, phases), `phases stored as ${phases} read back as ${shown(row?.phases)}.`)
      for (const text of ['"a string"', '[]', '123', 'null']) {
        await sql`update ${sql.table(s.table)} set response = ${s.dialect.json(sql`${text}`)} where ${sql.ref('key')} = 'k'`.execute(s.db)
        const again = await s.read('k')
        expectThat(again?.response !== null && sameJson(again?.response ?? '', text), `the response ${text} read back as ${shown(again?.response)}.`)
      }
    },
  },
  {
    id: 'upgrade-0001',
    title: 'a table created by migration 0001 upgrades to the latest schema, keeping its keys; upgrades.columns and indexes read what is there',
    competing: false,
    async run(s) {
      const d = s.dialect
      await dropTable(s.origin, s.where)
      const migrations = await schemaMigrations(s.where.name, d, 'adopt').getMigrations()
      const first = Object.entries(migrations).find(([name]) => name.endsWith('_0001_create'))
      expectThat(first !== undefined, 'the package has no migration 0001.')
      await first[1].up(s.origin)
      await sql`insert into ${sql.table(s.table)} (scope, ${sql.ref('key')}, fingerprint, recovery_point, response, created_at, last_run_at, expires_at)
        values ('contract', 'old', 'fingerprint of old', 'finished', ${d.json(sql`${'{"ok":true}'}`)}, ${d.clock}, ${d.clock}, ${d.later(sql.lit(60_000))})`.execute(
        s.db,
      )
      const result = await migrateTable(s.origin, s.where, d, false)
      expectThat(result.results.length >= 2, `migrating a 0001 table ran ${shown(result.results.map((r) => r.migrationName))}.`)
      const columns = await d.upgrades.columns(s.db, s.where)
      for (const column of ['scope', 'key', 'fingerprint', 'codec', 'flow_name', 'recover_after']) {
        expectThat(columns.includes(column), `upgrades.columns() lists ${shown(columns)}, without "${column}".`)
      }
      const indexes = await d.upgrades.indexes(s.db, s.where)
      expectThat(
        indexes.some((index) => index.unique && shown(index.columns) === shown(['scope', 'key'])),
        `upgrades.indexes() lists ${shown(indexes)}, without the unique index on (scope, key).`,
      )
      const statements = await d.prepare(s.db, s.table)
      const claim = await statements.claim(s.db, s.values('old', { fingerprint: 'fingerprint of old' }))
      const row = (claim.claimed === null ? claim.row : undefined) ?? (await s.read('old'))
      expectThat(
        claim.claimed === null && row?.recoveryPoint === 'finished' && row.codec === null && sameJson(row.response ?? '', '{"ok":true}'),
        `a key written before the upgrade reads back as ${shown(row)} (claim: ${shown(claim.claimed)}).`,
      )
    },
  },
]

function sameJson(a: string, b: string): boolean {
  try {
    return shown(JSON.parse(a)) === shown(JSON.parse(b))
  } catch {
    return false
  }
}
