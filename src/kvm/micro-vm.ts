/**
 * A micro-VM: one or more vCPUs (each in its own thread) running the long-mode dirtying program
 * (guest.ts) over a GuestMemory, each over its own share of the dirtiable range,
 * with KVM dirty tracking (bitmap or rings) as a DirtySource. It is what a migration moves:
 * memory plus `VcpuState`, which `encodeVcpuState()` turns into a device-state blob (the raw
 * kvm_sregs and kvm_regs structs, as KVM hands them out) and `decodeVcpuState()` checks.
 *
 * No migration code here (src/kvm does not import src/migration): src/vm/ glues the two.
 */

import type { DirtySource } from "../memory/dirty-source.js";
import type { GuestMemory } from "../memory/guest-memory.js";
import type { Mapping } from "../sys/mapping.js";
import { decodeRegs, decodeSregs, encodeRegs, encodeSregs, KVM_REGS_SIZE, KVM_SREGS_SIZE } from "./abi.js";
import { KvmDirtyBitmapSource, KvmDirtyRingSource } from "./dirty.js";
import { KvmError } from "./errors.js";
import { DIRTY_BASE, type DirtierOptions, dirtierRegs, longModeSregs, writeLongModeGuest } from "./guest.js";
import { Kvm } from "./kvm.js";
import type { PauseInfo, Vcpu, VcpuState } from "./vcpu.js";
import type { Vm } from "./vm.js";

export type DirtyTracking = "bitmap" | "ring";

/** "VCPU" in little-endian, then a format version. */
const STATE_MAGIC = 0x55504356;
const STATE_VERSION = 1;
const STATE_HEADER = 8;
export const VCPU_STATE_BYTES = STATE_HEADER + KVM_SREGS_SIZE + KVM_REGS_SIZE;

/** The vCPU state as a device-state blob: magic, version, kvm_sregs, kvm_regs. */
export function encodeVcpuState(s: VcpuState): Uint8Array {
  const b = new Uint8Array(VCPU_STATE_BYTES);
  const dv = new DataView(b.buffer);
  dv.setUint32(0, STATE_MAGIC, true);
  dv.setUint32(4, STATE_VERSION, true);
  encodeSregs(s.sregs, b.subarray(STATE_HEADER, STATE_HEADER + KVM_SREGS_SIZE));
  encodeRegs(s.regs, b.subarray(STATE_HEADER + KVM_SREGS_SIZE));
  return b;
}

export function decodeVcpuState(b: Uint8Array): VcpuState {
  if (b.byteLength !== VCPU_STATE_BYTES)
    throw new KvmError("BAD_STATE", `vCPU state of ${b.byteLength} bytes, expected ${VCPU_STATE_BYTES}`, {
      length: b.byteLength,
    });
  const dv = new DataView(b.buffer, b.byteOffset, b.byteLength);
  const magic = dv.getUint32(0, true);
  const version = dv.getUint32(4, true);
  if (magic !== STATE_MAGIC || version !== STATE_VERSION)
    throw new KvmError("BAD_STATE", `not a vCPU state blob (magic ${magic.toString(16)}, version ${version})`, {
      magic,
      version,
    });
  // Copies: the structs are decoded from their own aligned buffers.
  const sregs = decodeSregs(b.slice(STATE_HEADER, STATE_HEADER + KVM_SREGS_SIZE));
  const regs = decodeRegs(b.slice(STATE_HEADER + KVM_SREGS_SIZE));
  return { sregs, regs };
}

