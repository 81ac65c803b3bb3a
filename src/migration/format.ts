/**
 * The vmshift migration stream, version 2 (docs/migration-stream.md is the reference).
 * All integers little-endian. A stream is a 16-byte header followed by records:
 *
 *   record = type u8 | flags u8 | reserved u16 (0) | length u32 | payload[length] | crc32 u32
 *
 * The CRC-32 (ISO-HDLC, zlib's) covers the 8 header bytes and the payload, so a flipped bit
 * anywhere in a record is caught before the record is applied. Layouts live only here; the
 * source, destination and snapshot code call these functions and never touch raw offsets.
 */
import { crc32 as zlibCrc32 } from "node:zlib";
import { crc32 as nativeCrc32 } from "../sys/record-receiver.js";
import { MigrationError } from "./errors.js";

/** Below this, node:zlib's CRC is as fast as the native call (and loads no native code). */
const NATIVE_CRC_MIN = 2048;

/** The stream's CRC-32 (ISO-HDLC, zlib's), continuing `seed`. */
export function crc32(data: Uint8Array, seed = 0): number {
  return data.length >= NATIVE_CRC_MIN ? nativeCrc32(data, seed) : zlibCrc32(data, seed);
}

export const STREAM_MAGIC = Buffer.from("VMSHIFT\0", "latin1");
/** 2: precopy SWITCHOVER/RESUMED before the digests; digests over per-page XXH64 hashes. */
export const STREAM_VERSION = 2;
export const STREAM_HEADER_SIZE = 16;
export const RECORD_HEADER_SIZE = 8;
export const RECORD_TRAILER_SIZE = 4;
export const RECORD_OVERHEAD = RECORD_HEADER_SIZE + RECORD_TRAILER_SIZE;
/** Largest payload a reader accepts: a length beyond it is corruption, not an allocation. */
export const MAX_PAYLOAD = 64 * 1024 * 1024;
/** Pages per PAGES record the source writes (a reader accepts any count that fits). */
export const PAGES_PER_RECORD = 256;

export enum RecordType {
  // source -> destination
  Capabilities = 0x01,
  Region = 0x02,
  Discard = 0x03,
  /** Postcopy recovery: this migration's nonce, after the REGIONs (with the RECOVERY capability). */
  Session = 0x04,
  Pages = 0x10,
  Round = 0x11,
  Switchover = 0x12,
  DeviceState = 0x20,
  Digest = 0x30,
  PostcopyAdvise = 0x40,
  PostcopyRun = 0x41,
  /** Postcopy preempt channel: its nonce, on the main stream and first on the channel itself. */
  Preempt = 0x42,
  /** The last record on the preempt channel: every page it carried was sent before it. */
  PreemptEnd = 0x43,
  /** The first record on a connection that resumes a paused postcopy: the session's nonce. */
  Recover = 0x44,
  Layout = 0x50,
  PageCrcs = 0x51,
  End = 0x7f,
  // destination -> source (return path)
  PageRequest = 0x81,
  Complete = 0x82,
  Fail = 0x83,
  Resumed = 0x84,
  /** Postcopy recovery: the pages the destination holds, one record per region. */
  Received = 0x85,
}

export const RECORD_NAMES: Record<number, string> = {
  1: "CAPABILITIES",
  2: "REGION",
  3: "DISCARD",
  4: "SESSION",
  16: "PAGES",
  17: "ROUND",
  18: "SWITCHOVER",
  32: "DEVICE_STATE",
  48: "DIGEST",
  64: "POSTCOPY_ADVISE",
  65: "POSTCOPY_RUN",
  66: "PREEMPT",
  67: "PREEMPT_END",
  68: "RECOVER",
  80: "LAYOUT",
  81: "PAGE_CRCS",
  127: "END",
  129: "PAGE_REQUEST",
  130: "COMPLETE",
  131: "FAIL",
  132: "RESUMED",
  133: "RECEIVED",
};

