/**
 * Two minimal devices for testing the framework and front-ends, and as a template for real
 * ones. `echo`: every request's readable bytes are copied into its writable part. `null`: every
 * request completes at once with nothing written. Device id 0 ("reserved"): no driver binds.
 */

import type { QueueContext, QueueHandler, VhostUserDevice } from "../../vhost-user/backend/device.js";
import type { DescriptorChain } from "../../virtio/chain.js";
import {
  features,
  VIRTIO_F_VERSION_1,
  VIRTIO_RING_F_EVENT_IDX,
  VIRTIO_RING_F_INDIRECT_DESC,
} from "../../virtio/features.js";

export interface ExampleDeviceOptions {
  queues?: number;
  maxQueueSize?: number;
  /** Config space to expose (GET/SET_CONFIG); none by default. */
  config?: Uint8Array;
}

function exampleDevice(kind: "echo" | "null", o: ExampleDeviceOptions): VhostUserDevice {
  const config = o.config ? new Uint8Array(o.config) : null;
  const dev: VhostUserDevice = {
    info: {
      numQueues: o.queues ?? 1,
      maxQueueSize: o.maxQueueSize ?? 1024,
      features: features(VIRTIO_F_VERSION_1, VIRTIO_RING_F_INDIRECT_DESC, VIRTIO_RING_F_EVENT_IDX),
      protocolFeatures: 0n,
    },
    queueWorker: new URL(import.meta.url),
    workerData: () => ({ kind }),
  };
  if (config) {
    dev.getConfig = (offset, size) => {
      const out = new Uint8Array(size);
      out.set(config.subarray(Math.min(offset, config.length), Math.min(offset + size, config.length)));
      return out;
    };
    dev.setConfig = (offset, data) => {
      if (offset + data.length > config.length) throw new RangeError("config write past the end");
      config.set(data, offset);
    };
  }
  return dev;
}

export function echoDevice(o: ExampleDeviceOptions = {}): VhostUserDevice {
  return exampleDevice("echo", o);
}

export function nullDevice(o: ExampleDeviceOptions = {}): VhostUserDevice {
  return exampleDevice("null", o);
}

/** Runs in the queue worker. */
export function createQueueHandler(ctx: QueueContext): QueueHandler {
  const kind = (ctx.data as { kind: "echo" | "null" }).kind;
  if (kind === "null") return { process: () => 0 };
  return {
    process(chain: DescriptorChain): number {
      return chain.writeWritable(chain.readReadable());
    },
  };
}
