/**
 * The virtio-blk request loop of one queue, run in that queue's worker thread (the framework's
 * queueWorker module: it exports createQueueHandler). Reads and writes go straight between the
 * image file and guest memory (no copy): the request's buffers become one list of native
 * segments (guest-segments.ts) and one preadv/pwritev call, done inline or on the queue's own
 * pool of native threads as the I/O policy says (io-policy.ts). A buffer that straddles a
 * region or mapping window takes the general path (views, and a copy for the straddling
 * piece); with O_DIRECT, unaligned buffers go through an aligned bounce buffer.
 *
 * What the guest can make us allocate is bounded: a request has at most seg_max data segments
 * of at most size_max bytes each (the limits the config space advertises; IOERR past them),
 * and an O_DIRECT bounce goes through one buffer of at most BOUNCE_CHUNK bytes, chunk by chunk,
 * shrunk back after each request.
 *
 * Every request header is the guest's: the type, the sector, the lengths and the layout are
 * checked before any I/O, and a bad one gets IOERR or UNSUPP — never a transfer outside the
 * image (the chain's buffers are already checked against guest memory by SplitQueue).
 */

import { writeSync } from "node:fs";
import { parentPort } from "node:worker_threads";
import type { GuestMemory } from "../../memory/guest-memory.js";
import { GuestIoPool, guestIoError, guestIoRaw } from "../../sys/guest-io.js";
import type { QueueContext, QueueHandler } from "../../vhost-user/backend/device.js";
import type { DescriptorChain } from "../../virtio/chain.js";
import {
  DISCARD_SEGMENT_SIZE,
  REQUEST_HEADER_SIZE,
  SECTOR_SIZE,
  VIRTIO_BLK_ID_BYTES,
  VIRTIO_BLK_S_IOERR,
  VIRTIO_BLK_S_OK,
  VIRTIO_BLK_S_UNSUPP,
  VIRTIO_BLK_T_DISCARD,
  VIRTIO_BLK_T_FLUSH,
  VIRTIO_BLK_T_GET_ID,
  VIRTIO_BLK_T_IN,
  VIRTIO_BLK_T_OUT,
  VIRTIO_BLK_T_WRITE_ZEROES,
  VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
} from "./constants.js";
import { SIZE_MAX } from "./device.js";
import { GuestSegments } from "./guest-segments.js";
import { AlignedBuffer, BlockImage, DIRECT_ALIGNMENT, isDirectAligned } from "./image.js";
import { type IoMode, IoPolicy, Placement } from "./io-policy.js";

/**
 * The O_DIRECT bounce buffer's size: large requests go through it in chunks of this many bytes
 * (a multiple of the sector and page size, so every chunk stays aligned for O_DIRECT).
 */
export const BOUNCE_CHUNK = 256 * 1024;

import { BlkQueueStats } from "./stats.js";

/** What the control plane hands each queue worker (structured-clone data). */
export interface BlkWorkerData {
  path: string;
  readonly: boolean;
  direct: boolean;
  capacitySectors: number;
  /** BigInt64Array[1]: the capacity in force (sectors), changed by an online resize. */
  capacity: SharedArrayBuffer;
  /** Int32Array[2]: [1 writeback / 0 writethrough, writes flushed on their own]. */
  cache: SharedArrayBuffer;
  /** GET_ID answer (≤ 20 bytes). */
  id: Uint8Array;
  discard: boolean;
  writeZeroes: boolean;
  writeZeroesMayUnmap: boolean;
  maxDiscardSectors: number;
  maxDiscardSeg: number;
  maxWriteZeroesSectors: number;
  maxWriteZeroesSeg: number;
  /** The seg_max the config space advertises (queue size - 2): enforced per request. */
  segMax: number;
  /** Test knob: sleep this long before completing each request. */
  debugDelayMs: number;
  /** Per-queue request counters (stats.ts), or null. */
  stats: SharedArrayBuffer | null;
  /** Where reads and writes run: inline, on the queue's pool, or adaptive (io-policy.ts). */
  io: IoMode;
  /** adaptive: large cached reads may go to an idle pool (io-policy.ts, spread). */
  spread: boolean;
}

