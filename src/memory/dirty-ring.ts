/**
 * KVM's dirty ring (KVM_CAP_DIRTY_LOG_RING / _ACQ_REL), harvested from TypeScript.
 *
 * Each vCPU has a ring of `struct kvm_dirty_gfn { u32 flags; u32 slot; u64 offset; }` mmap'd
 * from its fd. KVM pushes entries in order and sets DIRTY last (store-release); we read flags
 * first (load-acquire), take slot and offset, then set RESET (store-release) and move on,
 * stopping at the first entry without DIRTY. KVM_RESET_DIRTY_RINGS then recycles every
 * entry marked RESET and re-protects those pages. JS Atomics are sequentially consistent,
 * which is stronger than the acquire/release pairs the ABI asks for.
 * (Documentation/virt/kvm/api.rst, "KVM_CAP_DIRTY_LOG_RING".)
 */
import { AtomicBitmap } from "./atomic-bitmap.js";
import type { DirtySink, DirtySource, DirtySyncOptions } from "./dirty-source.js";

export const KVM_DIRTY_GFN_F_DIRTY = 1;
export const KVM_DIRTY_GFN_F_RESET = 2;
export const KVM_DIRTY_GFN_SIZE = 16;

/** One vCPU's ring over its mapping. Not thread-safe: one harvester per ring. */
export class DirtyRing {
  readonly entries: number;
  readonly #u32: Uint32Array;
  /** Index (mod entries) of the next entry to look at. */
  #fetch = 0;

  constructor(buffer: SharedArrayBuffer, entries: number, byteOffset = 0) {
    if (entries <= 0 || (entries & (entries - 1)) !== 0)
      throw new RangeError(`ring size ${entries} is not a power of two`);
    if (buffer.byteLength - byteOffset < entries * KVM_DIRTY_GFN_SIZE) throw new RangeError("ring buffer too small");
    this.entries = entries;
    this.#u32 = new Uint32Array(buffer, byteOffset, entries * 4);
  }

  /** Total entries harvested so far (the fetch index, not wrapped). */
  get fetchIndex(): number {
    return this.#fetch;
  }

  /**
   * Harvests up to `limit` dirty entries in ring order, calling `onEntry(slot, offset)` for
   * each and marking it RESET. Returns how many were harvested: that many entries now wait
   * for KVM_RESET_DIRTY_RINGS.
   */
  harvest(onEntry: (slot: number, offset: number) => void, limit = this.entries): number {
    const u = this.#u32;
    const mask = this.entries - 1;
    let n = 0;
    while (n < limit) {
      const i = (this.#fetch & mask) * 4;
      const flags = Atomics.load(u, i);
      if ((flags & KVM_DIRTY_GFN_F_DIRTY) === 0) break;
      // RESET still set on a DIRTY entry would mean KVM reused it before reset: not possible.
      const slot = u[i + 1] as number;
      const offset = (u[i + 3] as number) * 0x1_0000_0000 + (u[i + 2] as number);
      onEntry(slot, offset);
      Atomics.store(u, i, KVM_DIRTY_GFN_F_RESET);
      this.#fetch++;
      n++;
    }
    return n;
  }
}

/** A memslot as the dirty ring names it: `slot` is (address space << 16) | slot id. */
export interface DirtyRingSlot {
  slot: number;
  guestBase: number;
  size: number;
}

/** The VM-side operations a ring source needs (real KVM ioctls, or a simulation in tests). */
export interface DirtyRingVm {
  /** One ring per vCPU. */
  readonly rings: readonly DirtyRing[];
  /** KVM_RESET_DIRTY_RINGS: recycles harvested entries; returns how many. */
  resetRings(): number;
  /** Forces every vCPU out of KVM_RUN so entries of in-flight writes are pushed (final sync). */
  kickVcpus?(): void | Promise<void>;
  /**
   * Ring-with-bitmap (KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP): KVM_GET_DIRTY_LOG of one slot,
   * the pages dirtied outside vCPU context. Present only when the kernel offers it.
   */
  backupBitmap?(slot: DirtyRingSlot): Uint32Array;
}

export interface DirtyRingStats {
  harvested: number;
  resets: number;
  backupPages: number;
}

/**
 * DirtySource over every vCPU ring of a VM. Harvested GFNs go into a per-slot staging bitmap
 * first, so a harvest forced by a full ring (KVM_EXIT_DIRTY_RING_FULL) between two syncs is
 * not lost; sync() moves staging into the sink. In the final sync the order is: kick the
 * vCPUs, harvest every ring, reset, and only then read the backup bitmap, so that a page
 * dirtied by anything but a vCPU up to that last moment is collected.
 */
export class DirtyRingSource implements DirtySource {
  readonly name: string;
  readonly stats: DirtyRingStats = { harvested: 0, resets: 0, backupPages: 0 };
  readonly #vm: DirtyRingVm;
  readonly #slots = new Map<number, { slot: DirtyRingSlot; staging: AtomicBitmap }>();
  /** Entries naming a slot or offset we do not know (a bug or a stale slot): counted, not fatal. */
  unknownEntries = 0;

  constructor(vm: DirtyRingVm, slots: readonly DirtyRingSlot[], name = "kvm dirty ring") {
    this.#vm = vm;
    this.name = name;
    for (const s of slots) this.#slots.set(s.slot, { slot: s, staging: new AtomicBitmap(s.size, 4096) });
  }

  start(): void {
    this.harvestAll();
  }

  /** Harvests every ring into staging and resets; call it on a full-ring exit too. */
  harvestAll(): number {
    let total = 0;
    const onEntry = (slot: number, offset: number) => {
      const s = this.#slots.get(slot);
      if (!s || offset >= s.staging.pages) {
        this.unknownEntries++;
        return;
      }
      s.staging.markPage(offset);
    };
    for (const ring of this.#vm.rings) total += ring.harvest(onEntry);
    if (total > 0) {
      this.#vm.resetRings();
      this.stats.resets++;
    }
    this.stats.harvested += total;
    return total;
  }

  async sync(sink: DirtySink, options: DirtySyncOptions = {}): Promise<void> {
    if (options.final) await this.#vm.kickVcpus?.();
    this.harvestAll();
    for (const { slot, staging } of this.#slots.values()) {
      sink.markFrames(staging.snapshotAndClear(), 4096, slot.guestBase);
    }
    if (options.final && this.#vm.backupBitmap) {
      // Last step before the final transfer: nothing dirtied after it can be missed.
      for (const { slot } of this.#slots.values()) {
        const words = this.#vm.backupBitmap(slot);
        const frames: number[] = [];
        for (let i = 0; i < words.length; i++) {
          let v = words[i] as number;
          while (v !== 0) {
            frames.push(i * 32 + (31 - Math.clz32(v & -v)));
            v &= v - 1;
          }
        }
        this.stats.backupPages += frames.length;
        sink.markFrames(frames, 4096, slot.guestBase);
      }
    }
  }

  stop(): void {}
}
