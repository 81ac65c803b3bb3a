import assert from "node:assert/strict";
import { test } from "node:test";
import { Worker } from "node:worker_threads";
import { SplitQueueDriver } from "../../src/virtio/driver.js";
import {
  features,
  VIRTIO_F_VERSION_1,
  VIRTIO_RING_F_EVENT_IDX,
  VIRTIO_RING_F_INDIRECT_DESC,
} from "../../src/virtio/features.js";
import type { DeviceWorkerData } from "./device-worker.js";
import { DATA, INDIRECT_BASE, INDIRECT_ENTRIES, makeMemory, openFds, RING_BASE } from "./helpers.js";

const KICK = 0;
const IRQ = 1;
const STOP = 2;

test("test_device_in_a_worker_driver_on_the_main_thread", { timeout: 30_000 }, async () => {
  const fdsBefore = openFds();
  const mem = makeMemory();
  const f = features(VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC);
  const size = 16;
  const driver = SplitQueueDriver.at(mem, RING_BASE, size, {
    features: f,
    indirectTables: { address: INDIRECT_BASE, entries: INDIRECT_ENTRIES },
  });
  const signals = new SharedArrayBuffer(12);
  const sig = new Int32Array(signals);
  const wd: DeviceWorkerData = { memory: mem.toShared(), layout: driver.layout, features: f, signals };
  const worker = new Worker(new URL("./device-worker.js", import.meta.url), { workerData: wd });
  const result = new Promise<Record<string, number>>((resolve, reject) => {
    worker.once("message", resolve);
    worker.once("error", reject);
  });

  // 500 requests of 1..3 readable buffers and 1..2 writable ones, half of them indirect, at
  // most 12 in flight: the 16-entry rings wrap ~30 times.
  const TOTAL = 500;
  const SLOT = 0x100;
  const expected = new Map<number, { slot: number; bytes: Uint8Array }>();
  const freeSlots = Array.from({ length: 12 }, (_, i) => i);
  let sent = 0;
  let done = 0;
  let kicks = 0;
  while (done < TOTAL) {
    let added = 0;
    while (sent < TOTAL && freeSlots.length > 0) {
      const slot = freeSlots.pop() as number;
      const base = DATA + slot * SLOT;
      const len = 1 + ((sent * 7) % 40);
      const payload = Uint8Array.from({ length: len }, (_, i) => (sent + i) & 0xff);
      mem.write(base, payload);
      const cut = Math.floor(len / 2);
      const readable =
        cut > 0
          ? [
              { addr: base, len: cut },
              { addr: base + cut, len: len - cut },
            ]
          : [{ addr: base, len }];
      const writable = [
        { addr: base + 0x80, len: 5 },
        { addr: base + 0x85, len: 0x7b },
      ];
      let head: number;
      try {
        head = driver.add(readable, writable, { indirect: sent % 2 === 0 });
      } catch {
        freeSlots.push(slot);
        break; // no descriptors free: collect first
      }
      expected.set(head, { slot, bytes: payload.slice().reverse() });
      sent++;
      added++;
    }
    if (added > 0 && driver.publish()) {
      kicks++;
      Atomics.add(sig, KICK, 1);
      Atomics.notify(sig, KICK);
    }
    const irqs = Atomics.load(sig, IRQ);
    let got = 0;
    for (let u = driver.getUsed(); u; u = driver.getUsed()) {
      const e = expected.get(u.head);
      assert.ok(e, `used head ${u.head} is in flight`);
      expected.delete(u.head);
      assert.equal(u.len, e.bytes.length);
      assert.deepEqual(mem.read(DATA + e.slot * SLOT + 0x80, u.len), e.bytes);
      freeSlots.push(e.slot);
      done++;
      got++;
    }
    if (got === 0 && !driver.enableInterrupts()) {
      await Atomics.waitAsync(sig, IRQ, irqs, 1000).value;
    }
  }
  Atomics.store(sig, STOP, 1);
  Atomics.add(sig, KICK, 1);
  Atomics.notify(sig, KICK);
  const stats = await result;
  await worker.terminate();

  assert.equal(stats.chains, TOTAL);
  assert.equal(stats.nextAvail, TOTAL & 0xffff);
  assert.equal(stats.nextUsed, TOTAL & 0xffff);
  assert.equal(driver.numFree, size);
  assert.ok(kicks > 0 && kicks <= TOTAL, `${kicks} kicks`);
  assert.ok((stats.interrupts ?? 0) > 0);
  assert.ok((stats.dirtyBytes ?? 0) > 0);
  mem.close();
  assert.equal(openFds(), fdsBefore, "no fd left behind");
});
