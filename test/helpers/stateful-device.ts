/**
 * A test device with internal state to migrate: echo, counting the requests it served in a
 * SharedArrayBuffer its queue workers share. saveState() hands out the count (8 bytes, plus a
 * tag so a wrong blob is refused), loadState() takes it back.
 */
import { echoDevice } from "../../src/devices/examples/echo.js";
import type { QueueContext, QueueHandler, VhostUserDevice } from "../../src/vhost-user/backend/device.js";

const TAG = 0x53544154; // "STAT"

export function statefulDevice(): VhostUserDevice & { readonly served: number } {
  const counter = new BigInt64Array(new SharedArrayBuffer(8));
  const base = echoDevice();
  return {
    ...base,
    queueWorker: new URL(import.meta.url),
    workerData: () => ({ counter: counter.buffer }),
    get served() {
      return Number(Atomics.load(counter, 0));
    },
    saveState() {
      const b = new Uint8Array(12);
      const v = new DataView(b.buffer);
      v.setUint32(0, TAG, true);
      v.setBigInt64(4, Atomics.load(counter, 0), true);
      return b;
    },
    loadState(state) {
      const v = new DataView(state.buffer, state.byteOffset, state.byteLength);
      if (state.byteLength !== 12 || v.getUint32(0, true) !== TAG) throw new Error("not a state of this device");
      Atomics.store(counter, 0, v.getBigInt64(4, true));
    },
  };
}

export function createQueueHandler(ctx: QueueContext): QueueHandler {
  const counter = new BigInt64Array((ctx.data as { counter: SharedArrayBuffer }).counter);
  return {
    process(chain) {
      Atomics.add(counter, 0, 1n);
      return chain.writeWritable(chain.readReadable());
    },
  };
}
