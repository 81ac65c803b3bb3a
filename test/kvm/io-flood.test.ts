/**
 * issue 12, item 7: a guest exiting on port I/O as fast as it can, while the main thread is
 * busy. Every exit was one message into an unbounded queue to the main thread; now at most
 * MAX_PENDING_IO reports wait there and the rest are counted as dropped. The guest is the
 * dirtying program with its progress port moved elsewhere, so each of its reports (an OUT to
 * 0x10) is an I/O exit no built-in device handles. Needs /dev/kvm (skips loudly without).
 */
import assert from "node:assert/strict";
import { test } from "node:test";
import { DIRTY_BASE, dirtierRegs, longModeSregs, writeLongModeGuest } from "../../src/kvm/guest.js";
import { Kvm } from "../../src/kvm/kvm.js";
import { MAX_PENDING_IO } from "../../src/kvm/protocol.js";
import { GuestMemory } from "../../src/memory/guest-memory.js";
import { GuestMemoryRegion } from "../../src/memory/region.js";
import { skipWithoutKvm } from "./rig.js";

const MiB = 1 << 20;
const EXITS = 20 * MAX_PENDING_IO;

test("port-I/O flood with a busy main thread: at most MAX_PENDING_IO reports queued, the rest counted", async (t) => {
  if (skipWithoutKvm(t)) return;
  const kvm = Kvm.open();
  const vm = kvm.createVm();
  const memory = new GuestMemory([GuestMemoryRegion.anonymous(0, 8 * MiB)]);
  try {
    writeLongModeGuest(memory, 8 * MiB);
    vm.setMemory(memory);
    const vcpu = vm.createVcpu(0);
    vcpu.setSregs(longModeSregs(vcpu.getSregs()));
    vcpu.setRegs(dirtierRegs(vcpu.getRegs(), { start: DIRTY_BASE, end: 8 * MiB, writesPerReport: 1, reports: 0 }));
    // The progress port moved away from 0x10: every report is an unhandled OUT.
    await vcpu.start({ progressPort: 0x11 });
    let delivered = 0;
    vcpu.onIo(() => {
      delivered++;
    });
    vcpu.run();
    // The main thread does not return to its event loop until the guest exited EXITS times.
    while (vcpu.exits.io < EXITS) Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, 1);
    // Still without a turn of the event loop: nothing was handled, so everything not dropped is queued.
    const exitsThen = vcpu.exits.io;
    const droppedThen = vcpu.droppedIoReports;
    assert.equal(delivered, 0);
    assert.ok(
      exitsThen - droppedThen <= MAX_PENDING_IO + 1,
      `${exitsThen} exits, ${droppedThen} dropped: more than ${MAX_PENDING_IO} reports were queued`,
    );
    await vcpu.pause();
    await new Promise((r) => setImmediate(r));
    assert.ok(delivered >= 1 && delivered <= vcpu.exits.io - vcpu.droppedIoReports, "each report at most once");
  } finally {
    await vm.close();
    kvm.close();
    memory.close();
  }
});
