/**
 * One worker_threads entry for the sys/memory tests; `workerData.kind` picks the job. Each job
 * reports with postMessage and never throws silently (an exception fails the test via 'error').
 */
import { parentPort, workerData } from "node:worker_threads";
import { AtomicBitmap, type SharedBitmap } from "../../src/memory/atomic-bitmap.js";
import { EventFd } from "../../src/sys/eventfd.js";
import { Fd } from "../../src/sys/fd.js";
import { shuffle, xorshift32 } from "./random.js";

export type WorkerJob =
  /** Reads `readAt` (u32), posts it, writes `value` at `writeAt`, then waits for "check". */
  | { kind: "sab"; sab: SharedArrayBuffer; readAt: number; writeAt: number; value: number }
  /** Signals the eventfd (not owned: released before exit) with 1..count. */
  | { kind: "eventfd"; fd: number; count: number }
  /** Reads a u32 at `offset` (may block in a userfaultfd fault), posts it. */
  | { kind: "uffd-read"; sab: SharedArrayBuffer; offset: number }
  /** Writes `value` at `offset` (may block in a write-protect fault), posts "written". */
  | { kind: "uffd-write"; sab: SharedArrayBuffer; offset: number; value: number }
  /**
   * Marks every page of [0, pages) once, in a seeded random order; flags[0] = 1 when started,
   * flags[1] = 1 when done (plain shared flags: the main thread spins, it does not yield).
   */
  | { kind: "bitmap-marker"; bitmap: SharedBitmap; flags: SharedArrayBuffer; pages: number; seed: number };

const port = parentPort;
if (!port) throw new Error("worker.ts must run in a worker thread");
const job = workerData as WorkerJob;

switch (job.kind) {
  case "sab": {
    const u32 = new Uint32Array(job.sab);
    port.postMessage(Atomics.load(u32, job.readAt / 4));
    Atomics.store(u32, job.writeAt / 4, job.value);
    port.postMessage("written");
    break;
  }
  case "eventfd": {
    const e = new EventFd(new Fd(job.fd));
    for (let i = 1; i <= job.count; i++) e.signal(BigInt(i));
    e.fd.release(); // the main thread owns the fd
    port.postMessage("done");
    break;
  }
  case "uffd-read": {
    const v = new Uint32Array(job.sab)[job.offset / 4] as number;
    port.postMessage(v);
    break;
  }
  case "uffd-write": {
    new Uint32Array(job.sab)[job.offset / 4] = job.value;
    port.postMessage("written");
    break;
  }
  case "bitmap-marker": {
    const bm = AtomicBitmap.fromShared(job.bitmap);
    const flags = new Int32Array(job.flags);
    const order = new Uint32Array(job.pages);
    for (let i = 0; i < order.length; i++) order[i] = i;
    shuffle(order, xorshift32(job.seed));
    Atomics.store(flags, 0, 1);
    for (let i = 0; i < order.length; i++) bm.markPage(order[i] as number);
    Atomics.store(flags, 1, 1);
    port.postMessage("done");
    break;
  }
}
