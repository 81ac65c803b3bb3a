import assert from "node:assert/strict";
import { test } from "node:test";
import { KvmDirtyBitmapSource, KvmDirtyRingSource, ringWithBitmapSupport } from "../../src/kvm/dirty.js";
import { DIRTY_BASE, type DirtierOptions } from "../../src/kvm/guest.js";
import type { DirtySource } from "../../src/memory/dirty-source.js";
import { DirtyBitmap } from "../../src/memory/dirty-tracker.js";
import { type LongModeRig, longModeRig, skipWithoutKvm } from "./rig.js";

const MiB = 1 << 20;
/** "bitmap": manual protect (GET + CLEAR); "bitmap-get-clears": GET_DIRTY_LOG clears and protects. */
type Kind = "bitmap" | "bitmap-get-clears" | "ring";

async function rigFor(kind: Kind, size: number, dirtier: DirtierOptions, ringEntries = 4096) {
  const rig = await longModeRig({ size, dirtier, ringEntries: kind === "ring" ? ringEntries : 0 });
  const source: DirtySource =
    kind === "ring"
      ? new KvmDirtyRingSource(rig.vm)
      : new KvmDirtyBitmapSource(rig.vm, { manualProtect: kind === "bitmap" });
  await source.start();
  return { rig, source };
}

/** Pages reported by one sync, as guest page numbers. */
async function syncPages(rig: LongModeRig, source: DirtySource, final = false): Promise<number[]> {
  const sink = new DirtyBitmap(rig.memory);
  await source.sync(sink, { final });
  return [...sink.take(0)];
}

/** Pages written by writes [from, to) of the program (it wraps to the range start). */
function pagesOfWrites(o: DirtierOptions, from: number, to: number): number[] {
  const stride = o.stride ?? 4096;
  const perPass = Math.ceil((o.end - o.start) / stride);
  const out = new Set<number>();
  for (let i = from; i < to; i++) out.add(Math.floor((o.start + (i % perPass) * stride) / 4096));
  return [...out].sort((a, b) => a - b);
}

for (const kind of ["bitmap", "bitmap-get-clears", "ring"] as const) {
  test(`${kind}: each sync reports exactly the pages the guest wrote since the last one (stop-at, hlt)`, async (t) => {
    if (skipWithoutKvm(t)) return;
    // Every third page of [1 MiB, 9 MiB): 683 pages a pass, so the third round wraps.
    const o: DirtierOptions = { start: DIRTY_BASE, end: 9 * MiB, stride: 3 * 4096, writesPerReport: 10, reports: 90 };
    const { rig, source } = await rigFor(kind, 16 * MiB, o);
    try {
      assert.deepEqual(await syncPages(rig, source), [], "nothing ran yet");
      let done = 0;
      for (const [stopAt, reason] of [
        [20, "stop-at"],
        [50, "stop-at"],
        [0, "hlt"],
      ] as const) {
        rig.vcpu.stopAtProgress(stopAt);
        const p = await rig.vcpu.runUntilPause();
        assert.equal(p.reason, reason, p.error?.message);
        const writes = Number(rig.vcpu.getRegs().r10);
        assert.deepEqual(await syncPages(rig, source), pagesOfWrites(o, done, writes), `writes [${done}, ${writes})`);
        done = writes;
      }
      assert.equal(done, 900);
      assert.deepEqual(await syncPages(rig, source), [], "a halted guest dirties nothing more");
      if (source instanceof KvmDirtyBitmapSource) t.diagnostic(`manual protect: ${source.manualProtect}`);
    } finally {
      await source.stop();
      await rig.close();
    }
  });

  test(`${kind}: syncs while the vCPU runs, then a final sync after pause: the union is exactly what was written`, async (t) => {
    if (skipWithoutKvm(t)) return;
    const o: DirtierOptions = { start: DIRTY_BASE, end: 64 * MiB, writesPerReport: 8 };
    const { rig, source } = await rigFor(kind, 64 * MiB, o);
    try {
      rig.vcpu.throttle(50); // ~20k pages/s: several syncs land mid-run
      rig.vcpu.run();
      const union = new Set<number>();
      const counts: number[] = [];
      for (let i = 0; i < 5; i++) {
        await new Promise((r) => setTimeout(r, 15));
        if (kind === "ring" && i === 2) await rig.vm.kickVcpus();
        const got = await syncPages(rig, source);
        counts.push(got.length);
        for (const p of got) union.add(p);
      }
      assert.ok(rig.vcpu.running, "kicks and syncs leave the vCPU running");
      await rig.vcpu.pause();
      for (const p of await syncPages(rig, source, true)) union.add(p);
      const writes = Number(rig.vcpu.getRegs().r10);
      assert.ok(writes < (64 * MiB - DIRTY_BASE) / 4096, "no wrap: every write is a new page");
      t.diagnostic(`${writes} pages written, syncs mid-run saw ${counts.join(", ")}`);
      assert.ok(counts.filter((c) => c > 0).length >= 2, "syncs happened while the guest was writing");
      assert.deepEqual(
        [...union].sort((a, b) => a - b),
        pagesOfWrites(o, 0, writes),
      );
    } finally {
      await source.stop();
      await rig.close();
    }
  });
}

