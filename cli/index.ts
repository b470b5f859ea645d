#!/usr/bin/env node
// citty picks its colours when it is loaded and looks only at NO_COLOR=1: colours are for a
// terminal, and any non-empty NO_COLOR turns them off (no-color.org).
if (!process.stdout.isTTY || process.env.NO_COLOR) process.env.NO_COLOR = '1'
await import('./main.js')
