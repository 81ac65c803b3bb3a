#!/usr/bin/env node
/**
 * The `vmshift` command: dispatches to a subcommand module, imported only when it runs (`--help`,
 * `--version` and `blk --print-capabilities` must work where the native addon cannot load, and a
 * command should not pay for the others' modules). Every command follows src/cli/runtime.ts:
 * `--help` exit 0, bad usage exit 2 with one line, failure 1, SIGINT 130.
 */
import { VERSION } from "../version.js";
import { guardedStdout, usageLine, usageOf } from "./runtime.js";

const USAGE = `usage: vmshift <command> [options]

commands:
  demo [--size MiB] [--vcpus N] [--mode precopy|postcopy] [--dirty-tracking bitmap|ring] [--json]
       [--dashboard tcp:HOST:PORT] [--metrics tcp:HOST:PORT]
        boot a micro-VM (KVM, 2 vCPUs by default) and live-migrate it while it runs to a second
        process; checks memory digests and that each vCPU's counter continues there (no KVM:
        a worker-thread workload's memory, and it says so)
  demo --memory-only [--size MiB] [--rounds N] [--json]
        the memory layer alone: every dirty-tracking source the machine offers, in-process
  migrate (--listen ENDPOINT | --to ENDPOINT) [--mode precopy|postcopy] [--json] ...
        migrate the memory of a running worker-thread workload between two processes or hosts
  snapshot save|restore --file FILE [--lazy] [--json]
        background snapshot of running memory (userfaultfd write-protect) and its restore
  blk (--socket-path PATH | --fd N) --image FILE|DEVICE [--queues N] [--metrics tcp:HOST:PORT] ...
        serve a raw image or a block device as a vhost-user-blk device (QEMU: -device vhost-user-blk-pci)
  fs (--socket-path PATH | --fd N) --shared-dir DIR [--readonly] [--cache auto|always|never]
        share a directory as a virtio-fs device (QEMU: -device vhost-user-fs-pci), live-migratable
  probe --socket PATH [--json]
        connect to any vhost-user back-end and print what it offers
  help [COMMAND]
        this text, or a command's own (also: vmshift COMMAND --help)
  --version
        the package version

every command: -h/--help, --log-level trace|debug|info|warn|error|silent, --log-format text|json
exit status: 0 done, 1 failed, 2 bad usage, 130 cancelled (SIGINT/SIGTERM)
`;

interface CommandModule {
  run(argv: string[]): Promise<number>;
  usage: string;
}

/** The public commands (demo-destination is the demo's own child, not listed). */
const commands: Record<string, () => Promise<CommandModule>> = {
  demo: async () => {
    const m = await import("./demo.js");
    return { run: m.demoCommand, usage: usageOf({ usage: m.DEMO_USAGE }) };
  },
  migrate: async () => {
    const m = await import("./migrate.js");
    return { run: m.migrateCommand, usage: usageOf({ usage: m.MIGRATE_USAGE }) };
  },
  snapshot: async () => {
    const m = await import("./snapshot.js");
    return { run: m.snapshotCommand, usage: usageOf({ usage: m.SNAPSHOT_USAGE }) };
  },
  blk: async () => {
    const m = await import("./blk.js");
    return { run: m.blkCommand, usage: usageOf({ usage: m.BLK_USAGE }) };
  },
  fs: async () => {
    const m = await import("./fs.js");
    return { run: m.fsCommand, usage: usageOf({ usage: m.FS_USAGE }) };
  },
  probe: async () => {
    const m = await import("./probe.js");
    return { run: m.probeCommand, usage: usageOf({ usage: m.PROBE_USAGE }) };
  },
};

async function main(argv: string[]): Promise<number> {
  const [first, ...rest] = argv;
  const out = guardedStdout();
  if (first === undefined || first === "--help" || first === "-h") {
    out.write(USAGE);
    return 0;
  }
  if (first === "--version" || first === "-V" || first === "version") {
    out.write(`vmshift ${VERSION}\n`);
    return 0;
  }
  if (first === "help") {
    const name = rest[0];
    if (name === undefined) {
      out.write(USAGE);
      return 0;
    }
    const load = commands[name];
    if (!load) {
      usageLine("", `no command '${name}'`);
      return 2;
    }
    out.write((await load()).usage);
    return 0;
  }
  if (first === "demo-destination") return (await import("./demo-destination.js")).demoDestinationCommand(rest);
  const load = commands[first];
  if (!load) {
    usageLine("", first.startsWith("-") ? `unknown option ${first}` : `unknown command '${first}'`);
    return 2;
  }
  return (await load()).run(rest);
}

process.exitCode = await main(process.argv.slice(2));
