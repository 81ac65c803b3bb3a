/**
 * PageSet: the one page bitmap of the migration code. Its byte layout is the stream's (LSB
 * first), so the wire bitmaps of POSTCOPY_ADVISE / RECEIVED / PAGE_CRCS decode into it as is.
 */
import assert from "node:assert/strict";
import { test } from "node:test";
import { PAGE, PageSet, SharedPageSet } from "../../src/migration/page-set.js";

test("PAGE is 4 KiB", () => {
  assert.equal(PAGE, 4096);
});

test("set / has / clear / count / iterate over a size that is not a multiple of 8", () => {
  const s = new PageSet(21);
  assert.equal(s.bytes.length, 3);
  assert.equal(s.count(), 0);
  assert.deepEqual([...s], []);
  for (const p of [0, 7, 8, 20, 13]) s.set(p);
  s.set(7); // twice: still one page
  assert.equal(s.count(), 5);
  assert.deepEqual([...s], [0, 7, 8, 13, 20]);
  assert.ok(s.has(13) && !s.has(12) && !s.has(1));
  s.clear(7);
  s.clear(9); // never set: no change
  assert.deepEqual([...s], [0, 8, 13, 20]);
  assert.equal(s.count(), 4);
});

test("the byte layout is the stream's: bit p of byte p/8, LSB first", () => {
  const s = PageSet.of([0, 3, 9, 15], 16);
  assert.deepEqual([...s.bytes], [0b0000_1001, 0b1000_0010]);
  const w = PageSet.wrap(Uint8Array.of(0x81, 0x01), 9);
  assert.deepEqual([...w], [0, 7, 8]);
  w.set(1);
  assert.equal(w.bytes[0], 0x83, "wrap views the bytes, it does not copy them");
});

test("of() takes only the first `count` numbers of a reused list", () => {
  const s = PageSet.of(Uint32Array.of(2, 4, 6, 99), 8, 3);
  assert.deepEqual([...s], [2, 4, 6]);
});

test("addAll is a union of sets of the same size", () => {
  const a = PageSet.of([1, 2], 40);
  a.addAll(PageSet.of([2, 39], 40));
  assert.deepEqual([...a], [1, 2, 39]);
  assert.throws(() => a.addAll(new PageSet(41)), RangeError);
});

test("a page outside the set, a bad size or a bitmap of the wrong length is a RangeError, nothing changes", () => {
  const s = PageSet.of([3], 10);
  for (const p of [-1, 10, 1.5, Number.NaN]) {
    assert.throws(() => s.has(p), RangeError);
    assert.throws(() => s.set(p), RangeError);
    assert.throws(() => s.clear(p), RangeError);
  }
  assert.deepEqual([...s], [3]);
  assert.throws(() => new PageSet(-1), RangeError);
  assert.throws(() => new PageSet(2.5), RangeError);
  assert.throws(() => PageSet.wrap(new Uint8Array(3), 8), RangeError);
});

test("count and iteration agree on a large random set", () => {
  const n = 100_003;
  const s = new PageSet(n);
  const want = new Set<number>();
  let x = 12345;
  for (let i = 0; i < 20_000; i++) {
    x = (x * 1103515245 + 12345) >>> 0;
    const p = x % n;
    s.set(p);
    want.add(p);
  }
  assert.equal(s.count(), want.size);
  assert.deepEqual(
    [...s],
    [...want].sort((a, b) => a - b),
  );
});

test("SharedPageSet: over a SharedArrayBuffer, same layout and checks; a worker's bits and ours are never lost to each other", async () => {
  const { Worker } = await import("node:worker_threads");
  const n = 4096;
  const s = new SharedPageSet(n);
  assert.ok(s.bytes.buffer instanceof SharedArrayBuffer);
  assert.throws(() => s.set(n), RangeError);
  assert.throws(() => s.clear(-1), RangeError);
  // A worker sets the odd pages while this thread sets the even ones: the same bytes, at once.
  const w = new Worker(
    "const { workerData: b } = require('node:worker_threads'); for (let p = 1; p < b.length * 8; p += 2) Atomics.or(b, p >>> 3, 1 << (p & 7));",
    { eval: true, workerData: s.bytes },
  );
  for (let p = 0; p < n; p += 2) s.set(p);
  await new Promise((r) => w.once("exit", r));
  assert.equal(s.count(), n);
  s.clear(7);
  assert.ok(!s.has(7) && s.has(6) && s.has(8));
  const other = PageSet.of([7], n);
  s.addAll(other);
  assert.equal(s.count(), n);
});
