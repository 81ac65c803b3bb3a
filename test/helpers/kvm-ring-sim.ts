/**
 * A model of the kernel's side of a KVM dirty ring (virt/kvm/dirty_ring.c), following its
 * rules: push writes slot and offset, then sets DIRTY with a release store; the ring is
 * "soft full" when dirty_index - reset_index reaches size - reserved, and the vCPU must exit
 * (KVM_EXIT_DIRTY_RING_FULL) until userspace harvests and resets; reset walks from
 * reset_index over entries userspace marked RESET and makes them invalid again.
 */
import { KVM_DIRTY_GFN_F_DIRTY, KVM_DIRTY_GFN_F_RESET, KVM_DIRTY_GFN_SIZE } from "../../src/memory/dirty-ring.js";

export interface SharedRingSim {
  ring: SharedArrayBuffer;
  state: SharedArrayBuffer;
  entries: number;
}

const DIRTY_INDEX = 0;
const RESET_INDEX = 1;
/** Bumped by every reset; a producer waiting on a full ring sleeps on it. */
const RESET_SEQ = 2;
const RESERVED = 4;

export class SimulatedKvmRing {
  readonly entries: number;
  readonly ring: SharedArrayBuffer;
  readonly #u32: Uint32Array;
  readonly #state: Int32Array;
  readonly #stateBuf: SharedArrayBuffer;

  constructor(entries: number, shared?: SharedRingSim) {
    this.entries = entries;
    this.ring = shared?.ring ?? new SharedArrayBuffer(entries * KVM_DIRTY_GFN_SIZE);
    this.#stateBuf = shared?.state ?? new SharedArrayBuffer(16);
    this.#u32 = new Uint32Array(this.ring);
    this.#state = new Int32Array(this.#stateBuf);
  }

  toShared(): SharedRingSim {
    return { ring: this.ring, state: this.#stateBuf, entries: this.entries };
  }

  get softFull(): boolean {
    return Atomics.load(this.#state, DIRTY_INDEX) - Atomics.load(this.#state, RESET_INDEX) >= this.entries - RESERVED;
  }

  /** kvm_dirty_ring_push; false when the vCPU would have exited with the ring full. */
  push(slot: number, offset: number): boolean {
    if (this.softFull) return false;
    const idx = Atomics.load(this.#state, DIRTY_INDEX);
    const i = (idx & (this.entries - 1)) * 4;
    this.#u32[i + 1] = slot;
    this.#u32[i + 2] = offset >>> 0;
    this.#u32[i + 3] = Math.floor(offset / 0x1_0000_0000);
    Atomics.store(this.#u32, i, KVM_DIRTY_GFN_F_DIRTY); // smp_store_release
    Atomics.store(this.#state, DIRTY_INDEX, idx + 1);
    return true;
  }

  /** Sleeps until userspace resets the ring (the vCPU sitting out a full-ring exit). */
  waitForReset(seq: number): void {
    Atomics.wait(this.#state, RESET_SEQ, seq, 1000);
  }

  get resetSeq(): number {
    return Atomics.load(this.#state, RESET_SEQ);
  }

  /** kvm_dirty_ring_reset: recycles harvested entries in order; returns how many. */
  reset(): number {
    let n = 0;
    for (;;) {
      const idx = Atomics.load(this.#state, RESET_INDEX);
      if (idx === Atomics.load(this.#state, DIRTY_INDEX)) break;
      const i = (idx & (this.entries - 1)) * 4;
      if ((Atomics.load(this.#u32, i) & KVM_DIRTY_GFN_F_RESET) === 0) break; // not harvested yet
      Atomics.store(this.#u32, i, 0);
      Atomics.store(this.#state, RESET_INDEX, idx + 1);
      n++;
    }
    Atomics.add(this.#state, RESET_SEQ, 1);
    Atomics.notify(this.#state, RESET_SEQ);
    return n;
  }
}
