/**
 * `vmshift demo --memory-only`: the memory layer on its own. Two worker threads dirty a guest
 * while the main thread copies it to a second guest memory round by round, syncing three
 * kinds of dirty tracking into one bitmap per round: the in-process bitmap (writes through
 * GuestMemory), a vhost-user style shared log (a "device" worker marking it; the log is
 * replaced mid-way, as QEMU does when memory grows), and kernel write-protect tracking where
 * the kernel offers it. Discarded blocks are never copied. Ends with a digest per region.
 */
import { createHash } from "node:crypto";
import { type MessagePort, Worker } from "node:worker_threads";
import type { DirtySource } from "../memory/dirty-source.js";
import { DirtyTracker, RegionBitmapSource } from "../memory/dirty-tracker.js";
import { DiscardMap } from "../memory/discard-map.js";
import { GuestMemory } from "../memory/guest-memory.js";
import { GuestMemoryRegion } from "../memory/region.js";
import { DirtyLogArea, SharedDirtyLog, SharedLogDirtySource } from "../memory/shared-dirty-log.js";
import { WriteProtectDirtySource, writeProtectTrackingUnavailable } from "../memory/wp-dirty.js";
import { EVENT_VERSION, r1 } from "../migration/report.js";
import { copyPages } from "../sys/bulk.js";
import type { DemoWorkload } from "./demo-workload.js";
import { counted } from "./printable.js";

export interface MemoryDemoOptions {
  sizeMiB: number;
  json: boolean;
  maxRounds: number;
  /** Stop iterating once fewer pages than this are dirty after a sync. */
  convergePages: number;
  out: (line: string) => void;
}

export interface MemoryDemoResult {
  verified: boolean;
  rounds: number;
  bytes: number;
  totalMs: number;
  sources: string[];
  digests: { source: string; destination: string }[];
}

const PAGE = 4096;
const MiB = 1024 * 1024;

function digest(r: GuestMemoryRegion): string {
  const h = createHash("sha256");
  for (let off = 0; off < r.size; off += 16 * MiB)
    h.update(r.bytes(off, Math.min(16 * MiB, r.size - off)) as Uint8Array);
  return h.digest("hex").slice(0, 16);
}

