/**
 * A test device: echo, except that a request whose first byte is 0xFD holds its queue worker
 * (Atomics.wait) until the test releases it: a batch whose first requests are done while a later
 * one is still being served, on the worker's own thread, for as long as the test needs.
 */
import { echoDevice } from "../../src/devices/examples/echo.js";
import type { QueueContext, QueueHandler, VhostUserDevice } from "../../src/vhost-user/backend/device.js";

export const HOLD = 0xfd;

/** The device and its switch: `release()` lets every held request (and later ones) go. */
export function holdDevice(): { device: VhostUserDevice; release(): void } {
  // 0 until released.
  const ctl = new Int32Array(new SharedArrayBuffer(4));
  return {
    device: { ...echoDevice(), queueWorker: new URL(import.meta.url), workerData: () => ({ ctl }) },
    release() {
      Atomics.store(ctl, 0, 1);
      Atomics.notify(ctl, 0);
    },
  };
}

export function createQueueHandler(ctx: QueueContext): QueueHandler {
  const ctl = (ctx.data as { ctl: Int32Array }).ctl;
  return {
    process(chain) {
      const data = chain.readReadable();
      if (data[0] === HOLD) Atomics.wait(ctl, 0, 0);
      return chain.writeWritable(data);
    },
  };
}
