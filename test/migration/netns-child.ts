/**
 * One side of a migration in its own process (run inside a network namespace by netns.test.ts
 * and bench/migrate.ts). Prints one JSON object per line on stdout:
 *   {"event":"listening","port":N}     destination, once it listens
 *   {"event":"phase"|"round", ...}     the engine's events
 *   {"event":"complete", ...result}    the MigrationResult (exit 0)
 *   {"event":"error","code","message"} (exit 1)
 *
 *   destination --listen HOST:PORT --size MiB [--guest-threads N]
 *   source --to HOST:PORT --size MiB [--fill FRACTION] [--rate PAGES/s] [--pattern P]
 *          [--hot FRACTION] [--mode precopy|postcopy] [--downtime MS] [--postcopy-after N]
 *          [--preempt]   (postcopy: requested pages on a second connection)
 *   both [source and destination options]   (both sides in this one process over TCP loopback:
 *          what a fault costs without an address-space switch between the two sides)
 *   all roles: [--tls-creds DIR [--tls-authz CN]] (mutual TLS, QEMU's layout) or [--insecure]
 *         (plain TCP beyond loopback)
 * The source fills the first FRACTION of its memory with non-zero pages before the workload
 * starts, so the stream carries real data (a fresh memfd is all zero pages).
 */
import { parseArgs } from "node:util";
import { GuestMemory } from "../../src/memory/guest-memory.js";
import { GuestMemoryRegion } from "../../src/memory/region.js";
import { MigrationDestination } from "../../src/migration/destination.js";
import type { MigrationEvents } from "../../src/migration/events.js";
import { MigrationSource } from "../../src/migration/source.js";
import { connectEndpoint, loadX509Credentials, MigrationListener } from "../../src/migration/transport.js";
import { Workload } from "../../src/migration/workload.js";

const MiB = 1024 * 1024;
const out = (o: Record<string, unknown>) => process.stdout.write(`${JSON.stringify(o)}\n`);

function forward(events: MigrationEvents): void {
  events.on("phase", (p) => out({ event: "phase", ...p }));
  events.on("round", (r) => out({ event: "round", ...r }));
  events.on("complete", (r) => out({ event: "complete", ...r }));
}

/** Non-zero content on the first `fraction` of the memory: a byte per MiB, the page index in each page. */
function fill(mem: GuestMemory, fraction: number): void {
  for (const r of mem.regions) {
    const end = Math.floor((r.size * fraction) / MiB) * MiB;
    for (let off = 0; off < end; off += MiB) {
      const v = r.bytes(off, MiB) as Uint8Array;
      v.fill(((off / MiB) & 0xff) | 1);
      const dv = new DataView(v.buffer, v.byteOffset, v.byteLength);
      for (let p = 0; p < MiB; p += 4096) dv.setUint32(p, (off + p) / 4096, true);
    }
  }
}

function hostPort(s: string): { host: string; port: number } {
  const i = s.lastIndexOf(":");
  return { host: s.slice(0, i), port: Number(s.slice(i + 1)) };
}

const OPTIONS = {
  listen: { type: "string" },
  to: { type: "string" },
  size: { type: "string", default: "64" },
  fill: { type: "string", default: "0" },
  rate: { type: "string", default: "5000" },
  pattern: { type: "string", default: "random" },
  hot: { type: "string", default: "0.1" },
  mode: { type: "string", default: "precopy" },
  downtime: { type: "string", default: "300" },
  "postcopy-after": { type: "string", default: "1" },
  "guest-threads": { type: "string", default: "1" },
  preempt: { type: "boolean", default: false },
  "tls-creds": { type: "string" },
  "tls-authz": { type: "string" },
  insecure: { type: "boolean", default: false },
} as const;
type Values = ReturnType<typeof parseArgs<{ options: typeof OPTIONS }>>["values"];

function newMemory(values: Values): GuestMemory {
  return new GuestMemory([GuestMemoryRegion.memfd(0, Number(values.size) * MiB, { name: "netns-child" })]);
}

