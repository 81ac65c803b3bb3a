/**
 * Per-queue request counters of a vhost-user-blk device, in shared memory: each queue's worker
 * thread is the only writer of its own slots (Atomics, so the control plane reads whole values
 * at any time, e.g. when Prometheus scrapes), and nothing here allocates per request.
 */
import { VIRTIO_BLK_S_OK, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT } from "./constants.js";

enum Slot {
  Reads = 0,
  Writes = 1,
  Flushes = 2,
  Others = 3,
  ReadBytes = 4,
  WriteBytes = 5,
  Errors = 6,
  InFlight = 7,
  Pooled = 8,
}
const SLOTS = 9;

export interface BlkQueueCounters {
  queue: number;
  /** Requests completed, by type (other: discard, write zeroes, GET_ID, unknown types). */
  reads: number;
  writes: number;
  flushes: number;
  others: number;
  /** Bytes read from the image into guest memory, and written from guest memory to it. */
  readBytes: number;
  writeBytes: number;
  /** Requests completed with a status other than OK (IOERR, UNSUPP). */
  errors: number;
  /** Requests taken from the ring and not yet completed. */
  inFlight: number;
  /** Reads and writes whose transfer (or its rest, after the page cache) ran on the queue's pool. */
  pooled: number;
}

/** The whole device's counters: `queues` × SLOTS 64-bit slots. */
export function createBlkStats(queues: number): SharedArrayBuffer {
  return new SharedArrayBuffer(queues * SLOTS * 8);
}

export function readBlkStats(sab: SharedArrayBuffer): BlkQueueCounters[] {
  const a = new BigInt64Array(sab);
  const out: BlkQueueCounters[] = [];
  for (let q = 0; q < a.length / SLOTS; q++) {
    const v = (s: Slot) => Number(Atomics.load(a, q * SLOTS + s));
    out.push({
      queue: q,
      reads: v(Slot.Reads),
      writes: v(Slot.Writes),
      flushes: v(Slot.Flushes),
      others: v(Slot.Others),
      readBytes: v(Slot.ReadBytes),
      writeBytes: v(Slot.WriteBytes),
      errors: v(Slot.Errors),
      inFlight: v(Slot.InFlight),
      pooled: v(Slot.Pooled),
    });
  }
  return out;
}

/** One queue's writer side (in its worker thread). */
export class BlkQueueStats {
  readonly #a: BigInt64Array;
  readonly #base: number;

  constructor(sab: SharedArrayBuffer, queue: number) {
    this.#a = new BigInt64Array(sab);
    this.#base = queue * SLOTS;
    if (this.#base + SLOTS > this.#a.length) throw new RangeError(`queue ${queue}: no counters for it`);
  }

  begin(): void {
    Atomics.add(this.#a, this.#base + Slot.InFlight, 1n);
  }

  /** A request's transfer went to the queue's pool (io-policy.ts). */
  pooled(): void {
    Atomics.add(this.#a, this.#base + Slot.Pooled, 1n);
  }

  /** A request completed: its type (-1: no header), status and data bytes moved. */
  end(type: number, status: number, bytes: number): void {
    const a = this.#a;
    const b = this.#base;
    Atomics.sub(a, b + Slot.InFlight, 1n);
    if (type === VIRTIO_BLK_T_IN) {
      Atomics.add(a, b + Slot.Reads, 1n);
      if (status === VIRTIO_BLK_S_OK) Atomics.add(a, b + Slot.ReadBytes, BigInt(bytes));
    } else if (type === VIRTIO_BLK_T_OUT) {
      Atomics.add(a, b + Slot.Writes, 1n);
      if (status === VIRTIO_BLK_S_OK) Atomics.add(a, b + Slot.WriteBytes, BigInt(bytes));
    } else if (type === VIRTIO_BLK_T_FLUSH) Atomics.add(a, b + Slot.Flushes, 1n);
    else Atomics.add(a, b + Slot.Others, 1n);
    if (status !== VIRTIO_BLK_S_OK) Atomics.add(a, b + Slot.Errors, 1n);
  }
}
