import assert from "node:assert/strict";
import { test } from "node:test";
import { Worker } from "node:worker_threads";
import { DirtyBitmap } from "../../src/memory/dirty-tracker.js";
import { GuestMemoryError } from "../../src/memory/errors.js";
import { GuestMemory } from "../../src/memory/guest-memory.js";
import { GuestMemoryRegion } from "../../src/memory/region.js";
import { DirtyLogArea, logSizeFor, SharedDirtyLog, SharedLogDirtySource } from "../../src/memory/shared-dirty-log.js";
import { Mapping } from "../../src/sys/mapping.js";
import { createMemfd } from "../../src/sys/memfd.js";

const PAGE = 4096;

test("log layout: page p is bit p%8 of byte p/8, as the vhost-user spec lays it out", () => {
  const area = DirtyLogArea.create(64 * PAGE);
  try {
    assert.equal(area.size, 8);
    area.mark(9 * PAGE + 5, 1); // page 9: byte 1, bit 1
    area.mark(63 * PAGE, 1); // page 63: byte 7, bit 7
    // Read the bytes through a second, independent mapping of the same fd, as a C frontend would.
    const other = Mapping.map(area.fd!, 4096);
    const bytes = other.bytes(0, 8)!;
    assert.deepEqual([...bytes], [0, 0b10, 0, 0, 0, 0, 0, 0b1000_0000]);
    other.close();
  } finally {
    area.close();
  }
});

test("mark covers every page a range touches and reports pages beyond the log", () => {
  const area = DirtyLogArea.create(100 * PAGE);
  try {
    assert.equal(area.mark(PAGE - 1, 2), true); // straddles pages 0 and 1
    assert.deepEqual(area.peek(), [0, 1]);
    assert.equal(area.mark(30 * PAGE, 40 * PAGE), true); // crosses a 32-bit word
    assert.equal(area.peek().length, 2 + 40);
    assert.equal(area.mark(area.pages * PAGE - 10, 100), false); // last page + one beyond
    assert.ok(area.isDirty((area.pages - 1) * PAGE));
    assert.deepEqual([...area.take()].slice(0, 2), [0, 1]);
    assert.deepEqual(area.peek(), []);
  } finally {
    area.close();
  }
});

test("a peer's log size and offset are validated exactly", () => {
  assert.throws(() => DirtyLogArea.map(createMemfd("l", 4096), 0, 0), GuestMemoryError);
  assert.throws(() => DirtyLogArea.map(createMemfd("l", 4096), 4096, 100), /not page aligned/);
  assert.throws(
    () => DirtyLogArea.map(createMemfd("l", 4096), 1n << 31n, 0),
    (e: unknown) => e instanceof GuestMemoryError && e.code === "BAD_REGION",
  );
  assert.throws(
    () => DirtyLogArea.map(createMemfd("l", 4096), 1n << 62n, 0),
    (e: unknown) => e instanceof GuestMemoryError && e.code === "NOT_REPRESENTABLE",
  );
  assert.throws(
    () => DirtyLogArea.map(createMemfd("l", 4096), 0xffff_ffff_ffff_ffffn, 0),
    (e: unknown) => e instanceof GuestMemoryError && e.code === "NOT_REPRESENTABLE",
  );
});

test("logSizeFor rounds to 64-bit chunks like QEMU", () => {
  assert.equal(logSizeFor(PAGE), 8);
  assert.equal(logSizeFor(64 * PAGE), 8);
  assert.equal(logSizeFor(65 * PAGE), 16);
  assert.equal(logSizeFor(1 << 30), 32768);
});

test("writer in the same thread: marks go to the current log, none while logging is off", async () => {
  const log = new SharedDirtyLog();
  const w = log.writer();
  w.mark(0, 1); // logging off: nowhere to go
  assert.equal(w.logging, false);
  const a = DirtyLogArea.create(1 << 20);
  assert.equal(await log.replace(a), null);
  w.mark(5 * PAGE, 1);
  assert.deepEqual(a.peek(), [5]);
  const b = DirtyLogArea.create(1 << 21);
  const old = await log.replace(b);
  assert.equal(old, a);
  w.mark(6 * PAGE, 1);
  assert.deepEqual(a.peek(), [5]);
  assert.deepEqual(b.peek(), [6]);
  const last = await log.replace(null);
  assert.equal(last, b);
  w.mark(7 * PAGE, 1);
  assert.deepEqual(b.peek(), [6]);
  assert.equal(w.logging, false);
  w.close();
  a.close();
  b.close();
  await log.close();
});

