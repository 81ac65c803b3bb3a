// Worker: a "vCPU" dirtying pages through a simulated KVM dirty ring, plus writes made outside
// vCPU context that the kernel records in the backup bitmap (ring-with-bitmap mode). Entries
// of the last writes stay pending until a kick (like a vCPU's buffered GFNs flushed on exit).
import { workerData } from "node:worker_threads";
import { AtomicBitmap, type SharedBitmap } from "../../src/memory/atomic-bitmap.js";
import { type SharedRingSim, SimulatedKvmRing } from "./kvm-ring-sim.js";

interface Job {
  ring: SharedRingSim;
  slot: number;
  pages: number;
  count: number;
  backup: SharedBitmap;
  /** [kick request, kick ack, done, fullExits] */
  control: SharedArrayBuffer;
  pendingAtEnd: number;
}

const job = workerData as Job;
const ring = new SimulatedKvmRing(job.ring.entries, job.ring);
const backup = AtomicBitmap.fromShared(job.backup);
const ctl = new Int32Array(job.control);

function push(offset: number): void {
  for (;;) {
    const seq = ring.resetSeq;
    if (ring.push(job.slot, offset)) return;
    Atomics.add(ctl, 3, 1); // KVM_EXIT_DIRTY_RING_FULL: wait for userspace to harvest and reset
    ring.waitForReset(seq);
  }
}

// Pages 0..count-1 in a scrambled but deterministic order; every 5th write also dirties a
// page in the upper half "outside vCPU context" (only the backup bitmap sees it).
const pending: number[] = [];
for (let i = 0; i < job.count; i++) {
  const page = (i * 7919) % job.count;
  if (i >= job.count - job.pendingAtEnd) pending.push(page);
  else push(page);
  if (i % 5 === 0) backup.markPage(job.pages / 2 + (i % (job.pages / 2)));
}
// Wait for the kick, then flush what was buffered, like a vCPU leaving KVM_RUN.
while (Atomics.load(ctl, 0) === 0) Atomics.wait(ctl, 0, 0, 1000);
for (const p of pending) push(p);
Atomics.store(ctl, 1, 1);
Atomics.notify(ctl, 1);
// One more write outside vCPU context after the flush: only the final backup bitmap can see it.
backup.markPage(job.pages - 1);
Atomics.store(ctl, 2, 1);
