/**
 * The receiving half of a record stream on a native thread (native/src/stream.cc), typed. The
 * thread reads whole records (8-byte header, payload, 4-byte trailer) from a socket fd straight
 * into the slots of a ring shared with this thread, checks each header and CRC there and, when
 * asked, hashes every full page of a PAGES record (XXH64, two u32 words per page). It reports
 * through an eventfd (`onEvent` runs from this thread's event loop); records are taken in order
 * with take() and given back with release(). What a record means is the caller's business:
 * this only moves bytes and says which ones failed their checks.
 */
import { sys } from "./errors.js";
import { EventFd } from "./eventfd.js";
import { native, type View } from "./native.js";
import type { Watch } from "./poller.js";

/**
 * The migration stream's CRC-32 (zlib's: ISO-HDLC) of `data`, continuing `seed`: the same value
 * as node:zlib's crc32, by carry-less multiplication (PCLMULQDQ) where the CPU has it, about
 * twice its speed here (12 GB/s against 5). Below a few hundred bytes zlib's is as fast.
 */
export function crc32(data: View, seed = 0): number {
  return native.crc32(data, seed);
}

const META = 7;
const M_LEN = 0;
const M_TYPE = 1;
const M_FLAGS = 2;
const M_STATUS = 3;
const M_BIG = 4;
const M_OFFSET = 5;
const M_HASHES = 6;
const PAGE = 4096;

/** How a handed-over record passed the thread's checks. */
export enum ReceivedStatus {
  Ok = 0,
  /** The 8 header bytes failed the header check: nothing after them was read. */
  BadHeader = 1,
  /** Header, payload and trailer are there; the CRC does not match. */
  BadCrc = 2,
}

export interface ReceivedRecord {
  type: number;
  flags: number;
  /** Stream offset of the record's first byte. */
  offset: number;
  status: ReceivedStatus;
  /** The whole record (header, payload, trailer); only the header when status is BadHeader. */
  bytes: Uint8Array;
  /** Payload length from the header. */
  length: number;
  /** PAGES: XXH64 of each full page in data order (two u32 words each), or null when not hashed. */
  pageHashes: Uint32Array | null;
}

/** Why the thread stopped reading (once take() returns null). */
export type ReceiverEnd =
  | { kind: "running" }
  | { kind: "eof" | "error"; what: string; at: number; had: number; needed: number; errno: number }
  /** It handed over a record that failed its checks and read nothing after it. */
  | { kind: "bad-record" };

export interface ReceiverOptions {
  /** Slot size in bytes (a record longer than this is held apart and copied out once). */
  slotSize: number;
  slots: number;
  /** Stream offset of the first byte the thread reads (prefix first). */
  streamOffset: number;
  /** Hash the full pages of PAGES records (0x10) on the thread. */
  hashPages: boolean;
  /** Bytes already read from the socket that come before anything the thread reads. */
  prefix?: Uint8Array;
}

export class RecordReceiverThread {
  #id: number | null;
  readonly #bell: EventFd;
  readonly #watch: Watch;
  readonly #ring: SharedArrayBuffer;
  readonly #bytes: Uint8Array;
  readonly #meta: Float64Array;
  readonly #ctl: Int32Array;
  readonly #hashes: Uint32Array;
  readonly #o: ReceiverOptions;
  /** Records taken (handed to the caller) and released so far. */
  #taken = 0;
  #released = 0;

  /** `sock`: a connected stream socket (a dup is taken; the caller keeps its own fd). */
  constructor(sock: number, o: ReceiverOptions, onEvent: () => void) {
    if (o.slotSize % PAGE !== 0 || o.slots < 1) throw new RangeError("slot size must be whole pages, slots >= 1");
    this.#o = o;
    this.#ring = new SharedArrayBuffer(o.slotSize * o.slots);
    this.#bytes = new Uint8Array(this.#ring);
    // One more double at the end: bytes the thread read from the socket so far.
    this.#meta = new Float64Array(new SharedArrayBuffer((o.slots * META + 1) * 8));
    this.#ctl = new Int32Array(new SharedArrayBuffer(16));
    this.#hashes = new Uint32Array(new SharedArrayBuffer(o.slots * (o.slotSize / PAGE) * 8));
    this.#bell = new EventFd();
    this.#watch = this.#bell.onSignal(onEvent);
    const config = new Float64Array([o.slotSize, o.slots, o.streamOffset, o.hashPages ? 1 : 0]);
    try {
      this.#id = sys(() =>
        native.recvThreadCreate(
          sock,
          this.#bell.fd.fd,
          this.#ring,
          this.#meta,
          this.#ctl,
          this.#hashes,
          o.prefix ?? new Uint8Array(0),
          config,
        ),
      );
    } catch (e) {
      this.#watch.close();
      this.#bell.close();
      throw e;
    }
  }

  /** Bytes the thread has read from the socket (the prefix not counted); final after close(). */
  get bytesRead(): number {
    return this.#meta[this.#o.slots * META] as number;
  }

  /** Records handed over and not yet taken. */
  get ready(): number {
    return (Atomics.load(this.#ctl, 0) - this.#taken) | 0;
  }

  /**
   * The next record in stream order, or null when none is ready. Its bytes stay valid until it
   * is released (release() gives back the oldest taken record); take at most `slots` without
   * releasing.
   */
  take(): ReceivedRecord | null {
    if (this.#id === null || this.ready <= 0) return null;
    if (this.#taken - this.#released >= this.#o.slots) throw new Error("every slot taken: release one first");
    const s = this.#taken % this.#o.slots;
    this.#taken++;
    const m = this.#meta;
    const at = s * META;
    const length = m[at + M_LEN] as number;
    const status = m[at + M_STATUS] as ReceivedStatus;
    const whole = status === ReceivedStatus.BadHeader ? 8 : 8 + length + 4;
    let bytes: Uint8Array;
    if (m[at + M_BIG] === 1) {
      bytes = new Uint8Array(whole);
      native.recvThreadTakeBig(this.#id, s, bytes);
    } else bytes = this.#bytes.subarray(s * this.#o.slotSize, s * this.#o.slotSize + whole);
    const hashed = m[at + M_HASHES] as number;
    const cap = (this.#o.slotSize / PAGE) * 2;
    return {
      type: m[at + M_TYPE] as number,
      flags: m[at + M_FLAGS] as number,
      offset: m[at + M_OFFSET] as number,
      status,
      bytes,
      length,
      pageHashes: hashed >= 0 ? this.#hashes.subarray(s * cap, s * cap + hashed * 2) : null,
    };
  }

  /** Gives the oldest taken record's slot back to the thread. */
  release(): void {
    if (this.#id === null || this.#released === this.#taken) return;
    this.#released++;
    native.recvThreadRelease(this.#id);
  }

  /** Why reading stopped; "running" while it goes on (or records are still ready). */
  end(): ReceiverEnd {
    const state = Atomics.load(this.#ctl, 1);
    if (state === 0 || this.#id === null) return { kind: "running" };
    if (state === 3) return { kind: "bad-record" };
    const [what, at, had, needed, errno] = native.recvThreadStatus(this.#id);
    return { kind: state === 1 ? "eof" : "error", what, at, had, needed, errno };
  }

  /** Stops and joins the thread and closes its fds; the caller's socket stays open. */
  close(): void {
    if (this.#id === null) return;
    native.recvThreadStop(this.#id);
    this.#id = null;
    this.#watch.close();
    this.#bell.close();
  }

  [Symbol.dispose](): void {
    this.close();
  }
}