test("replace under load: no mark lost, none lands in a replaced log, marks made before are in the old log", async (t) => {
  const WORKERS = 2;
  const GUEST = 1 << 29; // 512 MiB of address space: 131072 pages
  const pages = GUEST / PAGE;
  const log = new SharedDirtyLog();
  const logs: DirtyLogArea[] = [DirtyLogArea.create(GUEST)];
  await log.replace(logs[0] as DirtyLogArea);
  const progress = new SharedArrayBuffer(4 * WORKERS);
  const prog = new Int32Array(progress);
  const workers: Worker[] = [];
  const done: Promise<void>[] = [];
  for (let i = 0; i < WORKERS; i++) {
    const handle = log.createWriterHandle();
    const w = new Worker(new URL("../helpers/dirty-log-marker.js", import.meta.url), {
      workerData: { handle, index: i, workers: WORKERS, pages, progress, spin: 300 },
      transferList: [handle.port],
    });
    workers.push(w);
    done.push(
      new Promise((resolve, reject) => {
        w.on("error", reject);
        w.on("exit", (code) => (code === 0 ? resolve() : reject(new Error(`worker exit ${code}`))));
      }),
    );
  }
  let finished = false;
  void Promise.all(done).then(() => {
    finished = true;
  });
  // progressBefore[k][w]: marks worker w had completed when replacement k began.
  const progressBefore: number[][] = [];
  const frozen: number[] = []; // bit count of each replaced log when its replace() resolved
  while (!finished) {
    progressBefore.push([...prog]);
    const next = DirtyLogArea.create(GUEST);
    logs.push(next);
    const old = await log.replace(next);
    assert.equal(old, logs[logs.length - 2]);
    frozen.push((old as DirtyLogArea).peek().length);
    await new Promise((r) => setImmediate(r));
  }
  await Promise.all(done);
  t.diagnostic(`${logs.length - 1} replacements while ${WORKERS} workers marked ${pages} pages`);
  assert.ok(logs.length > 5, `only ${logs.length} logs: the test did not exercise replacement`);

  // 1. Replaced logs did not change after their replace() resolved.
  for (let k = 0; k < frozen.length; k++) {
    assert.equal((logs[k] as DirtyLogArea).peek().length, frozen[k], `log ${k} was marked after it was replaced`);
  }
  // 2. Every page marked exactly once, in exactly one log.
  const where = new Int32Array(pages).fill(-1);
  logs.forEach((l, k) => {
    for (const p of l.peek()) {
      assert.equal(where[p], -1, `page ${p} in two logs`);
      where[p] = k;
    }
  });
  for (let p = 0; p < pages; p++) assert.notEqual(where[p], -1, `mark of page ${p} lost`);
  // 3. A mark completed before replacement k began is in log k or an earlier one.
  for (let p = 0; p < pages; p++) {
    const w = p % WORKERS;
    const markIndex = Math.floor(p / WORKERS); // this worker's (markIndex+1)-th mark
    const logIndex = where[p] as number;
    if (logIndex > 0) {
      // It landed in log logIndex, so it was not complete when replacement logIndex-1 began.
      const before = (progressBefore[logIndex - 1] as number[])[w] as number;
      assert.ok(
        markIndex >= before,
        `page ${p} (mark ${markIndex} of worker ${w}) was done before replacement ${logIndex - 1} began but landed after it`,
      );
    }
  }
  for (const l of logs) l.close();
  await log.close();
});

test("the frontend side: SharedLogDirtySource syncs and clears, swap drains the old log first", () => {
  const mem = new GuestMemory([GuestMemoryRegion.memfd(0, 1 << 20), GuestMemoryRegion.memfd(1 << 21, 1 << 20)]);
  const a = DirtyLogArea.create(4 << 20);
  const src = new SharedLogDirtySource(a);
  src.start();
  a.mark(3 * PAGE, 1);
  a.mark((1 << 21) + PAGE, 1);
  a.mark((1 << 20) + PAGE, 1); // a hole between the regions: counted, not fatal
  const sink = new DirtyBitmap(mem);
  src.sync(sink);
  assert.deepEqual([...(sink.bitmaps[0] as { dirtyPages(): Iterable<number> }).dirtyPages()], [3]);
  assert.deepEqual([...(sink.bitmaps[1] as { dirtyPages(): Iterable<number> }).dirtyPages()], [1]);
  assert.equal(sink.outside, 1);
  assert.deepEqual(a.peek(), []);
  a.mark(9 * PAGE, 1);
  const b = DirtyLogArea.create(8 << 20);
  src.swap(b, sink); // a is drained into the sink and closed
  assert.ok(sink.bitmaps[0]?.isDirty(9));
  b.mark(10 * PAGE, 1);
  src.sync(sink);
  assert.ok(sink.bitmaps[0]?.isDirty(10));
  b.close();
  mem.close();
});
