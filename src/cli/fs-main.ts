#!/usr/bin/env node
/** Stand-alone entry for `vmshift fs` (node dist/src/cli/fs-main.js ARGS). */
import { fsCommand } from "./fs.js";

process.exitCode = await fsCommand(process.argv.slice(2));
