import assert from "node:assert/strict";
import { test } from "node:test";
import { KVM_EXIT_HLT } from "../../src/kvm/abi.js";
import { KvmError } from "../../src/kvm/errors.js";
import { CODE_ADDR, DIRTY_BASE, REAL_MODE_CODE, REAL_MODE_CODE_ADDR, realModeState } from "../../src/kvm/guest.js";
import { Kvm } from "../../src/kvm/kvm.js";
import type { VcpuIoEvent } from "../../src/kvm/vcpu.js";
import { GuestMemory } from "../../src/memory/guest-memory.js";
import { GuestMemoryRegion } from "../../src/memory/region.js";
import { Mapping } from "../../src/sys/mapping.js";
import { countFds } from "../helpers/proc.js";
import { longModeRig, skipWithoutKvm } from "./rig.js";

const MiB = 1 << 20;

test("a real-mode guest exits through OUT, IN and HLT, reported to the main thread", async (t) => {
  if (skipWithoutKvm(t)) return;
  const fds = countFds();
  {
    using kvm = Kvm.open();
    const vm = kvm.createVm();
    using memory = new GuestMemory([GuestMemoryRegion.anonymous(0, 0x10000)]);
    memory.write(REAL_MODE_CODE_ADDR, REAL_MODE_CODE);
    vm.setMemory(memory);
    const vcpu = vm.createVcpu();
    const s = realModeState(vcpu.getSregs(), vcpu.getRegs());
    vcpu.setState(s);
    await vm.startVcpus();
    const io: VcpuIoEvent[] = [];
    vcpu.onIo((e) => io.push(e));
    const p = await vcpu.runUntilPause();
    assert.equal(p.reason, "hlt");
    assert.equal(p.exitReason, KVM_EXIT_HLT);
    await new Promise((r) => setImmediate(r)); // io events were posted before the pause
    assert.deepEqual(
      io.map((e) => (e.type === "io" ? [e.direction, e.port, e.data] : [])),
      [
        ["out", 0x11, [0x2a]],
        ["in", 0x12, [0xff]],
        ["out", 0x13, [0xff]],
      ],
    );
    assert.equal(vcpu.getRegs().rip, BigInt(REAL_MODE_CODE_ADDR + REAL_MODE_CODE.length), "RIP past hlt");
    await vm.close();
  }
  assert.equal(countFds(), fds, "no fd leaked (kvm, vm, vcpu)");
});

test("the long-mode dirtier writes its counter into every page and halts after the asked reports", async (t) => {
  if (skipWithoutKvm(t)) return;
  const fds = countFds();
  const dirtier = { start: DIRTY_BASE, end: 8 * MiB, writesPerReport: 32, reports: 40 };
  const rig = await longModeRig({ size: 8 * MiB, dirtier });
  try {
    const p = await rig.vcpu.runUntilPause();
    assert.equal(p.reason, "hlt", p.error?.message);
    assert.equal(rig.vcpu.progress, 40);
    assert.equal(rig.vcpu.exits.io, 40);
    const regs = rig.vcpu.getRegs();
    assert.equal(regs.r10, 40n * 32n, "total writes");
    assert.equal(regs.rip, BigInt(CODE_ADDR + 0x27), "stopped after hlt");
    for (let i = 0; i < 40 * 32; i++) assert.equal(rig.memory.readU64(DIRTY_BASE + i * 4096), BigInt(i));
    assert.equal(rig.memory.readU64(DIRTY_BASE + 40 * 32 * 4096), 0n, "nothing past the last write");
  } finally {
    await rig.close();
  }
  assert.equal(countFds(), fds);
});

test("pause() gets a free-running vCPU out of KVM_RUN; run() resumes; stop-at and throttle work", async (t) => {
  if (skipWithoutKvm(t)) return;
  const rig = await longModeRig({ size: 16 * MiB, dirtier: { start: DIRTY_BASE, end: 16 * MiB, writesPerReport: 16 } });
  try {
    rig.vcpu.run();
    await rig.vcpu.waitForProgress(200);
    assert.ok(rig.vcpu.running);
    assert.throws(
      () => rig.vcpu.getRegs(),
      (e: unknown) => e instanceof KvmError && e.code === "BAD_STATE",
    );
    const p = await rig.vcpu.pause();
    assert.equal(p.reason, "command");
    const at = rig.vcpu.progress;
    const regs = rig.vcpu.getRegs();
    assert.equal(regs.r15, BigInt(at), "the I/O was completed before parking: r15 is the last reported value");
    await new Promise((r) => setTimeout(r, 20));
    assert.equal(rig.vcpu.progress, at, "a paused vCPU does not run");

    rig.vcpu.stopAtProgress(at + 100);
    const q = await rig.vcpu.runUntilPause();
    assert.equal(q.reason, "stop-at");
    assert.equal(rig.vcpu.progress, at + 100);

    // Throttled to 1 ms per report: 20 reports take at least 20 ms.
    rig.vcpu.stopAtProgress(0);
    rig.vcpu.throttle(1000);
    const t0 = performance.now();
    rig.vcpu.run();
    await rig.vcpu.waitForProgress(at + 120);
    assert.ok(performance.now() - t0 >= 19, "throttled");
    await rig.vcpu.pause();
  } finally {
    await rig.close();
  }
});

