// Worker: marks a disjoint set of pages through a DirtyLogWriter, one at a time, publishing
// how many marks it has completed after each one (so the test can tell "before" from "after").
import { workerData } from "node:worker_threads";
import { DirtyLogWriter, type DirtyLogWriterHandle } from "../../src/memory/shared-dirty-log.js";

interface Job {
  handle: DirtyLogWriterHandle;
  index: number;
  workers: number;
  pages: number;
  progress: SharedArrayBuffer;
  spin: number;
}

const job = workerData as Job;
const writer = DirtyLogWriter.fromHandle(job.handle);
const progress = new Int32Array(job.progress);
let sink = 0;
let i = 0;
for (let p = job.index; p < job.pages; p += job.workers, i++) {
  writer.mark(p * 4096 + (p % 7) * 100, 1);
  Atomics.store(progress, job.index, i + 1);
  for (let s = 0; s < job.spin; s++) sink = (sink * 31 + s) | 0;
}
if (sink === 42) console.log("");
writer.close();
