/** The control plane's handle on one queue worker: ordered requests, each acknowledged. */
import { Worker } from "node:worker_threads";
import type { SharedDirtyLog } from "../../memory/shared-dirty-log.js";
import type { FromWorker, ToWorker } from "./worker-protocol.js";

type Request = ToWorker extends infer T ? (T extends { id: number } ? Omit<T, "id"> : never) : never;

export interface WorkerEvents {
  onEvent(queue: number, level: "warn" | "error", message: string): void;
}

export class QueueThread {
  readonly queue: number;
  readonly #worker: Worker;
  readonly #pending = new Map<
    number,
    { resolve: (m: FromWorker & { type: "done" }) => void; reject: (e: Error) => void }
  >();
  readonly #ready: Promise<void>;
  #nextId = 1;
  #dead: Error | null = null;

  constructor(queue: number, module: URL, data: unknown, log: SharedDirtyLog, events: WorkerEvents) {
    this.queue = queue;
    const handle = log.createWriterHandle();
    this.#worker = new Worker(new URL("./queue-worker.js", import.meta.url), {
      workerData: { module: module.href, queue, data, log: handle },
      transferList: [handle.port],
    });
    let ready: () => void = () => undefined;
    this.#ready = new Promise((r) => {
      ready = r;
    });
    this.#worker.on("message", (m: FromWorker) => {
      if (m.type === "ready") ready();
      else if (m.type === "event") events.onEvent(queue, m.level, m.message);
      else {
        const p = this.#pending.get(m.id);
        this.#pending.delete(m.id);
        p?.resolve(m);
      }
    });
    const fail = (e: Error) => {
      this.#dead ??= e;
      for (const p of this.#pending.values()) p.reject(e);
      this.#pending.clear();
      ready();
    };
    this.#worker.on("error", (e) => {
      events.onEvent(queue, "error", `queue ${queue} worker crashed: ${e.message}`);
      fail(e);
    });
    this.#worker.on("exit", (code) => fail(new Error(`queue ${queue} worker exited (${code})`)));
  }

  /** Sends a command and resolves when the worker has carried it out. */
  async request(m: Request, timeoutMs = 0): Promise<FromWorker & { type: "done" }> {
    await this.#ready;
    if (this.#dead) throw this.#dead;
    const id = this.#nextId++;
    return new Promise((resolve, reject) => {
      const timer =
        timeoutMs > 0
          ? setTimeout(() => {
              this.#pending.delete(id);
              reject(new Error(`queue ${this.queue} worker did not answer "${m.type}" within ${timeoutMs} ms`));
            }, timeoutMs)
          : null;
      this.#pending.set(id, {
        resolve: (r) => {
          if (timer) clearTimeout(timer);
          if (r.error) reject(new Error(`queue ${this.queue}: ${r.error}`));
          else resolve(r);
        },
        reject: (e) => {
          if (timer) clearTimeout(timer);
          reject(e);
        },
      });
      this.#worker.postMessage({ ...m, id } as ToWorker);
    });
  }

  async close(): Promise<void> {
    if (!this.#dead) {
      this.#worker.postMessage({ type: "close", id: 0 } satisfies ToWorker);
    }
    await this.#worker.terminate();
  }
}
