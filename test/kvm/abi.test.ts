import assert from "node:assert/strict";
import { test } from "node:test";
import * as abi from "../../src/kvm/abi.js";
import { DIRTIER_CODE, PROGRESS_PORT } from "../../src/kvm/guest.js";

// Printed by a C program including <linux/kvm.h> on x86-64 (gcc, kernel headers of this machine).
const fromHeaders: Record<string, number> = {
  KVM_GET_API_VERSION: 0xae00,
  KVM_CREATE_VM: 0xae01,
  KVM_CHECK_EXTENSION: 0xae03,
  KVM_GET_VCPU_MMAP_SIZE: 0xae04,
  KVM_CREATE_VCPU: 0xae41,
  KVM_GET_DIRTY_LOG: 0x4010ae42,
  KVM_SET_USER_MEMORY_REGION: 0x4020ae46,
  KVM_SET_TSS_ADDR: 0xae47,
  KVM_ENABLE_CAP: 0x4068aea3,
  KVM_CLEAR_DIRTY_LOG: 0xc018aec0,
  KVM_RESET_DIRTY_RINGS: 0xaec7,
  KVM_RUN: 0xae80,
  KVM_GET_REGS: 0x8090ae81,
  KVM_SET_REGS: 0x4090ae82,
  KVM_GET_SREGS: 0x8138ae83,
  KVM_SET_SREGS: 0x4138ae84,
};

test("ioctl numbers derived with IO/IOR/IOW/IOWR equal the kernel headers'", () => {
  const ours = abi as unknown as Record<string, number>;
  for (const [name, value] of Object.entries(fromHeaders)) {
    assert.equal(ours[name], value, `${name} = 0x${ours[name]?.toString(16)}, headers say 0x${value.toString(16)}`);
  }
});

test("struct sizes and kvm_run offsets match sizeof/offsetof from the headers", () => {
  assert.equal(abi.KVM_USERSPACE_MEMORY_REGION_SIZE, 32);
  assert.equal(abi.KVM_DIRTY_LOG_SIZE, 16);
  assert.equal(abi.KVM_CLEAR_DIRTY_LOG_SIZE, 24);
  assert.equal(abi.KVM_ENABLE_CAP_SIZE, 104);
  assert.equal(abi.KVM_REGS_SIZE, 144);
  assert.equal(abi.KVM_SREGS_SIZE, 312);
  assert.equal(abi.KvmRun.io_direction, 32);
  assert.equal(abi.KvmRun.io_data_offset, 40);
  assert.equal(abi.KvmRun.mmio_data, 40);
  assert.equal(abi.KvmRun.mmio_len, 48);
  assert.equal(abi.KvmRun.mmio_is_write, 52);
  assert.equal(abi.KvmRun.fail_entry_cpu, 40);
  assert.equal(abi.KvmRun.internal_ndata, 36);
  assert.equal(abi.KvmRun.internal_data, 40);
});

test("kvm_regs and kvm_sregs round-trip through their codecs, field by field", () => {
  const regs = {} as abi.Regs;
  abi.REG_NAMES.forEach((n, i) => {
    regs[n] = (BigInt(i + 1) << 56n) | BigInt(i);
  });
  const b = abi.encodeRegs(regs);
  assert.equal(new DataView(b.buffer).getBigUint64(16 * 8, true), regs.rip, "rip is the 17th u64");
  assert.deepEqual(abi.decodeRegs(b), regs);

  const seg = (k: number): abi.Segment => ({
    base: BigInt(k) << 40n,
    limit: 0xffff0000 + k,
    selector: k * 8,
    type: k & 15,
    present: 1,
    dpl: k & 3,
    db: 1,
    s: 1,
    l: k & 1,
    g: 1,
    avl: 0,
    unusable: 0,
  });
  const sregs: abi.Sregs = {
    cs: seg(1),
    ds: seg(2),
    es: seg(3),
    fs: seg(4),
    gs: seg(5),
    ss: seg(6),
    tr: seg(7),
    ldt: seg(8),
    gdt: { base: 0x500n, limit: 23 },
    idt: { base: 0x1234_0000n, limit: 0xfff },
    cr0: 0x80000011n,
    cr2: 0xdeadn,
    cr3: 0x1000n,
    cr4: 0x20n,
    cr8: 3n,
    efer: 0x500n,
    apic_base: 0xfee00900n,
    interrupt_bitmap: [1n, 2n, 3n, 1n << 63n],
  };
  const sb = abi.encodeSregs(sregs);
  const dv = new DataView(sb.buffer);
  assert.equal(dv.getBigUint64(224, true), sregs.cr0, "cr0 at offsetof 224");
  assert.equal(dv.getBigUint64(264, true), sregs.efer, "efer at offsetof 264");
  assert.equal(dv.getBigUint64(192, true), sregs.gdt.base, "gdt at offsetof 192");
  assert.deepEqual(abi.decodeSregs(sb), sregs);
});

test("the dirtying program reports on PROGRESS_PORT", () => {
  assert.equal(DIRTIER_CODE[0x1f], 0xe7, "out imm8, eax");
  assert.equal(DIRTIER_CODE[0x20], PROGRESS_PORT);
  assert.equal(DIRTIER_CODE.length, 0x29);
});