export function recordName(type: number): string {
  return RECORD_NAMES[type] ?? `0x${type.toString(16)}`;
}

/** CAPABILITIES bits. */
export const Capability = {
  ZERO_PAGES: 1 << 0,
  POSTCOPY: 1 << 1,
  DISCARD: 1 << 2,
  DIGEST: 1 << 3,
  /** A snapshot file: fixed page layout, PAGE_CRCS trailer instead of PAGES records. */
  SNAPSHOT: 1 << 4,
  /** Postcopy: requested pages travel on a second connection (QEMU's postcopy-preempt). */
  PREEMPT: 1 << 5,
  /** Postcopy: a lost connection pauses both sides until a new one resumes the migration. */
  RECOVERY: 1 << 6,
} as const;
export const KNOWN_CAPABILITIES = 0x7f;

/** Per-page flag in a PAGES record. */
export const PAGE_FLAG_ZERO = 1;

export const SHA256_SIZE = 32;

// ---------------------------------------------------------------------------------------------
// Stream header

export function encodeStreamHeader(): Buffer {
  const b = Buffer.alloc(STREAM_HEADER_SIZE);
  STREAM_MAGIC.copy(b, 0);
  b.writeUInt16LE(STREAM_VERSION, 8);
  b.writeUInt16LE(0, 10);
  b.writeUInt32LE(crc32(b.subarray(0, 12)), 12);
  return b;
}

export function checkStreamHeader(b: Uint8Array): void {
  const buf = Buffer.from(b.buffer, b.byteOffset, b.byteLength);
  if (!buf.subarray(0, 8).equals(STREAM_MAGIC))
    throw new MigrationError("BAD_HEADER", "not a vmshift migration stream (bad magic)", 0);
  if (buf.readUInt32LE(12) !== crc32(buf.subarray(0, 12)))
    throw new MigrationError("CORRUPT", "stream header checksum mismatch", 0);
  const version = buf.readUInt16LE(8);
  if (version !== STREAM_VERSION)
    throw new MigrationError("BAD_HEADER", `stream version ${version}, this side speaks ${STREAM_VERSION}`, 8, {
      version,
    });
}

// ---------------------------------------------------------------------------------------------
// Records

/** A record being built in place: fill `payload`, then seal() for the bytes to send. */
export class RecordBuilder {
  readonly bytes: Buffer;
  readonly payload: Buffer;
  readonly view: DataView;

  /** `into`: build the record at the start of this buffer when it is long enough (a pool's). */
  constructor(type: RecordType, length: number, flags = 0, into?: Buffer) {
    if (length > MAX_PAYLOAD) throw new RangeError(`record payload ${length} exceeds ${MAX_PAYLOAD}`);
    const size = RECORD_OVERHEAD + length;
    this.bytes = into && into.length >= size ? into.subarray(0, size) : Buffer.allocUnsafe(size);
    this.bytes.writeUInt8(type, 0);
    this.bytes.writeUInt8(flags, 1);
    this.bytes.writeUInt16LE(0, 2);
    this.bytes.writeUInt32LE(length, 4);
    this.payload = this.bytes.subarray(RECORD_HEADER_SIZE, RECORD_HEADER_SIZE + length);
    this.view = new DataView(this.payload.buffer, this.payload.byteOffset, length);
  }

  seal(): Buffer {
    const end = this.bytes.length - RECORD_TRAILER_SIZE;
    this.bytes.writeUInt32LE(crc32(this.bytes.subarray(0, end)), end);
    return this.bytes;
  }
}

export function encodeRecord(type: RecordType, payload: Uint8Array = new Uint8Array(0)): Buffer {
  const r = new RecordBuilder(type, payload.length);
  r.payload.set(payload);
  return r.seal();
}

export interface RecordHead {
  type: number;
  flags: number;
  length: number;
}