test("ring: a small ring fills, the vCPU exits with KVM_EXIT_DIRTY_RING_FULL, is harvested and runs on; nothing lost", async (t) => {
  if (skipWithoutKvm(t)) return;
  const o: DirtierOptions = { start: DIRTY_BASE, end: 32 * MiB, writesPerReport: 100, reports: 30 };
  // 256 entries = 4 KiB, the smallest ring KVM accepts; 3000 pages fill it many times.
  const { rig, source } = await rigFor("ring", 32 * MiB, o, 256);
  try {
    const p = await rig.vcpu.runUntilPause();
    assert.equal(p.reason, "hlt", p.error?.message);
    const ring = source as KvmDirtyRingSource;
    t.diagnostic(
      `full-ring exits: ${ring.ringFullExits}, harvested ${ring.stats.harvested}, resets ${ring.stats.resets}`,
    );
    assert.ok(ring.ringFullExits >= 3000 / 256 - 1, `${ring.ringFullExits} full-ring exits`);
    assert.deepEqual(await syncPages(rig, source, true), pagesOfWrites(o, 0, 3000));
    assert.equal(ring.unknownEntries, 0);
  } finally {
    await source.stop();
    await rig.close();
  }
});

test("ring-with-bitmap is detected and, on x86, reported as not offered", async (t) => {
  if (skipWithoutKvm(t)) return;
  const rig = await longModeRig({ size: 4 * MiB, ringEntries: 1024 });
  try {
    const support = ringWithBitmapSupport(rig.kvm);
    t.diagnostic(support.detail);
    assert.equal(rig.vm.dirtyRing?.withBitmap, support.offered);
    assert.equal(rig.vm.backupBitmap === undefined, !support.offered);
    if (process.arch === "x64") assert.equal(support.offered, false, "x86 never offers ring-with-bitmap");
    t.diagnostic(`ring: ${rig.vm.dirtyRing?.entries} entries, ACQ_REL ${rig.vm.dirtyRing?.acqRel}`);
  } finally {
    await rig.close();
  }
});

for (const kind of ["bitmap", "ring"] as const) {
  test(`${kind}, two vCPUs in their own threads writing disjoint ranges: syncs mid-run and a final one see exactly both`, async (t) => {
    if (skipWithoutKvm(t)) return;
    const { Kvm } = await import("../../src/kvm/kvm.js");
    const { GuestMemory } = await import("../../src/memory/guest-memory.js");
    const { GuestMemoryRegion } = await import("../../src/memory/region.js");
    const { dirtierRegs, longModeSregs, writeLongModeGuest } = await import("../../src/kvm/guest.js");
    const size = 64 * MiB;
    const kvm = Kvm.open();
    const vm = kvm.createVm();
    const memory = new GuestMemory([GuestMemoryRegion.anonymous(0, size)]);
    const ranges: DirtierOptions[] = [
      { start: DIRTY_BASE, end: 32 * MiB, writesPerReport: 8 },
      { start: 32 * MiB, end: 64 * MiB, writesPerReport: 8 },
    ];
    try {
      writeLongModeGuest(memory, size);
      vm.setMemory(memory);
      // Rings are per vCPU: each one's entries are harvested into the same bitmap.
      if (kind === "ring") vm.enableDirtyRing(4096);
      const vcpus = ranges.map((o, id) => {
        const v = vm.createVcpu(id);
        v.setSregs(longModeSregs(v.getSregs()));
        v.setRegs(dirtierRegs(v.getRegs(), o));
        return v;
      });
      await vm.startVcpus();
      const source: DirtySource =
        kind === "ring" ? new KvmDirtyRingSource(vm) : new KvmDirtyBitmapSource(vm, { manualProtect: true });
      await source.start();
      const union = new Set<number>();
      const sync = async (final = false) => {
        const sink = new DirtyBitmap(memory);
        await source.sync(sink, { final });
        for (const p of sink.take(0)) union.add(p);
      };
      for (const v of vcpus) {
        v.throttle(50);
        v.run();
      }
      for (let i = 0; i < 4; i++) {
        await new Promise((r) => setTimeout(r, 15));
        await sync();
      }
      await Promise.all(vcpus.map((v) => v.pause()));
      await sync(true);
      await source.stop();
      const want = new Set<number>();
      vcpus.forEach((v, i) => {
        const writes = Number(v.getRegs().r10);
        assert.ok(writes > 0, `vCPU ${i} ran`);
        for (const p of pagesOfWrites(ranges[i] as DirtierOptions, 0, writes)) want.add(p);
      });
      t.diagnostic(`${want.size} pages written by two vCPUs`);
      assert.deepEqual(
        [...union].sort((a, b) => a - b),
        [...want].sort((a, b) => a - b),
      );
    } finally {
      await vm.close();
      kvm.close();
      memory.close();
    }
  });
}
