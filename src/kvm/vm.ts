import type { DirtyRing, DirtyRingSlot, DirtyRingVm } from "../memory/dirty-ring.js";
import { KVM_DIRTY_GFN_SIZE } from "../memory/dirty-ring.js";
import type { GuestMemory } from "../memory/guest-memory.js";
import { Fd } from "../sys/fd.js";
import type { Mapping } from "../sys/mapping.js";
import { addressOf } from "../sys/mapping.js";
import {
  encodeClearDirtyLog,
  encodeDirtyLog,
  encodeEnableCap,
  encodeUserspaceMemoryRegion,
  KVM_CAP_DIRTY_LOG_RING,
  KVM_CAP_DIRTY_LOG_RING_ACQ_REL,
  KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP,
  KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
  KVM_CLEAR_DIRTY_LOG,
  KVM_CREATE_VCPU,
  KVM_DIRTY_LOG_INITIALLY_SET,
  KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE,
  KVM_ENABLE_CAP,
  KVM_GET_DIRTY_LOG,
  KVM_MEM_LOG_DIRTY_PAGES,
  KVM_MEM_READONLY,
  KVM_RESET_DIRTY_RINGS,
  KVM_SET_USER_MEMORY_REGION,
} from "./abi.js";
import { KvmError, kvmIoctl } from "./errors.js";
import type { Kvm } from "./kvm.js";
import { Vcpu } from "./vcpu.js";

const PAGE = 4096;

/**
 * A memslot to register with KVM_SET_USER_MEMORY_REGION: guest-physical [guestPhysAddr,
 * +memorySize) backed by bytes [offset, +memorySize) of `mapping`. The host range is never a
 * bare address: the Vm keeps the Mapping (and with it its windows, so the address range is
 * never unmapped and reused) for as long as the slot exists. A memslot over an address range
 * that outlived its mapping would give the guest whatever gets mapped there next.
 */
export interface MemslotSpec {
  slot: number;
  flags: number;
  guestPhysAddr: number;
  memorySize: number;
  /** The mapping the slot's host memory lies in (kept alive while the slot exists). */
  mapping: Mapping;
  /** Byte offset of the slot's first byte in `mapping` (default 0, page aligned). */
  offset?: number;
}

/** A memslot as registered: its spec and the host address KVM was given. */
export interface Memslot extends MemslotSpec {
  userspaceAddr: bigint;
}

export interface SetMemoryOptions {
  /** KVM_MEM_LOG_DIRTY_PAGES on every slot (needed for the dirty bitmap, not for rings). */
  logDirtyPages?: boolean;
  /** First slot id (default 0); region i gets slot firstSlot + i. */
  firstSlot?: number;
}

export interface DirtyRingInfo {
  /** Entries per vCPU ring. */
  entries: number;
  /** KVM_CAP_DIRTY_LOG_RING_ACQ_REL (true) or the older KVM_CAP_DIRTY_LOG_RING. */
  acqRel: boolean;
  /** KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP was offered and enabled (never on x86). */
  withBitmap: boolean;
}

/**
 * A KVM VM: memslots, capabilities, vCPUs and the VM-wide dirty-tracking ioctls. Implements
 * DirtyRingVm so the memory layer's DirtyRingSource harvests its rings.
 */
export class Vm implements DirtyRingVm, AsyncDisposable {
  readonly kvm: Kvm;
  readonly fd: Fd;
  readonly #slots = new Map<number, Memslot>();
  readonly #vcpus: Vcpu[] = [];
  #ring: DirtyRingInfo | null = null;
  #manualProtect = 0;
  #closed = false;
  /** Set by a ring source: harvests and resets when a vCPU's ring is full. */
  dirtyRingFullHandler: (() => void) | null = null;

  constructor(kvm: Kvm, fd: Fd) {
    this.kvm = kvm;
    this.fd = fd;
  }