export interface MicroVmOptions {
  /** Guest memory (not owned): one memslot per region. */
  memory: GuestMemory;
  /** Dirty tracking this VM offers as its DirtySource; "none" for a destination. */
  dirtyTracking: DirtyTracking | "none";
  /** Ring entries per vCPU (ring tracking; a power of two). Default 16384 (256 KiB). */
  ringEntries?: number;
  /**
   * The mapping of each region's memslot, when KVM must use another mapping of the same
   * memory than the region's own (postcopy: a mapping registered with a userfaultfd that
   * also serves kernel-mode faults). Default: each region's own mapping. The Vm keeps each
   * one alive while its slot exists.
   */
  slotMappings?: readonly Mapping[];
  /**
   * Boot: write page tables and code, start the dirtying program with these options. With
   * `vcpus` > 1 (default 1) the range [start, end) is split into that many equal parts, one per
   * vCPU, so each vCPU's writes depend only on its own registers.
   */
  boot?: Partial<DirtierOptions> & { vcpus?: number };
  /** Restore: the memory already holds the guest; continue each vCPU from its state. */
  restore?: VcpuState | readonly VcpuState[];
}

/**
 * One VM, a thread per vCPU, the dirtying program. Created parked: call run().
 * close() stops the threads, closes the VM and /dev/kvm; the memory stays the caller's.
 */
export class MicroVm implements AsyncDisposable {
  readonly kvm: Kvm;
  readonly vm: Vm;
  readonly vcpus: readonly Vcpu[];
  readonly dirtyTracking: DirtyTracking | "none";
  /** Writes between two progress reports (each write dirties one page). */
  readonly writesPerReport: number;
  #source: DirtySource | null = null;
  #baseThrottleUs = 0;
  #closed = false;

  private constructor(
    kvm: Kvm,
    vm: Vm,
    vcpus: readonly Vcpu[],
    tracking: DirtyTracking | "none",
    writesPerReport: number,
  ) {
    this.kvm = kvm;
    this.vm = vm;
    this.vcpus = vcpus;
    this.dirtyTracking = tracking;
    this.writesPerReport = writesPerReport;
  }

  static async create(o: MicroVmOptions): Promise<MicroVm> {
    if ((o.boot === undefined) === (o.restore === undefined))
      throw new KvmError("BAD_STATE", "MicroVm.create: give exactly one of boot or restore", {});
    const kvm = Kvm.open();
    let vm: Vm | null = null;
    try {
      vm = kvm.createVm();
      const size = o.memory.size;
      if (o.boot) writeLongModeGuest(o.memory, size);
      o.memory.regions.forEach((r, i) => {
        const mapping = o.slotMappings?.[i] ?? r.mapping;
        if (!mapping)
          throw new KvmError("BAD_MEMSLOT", `region ${i} has no mapping of its own`, {
            slot: i,
            guestPhysAddr: r.guestBase,
          });
        (vm as Vm).setUserMemoryRegion({ slot: i, flags: 0, guestPhysAddr: r.guestBase, memorySize: r.size, mapping });
      });
      if (o.dirtyTracking === "ring") vm.enableDirtyRing(o.ringEntries ?? 16384);
      const vcpus: Vcpu[] = [];
      let writesPerReport: number;
      if (o.boot) {
        const regions = o.memory.regions;
        const last = regions[regions.length - 1];
        const end = o.boot.end ?? (last ? last.guestBase + last.size : 0);
        const start = o.boot.start ?? DIRTY_BASE;
        const stride = o.boot.stride ?? 4096;
        const n = o.boot.vcpus ?? 1;
        if (!Number.isInteger(n) || n < 1 || n > 64) throw new KvmError("BAD_STATE", `vcpus ${n}: 1..64`, { vcpus: n });
        // Equal parts, each a whole number of strides.
        const share = Math.floor((end - start) / n / stride) * stride;
        if (share < stride) throw new KvmError("BAD_STATE", `range too small for ${n} vCPUs`, { vcpus: n });
        writesPerReport = o.boot.writesPerReport ?? 64;
        for (let i = 0; i < n; i++) {
          const dirtier: DirtierOptions = {
            start: start + i * share,
            end: i === n - 1 ? end : start + (i + 1) * share,
            stride,
            writesPerReport,
            reports: o.boot.reports ?? 0,
          };
          const vcpu = vm.createVcpu(i);
          vcpu.setSregs(longModeSregs(vcpu.getSregs()));
          vcpu.setRegs(dirtierRegs(vcpu.getRegs(), dirtier));
          vcpus.push(vcpu);
        }
      } else {
        const states = Array.isArray(o.restore) ? (o.restore as readonly VcpuState[]) : [o.restore as VcpuState];
        if (states.length === 0) throw new KvmError("BAD_STATE", "restore: no vCPU state", {});
        for (const [i, state] of states.entries()) {
          const vcpu = vm.createVcpu(i);
          vcpu.setState(state);
          vcpus.push(vcpu);
        }
        writesPerReport = Number((states[0] as VcpuState).regs.rbx);
      }
      await vm.startVcpus();
      return new MicroVm(kvm, vm, vcpus, o.dirtyTracking, writesPerReport);
    } catch (e) {
      await vm?.close().catch(() => undefined);
      kvm.close();
      throw e;
    }
  }

