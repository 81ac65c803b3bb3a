/**
 * Records over a byte stream (a node:net Socket for TCP, unix sockets and inherited fds, or a
 * file). RecordReader counts every byte it consumes, so each error names the exact stream
 * offset; RecordWriter applies backpressure and an optional bandwidth limit.
 */

import type { Duplex } from "node:stream";
import { setsockopt } from "../sys/io.js";
import { MigrationError } from "./errors.js";
import {
  checkRecordCrcParts,
  checkStreamHeader,
  decodeRecordHead,
  PayloadReader,
  RECORD_HEADER_SIZE,
  RECORD_OVERHEAD,
  STREAM_HEADER_SIZE,
} from "./format.js";

export interface Record {
  type: number;
  flags: number;
  /** Stream offset of the record's first byte. */
  offset: number;
  payload: PayloadReader;
  /**
   * PAGES, from a reader that hashes on its own thread (NativeRecordReader): the XXH64 of each
   * full page in data order, two u32 words each (digest.ts's layout). Absent: hash the data.
   */
  pageHashes?: Uint32Array | null;
}

/** What reads records of one connection: RecordReader (JS) or NativeRecordReader (a thread). */
export interface StreamReader {
  /** Bytes consumed by the caller so far (= offset of the next unread byte). */
  readonly offset: number;
  /** The next whole, checksummed record; its payload is valid until the next call. */
  next(): Promise<Record>;
  /** Stops reading; a pending next() never settles. */
  detach(): void;
  /** How much unread data to take from the connection ahead of the caller. */
  setReadAhead(bytes: number): void;
}

/** Pauses the socket while more than this is buffered and unread (see setReadAhead). */
const READ_HIGH_WATER = 8 * 1024 * 1024;

/** Postcopy: kernel socket buffers and the destination's read-ahead, once the guest runs there. */
export const POSTCOPY_SOCKET_BUFFER = 128 * 1024;
export const POSTCOPY_READ_AHEAD = 256 * 1024;

const SOL_SOCKET = 1;
const SO_SNDBUF = 7;
const SO_RCVBUF = 8;

/**
 * Bounds the kernel's send and receive buffers of a socket stream (postcopy: an urgent page
 * must not queue behind megabytes of background stream). Returns false when the stream has no
 * socket fd to tune (it then keeps its defaults).
 */
export function boundSocketBuffers(stream: Duplex, bytes: number): boolean {
  const fd = (stream as unknown as { _handle?: { fd?: unknown } })._handle?.fd;
  if (typeof fd !== "number" || fd < 0) return false;
  try {
    setsockopt(fd, SOL_SOCKET, SO_SNDBUF, bytes);
    setsockopt(fd, SOL_SOCKET, SO_RCVBUF, bytes);
    return true;
  } catch {
    return false;
  }
}

export interface ReaderOptions {
  /**
   * A record that spans several socket chunks is joined into one buffer that is reused for the
   * next such record, so its payload is valid only until the next call to next(). A fresh
   * buffer per record cost about as much as the copy itself (new memory faulting in).
   */
  reuseBuffer?: boolean;
}

