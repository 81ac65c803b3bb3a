/**
 * A test device whose handler completes requests later: echo, where the request's first byte
 * is how many milliseconds to wait before completing (0xFE: reject instead). Requests of one
 * queue are in flight together and complete in any order.
 */
import { echoDevice } from "../../src/devices/examples/echo.js";
import type { QueueContext, QueueHandler, VhostUserDevice } from "../../src/vhost-user/backend/device.js";

export function asyncDevice(): VhostUserDevice {
  return { ...echoDevice(), queueWorker: new URL(import.meta.url) };
}

export function createQueueHandler(_ctx: QueueContext): QueueHandler {
  return {
    process(chain) {
      const data = chain.readReadable();
      const delay = data[0] ?? 0;
      return new Promise<number>((resolve, reject) =>
        setTimeout(() => {
          if (delay === 0xfe) reject(new Error("refused by the test device"));
          else resolve(chain.writeWritable(data));
        }, delay),
      );
    },
  };
}
