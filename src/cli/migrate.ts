/**
 * `vmshift migrate`: migrate a built-in worker-thread workload's memory between two processes
 * (or machines). One side listens (destination), the other connects (source).
 */
import { parseArgs } from "node:util";
import { GuestMemory } from "../memory/guest-memory.js";
import { GuestMemoryRegion } from "../memory/region.js";
import { MigrationDestination } from "../migration/destination.js";
import type { MigrationEvents } from "../migration/events.js";
import { MigrationSource } from "../migration/source.js";
import { connectEndpoint, MigrationListener, parseEndpoint } from "../migration/transport.js";
import { Workload } from "../migration/workload.js";

export const MIGRATE_USAGE = `usage:
  vmshift migrate --listen tcp:[HOST:]PORT|unix:PATH|fd:N [--size MiB] [--json]
        destination: receive guest memory, verify it, then run the guest (postcopy: at once)
  vmshift migrate --to tcp:HOST:PORT|unix:PATH|fd:N [--size MiB] [--mode precopy|postcopy]
        [--rate PAGES/s] [--pattern sequential|random|hotset] [--threads N]
        [--downtime MS] [--max-rounds N] [--bandwidth MB/s] [--postcopy-after N]
        [--no-preempt] [--recovery-timeout MS] [--json]
        source: run a workload writing guest memory, migrate it while it runs
        (postcopy over tcp: or unix: opens a second connection for the pages the destination
        faults on, the preempt channel, unless --no-preempt; and if a connection is lost once
        the destination runs, both sides pause and the source reconnects for up to
        --recovery-timeout ms, default 60000, 0 = fail at once)
  Both sides must use the same --size. --json prints one JSON object per event on stdout.`;

function memoryOf(sizeMiB: number): GuestMemory {
  return new GuestMemory([GuestMemoryRegion.memfd(0, sizeMiB * 1024 * 1024, { name: "vmshift-migrate" })]);
}

function report(events: MigrationEvents, json: boolean, role: string): void {
  const t0 = performance.now();
  const line = (o: Record<string, unknown>) => {
    if (json) process.stdout.write(`${JSON.stringify({ role, t: +(performance.now() - t0).toFixed(1), ...o })}\n`);
  };
  events.on("phase", (p) => {
    line({ event: "phase", ...p });
    if (!json) process.stderr.write(`\n${role}: ${p.phase}`);
  });
  events.on("round", (r) => {
    line({ event: "round", ...r });
    if (!json)
      process.stderr.write(
        `\r${role}: round ${r.round}: sent ${(r.bytesSent / 2 ** 20).toFixed(1)} MiB at ${(r.bandwidth / 1e6).toFixed(0)} MB/s, ` +
          `remaining ${(r.remainingBytes / 2 ** 20).toFixed(1)} MiB, predicted downtime ${r.predictedDowntimeMs.toFixed(1)} ms   `,
      );
  });
  events.on("throttle", (t) => line({ event: "throttle", ...t }));
  events.on("faults", (f) => line({ event: "faults", ...f }));
  events.on("complete", (r) => {
    const { roundStats: _r, ...rest } = r;
    line({ event: "complete", ...rest });
    if (!json)
      process.stderr.write(
        `\n${role}: done in ${r.totalMs.toFixed(0)} ms, ${r.rounds} rounds, downtime ${r.downtimeMs.toFixed(1)} ms, ` +
          `digests ${r.digests.every((d) => d.match) ? "match" : "DIFFER"}\n`,
      );
  });
  events.on("failed", (e) => line({ event: "failed", error: e.message, code: (e as { code?: string }).code }));
}