  get memslots(): readonly Memslot[] {
    return [...this.#slots.values()].sort((a, b) => a.slot - b.slot);
  }

  get vcpus(): readonly Vcpu[] {
    return this.#vcpus;
  }

  get dirtyRing(): DirtyRingInfo | null {
    return this.#ring;
  }

  /** The KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 bits enabled (0: GET_DIRTY_LOG clears and protects). */
  get manualDirtyLogProtect(): number {
    return this.#manualProtect;
  }

  checkExtension(cap: number): number {
    return this.kvm.checkExtension(cap);
  }

  /** KVM_ENABLE_CAP on the VM. */
  enableCap(cap: number, args: readonly (number | bigint)[] = [], flags = 0): void {
    this.#assertOpen();
    kvmIoctl(this.fd, KVM_ENABLE_CAP, encodeEnableCap(cap, args, flags), `KVM_ENABLE_CAP(${cap})`);
  }

  /**
   * KVM_SET_USER_MEMORY_REGION, checked first so a bad slot is a BAD_MEMSLOT, not an EINVAL.
   * The host range must lie inside `m.mapping`, which must be open; the slot keeps it.
   */
  setUserMemoryRegion(m: MemslotSpec): void {
    this.#assertOpen();
    const offset = m.offset ?? 0;
    const values = {
      slot: m.slot,
      guestPhysAddr: m.guestPhysAddr,
      memorySize: m.memorySize,
      offset,
    };
    const bad = (why: string) => new KvmError("BAD_MEMSLOT", `memslot ${m.slot}: ${why}`, values);
    if (!Number.isInteger(m.slot) || m.slot < 0 || m.slot >= this.kvm.maxMemslots)
      throw bad(`slot id out of range [0, ${this.kvm.maxMemslots})`);
    if (!Number.isSafeInteger(m.guestPhysAddr) || m.guestPhysAddr < 0 || m.guestPhysAddr % PAGE !== 0)
      throw bad("guest physical address is not page aligned");
    if (!Number.isSafeInteger(m.memorySize) || m.memorySize < 0 || m.memorySize % PAGE !== 0)
      throw bad("size is not a multiple of the page size");
    let userspaceAddr = 0n;
    if (m.memorySize > 0) {
      if (m.mapping.closed) throw bad("its mapping is closed");
      if (!Number.isSafeInteger(offset) || offset < 0 || offset % PAGE !== 0)
        throw bad("offset into the mapping is not page aligned");
      if (offset + m.memorySize > m.mapping.length)
        throw bad(`[${offset}, +${m.memorySize}) runs past its mapping of ${m.mapping.length} bytes`);
      userspaceAddr = m.mapping.address + BigInt(offset);
    }
    if (m.memorySize > 0) {
      for (const o of this.#slots.values()) {
        if (o.slot === m.slot) continue;
        if (m.guestPhysAddr < o.guestPhysAddr + o.memorySize && o.guestPhysAddr < m.guestPhysAddr + m.memorySize)
          throw bad(`overlaps slot ${o.slot}`);
      }
    }
    kvmIoctl(
      this.fd,
      KVM_SET_USER_MEMORY_REGION,
      encodeUserspaceMemoryRegion(m.slot, m.flags, BigInt(m.guestPhysAddr), BigInt(m.memorySize), userspaceAddr),
      "KVM_SET_USER_MEMORY_REGION",
    );
    // The slot holds its Mapping from here until it is deleted (or the Vm closes).
    if (m.memorySize === 0) this.#slots.delete(m.slot);
    else this.#slots.set(m.slot, { ...m, offset, userspaceAddr });
  }

  /** One memslot per region of `memory`, over each region's own mapping. */
  setMemory(memory: GuestMemory, options: SetMemoryOptions = {}): Memslot[] {
    const first = options.firstSlot ?? 0;
    return memory.regions.map((r, i) => {
      const mapping = r.mapping;
      if (!mapping)
        throw new KvmError("BAD_MEMSLOT", `memslot ${first + i}: region at ${r.guestBase} has no mapping of its own`, {
          slot: first + i,
          guestPhysAddr: r.guestBase,
        });
      this.setUserMemoryRegion({
        slot: first + i,
        flags: (options.logDirtyPages ? KVM_MEM_LOG_DIRTY_PAGES : 0) | (r.readonly ? KVM_MEM_READONLY : 0),
        guestPhysAddr: r.guestBase,
        memorySize: r.size,
        mapping,
      });
      return this.#slot(first + i);
    });
  }

  /** Turns KVM_MEM_LOG_DIRTY_PAGES on or off for a slot (re-registers it with new flags). */
  setDirtyLogging(slot: number, on: boolean): void {
    const m = this.#slot(slot);
    const flags = on ? m.flags | KVM_MEM_LOG_DIRTY_PAGES : m.flags & ~KVM_MEM_LOG_DIRTY_PAGES;
    if (flags !== m.flags) this.setUserMemoryRegion({ ...m, flags });
  }

  /** Removes a slot (size 0). */
  deleteMemslot(slot: number): void {
    const m = this.#slot(slot);
    this.setUserMemoryRegion({ ...m, flags: 0, memorySize: 0 });
  }

  #slot(slot: number): Memslot {
    const m = this.#slots.get(slot);
    if (!m) throw new KvmError("BAD_MEMSLOT", `no memslot ${slot}`, { slot });
    return m;
  }

