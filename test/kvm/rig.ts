/**
 * Shared setup of the KVM tests: skip loudly without /dev/kvm, and a VM with one memslot
 * running the long-mode dirtying program.
 */
import type { TestContext } from "node:test";
import { type DirtierOptions, dirtierRegs, longModeSregs, writeLongModeGuest } from "../../src/kvm/guest.js";
import { Kvm, kvmUnavailableReason } from "../../src/kvm/kvm.js";
import type { Vcpu } from "../../src/kvm/vcpu.js";
import type { Vm } from "../../src/kvm/vm.js";
import { GuestMemory } from "../../src/memory/guest-memory.js";
import { GuestMemoryRegion } from "../../src/memory/region.js";

let reason: string | null | undefined;

/** True when the test must skip; it then says why, in the test report and on stderr. */
export function skipWithoutKvm(t: TestContext): boolean {
  reason ??= kvmUnavailableReason();
  if (reason === null) return false;
  const msg = `SKIPPED: no usable /dev/kvm (${reason}); KVM tests need /dev/kvm read-write`;
  console.warn(`[test/kvm] ${t.name}: ${msg}`);
  t.skip(msg);
  return true;
}

export interface LongModeRig {
  kvm: Kvm;
  vm: Vm;
  vcpu: Vcpu;
  memory: GuestMemory;
  close(): Promise<void>;
}

export interface RigOptions {
  /** Guest memory size (one region at GPA 0, anonymous, MAP_NORESERVE). */
  size: number;
  /** Dirty ring entries per vCPU (enabled before the vCPU), or 0 for none. */
  ringEntries?: number;
  /** Memory to use instead of a new region (e.g. a copy); not closed by the rig. */
  memory?: GuestMemory;
  /** Start the dirtying program with these options (else regs/sregs are left at reset). */
  dirtier?: DirtierOptions;
  /** Write page tables and code (default true; false when `memory` already holds them). */
  writeGuest?: boolean;
}

export async function longModeRig(o: RigOptions): Promise<LongModeRig> {
  const kvm = Kvm.open();
  const vm = kvm.createVm();
  const ownMemory = !o.memory;
  const memory = o.memory ?? new GuestMemory([GuestMemoryRegion.anonymous(0, o.size)]);
  if (o.writeGuest ?? true) writeLongModeGuest(memory, o.size);
  vm.setMemory(memory);
  if (o.ringEntries) vm.enableDirtyRing(o.ringEntries);
  const vcpu = vm.createVcpu(0);
  if (o.dirtier) {
    vcpu.setSregs(longModeSregs(vcpu.getSregs()));
    vcpu.setRegs(dirtierRegs(vcpu.getRegs(), o.dirtier));
  }
  await vm.startVcpus();
  return {
    kvm,
    vm,
    vcpu,
    memory,
    async close() {
      await vm.close();
      kvm.close();
      if (ownMemory) memory.close();
    },
  };
}
