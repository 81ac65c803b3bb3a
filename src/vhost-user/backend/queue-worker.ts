/**
 * A queue worker: one thread serving a group of the device's virtqueues (by default one queue
 * per thread; DeviceInfo.queueWorkers groups them). Each queue is a QueueRunner, which owns the
 * queue, the device's handler for it and its control messages; the QueueGroup serves the rings
 * and polls them all before the thread sleeps in its own event loop. Every guest write is marked
 * in the shared dirty log through this thread's own DirtyLogWriter.
 *
 * Postcopy: a guest page that has not arrived blocks this thread in the kernel until the
 * front-end places it; the control plane's thread is never the one that faults.
 */
import { parentPort, workerData } from "node:worker_threads";
import { DirtyLogWriter } from "../../memory/shared-dirty-log.js";
import type { QueueHandlerFactory } from "./device.js";
import { QueueGroup } from "./queue-group.js";
import { QueueRunner, type RunnerHost } from "./queue-runner.js";
import type { FromWorker, ToWorker, WorkerInit } from "./worker-protocol.js";

const port = parentPort;
if (!port) throw new Error("queue-worker must run in a worker thread");
const init = workerData as WorkerInit;
const factory = ((await import(init.module)) as { createQueueHandler?: QueueHandlerFactory }).createQueueHandler;
if (typeof factory !== "function") throw new Error(`${init.module} does not export createQueueHandler`);
const log = DirtyLogWriter.fromHandle(init.log);

/**
 * Adaptive polling, as QEMU's event loop does (poll-max-ns): before going back to sleep on the
 * kick eventfds, watch the group's avail indices for a short while. A driver with requests in
 * flight usually adds the next ones soon after it collected the last, and catching them here
 * saves a sleep/wake round trip through the kernel and the event loop (~25 µs on these
 * machines), on both sides: a worker that is still polling is not kicked. The window adapts to
 * how long the worker then sleeps (see PollWindow). VMSHIFT_POLL_US sets the maximum, 32 µs by
 * default as in QEMU (0 disables polling). Longer windows catch a driver that collects a whole
 * batch before it adds the next (64-128 µs: QD32 about 1.0x qemu-storage-daemon on a host with
 * CPU to spare) but cost CPU that a busy host's other work, the driver included, needs:
 * docs/benchmarks.md, vhost.
 */
const group = new QueueGroup(Number(process.env.VMSHIFT_POLL_US ?? 32));
const host: RunnerHost = {
  factory,
  group,
  markDirty: (gpa, len) => log.mark(gpa, len),
  post: (m: FromWorker) => port.postMessage(m),
};
const runners = new Map<number, QueueRunner>();
for (const { queue, data } of init.queues) runners.set(queue, new QueueRunner(queue, data, host));

async function close(): Promise<void> {
  await Promise.all([...runners.values()].map((r) => r.close()));
  log.close();
  port!.close();
}

port.on("message", (m: ToWorker) => {
  if (m.type === "close") {
    void close();
    return;
  }
  const r = runners.get(m.queue);
  if (r) r.enqueue(m);
  else host.post({ type: "done", id: m.id, error: `queue ${m.queue} is not served by this worker` });
});
host.post({ type: "ready" });
