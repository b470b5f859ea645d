import { defineCommand } from 'citty'
import { connectionArgs, withDatabase } from '../args.js'
import { CliError } from '../errors.js'

export const prune = defineCommand({
  meta: { name: 'prune', description: 'Delete expired keys that no attempt holds, in batches' },
  args: {
    ...connectionArgs,
    batch: { type: 'string', description: 'Rows deleted per statement', default: '1000', valueHint: 'n' },
  },
  run: ({ args }) => {
    const batchSize = Number(args.batch)
    if (!Number.isSafeInteger(batchSize) || batchSize <= 0) throw new CliError(`--batch must be a positive integer, got "${args.batch}".`)
    return withDatabase(args, { create: false }, async ({ idempotency, table }) => {
      const deleted = await idempotency.prune({ batchSize })
      console.log(`Deleted ${deleted} expired ${deleted === 1 ? 'key' : 'keys'} from "${table}".`)
    })
  },
})