export class RecordReader implements StreamReader {
  readonly #stream: Duplex;
  readonly #reuse: boolean;
  #scratch: Buffer | null = null;
  #chunks: Buffer[] = [];
  #buffered = 0;
  /** Bytes consumed by the caller so far (= offset of the next unread byte). */
  #offset = 0;
  /** Bytes received from the stream so far. */
  #received = 0;
  #ended = false;
  #error: Error | null = null;
  #wake: (() => void) | null = null;
  #readAhead = READ_HIGH_WATER;
  readonly #onData = (c: Buffer) => {
    this.#chunks.push(c);
    this.#buffered += c.length;
    this.#received += c.length;
    if (this.#buffered > this.#readAhead) this.#stream.pause();
    this.#kick();
  };
  readonly #onEnd = () => {
    this.#ended = true;
    this.#kick();
  };
  readonly #onError = (e: Error) => {
    this.#error ??= e;
    this.#kick();
  };

  constructor(stream: Duplex, options: ReaderOptions = {}) {
    this.#stream = stream;
    this.#reuse = options.reuseBuffer ?? false;
    stream.on("data", this.#onData);
    stream.on("end", this.#onEnd);
    stream.on("close", this.#onEnd);
    stream.on("error", this.#onError);
  }

  get offset(): number {
    return this.#offset;
  }

  detach(): void {
    this.#stream.off("data", this.#onData);
    this.#stream.off("end", this.#onEnd);
    this.#stream.off("close", this.#onEnd);
    this.#stream.off("error", this.#onError);
  }

  #kick(): void {
    const w = this.#wake;
    this.#wake = null;
    w?.();
  }

  /**
   * Stops reading and returns the bytes received and not consumed yet (another reader goes on
   * from `offset` with them). Call between records, with no next() pending.
   */
  handOff(): Buffer {
    this.detach();
    const rest = Buffer.concat(this.#chunks, this.#buffered);
    this.#chunks = [];
    this.#buffered = 0;
    return rest;
  }

  /** Resolves with exactly `n` bytes, or rejects (TRUNCATED at the offset where data ended). */
  async #take(n: number, what: string, recordOffset: number, reuse = false): Promise<Buffer> {
    while (this.#buffered < n) {
      if (this.#error || this.#ended) {
        const at = this.#received;
        const cause = this.#error ? `: ${this.#error.message}` : "";
        throw new MigrationError("TRUNCATED", `stream ended inside ${what}${cause}`, at, {
          recordOffset,
          needed: n,
          had: this.#buffered,
        });
      }
      if (this.#stream.isPaused()) this.#stream.resume();
      await new Promise<void>((r) => {
        this.#wake = r;
      });
    }
    let out: Buffer;
    const first = this.#chunks[0] as Buffer;
    if (first.length >= n) {
      out = first.subarray(0, n);
      if (first.length === n) this.#chunks.shift();
      else this.#chunks[0] = first.subarray(n);
    } else {
      if (reuse) {
        if (!this.#scratch || this.#scratch.length < n) this.#scratch = Buffer.allocUnsafeSlow(Math.max(n, 1 << 20));
        out = this.#scratch.subarray(0, n);
      } else out = Buffer.allocUnsafe(n);
      let o = 0;
      while (o < n) {
        const c = this.#chunks[0] as Buffer;
        const k = Math.min(c.length, n - o);
        c.copy(out, o, 0, k);
        o += k;
        if (k === c.length) this.#chunks.shift();
        else this.#chunks[0] = c.subarray(k);
      }
    }
    this.#buffered -= n;
    if (this.#buffered < this.#readAhead / 2 && this.#stream.isPaused()) this.#stream.resume();
    return out;
  }

  /** How much unread data to take from the socket before pausing it. */
  setReadAhead(bytes: number): void {
    this.#readAhead = bytes;
  }

  async readStreamHeader(): Promise<void> {
    const h = await this.#take(STREAM_HEADER_SIZE, "the stream header", 0);
    checkStreamHeader(h);
    this.#offset += STREAM_HEADER_SIZE;
  }

  /**
   * The next whole, checksummed record. The reader's offset only moves past a record once it
   * passed its CRC, so an error's offset is the first byte of the bad record.
   */
  async next(): Promise<Record> {
    const at = this.#offset;
    // Bytes are taken from the buffer, but `offset` (what errors report) stays at the record's
    // first byte until its CRC passed.
    const head = await this.#take(RECORD_HEADER_SIZE, "a record header", at);
    const h = decodeRecordHead(head, at);
    const rest = await this.#take(h.length + RECORD_OVERHEAD - RECORD_HEADER_SIZE, "a record", at, this.#reuse);
    // Header and rest are checked as two parts: joining them would copy every page once more.
    checkRecordCrcParts(head, rest, at);
    this.#offset += RECORD_HEADER_SIZE + rest.length;
    const payload = rest.subarray(0, h.length);
    return { type: h.type, flags: h.flags, offset: at, payload: new PayloadReader(payload, h.type, at) };
  }
}

export interface WriterOptions {
  /** Bytes per second; 0 = unlimited. */
  bandwidthLimit?: number;
  /** Wait for the socket to drain above this many buffered bytes. */
  highWater?: number;
}

export class RecordWriter {
  readonly #stream: Duplex;
  readonly #limit: number;
  readonly #highWater: number;
  #bytes = 0;
  #limitStart = 0;
  #limitBytes = 0;
  #closed: Error | null = null;
  /**
   * Writes whose callback has not run yet. 'drain' comes only after a write() that returned
   * false: a TLS socket encrypts and writes asynchronously, so it can hold a few KiB below its
   * high-water mark with no 'drain' ever to come; the last callback says those went out.
   */
  #outstanding = 0;
  #flushed: (() => void)[] = [];
  readonly #onWritten = () => {
    if (--this.#outstanding === 0) for (const f of this.#flushed.splice(0)) f();
    if (this.#belowHalf && this.#stream.writableLength <= this.#highWater / 2) this.#belowHalf();
  };
  /** write() waits for the backlog to fall to half the high-water mark: this resolves that wait. */
  #belowHalf: (() => void) | null = null;

  constructor(stream: Duplex, options: WriterOptions = {}) {
    this.#stream = stream;
    this.#limit = options.bandwidthLimit ?? 0;
    this.#highWater = options.highWater ?? 1024 * 1024;
    const onGone = (e?: Error) => {
      this.#closed ??= e ?? new Error("connection closed");
    };
    stream.once("close", () => onGone());
    stream.on("error", onGone);
  }

  /** Bytes handed to the stream so far. */
  get bytesWritten(): number {
    return this.#bytes;
  }

  /** Buffered in user space, not yet in the kernel. */
  get pending(): number {
    return this.#stream.writableLength;
  }

  /**
   * Writes `buf`, then waits while more than the high-water mark is buffered. `written` runs
   * once the stream is done with `buf` (handed to the kernel, or dropped with the stream), so
   * the buffer may then be reused; also when this throws.
   */
  async write(buf: Uint8Array, written?: () => void): Promise<void> {
    if (
      this.#closed instanceof MigrationError ||
      this.#closed ||
      this.#stream.destroyed ||
      this.#stream.writableEnded
    ) {
      written?.();
      if (this.#closed instanceof MigrationError) throw this.#closed;
      throw new MigrationError("CONNECTION_LOST", `write after the connection closed: ${this.#closed?.message ?? ""}`);
    }
    this.#outstanding++;
    this.#stream.write(
      buf,
      written
        ? () => {
            written();
            this.#onWritten();
          }
        : this.#onWritten,
    );
    this.#bytes += buf.length;
    if (this.#stream.writableLength > this.#highWater) await this.#halfDrained();
    if (this.#limit > 0) await this.#throttle(buf.length);
  }

  /**
   * Resolves once the backlog is at most half the high-water mark. Waiting for all of it to go
   * ('drain') would leave the socket with only what the kernel holds while the next records are
   * built, a gap in the stream on every high-water mark (the `migrate` bench, loopback, plain
   * TCP: 0.45 of our TLS throughput with 'drain', 0.72 with this; TLS sockets never reach the
   * mark, they hand data to their TCP socket at once).
   */
  #halfDrained(): Promise<void> {
    if (this.#closed) return Promise.reject(this.#closed);
    if (this.#stream.writableLength <= this.#highWater / 2 || this.#outstanding === 0) return Promise.resolve();
    return new Promise((resolve, reject) => {
      const cleanup = () => {
        this.#belowHalf = null;
        this.#stream.off("close", gone);
        const i = this.#waiters.indexOf(aborted);
        if (i >= 0) this.#waiters.splice(i, 1);
      };
      const gone = () => {
        cleanup();
        reject(new MigrationError("CONNECTION_LOST", "connection closed while sending"));
      };
      const aborted = (e: Error) => {
        cleanup();
        reject(e);
      };
      this.#belowHalf = () => {
        cleanup();
        resolve();
      };
      this.#stream.once("close", gone);
      this.#waiters.push(aborted);
    });
  }

  /** Writes without waiting (return-path replies, small records). */
  writeNow(buf: Uint8Array): void {
    if (this.#closed || this.#stream.destroyed || this.#stream.writableEnded) return;
    this.#outstanding++;
    this.#stream.write(buf, this.#onWritten);
    this.#bytes += buf.length;
  }

  /** Fails every pending and later write with `e` (the migration failed elsewhere). */
  abort(e: Error): void {
    this.#closed ??= e;
    for (const w of this.#waiters.splice(0)) w(e);
  }

  readonly #waiters: ((e: Error) => void)[] = [];

  drain(): Promise<void> {
    if (this.#closed) return Promise.reject(this.#closed);
    if (this.#stream.writableLength === 0 || this.#outstanding === 0) return Promise.resolve();
    return new Promise((resolve, reject) => {
      const cleanup = () => {
        this.#stream.off("drain", done);
        this.#stream.off("close", gone);
        const i = this.#waiters.indexOf(aborted);
        if (i >= 0) this.#waiters.splice(i, 1);
        const j = this.#flushed.indexOf(done);
        if (j >= 0) this.#flushed.splice(j, 1);
      };
      const done = () => {
        cleanup();
        resolve();
      };
      const gone = () => {
        cleanup();
        reject(new MigrationError("CONNECTION_LOST", "connection closed while sending"));
      };
      const aborted = (e: Error) => {
        cleanup();
        reject(e);
      };
      this.#stream.on("drain", done);
      this.#stream.once("close", gone);
      this.#waiters.push(aborted);
      this.#flushed.push(done);
    });
  }

  async #throttle(n: number): Promise<void> {
    const now = performance.now();
    if (this.#limitStart === 0 || now - this.#limitStart > 1000) {
      this.#limitStart = now;
      this.#limitBytes = 0;
    }
    this.#limitBytes += n;
    const due = this.#limitStart + (this.#limitBytes / this.#limit) * 1000;
    if (due > now + 1) await new Promise((r) => setTimeout(r, due - now));
  }
}

/** The three things a connection of a migration is, replaced together. */
export interface ChannelParts {
  stream: Duplex;
  reader: StreamReader;
  writer: RecordWriter;
}

/**
 * One side's connection to its peer: the stream with its reader and writer, owned together and
 * replaced together (postcopy recovery: `replace`, one step, so no code can hold a reader of
 * one connection and a writer of another). It also holds the postcopy preempt connection for
 * the side that uses it: handed over with `attachPreempt` and taken back with `detachPreempt`
 * (the fault side reads and writes it; this only owns its lifetime).
 */
export class MigrationChannel {
  #parts: ChannelParts;
  #preempt: Duplex | null = null;
  /** Bytes written on the connections replaced so far. */
  #retiredBytes = 0;
  #replacements = 0;

  constructor(parts: ChannelParts) {
    this.#parts = parts;
  }

  /** A channel over `stream`, with a fresh reader and writer. */
  static over(stream: Duplex, reader: ReaderOptions = {}, writer: WriterOptions = {}): MigrationChannel {
    return new MigrationChannel({
      stream,
      reader: new RecordReader(stream, reader),
      writer: new RecordWriter(stream, writer),
    });
  }

  get stream(): Duplex {
    return this.#parts.stream;
  }

  get reader(): StreamReader {
    return this.#parts.reader;
  }

  /**
   * Another reader of the same connection takes over from the current one (which must have
   * handed its unread bytes over to it: RecordReader.handOff). The stream and writer stay.
   */
  takeOverReading(reader: StreamReader): void {
    this.#parts = { ...this.#parts, reader };
  }

  get writer(): RecordWriter {
    return this.#parts.writer;
  }

  /** Bytes written over every connection this channel has had. */
  get bytesWritten(): number {
    return this.#retiredBytes + this.#parts.writer.bytesWritten;
  }

  /** How many times the connection was replaced (recovery). */
  get replacements(): number {
    return this.#replacements;
  }

  get preempt(): Duplex | null {
    return this.#preempt;
  }

  /** The postcopy preempt connection, owned from here on (destroyed with the channel). */
  attachPreempt(stream: Duplex): void {
    if (this.#preempt && this.#preempt !== stream) this.#preempt.destroy();
    this.#preempt = stream;
  }

  /** Gives the preempt connection back (to end it gracefully), or null without one. */
  detachPreempt(): Duplex | null {
    const p = this.#preempt;
    this.#preempt = null;
    return p;
  }

  /**
   * The connection is gone: its reader stops, the stream and any preempt connection are
   * destroyed. The channel keeps its byte count and waits for `replace`.
   */
  drop(): void {
    this.#parts.reader.detach();
    this.#parts.stream.destroy();
    this.detachPreempt()?.destroy();
  }

  /** Takes `next` as this channel's connection in one step; the old one is dropped. */
  replace(next: ChannelParts): void {
    if (next.stream === this.#parts.stream) throw new Error("a channel replaced by its own connection");
    this.drop();
    this.#retiredBytes += this.#parts.writer.bytesWritten;
    this.#parts = next;
    this.#replacements++;
  }

  /** Ends the connection gracefully (resolves once ended; preempt: destroyed). */
  end(): Promise<void> {
    this.#parts.reader.detach();
    this.detachPreempt()?.destroy();
    return new Promise<void>((r) => this.#parts.stream.end(r));
  }

  /** Destroys every connection it holds. */
  destroy(): void {
    this.drop();
  }
}
