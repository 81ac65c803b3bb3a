/**
 * Mapping: the lifetime rule (close releases the memfd at once, stale views are harmless),
 * windows over mappings larger than 1 GiB, and sharing with worker threads.
 */
import assert from "node:assert/strict";
import { test } from "node:test";
import { GuestMemory } from "../../src/memory/guest-memory.js";
import { GuestMemoryRegion } from "../../src/memory/region.js";
import { Mapping, WINDOW_SIZE } from "../../src/sys/mapping.js";
import { createMemfd } from "../../src/sys/memfd.js";
import { mapsLinesMatching } from "../helpers/proc.js";
import { startWorker } from "../helpers/workers.js";

const GiB = 2 ** 30;

test("close(): the memfd leaves /proc/self/maps at once, stale views read zeros and write to scratch", () => {
  const name = `vmshift-lifetime-${process.pid}`;
  const fd = createMemfd(name, 64 * 1024);
  const m1 = Mapping.map(fd, 64 * 1024);
  const m2 = Mapping.map(fd, 64 * 1024);
  fd.close(); // the mappings keep the file alive
  assert.equal(mapsLinesMatching(name).length, 2);

  const stale = new Uint8Array(m1.windows[0] as SharedArrayBuffer);
  const other = new Uint8Array(m2.windows[0] as SharedArrayBuffer);
  stale.fill(0x5a, 0, 8192);
  assert.equal(other[4096], 0x5a, "both mappings share the memfd pages");

  m1.close();
  assert.equal(m1.closed, true);
  const left = mapsLinesMatching(name);
  assert.equal(left.length, 1, "only the second mapping still maps the memfd");
  assert.ok(left[0]?.startsWith(`${m2.address.toString(16)}-`), `the line left is m2's: ${left[0]}`);
  assert.equal(stale[0], 0, "a stale view reads zeros");
  assert.equal(stale[4096], 0);
  stale.fill(0xee, 0, 64 * 1024); // must not crash
  assert.equal(stale[100], 0xee, "the scratch is private to the stale view");
  assert.equal(other[100], 0x5a, "a write through a stale view never reaches the memfd");
  assert.equal(other[8192], 0);

  assert.throws(() => m1.read(0, new Uint8Array(1)), /after close/);
  assert.throws(() => m1.write(0, new Uint8Array(1)), /after close/);
  assert.throws(() => m1.bytes(0, 1), /after close/);
  assert.throws(() => m1.address, /after close/);
  assert.throws(() => m1.advise(0, 4096, 4), /after close/);
  assert.throws(() => m1.residency(0, 4096), /after close/);
  m1.close(); // idempotent

  m2.close();
  assert.equal(mapsLinesMatching(name).length, 0);
});

test("Mapping range checks: RangeError outside the mapping, nothing written", () => {
  const m = Mapping.anonymous(8192);
  assert.throws(() => m.write(8190, new Uint8Array([1, 2, 3])), RangeError);
  assert.throws(() => m.read(-1, new Uint8Array(1)), RangeError);
  assert.throws(() => m.bytes(0, 8193), RangeError);
  assert.equal(new Uint8Array(m.windows[0] as SharedArrayBuffer)[8190], 0);
  m.close();
});

test("a 5 GiB mapping has 1 GiB windows; read/write cross window boundaries", () => {
  const fd = createMemfd("vmshift-windows", 5 * GiB); // sparse: only touched pages exist
  const m = Mapping.map(fd, 5 * GiB);
  fd.close();
  try {
    assert.equal(m.windows.length, 5);
    for (const w of m.windows) assert.equal(w.byteLength, WINDOW_SIZE);
    assert.equal(m.bytes(GiB - 4, 8), null, "no single view across a window boundary");

    const data = Uint8Array.from({ length: 64 }, (_, i) => i + 1);
    for (const boundary of [GiB, 2 * GiB, 4 * GiB]) {
      m.write(boundary - 20, data);
      const w0 = new Uint8Array(m.windows[boundary / GiB - 1] as SharedArrayBuffer);
      const w1 = new Uint8Array(m.windows[boundary / GiB] as SharedArrayBuffer);
      assert.deepEqual(w0.subarray(GiB - 20), data.subarray(0, 20), "first part at the end of the lower window");
      assert.deepEqual(w1.subarray(0, 44), data.subarray(20), "rest at the start of the next window");
      const back = new Uint8Array(64);
      m.read(boundary - 20, back);
      assert.deepEqual(back, data);
    }
    // The last byte of the mapping, through the last window.
    m.write(5 * GiB - 1, Uint8Array.of(0x77));
    assert.equal(new Uint8Array(m.windows[4] as SharedArrayBuffer)[GiB - 1], 0x77);
  } finally {
    m.close();
  }
});

