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
 *   both: [--tls-creds DIR [--tls-authz CN]] (mutual TLS, QEMU's layout) or [--insecure] (plain
 *         TCP beyond loopback)
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

async function main(): Promise<number> {
  const role = process.argv[2];
  const { values } = parseArgs({
    args: process.argv.slice(3),
    options: {
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
    },
  });
  const dir = values["tls-creds"];
  const authz = values["tls-authz"];
  const memory = new GuestMemory([GuestMemoryRegion.memfd(0, Number(values.size) * MiB, { name: "netns-child" })]);
  let workload: Workload | null = null;
  const pattern = values.pattern as "sequential" | "random" | "hotset";
  try {
    if (role === "destination") {
      const l = await MigrationListener.listen(
        { kind: "tcp", ...hostPort(values.listen as string) },
        dir
          ? { tls: { ...loadX509Credentials(dir, "server"), ...(authz ? { authz } : {}) } }
          : { insecure: values.insecure },
      );
      out({ event: "listening", port: l.endpoint.kind === "tcp" ? l.endpoint.port : 0 });
      const s = await l.accept();
      // The destination's guest exists before the migration and is only woken at resume, as
      // a VMM's vCPUs are: thread start-up is not downtime.
      const guest = await Workload.start({
        memory,
        mode: "touch",
        pattern: "random",
        threads: Number(values["guest-threads"]),
        paused: true,
      });
      workload = guest;
      const dest = new MigrationDestination({
        memory,
        // A postcopy source may open a second connection (the preempt channel).
        acceptPreempt: () => l.accept("preempt"),
        hooks: {
          resume: () => guest.resume(),
        },
      });
      forward(dest.events);
      try {
        await dest.run(s);
      } finally {
        await l.close();
      }
      // What the guest saw: its longest single access is its worst postcopy stall.
      out({ event: "guest", maxOpUs: guest.maxOpUs, stallMs: guest.stallMs });
      return 0;
    }
    if (role !== "source") throw new RangeError(`role ${role}: source|destination`);
    fill(memory, Number(values.fill));
    workload = await Workload.start({
      memory,
      pattern,
      hotFraction: Number(values.hot),
      pagesPerSecond: Number(values.rate),
      threads: 1,
    });
    const conn = dir ? { tls: loadX509Credentials(dir, "client") } : { insecure: values.insecure };
    const s = await connectEndpoint({ kind: "tcp", ...hostPort(values.to as string) }, conn);
    const preempt =
      values.preempt && values.mode === "postcopy"
        ? await connectEndpoint({ kind: "tcp", ...hostPort(values.to as string) }, conn)
        : undefined;
    const source = new MigrationSource({
      memory,
      mode: values.mode === "postcopy" ? "postcopy" : "precopy",
      hooks: workload.sourceHooks(),
      downtimeLimitMs: Number(values.downtime),
      postcopyAfterRounds: Number(values["postcopy-after"]),
      maxRounds: 30,
      whenNotConverged: "switchover",
    });
    forward(source.events);
    await source.run(s, { preempt });
    out({ event: "workload", pagesWritten: workload.pagesWritten });
    return 0;
  } catch (e) {
    const err = e as { code?: string; message?: string };
    out({ event: "error", code: err.code, message: err.message });
    return 1;
  } finally {
    await (workload as Workload | null)?.close();
    memory.close();
  }
}

process.exitCode = await main();
