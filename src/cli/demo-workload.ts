/**
 * Worker for the memory demo: dirties random pages of the regions it is given until told to
 * stop, announcing its writes the way its `kind` of writer does: through the in-process
 * bitmap, through a vhost-user shared log (a DirtyLogWriter), or not at all (kernel
 * write-protect tracking must see those). Never writes into a discarded block.
 */
import { workerData } from "node:worker_threads";
import { AtomicBitmap } from "../memory/atomic-bitmap.js";
import { DiscardMap, type SharedDiscardMap } from "../memory/discard-map.js";
import type { SharedRegion } from "../memory/region.js";
import { DirtyLogWriter, type DirtyLogWriterHandle } from "../memory/shared-dirty-log.js";

export interface DemoWorkload {
  kind: "bitmap" | "log" | "raw";
  regions: SharedRegion[];
  discard: (SharedDiscardMap | null)[];
  stop: SharedArrayBuffer;
  seed: number;
  log?: DirtyLogWriterHandle;
}

const job = workerData as DemoWorkload;
const stop = new Int32Array(job.stop);
const views = job.regions.map((r, i) => ({
  base: r.guestBase,
  pages: r.size / 4096,
  u32: new Uint32Array(r.windows[0] as SharedArrayBuffer),
  bitmap: job.kind === "bitmap" && r.dirty ? AtomicBitmap.fromShared(r.dirty) : null,
  discard: job.discard[i] ? DiscardMap.fromShared(job.discard[i] as SharedDiscardMap) : null,
}));
const writer = job.kind === "log" && job.log ? DirtyLogWriter.fromHandle(job.log) : null;
let x = job.seed >>> 0 || 1;
let n = 0;
while (Atomics.load(stop, 0) === 0) {
  for (let k = 0; k < 256; k++) {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    x >>>= 0;
    const v = views[x % views.length];
    if (!v) continue;
    const page = (x >>> 8) % v.pages;
    if (v.discard?.isDiscarded(page * 4096)) continue;
    v.u32[page * 1024 + (n & 1023)] = (x ^ n++) >>> 0;
    v.bitmap?.markPage(page);
    writer?.mark(v.base + page * 4096, 4);
  }
  // About 256 pages per millisecond per worker: enough to make rounds, slow enough to converge.
  const until = Date.now() + 1;
  while (Date.now() < until) {}
}
writer?.close();