  // ---------------------------------------------------------------------------------------------
  // Dirty bitmap

  /**
   * KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2: GET_DIRTY_LOG no longer clears or write-protects; the
   * caller clears what it took with clearDirtyLog(). INITIALLY_SET (when offered) starts every
   * bit set and no page protected, so enabling logging on a big slot costs nothing up front.
   * Returns the bits enabled (0 when the kernel lacks the capability).
   */
  enableManualDirtyLogProtect(initiallySet = true): number {
    const offered = this.checkExtension(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2);
    if (offered === 0) return 0;
    let bits = KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE;
    if (initiallySet) bits |= offered & KVM_DIRTY_LOG_INITIALLY_SET;
    this.enableCap(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, [bits]);
    this.#manualProtect = bits;
    return bits;
  }

  /** Bytes of the bitmap of a slot (one bit per page, in u64 words as KVM writes them). */
  static bitmapBytes(memorySize: number): number {
    return Math.ceil(memorySize / PAGE / 64) * 8;
  }

  /** KVM_GET_DIRTY_LOG into `bitmap` (at least bitmapBytes(slot size), 8-byte aligned). */
  getDirtyLog(slot: number, bitmap: Uint32Array): void {
    const m = this.#slot(slot);
    if (bitmap.byteLength < Vm.bitmapBytes(m.memorySize))
      throw new KvmError("BAD_STATE", `bitmap of ${bitmap.byteLength} bytes is too small for slot ${slot}`, { slot });
    // The kernel writes through this address during the (synchronous) ioctl; the view is alive.
    kvmIoctl(this.fd, KVM_GET_DIRTY_LOG, encodeDirtyLog(slot, addressOf(bitmap)), "KVM_GET_DIRTY_LOG");
  }

  /**
   * KVM_CLEAR_DIRTY_LOG: clears (and write-protects again) the pages whose bits are set in
   * `bitmap`, which covers pages [firstPage, firstPage + numPages). firstPage must be a
   * multiple of 64; numPages too unless the range ends at the slot's end.
   */
  clearDirtyLog(slot: number, bitmap: Uint32Array, firstPage = 0, numPages?: number): void {
    const m = this.#slot(slot);
    const n = numPages ?? m.memorySize / PAGE - firstPage;
    kvmIoctl(
      this.fd,
      KVM_CLEAR_DIRTY_LOG,
      encodeClearDirtyLog(slot, firstPage, n, addressOf(bitmap)),
      "KVM_CLEAR_DIRTY_LOG",
    );
  }

  // ---------------------------------------------------------------------------------------------
  // Dirty ring

