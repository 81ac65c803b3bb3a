/**
 * vhost-user-fs over one shared directory: the control-plane half (features, queues, the
 * device state for live migration). The FUSE session runs in the request queue's worker
 * (handler.ts); QEMU's vhost-user-fs-pci supplies the config space (tag, queue count) itself.
 *
 * Queues: 0 = hiprio (FORGETs), 1 = the one request queue (GET_QUEUE_NUM answers 2): the
 * inode and handle tables live in one thread, so QEMU's num-request-queues must stay 1.
 *
 * Migration (QEMU >= 8.2): QEMU stops the rings, then asks for the back-end's state through
 * SET_DEVICE_STATE_FD (save) and hands it to the destination's back-end the same way (load),
 * followed by CHECK_DEVICE_STATE. saveState() asks the request worker for its tables;
 * loadState() checks the bytes at once (a bad state fails CHECK_DEVICE_STATE) and gives them
 * to the request worker — the running one, or the one the first ring start creates.
 */
import { randomUUID } from "node:crypto";
import { statSync } from "node:fs";
import { BroadcastChannel } from "node:worker_threads";
import type { VhostUserDevice } from "../../vhost-user/backend/device.js";
import {
  features,
  VIRTIO_F_VERSION_1,
  VIRTIO_RING_F_EVENT_IDX,
  VIRTIO_RING_F_INDIRECT_DESC,
} from "../../virtio/features.js";
import type { FsChannelMessage, FsWorkerData } from "./handler.js";
import { decodeState } from "./state.js";

/** Device id of a file system device (virtio 1.2, 5 "Device Types"). */
export const VIRTIO_ID_FS = 26;

export interface FsOptions {
  /** The directory the guest sees as its root. */
  sharedDir: string;
  readonly?: boolean;
  /** Seconds the guest may cache names and attributes (default 1). */
  cacheSeconds?: number;
  /** Pages per request (INIT max_pages; max_write = 4 KiB × this). Default 32. */
  maxPages?: number;
  /** Offer READDIRPLUS (default true). */
  readdirplus?: boolean;
  /** Largest queue size accepted (default 1024). */
  maxQueueSize?: number;
  /** How long saveState() waits for the request worker (default 10 s). */
  stateTimeoutMs?: number;
}

export interface FsDevice extends VhostUserDevice {
  readonly options: Readonly<FsOptions>;
  /** The last load's stale counts (inodes/handles whose path was gone on this side), or null. */
  readonly lastLoad: { staleInodes: number; staleHandles: number } | null;
  /** Releases the control plane's channel. */
  close(): void;
}

export function fsDevice(o: FsOptions): FsDevice {
  const st = statSync(o.sharedDir);
  if (!st.isDirectory()) throw new Error(`${o.sharedDir}: not a directory`);
  const channelName = `vmshift-fs-${process.pid}-${randomUUID()}`;
  let bc: BroadcastChannel | null = null;
  let workersUp = 0;
  let nextId = 1;
  let pending: Uint8Array | null = null;
  let lastLoad: { staleInodes: number; staleHandles: number } | null = null;
  const waiters = new Map<number, (m: FsChannelMessage) => void>();
  const channel = (): BroadcastChannel => {
    if (bc) return bc;
    const c = new BroadcastChannel(channelName);
    c.unref();
    c.onmessage = (ev) => {
      const m = (ev as MessageEvent).data as FsChannelMessage;
      if (m.type === "up") workersUp++;
      else if (m.type === "down") workersUp = Math.max(0, workersUp - 1);
      else if (m.type === "saved" || m.type === "loaded") {
        const w = waiters.get(m.id);
        waiters.delete(m.id);
        w?.(m);
      }
    };
    bc = c;
    return c;
  };
  // Listen from the start: the workers announce themselves when their handler is created.
  channel();
  const timeoutMs = o.stateTimeoutMs ?? 10_000;
  const ask = (m: FsChannelMessage & { id: number }): Promise<FsChannelMessage> =>
    new Promise((resolve, reject) => {
      const c = channel();
      const t = setTimeout(() => {
        waiters.delete(m.id);
        reject(new Error(`the request queue's worker did not answer '${m.type}' within ${timeoutMs} ms`));
      }, timeoutMs);
      waiters.set(m.id, (r) => {
        clearTimeout(t);
        resolve(r);
      });
      c.postMessage(m);
    });

  const data = (role: "hiprio" | "request"): FsWorkerData => ({
    role,
    channel: channelName,
    sharedDir: o.sharedDir,
    readonly: !!o.readonly,
    cacheSeconds: o.cacheSeconds ?? 1,
    maxPages: o.maxPages ?? 32,
    readdirplus: o.readdirplus ?? true,
    state: null,
  });

  return {
    options: { ...o },
    get lastLoad() {
      return lastLoad;
    },
    info: {
      numQueues: 2,
      maxQueueSize: o.maxQueueSize ?? 1024,
      features: features(VIRTIO_F_VERSION_1, VIRTIO_RING_F_INDIRECT_DESC, VIRTIO_RING_F_EVENT_IDX),
      protocolFeatures: 0n,
    },
    queueWorker: new URL("./handler.js", import.meta.url),
    workerData(queue: number) {
      if (queue === 0) return data("hiprio");
      const d = data("request");
      // The destination: the state loaded before the rings started goes to the worker that serves them.
      d.state = pending;
      pending = null;
      return d;
    },
    async saveState() {
      if (workersUp === 0) {
        // The guest never started the request queue here (or the state arrived and was never
        // used): what we hold is the whole state.
        if (pending) return pending;
        return new Uint8Array(0);
      }
      const r = await ask({ type: "save", id: nextId++ });
      if (r.type !== "saved" || !r.state) throw new Error(`state save failed: ${r.type === "saved" ? r.error : "?"}`);
      return r.state;
    },
    async loadState(state: Uint8Array) {
      // An empty state: the source never had a FUSE session. Nothing to restore.
      if (state.length === 0) return;
      decodeState(state); // throws on anything malformed: CHECK_DEVICE_STATE then fails
      if (workersUp === 0) {
        pending = state;
        return;
      }
      const r = await ask({ type: "load", id: nextId++, state });
      if (r.type !== "loaded" || r.error) throw new Error(`state load failed: ${r.type === "loaded" ? r.error : "?"}`);
      lastLoad = r.stale ?? null;
    },
    close() {
      for (const w of waiters.values()) w({ type: "saved", id: 0, error: "device closed" });
      waiters.clear();
      bc?.close();
      bc = null;
    },
  };
}