export async function migrateCommand(argv: string[]): Promise<number> {
  const { values } = parseArgs({
    args: argv,
    options: {
      listen: { type: "string" },
      to: { type: "string" },
      size: { type: "string", default: "64" },
      mode: { type: "string", default: "precopy" },
      rate: { type: "string", default: "20000" },
      pattern: { type: "string", default: "random" },
      threads: { type: "string", default: "1" },
      downtime: { type: "string", default: "300" },
      "max-rounds": { type: "string", default: "30" },
      bandwidth: { type: "string", default: "0" },
      "postcopy-after": { type: "string", default: "1" },
      "no-preempt": { type: "boolean", default: false },
      "recovery-timeout": { type: "string", default: "60000" },
      json: { type: "boolean", default: false },
    },
  });
  const size = Number(values.size);
  if (!Number.isInteger(size) || size < 1) throw new RangeError("--size must be a positive integer (MiB)");
  if ((values.listen === undefined) === (values.to === undefined)) {
    process.stderr.write(`${MIGRATE_USAGE}\n`);
    return 2;
  }
  const mode = values.mode === "postcopy" ? "postcopy" : "precopy";
  const pattern = values.pattern as "sequential" | "random" | "hotset";
  if (!["sequential", "random", "hotset"].includes(pattern))
    throw new RangeError("--pattern: sequential|random|hotset");
  const recoveryMs = Number(values["recovery-timeout"]);
  if (!Number.isFinite(recoveryMs) || recoveryMs < 0) throw new RangeError("--recovery-timeout must be >= 0 (ms)");
  const memory = memoryOf(size);
  let workload: Workload | null = null;
  try {
    if (values.listen !== undefined) {
      const ep = parseEndpoint(values.listen);
      let stream: import("node:net").Socket;
      let listener: MigrationListener | null = null;
      if (ep.kind === "fd") stream = await connectEndpoint(ep);
      else {
        listener = await MigrationListener.listen(ep);
        process.stderr.write(`listening on ${values.listen}\n`);
        stream = await listener.accept();
      }
      const l = listener;
      const dest = new MigrationDestination({
        memory,
        // A postcopy source may open a second connection (the preempt channel), and after a
        // lost connection, a new one (recovery).
        ...(l
          ? {
              acceptPreempt: () => l.accept("preempt"),
              postcopyRecovery: { accept: () => l.accept("recover"), timeoutMs: recoveryMs || 60_000 },
            }
          : {}),
        hooks: {
          // The guest runs here now: a reader that touches its memory (postcopy: faults it in).
          resume: async () => {
            workload = await Workload.start({ memory, mode: "touch", pattern, threads: 1 });
          },
        },
      });
      report(dest.events, values.json, "destination");
      try {
        await dest.run(stream);
      } finally {
        await l?.close();
      }
      return 0;
    }
    workload = await Workload.start({
      memory,
      pattern,
      pagesPerSecond: Number(values.rate),
      threads: Number(values.threads),
    });
    const to = parseEndpoint(values.to as string);
    const canReconnect = mode === "postcopy" && to.kind !== "fd" && recoveryMs > 0;
    const stream = await connectEndpoint(to);
    const preempt =
      mode === "postcopy" && to.kind !== "fd" && !values["no-preempt"] ? await connectEndpoint(to) : undefined;
    const source = new MigrationSource({
      memory,
      mode,
      hooks: workload.sourceHooks(),
      downtimeLimitMs: Number(values.downtime),
      maxRounds: Number(values["max-rounds"]),
      bandwidthLimit: Number(values.bandwidth) * 1e6,
      postcopyAfterRounds: Number(values["postcopy-after"]),
      ...(canReconnect ? { postcopyRecovery: { reconnect: () => connectEndpoint(to), timeoutMs: recoveryMs } } : {}),
    });
    report(source.events, values.json, "source");
    await source.run(stream, { preempt });
    return 0;
  } catch (e) {
    const err = e as { code?: string; message?: string };
    if (values.json)
      process.stdout.write(`${JSON.stringify({ event: "error", code: err.code, message: err.message })}\n`);
    else process.stderr.write(`\nmigration failed: ${err.code ?? ""} ${err.message}\n`);
    return 1;
  } finally {
    await (workload as Workload | null)?.close();
    memory.close();
  }
}
