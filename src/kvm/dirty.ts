/**
 * KVM dirty tracking as DirtySources (src/memory/dirty-source.ts):
 * - KvmDirtyBitmapSource: KVM_MEM_LOG_DIRTY_PAGES + KVM_GET_DIRTY_LOG, with
 *   KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 and KVM_CLEAR_DIRTY_LOG when the kernel offers them.
 * - KvmDirtyRingSource: the per-vCPU rings through the memory layer's DirtyRingSource, with
 *   the Vm as its DirtyRingVm (reset, kick, full-ring exits).
 * Ring-with-bitmap (KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP) is used when offered; x86 never
 * offers it, which `ringWithBitmapSupport()` reports in words.
 */
import { type DirtyRingSlot, DirtyRingSource } from "../memory/dirty-ring.js";
import type { DirtySink, DirtySource, DirtySyncOptions } from "../memory/dirty-source.js";
import { scanClear } from "../sys/bulk.js";
import { KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP, KVM_MEM_LOG_DIRTY_PAGES } from "./abi.js";
import type { Kvm } from "./kvm.js";
import { type Memslot, Vm } from "./vm.js";

const PAGE = 4096;
const SCAN_CHUNK = 1 << 16;

export interface BitmapSourceOptions {
  /**
   * Use KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 (GET then CLEAR, so pages are re-protected only
   * after they were collected) when offered. Default true.
   */
  manualProtect?: boolean;
  /** Slot ids to track (default: every memslot of the VM at start()). */
  slots?: readonly number[];
}

export interface BitmapSourceStats {
  syncs: number;
  pages: number;
  getMs: number;
  clearMs: number;
  scanMs: number;
}

/** The dirty bitmap of every tracked memslot. */
export class KvmDirtyBitmapSource implements DirtySource {
  readonly name = "kvm dirty bitmap";
  readonly stats: BitmapSourceStats = { syncs: 0, pages: 0, getMs: 0, clearMs: 0, scanMs: 0 };
  readonly #vm: Vm;
  readonly #options: BitmapSourceOptions;
  #slots: { slot: Memslot; bitmap: Uint32Array; turnedOn: boolean }[] = [];
  readonly #out = new Uint32Array(SCAN_CHUNK);

  constructor(vm: Vm, options: BitmapSourceOptions = {}) {
    this.#vm = vm;
    this.#options = options;
  }

  /** Whether GET_DIRTY_LOG is followed by CLEAR_DIRTY_LOG (manual protect on). */
  get manualProtect(): boolean {
    return this.#vm.manualDirtyLogProtect !== 0;
  }