  /**
   * Enables per-vCPU dirty rings of `entries` entries (a power of two; the kernel's limit is
   * KVM_CHECK_EXTENSION's value in bytes). ACQ_REL is preferred; the plain ring is the
   * fallback. Must come before the first vCPU. Ring-with-bitmap is enabled when offered.
   */
  enableDirtyRing(entries: number): DirtyRingInfo {
    this.#assertOpen();
    if (this.#vcpus.length > 0)
      throw new KvmError("BAD_STATE", "dirty rings must be enabled before any vCPU exists", {
        vcpus: this.#vcpus.length,
      });
    if (entries <= 0 || (entries & (entries - 1)) !== 0)
      throw new KvmError("BAD_STATE", `ring size ${entries} is not a power of two`, { entries });
    const acqRelMax = this.checkExtension(KVM_CAP_DIRTY_LOG_RING_ACQ_REL);
    const plainMax = this.checkExtension(KVM_CAP_DIRTY_LOG_RING);
    const acqRel = acqRelMax > 0;
    const max = acqRel ? acqRelMax : plainMax;
    const bytes = entries * KVM_DIRTY_GFN_SIZE;
    if (max === 0) throw new KvmError("CAP_UNSUPPORTED", "this kernel offers no dirty ring", {});
    if (bytes > max)
      throw new KvmError("CAP_UNSUPPORTED", `ring of ${bytes} bytes exceeds the kernel's ${max}`, { bytes, max });
    this.enableCap(acqRel ? KVM_CAP_DIRTY_LOG_RING_ACQ_REL : KVM_CAP_DIRTY_LOG_RING, [bytes]);
    let withBitmap = false;
    if (this.checkExtension(KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP) > 0) {
      this.enableCap(KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP);
      withBitmap = true;
    }
    this.#ring = { entries, acqRel, withBitmap };
    return this.#ring;
  }

  /** DirtyRingVm: the rings of every vCPU, in vCPU order. */
  get rings(): readonly DirtyRing[] {
    return this.#vcpus.flatMap((v) => (v.ring ? [v.ring] : []));
  }

  /** DirtyRingVm: KVM_RESET_DIRTY_RINGS. */
  resetRings(): number {
    return kvmIoctl(this.fd, KVM_RESET_DIRTY_RINGS, 0, "KVM_RESET_DIRTY_RINGS");
  }

  /**
   * DirtyRingVm: gets every running vCPU out of KVM_RUN once (which flushes any hardware
   * buffer of dirty GFNs, e.g. Intel PML, into the rings), then lets it run again.
   */
  async kickVcpus(): Promise<void> {
    const running = this.#vcpus.filter((v) => v.running);
    await Promise.all(running.map((v) => v.pause()));
    for (const v of running) v.run();
  }

  /**
   * DirtyRingVm, ring-with-bitmap only: the slot's backup bitmap. x86 never offers
   * KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP, so this exists only when enableDirtyRing() found it.
   */
  get backupBitmap(): ((slot: DirtyRingSlot) => Uint32Array) | undefined {
    if (!this.#ring?.withBitmap) return undefined;
    return (s: DirtyRingSlot) => {
      const id = s.slot & 0xffff;
      const bm = new Uint32Array(Vm.bitmapBytes(s.size) / 4);
      this.getDirtyLog(id, bm);
      return bm;
    };
  }

  // ---------------------------------------------------------------------------------------------
  // vCPUs

  /** KVM_CREATE_VCPU: maps kvm_run (and the dirty ring when enabled). Start its thread with start(). */
  createVcpu(id = this.#vcpus.length): Vcpu {
    this.#assertOpen();
    const max = this.kvm.maxVcpuId;
    if (!Number.isInteger(id) || id < 0 || id >= max)
      throw new KvmError("BAD_VCPU_ID", `vCPU id ${id} out of range [0, ${max})`, { id, max });
    if (this.#vcpus.some((v) => v.id === id)) throw new KvmError("BAD_VCPU_ID", `vCPU id ${id} already exists`, { id });
    const fd = kvmIoctl(this.fd, KVM_CREATE_VCPU, id, "KVM_CREATE_VCPU");
    const v = new Vcpu(id, new Fd(fd), this.kvm.vcpuMmapSize, this.#ring?.entries ?? 0);
    this.#vcpus.push(v);
    return v;
  }

  /** Starts every vCPU's thread; a full ring is handed to dirtyRingFullHandler. */
  async startVcpus(): Promise<void> {
    await Promise.all(this.#vcpus.map((v) => v.start({ onDirtyRingFull: () => this.#onDirtyRingFull() })));
  }

  #onDirtyRingFull(): void {
    if (this.dirtyRingFullHandler) this.dirtyRingFullHandler();
  }

  /**
   * Stops every vCPU thread and closes every fd. A vCPU that does not leave KVM_RUN in time (a
   * guest that never exits) is forced out by deleting every memslot: its next memory access
   * then exits to userspace, where the worker sees QUIT.
   */
  async close(): Promise<void> {
    if (this.#closed) return;
    const results = await Promise.all(this.#vcpus.map((v) => v.close()));
    if (results.some((ok) => !ok)) {
      for (const m of this.memslots) this.deleteMemslot(m.slot);
      const again = await Promise.all(this.#vcpus.map((v) => v.close()));
      if (again.some((ok) => !ok)) {
        throw new KvmError("TIMEOUT", "a vCPU thread did not leave KVM_RUN even without memory", {});
      }
    }
    this.#closed = true;
    this.#slots.clear();
    this.fd.close();
  }

  async [Symbol.asyncDispose](): Promise<void> {
    await this.close();
  }

  get closed(): boolean {
    return this.#closed;
  }

  #assertOpen(): void {
    if (this.#closed) throw new KvmError("BAD_STATE", "VM is closed", {});
  }
}
