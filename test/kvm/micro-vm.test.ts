import assert from "node:assert/strict";
import { test } from "node:test";
import { KVM_REGS_SIZE, KVM_SREGS_SIZE } from "../../src/kvm/abi.js";
import { KvmError } from "../../src/kvm/errors.js";
import { decodeVcpuState, encodeVcpuState, MicroVm, VCPU_STATE_BYTES } from "../../src/kvm/micro-vm.js";
import { GuestMemory } from "../../src/memory/guest-memory.js";
import { GuestMemoryRegion } from "../../src/memory/region.js";
import { countFds } from "../helpers/proc.js";
import { skipWithoutKvm } from "./rig.js";

const MiB = 1 << 20;

test("vCPU state blob: magic, version, kvm_sregs, kvm_regs; round trip and bad blobs are BAD_STATE", async (t) => {
  if (skipWithoutKvm(t)) return;
  const fds = countFds();
  const memory = new GuestMemory([GuestMemoryRegion.memfd(0, 8 * MiB)]);
  const vm = await MicroVm.create({ memory, dirtyTracking: "bitmap", boot: { writesPerReport: 16 } });
  try {
    vm.run();
    await vm.vcpu.waitForProgress(20);
    await vm.pause();
    const state = vm.vcpu.getState();
    const blob = encodeVcpuState(state);
    assert.equal(blob.byteLength, VCPU_STATE_BYTES);
    assert.equal(VCPU_STATE_BYTES, 8 + KVM_SREGS_SIZE + KVM_REGS_SIZE);
    assert.deepEqual(decodeVcpuState(blob), state);
    assert.equal(state.regs.r15, BigInt(vm.progress), "the counter register is the last report");
    const bad = (b: Uint8Array) =>
      assert.throws(
        () => decodeVcpuState(b),
        (e: unknown) => e instanceof KvmError && e.code === "BAD_STATE",
      );
    bad(blob.subarray(0, blob.byteLength - 1));
    const wrongMagic = blob.slice();
    wrongMagic[0] = 0;
    bad(wrongMagic);
    const wrongVersion = blob.slice();
    wrongVersion[4] = 9;
    bad(wrongVersion);
  } finally {
    await vm.close();
    memory.close();
  }
  assert.equal(countFds(), fds);
});

test("MicroVm: exactly one of boot and restore", async (t) => {
  if (skipWithoutKvm(t)) return;
  const memory = new GuestMemory([GuestMemoryRegion.memfd(0, 4 * MiB)]);
  try {
    await assert.rejects(
      MicroVm.create({ memory, dirtyTracking: "none" }),
      (e: unknown) => e instanceof KvmError && e.code === "BAD_STATE",
    );
  } finally {
    memory.close();
  }
});
