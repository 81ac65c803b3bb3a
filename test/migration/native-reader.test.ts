/**
 * NativeRecordReader (the destination's precopy stream read on a native thread) against the JS
 * RecordReader as the oracle: over a real TCP connection, the same records (type, offset,
 * payload) whatever way the bytes are split across reads, and for a damaged stream the same
 * error (code, message, offset). Plus what only the native reader does: records are read in
 * place (a view into the shared ring, no copy) unless longer than a slot, full pages are
 * hashed on the thread, and nothing leaks.
 */
import assert from "node:assert/strict";
import type { Socket } from "node:net";
import { Duplex } from "node:stream";
import { test } from "node:test";
import { crc32 as zlibCrc32 } from "node:zlib";
import { RecordReader, type StreamReader } from "../../src/migration/channel.js";
import { MigrationError } from "../../src/migration/errors.js";
import {
  encodeCapabilities,
  encodeDeviceState,
  encodePages,
  encodeRecord,
  encodeRound,
  encodeStreamHeader,
  RecordType,
  STREAM_HEADER_SIZE,
} from "../../src/migration/format.js";
import { NativeRecordReader } from "../../src/migration/native-reader.js";
import { hashPages } from "../../src/sys/bulk.js";
import { crc32 } from "../../src/sys/record-receiver.js";
import { countFds, recordOffsets, socketPair } from "./helpers.js";

const PAGE = 4096;

/** A small stream: CAPABILITIES, ROUND, PAGES (3 full pages, 1 zero), END. */
function smallStream(): Buffer {
  const pages = [4, 5, 6, 9];
  const data = (p: number) => new Uint8Array(PAGE).fill(p * 7 + 1);
  return Buffer.concat([
    encodeStreamHeader(),
    encodeCapabilities({ capabilities: 1, pageSize: PAGE, regionCount: 1, totalBytes: 1 << 20 }),
    encodeRound(1, 12345),
    encodePages(0, pages, PAGE, data, (p) => p === 5).record,
    encodeRecord(RecordType.End),
  ]);
}

/** The small stream with a DEVICE_STATE longer than a ring slot (1.5 MiB) before END. */
function streamWithBigRecord(): Buffer {
  const s = smallStream();
  const endAt = s.length - 12;
  const blob = new Uint8Array(1536 * 1024).map((_, i) => (i * 13) & 0xff);
  return Buffer.concat([s.subarray(0, endAt), encodeDeviceState("big", blob), s.subarray(endAt)]);
}

interface Got {
  records: { type: number; offset: number; payload: Buffer; inRing: boolean; hashes: Uint32Array | null }[];
  error: MigrationError | null;
}

async function drain(reader: StreamReader): Promise<Got> {
  const got: Got = { records: [], error: null };
  for (;;) {
    try {
      const r = await reader.next();
      got.records.push({
        type: r.type,
        offset: r.offset,
        payload: Buffer.from(r.payload.bytes),
        inRing: r.payload.bytes.buffer instanceof SharedArrayBuffer,
        hashes: r.pageHashes ? r.pageHashes.slice() : null,
      });
      if (r.type === RecordType.End) return got;
    } catch (e) {
      assert.ok(e instanceof MigrationError, `not a MigrationError: ${e}`);
      got.error = e;
      return got;
    }
  }
}

/** The oracle: the JS reader over an in-memory stream of the same bytes. */
async function viaJs(bytes: Buffer): Promise<Got> {
  const stream = new Duplex({
    read() {},
    write(_c, _e, cb) {
      cb();
    },
  });
  stream.push(bytes);
  stream.push(null);
  const reader = new RecordReader(stream);
  try {
    await reader.readStreamHeader();
    return await drain(reader);
  } finally {
    reader.detach();
    stream.destroy();
  }
}

function write(s: Socket, b: Uint8Array): Promise<void> {
  return new Promise((resolve, reject) => s.write(b, (e) => (e ? reject(e) : resolve())));
}

