/**
 * The device side of worker.test.ts, in a worker thread: a SplitQueue over the GuestMemory the
 * main thread posted (same pages, no copy). It reverses each request's readable bytes into its
 * writable part. Kicks and interrupts are counters in a SharedArrayBuffer (eventfds stand in
 * for them in the real backend).
 */
import { parentPort, workerData } from "node:worker_threads";
import { GuestMemory, type SharedGuestMemory } from "../../src/memory/guest-memory.js";
import { SplitQueue } from "../../src/virtio/queue.js";
import type { SplitQueueLayout } from "../../src/virtio/ring.js";

export interface DeviceWorkerData {
  memory: SharedGuestMemory;
  layout: SplitQueueLayout;
  features: bigint;
  /** [0] kicks (driver → device), [1] interrupts (device → driver), [2] stop. */
  signals: SharedArrayBuffer;
}

const KICK = 0;
const IRQ = 1;
const STOP = 2;

const data = workerData as DeviceWorkerData;
const sig = new Int32Array(data.signals);
const mem = GuestMemory.fromShared(data.memory);
const q = new SplitQueue(mem, { ...data.layout, features: data.features });
let chains = 0;
let interrupts = 0;
let dirtyBytes = 0;
q.setDirtyLog((_gpa, len) => {
  dirtyBytes += len;
});

while (Atomics.load(sig, STOP) === 0) {
  // Read the kick counter before the last check: a kick after this point makes wait() return.
  const kicks = Atomics.load(sig, KICK);
  q.disableNotification();
  for (let c = q.popChain(); c; c = q.popChain()) {
    const input = c.readReadable();
    input.reverse();
    q.addUsed(c.head, c.writeWritable(input));
    chains++;
  }
  if (q.needsNotification()) {
    interrupts++;
    Atomics.add(sig, IRQ, 1);
    Atomics.notify(sig, IRQ);
  }
  if (!q.enableNotification()) Atomics.wait(sig, KICK, kicks, 100);
}
parentPort?.postMessage({ chains, interrupts, dirtyBytes, nextAvail: q.nextAvail, nextUsed: q.nextUsed });
