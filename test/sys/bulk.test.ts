/**
 * memcpy / copyBytes: the native copy every large copy into or out of guest memory goes through
 * (Mapping.read/write, GuestMemoryRegion.readInto/writeFrom).
 */
import assert from "node:assert/strict";
import { test } from "node:test";
import { copyBytes, memcpy, NATIVE_COPY_MIN } from "../../src/sys/bulk.js";
import { Mapping } from "../../src/sys/mapping.js";
import { createMemfd } from "../../src/sys/memfd.js";

function pattern(n: number, seed: number): Uint8Array {
  const b = new Uint8Array(n);
  for (let i = 0; i < n; i++) b[i] = (i * 31 + seed) & 0xff;
  return b;
}

test("memcpy copies all of src to the start of dst, shared or not, and leaves the rest", () => {
  const src = pattern(10_000, 7);
  const dst = new Uint8Array(new SharedArrayBuffer(10_016)).fill(0xee);
  memcpy(dst, src);
  assert.deepEqual(dst.subarray(0, 10_000), src);
  assert.ok(dst.subarray(10_000).every((b) => b === 0xee));
  // A subarray on either side: the view's own offset and length count, not the buffer's.
  const back = new Uint8Array(100);
  memcpy(back.subarray(10, 60), dst.subarray(500, 550));
  assert.deepEqual(back.subarray(10, 60), src.subarray(500, 550));
  assert.equal(back[9], 0);
  assert.equal(back[60], 0);
});

test("memcpy: overlapping views of one buffer copy as memmove does", () => {
  const b = pattern(8192, 3);
  const want = b.slice(0, 6000);
  memcpy(b.subarray(100), b.subarray(0, 6000));
  assert.deepEqual(b.subarray(100, 6100), want);
});

test("memcpy: a destination shorter than the source is a TypeError and nothing is copied", () => {
  const dst = new Uint8Array(100);
  assert.throws(() => memcpy(dst, pattern(101, 1)), TypeError);
  assert.ok(dst.every((b) => b === 0));
  assert.throws(() => memcpy(dst, "nope" as never), TypeError);
});

test("copyBytes: the same result as TypedArray.set below and above the native threshold, bounds checked", () => {
  for (const n of [0, 1, NATIVE_COPY_MIN - 1, NATIVE_COPY_MIN, 3 * NATIVE_COPY_MIN + 5]) {
    const src = pattern(n, n);
    const a = new Uint8Array(new SharedArrayBuffer(n + 64));
    const b = new Uint8Array(n + 64);
    copyBytes(a, src, 17);
    b.set(src, 17);
    assert.deepEqual(new Uint8Array(a), b, `${n} bytes`);
  }
  const dst = new Uint8Array(4 * NATIVE_COPY_MIN);
  assert.throws(() => copyBytes(dst, pattern(2 * NATIVE_COPY_MIN, 1), 3 * NATIVE_COPY_MIN), RangeError);
  assert.throws(() => copyBytes(dst, pattern(2 * NATIVE_COPY_MIN, 1), -1), RangeError);
  assert.ok(
    dst.every((x) => x === 0),
    "nothing written by a refused copy",
  );
});

test("Mapping.write / read of a large buffer go through the native copy and round-trip", () => {
  const size = 4 * 1024 * 1024;
  const fd = createMemfd("bulk-test", size);
  const m = Mapping.map(fd, size);
  fd.close();
  try {
    const data = pattern(size - 8192, 9);
    m.write(4096, data);
    const out = new Uint8Array(size - 8192);
    m.read(4096, out);
    assert.deepEqual(out, data);
    const head = new Uint8Array(4096);
    m.read(0, head);
    assert.ok(
      head.every((b) => b === 0),
      "bytes before the write untouched",
    );
  } finally {
    m.close();
  }
});