/**
 * The native reader over TCP: the JS reader takes the stream header (and whatever came with
 * it), the native one the rest. `pieces`: how the bytes after the header are written (each
 * write flushed and the event loop turned before the next).
 */
async function viaNative(bytes: Buffer, pieces: (rest: Buffer) => Buffer[] = (r) => [r]): Promise<Got> {
  const [a, b] = await socketPair();
  try {
    await write(a, bytes.subarray(0, STREAM_HEADER_SIZE));
    const js = new RecordReader(b, { reuseBuffer: true });
    await js.readStreamHeader();
    assert.ok(NativeRecordReader.canRead(b));
    const reader = NativeRecordReader.takeOver(b, js, { hashPages: true });
    const sending = (async () => {
      for (const p of pieces(bytes.subarray(STREAM_HEADER_SIZE))) {
        await write(a, p);
        await new Promise((r) => setImmediate(r));
      }
      a.end();
    })();
    try {
      const got = await drain(reader);
      await sending.catch(() => undefined);
      // Received bytes go on counting on the socket (node:net's before the takeover, the
      // thread's after it): a whole stream read is all of it.
      if (!got.error) assert.equal(b.bytesRead, bytes.length, "socket.bytesRead");
      return got;
    } finally {
      reader.detach();
    }
  } finally {
    a.destroy();
    b.destroy();
  }
}

function assertSameRecords(got: Got, want: Got): void {
  assert.deepEqual(
    got.records.map((r) => [r.type, r.offset, r.payload.toString("hex")]),
    want.records.map((r) => [r.type, r.offset, r.payload.toString("hex")]),
  );
}

function assertSameError(got: Got, want: Got, what: string): void {
  assert.ok(want.error, `${what}: the JS reader found no error`);
  assert.ok(got.error, `${what}: the native reader found no error (JS: ${want.error.message})`);
  assert.equal(got.error.code, want.error.code, what);
  assert.equal(got.error.offset, want.error.offset, what);
  assert.equal(got.error.message, want.error.message, what);
  assertSameRecords(got, want);
}

test("native reader: the same records as the JS reader, the stream written in one piece", async () => {
  const s = smallStream();
  const want = await viaJs(s);
  assert.equal(want.error, null);
  const got = await viaNative(s);
  assert.equal(got.error, null);
  assertSameRecords(got, want);
  // Read in place: every payload is a view into the shared ring, none was joined or copied.
  assert.ok(got.records.every((r) => r.inRing));
});

test("native reader: records split at every byte boundary across reads (one byte per write)", async () => {
  const s = smallStream();
  const want = await viaJs(s);
  const got = await viaNative(s, (rest) => [...rest].map((v) => Buffer.of(v)));
  assert.equal(got.error, null);
  assertSameRecords(got, want);
});

test("native reader: a record longer than a ring slot is handed over whole (copied out once)", async () => {
  const s = streamWithBigRecord();
  const want = await viaJs(s);
  // In uneven pieces, so the long record spans many reads.
  const got = await viaNative(s, (rest) => {
    const out: Buffer[] = [];
    for (let o = 0, k = 1; o < rest.length; o += k, k = (k * 7 + 3) % 200_000) out.push(rest.subarray(o, o + k));
    return out;
  });
  assert.equal(got.error, null);
  assertSameRecords(got, want);
  const big = got.records.find((r) => r.type === RecordType.DeviceState);
  assert.ok(big && !big.inRing && big.payload.length > 1536 * 1024);
  assert.ok(got.records.filter((r) => r.type !== RecordType.DeviceState).every((r) => r.inRing));
});

