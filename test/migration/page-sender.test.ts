import assert from "node:assert/strict";
import { Duplex } from "node:stream";
import { test } from "node:test";
import { DirtyTracker, RegionBitmapSource } from "../../src/memory/dirty-tracker.js";
import { DiscardMap } from "../../src/memory/discard-map.js";
import { GuestMemory } from "../../src/memory/guest-memory.js";
import { GuestMemoryRegion } from "../../src/memory/region.js";
import { RecordReader, RecordWriter } from "../../src/migration/channel.js";
import { decodeDiscard, decodePages, RecordType } from "../../src/migration/format.js";
import { PageSender, type SendRegion } from "../../src/migration/page-sender.js";
import { PageSet } from "../../src/migration/page-set.js";
import { MiB, socketPair } from "./helpers.js";

const PAGE = 4096;

/** One 8 MiB memfd region; pages p % 4 !== 3 hold their page number, the rest stay zero. */
function memory(): GuestMemory {
  const mem = new GuestMemory([GuestMemoryRegion.memfd(0, 8 * MiB, { name: "page-sender-test" })]);
  const r = mem.regions[0] as GuestMemoryRegion;
  for (let p = 0; p < r.size / PAGE; p++)
    if (p % 4 !== 3) mem.write(p * PAGE + 8, new Uint8Array([p & 0xff, p >> 8, 1]));
  return mem;
}

interface Received {
  /** Page -> bytes (zero pages: null), in arrival order per page (the last one wins). */
  pages: Map<number, Uint8Array | null>;
  /** Record types in arrival order. */
  types: number[];
  discards: Uint8Array[];
}

/** Reads PAGES and DISCARD records off `b` until `done(received)` holds. */
async function receive(b: import("node:net").Socket, done: (r: Received) => boolean): Promise<Received> {
  const reader = new RecordReader(b);
  const got: Received = { pages: new Map(), types: [], discards: [] };
  while (!done(got)) {
    const r = await reader.next();
    got.types.push(r.type);
    if (r.type === RecordType.Discard) got.discards.push(decodeDiscard(r.payload).states.slice());
    else if (r.type === RecordType.Pages) {
      const rec = decodePages(r.payload, PAGE);
      for (let k = 0; k < rec.pages.length; k++) {
        const at = rec.dataOffsets[k] as number;
        got.pages.set(rec.pages[k] as number, at < 0 ? null : rec.data.slice(at, at + PAGE));
      }
    } else assert.fail(`unexpected record ${r.type}`);
  }
  reader.detach();
  return got;
}

const noFailure = { check() {} };

const same = (x: Uint8Array, y: Uint8Array) => Buffer.from(x).equals(Buffer.from(y.buffer, y.byteOffset, y.byteLength));

test("page-sender: zero pages go as flags, full pages byte for byte, record buffers are reused", async () => {
  const mem = memory();
  const region = mem.regions[0] as GuestMemoryRegion;
  const regions: SendRegion[] = [{ region, pages: region.size / PAGE, discard: undefined }];
  const tracker = new DirtyTracker(mem, [new RegionBitmapSource(mem)]);
  const [a, b] = await socketPair();
  try {
    await tracker.start();
    const sender = new PageSender(regions);
    const writer = new RecordWriter(a);
    const all = regions[0]?.pages as number;
    const got = receive(b, (r) => r.pages.size === all);
    const sent = await sender.sendDirty(tracker.bitmap, writer, noFailure);
    const r = await got;
    assert.deepEqual(sent, { pages: all, zero: all / 4 });
    assert.equal(sender.pages, all);
    assert.equal(sender.zero, all / 4);
    for (let p = 0; p < all; p++) {
      const data = r.pages.get(p);
      if (p % 4 === 3) assert.equal(data, null, `page ${p} is zero: a flag, no data`);
      else assert.ok(data && same(data, region.bytes(p * PAGE, PAGE) as Uint8Array), `page ${p}`);
    }
    await writer.drain();
    // 8 records of 256 pages went out through a handful of pooled buffers, all given back.
    assert.ok(sender.pool.allocated < 8, `${sender.pool.allocated} buffers for 8 records`);
    assert.equal(sender.pool.free, sender.pool.allocated);
  } finally {
    a.destroy();
    b.destroy();
    await tracker.stop();
    mem.close();
  }
});