export async function runMemoryDemo(o: MemoryDemoOptions): Promise<MemoryDemoResult> {
  const t0 = performance.now();
  // Two regions of whole 2 MiB blocks, each inside one 1 GiB window.
  const half = Math.min(1024, Math.max(8, Math.floor(o.sizeMiB / 4) * 2)) * MiB;
  const src = new GuestMemory([GuestMemoryRegion.memfd(0, half), GuestMemoryRegion.memfd(1 << 30, half)]);
  const dst = new GuestMemory([GuestMemoryRegion.memfd(0, half), GuestMemoryRegion.memfd(1 << 30, half)]);
  const discard = new DiscardMap(half, 2 * MiB);
  discard.discard(half / 2, 2 * MiB); // an unplugged block in the second region
  const log = new SharedDirtyLog();
  const stop = new SharedArrayBuffer(4);
  const workers: Worker[] = [];
  const sources: DirtySource[] = [new RegionBitmapSource(src)];
  let logSource: SharedLogDirtySource | null = null;
  let wp: WriteProtectDirtySource | null = null;
  try {
    // The "vhost-user frontend" hands a log to the "backend" (here: a worker marking it).
    let area = DirtyLogArea.create((1 << 30) + half);
    await log.replace(DirtyLogArea.fromShared(area.toShared()));
    logSource = new SharedLogDirtySource(area, "vhost-user shared log");
    sources.push(logSource);
    const why = writeProtectTrackingUnavailable();
    if (!why) {
      wp = new WriteProtectDirtySource(src);
      sources.push(wp);
    }
    const tracker = new DirtyTracker(src, sources, new Map([[src.regions[1] as GuestMemoryRegion, discard]]));
    await tracker.start();
    const shared = src.toShared().regions;
    const discardShared = [null, discard.toShared()];
    const spawn = (job: Omit<DemoWorkload, "stop" | "discard">, transfer: MessagePort[] = []) =>
      workers.push(
        new Worker(new URL("./demo-workload.js", import.meta.url), {
          workerData: { ...job, stop, discard: discardShared },
          transferList: transfer,
        }),
      );
    // One writer of each kind: through the in-process bitmaps, as a device marking the shared
    // log, and (where the kernel tracks writes itself) raw writes nobody announces.
    spawn({ kind: "bitmap", regions: shared, seed: 1 });
    const handle = log.createWriterHandle();
    spawn({ kind: "log", regions: shared, seed: 2, log: handle }, [handle.port]);
    if (wp) spawn({ kind: "raw", regions: shared, seed: 3 });
    const emit = (ev: Record<string, unknown>) => {
      if (o.json)
        o.out(JSON.stringify({ event: ev.event, version: EVENT_VERSION, t: r1(performance.now() - t0), ...ev }));
    };
    emit({ event: "start", guest: "memory-only", mode: "precopy", sizeMiB: (2 * half) / MiB });
    let bytes = 0;
    let rounds = 0;
    const copyDirty = () => {
      let pages = 0;
      src.regions.forEach((r, i) => {
        const list = tracker.bitmap.take(i);
        const d = dst.regions[i] as GuestMemoryRegion;
        // copyPages: one native call per 1 GiB window, index lists of page numbers.
        copyPages(d.windows[0] as SharedArrayBuffer, list, r.windows[0] as SharedArrayBuffer, list, list.length, PAGE);
        pages += list.length;
      });
      bytes += pages * PAGE;
      return pages;
    };
    const remaining = copyDirty();
    emit({ event: "memory-round", round: 0, pagesSent: remaining, syncMs: 0, perSource: {} });
    if (!o.json) o.out(`round 0: first pass, ${((remaining * PAGE) / MiB).toFixed(1)} MiB copied`);
    for (let round = 1; round <= o.maxRounds; round++) {
      rounds = round;
      await new Promise((r) => setTimeout(r, 20));
      if (round === 2) {
        // The frontend grows the log (memory hotplug in QEMU): new log, replace, drain the old.
        const bigger = DirtyLogArea.create((1 << 30) + 2 * half);
        await log.replace(DirtyLogArea.fromShared(bigger.toShared()));
        logSource.swap(bigger, tracker.bitmap);
        area = bigger;
      }
      const rep = await tracker.sync();
      const sent = copyDirty();
      emit({
        event: "memory-round",
        round: rounds,
        pagesSent: sent,
        syncMs: r1(rep.totalMs),
        perSource: Object.fromEntries(Object.entries(rep.perSource).map(([k, v]) => [k, r1(v)])),
      });
      if (!o.json) {
        const per = Object.entries(rep.perSource)
          .map(([k, v]) => `${k} ${v.toFixed(2)} ms`)
          .join(", ");
        o.out(`round ${rounds}: ${sent} dirty pages copied (sync: ${per})`);
      }
      if (sent < o.convergePages) break;
    }
    Atomics.store(new Int32Array(stop), 0, 1);
    await Promise.all(workers.map((w) => new Promise((r) => w.once("exit", r))));
    await tracker.sync({ final: true });
    const last = copyDirty();
    if (!o.json) o.out(`switchover: writers stopped, final ${last} pages copied`);
    const digests = src.regions.map((r, i) => ({
      source: digest(r),
      destination: digest(dst.regions[i] as GuestMemoryRegion),
    }));
    const verified = digests.every((d) => d.source === d.destination);
    await tracker.stop();
    const result: MemoryDemoResult = {
      verified,
      rounds,
      bytes,
      totalMs: performance.now() - t0,
      sources: sources.map((s) => s.name),
      digests,
    };
    if (o.json) emit({ event: "memory-result", ...result, totalMs: r1(result.totalMs) });
    else {
      o.out(`dirty sources: ${result.sources.join(", ")}${why ? ` (write-protect tracking unavailable: ${why})` : ""}`);
      o.out(`${counted(rounds, "round")}, ${(bytes / MiB).toFixed(1)} MiB copied, ${result.totalMs.toFixed(0)} ms`);
      for (const [i, d] of digests.entries()) o.out(`region ${i}: source ${d.source} destination ${d.destination}`);
      o.out(verified ? "memory digests equal: verified" : "MEMORY DIGESTS DIFFER");
    }
    area.close();
    return result;
  } finally {
    Atomics.store(new Int32Array(stop), 0, 1);
    for (const w of workers) await w.terminate();
    wp?.stop();
    await log.close();
    src.close();
    dst.close();
  }
}
