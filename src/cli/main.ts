#!/usr/bin/env node
/**
 * The `vmshift` command. Each subcommand lives in its own module; this file only dispatches.
 */
import { parseArgs } from "node:util";
import { BLK_USAGE, blkCommand } from "./blk.js";
import { runMemoryDemo } from "./demo-memory.js";
import { MIGRATE_USAGE, migrateCommand } from "./migrate.js";
import { PROBE_USAGE, probeCommand } from "./probe.js";
import { SNAPSHOT_USAGE, snapshotCommand } from "./snapshot.js";

const USAGE = `usage: vmshift <command> [options]

commands:
  demo [--size MiB] [--rounds N] [--json]
        migrate a running workload's memory between two guest memories, round by round,
        with every dirty-tracking source the machine offers, and verify it by digest
  migrate (--listen ENDPOINT | --to ENDPOINT) [--mode precopy|postcopy] [--json] ...
        migrate the memory of a running worker-thread workload between two processes or hosts
  snapshot save|restore --file FILE [--lazy]
        background snapshot of running memory (userfaultfd write-protect) and its restore
  probe --socket PATH [--json]
        connect to any vhost-user back-end and print what it offers
  blk (--socket-path PATH | --fd N) --image FILE [--readonly] [--queues N]
        serve a raw image as a vhost-user-blk device (QEMU: -device vhost-user-blk-pci)
  help [COMMAND]
        this text, or a command's own
`;

type Command = (argv: string[]) => Promise<number>;

const commands: Record<string, Command> = {
  async demo(argv) {
    const { values } = parseArgs({
      args: argv,
      options: {
        size: { type: "string", default: "256" },
        rounds: { type: "string", default: "10" },
        json: { type: "boolean", default: false },
      },
    });
    const sizeMiB = Number(values.size);
    const maxRounds = Number(values.rounds);
    if (!Number.isInteger(sizeMiB) || sizeMiB < 16 || sizeMiB > 4096)
      throw new UsageError("--size must be 16..4096 (MiB)");
    if (!Number.isInteger(maxRounds) || maxRounds < 1) throw new UsageError("--rounds must be a positive integer");
    const r = await runMemoryDemo({
      sizeMiB,
      maxRounds,
      json: values.json ?? false,
      convergePages: 64,
      out: (l) => process.stdout.write(`${l}\n`),
    });
    return r.verified ? 0 : 1;
  },
  probe: (argv) => probeCommand(argv),
  blk: (argv) => blkCommand(argv),
  migrate: (argv) => migrateCommand(argv),
  snapshot: (argv) => snapshotCommand(argv),
  async help(argv) {
    const usage: Record<string, string> = {
      probe: PROBE_USAGE,
      blk: BLK_USAGE,
      migrate: MIGRATE_USAGE,
      snapshot: SNAPSHOT_USAGE,
    };
    process.stdout.write(usage[argv[0] ?? ""] ?? USAGE);
    return 0;
  },
};

class UsageError extends Error {}

async function main(argv: string[]): Promise<number> {
  const [name = "help", ...rest] = argv;
  const cmd = commands[name];
  if (!cmd) {
    process.stderr.write(`vmshift: unknown command '${name}'\n${USAGE}`);
    return 2;
  }
  try {
    return await cmd(rest);
  } catch (e) {
    if (e instanceof UsageError || (e as { code?: string }).code?.startsWith("ERR_PARSE_ARGS")) {
      process.stderr.write(`vmshift ${name}: ${(e as Error).message}\n`);
      return 2;
    }
    throw e;
  }
}

process.exitCode = await main(process.argv.slice(2));
