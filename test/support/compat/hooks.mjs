// Resolve hooks of the compatibility lane: the oldest supported Kysely, postgres.js dialect and
// better-sqlite3, installed beside the newest under other names (see vitest.config.ts).
const RENAMED = { kysely: 'kysely028', 'kysely-postgres-js5': 'kysely-postgres-js', 'better-sqlite3': 'better-sqlite3-node22' }

export async function resolve(specifier, context, next) {
  if (Object.hasOwn(RENAMED, specifier)) return next(RENAMED[specifier], context)
  // A subpath 0.28 lacks (kysely/migration) fails to resolve, as it does for a user of 0.28.
  if (specifier.startsWith('kysely/')) return next(`kysely028/${specifier.slice('kysely/'.length)}`, context)
  return next(specifier, context)
}