async function listen(values: Values, at: string): Promise<MigrationListener> {
  const dir = values["tls-creds"];
  const authz = values["tls-authz"];
  return MigrationListener.listen(
    { kind: "tcp", ...hostPort(at) },
    dir
      ? { tls: { ...loadX509Credentials(dir, "server"), ...(authz ? { authz } : {}) } }
      : { insecure: values.insecure },
  );
}

async function destination(values: Values, l: MigrationListener): Promise<void> {
  const memory = newMemory(values);
  let guest: Workload | null = null;
  try {
    const s = await l.accept();
    // The destination's guest exists before the migration and is only woken at resume, as
    // a VMM's vCPUs are: thread start-up is not downtime.
    const g = await Workload.start({
      memory,
      mode: "touch",
      pattern: "random",
      threads: Number(values["guest-threads"]),
      paused: true,
    });
    guest = g;
    const dest = new MigrationDestination({
      memory,
      // A postcopy source may open a second connection (the preempt channel).
      acceptPreempt: () => l.accept("preempt"),
      hooks: {
        resume: () => g.resume(),
      },
    });
    forward(dest.events);
    try {
      await dest.run(s);
    } finally {
      await l.close();
    }
    // What the guest saw: its longest single access is its worst postcopy stall.
    out({ event: "guest", maxOpUs: g.maxOpUs, stallMs: g.stallMs });
  } finally {
    await (guest as Workload | null)?.close();
    memory.close();
  }
}

async function source(values: Values, to: string): Promise<void> {
  const memory = newMemory(values);
  let workload: Workload | null = null;
  try {
    fill(memory, Number(values.fill));
    const w = await Workload.start({
      memory,
      pattern: values.pattern as "sequential" | "random" | "hotset",
      hotFraction: Number(values.hot),
      pagesPerSecond: Number(values.rate),
      threads: 1,
    });
    workload = w;
    const dir = values["tls-creds"];
    const conn = dir ? { tls: loadX509Credentials(dir, "client") } : { insecure: values.insecure };
    const s = await connectEndpoint({ kind: "tcp", ...hostPort(to) }, conn);
    const preempt =
      values.preempt && values.mode === "postcopy"
        ? await connectEndpoint({ kind: "tcp", ...hostPort(to) }, conn)
        : undefined;
    const src = new MigrationSource({
      memory,
      mode: values.mode === "postcopy" ? "postcopy" : "precopy",
      hooks: w.sourceHooks(),
      downtimeLimitMs: Number(values.downtime),
      postcopyAfterRounds: Number(values["postcopy-after"]),
      maxRounds: 30,
      whenNotConverged: "switchover",
    });
    forward(src.events);
    await src.run(s, { preempt });
    out({ event: "workload", pagesWritten: w.pagesWritten });
  } finally {
    await (workload as Workload | null)?.close();
    memory.close();
  }
}

async function main(): Promise<number> {
  const role = process.argv[2];
  const { values } = parseArgs({ args: process.argv.slice(3), options: OPTIONS });
  try {
    if (role === "destination") {
      const l = await listen(values, values.listen as string);
      out({ event: "listening", port: l.endpoint.kind === "tcp" ? l.endpoint.port : 0 });
      await destination(values, l);
    } else if (role === "source") {
      await source(values, values.to as string);
    } else if (role === "both") {
      // Both sides in this one process (one event loop, one address space), over TCP loopback.
      const l = await listen(values, "127.0.0.1:0");
      const port = l.endpoint.kind === "tcp" ? l.endpoint.port : 0;
      await Promise.all([destination(values, l), source(values, `127.0.0.1:${port}`)]);
    } else {
      throw new RangeError(`role ${role}: source|destination|both`);
    }
    return 0;
  } catch (e) {
    const err = e as { code?: string; message?: string };
    out({ event: "error", code: err.code, message: err.message });
    // Both sides in one process: the other may still wait on its socket.
    if (role === "both") process.exit(1);
    return 1;
  }
}

process.exitCode = await main();