/** Parses and checks a record header; `offset` is its position in the stream (for errors). */
export function decodeRecordHead(h: Uint8Array, offset: number): RecordHead {
  const dv = new DataView(h.buffer, h.byteOffset, RECORD_HEADER_SIZE);
  const type = dv.getUint8(0);
  const flags = dv.getUint8(1);
  const reserved = dv.getUint16(2, true);
  const length = dv.getUint32(4, true);
  if (length > MAX_PAYLOAD)
    throw new MigrationError("CORRUPT", `record length ${length} exceeds ${MAX_PAYLOAD}`, offset, {
      type: recordName(type),
      length,
    });
  if (reserved !== 0)
    throw new MigrationError("CORRUPT", `record reserved field is ${reserved}`, offset, { type: recordName(type) });
  return { type, flags, length };
}

/**
 * Checks the CRC of a record received as its 8-byte header and the rest (payload + trailer),
 * without joining them: the CRC of the header seeds the CRC of the payload.
 */
export function checkRecordCrcParts(head: Uint8Array, rest: Uint8Array, offset: number): void {
  const end = rest.length - RECORD_TRAILER_SIZE;
  const r = Buffer.from(rest.buffer, rest.byteOffset, rest.byteLength);
  const want = r.readUInt32LE(end);
  const got = crc32(r.subarray(0, end), crc32(head));
  if (want !== got)
    throw new MigrationError("CORRUPT", `${recordName(head[0] as number)} record checksum mismatch`, offset, {
      type: recordName(head[0] as number),
      expected: want,
      actual: got,
    });
}

/** Checks the CRC of a whole record (header, payload, trailer). */
export function checkRecordCrc(whole: Uint8Array, offset: number): void {
  const end = whole.length - RECORD_TRAILER_SIZE;
  const b = Buffer.from(whole.buffer, whole.byteOffset, whole.byteLength);
  const want = b.readUInt32LE(end);
  const got = crc32(b.subarray(0, end));
  if (want !== got)
    throw new MigrationError("CORRUPT", `${recordName(b[0] as number)} record checksum mismatch`, offset, {
      type: recordName(b[0] as number),
      expected: want,
      actual: got,
    });
}

