/**
 * Inflight I/O tracking for split virtqueues (vhost-user spec, "Inflight I/O tracking"): a
 * region per queue in shared memory that the front-end keeps across back-end restarts, so a
 * restarted back-end resubmits exactly the requests that were in flight — none lost, none
 * done twice.
 *
 *   QueueRegionSplit { u64 features; u16 version; u16 desc_num; u16 last_batch_head;
 *                      u16 used_idx; DescStateSplit desc[desc_num] }          (16-byte header)
 *   DescStateSplit   { u8 inflight; u8 padding[5]; u16 next; u64 counter }    (16 bytes)
 *
 * The layout of the whole buffer is the back-end's business (the front-end only keeps the
 * fd); we place queue regions at 64-byte aligned offsets, each big enough for either layout
 * (inflight-packed.ts has the packed one).
 */
import { inflightQueueSizePacked } from "./inflight-packed.js";

const HEADER = 16;
const DESC = 16;
const OFF_VERSION = 8;
const OFF_DESC_NUM = 10;
const OFF_LAST_BATCH_HEAD = 12;
const OFF_USED_IDX = 14;

/** Bytes of the split layout for one queue. */
export function inflightQueueSizeSplit(queueSize: number): number {
  return Math.ceil((HEADER + DESC * queueSize) / 64) * 64;
}

/**
 * Bytes reserved per queue in the region we allocate: room for either layout (the packed one is
 * the larger), since GET_INFLIGHT_FD does not say which ring kind the queues will be.
 */
export function inflightQueueSize(queueSize: number): number {
  return Math.max(inflightQueueSizeSplit(queueSize), inflightQueueSizePacked(queueSize));
}

export interface SharedInflightQueue {
  buffer: SharedArrayBuffer;
  offset: number;
  queueSize: number;
}

export class InflightQueue {
  readonly queueSize: number;
  readonly #dv: DataView;
  #counter = 1;

  constructor(s: SharedInflightQueue) {
    this.queueSize = s.queueSize;
    this.#dv = new DataView(s.buffer, s.offset, inflightQueueSizeSplit(s.queueSize));
  }

  get version(): number {
    return this.#dv.getUint16(OFF_VERSION, true);
  }

  /** A fresh region: version 1, no descriptor in flight. */
  init(): void {
    new Uint8Array(this.#dv.buffer, this.#dv.byteOffset, this.#dv.byteLength).fill(0);
    this.#dv.setUint16(OFF_VERSION, 1, true);
    this.#dv.setUint16(OFF_DESC_NUM, this.queueSize, true);
  }

  #d(head: number): number {
    return HEADER + DESC * head;
  }

  /** A request was taken from the avail ring. */
  begin(head: number): void {
    const o = this.#d(head);
    const c = this.#counter++;
    this.#dv.setUint32(o + 8, c >>> 0, true);
    this.#dv.setUint32(o + 12, Math.floor(c / 0x1_0000_0000), true);
    this.#dv.setUint8(o, 1);
  }

  /** Before publishing `head` as used: link it into the last batch. */
  beforeUsed(head: number): void {
    this.#dv.setUint16(this.#d(head) + 6, this.#dv.getUint16(OFF_LAST_BATCH_HEAD, true), true);
    this.#dv.setUint16(OFF_LAST_BATCH_HEAD, head, true);
  }

  /** After the used idx was published. */
  afterUsed(head: number, usedIdx: number): void {
    this.#dv.setUint8(this.#d(head), 0);
    this.#dv.setUint16(OFF_USED_IDX, usedIdx, true);
  }

  /**
   * After a restart: repairs the last batch (entries published as used but not yet cleared
   * when the old back-end died) and returns the heads still in flight, oldest first.
   */
  recover(usedRingIdx: number): number[] {
    const dv = this.#dv;
    const recorded = dv.getUint16(OFF_USED_IDX, true);
    if (recorded !== usedRingIdx) {
      let n = (usedRingIdx - recorded) & 0xffff;
      let h = dv.getUint16(OFF_LAST_BATCH_HEAD, true);
      while (n-- > 0 && h < this.queueSize) {
        dv.setUint8(this.#d(h), 0);
        h = dv.getUint16(this.#d(h) + 6, true);
      }
      dv.setUint16(OFF_USED_IDX, usedRingIdx, true);
    }
    const pending: [number, number][] = [];
    let max = 0;
    for (let h = 0; h < this.queueSize; h++) {
      const o = this.#d(h);
      const c = dv.getUint32(o + 8, true) + dv.getUint32(o + 12, true) * 0x1_0000_0000;
      if (c > max) max = c;
      if (dv.getUint8(o) === 1) pending.push([c, h]);
    }
    this.#counter = max + 1;
    return pending.sort((a, b) => a[0] - b[0]).map(([, h]) => h);
  }
}