test("a guest that never exits is still stopped by close(): its memslots go, its next access exits", async (t) => {
  if (skipWithoutKvm(t)) return;
  const fds = countFds();
  const kvm = Kvm.open();
  const vm = kvm.createVm();
  const memory = new GuestMemory([GuestMemoryRegion.anonymous(0, 0x10000)]);
  memory.write(REAL_MODE_CODE_ADDR, Uint8Array.of(0xeb, 0xfe)); // jmp $
  vm.setMemory(memory);
  const vcpu = vm.createVcpu();
  vcpu.setState(realModeState(vcpu.getSregs(), vcpu.getRegs()));
  await vm.startVcpus();
  vcpu.run();
  await new Promise((r) => setTimeout(r, 20));
  assert.ok(vcpu.running);
  const t0 = performance.now();
  await vm.close();
  assert.ok(vcpu.closed);
  t.diagnostic(`forced close took ${(performance.now() - t0).toFixed(0)} ms`);
  kvm.close();
  memory.close();
  assert.equal(countFds(), fds);
});

test("a triple fault is a typed SHUTDOWN pause; fetching code outside guest memory an INTERNAL_ERROR", async (t) => {
  if (skipWithoutKvm(t)) return;
  const rig = await longModeRig({ size: 4 * MiB, dirtier: { start: DIRTY_BASE, end: 4 * MiB } });
  try {
    rig.memory.write(CODE_ADDR, Uint8Array.of(0x0f, 0x0b)); // ud2 with an empty IDT: #UD, #DF, shutdown
    const s = rig.vcpu.getSregs();
    rig.vcpu.setSregs({ ...s, idt: { base: 0n, limit: 0 } });
    const p = await rig.vcpu.runUntilPause();
    assert.equal(p.reason, "error");
    assert.ok(p.error instanceof KvmError);
    assert.equal(p.error.code, "SHUTDOWN", p.error.message);

    // RIP in mapped, paged memory that no memslot backs: KVM cannot emulate an MMIO fetch.
    rig.vcpu.setRegs({ ...rig.vcpu.getRegs(), rip: BigInt(8 * MiB) });
    const q = await rig.vcpu.runUntilPause();
    assert.equal(q.error?.code, "INTERNAL_ERROR", q.error?.message);
    assert.equal(q.error?.values.suberror, 1, "KVM_INTERNAL_ERROR_EMULATION");
  } finally {
    await rig.close();
  }
});

test("bad inputs are typed errors with the values that were wrong", async (t) => {
  if (skipWithoutKvm(t)) return;
  using kvm = Kvm.open();
  const vm = kvm.createVm();
  using memory = new GuestMemory([GuestMemoryRegion.anonymous(0, 0x20000)]);
  const host = memory.regions[0]?.hostAddress as bigint;
  const mapping = memory.regions[0]?.mapping as Mapping;
  const isCode = (code: string, check?: (e: KvmError) => void) => (e: unknown) => {
    assert.ok(e instanceof KvmError, String(e));
    assert.equal(e.code, code, e.message);
    check?.(e);
    return true;
  };
  const slot = { slot: 0, flags: 0, guestPhysAddr: 0, memorySize: 0x10000, mapping };
  assert.throws(
    () => vm.setUserMemoryRegion({ ...slot, guestPhysAddr: 0x1001 }),
    isCode("BAD_MEMSLOT", (e) => assert.equal(e.values.guestPhysAddr, 0x1001)),
  );
  assert.throws(() => vm.setUserMemoryRegion({ ...slot, memorySize: 0x1800 }), isCode("BAD_MEMSLOT"));
  assert.throws(() => vm.setUserMemoryRegion({ ...slot, offset: 8 }), isCode("BAD_MEMSLOT"));
  // issue 12, item 8: the host range is a mapping's, inside it, and the mapping must be open.
  assert.throws(
    () => vm.setUserMemoryRegion({ ...slot, offset: 0x18000 }),
    isCode("BAD_MEMSLOT", (e) => assert.match(e.message, /runs past its mapping/)),
  );
  const gone = Mapping.anonymous(0x10000);
  gone.close();
  assert.throws(
    () => vm.setUserMemoryRegion({ ...slot, mapping: gone }),
    isCode("BAD_MEMSLOT", (e) => assert.match(e.message, /mapping is closed/)),
  );
  assert.throws(() => vm.setUserMemoryRegion({ ...slot, slot: 1 << 20 }), isCode("BAD_MEMSLOT"));
  vm.setUserMemoryRegion(slot);
  assert.equal(vm.memslots[0]?.mapping, mapping, "the slot holds its mapping");
  assert.equal(vm.memslots[0]?.userspaceAddr, host);
  assert.throws(
    () => vm.setUserMemoryRegion({ ...slot, slot: 1, guestPhysAddr: 0x8000, offset: 0x10000 }),
    isCode("BAD_MEMSLOT", (e) => assert.match(e.message, /overlaps slot 0/)),
  );
  assert.throws(
    () => vm.createVcpu(kvm.maxVcpuId),
    isCode("BAD_VCPU_ID", (e) => assert.equal(e.values.id, kvm.maxVcpuId)),
  );
  assert.throws(() => vm.createVcpu(-1), isCode("BAD_VCPU_ID"));
  const v = vm.createVcpu(0);
  assert.throws(() => vm.createVcpu(0), isCode("BAD_VCPU_ID"));
  assert.throws(() => vm.enableDirtyRing(4096), isCode("BAD_STATE"), "rings come before vCPUs");
  assert.throws(() => v.run(), isCode("BAD_STATE"), "no thread yet");
  assert.throws(
    () => vm.enableCap(0x7fffffff),
    isCode("IOCTL", (e) => assert.equal(e.values.code, "EINVAL")),
  );
  await vm.close();
  assert.throws(() => vm.createVcpu(1), isCode("BAD_STATE"));
});
