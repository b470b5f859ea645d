// Resolve hooks of the compatibility lane: the oldest supported Kysely, postgres.js dialect and
// better-sqlite3, installed beside the newest under other names, and NestJS 11, installed in the
// test/support/nest11 workspace (see vitest.config.ts).
const RENAMED = { kysely: 'kysely028', 'kysely-postgres-js5': 'kysely-postgres-js', 'better-sqlite3': 'better-sqlite3-node22' }
/** Resolving from the workspace finds its own node_modules first. */
const NEST11 = new URL('../nest11/package.json', import.meta.url).href

export async function resolve(specifier, context, next) {
  if (Object.hasOwn(RENAMED, specifier)) return next(RENAMED[specifier], context)
  if (specifier.startsWith('@nestjs/')) return next(specifier, { ...context, parentURL: NEST11 })
  // A subpath 0.28 lacks (kysely/migration) fails to resolve, as it does for a user of 0.28.
  if (specifier.startsWith('kysely/')) return next(`kysely028/${specifier.slice('kysely/'.length)}`, context)
  return next(specifier, context)
}
