/**
 * Property-based fuzzing of the migration stream's destination (fast-check): a real precopy
 * stream is captured once, then bytes are flipped, cut, inserted, and record payloads rewritten
 * with a valid CRC (so the field checks behind the CRC are reached too). The destination must
 * fail with a MigrationError (or, for a mutation it cannot tell from a valid stream, complete),
 * never throw anything else, never hang, and leak no fd.
 *
 * A fixed seed and a bounded number of runs here; `npm run fuzz -- RUNS` runs longer.
 */
import assert from "node:assert/strict";
import { Duplex } from "node:stream";
import { test } from "node:test";
import { crc32 } from "node:zlib";
import fc from "fast-check";
import { DiscardMap } from "../../src/memory/discard-map.js";
import { GuestMemory } from "../../src/memory/guest-memory.js";
import { GuestMemoryRegion } from "../../src/memory/region.js";
import { MigrationDestination } from "../../src/migration/destination.js";
import { MigrationError } from "../../src/migration/errors.js";
import { MigrationSource } from "../../src/migration/source.js";
import { countFds, proxyPair, recordOffsets, settle } from "./helpers.js";

const RUNS = Math.max(1, Math.floor(Number(process.env.VMSHIFT_FUZZ_RUNS ?? 3000) / 10));
const SEED = Number(process.env.VMSHIFT_FUZZ_SEED ?? 0x5eed);
const KiB = 1024;

function memory(): GuestMemory {
  return new GuestMemory([
    GuestMemoryRegion.memfd(0, 256 * KiB, { name: "fuzz-0" }),
    GuestMemoryRegion.memfd(1024 * KiB, 128 * KiB, { name: "fuzz-1" }),
  ]);
}

/** A captured precopy stream: non-zero and zero pages, a discard map, a device state. */
async function capture(): Promise<Buffer> {
  const src = memory();
  const dst = memory();
  const r0 = src.regions[0] as GuestMemoryRegion;
  const map = new DiscardMap(r0.size, 64 * KiB);
  map.discard(64 * KiB, 64 * KiB);
  for (let off = 0; off < src.size; off += 8192) {
    const gpa = off < 256 * KiB ? off : 1024 * KiB + (off - 256 * KiB);
    if (!map.isDiscarded(gpa) || gpa >= 256 * KiB) src.fill(gpa, 4096, (off >> 12) & 0xff);
  }
  const px = await proxyPair();
  await Promise.all([
    new MigrationSource({
      memory: src,
      discard: new Map([[r0, map]]),
      hooks: { saveDeviceState: () => [{ name: "dev", blob: Uint8Array.of(1, 2, 3, 4) }] },
    }).run(px.source),
    new MigrationDestination({ memory: dst }).run(px.destination),
  ]);
  src.close();
  dst.close();
  return px.captured();
}

/** Feeds `bytes` to a destination over an in-memory duplex; what it writes back is dropped. */
async function feed(bytes: Buffer): Promise<unknown> {
  const mem = memory();
  const stream = new Duplex({
    read() {},
    write(_c, _e, cb) {
      cb();
    },
  });
  stream.push(bytes);
  stream.push(null);
  try {
    return await new MigrationDestination({ memory: mem }).run(stream);
  } finally {
    stream.destroy();
    mem.close();
  }
}

type Mutation =
  | { kind: "flip"; at: number; bit: number }
  | { kind: "cut"; at: number }
  | { kind: "insert"; at: number; bytes: Uint8Array }
  | { kind: "payload"; record: number; at: number; value: number }
  | { kind: "length"; record: number; delta: number };

function mutate(s: Buffer, m: Mutation, offsets: number[]): Buffer {
  const b = Buffer.from(s);
  if (b.length === 0) return b;
  // Record mutations apply to records the (possibly cut) stream still holds whole.
  const whole = offsets.filter((o) => o + 12 <= b.length && o + 12 + b.readUInt32LE(o + 4) <= b.length);
  switch (m.kind) {
    case "flip":
      b[m.at % b.length] = (b[m.at % b.length] as number) ^ (1 << m.bit);
      return b;
    case "cut":
      return b.subarray(0, m.at % b.length);
    case "insert": {
      const at = m.at % b.length;
      return Buffer.concat([b.subarray(0, at), m.bytes, b.subarray(at)]);
    }
    case "payload": {
      // A payload byte changed and the record's CRC made right again: the field checks must hold.
      if (whole.length === 0) return b;
      const o = whole[m.record % whole.length] as number;
      const len = b.readUInt32LE(o + 4);
      if (len === 0) return b;
      b[o + 8 + (m.at % len)] = m.value;
      b.writeUInt32LE(crc32(b.subarray(o, o + 8 + len)), o + 8 + len);
      return b;
    }
    case "length": {
      // The length field rewritten (CRC then fails, or the stream ends inside the record).
      if (whole.length === 0) return b;
      const o = whole[m.record % whole.length] as number;
      b.writeUInt32LE(Math.max(0, b.readUInt32LE(o + 4) + m.delta) >>> 0, o + 4);
      return b;
    }
  }
}

const mutation: fc.Arbitrary<Mutation> = fc.oneof(
  fc.record({ kind: fc.constant("flip" as const), at: fc.nat(), bit: fc.nat({ max: 7 }) }),
  fc.record({ kind: fc.constant("cut" as const), at: fc.nat() }),
  fc.record({
    kind: fc.constant("insert" as const),
    at: fc.nat(),
    bytes: fc.uint8Array({ minLength: 1, maxLength: 24 }),
  }),
  fc.record({ kind: fc.constant("payload" as const), record: fc.nat(), at: fc.nat(), value: fc.nat({ max: 255 }) }),
  fc.record({ kind: fc.constant("length" as const), record: fc.nat(), delta: fc.integer({ min: -64, max: 64 }) }),
);

test("a mutated migration stream: the destination fails with a MigrationError or completes, nothing else", async () => {
  const stream = await capture();
  const offsets = recordOffsets(stream);
  assert.ok(offsets.length > 10, "the captured stream has records");
  // The unmutated stream is accepted as it is.
  await feed(stream);
  await settle();
  const fds = countFds();
  const codes = new Map<string, number>();
  await fc.assert(
    fc.asyncProperty(fc.array(mutation, { minLength: 1, maxLength: 3 }), async (ms) => {
      let b = stream;
      for (const m of ms) b = mutate(b, m, offsets);
      try {
        await feed(b);
        codes.set("ok", (codes.get("ok") ?? 0) + 1);
      } catch (e) {
        if (!(e instanceof MigrationError)) throw new Error(`not a MigrationError: ${(e as Error).stack}`);
        codes.set(e.code, (codes.get(e.code) ?? 0) + 1);
      }
    }),
    { numRuns: RUNS, seed: SEED },
  );
  await settle();
  assert.equal(countFds(), fds, "no fd leaked");
  console.log(JSON.stringify(Object.fromEntries(codes)));
  assert.ok((codes.get("CORRUPT") ?? 0) > 0 && (codes.get("TRUNCATED") ?? 0) > 0, "both CRC and truncation paths ran");
});
