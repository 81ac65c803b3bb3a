/**
 * Inflight I/O tracking for packed virtqueues (vhost-user spec, "Inflight I/O tracking", the
 * packed queue region). A packed ring overwrites the slots of requests still in flight with used
 * descriptors of others, so the region keeps a copy of every ring descriptor a request took,
 * in entries linked into a free list:
 *
 *   QueueRegionPacked { u64 features; u16 version; u16 desc_num; u16 free_head; u16 old_free_head;
 *                       u16 used_idx; u16 old_used_idx; u8 used_wrap_counter;
 *                       u8 old_used_wrap_counter; u8 padding[7]; DescStatePacked desc[desc_num] }
 *   DescStatePacked   { u8 inflight; u8 padding; u16 next; u16 last; u16 num; u64 counter;
 *                       u16 id; u16 flags; u32 len; u64 addr }                        (32 bytes)
 *
 * The "old_" fields are the last committed state: a back-end that dies half-way through taking
 * or returning a request leaves the region rolled back to them (or forward, when the used
 * descriptor had already reached the ring), and the next back-end resubmits the requests still
 * marked in flight, oldest first.
 *
 * The region comes from the front-end, which is not trusted: every index read from it is checked
 * against the queue size before it is followed (InflightCorrupt otherwise).
 */
import type { PackedQueue, RawPackedDescriptor } from "../../virtio/packed.js";
import { availFlags, VIRTQ_DESC_F_AVAIL, VIRTQ_DESC_F_USED } from "../../virtio/packed-ring.js";
import type { SharedInflightQueue } from "./inflight.js";

export const PACKED_HEADER = 32;
export const PACKED_DESC = 32;
const OFF_VERSION = 8;
const OFF_DESC_NUM = 10;
const OFF_FREE_HEAD = 12;
const OFF_OLD_FREE_HEAD = 14;
const OFF_USED_IDX = 16;
const OFF_OLD_USED_IDX = 18;
const OFF_USED_WRAP = 20;
const OFF_OLD_USED_WRAP = 21;
// DescStatePacked
const D_INFLIGHT = 0;
const D_NEXT = 2;
const D_LAST = 4;
const D_NUM = 6;
const D_COUNTER = 8;
const D_ID = 16;
const D_FLAGS = 18;
const D_LEN = 20;
const D_ADDR = 24;

export function inflightQueueSizePacked(queueSize: number): number {
  return Math.ceil((PACKED_HEADER + PACKED_DESC * queueSize) / 64) * 64;
}

export class InflightCorrupt extends Error {
  override readonly name = "InflightCorrupt";
}

/** A request found in flight after a restart: its entry and its ring descriptors. */
export interface PackedInflightRequest {
  entry: number;
  descs: RawPackedDescriptor[];
}

export class PackedInflightQueue {
  readonly queueSize: number;
  readonly #dv: DataView;
  #counter = 1;

  constructor(s: SharedInflightQueue) {
    this.queueSize = s.queueSize;
    this.#dv = new DataView(s.buffer, s.offset, inflightQueueSizePacked(s.queueSize));
  }

  get version(): number {
    return this.#dv.getUint16(OFF_VERSION, true);
  }