/** Not a request type: marks "no header read" for the counters. */
const NO_TYPE = 0xffffffff;
const STATUS = [Uint8Array.of(VIRTIO_BLK_S_OK), Uint8Array.of(VIRTIO_BLK_S_IOERR), Uint8Array.of(VIRTIO_BLK_S_UNSUPP)];
/** Warnings about a guest's bad requests per worker, so a hostile guest cannot flood the log. */
const MAX_WARNINGS = 20;

/** A request's outcome: the status byte and how many data bytes went into writable buffers. */
interface Outcome {
  status: number;
  written: number;
}

/**
 * Threads of a queue's own I/O pool (reads and writes the I/O policy sends off the worker
 * thread), made on first use: with O_DIRECT every request waits for the device and more threads
 * keep more of them in flight (4 KiB QD32 on one queue: 0.72-0.77x of QSD with 2, 0.85-0.94x with
 * 8); on the page cache the pool only takes misses and flushed writes. VMSHIFT_BLK_IO_THREADS
 * sets it (1..64) for both.
 */
export function ioThreads(direct: boolean): number {
  const env = Number(process.env.VMSHIFT_BLK_IO_THREADS);
  if (Number.isInteger(env) && env >= 1) return Math.min(64, env);
  return direct ? 8 : 2;
}

/** How a request's data buffers can be transferred (#collect). */
enum Walk {
  /** Past seg_max or size_max: IOERR. */
  Limit,
  /** All in GuestSegments: one native transfer. */
  Segments,
  /** A buffer is not one plain piece of guest memory (it straddles a region or window). */
  General,
  /** O_DIRECT cannot take the buffers as they are: through the bounce buffer. */
  Bounce,
}

const ok = (written = 0): Outcome => ({ status: VIRTIO_BLK_S_OK, written });
const IOERR: Outcome = { status: VIRTIO_BLK_S_IOERR, written: 0 };
const UNSUPP: Outcome = { status: VIRTIO_BLK_S_UNSUPP, written: 0 };

export class BlkQueueHandler implements QueueHandler {
  readonly #d: BlkWorkerData;
  readonly #image: BlockImage;
  readonly #queue: number;
  #memory: GuestMemory;
  readonly #bounce = new AlignedBuffer(BOUNCE_CHUNK);
  readonly #header = new Uint8Array(REQUEST_HEADER_SIZE);
  readonly #headerView = new DataView(this.#header.buffer);
  #warnings = 0;
  readonly #stats: BlkQueueStats | null;
  readonly #sleeper = new Int32Array(new SharedArrayBuffer(4));
  readonly #capacity: BigInt64Array;
  readonly #cache: Int32Array;
  readonly #policy: IoPolicy;
  /** Triples over the current memory table (null: not made yet, or the table is not ours to pin). */
  #segs: GuestSegments | null = null;
  #segsFailed = false;
  #pool: GuestIoPool | null = null;

  constructor(ctx: QueueContext) {
    this.#d = ctx.data as BlkWorkerData;
    this.#capacity = new BigInt64Array(this.#d.capacity);
    this.#cache = new Int32Array(this.#d.cache);
    this.#queue = ctx.queue;
    this.#stats = this.#d.stats ? new BlkQueueStats(this.#d.stats, ctx.queue) : null;
    this.#memory = ctx.memory;
    this.#image = BlockImage.open(this.#d.path, { readonly: this.#d.readonly, direct: this.#d.direct });
    this.#policy = new IoPolicy(this.#d.io, this.#d.direct, ctx.backlog, this.#d.spread);
  }

  setMemory(memory: GuestMemory): void {
    this.#memory = memory;
    // Transfers in flight keep the old table's mappings pinned until they finish.
    this.#segs = null;
    this.#segsFailed = false;
  }

  close(): void {
    // The pool's threads finish what they hold before the image's fd goes.
    this.#pool?.close();
    this.#image.close();
  }

  /** The segment list for the current memory table, or null (then every request takes the general path). */
  #segments(): GuestSegments | null {
    if (this.#segs || this.#segsFailed) return this.#segs;
    try {
      this.#segs = new GuestSegments(this.#memory);
    } catch (e) {
      this.#segsFailed = true;
      this.#warn(`guest memory cannot be addressed natively (${(e as Error).message}): per-buffer views`);
    }
    return this.#segs;
  }

