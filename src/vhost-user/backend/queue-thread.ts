/**
 * The control plane's handles on the queue workers: a WorkerThread per worker (one thread, a
 * group of queues), a QueueThread per queue (ordered requests, each acknowledged), and the
 * QueueWorkers of one session, which decide which worker serves which queue.
 */
import { availableParallelism } from "node:os";
import { Worker } from "node:worker_threads";
import type { SharedDirtyLog } from "../../memory/shared-dirty-log.js";
import type { VhostUserDevice } from "./device.js";
import type { FromWorker, ToQueue, ToWorker } from "./worker-protocol.js";

/** A command for a queue, without the routing the handle adds. */
type Request = ToQueue extends infer T ? (T extends { id: number } ? Omit<T, "id" | "queue"> : never) : never;
type Done = FromWorker & { type: "done" };

export interface WorkerEvents {
  onEvent(queue: number, level: "warn" | "error", message: string): void;
}

/** One worker thread and the queues it serves. */
export class WorkerThread {
  readonly queues: readonly number[];
  readonly #worker: Worker;
  readonly #pending = new Map<number, { resolve: (m: Done) => void; reject: (e: Error) => void }>();
  readonly #ready: Promise<void>;
  #nextId = 1;
  #dead: Error | null = null;

  constructor(
    queues: readonly { queue: number; data: unknown }[],
    module: URL,
    log: SharedDirtyLog,
    events: WorkerEvents,
  ) {
    this.queues = queues.map((q) => q.queue);
    const name = `queues ${this.queues.join(",")}`;
    const handle = log.createWriterHandle();
    this.#worker = new Worker(new URL("./queue-worker.js", import.meta.url), {
      workerData: { module: module.href, queues, log: handle },
      transferList: [handle.port],
      name: `vmshift ${name}`,
    });
    let ready: () => void = () => undefined;
    this.#ready = new Promise((r) => {
      ready = r;
    });
    this.#worker.on("message", (m: FromWorker) => {
      if (m.type === "ready") ready();
      else if (m.type === "event") events.onEvent(m.queue, m.level, m.message);
      else {
        const p = this.#pending.get(m.id);
        this.#pending.delete(m.id);
        p?.resolve(m);
      }
    });
    const first = this.queues[0] ?? 0;
    const fail = (e: Error) => {
      this.#dead ??= e;
      for (const p of this.#pending.values()) p.reject(e);
      this.#pending.clear();
      ready();
    };
    this.#worker.on("error", (e) => {
      events.onEvent(first, "error", `worker of ${name} crashed: ${e.message}`);
      fail(e);
    });
    this.#worker.on("exit", (code) => fail(new Error(`worker of ${name} exited (${code})`)));
  }

  /** Sends a command for `queue` and resolves when its runner has carried it out. */
  async request(queue: number, m: Request, timeoutMs = 0): Promise<Done> {
    await this.#ready;
    if (this.#dead) throw this.#dead;
    const id = this.#nextId++;
    return new Promise((resolve, reject) => {
      const timer =
        timeoutMs > 0
          ? setTimeout(() => {
              this.#pending.delete(id);
              reject(new Error(`queue ${queue} worker did not answer "${m.type}" within ${timeoutMs} ms`));
            }, timeoutMs)
          : null;
      this.#pending.set(id, {
        resolve: (r) => {
          if (timer) clearTimeout(timer);
          if (r.error) reject(new Error(`queue ${queue}: ${r.error}`));
          else resolve(r);
        },
        reject: (e) => {
          if (timer) clearTimeout(timer);
          reject(e);
        },
      });
      this.#worker.postMessage({ ...m, id, queue } as ToWorker);
    });
  }

  async close(): Promise<void> {
    if (!this.#dead) this.#worker.postMessage({ type: "close" } satisfies ToWorker);
    await this.#worker.terminate();
  }
}

/** The control plane's handle on one queue: its requests go to the worker that serves it. */
export class QueueThread {
  readonly queue: number;
  readonly worker: WorkerThread;

  constructor(queue: number, worker: WorkerThread) {
    this.queue = queue;
    this.worker = worker;
  }

  /** Sends a command and resolves when the worker has carried it out. */
  request(m: Request, timeoutMs = 0): Promise<Done> {
    return this.worker.request(this.queue, m, timeoutMs);
  }
}

/**
 * Which worker serves which queue: `workers` threads, queue i on thread i mod workers (1 = every
 * queue on one thread, numQueues = a thread per queue).
 */
export function queueGroups(numQueues: number, workers: number): number[][] {
  const n = Math.max(1, Math.min(numQueues, Math.floor(workers) || numQueues));
  const groups: number[][] = Array.from({ length: n }, () => []);
  for (let q = 0; q < numQueues; q++) groups[q % n]?.push(q);
  return groups;
}

/**
 * A sensible worker count for `numQueues` queues: half the host's CPUs (the other half is for
 * the guest's vCPUs and the front-end), at least one, at most a thread per queue. On a host
 * with two CPUs every queue shares one thread, as they share QEMU's one iothread: measured
 * there, two queues at queue depth 1 went from 0.87-0.91x qemu-storage-daemon with a thread
 * each to 2.3-3.1x with one for both (docs/blk.md).
 */
export function autoQueueWorkers(numQueues: number, cpus = availableParallelism()): number {
  return Math.max(1, Math.min(numQueues, Math.floor(cpus / 2)));
}

/** The queue workers of one session, started when a queue of theirs is first used. */
export class QueueWorkers {
  readonly #device: VhostUserDevice;
  readonly #log: SharedDirtyLog;
  readonly #events: WorkerEvents;
  readonly #groups: number[][];
  readonly #workers = new Map<number, WorkerThread>();

  constructor(device: VhostUserDevice, log: SharedDirtyLog, events: WorkerEvents) {
    this.#device = device;
    this.#log = log;
    this.#events = events;
    const n = device.info.numQueues;
    this.#groups = queueGroups(n, device.info.queueWorkers ?? n);
  }

  /** How the queues are grouped into workers. */
  get groups(): readonly (readonly number[])[] {
    return this.#groups;
  }

  /** The handle of queue `index`, starting its worker if it is not running yet. */
  thread(index: number): QueueThread {
    const g = this.#groups.findIndex((queues) => queues.includes(index));
    if (g < 0) throw new RangeError(`queue ${index} out of range`);
    let w = this.#workers.get(g);
    if (!w) {
      const queues = (this.#groups[g] ?? []).map((queue) => ({ queue, data: this.#device.workerData?.(queue) }));
      w = new WorkerThread(queues, this.#device.queueWorker, this.#log, this.#events);
      this.#workers.set(g, w);
    }
    return new QueueThread(index, w);
  }

  /** Every worker closes (its queues drain, its handlers close) and is terminated. */
  async close(): Promise<void> {
    const all = [...this.#workers.values()];
    this.#workers.clear();
    await Promise.all(all.map((w) => w.close()));
  }
}
