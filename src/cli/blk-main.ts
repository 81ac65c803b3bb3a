#!/usr/bin/env node
/** Stand-alone entry for `vmshift blk` (node dist/src/cli/blk-main.js ARGS). */
import { blkCommand } from "./blk.js";

process.exitCode = await blkCommand(process.argv.slice(2));
