import { readFileSync } from 'node:fs'

/** The version in the package's own package.json, wherever the build put this file. */
export function packageVersion(): string {
  for (let dir = new URL('.', import.meta.url); ; dir = new URL('..', dir)) {
    try {
      const manifest = JSON.parse(readFileSync(new URL('package.json', dir), 'utf8')) as { name?: string; version?: string }
      if (manifest.name === 'kysely-idempotency' && manifest.version) return manifest.version
    } catch {
      // No package.json here (or not ours): look one directory up.
    }
    if (new URL('..', dir).href === dir.href) return 'unknown'
  }
}
