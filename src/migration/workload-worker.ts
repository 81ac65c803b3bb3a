/**
 * A guest stand-in: one worker thread writing (or reading) guest pages at a controlled rate
 * and pattern, marking what it writes in the regions' dirty bitmaps like any in-process
 * writer. Controlled through a shared Int32Array (see workload.ts); it never uses the event
 * loop while running, so a page fault here blocks only this thread.
 */
import { parentPort, workerData } from "node:worker_threads";
import { GuestMemory, type SharedGuestMemory } from "../memory/guest-memory.js";

export interface WorkloadWorkerData {
  memory: SharedGuestMemory;
  /** guest-physical addresses of the pages this thread may touch */
  pages: Float64Array;
  control: SharedArrayBuffer;
  stats: SharedArrayBuffer;
  index: number;
  pagesPerSecond: number;
  pattern: "sequential" | "random" | "hotset";
  hotFraction: number;
  mode: "write" | "touch";
  seed: number;
}

export const CTL_COMMAND = 0;
export const CTL_THROTTLE = 1;
export const CMD_RUN = 0;
export const CMD_PAUSE = 1;
export const CMD_EXIT = 2;
/** stats (Float64Array) per thread: [writes, stallMs, maxOpUs] */
export const STATS_PER_THREAD = 3;

const port = parentPort;
if (port && (workerData as { kind?: string })?.kind === "vmshift-workload") run(workerData.job as WorkloadWorkerData);

function run(job: WorkloadWorkerData): void {
  const mem = GuestMemory.fromShared(job.memory);
  const ctl = new Int32Array(job.control);
  const stats = new Float64Array(job.stats);
  const base = job.index * STATS_PER_THREAD;
  const sleeper = new Int32Array(new SharedArrayBuffer(4));
  let x = job.seed >>> 0 || 1;
  const rnd = () => {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    return x >>> 0;
  };
  const n = job.pages.length;
  const hot = Math.max(1, Math.floor(n * job.hotFraction));
  let seq = 0;
  const pick = (): number => {
    if (job.pattern === "sequential") return job.pages[seq++ % n] as number;
    if (job.pattern === "hotset") {
      const r = rnd();
      return job.pages[r % 10 < 9 ? r % hot : r % n] as number;
    }
    return job.pages[rnd() % n] as number;
  };
  const BATCH = 32;
  const interval = job.pagesPerSecond > 0 ? (BATCH / job.pagesPerSecond) * 1000 : 0;
  let counter = (job.index + 1) * 0x01000000;
  let next = performance.now();
  let sink = 0;
  port?.postMessage("started");
  for (;;) {
    const cmd = Atomics.load(ctl, CTL_COMMAND);
    if (cmd === CMD_EXIT) break;
    if (cmd === CMD_PAUSE) {
      port?.postMessage("paused");
      while (Atomics.load(ctl, CTL_COMMAND) === CMD_PAUSE) Atomics.wait(ctl, CTL_COMMAND, CMD_PAUSE, 1000);
      port?.postMessage("resumed");
      next = performance.now();
      continue;
    }
    if (n === 0) {
      Atomics.wait(sleeper, 0, 0, 10);
      continue;
    }
    for (let i = 0; i < BATCH; i++) {
      const gpa = pick() + (rnd() & 1023) * 4;
      const t = performance.now();
      if (job.mode === "write") mem.writeU32(gpa, counter++ >>> 0);
      else sink ^= mem.readU32(gpa);
      const us = (performance.now() - t) * 1000;
      // A single store that took this long was blocked (a write-protect or missing fault).
      if (us > 20) stats[base + 1] = (stats[base + 1] as number) + us / 1000;
      if (us > (stats[base + 2] as number)) stats[base + 2] = us;
    }
    stats[base] = (stats[base] as number) + BATCH;
    const throttle = Atomics.load(ctl, CTL_THROTTLE);
    if (throttle > 0) {
      // Auto-converge: each level costs the writer 1 ms per batch.
      const t = performance.now();
      Atomics.wait(sleeper, 0, 0, throttle);
      stats[base + 1] = (stats[base + 1] as number) + performance.now() - t;
    }
    if (interval > 0) {
      next += interval;
      const wait = next - performance.now();
      if (wait > 0) Atomics.wait(sleeper, 0, 0, wait);
      else if (wait < -100) next = performance.now();
    }
  }
  port?.postMessage({ exit: sink });
}
