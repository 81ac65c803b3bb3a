/**
 * A built-in workload for the CLI and the tests: worker threads that write guest pages at a
 * controlled rate and pattern (sequential, random, hot set), pausable (a migration's
 * stopWriters/resumeWriters hooks) and throttleable (auto-converge), with the time they spent
 * stalled. "touch" mode only reads: a postcopy destination's guest that faults pages in.
 */
import { Worker } from "node:worker_threads";
import type { DiscardMap } from "../memory/discard-map.js";
import type { GuestMemory } from "../memory/guest-memory.js";
import type { GuestMemoryRegion } from "../memory/region.js";
import { PAGE } from "./page-set.js";
import type { SourceHooks } from "./source.js";
import {
  CMD_EXIT,
  CMD_PAUSE,
  CMD_RUN,
  CTL_COMMAND,
  CTL_THROTTLE,
  STATS_PER_THREAD,
  type WorkloadWorkerData,
} from "./workload-worker.js";

export interface WorkloadOptions {
  memory: GuestMemory;
  threads?: number;
  /** Total pages per second over all threads; 0 = as fast as they can. */
  pagesPerSecond?: number;
  pattern?: "sequential" | "random" | "hotset";
  /** hotset: the fraction of pages that takes 90% of the writes. */
  hotFraction?: number;
  mode?: "write" | "touch";
  /** Pages in discarded blocks are never touched (a guest does not use unplugged memory). */
  discard?: ReadonlyMap<GuestMemoryRegion, DiscardMap>;
  seed?: number;
  /**
   * Start with every thread parked (a destination's guest, ready before the migration so that
   * resume() only wakes it: thread start-up is not counted as downtime).
   */
  paused?: boolean;
}

interface Thread {
  worker: Worker;
  messages: unknown[];
  waiters: ((m: unknown) => void)[];
  exited: Promise<void>;
}

export class Workload {
  readonly #threads: Thread[];
  readonly #ctl: Int32Array;
  readonly #stats: Float64Array;
  #closed = false;

  private constructor(threads: Thread[], ctl: Int32Array, stats: Float64Array) {
    this.#threads = threads;
    this.#ctl = ctl;
    this.#stats = stats;
  }

  static async start(o: WorkloadOptions): Promise<Workload> {
    const n = o.threads ?? 1;
    const control = new SharedArrayBuffer(16);
    if (o.paused) new Int32Array(control)[CTL_COMMAND] = CMD_PAUSE;
    const stats = new SharedArrayBuffer(8 * STATS_PER_THREAD * n);
    // Writers mark the regions' own bitmaps: they must exist before the memory is shared.
    if ((o.mode ?? "write") === "write") for (const r of o.memory.regions) r.enableDirtyTracking();
    const all: number[] = [];
    for (const r of o.memory.regions) {
      const dm = o.discard?.get(r);
      for (let off = 0; off < r.size; off += PAGE) if (!dm?.isDiscarded(off)) all.push(r.guestBase + off);
    }
    const threads: Thread[] = [];
    const shared = o.memory.toShared();
    for (let i = 0; i < n; i++) {
      // Each thread owns a disjoint share of the pages.
      const mine = Float64Array.from(all.filter((_, k) => k % n === i));
      const job: WorkloadWorkerData = {
        memory: shared,
        pages: mine,
        control,
        stats,
        index: i,
        pagesPerSecond: (o.pagesPerSecond ?? 0) / n,
        pattern: o.pattern ?? "random",
        hotFraction: o.hotFraction ?? 0.1,
        mode: o.mode ?? "write",
        seed: (o.seed ?? 12345) + i * 7919,
      };
      const worker = new Worker(new URL("./workload-worker.js", import.meta.url), {
        workerData: { kind: "vmshift-workload", job },
      });
      const t: Thread = { worker, messages: [], waiters: [], exited: Promise.resolve() };
      t.exited = new Promise((r) => worker.once("exit", () => r()));
      worker.on("message", (m: unknown) => {
        const w = t.waiters.shift();
        if (w) w(m);
        else t.messages.push(m);
      });
      worker.on("error", (e) => {
        for (const w of t.waiters.splice(0)) w({ error: e });
      });
      threads.push(t);
    }
    const w = new Workload(threads, new Int32Array(control), new Float64Array(stats));
    await Promise.all(threads.map((t) => w.#next(t)));
    // Started paused: take each thread's "paused" so that resume() waits for "resumed".
    if (o.paused) await Promise.all(threads.map((t) => w.#next(t)));
    return w;
  }

  #next(t: Thread): Promise<unknown> {
    const m = t.messages.shift();
    if (m !== undefined) return Promise.resolve(m);
    return new Promise((r) => t.waiters.push(r));
  }

  /** Stops every thread; resolves once none of them writes any more. */
  async pause(): Promise<void> {
    Atomics.store(this.#ctl, CTL_COMMAND, CMD_PAUSE);
    await Promise.all(this.#threads.map((t) => this.#next(t)));
  }

  async resume(): Promise<void> {
    Atomics.store(this.#ctl, CTL_COMMAND, CMD_RUN);
    Atomics.notify(this.#ctl, CTL_COMMAND);
    await Promise.all(this.#threads.map((t) => this.#next(t)));
  }

  setThrottle(level: number): void {
    Atomics.store(this.#ctl, CTL_THROTTLE, level);
  }

  get pagesWritten(): number {
    let n = 0;
    for (let i = 0; i < this.#threads.length; i++) n += this.#stats[i * STATS_PER_THREAD] as number;
    return n;
  }

  get stallMs(): number {
    let n = 0;
    for (let i = 0; i < this.#threads.length; i++) n += this.#stats[i * STATS_PER_THREAD + 1] as number;
    return n;
  }

  /** The longest single access, µs (a page fault round trip when faults happen). */
  get maxOpUs(): number {
    let n = 0;
    for (let i = 0; i < this.#threads.length; i++) n = Math.max(n, this.#stats[i * STATS_PER_THREAD + 2] as number);
    return n;
  }

  /** Source hooks driving this workload: pause at switchover, resume on failure, throttle. */
  sourceHooks(): SourceHooks {
    return {
      stopWriters: () => this.pause(),
      resumeWriters: () => this.resume(),
      throttle: (level) => this.setThrottle(level),
      writerStallMs: () => this.stallMs,
    };
  }

  async close(): Promise<void> {
    if (this.#closed) return;
    this.#closed = true;
    Atomics.store(this.#ctl, CTL_COMMAND, CMD_EXIT);
    Atomics.notify(this.#ctl, CTL_COMMAND);
    // A thread blocked in a page fault that will never be served cannot exit by itself.
    const exits = this.#threads.map((t) =>
      Promise.race([t.exited, new Promise<void>((r) => setTimeout(r, 2000).unref())]).then(() => t.worker.terminate()),
    );
    await Promise.all(exits);
  }
}