  start(): void {
    // Manual protect has to be on before a slot gets KVM_MEM_LOG_DIRTY_PAGES for
    // INITIALLY_SET to apply (logging then starts with no page write-protected).
    if ((this.#options.manualProtect ?? true) && this.#vm.manualDirtyLogProtect === 0)
      this.#vm.enableManualDirtyLogProtect(true);
    const ids = this.#options.slots ?? this.#vm.memslots.map((m) => m.slot);
    this.#slots = ids.map((id) => {
      const m = this.#vm.memslots.find((s) => s.slot === id);
      if (!m) throw new RangeError(`no memslot ${id}`);
      const turnedOn = (m.flags & KVM_MEM_LOG_DIRTY_PAGES) === 0;
      if (turnedOn) this.#vm.setDirtyLogging(id, true);
      const slot = this.#vm.memslots.find((s) => s.slot === id) as Memslot;
      return { slot, bitmap: new Uint32Array(Vm.bitmapBytes(slot.memorySize) / 4), turnedOn };
    });
    // Drop what was logged before start (all set with INITIALLY_SET): the first pass sends all.
    for (const s of this.#slots) this.#collect(s, null);
  }

  sync(sink: DirtySink, _options: DirtySyncOptions = {}): void {
    // Nothing to kick: a vCPU's writes are in the bitmap once it has left KVM_RUN, and the
    // final sync happens with every vCPU paused.
    for (const s of this.#slots) this.#collect(s, sink);
    this.stats.syncs++;
  }

  #collect(s: { slot: Memslot; bitmap: Uint32Array }, sink: DirtySink | null): void {
    const t0 = performance.now();
    this.#vm.getDirtyLog(s.slot.slot, s.bitmap);
    const t1 = performance.now();
    // With manual protect, GET only reads: clear (and re-protect) exactly the pages we took,
    // before anyone copies them, so a write after this point is logged again.
    if (this.manualProtect) this.#vm.clearDirtyLog(s.slot.slot, s.bitmap);
    const t2 = performance.now();
    let word = 0;
    const words = s.bitmap.length;
    while (word < words) {
      const [found, next] = scanClear(s.bitmap, this.#out, word);
      if (sink && found > 0) sink.markFrames(this.#out.subarray(0, found), PAGE, s.slot.guestPhysAddr);
      if (sink) this.stats.pages += found;
      word = next;
    }
    const t3 = performance.now();
    if (sink) {
      this.stats.getMs += t1 - t0;
      this.stats.clearMs += t2 - t1;
      this.stats.scanMs += t3 - t2;
    }
  }

  stop(): void {
    for (const s of this.#slots) {
      if (s.turnedOn && !this.#vm.closed && this.#vm.memslots.some((m) => m.slot === s.slot.slot))
        this.#vm.setDirtyLogging(s.slot.slot, false);
    }
    this.#slots = [];
  }
}

/**
 * The dirty rings of every vCPU. The VM must have had enableDirtyRing() before its vCPUs were
 * created. start() turns on KVM_MEM_LOG_DIRTY_PAGES on the slots (rings only record pages of
 * logged slots) and takes over full-ring exits: the vCPU that hit one parks, this source
 * harvests every ring into its staging bitmaps and resets, and the vCPU runs on.
 */
export class KvmDirtyRingSource extends DirtyRingSource {
  readonly #vm: Vm;
  readonly #turnedOn: number[] = [];
  /** Full-ring exits handled. */
  ringFullExits = 0;

  constructor(vm: Vm, slots: readonly Memslot[] = vm.memslots) {
    if (!vm.dirtyRing) throw new RangeError("the VM has no dirty ring: call enableDirtyRing() before creating vCPUs");
    const ringSlots: DirtyRingSlot[] = slots.map((m) => ({
      slot: m.slot, // address space 0 (bits 16+ name the address space)
      guestBase: m.guestPhysAddr,
      size: m.memorySize,
    }));
    super(vm, ringSlots, "kvm dirty ring");
    this.#vm = vm;
  }

  override start(): void {
    for (const m of this.#vm.memslots) {
      if ((m.flags & KVM_MEM_LOG_DIRTY_PAGES) === 0) {
        this.#vm.setDirtyLogging(m.slot, true);
        this.#turnedOn.push(m.slot);
      }
    }
    this.#vm.dirtyRingFullHandler = () => {
      this.ringFullExits++;
      this.harvestAll();
    };
    super.start();
  }

  override async sync(sink: DirtySink, options: DirtySyncOptions = {}): Promise<void> {
    await super.sync(sink, options);
  }

  override stop(): void {
    this.#vm.dirtyRingFullHandler = null;
    for (const id of this.#turnedOn.splice(0)) {
      if (!this.#vm.closed && this.#vm.memslots.some((m) => m.slot === id)) this.#vm.setDirtyLogging(id, false);
    }
  }
}

/**
 * KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP: whether this kernel offers it, and what that means here.
 * x86 does not (the capability exists for architectures where some dirtying happens outside
 * vCPU context, e.g. the ARM ITS tables); a ring source on x86 therefore has no backup bitmap
 * and needs none: every guest write goes through a vCPU and lands in its ring.
 */
export function ringWithBitmapSupport(kvm: Kvm): { offered: boolean; detail: string } {
  const v = kvm.checkExtension(KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP);
  if (v > 0) return { offered: true, detail: "KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP offered: rings get a backup bitmap" };
  return {
    offered: false,
    detail:
      `KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP not offered on ${process.arch} (x86 never offers it): ` +
      "rings alone are complete here, no backup bitmap is read",
  };
}
