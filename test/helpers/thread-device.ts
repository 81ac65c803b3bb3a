/**
 * A test device that says who served each request: the reply is the queue index, the worker
 * thread's threadId and QueueContext.backlog() when the request was served (three u32,
 * little-endian). `queueWorkers` groups its queues.
 */
import { threadId } from "node:worker_threads";
import { echoDevice } from "../../src/devices/examples/echo.js";
import type { QueueContext, QueueHandler, VhostUserDevice } from "../../src/vhost-user/backend/device.js";

export function threadDevice(queues: number, queueWorkers?: number): VhostUserDevice {
  const base = echoDevice({ queues });
  return {
    ...base,
    info: { ...base.info, ...(queueWorkers !== undefined ? { queueWorkers } : {}) },
    queueWorker: new URL(import.meta.url),
  };
}

export function createQueueHandler(ctx: QueueContext): QueueHandler {
  const reply = new Uint8Array(12);
  const dv = new DataView(reply.buffer);
  dv.setUint32(0, ctx.queue, true);
  dv.setUint32(4, threadId, true);
  return {
    process(chain) {
      dv.setUint32(8, ctx.backlog?.() ?? 0xffffffff, true);
      return chain.writeWritable(reply);
    },
  };
}
