import assert from "node:assert/strict";
import { test } from "node:test";
import { Worker } from "node:worker_threads";
import { AtomicBitmap } from "../../src/memory/atomic-bitmap.js";
import { DirtyTracker, RegionBitmapSource } from "../../src/memory/dirty-tracker.js";
import { DiscardMap } from "../../src/memory/discard-map.js";
import { GuestMemoryError } from "../../src/memory/errors.js";
import { GuestMemory } from "../../src/memory/guest-memory.js";
import { GuestMemoryRegion } from "../../src/memory/region.js";
import { WriteProtectDirtySource, writeProtectTrackingUnavailable } from "../../src/memory/wp-dirty.js";

const MiB = 1024 * 1024;

test("DiscardMap: listeners hear maximal changed runs, in order; no-ops are silent", () => {
  const m = new DiscardMap(16 * MiB, 2 * MiB, false);
  const events: string[] = [];
  const off = m.subscribe({
    onPopulate: (o, l) => events.push(`+${o / MiB}:${l / MiB}`),
    onDiscard: (o, l) => events.push(`-${o / MiB}:${l / MiB}`),
  });
  m.populate(0, 6 * MiB);
  m.populate(4 * MiB, 8 * MiB); // 4..6 already plugged: only 6..12 changes
  m.discard(2 * MiB, 2 * MiB);
  assert.deepEqual(events, ["+0:6", "+6:6", "-2:2"]);
  assert.deepEqual(
    [...m.ranges(true)],
    [
      [0, 2 * MiB],
      [4 * MiB, 8 * MiB],
    ],
  );
  assert.equal(m.pluggedBytes, 10 * MiB);
  assert.ok(m.isDiscarded(3 * MiB) && m.isPlugged(5 * MiB) && m.isDiscarded(15 * MiB));
  off();
  m.discard(0, 2 * MiB);
  assert.equal(events.length, 3, "unsubscribed listener was called");
  assert.throws(() => m.discard(MiB, 2 * MiB), GuestMemoryError);
  assert.throws(() => m.populate(14 * MiB, 4 * MiB), GuestMemoryError);
  const copy = new DiscardMap(16 * MiB, 2 * MiB, true);
  copy.applyBytes(m.toBytes());
  assert.deepEqual([...copy.ranges(true)], [...m.ranges(true)]);
  assert.throws(() => copy.applyBytes(new Uint8Array(3)), RangeError);
});

test("DiscardMap state is shared with a worker thread", async () => {
  const m = new DiscardMap(8 * MiB, 2 * MiB);
  m.discard(2 * MiB, 2 * MiB);
  const w = new Worker(
    `const { workerData, parentPort } = require("node:worker_threads");
     const s = new Uint8Array(workerData.buffer, 0, 4);
     parentPort.postMessage([...s]);`,
    { eval: true, workerData: m.toShared() },
  );
  const states = await new Promise((r) => w.once("message", r));
  assert.deepEqual(states, [1, 0, 1, 1]);
  await w.terminate();
});

test("a dirty sync never reports a page inside a discarded block, whoever marked it", async () => {
  const r0 = GuestMemoryRegion.memfd(0, 8 * MiB);
  const r1 = GuestMemoryRegion.memfd(16 * MiB, 4 * MiB);
  const mem = new GuestMemory([r0, r1]);
  const dm = new DiscardMap(8 * MiB, 2 * MiB);
  dm.discard(2 * MiB, 4 * MiB);
  const tracker = new DirtyTracker(mem, [new RegionBitmapSource(mem)], new Map([[r0, dm]]));
  await tracker.start();
  // First pass: everything plugged is dirty, discarded blocks are not.
  const all = tracker.bitmap.take(0);
  assert.equal(all.length, (8 - 4) * 256);
  assert.ok([...all].every((p) => p < 512 || p >= 1536));
  tracker.bitmap.take(1);
  mem.write(2 * MiB + 100, new Uint8Array(10)); // into a discarded block
  mem.write(7 * MiB, new Uint8Array(4097)); // two pages, plugged
  mem.write(16 * MiB + 4096 * 3, new Uint8Array(1));
  const rep = await tracker.sync();
  assert.equal(rep.dirtyPages, 3);
  assert.deepEqual([...tracker.bitmap.take(0)], [1792, 1793]);
  assert.deepEqual([...tracker.bitmap.take(1)], [3]);
  await tracker.stop();
  mem.close();
});

test("DiscardMap.filterPages and clearDiscarded agree", () => {
  const dm = new DiscardMap(8 * MiB, 2 * MiB);
  dm.discard(0, 2 * MiB);
  const bm = new AtomicBitmap(8 * MiB);
  bm.setAll();
  dm.clearDiscarded(bm);
  const pages = Uint32Array.from({ length: 2048 }, (_, i) => i);
  assert.deepEqual([...bm.dirtyPages()], [...dm.filterPages(pages, 4096)]);
  assert.equal(bm.count(), 1536);
});

test("write-protect tracking sees this process's writes with no help from the writer", async (t) => {
  const why = writeProtectTrackingUnavailable();
  if (why) {
    t.skip(`SKIPPED LOUDLY: ${why}`);
    console.warn(`SKIP write-protect tracking: ${why}`);
    return;
  }
  const r = GuestMemoryRegion.memfd(1 << 20, 4 * MiB);
  const a = GuestMemoryRegion.anonymous(64 * MiB, 2 * MiB);
  const mem = new GuestMemory([r, a]);
  const tracker = new DirtyTracker(mem, [new WriteProtectDirtySource(mem)]);
  await tracker.start();
  tracker.bitmap.take(0);
  tracker.bitmap.take(1);
  await tracker.sync(); // after start nothing was written
  assert.equal(tracker.bitmap.count(), 0);
  // Raw stores through the region's own window: not GuestMemory.write, no marking at all.
  const raw = new Uint8Array(r.windows[0] as SharedArrayBuffer);
  raw[5 * 4096 + 7] = 1;
  raw[900 * 4096] = 2;
  new Uint8Array(a.windows[0] as SharedArrayBuffer)[4096 * 3] = 3;
  await tracker.sync();
  assert.deepEqual([...tracker.bitmap.take(0)], [5, 900]);
  assert.deepEqual([...tracker.bitmap.take(1)], [3]);
  // Re-armed by the scan: the same page written again is reported again, once.
  raw[5 * 4096] = 9;
  raw[5 * 4096 + 1] = 9;
  await tracker.sync();
  assert.deepEqual([...tracker.bitmap.take(0)], [5]);
  await tracker.stop();
  assert.equal(raw[5 * 4096 + 7], 1, "data intact after tracking stops");
  mem.close();
});
