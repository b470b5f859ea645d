import { CompiledQuery, sql, type Kysely, type RawBuilder } from 'kysely'

class Slot {
  constructor(readonly name: string) {}
}

/** A statement compiled once by Kysely, then bound to fresh values on every call. */
export interface Prepared<N extends string> {
  readonly sql: string
  bind(values: Readonly<Record<N, unknown>>): CompiledQuery
}

/**
 * Compiles a statement once with the database's own Kysely compiler (quoting, placeholders),
 * so that the hot path only binds values instead of building and compiling a query tree on
 * every request.
 *
 * `build` receives one placeholder per name; each may be used any number of times.
 */
export function prepare<N extends string>(
  db: Kysely<unknown>,
  names: readonly N[],
  build: (slots: Readonly<Record<N, RawBuilder<unknown>>>) => RawBuilder<unknown>,
): Prepared<N> {
  const slots = Object.fromEntries(names.map((name) => [name, sql`${new Slot(name)}`])) as Record<N, RawBuilder<unknown>>
  const compiled = build(slots).compile(db.withoutPlugins())
  const order = compiled.parameters.map((p) => {
    if (!(p instanceof Slot)) throw new TypeError('Prepared statements take values only through their named slots.')
    return p.name as N
  })
  return {
    sql: compiled.sql,
    bind: (values) =>
      CompiledQuery.raw(
        compiled.sql,
        order.map((name) => values[name]),
      ),
  }
}
