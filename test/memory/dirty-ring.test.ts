import assert from "node:assert/strict";
import { test } from "node:test";
import { Worker } from "node:worker_threads";
import { AtomicBitmap } from "../../src/memory/atomic-bitmap.js";
import { DirtyRing, type DirtyRingSlot, DirtyRingSource, KVM_DIRTY_GFN_F_RESET } from "../../src/memory/dirty-ring.js";
import { DirtyBitmap } from "../../src/memory/dirty-tracker.js";
import { GuestMemory } from "../../src/memory/guest-memory.js";
import { GuestMemoryRegion } from "../../src/memory/region.js";
import { SimulatedKvmRing } from "../helpers/kvm-ring-sim.js";

test("harvest reads entries in ring order, marks them RESET and stops at the first clean entry", () => {
  const sim = new SimulatedKvmRing(16);
  const ring = new DirtyRing(sim.ring, 16);
  for (let i = 0; i < 5; i++) assert.ok(sim.push(1, 100 + i));
  const seen: [number, number][] = [];
  assert.equal(
    ring.harvest((s, o) => seen.push([s, o])),
    5,
  );
  assert.deepEqual(seen, [
    [1, 100],
    [1, 101],
    [1, 102],
    [1, 103],
    [1, 104],
  ]);
  const flags = new Uint32Array(sim.ring);
  for (let i = 0; i < 5; i++) assert.equal(flags[i * 4], KVM_DIRTY_GFN_F_RESET);
  assert.equal(
    ring.harvest(() => assert.fail("nothing is dirty")),
    0,
  );
  assert.equal(sim.reset(), 5);
  // Wraparound: the next pushes reuse the recycled entries and the fetch index continues.
  for (let i = 0; i < 12; i++) assert.ok(sim.push(2, 2 ** 40 + i)); // offsets above 32 bits
  const offs: number[] = [];
  ring.harvest((_s, o) => offs.push(o));
  assert.deepEqual(
    offs,
    Array.from({ length: 12 }, (_, i) => 2 ** 40 + i),
  );
  assert.equal(ring.fetchIndex, 17);
});

test("a full ring stops the producer until harvest + reset, and nothing is lost", () => {
  const sim = new SimulatedKvmRing(16);
  const ring = new DirtyRing(sim.ring, 16);
  let pushed = 0;
  while (sim.push(0, pushed)) pushed++;
  assert.equal(pushed, 12, "soft limit = size - reserved");
  assert.ok(sim.softFull);
  const got: number[] = [];
  ring.harvest((_s, o) => got.push(o));
  assert.ok(sim.softFull, "harvest alone frees nothing: the reset does");
  assert.equal(sim.reset(), 12);
  assert.ok(sim.push(0, pushed));
  ring.harvest((_s, o) => got.push(o));
  assert.deepEqual(
    got,
    Array.from({ length: 13 }, (_, i) => i),
  );
});

test("DirtyRingSource against a concurrent producer: ring full exits, kick flush, backup bitmap collected last", async (t) => {
  const PAGES = 8192;
  const COUNT = PAGES / 2; // the vCPU dirties the lower half; the backup bitmap the upper half
  const mem = new GuestMemory([GuestMemoryRegion.memfd(1 << 30, PAGES * 4096)]);
  const sim = new SimulatedKvmRing(64);
  const backup = new AtomicBitmap(PAGES * 4096);
  const control = new SharedArrayBuffer(16);
  const ctl = new Int32Array(control);
  const slot: DirtyRingSlot = { slot: (1 << 16) | 3, guestBase: 1 << 30, size: PAGES * 4096 };
  const order: string[] = [];
  const source = new DirtyRingSource(
    {
      rings: [new DirtyRing(sim.ring, 64)],
      resetRings: () => {
        order.push("reset");
        return sim.reset();
      },
      kickVcpus: async () => {
        order.push("kick");
        Atomics.store(ctl, 0, 1);
        Atomics.notify(ctl, 0);
        while (Atomics.load(ctl, 1) === 0) await new Promise((r) => setTimeout(r, 1));
        // The vCPU flushed its buffered entries and is out of KVM_RUN; wait until it is done.
        while (Atomics.load(ctl, 2) === 0) await new Promise((r) => setTimeout(r, 1));
      },
      backupBitmap: (s) => {
        order.push("bitmap");
        assert.equal(s.slot, slot.slot);
        // KVM_GET_DIRTY_LOG returns and clears.
        const words = new Uint32Array(backup.words.length);
        for (let i = 0; i < words.length; i++) words[i] = Atomics.exchange(backup.words, i, 0);
        return words;
      },
    },
    [slot],
  );
  const worker = new Worker(new URL("../helpers/kvm-ring-producer.js", import.meta.url), {
    workerData: {
      ring: sim.toShared(),
      slot: slot.slot,
      pages: PAGES,
      count: COUNT,
      backup: backup.toShared(),
      control,
      pendingAtEnd: 7,
    },
  });
  const exited = new Promise((resolve, reject) => {
    worker.on("exit", resolve);
    worker.on("error", reject);
  });
  const sink = new DirtyBitmap(mem);
  source.start();
  // Rounds while the vCPU runs: only the rings, never the backup bitmap.
  let rounds = 0;
  while (source.stats.harvested < COUNT - 7 && rounds < 100000) {
    await source.sync(sink);
    rounds++;
    await new Promise((r) => setImmediate(r));
  }
  assert.ok(!order.includes("bitmap"), "the backup bitmap is read only in the final sync");
  order.length = 0;
  await source.sync(sink, { final: true });
  await exited;
  t.diagnostic(`${rounds} rounds, ${Atomics.load(ctl, 3)} full-ring exits, ${source.stats.resets} resets`);
  assert.ok(Atomics.load(ctl, 3) > 0, "the ring never filled: the test did not exercise full-ring exits");
  assert.equal(order[0], "kick");
  assert.equal(order[order.length - 1], "bitmap", "backup bitmap collected last");
  assert.ok(order.indexOf("reset") < order.indexOf("bitmap"));
  const dirty = new Set(sink.bitmaps[0]?.dirtyPages());
  for (let p = 0; p < COUNT; p++) assert.ok(dirty.has(p), `ring entry for page ${p} lost`);
  for (let i = 0; i < COUNT; i += 5)
    assert.ok(dirty.has(PAGES / 2 + (i % (PAGES / 2))), `backup page lost (write ${i})`);
  assert.ok(dirty.has(PAGES - 1), "the write outside vCPU context just before the final sync was missed");
  assert.equal(source.unknownEntries, 0);
  mem.close();
});

test("entries naming an unknown slot or an offset past the slot are counted, not applied", async () => {
  const sim = new SimulatedKvmRing(16);
  const src = new DirtyRingSource({ rings: [new DirtyRing(sim.ring, 16)], resetRings: () => sim.reset() }, [
    { slot: 0, guestBase: 0, size: 4 * 4096 },
  ]);
  sim.push(0, 1);
  sim.push(9, 1);
  sim.push(0, 4);
  const mem = new GuestMemory([GuestMemoryRegion.memfd(0, 4 * 4096)]);
  const sink = new DirtyBitmap(mem);
  await src.sync(sink);
  assert.deepEqual([...(sink.bitmaps[0]?.dirtyPages() ?? [])], [1]);
  assert.equal(src.unknownEntries, 2);
  mem.close();
});
