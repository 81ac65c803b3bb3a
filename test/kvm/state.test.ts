import assert from "node:assert/strict";
import { test } from "node:test";
import { DIRTY_BASE, type DirtierOptions } from "../../src/kvm/guest.js";
import { GuestMemory } from "../../src/memory/guest-memory.js";
import { GuestMemoryRegion } from "../../src/memory/region.js";
import { countFds } from "../helpers/proc.js";
import { longModeRig, skipWithoutKvm } from "./rig.js";

const MiB = 1 << 20;
const SIZE = 32 * MiB;

test("state saved in one VM and restored in a second over a copy of memory: the counter continues with no gap", async (t) => {
  if (skipWithoutKvm(t)) return;
  const fds = countFds();
  const o: DirtierOptions = { start: DIRTY_BASE, end: SIZE, writesPerReport: 16 };
  const a = await longModeRig({ size: SIZE, dirtier: o });
  const copy = new GuestMemory([GuestMemoryRegion.anonymous(0, SIZE)]);
  try {
    a.vcpu.run();
    await a.vcpu.waitForProgress(300);
    // A pause at an arbitrary point: the vCPU parks after its next exit, with that OUT completed.
    await a.vcpu.pause();
    const k = a.vcpu.progress;
    const state = a.vcpu.getState();
    assert.equal(state.regs.r15, BigInt(k), "the counter register equals the last reported value");
    assert.equal(state.regs.r10, BigInt(k * 16));
    const bytes = new Uint8Array(SIZE);
    a.memory.read(0, bytes);
    copy.write(0, bytes);
    await a.close();

    const b = await longModeRig({ size: SIZE, memory: copy, writeGuest: false });
    try {
      b.vcpu.setState(state);
      assert.deepEqual(b.vcpu.getState().regs, state.regs);
      b.vcpu.stopAtProgress(k + 5);
      const p = await b.vcpu.runUntilPause();
      assert.equal(p.reason, "stop-at", p.error?.message);
      assert.equal(b.vcpu.progress, k + 5);
      assert.equal(b.vcpu.reports, 5, `reports ${k + 1}..${k + 5} and no other: no gap, no repeat`);
      // The writes continue where A stopped: write i stores i into page DIRTY_BASE/4096 + i.
      for (let i = k * 16 - 2; i < (k + 5) * 16; i++) assert.equal(copy.readU64(DIRTY_BASE + i * 4096), BigInt(i));
      assert.equal(copy.readU64(DIRTY_BASE + (k + 5) * 16 * 4096), 0n);
    } finally {
      await b.close();
    }
  } finally {
    copy.close();
  }
  assert.equal(countFds(), fds, "both VMs released every fd");
});