test("page-sender: a long round reuses a bounded set of record buffers while every write completes at once", async () => {
  // 64 MiB of full pages: 64 records, a writer whose high-water mark is above the whole round
  // (it never waits). Writes the kernel takes at once complete synchronously and node:net runs
  // their callbacks on the next tick: buffers must still come back (they did not: one fresh
  // buffer per record).
  const mem = new GuestMemory([GuestMemoryRegion.memfd(0, 64 * MiB, { name: "page-sender-pool" })]);
  const region = mem.regions[0] as GuestMemoryRegion;
  for (let p = 0; p < region.size / PAGE; p++) mem.write(p * PAGE, new Uint8Array([p & 0xff, (p >> 8) | 1]));
  const regions: SendRegion[] = [{ region, pages: region.size / PAGE, discard: undefined }];
  const tracker = new DirtyTracker(mem, [new RegionBitmapSource(mem)]);
  const [a, b] = await socketPair();
  try {
    await tracker.start();
    const sender = new PageSender(regions);
    const writer = new RecordWriter(a, { highWater: 256 * MiB });
    const all = regions[0]?.pages as number;
    const got = receive(b, (r) => r.pages.size === all);
    const sent = await sender.sendDirty(tracker.bitmap, writer, noFailure);
    assert.equal(sent.pages, all);
    const r = await got;
    assert.equal(r.pages.size, all);
    await writer.drain();
    assert.ok(sender.pool.allocated <= 8, `${sender.pool.allocated} buffers for 64 records`);
  } finally {
    a.destroy();
    b.destroy();
    await tracker.stop();
    mem.close();
  }
});

test("page-sender: dirty rounds send only what was written since the last sync", async () => {
  const mem = memory();
  const region = mem.regions[0] as GuestMemoryRegion;
  const regions: SendRegion[] = [{ region, pages: region.size / PAGE, discard: undefined }];
  const tracker = new DirtyTracker(mem, [new RegionBitmapSource(mem)]);
  const [a, b] = await socketPair();
  try {
    await tracker.start();
    const sender = new PageSender(regions);
    const writer = new RecordWriter(a);
    const all = regions[0]?.pages as number;
    const first = receive(b, (r) => r.pages.size === all);
    await sender.sendDirty(tracker.bitmap, writer, noFailure);
    await first;
    // Round 2: three pages written (one of them a zero page that became non-zero).
    for (const p of [5, 3, 1500]) mem.write(p * PAGE + 100, new Uint8Array([0xee, p & 0xff]));
    sender.syncing();
    const rep = await tracker.sync();
    assert.equal(rep.dirtyPages, 3);
    const second = receive(b, (r) => r.pages.size === 3);
    const round2 = await sender.sendDirty(tracker.bitmap, writer, noFailure);
    assert.deepEqual(round2, { pages: 3, zero: 0 });
    const r = await second;
    assert.deepEqual(
      [...r.pages.keys()].sort((x, y) => x - y),
      [3, 5, 1500],
    );
    for (const [p, data] of r.pages)
      assert.ok(data && same(data, region.bytes(p * PAGE, PAGE) as Uint8Array), `page ${p}`);
    // Nothing written since: an empty round sends nothing.
    sender.syncing();
    assert.equal((await tracker.sync()).dirtyPages, 0);
    assert.deepEqual(await sender.sendDirty(tracker.bitmap, writer, noFailure), { pages: 0, zero: 0 });
  } finally {
    a.destroy();
    b.destroy();
    await tracker.stop();
    mem.close();
  }
});

test("page-sender: discarded pages are never sent, also a block discarded after the sync", async () => {
  const mem = memory();
  const region = mem.regions[0] as GuestMemoryRegion;
  const discard = new DiscardMap(region.size, 2 * MiB);
  discard.discard(2 * MiB, 2 * MiB); // block 1: discarded from the start
  const regions: SendRegion[] = [{ region, pages: region.size / PAGE, discard }];
  const tracker = new DirtyTracker(mem, [new RegionBitmapSource(mem)], new Map([[region, discard]]));
  const [a, b] = await socketPair();
  const sender = new PageSender(regions);
  const unwatch = sender.watchPlugState();
  try {
    await tracker.start();
    sender.syncing();
    await tracker.sync();
    // Block 3 goes after the sync: its pages are still in this round's bitmap.
    discard.discard(6 * MiB, 2 * MiB);
    const writer = new RecordWriter(a);
    const expected = regions[0]?.pages as number;
    const blockPages = (2 * MiB) / PAGE;
    const got = receive(b, (r) => r.pages.size === expected - 2 * blockPages);
    const sent = await sender.sendDirty(tracker.bitmap, writer, noFailure);
    const r = await got;
    assert.equal(sent.pages, expected - 2 * blockPages);
    const inBlock = (p: number) => (p >= blockPages && p < 2 * blockPages) || p >= 3 * blockPages;
    for (const p of r.pages.keys()) assert.ok(!inBlock(p), `page ${p} of a discarded block was sent`);
    // The new plug state went out ahead of the first page.
    assert.equal(r.types[0], RecordType.Discard);
    assert.deepEqual([...(r.discards[0] as Uint8Array)], [1, 0, 1, 0]);
  } finally {
    for (const u of unwatch) u();
    a.destroy();
    b.destroy();
    await tracker.stop();
    mem.close();
  }
});

