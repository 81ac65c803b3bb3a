/**
 * What a device implements to be served by the vhost-user backend framework.
 *
 * The control plane (this interface) runs on the main thread. The virtqueues are processed in
 * worker threads (one per queue unless DeviceInfo.queueWorkers groups them), which load
 * `queueWorker` and call its `createQueueHandler` export once per queue: the handler sees guest
 * memory (shared, not copied) and one descriptor chain at a time.
 */
import type { GuestMemory } from "../../memory/guest-memory.js";
import type { DescriptorChain } from "../../virtio/chain.js";

export interface DeviceInfo {
  /** Queues the device has (GET_QUEUE_NUM with MQ). */
  numQueues: number;
  /** Largest queue size accepted in SET_VRING_NUM (a power of two ≤ 32768). */
  maxQueueSize: number;
  /**
   * Virtio features the device offers (device bits plus VERSION_1, ring features...). The
   * framework adds VHOST_USER_F_PROTOCOL_FEATURES and VHOST_F_LOG_ALL itself.
   */
  features: bigint;
  /**
   * Protocol features the device itself supports on top of the framework's (e.g. CONFIG when
   * it has a config space, INFLIGHT_SHMFD when it can resubmit).
   */
  protocolFeatures: bigint;
  /**
   * The device's queues may be packed rings (its handler only sees DescriptorChains, so any
   * device can): the framework then offers VIRTIO_F_RING_PACKED and runs PackedQueues when
   * the front-end acks it.
   */
  packedRing?: boolean;
  /**
   * Framework protocol features this device must not offer (e.g. PAGEFAULT for a back-end that
   * cannot take part in postcopy, as many real ones cannot).
   */
  withoutProtocolFeatures?: bigint;
  /**
   * Worker threads serving the queues (default numQueues: a thread per queue). Queue i is served
   * by thread i mod queueWorkers; the queues of one thread are polled together before it sleeps,
   * as the virtqueues of one QEMU iothread are. Fewer threads than queues saves a wake-up per
   * request and queue where the host has few cores; more serve queues in parallel.
   */
  queueWorkers?: number;
}

export interface VhostUserDevice {
  readonly info: DeviceInfo;
  /** Module loaded in each queue worker; must export `createQueueHandler: QueueHandlerFactory`. */
  readonly queueWorker: URL;
  /** Data handed to the queue worker of `queue` (structured-clone; SharedArrayBuffers are shared). */
  workerData?(queue: number): unknown;
  /**
   * Config space bytes [offset, offset+size) (GET_CONFIG). Throw (or return another size) when
   * they cannot be served: the front-end gets the spec's error, an empty reply.
   */
  getConfig?(offset: number, size: number, flags?: number): Uint8Array;
  /**
   * A front-end write to the config space (SET_CONFIG). Throw to refuse. `flags` is the
   * message's (ConfigFlags: 0 a driver write, 1 live migration restoring read-only fields).
   */
  setConfig?(offset: number, data: Uint8Array, flags?: number): void;
  /** The features the front-end acknowledged (device bits only matter to the device). */
  setFeatures?(features: bigint): void;
  /** Device state for live migration (SET_DEVICE_STATE_FD, save direction). */
  saveState?(): Uint8Array | Promise<Uint8Array>;
  /** Restores state saved by saveState() on the source (load direction). */
  loadState?(state: Uint8Array): void | Promise<void>;
  /** The front-end reset the device (RESET_DEVICE, SET_STATUS 0, disconnect). */
  reset?(): void;
}

/** What a queue handler gets in its worker. */
export interface QueueContext {
  queue: number;
  /** Guest memory as mapped by the backend; replaced by setMemory() on a new memory table. */
  memory: GuestMemory;
  /** Negotiated virtio features. */
  features: bigint;
  /** The device's workerData(queue). */
  data: unknown;
  /**
   * Other requests of this queue besides the one being processed: those the handler still has
   * in flight (promises not settled) plus those waiting in the ring (a packed ring counts 0 or 1
   * there, whether another is available), plus one for each other queue of this worker thread
   * with requests waiting (they wait while this handler holds the thread). A handler may
   * overlap work when this is not 0.
   */
  backlog?: () => number;
}

export interface QueueHandler {
  /**
   * Serves one request. Returns the number of bytes written into the chain's writable part
   * (the used length), or a promise of it to complete the request later (the worker keeps
   * taking requests meanwhile, up to a limit, and completes each when its promise settles, in
   * any order). Guest-controlled bytes: validate what you read; a throw or a rejection
   * completes the chain with length 0 and is reported, the queue goes on. Guest memory
   * written asynchronously must still be reported with chain.markWritten() before settling.
   */
  process(chain: DescriptorChain): number | Promise<number>;
  /** A new memory table is in force. */
  setMemory?(memory: GuestMemory): void;
  close?(): void;
}

export type QueueHandlerFactory = (ctx: QueueContext) => QueueHandler | Promise<QueueHandler>;
