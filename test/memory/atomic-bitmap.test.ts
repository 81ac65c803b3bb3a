/** AtomicBitmap: markRange edges against a naive model, snapshots, and concurrent marking. */
import assert from "node:assert/strict";
import { test } from "node:test";
import { AtomicBitmap } from "../../src/memory/atomic-bitmap.js";
import { xorshift32 } from "../helpers/random.js";
import { startWorker } from "../helpers/workers.js";

function pagesOf(b: AtomicBitmap): number[] {
  return [...b.dirtyPages()];
}

test("markRange edges: first/last page, partial pages, whole words, clipping", () => {
  const ps = 4096;
  const b = new AtomicBitmap(100 * ps); // 100 pages: 3 full words + 4 bits
  b.markRange(0, 1);
  assert.deepEqual(pagesOf(b), [0], "one byte of the first page");
  b.clear();
  b.markRange(ps - 1, 2);
  assert.deepEqual(pagesOf(b), [0, 1], "two bytes straddling a page boundary");
  b.clear();
  b.markRange(99 * ps, ps);
  assert.deepEqual(pagesOf(b), [99], "the last page exactly");
  b.clear();
  b.markRange(99 * ps + 100, 10 * ps);
  assert.deepEqual(pagesOf(b), [99], "clipped at the end of the tracked range");
  b.clear();
  b.markRange(100 * ps, ps);
  b.markRange(1e12, 1);
  b.markRange(5 * ps, 0);
  assert.deepEqual(pagesOf(b), [], "past the end or empty: nothing");
  b.markRange(32 * ps, 32 * ps);
  assert.equal(b.words[1], 0xffffffff, "a whole word at once");
  assert.equal(b.words[0], 0);
  assert.equal(b.words[2], 0);
  b.clear();
  b.markRange(30 * ps + 5, 5 * ps);
  assert.deepEqual(pagesOf(b), [30, 31, 32, 33, 34, 35], "partial pages at both ends, across a word");
  b.clear();
  b.markRange(0, 100 * ps);
  assert.equal(b.count(), 100);
  assert.equal(b.words[3], 0xf, "no bit past the last page");
  b.clear();
  b.setAll();
  assert.equal(b.count(), 100);
});

test("markRange matches a naive model on random ranges (two page sizes)", () => {
  for (const ps of [4096, 512]) {
    const pages = 200;
    const b = new AtomicBitmap(pages * ps - 7, ps); // a partial last page is still a page
    assert.equal(b.pages, pages);
    const next = xorshift32(ps);
    for (let round = 0; round < 300; round++) {
      b.clear();
      const expected = new Set<number>();
      for (let k = 0; k < 3; k++) {
        const offset = next() % (pages * ps + 3 * ps);
        const length = next() % 3 === 0 ? next() % (70 * ps) : next() % (3 * ps);
        b.markRange(offset, length);
        if (length > 0) {
          const first = Math.floor(offset / ps);
          const last = Math.min(Math.floor((offset + length - 1) / ps), pages - 1);
          for (let p = first; p <= last; p++) expected.add(p);
        }
      }
      const want = [...expected].sort((x, y) => x - y);
      assert.deepEqual(pagesOf(b), want, `page size ${ps}, round ${round}`);
      assert.equal(b.count(), want.length);
    }
  }
});

test("count, dirtyPages ascending, isDirty, snapshotAndClear takes exactly what was marked", () => {
  const pages = 5000;
  const b = new AtomicBitmap(pages * 4096);
  const next = xorshift32(99);
  const marked = new Set<number>();
  for (let i = 0; i < 1500; i++) {
    const p = next() % pages;
    marked.add(p);
    b.markPage(p);
  }
  b.markPage(-1);
  b.markPage(pages); // out of range: ignored
  const want = [...marked].sort((x, y) => x - y);
  assert.equal(b.count(), marked.size);
  assert.deepEqual(pagesOf(b), want, "ascending, each once");
  assert.equal(b.isDirty(want[0] as number), true);
  assert.equal(b.isDirty(pages), false);
  const snap = b.snapshotAndClear();
  assert.deepEqual([...snap], want);
  assert.equal(b.count(), 0, "cleared");
  assert.equal(b.snapshotAndClear().length, 0);
});

test("snapshotAndClear over more dirty pages than one scan chunk (several native calls)", () => {
  const pages = 200_003;
  const b = new AtomicBitmap(pages * 4096);
  b.setAll();
  const snap = b.snapshotAndClear();
  assert.equal(snap.length, pages);
  let ok = true;
  for (let i = 0; i < snap.length; i++) if (snap[i] !== i) ok = false;
  assert.ok(ok, "every page once, ascending");
  assert.equal(b.count(), 0);
});

test("bits past the last page written by a foreign writer are not reported", () => {
  const b = new AtomicBitmap(40 * 4096); // 2 words, 24 spare bits
  Atomics.or(b.words, 1, 1 << 20); // page 52: not a page of this bitmap
  b.markPage(39);
  assert.deepEqual([...b.snapshotAndClear()], [39]);
  assert.deepEqual(pagesOf(b), []);
});

test("a worker marks while the main thread snapshots repeatedly: no mark is lost or repeated", async () => {
  const pages = 2_000_000;
  const b = new AtomicBitmap(pages * 4096);
  const flags = new SharedArrayBuffer(8);
  const f = new Int32Array(flags);
  const w = startWorker({ kind: "bitmap-marker", bitmap: b.toShared(), flags, pages, seed: 4242 });
  const seen = new Uint8Array(pages);
  let snapshots = 0;
  let duplicates = 0;
  const take = () => {
    const s = b.snapshotAndClear();
    snapshots++;
    for (let i = 0; i < s.length; i++) {
      const p = s[i] as number;
      if (seen[p]) duplicates++;
      seen[p] = 1;
    }
  };
  // Spin (the worker runs on its own thread) until it starts, then snapshot until it is done.
  const deadline = Date.now() + 30_000; // a worker that failed to start fails the test, not hangs it
  while (Atomics.load(f, 0) === 0) if (Date.now() > deadline) throw new Error("marker worker did not start");
  while (Atomics.load(f, 1) === 0) take();
  take(); // whatever landed after the last snapshot
  assert.equal(await w.next(), "done");
  assert.equal(await w.exited, 0);
  let missing = 0;
  for (let p = 0; p < pages; p++) if (!seen[p]) missing++;
  assert.equal(missing, 0, `${missing} marks lost over ${snapshots} snapshots`);
  assert.equal(duplicates, 0, "each mark reported once");
  assert.equal(b.count(), 0);
});