  #d(e: number): number {
    return PACKED_HEADER + PACKED_DESC * e;
  }

  #index(v: number, what: string): number {
    if (v >= this.queueSize) throw new InflightCorrupt(`inflight region: ${what} ${v} >= queue size ${this.queueSize}`);
    return v;
  }

  /** A fresh region: version 1, every entry free, the used position where the ring is. */
  init(usedIdx: number, usedWrap: boolean): void {
    const dv = this.#dv;
    new Uint8Array(dv.buffer, dv.byteOffset, dv.byteLength).fill(0);
    dv.setUint16(OFF_VERSION, 1, true);
    dv.setUint16(OFF_DESC_NUM, this.queueSize, true);
    for (let e = 0; e < this.queueSize; e++) dv.setUint16(this.#d(e) + D_NEXT, e + 1, true);
    for (const o of [OFF_USED_IDX, OFF_OLD_USED_IDX]) dv.setUint16(o, usedIdx, true);
    for (const o of [OFF_USED_WRAP, OFF_OLD_USED_WRAP]) dv.setUint8(o, usedWrap ? 1 : 0);
  }

  /**
   * The chain `q` just popped (or refused: its slots are taken all the same) is in flight: its
   * ring descriptors go into free entries. Returns its head entry, the token for used().
   */
  begin(q: PackedQueue): number {
    const dv = this.#dv;
    const raw = q.raw;
    const n = q.rawCount;
    const e = this.#index(dv.getUint16(OFF_OLD_FREE_HEAD, true), "old_free_head");
    const he = this.#d(e);
    dv.setUint16(he + D_NUM, 0, true);
    const c = this.#counter++;
    dv.setUint32(he + D_COUNTER, c >>> 0, true);
    dv.setUint32(he + D_COUNTER + 4, Math.floor(c / 0x1_0000_0000), true);
    dv.setUint8(he + D_INFLIGHT, 1);
    for (let k = 0; k < n; k++) {
      const f = this.#index(dv.getUint16(OFF_FREE_HEAD, true), "free_head");
      if (k === n - 1) dv.setUint16(he + D_LAST, f, true);
      dv.setUint16(he + D_NUM, dv.getUint16(he + D_NUM, true) + 1, true);
      const o = this.#d(f);
      dv.setUint32(o + D_ADDR, raw.lo[k] as number, true);
      dv.setUint32(o + D_ADDR + 4, raw.hi[k] as number, true);
      dv.setUint32(o + D_LEN, raw.len[k] as number, true);
      dv.setUint16(o + D_ID, raw.id[k] as number, true);
      dv.setUint16(o + D_FLAGS, raw.flags[k] as number, true);
      dv.setUint16(OFF_FREE_HEAD, dv.getUint16(o + D_NEXT, true), true);
    }
    dv.setUint16(OFF_OLD_FREE_HEAD, dv.getUint16(OFF_FREE_HEAD, true), true);
    return e;
  }

  /**
   * Returns the request of head entry `e`: its entries go back on the free list and the used
   * position moves to `after` before `write` puts the used descriptor in the ring; then the
   * new state is committed.
   */
  used(e: number, after: { idx: number; wrap: boolean }, write: () => void): void {
    const dv = this.#dv;
    const he = this.#d(this.#index(e, "entry"));
    const last = this.#index(dv.getUint16(he + D_LAST, true), "last");
    dv.setUint16(this.#d(last) + D_NEXT, dv.getUint16(OFF_FREE_HEAD, true), true);
    dv.setUint16(OFF_FREE_HEAD, e, true);
    dv.setUint16(OFF_USED_IDX, after.idx, true);
    dv.setUint8(OFF_USED_WRAP, after.wrap ? 1 : 0);
    write();
    dv.setUint8(he + D_INFLIGHT, 0);
    dv.setUint16(OFF_OLD_FREE_HEAD, dv.getUint16(OFF_FREE_HEAD, true), true);
    dv.setUint16(OFF_OLD_USED_IDX, after.idx, true);
    dv.setUint8(OFF_OLD_USED_WRAP, after.wrap ? 1 : 0);
  }

  /**
   * After a restart: commits or rolls back what the old back-end was doing when it died, and
   * returns the used position and the requests still in flight, oldest first. `ringFlags(i)`
   * reads the flags of ring slot i.
   */
  recover(ringFlags: (slot: number) => number): {
    usedIdx: number;
    usedWrap: boolean;
    pending: PackedInflightRequest[];
  } {
    const dv = this.#dv;
    const size = this.queueSize;
    const usedIdx = dv.getUint16(OFF_USED_IDX, true);
    const oldUsedIdx = dv.getUint16(OFF_OLD_USED_IDX, true);
    const oldWrap = dv.getUint8(OFF_OLD_USED_WRAP) !== 0;
    if (usedIdx !== oldUsedIdx || (dv.getUint8(OFF_USED_WRAP) !== 0) !== oldWrap) {
      // A return was under way. Had its used descriptor reached the ring, the slot at the old
      // used position no longer holds "available in the old lap": commit it; else roll back.
      const f = ringFlags(this.#index(oldUsedIdx, "old_used_idx")) & (VIRTQ_DESC_F_AVAIL | VIRTQ_DESC_F_USED);
      if (f !== availFlags(oldWrap)) {
        dv.setUint16(OFF_OLD_FREE_HEAD, dv.getUint16(OFF_FREE_HEAD, true), true);
        dv.setUint16(OFF_OLD_USED_IDX, usedIdx, true);
        dv.setUint8(OFF_OLD_USED_WRAP, dv.getUint8(OFF_USED_WRAP));
      }
    }
    dv.setUint16(OFF_FREE_HEAD, dv.getUint16(OFF_OLD_FREE_HEAD, true), true);
    dv.setUint16(OFF_USED_IDX, dv.getUint16(OFF_OLD_USED_IDX, true), true);
    dv.setUint8(OFF_USED_WRAP, dv.getUint8(OFF_OLD_USED_WRAP));
    // Whatever sits on the free list is not in flight (a pop cut short leaves its head there).
    const onFreeList = new Uint8Array(size);
    let f = dv.getUint16(OFF_FREE_HEAD, true);
    for (let steps = 0; f < size && steps < size; steps++) {
      if (onFreeList[f]) throw new InflightCorrupt("inflight region: the free list loops");
      onFreeList[f] = 1;
      dv.setUint8(this.#d(f) + D_INFLIGHT, 0);
      f = dv.getUint16(this.#d(f) + D_NEXT, true);
    }
    const found: [counter: number, req: PackedInflightRequest][] = [];
    let max = 0;
    for (let e = 0; e < size; e++) {
      const o = this.#d(e);
      const c = dv.getUint32(o + D_COUNTER, true) + dv.getUint32(o + D_COUNTER + 4, true) * 0x1_0000_0000;
      if (c > max) max = c;
      if (dv.getUint8(o + D_INFLIGHT) !== 1) continue;
      const num = dv.getUint16(o + D_NUM, true);
      if (num < 1 || num > size) throw new InflightCorrupt(`inflight region: entry ${e} has ${num} descriptors`);
      const descs: RawPackedDescriptor[] = [];
      let x = e;
      for (let k = 0; k < num; k++) {
        const xo = this.#d(this.#index(x, "next"));
        descs.push({
          addr: (BigInt(dv.getUint32(xo + D_ADDR + 4, true)) << 32n) | BigInt(dv.getUint32(xo + D_ADDR, true)),
          len: dv.getUint32(xo + D_LEN, true),
          id: dv.getUint16(xo + D_ID, true),
          flags: dv.getUint16(xo + D_FLAGS, true),
        });
        if (k < num - 1) x = dv.getUint16(xo + D_NEXT, true);
      }
      found.push([c, { entry: e, descs }]);
    }
    this.#counter = max + 1;
    return {
      usedIdx: dv.getUint16(OFF_USED_IDX, true),
      usedWrap: dv.getUint8(OFF_USED_WRAP) !== 0,
      pending: found.sort((a, b) => a[0] - b[0]).map(([, r]) => r),
    };
  }
}
