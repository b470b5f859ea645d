import { defineCommand, runMain, type CommandDef } from 'citty'
import { abandoned } from './commands/abandoned.js'
import { down } from './commands/down.js'
import { forget } from './commands/forget.js'
import { inspect } from './commands/inspect.js'
import { migrate } from './commands/migrate.js'
import { prune } from './commands/prune.js'
import { sqlCommand } from './commands/sql.js'
import { status } from './commands/status.js'
import { checkArgv } from './argv.js'
import { inspect as show } from 'node:util'
import { redactText } from './connect.js'
import { CliError, describe, EXIT } from './errors.js'
import { packageVersion } from './version.js'

const commands = { migrate, status, down, sql: sqlCommand, prune, abandoned, inspect, forget }

// Every command reports its failure as one line and a non-zero exit; --debug adds the stack.
for (const command of Object.values(commands) as CommandDef[]) {
  const run = command.run!
  command.run = async (context) => {
    try {
      await run(context)
    } catch (error) {
      console.error(`kysely-idempotency: ${describe(error)}`)
      if (context.args.debug) {
        const shown = error instanceof CliError && error.cause ? error.cause : error
        const url = typeof context.args.url === 'string' ? context.args.url : process.env.DATABASE_URL
        console.error(redactText(show(shown, { depth: 6 }), url))
      }
      process.exitCode = EXIT.error
    }
  }
}

const main = defineCommand({
  meta: { name: 'kysely-idempotency', version: packageVersion(), description: 'Manage the table of kysely-idempotency' },
  subCommands: commands,
})

const wrong = checkArgv(process.argv.slice(2), commands as Record<string, { args?: Record<string, { type?: string }> }>)
if (wrong) {
  console.error(`kysely-idempotency: ${wrong}`)
  process.exitCode = EXIT.error
} else {
  await runMain(main)
}