test("page-sender: the background pass skips pages sent ahead and marks the rest sent", async () => {
  const mem = memory();
  const region = mem.regions[0] as GuestMemoryRegion;
  const pages = region.size / PAGE;
  const regions: SendRegion[] = [{ region, pages, discard: undefined }];
  const [a, b] = await socketPair();
  try {
    const sender = new PageSender(regions);
    const set = new PageSet(pages);
    // A return path that already sent 10 and 11 ahead (requested).
    set.set(10);
    set.set(11);
    const sent = {
      check() {},
      markSent: (_i: number, p: number) => set.set(p),
      wasSent: (_i: number, p: number) => set.has(p),
    };
    const todo = new Uint32Array([9, 10, 11, 12, 3]);
    const got = receive(b, (r) => r.pages.size === 3);
    await sender.sendBackground([todo], new RecordWriter(a), sent, true);
    const r = await got;
    assert.deepEqual(
      [...r.pages.keys()].sort((x, y) => x - y),
      [3, 9, 12],
    );
    assert.equal(r.pages.get(3), null);
    for (const p of [3, 9, 12]) assert.ok(set.has(p));
  } finally {
    a.destroy();
    b.destroy();
    mem.close();
  }
});

test("page-sender: a failure seen by the guard stops the round before the next record", async () => {
  const mem = memory();
  const region = mem.regions[0] as GuestMemoryRegion;
  const regions: SendRegion[] = [{ region, pages: region.size / PAGE, discard: undefined }];
  const tracker = new DirtyTracker(mem, [new RegionBitmapSource(mem)]);
  const [a, b] = await socketPair();
  try {
    await tracker.start();
    const sender = new PageSender(regions);
    let records = 0;
    const guard = {
      check() {
        if (++records > 2) throw new Error("the return path failed");
      },
    };
    b.resume();
    await assert.rejects(sender.sendDirty(tracker.bitmap, new RecordWriter(a), guard), /the return path failed/);
    assert.equal(sender.pages, 2 * 256);
  } finally {
    a.destroy();
    b.destroy();
    await tracker.stop();
    mem.close();
  }
});

test("RecordWriter: over the high-water mark a write waits until the backlog is half of it, not until it is empty", async () => {
  // A stream that completes each write only when the test says so: the backlog is exact.
  const held: (() => void)[] = [];
  const sink = new Duplex({
    read() {},
    write(_chunk, _enc, cb) {
      held.push(() => cb());
    },
  });
  const HW = 1024 * 1024;
  const writer = new RecordWriter(sink, { highWater: HW });
  const chunk = 256 * 1024;
  for (let k = 0; k < 4; k++) await writer.write(new Uint8Array(chunk));
  // The fifth puts 1.25 MiB in the backlog: over the mark, it waits.
  let resolved = false;
  const fifth = writer.write(new Uint8Array(chunk)).then(() => {
    resolved = true;
  });
  const tick = () => new Promise((r) => setImmediate(r));
  await tick();
  assert.equal(resolved, false);
  // 1 MiB, then 768 KiB queued: still over half the mark.
  for (let k = 0; k < 2; k++) {
    (held.shift() as () => void)();
    await tick();
    assert.equal(resolved, false, `resolved with ${sink.writableLength} bytes queued`);
  }
  // 512 KiB queued: half the mark. 'drain' would still be far off (two writes outstanding).
  (held.shift() as () => void)();
  await fifth;
  assert.equal(sink.writableLength, 2 * chunk);
  assert.equal(writer.bytesWritten, 5 * chunk);
  // The rest completes; drain() waits for all of it.
  let drained = false;
  const d = writer.drain().then(() => {
    drained = true;
  });
  (held.shift() as () => void)();
  await tick();
  assert.equal(drained, false);
  (held.shift() as () => void)();
  await d;
  sink.destroy();
});