/** Bounds-checked payload reading: any read past the end is a BAD_RECORD at the record's offset. */
export class PayloadReader {
  #pos = 0;
  readonly #dv: DataView;
  constructor(
    readonly bytes: Uint8Array,
    readonly type: number,
    readonly offset: number,
  ) {
    this.#dv = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  }
  get pos(): number {
    return this.#pos;
  }
  get remaining(): number {
    return this.bytes.length - this.#pos;
  }
  #need(n: number): number {
    if (this.#pos + n > this.bytes.length) throw this.error(`payload too short (${this.bytes.length} bytes)`);
    const p = this.#pos;
    this.#pos += n;
    return p;
  }
  u8(): number {
    return this.#dv.getUint8(this.#need(1));
  }
  u16(): number {
    return this.#dv.getUint16(this.#need(2), true);
  }
  u32(): number {
    return this.#dv.getUint32(this.#need(4), true);
  }
  /** A u64 as a bigint (identifiers, not quantities). */
  u64big(): bigint {
    return this.#dv.getBigUint64(this.#need(8), true);
  }
  /** A u64 that must fit a JS number exactly (2^53). */
  u64(): number {
    const v = this.#dv.getBigUint64(this.#need(8), true);
    if (v > BigInt(Number.MAX_SAFE_INTEGER)) throw this.error(`64-bit value ${v} not representable`);
    return Number(v);
  }
  take(n: number): Uint8Array {
    const p = this.#need(n);
    return this.bytes.subarray(p, p + n);
  }
  /** Skips up to the next multiple of `a` bytes. */
  align(a: number): void {
    const pad = (a - (this.#pos % a)) % a;
    this.#need(pad);
  }
  end(): void {
    if (this.#pos !== this.bytes.length) throw this.error(`${this.bytes.length - this.#pos} trailing payload bytes`);
  }
  error(msg: string, details: Record<string, unknown> = {}): MigrationError {
    return new MigrationError("BAD_RECORD", `${recordName(this.type)}: ${msg}`, this.offset, details);
  }
}

// ---- CAPABILITIES

export interface Capabilities {
  capabilities: number;
  pageSize: number;
  regionCount: number;
  totalBytes: number;
}

export function encodeCapabilities(c: Capabilities): Buffer {
  const r = new RecordBuilder(RecordType.Capabilities, 20);
  r.view.setUint32(0, c.capabilities, true);
  r.view.setUint32(4, c.pageSize, true);
  r.view.setUint32(8, c.regionCount, true);
  r.view.setBigUint64(12, BigInt(c.totalBytes), true);
  return r.seal();
}

export function decodeCapabilities(p: PayloadReader): Capabilities {
  const c = { capabilities: p.u32(), pageSize: p.u32(), regionCount: p.u32(), totalBytes: p.u64() };
  p.end();
  if ((c.capabilities & ~KNOWN_CAPABILITIES) !== 0)
    throw new MigrationError("UNSUPPORTED", `unknown capability bits 0x${c.capabilities.toString(16)}`, p.offset, {
      capabilities: c.capabilities,
    });
  return c;
}

// ---- REGION

export interface RegionDescription {
  index: number;
  guestBase: number;
  size: number;
  pageSize: number;
}

export function encodeRegion(d: RegionDescription): Buffer {
  const r = new RecordBuilder(RecordType.Region, 24);
  r.view.setUint32(0, d.index, true);
  r.view.setUint32(4, d.pageSize, true);
  r.view.setBigUint64(8, BigInt(d.guestBase), true);
  r.view.setBigUint64(16, BigInt(d.size), true);
  return r.seal();
}

export function decodeRegion(p: PayloadReader): RegionDescription {
  const index = p.u32();
  const pageSize = p.u32();
  const guestBase = p.u64();
  const size = p.u64();
  p.end();
  return { index, guestBase, size, pageSize };
}

// ---- DISCARD

export interface DiscardDescription {
  region: number;
  blockSize: number;
  /** One byte per block: 1 plugged, 0 discarded. */
  states: Uint8Array;
}

export function encodeDiscard(d: DiscardDescription): Buffer {
  const r = new RecordBuilder(RecordType.Discard, 12 + d.states.length);
  r.view.setUint32(0, d.region, true);
  r.view.setUint32(4, d.blockSize, true);
  r.view.setUint32(8, d.states.length, true);
  r.payload.set(d.states, 12);
  return r.seal();
}

export function decodeDiscard(p: PayloadReader): DiscardDescription {
  const region = p.u32();
  const blockSize = p.u32();
  const n = p.u32();
  const states = p.take(n);
  p.end();
  return { region, blockSize, states };
}

// ---- PAGES: u32 region | u32 count | u32 page[count] | u8 flags[count] | pad to 4 | data

export function pagesPayloadSize(count: number, fullPages: number, pageSize: number): number {
  return 8 + count * 4 + align4(count) + fullPages * pageSize;
}

function align4(n: number): number {
  return (n + 3) & ~3;
}

/**
 * Builds a PAGES record for `pages` of a region. `source(page)` returns the page's bytes (a
 * view into guest memory); pages for which `isZero(page)` holds are sent as a flag only. The
 * data is copied once, from guest memory into the record (built in `into` when it is long
 * enough).
 */
export function encodePages(
  region: number,
  pages: ArrayLike<number>,
  pageSize: number,
  source: (page: number) => Uint8Array,
  isZero: (page: number) => boolean,
  gather?: (full: Uint32Array, count: number, into: Uint8Array) => void,
  into?: Buffer,
): { record: Buffer; zero: number; full: number } {
  const count = pages.length;
  const zeroFlags = new Uint8Array(count);
  const fullPages = new Uint32Array(count);
  let full = 0;
  for (let i = 0; i < count; i++) {
    if (isZero(pages[i] as number)) zeroFlags[i] = PAGE_FLAG_ZERO;
    else fullPages[full++] = pages[i] as number;
  }
  const r = new RecordBuilder(RecordType.Pages, pagesPayloadSize(count, full, pageSize), 0, into);
  r.view.setUint32(0, region, true);
  r.view.setUint32(4, count, true);
  let o = 8;
  for (let i = 0; i < count; i++, o += 4) r.view.setUint32(o, pages[i] as number, true);
  r.payload.set(zeroFlags, o);
  r.payload.fill(0, o + count, o + align4(count));
  o += align4(count);
  // A page found non-zero may since have become zero (or vice versa): it is dirty again and
  // goes in a later round, so what we copy now only needs to be some state the page had.
  if (gather) gather(fullPages, full, r.payload.subarray(o, o + full * pageSize));
  else for (let i = 0; i < full; i++, o += pageSize) r.payload.set(source(fullPages[i] as number), o);
  return { record: r.seal(), zero: count - full, full };
}

export interface PagesRecord {
  region: number;
  pages: Uint32Array;
  flags: Uint8Array;
  /** Start of each full page's data in `data` (-1 for zero pages). */
  data: Uint8Array;
  dataOffsets: Int32Array;
}

/** Decodes a PAGES record; checks the flags and that the data length matches them exactly. */
export function decodePages(p: PayloadReader, pageSize: number): PagesRecord {
  const region = p.u32();
  const count = p.u32();
  if (count * 4 > p.remaining) throw p.error(`page count ${count} does not fit the payload`, { count });
  const idx = p.take(count * 4);
  const pages = new Uint32Array(count);
  const dv = new DataView(idx.buffer, idx.byteOffset, idx.byteLength);
  for (let i = 0; i < count; i++) pages[i] = dv.getUint32(i * 4, true);
  const flags = p.take(count);
  p.align(4);
  const dataOffsets = new Int32Array(count);
  let full = 0;
  for (let i = 0; i < count; i++) {
    const f = flags[i] as number;
    if (f === PAGE_FLAG_ZERO) dataOffsets[i] = -1;
    else if (f === 0) dataOffsets[i] = full++ * pageSize;
    else throw p.error(`page ${pages[i]} has unknown flags 0x${f.toString(16)}`, { page: pages[i], flags: f });
  }
  if (p.remaining !== full * pageSize)
    throw p.error(`${p.remaining} data bytes for ${full} full pages of ${pageSize}`, { full, pageSize });
  const data = p.take(full * pageSize);
  return { region, pages, flags, data, dataOffsets };
}

// ---- ROUND

export function encodeRound(round: number, remainingBytes: number): Buffer {
  const r = new RecordBuilder(RecordType.Round, 12);
  r.view.setUint32(0, round, true);
  r.view.setBigUint64(4, BigInt(remainingBytes), true);
  return r.seal();
}

export function decodeRound(p: PayloadReader): { round: number; remainingBytes: number } {
  const v = { round: p.u32(), remainingBytes: p.u64() };
  p.end();
  return v;
}

// ---- DEVICE_STATE: u16 name length | name (utf-8) | blob

export function encodeDeviceState(name: string, blob: Uint8Array): Buffer {
  const n = Buffer.from(name, "utf8");
  if (n.length > 0xffff) throw new RangeError("device name too long");
  const r = new RecordBuilder(RecordType.DeviceState, 2 + n.length + blob.length);
  r.view.setUint16(0, n.length, true);
  r.payload.set(n, 2);
  r.payload.set(blob, 2 + n.length);
  return r.seal();
}

export function decodeDeviceState(p: PayloadReader): { name: string; blob: Uint8Array } {
  const n = p.u16();
  const name = Buffer.from(p.take(n)).toString("utf8");
  const blob = Uint8Array.from(p.take(p.remaining));
  return { name, blob };
}

// ---- DIGEST

export function encodeDigest(region: number, sha256: Uint8Array): Buffer {
  const r = new RecordBuilder(RecordType.Digest, 4 + SHA256_SIZE);
  r.view.setUint32(0, region, true);
  r.payload.set(sha256, 4);
  return r.seal();
}

export function decodeDigest(p: PayloadReader): { region: number; sha256: Uint8Array } {
  const region = p.u32();
  const sha256 = Uint8Array.from(p.take(SHA256_SIZE));
  p.end();
  return { region, sha256 };
}

// ---- POSTCOPY_ADVISE: u32 region | u32 pages | bitmap (one bit per page, LSB first)
// The pages the destination must drop (sent in precopy, dirtied since) and fetch again.

export function encodePostcopyAdvise(region: number, pages: number, bitmap: Uint8Array): Buffer {
  const r = new RecordBuilder(RecordType.PostcopyAdvise, 8 + bitmap.length);
  r.view.setUint32(0, region, true);
  r.view.setUint32(4, pages, true);
  r.payload.set(bitmap, 8);
  return r.seal();
}

export function decodePostcopyAdvise(p: PayloadReader): { region: number; pages: number; bitmap: Uint8Array } {
  const region = p.u32();
  const pages = p.u32();
  const bitmap = p.take(p.remaining);
  if (bitmap.length !== Math.ceil(pages / 8))
    throw p.error(`bitmap of ${bitmap.length} bytes for ${pages} pages`, { pages, bytes: bitmap.length });
  return { region, pages, bitmap };
}

// ---- PREEMPT: u64 nonce (pairs the second connection with this stream)

export function encodePreempt(nonce: bigint): Buffer {
  const r = new RecordBuilder(RecordType.Preempt, 8);
  r.view.setBigUint64(0, nonce, true);
  return r.seal();
}

export function decodePreempt(p: PayloadReader): bigint {
  const v = p.u64big();
  p.end();
  return v;
}

// ---- SESSION / RECOVER: u64 nonce

export function encodeNonce(type: RecordType.Session | RecordType.Recover, nonce: bigint): Buffer {
  const r = new RecordBuilder(type, 8);
  r.view.setBigUint64(0, nonce, true);
  return r.seal();
}

// ---- RECEIVED: u32 region | u32 pages | bitmap (LSB first) of the pages the destination holds

export function encodeReceived(region: number, pages: number, bitmap: Uint8Array): Buffer {
  const r = new RecordBuilder(RecordType.Received, 8 + bitmap.length);
  r.view.setUint32(0, region, true);
  r.view.setUint32(4, pages, true);
  r.payload.set(bitmap, 8);
  return r.seal();
}

export const decodeReceived = decodePostcopyAdvise;

// ---- PAGE_REQUEST: u32 region | u32 page | u32 count

export function encodePageRequest(region: number, page: number, count = 1): Buffer {
  const r = new RecordBuilder(RecordType.PageRequest, 12);
  r.view.setUint32(0, region, true);
  r.view.setUint32(4, page, true);
  r.view.setUint32(8, count, true);
  return r.seal();
}

export function decodePageRequest(p: PayloadReader): { region: number; page: number; count: number } {
  const v = { region: p.u32(), page: p.u32(), count: p.u32() };
  p.end();
  return v;
}

// ---- COMPLETE: u8 status (0 ok, 1 digest mismatch) | u32 regions | sha256[regions]

export function encodeComplete(ok: boolean, digests: Uint8Array[]): Buffer {
  const r = new RecordBuilder(RecordType.Complete, 5 + digests.length * SHA256_SIZE);
  r.view.setUint8(0, ok ? 0 : 1);
  r.view.setUint32(1, digests.length, true);
  digests.forEach((d, i) => {
    r.payload.set(d, 5 + i * SHA256_SIZE);
  });
  return r.seal();
}

export function decodeComplete(p: PayloadReader): { ok: boolean; digests: Uint8Array[] } {
  const status = p.u8();
  const n = p.u32();
  if (n * SHA256_SIZE !== p.remaining) throw p.error(`${n} digests in ${p.remaining} bytes`);
  const digests: Uint8Array[] = [];
  for (let i = 0; i < n; i++) digests.push(Uint8Array.from(p.take(SHA256_SIZE)));
  return { ok: status === 0, digests };
}

// ---- FAIL: u16 code length | code | message

/** Bytes of a FAIL record's message kept on decode (the encoder sends at most 4000 characters). */
export const MAX_FAIL_TEXT = 16 * 1024;

export function encodeFail(code: string, message: string): Buffer {
  const c = Buffer.from(code, "utf8");
  const m = Buffer.from(message.slice(0, 4000), "utf8");
  const r = new RecordBuilder(RecordType.Fail, 2 + c.length + m.length);
  r.view.setUint16(0, c.length, true);
  r.payload.set(c, 2);
  r.payload.set(m, 2 + c.length);
  return r.seal();
}

export function decodeFail(p: PayloadReader): { code: string; message: string } {
  const n = p.u16();
  const code = Buffer.from(p.take(n)).toString("utf8");
  // A peer may send up to MAX_PAYLOAD of text: keep what encodeFail would have sent.
  const message = Buffer.from(p.take(p.remaining).subarray(0, MAX_FAIL_TEXT)).toString("utf8");
  return { code, message };
}

// ---- LAYOUT (snapshot files): u64 trailer offset | u32 regions | u64 data offset[regions]

export function encodeLayout(trailerOffset: number, dataOffsets: number[]): Buffer {
  const r = new RecordBuilder(RecordType.Layout, 12 + dataOffsets.length * 8);
  r.view.setBigUint64(0, BigInt(trailerOffset), true);
  r.view.setUint32(8, dataOffsets.length, true);
  dataOffsets.forEach((o, i) => {
    r.view.setBigUint64(12 + i * 8, BigInt(o), true);
  });
  return r.seal();
}

export function decodeLayout(p: PayloadReader): { trailerOffset: number; dataOffsets: number[] } {
  const trailerOffset = p.u64();
  const n = p.u32();
  const dataOffsets: number[] = [];
  for (let i = 0; i < n; i++) dataOffsets.push(p.u64());
  p.end();
  return { trailerOffset, dataOffsets };
}

// ---- PAGE_CRCS (snapshot files): u32 region | u32 pages | u32 crc[pages] | zero bitmap
// crc of each stored page; the zero bitmap marks pages stored as holes (all zero).

export function encodePageCrcs(region: number, crcs: Uint32Array, zero: Uint8Array): Buffer {
  const r = new RecordBuilder(RecordType.PageCrcs, 8 + crcs.length * 4 + zero.length);
  r.view.setUint32(0, region, true);
  r.view.setUint32(4, crcs.length, true);
  for (let i = 0; i < crcs.length; i++) r.view.setUint32(8 + i * 4, crcs[i] as number, true);
  r.payload.set(zero, 8 + crcs.length * 4);
  return r.seal();
}

export function decodePageCrcs(p: PayloadReader): { region: number; crcs: Uint32Array; zero: Uint8Array } {
  const region = p.u32();
  const n = p.u32();
  if (n * 4 + Math.ceil(n / 8) !== p.remaining) throw p.error(`${n} page checksums in ${p.remaining} bytes`);
  const raw = p.take(n * 4);
  const dv = new DataView(raw.buffer, raw.byteOffset, raw.byteLength);
  const crcs = new Uint32Array(n);
  for (let i = 0; i < n; i++) crcs[i] = dv.getUint32(i * 4, true);
  const zero = Uint8Array.from(p.take(Math.ceil(n / 8)));
  return { region, crcs, zero };
}

export function pageCrc(page: Uint8Array): number {
  return crc32(page);
}
export const decodeNonce = decodePreempt;
