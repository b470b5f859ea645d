import type { TestProject } from 'vitest/node'
import { sql } from 'kysely'
import { ALL_TARGETS, openDatabase, ping, SERVER_LOCATIONS, type DatabaseName, type Locations } from './support/databases.js'

declare module 'vitest' {
  export interface ProvidedContext {
    locations: Locations
    targets: string[]
  }
}

interface Server {
  readonly database: Exclude<DatabaseName, 'sqlite'>
  readonly env: string
  readonly local: string
  readonly image: string
  start(image: string): Promise<{ url: string; stop(): Promise<unknown> }>
}

const SERVERS: readonly Server[] = [
  {
    database: 'postgres',
    ...SERVER_LOCATIONS.postgres,
    image: 'postgres:15',
    async start(image) {
      const { GenericContainer, Wait } = await import('testcontainers')
      const c = await new GenericContainer(image)
        .withEnvironment({ POSTGRES_HOST_AUTH_METHOD: 'trust', POSTGRES_DB: 'test' })
        .withCommand(['postgres', '-c', 'max_connections=300'])
        .withExposedPorts(5432)
        .withWaitStrategy(Wait.forLogMessage(/database system is ready to accept connections/, 2))
        .start()
      return { url: `postgres://postgres@${c.getHost()}:${c.getMappedPort(5432)}/test`, stop: () => c.stop() }
    },
  },
  {
    database: 'mysql',
    ...SERVER_LOCATIONS.mysql,
    image: 'mariadb:10.11',
    async start(image) {
      const { GenericContainer, Wait } = await import('testcontainers')
      const c = await new GenericContainer(image)
        .withEnvironment({ MARIADB_ALLOW_EMPTY_ROOT_PASSWORD: '1', MARIADB_DATABASE: 'test' })
        .withExposedPorts(3306)
        .withWaitStrategy(Wait.forLogMessage(/ready for connections/, 2))
        .start()
      return { url: `mysql://root@${c.getHost()}:${c.getMappedPort(3306)}/test`, stop: () => c.stop() }
    },
  },
]

/**
 * A database beside `url`'s whose transactions are SERIALIZABLE by default (made once, kept):
 * what CockroachDB gives every transaction (YugabyteDB defaults to snapshot isolation or read committed).
 */
async function serializableDatabase(url: string): Promise<string> {
  const name = 'kidem_serializable'
  const db = openDatabase('postgres', url, 1)
  try {
    const { rows } = await sql`select 1 from pg_database where datname = ${name}`.execute(db)
    if (!rows.length)
      await sql`create database ${sql.id(name)}`.execute(db).catch((error: { code?: string }) => {
        // Another run made it meanwhile.
        if (error.code !== '42P04') throw error
      })
    await sql`alter database ${sql.id(name)} set default_transaction_isolation to 'serializable'`.execute(db)
  } finally {
    await db.destroy()
  }
  const serializable = new URL(url)
  serializable.pathname = `/${name}`
  return serializable.toString()
}

async function dockerAnswers(): Promise<boolean> {
  try {
    const { getContainerRuntimeClient } = await import('testcontainers')
    await getContainerRuntimeClient()
    return true
  } catch {
    return false
  }
}

/**
 * Finds each server database the selected targets need: the env var, else a testcontainers
 * container when a Docker engine answers, else the local default. It never skips: a database
 * that does not answer fails the run with the env var to set.
 */
export default async function setup(project: TestProject): Promise<() => Promise<void>> {
  const wanted = process.env.KIDEM_TARGETS?.split(',')
    .map((s) => s.trim())
    .filter(Boolean)
  const targets = ALL_TARGETS.filter((t) => !wanted || wanted.includes(t.id) || wanted.includes(t.database) || wanted.includes(t.driver))
  if (targets.length === 0)
    throw new Error(`KIDEM_TARGETS=${process.env.KIDEM_TARGETS} selects nothing; use ids from: ${ALL_TARGETS.map((t) => t.id).join(', ')}`)
  const locations: Locations = {}
  const stops: Array<() => Promise<unknown>> = []
  let docker: boolean | undefined
  for (const server of SERVERS) {
    // PGlite runs in process: it needs no server.
    if (!targets.some((t) => t.database === server.database && t.driver !== 'pglite')) continue
    let url = process.env[server.env]
    let origin = server.env
    if (!url && (docker ??= await dockerAnswers())) {
      const started = await server.start(server.image)
      stops.push(started.stop)
      url = started.url
      origin = `a ${server.image} container`
    }
    if (!url) {
      url = server.local
      origin = 'the local default'
    }
    try {
      await ping(server.database, url)
    } catch (error) {
      throw new Error(
        `${server.database} did not answer at ${url} (${origin}): ${(error as Error).message}. ` +
          `Set ${server.env} to a reachable server, start a Docker engine, or run a local server.`,
      )
    }
    locations[server.database] = url
  }
  if (locations.postgres && targets.some((t) => t.server === 'postgres-serializable')) {
    locations['postgres-serializable'] = process.env.KIDEM_PG_SERIALIZABLE_URL ?? (await serializableDatabase(locations.postgres))
  }
  const pooler = process.env.KIDEM_PGBOUNCER_URL
  if (pooler && targets.some((t) => t.server === 'pgbouncer')) {
    try {
      await ping('postgres', pooler)
    } catch (error) {
      throw new Error(
        `PgBouncer did not answer at ${pooler} (KIDEM_PGBOUNCER_URL): ${(error as Error).message}. Start it (see the README) or unset the variable.`,
      )
    }
    locations.pgbouncer = pooler
  }
  project.provide('locations', locations)
  project.provide(
    'targets',
    targets.map((t) => t.id),
  )
  return async () => {
    await Promise.all(stops.map((stop) => stop()))
  }
}
