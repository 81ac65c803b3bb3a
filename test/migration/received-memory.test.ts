/**
 * ReceivedMemory: the destination's bookkeeping of what it holds (received pages, hashes,
 * discard maps), without sockets or userfaultfd. Each rule MigrationDestination relies on.
 */
import assert from "node:assert/strict";
import { test } from "node:test";
import { MigrationError } from "../../src/migration/errors.js";
import { PAGE, PageSet } from "../../src/migration/page-set.js";
import { ReceivedMemory } from "../../src/migration/received-memory.js";
import { MiB, makeMemory } from "./helpers.js";

const BLOCK = 2 * MiB;
const PER = BLOCK / PAGE;

test("one state per region, nothing received, no hashes until asked", () => {
  const mem = makeMemory([4 * MiB, 2 * MiB]);
  try {
    const rm = new ReceivedMemory(mem.regions);
    assert.equal(rm.regions.length, 2);
    assert.equal(rm.get(0)?.pages, 1024);
    assert.equal(rm.get(1)?.pages, 512);
    assert.equal(rm.get(2), undefined);
    assert.equal(rm.get(0)?.present.count(), 0);
    assert.equal(rm.get(0)?.hashes, null);
    assert.deepEqual(rm.hashDigests(), [new Uint8Array(32), new Uint8Array(32)]);
    rm.startHashing();
    assert.equal(rm.get(1)?.hashes?.pages, 512);
  } finally {
    mem.close();
  }
});

test("checkPages: an unknown region, a page past the end or in a discarded block is BAD_PAGE, before anything changes", () => {
  const mem = makeMemory([4 * MiB, 2 * MiB]);
  try {
    const rm = new ReceivedMemory(mem.regions);
    const st = rm.get(0);
    assert.equal(rm.checkPages(0, [0, 1023], 40), st);
    const bad = (i: number, pages: number[], page?: number) =>
      assert.throws(
        () => rm.checkPages(i, pages, 40),
        (e: unknown) =>
          e instanceof MigrationError && e.code === "BAD_PAGE" && (page === undefined || e.details?.page === page),
      );
    bad(5, [0]);
    bad(0, [3, 1024], 1024);
    rm.applyDiscard(st as never, BLOCK, Uint8Array.of(1, 0));
    bad(0, [0, PER + 1], PER + 1);
    assert.equal(rm.checkPages(0, [PER - 1]), st, "the plugged block still takes pages");
    assert.equal(st?.present.count(), 0);
  } finally {
    mem.close();
  }
});

test("received / receivedZero: a zero page needs clearing only where content was received before; its hash is the zero page's", () => {
  const mem = makeMemory([4 * MiB, 2 * MiB]);
  try {
    const rm = new ReceivedMemory(mem.regions);
    rm.startHashing();
    const st = rm.get(0);
    assert.ok(st);
    const zeroDigest = rm.hashDigests()[0];
    st.hashes?.setFromData([7], 1, new Uint8Array(PAGE).fill(9));
    rm.received(st, 7);
    assert.notDeepEqual(rm.hashDigests()[0], zeroDigest);
    assert.equal(rm.receivedZero(st, 8), false, "never received: fresh memory is zero already");
    assert.equal(rm.receivedZero(st, 7), true, "received before: the caller must clear it");
    assert.deepEqual(rm.hashDigests()[0], zeroDigest, "the zero page's hash replaced the content's");
  } finally {
    mem.close();
  }
});

test("applyDiscard: the first map is taken as is; a later one drops the blocks newly discarded (pages and hashes)", () => {
  const mem = makeMemory([8 * MiB, 2 * MiB]);
  try {
    const rm = new ReceivedMemory(mem.regions);
    rm.startHashing();
    const st = rm.get(0);
    assert.ok(st);
    // First map: block 3 unplugged; nothing was received, nothing to drop.
    assert.deepEqual(rm.applyDiscard(st, BLOCK, Uint8Array.of(1, 1, 1, 0)), []);
    for (const p of [0, PER, PER + 5, 2 * PER]) {
      rm.received(st, p);
      st.hashes?.setFromData([p], 1, new Uint8Array(PAGE).fill(1));
    }
    const before = rm.hashDigests()[0];
    // Block 1 unplugged now, block 3 plugged again: only block 1 is dropped.
    assert.deepEqual(rm.applyDiscard(st, BLOCK, Uint8Array.of(1, 0, 1, 1)), [1]);
    assert.deepEqual([...st.present], [0, 2 * PER]);
    assert.notDeepEqual(rm.hashDigests()[0], before);
    assert.ok(st.discard?.isDiscarded(PER * PAGE));
    assert.ok(!st.discard?.isDiscarded(3 * BLOCK));
    // Same map again: nothing newly discarded.
    assert.deepEqual(rm.applyDiscard(st, BLOCK, Uint8Array.of(1, 0, 1, 1)), []);
  } finally {
    mem.close();
  }
});

test("applyDiscard: a different block size later is REGION_MISMATCH and leaves the map and pages as they were", () => {
  const mem = makeMemory([8 * MiB, 2 * MiB]);
  try {
    const rm = new ReceivedMemory(mem.regions);
    const st = rm.get(0);
    assert.ok(st);
    rm.applyDiscard(st, BLOCK, Uint8Array.of(1, 1, 1, 1));
    rm.received(st, 3);
    assert.throws(
      () => rm.applyDiscard(st, 4 * MiB, Uint8Array.of(0, 0), 99),
      (e: unknown) => e instanceof MigrationError && e.code === "REGION_MISMATCH" && e.offset === 99,
    );
    assert.deepEqual([...st.present], [3]);
    assert.ok(!st.discard?.isDiscarded(0));
  } finally {
    mem.close();
  }
});

test("dropAdvised: only pages both advised and present are dropped, returned as runs", () => {
  const mem = makeMemory([4 * MiB, 2 * MiB]);
  try {
    const rm = new ReceivedMemory(mem.regions);
    const st = rm.get(1);
    assert.ok(st);
    for (const p of [0, 1, 2, 5, 6, 510, 511]) rm.received(st, p);
    const advised = PageSet.of([1, 2, 3, 4, 5, 6, 100, 511], 512);
    assert.deepEqual(rm.dropAdvised(st, advised), [
      [1, 3],
      [5, 7],
      [511, 512],
    ]);
    assert.deepEqual([...st.present], [0, 510]);
    assert.deepEqual(rm.dropAdvised(st, advised), [], "nothing left to drop");
    assert.throws(() => rm.dropAdvised(st, new PageSet(513)), RangeError);
  } finally {
    mem.close();
  }
});

test("memoryDigest hashes received pages from memory and never-received pages as zero, without reading them", () => {
  const mem = makeMemory([4 * MiB, 2 * MiB]);
  try {
    const rm = new ReceivedMemory(mem.regions);
    const empty = rm.memoryDigest(1);
    const r = mem.regions[1];
    assert.ok(r);
    (r.bytes(10 * PAGE, PAGE) as Uint8Array).fill(0x5a);
    assert.deepEqual(rm.memoryDigest(1), empty, "content of a page never received does not count");
    rm.received(rm.get(1) as never, 10);
    assert.notDeepEqual(rm.memoryDigest(1), empty);
  } finally {
    mem.close();
  }
});