  #ioPool(): GuestIoPool {
    this.#pool ??= new GuestIoPool(ioThreads(this.#d.direct));
    return this.#pool;
  }

  process(chain: DescriptorChain): number | Promise<number> {
    const wlen = chain.writableLength;
    if (wlen < 1) {
      // No status byte: nothing can tell the driver anything. Complete it, write nothing.
      this.#warn("request without a status byte (no writable buffer)");
      return 0;
    }
    if (this.#d.debugDelayMs > 0) {
      // Test hook: hold the request (it is in flight: popped, recorded in the inflight region, not
      // yet used). The markers go straight to fd 2 (a worker's process.stderr is relayed through
      // the main thread, later): a test that stops this process sees exactly what is held.
      writeSync(2, `vmshift blk: queue ${this.#queue}: holding head ${chain.head} for ${this.#d.debugDelayMs} ms\n`);
      Atomics.wait(this.#sleeper, 0, 0, this.#d.debugDelayMs);
      writeSync(2, `vmshift blk: queue ${this.#queue}: released head ${chain.head}\n`);
    }
    let out: Outcome | Promise<Outcome>;
    this.#stats?.begin();
    // #serve reads the header first, synchronously: after it, the buffer holds this request's type.
    this.#headerView.setUint32(0, NO_TYPE, true);
    try {
      out = this.#serve(chain, wlen - 1);
    } catch (e) {
      this.#warn(`I/O error: ${(e as Error).message}`);
      out = IOERR;
    }
    const type = this.#headerView.getUint32(0, true);
    const payload = chain.readableLength - REQUEST_HEADER_SIZE;
    if (out instanceof Promise)
      return out.then(
        (o) => this.#finish(chain, wlen, o, type, payload),
        (e) => {
          this.#warn(`I/O error: ${(e as Error).message}`);
          return this.#finish(chain, wlen, IOERR, type, payload);
        },
      );
    return this.#finish(chain, wlen, out, type, payload);
  }

  #finish(chain: DescriptorChain, wlen: number, out: Outcome, type: number, payload: number): number {
    // The status byte is the last writable byte, whatever the buffer layout (VERSION_1: any layout).
    chain.writeWritable(STATUS[out.status] as Uint8Array, wlen - 1);
    this.#stats?.end(type, out.status, type === VIRTIO_BLK_T_OUT ? payload : out.written);
    return out.written + 1;
  }

  #warn(message: string): void {
    if (this.#warnings >= MAX_WARNINGS) return;
    this.#warnings++;
    const more = this.#warnings === MAX_WARNINGS ? " (further warnings suppressed)" : "";
    // The control plane logs it (the queue worker's event channel to the daemon's "log" event).
    parentPort?.postMessage({ type: "event", level: "warn", message: `queue ${this.#queue}: ${message}${more}` });
  }

  /** `dataLen`: writable bytes before the status byte. */
  #serve(chain: DescriptorChain, dataLen: number): Outcome | Promise<Outcome> {
    if (chain.readableLength < REQUEST_HEADER_SIZE) {
      this.#warn(`request header of ${chain.readableLength} bytes (needs ${REQUEST_HEADER_SIZE})`);
      return IOERR;
    }
    chain.readReadableInto(this.#header, 0);
    const type = this.#headerView.getUint32(0, true);
    const sector = this.#headerView.getBigUint64(8, true);
    const payload = chain.readableLength - REQUEST_HEADER_SIZE;
    switch (type) {
      case VIRTIO_BLK_T_IN:
        return this.#read(chain, sector, dataLen);
      case VIRTIO_BLK_T_OUT:
        // virtio 1.2 5.2.6.2: with VIRTIO_BLK_F_RO, IOERR for a write, and no data written.
        if (this.#d.readonly) return IOERR;
        return this.#durable(this.#write(chain, sector, payload));
      case VIRTIO_BLK_T_FLUSH:
        if (!this.#d.readonly) this.#image.flush();
        return ok();
      case VIRTIO_BLK_T_GET_ID: {
        const n = Math.min(VIRTIO_BLK_ID_BYTES, dataLen);
        const id = new Uint8Array(VIRTIO_BLK_ID_BYTES);
        id.set(this.#d.id.subarray(0, VIRTIO_BLK_ID_BYTES));
        return ok(chain.writeWritable(id.subarray(0, n), 0));
      }
      case VIRTIO_BLK_T_DISCARD:
        if (!this.#d.discard) return UNSUPP;
        return this.#ranges(chain, payload, false);
      case VIRTIO_BLK_T_WRITE_ZEROES:
        if (!this.#d.writeZeroes) return UNSUPP;
        return this.#durable(this.#ranges(chain, payload, true));
      default:
        return UNSUPP;
    }
  }

  /**
   * Writethrough cache (the driver cleared the config's writeback byte): a write completes only
   * once it is on stable storage, so it is flushed on its own before its status goes back.
   */
  #durable(out: Outcome | Promise<Outcome>): Outcome | Promise<Outcome> {
    if (Atomics.load(this.#cache, 0) === 1) return out;
    const flush = (o: Outcome): Outcome => {
      if (o.status !== VIRTIO_BLK_S_OK) return o;
      this.#image.flush();
      Atomics.add(this.#cache, 1, 1);
      return o;
    };
    return out instanceof Promise ? out.then(flush) : flush(out);
  }

  /** Byte offset of [sector, +bytes) in the image, or null when it is not all inside it. */
  #range(sector: bigint, bytes: number): number | null {
    const cap = Number(Atomics.load(this.#capacity, 0));
    if (bytes % SECTOR_SIZE !== 0 || sector > BigInt(cap)) return null;
    const s = Number(sector);
    if (s + bytes / SECTOR_SIZE > cap) return null;
    return s * SECTOR_SIZE;
  }

  #read(chain: DescriptorChain, sector: bigint, len: number): Outcome | Promise<Outcome> {
    const pos = this.#range(sector, len);
    if (pos === null) {
      this.#warn(`read of ${len} bytes at sector ${sector}: outside the image or not whole sectors`);
      return IOERR;
    }
    if (len === 0) return ok();
    const walk = this.#collect(chain, chain.readableCount, chain.count, 0, len, pos, "read");
    if (walk === Walk.Limit) return IOERR;
    if (walk === Walk.Bounce) {
      let written = 0;
      try {
        for (let off = 0; off < len; off += BOUNCE_CHUNK) {
          const buf = this.#bounce.get(Math.min(BOUNCE_CHUNK, len - off));
          this.#image.readAt(buf, pos + off);
          written += chain.writeWritable(buf, off);
        }
      } finally {
        this.#bounce.shrink();
      }
      return ok(written);
    }
    if (walk === Walk.Segments) {
      const segs = this.#segs as GuestSegments;
      const fd = this.#image.fd.fd;
      const where = this.#policy.place(false, false, len, (this.#pool?.inFlight ?? 0) === 0);
      const n =
        where === Placement.Inline
          ? guestIoRaw(segs.table, fd, false, pos, segs.segments, segs.count)
          : this.#ioPool().transfer(
              segs.table,
              fd,
              false,
              pos,
              segs.segments,
              segs.count,
              where === Placement.CacheFirst,
            );
      if (typeof n === "number") return this.#readDone(chain, len, n);
      this.#stats?.pooled();
      return n.then((r) => this.#readDone(chain, len, r));
    }
    // General path: one preadv for every consecutive buffer that is a plain view of guest
    // memory; a buffer straddling a region or window boundary is read aside and copied in.
    const mem = this.#memory;
    let off = 0;
    let runStart = 0;
    const run: Uint8Array[] = [];
    const gpas: number[] = [];
    const flush = () => {
      if (run.length === 0) return;
      this.#image.readvAt(run, pos + runStart);
      for (let k = 0; k < run.length; k++) chain.markWritten(gpas[k] as number, (run[k] as Uint8Array).length);
      run.length = 0;
      gpas.length = 0;
    };
    for (let i = chain.readableCount; i < chain.count && off < len; i++) {
      const gpa = chain.addr(i);
      const n = Math.min(chain.len(i), len - off);
      const view = mem.slice(gpa, n);
      if (view) {
        if (run.length === 0) runStart = off;
        run.push(view);
        gpas.push(gpa);
      } else {
        flush();
        const tmp = new Uint8Array(n);
        this.#image.readAt(tmp, pos + off);
        chain.writeWritable(tmp, off);
      }
      off += n;
    }
    flush();
    return ok(off);
  }

  /**
   * A native read into the request's buffers finished (`n`: bytes or -errno): every byte it may
   * have written is marked in the dirty log before the request completes, failed or not (a
   * failed read may have filled some buffers).
   */
  #readDone(chain: DescriptorChain, len: number, n: number): Outcome {
    let off = 0;
    for (let i = chain.readableCount; i < chain.count && off < len; i++) {
      const piece = Math.min(chain.len(i), len - off);
      chain.markWritten(chain.addr(i), piece);
      off += piece;
    }
    if (n < 0) throw guestIoError(n, false);
    return ok(len);
  }

  #writeDone(n: number): Outcome {
    if (n < 0) throw guestIoError(n, true);
    return ok();
  }

  #write(chain: DescriptorChain, sector: bigint, len: number): Outcome | Promise<Outcome> {
    const pos = this.#range(sector, len);
    if (pos === null) {
      this.#warn(`write of ${len} bytes at sector ${sector}: outside the image or not whole sectors`);
      return IOERR;
    }
    if (len === 0) return ok();
    const walk = this.#collect(chain, 0, chain.readableCount, REQUEST_HEADER_SIZE, len, pos, "write");
    if (walk === Walk.Limit) return IOERR;
    if (walk === Walk.Bounce) {
      try {
        for (let off = 0; off < len; off += BOUNCE_CHUNK) {
          const buf = this.#bounce.get(Math.min(BOUNCE_CHUNK, len - off));
          chain.readReadableInto(buf, REQUEST_HEADER_SIZE + off);
          this.#image.writeAt(buf, pos + off);
        }
      } finally {
        this.#bounce.shrink();
      }
      return ok();
    }
    if (walk === Walk.Segments) {
      const segs = this.#segs as GuestSegments;
      const fd = this.#image.fd.fd;
      const writethrough = Atomics.load(this.#cache, 0) !== 1;
      const where = this.#policy.place(true, writethrough);
      const n =
        where === Placement.Inline
          ? guestIoRaw(segs.table, fd, true, pos, segs.segments, segs.count)
          : this.#ioPool().transfer(
              segs.table,
              fd,
              true,
              pos,
              segs.segments,
              segs.count,
              where === Placement.CacheFirst,
            );
      if (typeof n === "number") return this.#writeDone(n);
      this.#stats?.pooled();
      return n.then((r) => this.#writeDone(r));
    }
    // General path: one pwritev for every consecutive buffer that is a plain view of guest memory.
    const mem = this.#memory;
    let skip = REQUEST_HEADER_SIZE;
    let off = 0;
    let runStart = 0;
    const run: Uint8Array[] = [];
    const flush = () => {
      if (run.length === 0) return;
      this.#image.writevAt(run, pos + runStart);
      run.length = 0;
    };
    for (let i = 0; i < chain.readableCount && off < len; i++) {
      const dlen = chain.len(i);
      if (skip >= dlen) {
        skip -= dlen;
        continue;
      }
      const gpa = chain.addr(i) + skip;
      const n = Math.min(dlen - skip, len - off);
      skip = 0;
      const view = mem.slice(gpa, n);
      if (view) {
        if (run.length === 0) runStart = off;
        run.push(view);
      } else {
        flush();
        const tmp = new Uint8Array(n);
        chain.readReadableInto(tmp, REQUEST_HEADER_SIZE + off);
        this.#image.writeAt(tmp, pos + off);
      }
      off += n;
    }
    flush();
    return ok();
  }

  /**
   * One walk over the data bytes [skip, skip+len) of buffers [first, last) (file offset `pos`):
   * seg_max and size_max, as advertised (virtio 1.2 5.2.4: "size_max: maximum size of any single
   * segment", "seg_max: maximum number of segments in a request"): a driver that goes past them
   * gets IOERR before anything is allocated or transferred. Meanwhile the pieces go into the
   * native segment list, and with O_DIRECT each is checked for alignment (address, length and
   * file offset; the windows start on a page, so a piece's window offset gives its address's).
   */
  #collect(
    chain: DescriptorChain,
    first: number,
    last: number,
    skip: number,
    len: number,
    pos: number,
    what: "read" | "write",
  ): Walk {
    const segs = this.#segments();
    segs?.reset();
    const intoGuest = what === "read";
    const direct = this.#d.direct;
    let native = segs !== null;
    let aligned = true;
    let off = 0;
    let segments = 0;
    for (let i = first; i < last && off < len; i++) {
      const dlen = chain.len(i);
      if (skip >= dlen) {
        skip -= dlen;
        continue;
      }
      const gpa = chain.addr(i) + skip;
      const n = Math.min(dlen - skip, len - off);
      skip = 0;
      if (n > SIZE_MAX) {
        this.#warn(`${what} with a segment of ${n} bytes (size_max ${SIZE_MAX})`);
        return Walk.Limit;
      }
      if (++segments > this.#d.segMax) {
        this.#warn(`${what} with more than ${this.#d.segMax} segments (seg_max)`);
        return Walk.Limit;
      }
      if (native && !(segs as GuestSegments).add(gpa, n, intoGuest)) native = false;
      if (direct && aligned) {
        if (native) {
          const s = (segs as GuestSegments).segments;
          const k = 3 * ((segs as GuestSegments).count - 1);
          aligned =
            (s[k + 1] as number) % DIRECT_ALIGNMENT === 0 &&
            n % DIRECT_ALIGNMENT === 0 &&
            (pos + off) % DIRECT_ALIGNMENT === 0;
        } else {
          const view = this.#memory.slice(gpa, n);
          aligned = view !== null && isDirectAligned(view, pos + off);
        }
      }
      off += n;
    }
    if (direct && !aligned) return Walk.Bounce;
    return native ? Walk.Segments : Walk.General;
  }

  /** DISCARD / WRITE_ZEROES: every segment is checked before any is carried out. */
  #ranges(chain: DescriptorChain, payload: number, zeroes: boolean): Outcome {
    const what = zeroes ? "write-zeroes" : "discard";
    if (payload === 0 || payload % DISCARD_SEGMENT_SIZE !== 0) {
      this.#warn(`${what} with ${payload} payload bytes (not whole segments)`);
      return IOERR;
    }
    const count = payload / DISCARD_SEGMENT_SIZE;
    const maxSeg = zeroes ? this.#d.maxWriteZeroesSeg : this.#d.maxDiscardSeg;
    const maxSectors = zeroes ? this.#d.maxWriteZeroesSectors : this.#d.maxDiscardSectors;
    if (count > maxSeg) return UNSUPP;
    const raw = new Uint8Array(payload);
    chain.readReadableInto(raw, REQUEST_HEADER_SIZE);
    const v = new DataView(raw.buffer);
    const todo: [pos: number, len: number, unmap: boolean][] = [];
    for (let k = 0; k < count; k++) {
      const sector = v.getBigUint64(k * 16, true);
      const num = v.getUint32(k * 16 + 8, true);
      const flags = v.getUint32(k * 16 + 12, true);
      // 5.2.6.2: UNSUPP for an unknown flag, and for discard with the unmap flag.
      if ((flags & ~VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP) !== 0) return UNSUPP;
      if (!zeroes && flags !== 0) return UNSUPP;
      if (num > maxSectors) {
        this.#warn(`${what} of ${num} sectors (max ${maxSectors})`);
        return IOERR;
      }
      const pos = this.#range(sector, num * SECTOR_SIZE);
      if (pos === null) {
        this.#warn(`${what} of ${num} sectors at ${sector}: outside the image`);
        return IOERR;
      }
      todo.push([pos, num * SECTOR_SIZE, (flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP) !== 0]);
    }
    for (const [pos, len, unmap] of todo) {
      if (len === 0) continue;
      if (zeroes) {
        this.#image.writeZeroes(pos, len, unmap && this.#d.writeZeroesMayUnmap, () =>
          this.#bounce.get(Math.min(len, BOUNCE_CHUNK)),
        );
      } else this.#image.discard(pos, len);
    }
    return ok();
  }
}

/** The framework's queue-worker entry point. */
export function createQueueHandler(ctx: QueueContext): QueueHandler {
  return new BlkQueueHandler(ctx);
}