test("native reader: PAGES records carry the XXH64 of each full page, computed on the thread", async () => {
  const got = await viaNative(smallStream());
  const pages = got.records.find((r) => r.type === RecordType.Pages);
  assert.ok(pages?.hashes);
  // 4 pages, one zero: 3 full pages of data at the end of the payload.
  assert.equal(pages.hashes.length, 6);
  const data = pages.payload.subarray(pages.payload.length - 3 * PAGE);
  const want = new Uint32Array(6);
  hashPages(data, null, 3, PAGE, want);
  assert.deepEqual([...pages.hashes], [...want]);
  // Other records carry none.
  assert.ok(got.records.filter((r) => r.type !== RecordType.Pages).every((r) => r.hashes === null));
});

test("native reader: a flipped bit, a bad header or a cut gives the JS reader's error at the same offset", async () => {
  const s = smallStream();
  const offsets = recordOffsets(s);
  const cases: [string, Buffer][] = [];
  for (const o of offsets) {
    const len = s.readUInt32LE(o + 4);
    // Every header byte (type, flags, reserved, length), payload bytes, the CRC trailer.
    for (const at of [o, o + 1, o + 2, o + 3, o + 4, o + 7, o + 8, o + 8 + Math.floor(len / 2), o + 8 + len + 3]) {
      if (at >= s.length) continue;
      for (const bit of [0, 7]) {
        const b = Buffer.from(s);
        b[at] = (b[at] as number) ^ (1 << bit);
        cases.push([`bit ${bit} of byte ${at} (record at ${o})`, b]);
      }
    }
    // Cut inside the header, inside the payload, before the trailer's last byte.
    for (const at of [o + 3, o + 8 + Math.floor(len / 3), o + 8 + len + 3])
      if (at < s.length) cases.push([`cut at ${at}`, s.subarray(0, at)]);
  }
  // A cut exactly between two records.
  cases.push([`cut at ${offsets[2]}`, s.subarray(0, offsets[2])]);
  const before = countFds();
  for (const [what, bytes] of cases) {
    const want = await viaJs(bytes);
    if (!want.error) continue; // a flip the format cannot see (none expected; the CRC covers all)
    const got = await viaNative(bytes);
    assertSameError(got, want, what);
  }
  assert.equal(countFds(), before, "fds leaked");
});

test("native reader: detached mid-stream, the thread stops and its fds close", async () => {
  const before = countFds();
  const [a, b] = await socketPair();
  const s = smallStream();
  // The header and CAPABILITIES (8 + 20 + 4 bytes), and no more.
  await write(a, s.subarray(0, STREAM_HEADER_SIZE + 32));
  const js = new RecordReader(b, { reuseBuffer: true });
  await js.readStreamHeader();
  const reader = NativeRecordReader.takeOver(b, js, { hashPages: false });
  try {
    const first = await reader.next();
    assert.equal(first.type, RecordType.Capabilities);
  } finally {
    // The thread now waits on the socket for the next record: detach must not wait for it.
    reader.detach();
    a.destroy();
    b.destroy();
  }
  await new Promise((r) => setImmediate(r));
  assert.equal(countFds(), before);
});

test("the stream CRC: the native CRC-32 equals zlib's for every length, alignment and seed", () => {
  const buf = Buffer.alloc(1 << 20);
  for (let i = 0; i < buf.length; i++) buf[i] = (i * 2654435761) >>> 24;
  for (let n = 0; n <= 300; n++)
    for (const off of [0, 1, 5, 15])
      for (const seed of [0, 0xdeadbeef]) {
        const v = buf.subarray(off, off + n);
        assert.equal(crc32(v, seed), zlibCrc32(v, seed), `length ${n} at ${off} seed ${seed}`);
      }
  for (const n of [4095, 4096, 4097, 65536 + 48, buf.length - 3])
    assert.equal(crc32(buf.subarray(3, 3 + n)), zlibCrc32(buf.subarray(3, 3 + n)), `length ${n}`);
  // Continuing a CRC over pieces equals the CRC of the whole.
  const whole = crc32(buf);
  assert.equal(crc32(buf.subarray(100_000), crc32(buf.subarray(0, 100_000))), whole);
});