  /** The DirtySource of the VM's tracking mode (one per VM; the migration starts and stops it). */
  dirtySource(): DirtySource {
    if (this.#source) return this.#source;
    if (this.dirtyTracking === "none")
      throw new KvmError("BAD_STATE", "this VM was created without dirty tracking", {});
    this.#source =
      this.dirtyTracking === "ring"
        ? new KvmDirtyRingSource(this.vm)
        : new KvmDirtyBitmapSource(this.vm, { manualProtect: true });
    return this.#source;
  }

  /** The first vCPU (the only one unless booted with `vcpus`). */
  get vcpu(): Vcpu {
    return this.vcpus[0] as Vcpu;
  }

  run(): void {
    for (const v of this.vcpus) v.run();
  }

  /** Parks every vCPU (each one's pending OUT completed); rejects after timeoutMs. */
  async pause(timeoutMs = 5000): Promise<PauseInfo> {
    let timer: NodeJS.Timeout | undefined;
    try {
      return await Promise.race([
        Promise.all(this.vcpus.map((v) => v.pause())).then((p) => p[0] as PauseInfo),
        new Promise<never>((_, rej) => {
          timer = setTimeout(
            () => rej(new KvmError("TIMEOUT", `vCPU did not park within ${timeoutMs} ms`, { timeoutMs })),
            timeoutMs,
          );
        }),
      ]);
    } finally {
      clearTimeout(timer);
    }
  }

  /**
   * Limits the guest to about `pagesPerSecond` dirtied pages (0: full speed) by sleeping after
   * each report. Only an upper bound: each first write to a protected page costs a fault.
   */
  setDirtyRate(pagesPerSecond: number): void {
    // The rate is the VM's: each vCPU gets its share.
    const perVcpu = pagesPerSecond / this.vcpus.length;
    this.#baseThrottleUs = perVcpu > 0 ? (this.writesPerReport * 1e6) / perVcpu : 0;
    for (const v of this.vcpus) v.throttle(this.#baseThrottleUs);
  }

  /** Auto-converge: level 0 restores the set rate; each level halves it again. */
  throttle(level: number): void {
    const base = this.#baseThrottleUs || this.writesPerReport * 5;
    for (const v of this.vcpus) v.throttle(level <= 0 ? this.#baseThrottleUs : base * 2 ** level);
  }

  /** The last report the first vCPU made (its counter). */
  get progress(): number {
    return this.vcpu.progress;
  }

  /** Each vCPU's last report. */
  get progressAll(): number[] {
    return this.vcpus.map((v) => v.progress);
  }

  async close(): Promise<void> {
    if (this.#closed) return;
    this.#closed = true;
    try {
      await this.#source?.stop();
      await this.vm.close();
    } finally {
      this.kvm.close();
    }
  }

  async [Symbol.asyncDispose](): Promise<void> {
    await this.close();
  }
}
