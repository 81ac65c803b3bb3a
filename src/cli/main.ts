#!/usr/bin/env node
/**
 * The `vmshift` command. Each subcommand lives in its own module; this file only dispatches.
 */
import { parseArgs } from "node:util";
import { VERSION } from "../version.js";

// Commands are imported when they run: `--help`, `--version` and `blk --print-capabilities` must
// work where the native addon cannot load (it loads on the first native call, never at import),
// and a command should not pay for the others' modules.

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
  fs (--socket-path PATH | --fd N) --shared-dir DIR [--readonly] [--cache auto|always|never]
        share a directory as a virtio-fs device (QEMU: -device vhost-user-fs-pci), live-migratable
  help [COMMAND]
        this text, or a command's own (also: --help, -h)
  --version
        the package version
`;

type Command = (argv: string[]) => Promise<number>;

const commands: Record<string, Command> = {
  async demo(argv) {
    const { values } = parseArgs({
      args: argv,
      options: {
        size: { type: "string", default: "256" },
        "dirty-rate": { type: "string", default: "64" },
        mode: { type: "string", default: "precopy" },
        "dirty-tracking": { type: "string", default: "bitmap" },
        vcpus: { type: "string", default: "2" },
        "memory-only": { type: "boolean", default: false },
        rounds: { type: "string", default: "10" },
        json: { type: "boolean", default: false },
      },
    });
    const sizeMiB = Number(values.size);
    if (!Number.isInteger(sizeMiB) || sizeMiB < 16 || sizeMiB > 4096)
      throw new UsageError("--size must be 16..4096 (MiB)");
    const json = values.json ?? false;
    const out = (l: string) => process.stdout.write(`${l}\n`);
    if (values["memory-only"]) {
      const maxRounds = Number(values.rounds);
      if (!Number.isInteger(maxRounds) || maxRounds < 1) throw new UsageError("--rounds must be a positive integer");
      const { runMemoryDemo } = await import("./demo-memory.js");
      const r = await runMemoryDemo({ sizeMiB, maxRounds, json, convergePages: 64, out });
      return r.verified ? 0 : 1;
    }
    const dirtyRateMiB = Number(values["dirty-rate"]);
    if (!Number.isFinite(dirtyRateMiB) || dirtyRateMiB < 0) throw new UsageError("--dirty-rate must be >= 0 (MiB/s)");
    const mode = values.mode;
    if (mode !== "precopy" && mode !== "postcopy") throw new UsageError("--mode must be precopy or postcopy");
    const dirtyTracking = values["dirty-tracking"];
    if (dirtyTracking !== "bitmap" && dirtyTracking !== "ring")
      throw new UsageError("--dirty-tracking must be bitmap or ring");
    const vcpus = Number(values.vcpus);
    if (!Number.isInteger(vcpus) || vcpus < 1 || vcpus > 8) throw new UsageError("--vcpus must be 1..8");
    const tty = !json && process.stdout.isTTY === true;
    try {
      const { runVmDemo } = await import("./demo-vm.js");
      const r = await runVmDemo({
        sizeMiB,
        vcpus,
        dirtyRateMiB,
        mode,
        dirtyTracking,
        json,
        out,
        status: tty ? (l) => process.stdout.write(`\r\x1b[2K${l}`) : null,
      });
      return r.verified ? 0 : 1;
    } catch (e) {
      const message = e instanceof Error ? e.message : String(e);
      if (json) out(JSON.stringify({ event: "result", verified: false, mode, dirtyTracking, error: message }));
      else process.stderr.write(`vmshift demo: migration failed: ${message}\n`);
      return 1;
    }
  },
  "demo-destination": async (argv) => (await import("./demo-destination.js")).demoDestinationCommand(argv),
  probe: async (argv) => (await import("./probe.js")).probeCommand(argv),
  blk: async (argv) => (await import("./blk.js")).blkCommand(argv),
  fs: async (argv) => (await import("./fs.js")).fsCommand(argv),
  migrate: async (argv) => (await import("./migrate.js")).migrateCommand(argv),
  snapshot: async (argv) => (await import("./snapshot.js")).snapshotCommand(argv),
  async help(argv) {
    const usage: Record<string, () => Promise<string>> = {
      probe: async () => (await import("./probe.js")).PROBE_USAGE,
      blk: async () => (await import("./blk.js")).BLK_USAGE,
      fs: async () => (await import("./fs.js")).FS_USAGE,
      migrate: async () => (await import("./migrate.js")).MIGRATE_USAGE,
      snapshot: async () => (await import("./snapshot.js")).SNAPSHOT_USAGE,
    };
    const one = usage[argv[0] ?? ""];
    process.stdout.write(one ? await one() : USAGE);
    return 0;
  },
};

class UsageError extends Error {}

async function main(argv: string[]): Promise<number> {
  if (argv[0] === "--version" || argv[0] === "-V" || argv[0] === "version") {
    process.stdout.write(`vmshift ${VERSION}\n`);
    return 0;
  }
  if (argv[0] === "--help" || argv[0] === "-h") argv = ["help", ...argv.slice(1)];
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
