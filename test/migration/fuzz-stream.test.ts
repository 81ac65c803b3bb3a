/**
 * Property-based fuzzing of the migration stream's destination (fast-check): a real precopy
 * stream is captured once, then bytes are flipped, cut, inserted, and record payloads rewritten
 * with a valid CRC (so the field checks behind the CRC are reached too). The destination must
 * fail with the MigrationError code the mutation calls for (the oracle below, per mutation
 * class, with the offset of the record at fault), or, for a mutation it cannot tell from a
 * valid stream, complete; never throw anything else, never hang, and leak no fd. Nothing fed
 * from memory may ever look like a lost connection (CONNECTION_LOST: recovery keys on it).
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
import { encodeDiscard, RecordType, STREAM_HEADER_SIZE } from "../../src/migration/format.js";
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
    return await new MigrationDestination({
      memory: mem,
      hooks: {
        // A device that checks the state it is given, as a real one does (a bad blob is refused).
        loadDeviceState: (s) => {
          if (s.name !== "dev" || s.blob.length !== 4 || s.blob.some((v, i) => v !== i + 1))
            throw new Error(`device state ${JSON.stringify(s.name)} of ${s.blob.length} bytes refused`);
        },
      },
    }).run(stream);
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

type Outcome = { code: string; offset: number | undefined };

/** The offset of the record holding stream byte `pos` (the last record starting at or before it). */
function recordAt(offsets: number[], pos: number): number {
  let o = offsets[0] as number;
  for (const x of offsets) if (x <= pos) o = x;
  return o;
}

/**
 * The oracle: what one mutation of the captured stream must produce. `null` when the outcome
 * is right, else what is wrong with it.
 */
function judge(m: Mutation, s: Buffer, offsets: number[], got: Outcome): string | null {
  const one = (codes: string[], offset?: number) => {
    if (!codes.includes(got.code)) return `code ${got.code}, expected one of ${codes.join(", ")}`;
    if (offset !== undefined && got.code === "CORRUPT" && got.offset !== offset)
      return `CORRUPT at ${got.offset}, expected at ${offset}`;
    return null;
  };
  switch (m.kind) {
    case "cut":
      return one(["TRUNCATED"]);
    case "flip": {
      const at = m.at % s.length;
      if (at < STREAM_HEADER_SIZE) return one(["BAD_HEADER", "CORRUPT"]);
      const o = recordAt(offsets, at);
      // A flipped length bit can make the record run past the end of the stream.
      return one(at >= o + 4 && at < o + 8 ? ["CORRUPT", "TRUNCATED"] : ["CORRUPT"], o);
    }
    case "length": {
      const o = offsets[m.record % offsets.length] as number;
      if (m.delta === 0 || s.readUInt32LE(o + 4) + m.delta < 0) return null; // unchanged or clamped: either way
      return one(["CORRUPT", "TRUNCATED"], o);
    }
    case "insert": {
      const at = m.at % s.length;
      if (at < STREAM_HEADER_SIZE) return one(["BAD_HEADER", "CORRUPT"]);
      return one(["CORRUPT", "TRUNCATED"], recordAt(offsets, at));
    }
    case "payload": {
      // Valid CRC: the field checks behind it speak, at the record they reject (a changed
      // discard map or capability can make a later record the bad one), or the memory differs.
      const o = offsets[m.record % offsets.length] as number;
      const codes = ["ok", "BAD_RECORD", "BAD_PAGE", "REGION_MISMATCH", "UNSUPPORTED", "DIGEST_MISMATCH"];
      if (!codes.includes(got.code)) return `code ${got.code}, expected one of ${codes.join(", ")}`;
      if (got.code === "ok" || got.code === "DIGEST_MISMATCH") return null;
      if (got.offset === undefined || got.offset < o)
        return `${got.code} at ${got.offset}, the mutated record is at ${o}`;
      // A layout that does not match is the record that describes it.
      if ((got.code === "REGION_MISMATCH" || got.code === "UNSUPPORTED") && got.offset !== o)
        return `${got.code} at ${got.offset}, the mutated record is at ${o}`;
      return null;
    }
  }
}

async function outcome(b: Buffer): Promise<Outcome> {
  try {
    await feed(b);
    return { code: "ok", offset: undefined };
  } catch (e) {
    if (!(e instanceof MigrationError)) throw new Error(`not a MigrationError: ${(e as Error).stack}`);
    return { code: e.code, offset: e.offset };
  }
}

