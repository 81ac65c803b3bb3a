/**
 * GuestMemory: every access is bounds-checked; a bad one is a GuestMemoryError with the exact
 * address and length and writes nothing. 64-bit values from peers are never rounded.
 */
import assert from "node:assert/strict";
import { mkdtempSync, rmSync, statSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { test } from "node:test";
import { GuestMemoryError } from "../../src/memory/errors.js";
import { GuestAddress } from "../../src/memory/guest-address.js";
import { GuestMemory } from "../../src/memory/guest-memory.js";
import { GuestMemoryRegion } from "../../src/memory/region.js";

const K64 = 64 * 1024;
// [0, 64K) and [64K, 128K) adjacent; a hole; [1M, 1M+64K).
function layout(): { mem: GuestMemory; regions: GuestMemoryRegion[] } {
  const regions = [
    GuestMemoryRegion.memfd(0, K64),
    GuestMemoryRegion.memfd(K64, K64),
    GuestMemoryRegion.memfd(0x100000, K64),
  ];
  const mem = new GuestMemory(regions);
  for (let i = 0; i < regions.length; i++) (regions[i] as GuestMemoryRegion).fill(0, K64, 0x11 * (i + 1));
  return { mem, regions };
}

/** A digest of every byte of guest memory, to prove a failed access wrote nothing. */
function snapshot(regions: GuestMemoryRegion[]): Buffer[] {
  return regions.map((r) => {
    const b = Buffer.alloc(r.size);
    r.readInto(0, b);
    return b;
  });
}

function isError(code: string, address: bigint, length: bigint) {
  return (e: unknown) => {
    assert.ok(e instanceof GuestMemoryError, `expected a GuestMemoryError, got ${e}`);
    assert.equal(e.code, code);
    assert.equal(e.address, address, "exact address");
    assert.equal(e.length, length, "exact length");
    return true;
  };
}

test("reads and writes cross adjacent regions", () => {
  const { mem } = layout();
  const data = Uint8Array.from({ length: 16 }, (_, i) => i);
  mem.write(K64 - 8, data);
  assert.deepEqual(mem.read(K64 - 8, 16), data);
  mem.copy(0x100000, K64 - 8, 16);
  assert.deepEqual(mem.read(0x100000, 16), data);
  mem.writeU32(K64 - 2, 0xa1b2c3d4);
  assert.equal(mem.readU32(K64 - 2), 0xa1b2c3d4);
  assert.deepEqual([...mem.read(K64 - 2, 4)], [0xd4, 0xc3, 0xb2, 0xa1], "little-endian across the boundary");
  assert.equal(mem.isValidRange(0, 2 * K64), true);
  assert.equal(mem.isValidRange(0, 2 * K64 + 1), false);
  mem.close();
});

test("out of range: exact address and length in the error, nothing written", () => {
  const { mem, regions } = layout();
  const before = snapshot(regions);
  const end = 2 * K64; // the hole starts here
  const cases: [string, () => unknown, bigint, bigint][] = [
    ["read into hole", () => mem.read(end - 4, 8), BigInt(end - 4), 8n],
    ["read past everything", () => mem.read(0x100000 + K64 - 1, 2), BigInt(0x100000 + K64 - 1), 2n],
    ["write straddling into hole", () => mem.write(end - 4, new Uint8Array(8).fill(0xee)), BigInt(end - 4), 8n],
    ["write starting in hole", () => mem.write(end + 100, new Uint8Array(1)), BigInt(end + 100), 1n],
    ["fill straddling", () => mem.fill(end - 1, 2, 0xee), BigInt(end - 1), 2n],
    ["copy to straddling dst", () => mem.copy(end - 2, 0, 4), BigInt(end - 2), 4n],
    ["copy from straddling src", () => mem.copy(0, end - 2, 4), BigInt(end - 2), 4n],
    ["writeU8 in hole", () => mem.writeU8(end, 1), BigInt(end), 1n],
    ["writeU16 straddling", () => mem.writeU16(end - 1, 0xeeee), BigInt(end - 1), 2n],
    ["writeU32 straddling", () => mem.writeU32(end - 2, 0xeeeeeeee), BigInt(end - 2), 4n],
    ["writeU64 straddling", () => mem.writeU64(end - 4, 0xeeeeeeeeeeeeeeeen), BigInt(end - 4), 8n],
    ["readU8 in hole", () => mem.readU8(end), BigInt(end), 1n],
    ["readU16 straddling", () => mem.readU16(end - 1), BigInt(end - 1), 2n],
    ["readU32 straddling", () => mem.readU32(end - 2), BigInt(end - 2), 4n],
    ["readU64 straddling", () => mem.readU64(end - 4), BigInt(end - 4), 8n],
    ["atomicStoreU16 in hole", () => mem.atomicStoreU16(end, 1), BigInt(end), 2n],
    ["atomicLoadU16 in hole", () => mem.atomicLoadU16(end + 2), BigInt(end + 2), 2n],
    ["checkRange", () => mem.checkRange(K64, K64 + 1), BigInt(K64), BigInt(K64 + 1)],
  ];
  for (const [name, fn, address, length] of cases) {
    assert.throws(fn, isError("OUT_OF_RANGE", address, length), name);
  }
  const after = snapshot(regions);
  for (let i = 0; i < before.length; i++) assert.ok(before[i]?.equals(after[i] as Buffer), `region ${i} unchanged`);
  mem.close();
});

test("a read into a caller's buffer that fails leaves the buffer untouched", () => {
  const { mem } = layout();
  const into = new Uint8Array(8).fill(0x42);
  assert.throws(() => mem.read(2 * K64 - 4, into), GuestMemoryError);
  assert.deepEqual(into, new Uint8Array(8).fill(0x42));
  mem.close();
});

test("a read-only region is never written, even partly", () => {
  const rw = GuestMemoryRegion.memfd(0, K64);
  const ro = GuestMemoryRegion.memfd(K64, K64, { readonly: true });
  const mem = new GuestMemory([rw, ro]);
  assert.throws(() => mem.write(K64 - 4, new Uint8Array(8).fill(1)), isError("OUT_OF_RANGE", BigInt(K64 - 4), 8n));
  assert.throws(() => mem.writeU32(K64 + 4, 1), GuestMemoryError);
  assert.throws(() => mem.atomicStoreU16(K64 + 4, 1), GuestMemoryError);
  assert.deepEqual(mem.read(K64 - 4, 8), new Uint8Array(8), "neither the rw part nor the ro part was written");
  mem.close();
});

test("overlapping regions are rejected", () => {
  const a = GuestMemoryRegion.memfd(0, 2 * K64);
  const b = GuestMemoryRegion.memfd(K64, K64);
  assert.throws(
    () => new GuestMemory([a, b]),
    (e: unknown) => {
      assert.ok(e instanceof GuestMemoryError);
      assert.equal(e.code, "OVERLAP");
      assert.equal(e.address, BigInt(K64));
      assert.equal(e.length, BigInt(K64));
      return true;
    },
  );
  const c = GuestMemoryRegion.memfd(0, K64);
  assert.throws(() => new GuestMemory([c, GuestMemoryRegion.memfd(0, K64)]), { code: "OVERLAP" });
  a.close();
  b.close();
  c.close();
});

test("64-bit addresses above 2^53 are NOT_REPRESENTABLE with the exact value, never rounded", () => {
  const { mem } = layout();
  const huge = 0xffff_ffff_ffff_f000n;
  const notRepresentable = (e: unknown) => {
    assert.ok(e instanceof GuestMemoryError);
    assert.equal(e.code, "NOT_REPRESENTABLE");
    assert.equal(e.address, huge, "the address exactly as received");
    assert.match(e.message, /0xfffffffffffff000/);
    return true;
  };
  assert.throws(() => mem.read(huge, 8), notRepresentable);
  assert.throws(() => mem.write(huge, new Uint8Array(1)), notRepresentable);
  assert.throws(() => mem.readU64(huge), notRepresentable);
  assert.throws(() => mem.checkRange(huge, 1), notRepresentable);
  assert.throws(() => GuestAddress.from(huge), notRepresentable);
  assert.throws(() => GuestMemoryRegion.memfd(huge, K64), notRepresentable);
  // 2^53 itself: one past the exact range; as a number it is not a safe integer either.
  assert.throws(() => mem.read(2n ** 53n, 1), { code: "NOT_REPRESENTABLE" });
  assert.throws(() => mem.read(2 ** 53, 1), { code: "NOT_REPRESENTABLE" });
  assert.throws(() => mem.checkRange(0, 2n ** 64n - 1n), { code: "NOT_REPRESENTABLE" });
  assert.equal(mem.isValidRange(huge, 1), false);
  mem.close();
});

test("a range whose end overflows 2^53 is OUT_OF_RANGE, not wrapped", () => {
  const { mem } = layout();
  const a = Number.MAX_SAFE_INTEGER - 10;
  assert.throws(() => mem.checkRange(a, 100), isError("OUT_OF_RANGE", BigInt(a), 100n));
  assert.throws(() => mem.read(BigInt(a), 100), isError("OUT_OF_RANGE", BigInt(a), 100n));
  assert.equal(mem.isValidRange(a, 100), false);
  mem.close();
});

test("writes through GuestMemory mark the region's dirty bitmap", () => {
  const { mem, regions } = layout();
  const d0 = (regions[0] as GuestMemoryRegion).enableDirtyTracking();
  const d1 = (regions[1] as GuestMemoryRegion).enableDirtyTracking();
  mem.write(K64 - 4096 - 1, new Uint8Array(4098)); // last 4097 bytes of region 0, 1 byte of region 1
  mem.writeU32(K64 + 3 * 4096, 7);
  assert.deepEqual([...d0.snapshotAndClear()], [14, 15]);
  assert.deepEqual([...d1.snapshotAndClear()], [0, 3]);
  mem.close();
});

test("GuestMemoryRegion.file creates an owner-only (0600) file, whatever the umask lets through", () => {
  const d = mkdtempSync(join(tmpdir(), "vmshift-region-file-"));
  try {
    const path = join(d, "ram");
    const r = GuestMemoryRegion.file(path, 0, 1 << 20);
    try {
      assert.equal(statSync(path).mode & 0o777, 0o600);
    } finally {
      r.close();
    }
  } finally {
    rmSync(d, { recursive: true, force: true });
  }
});
