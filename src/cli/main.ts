#!/usr/bin/env node
/**
 * The `vmshift` command. Each subcommand lives in its own module; this file only dispatches.
 */
import { BLK_USAGE, blkCommand } from "./blk.js";
import { DEMO_USAGE, demoCommand } from "./demo.js";
import { demoDestinationCommand } from "./demo-destination.js";
import { MIGRATE_USAGE, migrateCommand } from "./migrate.js";
import { PROBE_USAGE, probeCommand } from "./probe.js";
import { SNAPSHOT_USAGE, snapshotCommand } from "./snapshot.js";

const USAGE = `usage: vmshift <command> [options]

commands:
  demo [--size MiB] [--vcpus N] [--dirty-rate MiB/s] [--mode precopy|postcopy] [--dirty-tracking bitmap|ring] [--json]
        boot a micro-VM (KVM, 2 vCPUs by default) and live-migrate it while it runs to a second
        process; checks memory digests and that each vCPU's counter continues there (no KVM:
        a worker-thread workload's memory, and it says so)
  demo --memory-only [--size MiB] [--rounds N] [--json]
        the memory layer alone: every dirty-tracking source the machine offers, in-process
  migrate (--listen ENDPOINT | --to ENDPOINT) [--mode precopy|postcopy] [--json] ...
        migrate the memory of a running worker-thread workload between two processes or hosts
        (postcopy over tcp:/unix: with a preempt channel and recovery from a lost connection)
  snapshot save|restore --file FILE [--lazy]
        background snapshot of running memory (userfaultfd write-protect) and its restore
  probe --socket PATH [--json]
        connect to any vhost-user back-end and print what it offers
  blk (--socket-path PATH | --fd N) --image FILE|DEVICE [--readonly] [--queues N] [--direct] [--io M]
        serve a raw image or a block device as a vhost-user-blk device (QEMU: -device vhost-user-blk-pci)
  help [COMMAND]
        this text, or a command's own
`;

type Command = (argv: string[]) => Promise<number>;

const commands: Record<string, Command> = {
  demo: (argv) => demoCommand(argv),
  "demo-destination": (argv) => demoDestinationCommand(argv),
  probe: (argv) => probeCommand(argv),
  blk: (argv) => blkCommand(argv),
  migrate: (argv) => migrateCommand(argv),
  snapshot: (argv) => snapshotCommand(argv),
  async help(argv) {
    const usage: Record<string, string> = {
      demo: DEMO_USAGE,
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