test("one mutation: the destination fails with the code its class calls for, at the record at fault", async () => {
  const stream = await capture();
  const offsets = recordOffsets(stream);
  assert.ok(offsets.length > 10, "the captured stream has records");
  assert.equal((await outcome(stream)).code, "ok", "the unmutated stream is accepted as it is");
  await settle();
  const fds = countFds();
  const codes = new Map<string, number>();
  await fc.assert(
    fc.asyncProperty(mutation, async (m) => {
      const got = await outcome(mutate(stream, m, offsets));
      codes.set(`${m.kind}:${got.code}`, (codes.get(`${m.kind}:${got.code}`) ?? 0) + 1);
      const wrong = judge(m, stream, offsets, got);
      if (wrong) throw new Error(`${JSON.stringify(m)}: ${wrong}`);
    }),
    { numRuns: RUNS, seed: SEED },
  );
  await settle();
  assert.ok(countFds() <= fds, "no fd leaked"); // a leak is growth (the runtime may close one of its own fds meanwhile)
  console.log(JSON.stringify(Object.fromEntries(codes)));
  assert.ok((codes.get("flip:CORRUPT") ?? 0) > 0 && (codes.get("cut:TRUNCATED") ?? 0) > 0, "CRC and truncation ran");
});

test("several mutations: a MigrationError (never CONNECTION_LOST) or completion, nothing else", async () => {
  const stream = await capture();
  const offsets = recordOffsets(stream);
  await settle();
  const fds = countFds();
  const codes = new Map<string, number>();
  await fc.assert(
    fc.asyncProperty(fc.array(mutation, { minLength: 2, maxLength: 3 }), async (ms) => {
      let b = stream;
      for (const m of ms) b = mutate(b, m, offsets);
      const got = await outcome(b);
      codes.set(got.code, (codes.get(got.code) ?? 0) + 1);
      assert.notEqual(
        got.code,
        "CONNECTION_LOST",
        `${JSON.stringify(ms)}: a stream from memory never loses its connection`,
      );
    }),
    { numRuns: RUNS, seed: SEED },
  );
  await settle();
  assert.ok(countFds() <= fds, "no fd leaked"); // a leak is growth (the runtime may close one of its own fds meanwhile)
  console.log(JSON.stringify(Object.fromEntries(codes)));
});

/** The captured stream with the record at `o` replaced by `record` (and, optionally, repeated). */
function replaceRecord(s: Buffer, o: number, record: Buffer, times = 1): Buffer {
  const end = o + 12 + s.readUInt32LE(o + 4);
  return Buffer.concat([s.subarray(0, o), ...Array.from({ length: times }, () => record), s.subarray(end)]);
}

test("a DISCARD record whose block size is not whole pages: BAD_RECORD at its offset, before any block is dropped", async () => {
  const stream = await capture();
  const offsets = recordOffsets(stream);
  const o = offsets.find((x) => stream[x] === RecordType.Discard);
  assert.ok(o !== undefined, "the capture has a discard map");
  // 512-byte blocks (a power of two, so DiscardMap takes them): the second map would madvise
  // 512-byte ranges, which the kernel refuses (EINVAL) after earlier blocks were dropped.
  const states = new Uint8Array((256 * KiB) / 512).fill(1);
  states.fill(0, 0, 8);
  const bad = encodeDiscard({ region: 0, blockSize: 512, states });
  const got = await outcome(replaceRecord(stream, o, bad, 2));
  assert.deepEqual(got, { code: "BAD_RECORD", offset: o });
});

test("a device-state blob the device refuses: BAD_RECORD at the DEVICE_STATE record's offset", async () => {
  const stream = await capture();
  const offsets = recordOffsets(stream);
  const o = offsets.find((x) => stream[x] === RecordType.DeviceState);
  assert.ok(o !== undefined, "the capture has a device state");
  const b = Buffer.from(stream);
  const len = b.readUInt32LE(o + 4);
  b[o + 8 + len - 1] = 9; // the blob's last byte (CRC made right again)
  b.writeUInt32LE(crc32(b.subarray(o, o + 8 + len)), o + 8 + len);
  assert.deepEqual(await outcome(b), { code: "BAD_RECORD", offset: o });
});
