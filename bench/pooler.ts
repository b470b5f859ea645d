import { spawn } from 'node:child_process'
import { once } from 'node:events'
import { accessSync, chmodSync, constants, mkdtempSync, rmSync, writeFileSync } from 'node:fs'
import { createServer } from 'node:net'
import { tmpdir } from 'node:os'
import { delimiter, join } from 'node:path'
import { ping } from '../test/support/databases.js'

/** PgBouncer in front of the benchmark's Postgres server: where to connect, and how to stop it. */
export interface Pooler {
  readonly url: string
  /** Where it came from, for the report. */
  readonly origin: string
  stop(): Promise<void>
}

/**
 * `KIDEM_PGBOUNCER_URL` when it is set; else a PgBouncer of its own in transaction mode, started
 * from the `pgbouncer` binary (Debian's package puts it in /usr/sbin) in front of `postgresUrl`;
 * else `undefined`: PgBouncer is not installed.
 */
export async function startPooler(postgresUrl: string): Promise<Pooler | undefined> {
  const given = process.env.KIDEM_PGBOUNCER_URL
  if (given) {
    await ping('postgres', given)
    return { url: given, origin: 'KIDEM_PGBOUNCER_URL', stop: async () => {} }
  }
  const binary = findBinary('pgbouncer')
  if (!binary) return undefined
  const server = new URL(postgresUrl)
  const user = decodeURIComponent(server.username) || 'postgres'
  const database = server.pathname.slice(1) || 'postgres'
  const port = await freePort()
  const dir = mkdtempSync(join(tmpdir(), 'kysely-idempotency-pgbouncer-'))
  const ini = join(dir, 'pgbouncer.ini')
  const users = join(dir, 'users.txt')
  writeFileSync(users, `"${user}" "${decodeURIComponent(server.password)}"\n`)
  writeFileSync(
    ini,
    [
      '[databases]',
      `${database} = host=${server.hostname} port=${server.port || 5432} dbname=${database} user=${user}`,
      '[pgbouncer]',
      'listen_addr = 127.0.0.1',
      `listen_port = ${port}`,
      'unix_socket_dir =',
      'auth_type = trust',
      `auth_file = ${users}`,
      'pool_mode = transaction',
      'max_client_conn = 200',
      'default_pool_size = 20',
      '',
    ].join('\n'),
  )
  // PgBouncer refuses to run as root; it reads its files after switching to the user given.
  chmodSync(dir, 0o755)
  const asRoot = process.getuid?.() === 0
  const child = spawn(binary, [...(asRoot ? ['-u', 'postgres'] : []), ini], { stdio: ['ignore', 'ignore', 'pipe'] })
  let output = ''
  child.stderr.on('data', (chunk: Buffer) => (output += chunk.toString()))
  const url = `postgres://${encodeURIComponent(user)}@127.0.0.1:${port}/${database}`
  const stop = async () => {
    if (child.exitCode === null) {
      child.kill('SIGTERM')
      await once(child, 'exit')
    }
    rmSync(dir, { recursive: true, force: true })
  }
  for (let tries = 0; ; tries++) {
    try {
      await ping('postgres', url)
      return { url, origin: `${binary}, transaction pooling`, stop }
    } catch (error) {
      if (child.exitCode === null && tries < 50) {
        await new Promise((resolve) => setTimeout(resolve, 100))
        continue
      }
      await stop()
      throw new Error(`PgBouncer (${binary}) did not answer at ${url}: ${(error as Error).message}\n${output}`)
    }
  }
}

function findBinary(name: string): string | undefined {
  const dirs = [...(process.env.PATH ?? '').split(delimiter), '/usr/sbin', '/usr/local/sbin']
  for (const dir of dirs.filter(Boolean)) {
    try {
      accessSync(join(dir, name), constants.X_OK)
      return join(dir, name)
    } catch {
      // not in this directory
    }
  }
  return undefined
}

function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const server = createServer()
    server.once('error', reject)
    server.listen(0, '127.0.0.1', () => {
      const address = server.address()
      server.close(() => resolve(typeof address === 'object' && address ? address.port : 0))
    })
  })
}