test("GuestMemory over >1 GiB regions: read/write/readU64 across windows and regions", () => {
  // [0, 3 GiB) memfd + [3 GiB, 5 GiB) anonymous (MAP_NORESERVE) + [8 GiB, 8 GiB+64 KiB) after a hole.
  const a = GuestMemoryRegion.memfd(0, 3 * GiB);
  const b = GuestMemoryRegion.anonymous(3 * GiB, 2 * GiB);
  const c = GuestMemoryRegion.memfd(8 * GiB, 64 * 1024);
  const mem = new GuestMemory([c, a, b]);
  try {
    assert.equal(a.windows.length, 3);
    const data = Uint8Array.from({ length: 32 }, (_, i) => 0xa0 + i);
    for (const at of [GiB - 16, 2 * GiB - 3, 3 * GiB - 16, 4 * GiB - 5]) {
      mem.write(at, data);
      assert.deepEqual(mem.read(at, 32), data, `round trip at ${at}`);
      assert.equal(mem.slice(at, 32), null, "no zero-copy view across a boundary");
    }
    // The bytes really are where they should be: check through the regions' own windows.
    assert.equal(new Uint8Array(a.windows[2] as SharedArrayBuffer)[GiB - 1], 0xa0 + 15);
    assert.equal(new Uint8Array(b.windows[0] as SharedArrayBuffer)[0], 0xa0 + 16);

    // A u64 straddling the memfd/anonymous boundary and one straddling a window.
    mem.writeU64(3 * GiB - 3, 0x1122334455667788n);
    assert.equal(mem.readU64(3 * GiB - 3), 0x1122334455667788n);
    assert.deepEqual(mem.read(3 * GiB - 3, 8), Uint8Array.of(0x88, 0x77, 0x66, 0x55, 0x44, 0x33, 0x22, 0x11));
    mem.writeU64(GiB - 4, 0xdeadbeefcafef00dn);
    assert.equal(mem.readU64(GiB - 4), 0xdeadbeefcafef00dn);
    assert.equal(mem.readU32(GiB - 4), 0xcafef00d);
    assert.equal(mem.readU32(GiB), 0xdeadbeef);

    // Region c after the hole.
    mem.write(8 * GiB + 100, data);
    assert.deepEqual(mem.read(8 * GiB + 100, 32), data);
    assert.throws(() => mem.read(5 * GiB - 8, 16), { name: "GuestMemoryError", code: "OUT_OF_RANGE" });
  } finally {
    mem.close();
  }
});

test("a window posted to a worker shares the same pages, both ways", async () => {
  const fd = createMemfd("vmshift-worker-share", 64 * 1024);
  const m = Mapping.map(fd, 64 * 1024);
  fd.close();
  const u32 = new Uint32Array(m.windows[0] as SharedArrayBuffer);
  Atomics.store(u32, 1024, 0xc0ffee);
  const w = startWorker({
    kind: "sab",
    sab: m.windows[0] as SharedArrayBuffer,
    readAt: 4096,
    writeAt: 8192,
    value: 0xfeed,
  });
  assert.equal(await w.next(), 0xc0ffee, "the worker sees what main wrote");
  assert.equal(await w.next(), "written");
  assert.equal(Atomics.load(u32, 2048), 0xfeed, "main sees what the worker wrote");
  assert.equal(await w.exited, 0);
  m.close();
});
