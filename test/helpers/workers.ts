import { Worker } from "node:worker_threads";
import type { WorkerJob } from "./worker.js";

const WORKER = new URL("./worker.js", import.meta.url);

/** Starts test/helpers/worker.ts with `job`; `messages` yields what it posts, in order. */
export function startWorker(job: WorkerJob): { worker: Worker; next: () => Promise<unknown>; exited: Promise<number> } {
  const worker = new Worker(WORKER, { workerData: job });
  const queue: unknown[] = [];
  const waiters: { resolve: (v: unknown) => void; reject: (e: Error) => void }[] = [];
  let failure: Error | null = null;
  worker.on("message", (m: unknown) => {
    const w = waiters.shift();
    if (w) w.resolve(m);
    else queue.push(m);
  });
  worker.on("error", (e: Error) => {
    failure = e;
    for (const w of waiters.splice(0)) w.reject(e);
  });
  const exited = new Promise<number>((resolve) => worker.on("exit", resolve));
  const next = () =>
    new Promise<unknown>((resolve, reject) => {
      if (queue.length > 0) return resolve(queue.shift());
      if (failure) return reject(failure);
      waiters.push({ resolve, reject });
    });
  return { worker, next, exited };
}
