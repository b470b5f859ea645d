import { defineCommand } from 'citty'
import { connectionArgs, keyArgs, requiredKey, withDatabase } from '../args.js'

export const forget = defineCommand({
  meta: { name: 'forget', description: "Delete one key, so that the client's next request with it runs as new (refused while an attempt holds it)" },
  args: { ...connectionArgs, ...keyArgs },
  run: ({ args }) => {
    const key = requiredKey(args)
    return withDatabase(args, { create: false }, async ({ idempotency, table }) => {
      const deleted = await idempotency.forget({ key, scope: args.scope })
      console.log(
        deleted ? `Forgot the key "${key}" in scope "${args.scope}".` : `No key "${key}" in scope "${args.scope}" in "${table}"; nothing to forget.`,
      )
    })
  },
})
