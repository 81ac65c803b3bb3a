/**
 * vhost-user-blk over a raw image file: the control-plane half (features, config space, what
 * each queue worker gets). The request loop is in handler.ts, one worker thread per queue.
 */
import { basename } from "node:path";
import type { VhostUserDevice } from "../../vhost-user/backend/device.js";
import { autoQueueWorkers } from "../../vhost-user/backend/queue-thread.js";
import { featureMask, ProtocolFeature } from "../../vhost-user/protocol/constants.js";
import {
  features,
  VIRTIO_F_VERSION_1,
  VIRTIO_RING_F_EVENT_IDX,
  VIRTIO_RING_F_INDIRECT_DESC,
} from "../../virtio/features.js";
import { configSlice, encodeConfig } from "./config.js";
import {
  Config,
  SECTOR_SIZE,
  VIRTIO_BLK_F_BLK_SIZE,
  VIRTIO_BLK_F_CONFIG_WCE,
  VIRTIO_BLK_F_DISCARD,
  VIRTIO_BLK_F_FLUSH,
  VIRTIO_BLK_F_MQ,
  VIRTIO_BLK_F_RO,
  VIRTIO_BLK_F_SEG_MAX,
  VIRTIO_BLK_F_SIZE_MAX,
  VIRTIO_BLK_F_WRITE_ZEROES,
  VIRTIO_BLK_ID_BYTES,
} from "./constants.js";
import type { BlkWorkerData } from "./handler.js";
import { BlockImage } from "./image.js";
import type { IoMode } from "./io-policy.js";
import { type BlkQueueCounters, createBlkStats, readBlkStats } from "./stats.js";

export interface BlkOptions {
  /** Raw image file. */
  path: string;
  readonly?: boolean;
  /** Queues; default 1. */
  queues?: number;
  /**
   * Worker threads serving the queues (queue i on thread i mod N). Default: half the host's
   * CPUs, at least 1, at most one per queue (autoQueueWorkers).
   */
  queueWorkers?: number;
  /** Open the image with O_DIRECT (bypass the host page cache). */
  direct?: boolean;
  /** Largest queue size accepted (default 1024). */
  maxQueueSize?: number;
  /**
   * GET_ID answer: printable ASCII, at most 20 bytes, NUL-padded on the wire. Default: the
   * image's file name, other characters replaced by '_', cut to 20.
   */
  serial?: string;
  /**
   * The queue size the front-end will use (QEMU's -device vhost-user-blk-pci,queue-size=N;
   * default 128): seg_max is this minus 2, as QEMU's own virtio-blk has it.
   */
  queueSize?: number;
  /** Extra protocol features on top of INFLIGHT_SHMFD (which the blk device always offers). */
  protocolFeatures?: bigint;
  /** Test knob: each request waits this long in its worker before completing (0 = none). */
  debugDelayMs?: number;
  /**
   * "async": reads and writes go to the queue's own pool of native I/O threads, so a queue has
   * several requests in flight at once (VMSHIFT_BLK_IO_THREADS threads per queue; 8 with
   * `direct`, else 2). "sync": each request is done in its queue's worker thread, one after the other.
   * "adaptive": inline unless others of the queue are there and it waits for the device or
   * misses the page cache (io-policy.ts). "auto" (default): adaptive (see docs/blk.md).
   */
  io?: "auto" | "sync" | "async" | "adaptive";
  /**
   * adaptive: with others of its queue waiting, a large cached read goes to the idle pool so its
   * copy overlaps the next (io-policy.ts, "spread"). Off by default: it measured slower in a
   * guest on two shared cores (docs/blk.md). Default: VMSHIFT_BLK_SPREAD=1 turns it on.
   */
  spread?: boolean;
}

/** The I/O mode the queue workers use. */
export function ioMode(o: Pick<BlkOptions, "io">): IoMode {
  const io = o.io ?? "auto";
  return io === "auto" ? "adaptive" : io;
}

/** Segments per request in a 128-entry queue (header + segments + status fit it), QEMU's default queue size. */
export const SEG_MAX = 126;
/** The queue size seg_max is computed for unless told (QEMU's vhost-user-blk default queue-size). */
export const DEFAULT_QUEUE_SIZE = 128;
/** Largest segment (config size_max). */
export const SIZE_MAX = 1 << 20;
/** Discard / write-zeroes limits: 16 MiB, one segment per request (as QEMU's own virtio-blk). */
export const MAX_DISCARD_SECTORS = 32768;
export const MAX_DISCARD_SEG = 1;

export interface BlkDevice extends VhostUserDevice {
  /** The capacity in force (sectors of 512 bytes). */
  readonly capacitySectors: number;
  readonly options: Readonly<BlkOptions>;
  /**
   * Online resize: reads the image's size again and, when it changed, puts the new capacity in
   * the config space and in force in every queue worker at once. The front-end still has to be
   * told (BackendSession.notifyConfigChange(), CONFIG_CHANGE_MSG), as `vmshift blk` does on SIGHUP.
   */
  resize(): { from: number; to: number };
  /**
   * The cache mode the driver chose through the config space (VIRTIO_BLK_F_CONFIG_WCE):
   * writeback (default: FLUSH makes writes durable) or writethrough (every write is made
   * durable before it completes).
   */
  readonly writeback: boolean;
  /** Writes made durable on their own because the cache was in writethrough mode. */
  readonly writeThroughFlushes: number;
  /** Per-queue request, byte, error and in-flight counters, as of now. */
  stats(): BlkQueueCounters[];
}

/**
 * The GET_ID answer: "The string is NUL-padded ASCII" of VIRTIO_BLK_ID_BYTES. An explicit serial
 * must be printable ASCII; a file name gets its other characters replaced by '_'.
 */
export function blkId(serial: string | undefined, path: string): Uint8Array {
  let text: string;
  if (serial !== undefined) {
    if (!/^[\x20-\x7e]*$/.test(serial) || serial.length > VIRTIO_BLK_ID_BYTES)
      throw new RangeError(`serial ${JSON.stringify(serial)}: up to ${VIRTIO_BLK_ID_BYTES} printable ASCII characters`);
    text = serial;
  } else {
    text = basename(path)
      .replace(/[^\x20-\x7e]/g, "_")
      .slice(0, VIRTIO_BLK_ID_BYTES);
  }
  const id = new Uint8Array(VIRTIO_BLK_ID_BYTES);
  for (let i = 0; i < text.length; i++) id[i] = text.charCodeAt(i);
  return id;
}

export function blkDevice(o: BlkOptions): BlkDevice {
  const queues = o.queues ?? 1;
  if (!Number.isInteger(queues) || queues < 1 || queues > 64) throw new RangeError(`queues ${queues}: 1..64`);
  const queueWorkers = o.queueWorkers ?? autoQueueWorkers(queues);
  if (!Number.isInteger(queueWorkers) || queueWorkers < 1)
    throw new RangeError(`queue workers ${queueWorkers}: at least 1`);
  const readonly = !!o.readonly;
  // Open once here to fail early (missing file, O_DIRECT unsupported) and learn the size.
  const probe = BlockImage.open(o.path, { readonly, direct: !!o.direct });
  let size: number;
  try {
    size = probe.size();
  } finally {
    probe.close();
  }
  const capacitySectors = Math.floor(size / SECTOR_SIZE);
  const maxQueueSize = o.maxQueueSize ?? 1024;
  const queueSize = Math.min(o.queueSize ?? DEFAULT_QUEUE_SIZE, maxQueueSize);
  if (!Number.isInteger(queueSize) || queueSize < 4) throw new RangeError(`queue size ${queueSize}: at least 4`);
  const segMax = queueSize - 2;
  if (capacitySectors === 0) throw new RangeError(`${o.path}: image smaller than one sector (${size} bytes)`);

  let f = features(
    VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_INDIRECT_DESC,
    VIRTIO_RING_F_EVENT_IDX,
    VIRTIO_BLK_F_SIZE_MAX,
    VIRTIO_BLK_F_SEG_MAX,
    VIRTIO_BLK_F_BLK_SIZE,
    VIRTIO_BLK_F_FLUSH,
  );
  if (queues > 1) f |= features(VIRTIO_BLK_F_MQ);
  // A read-only disk offers neither discard nor write zeroes: those requests then get UNSUPP.
  if (readonly) f |= features(VIRTIO_BLK_F_RO);
  else f |= features(VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_WRITE_ZEROES, VIRTIO_BLK_F_CONFIG_WCE);

  // The cache mode and its flush count, shared with every queue worker: [writeback 0/1, flushes].
  // Writeback exactly when the driver can flush (QEMU's virtio-blk: write cache iff FLUSH):
  // "If VIRTIO_BLK_F_CONFIG_WCE is negotiated but VIRTIO_BLK_F_FLUSH is not, the device MUST
  // initialize writeback to 0." Until features are negotiated the config shows writeback.
  const cache = new Int32Array(new SharedArrayBuffer(8));
  cache[0] = 1;
  /** Device feature bits last negotiated (null: none since the last reset). */
  let negotiated: bigint | null = null;
  const DEVICE_BITS = features(VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_CONFIG_WCE);
  // The capacity in force, shared with every queue worker (online resize).
  const capacity = new BigInt64Array(new SharedArrayBuffer(8));
  capacity[0] = BigInt(capacitySectors);
  const geometry = (sectors: number) => ({
    capacitySectors: sectors,
    writeback: Atomics.load(cache, 0) === 1,
    blkSize: SECTOR_SIZE,
    sizeMax: SIZE_MAX,
    segMax,
    numQueues: queues,
    maxDiscardSectors: MAX_DISCARD_SECTORS,
    maxDiscardSeg: MAX_DISCARD_SEG,
    discardSectorAlignment: 8,
    maxWriteZeroesSectors: MAX_DISCARD_SECTORS,
    maxWriteZeroesSeg: MAX_DISCARD_SEG,
    writeZeroesMayUnmap: true,
  });
  let config = encodeConfig(geometry(capacitySectors));
  const stats = createBlkStats(queues);
  const id = blkId(o.serial, o.path);
  const data: BlkWorkerData = {
    path: o.path,
    readonly,
    direct: !!o.direct,
    capacitySectors,
    capacity: capacity.buffer as SharedArrayBuffer,
    cache: cache.buffer as SharedArrayBuffer,
    id,
    discard: !readonly,
    writeZeroes: !readonly,
    writeZeroesMayUnmap: true,
    maxDiscardSectors: MAX_DISCARD_SECTORS,
    maxDiscardSeg: MAX_DISCARD_SEG,
    maxWriteZeroesSectors: MAX_DISCARD_SECTORS,
    maxWriteZeroesSeg: MAX_DISCARD_SEG,
    segMax,
    debugDelayMs: o.debugDelayMs ?? 0,
    stats,
    io: ioMode(o),
    spread: o.spread ?? process.env.VMSHIFT_BLK_SPREAD === "1",
  };
  return {
    get capacitySectors() {
      return Number(Atomics.load(capacity, 0));
    },
    resize() {
      const from = Number(Atomics.load(capacity, 0));
      const img = BlockImage.open(o.path, { readonly: true });
      let size: number;
      try {
        size = img.size();
      } finally {
        img.close();
      }
      const to = Math.floor(size / SECTOR_SIZE);
      if (to === 0) throw new RangeError(`${o.path}: image smaller than one sector (${size} bytes)`);
      if (to !== from) {
        config = encodeConfig(geometry(to));
        Atomics.store(capacity, 0, BigInt(to));
      }
      return { from, to };
    },
    get writeback() {
      return Atomics.load(cache, 0) === 1;
    },
    get writeThroughFlushes() {
      return Atomics.load(cache, 1);
    },
    stats: () => readBlkStats(stats),
    options: { ...o },
    info: {
      numQueues: queues,
      maxQueueSize,
      features: f,
      // The handler only sees DescriptorChains: split or packed rings, whichever the driver takes.
      packedRing: true,
      // Reconnect: the framework tracks heads in the inflight region and resubmits them after a
      // restart; re-running a read or write of the same data is harmless, so blk can opt in.
      protocolFeatures: featureMask(ProtocolFeature.INFLIGHT_SHMFD) | (o.protocolFeatures ?? 0n),
      queueWorkers,
    },
    queueWorker: new URL("./handler.js", import.meta.url),
    workerData: () => data,
    getConfig: (offset, size) => configSlice(config, offset, size),
    setFeatures(f) {
      // Only a change of the device's own bits re-initializes the cache mode: SET_FEATURES also
      // toggles VHOST_F_LOG_ALL during a migration, which must not undo the driver's choice.
      const bits = f & DEVICE_BITS;
      if (bits === negotiated) return;
      negotiated = bits;
      Atomics.store(cache, 0, (bits & features(VIRTIO_BLK_F_FLUSH)) !== 0n ? 1 : 0);
      config = encodeConfig(geometry(Number(Atomics.load(capacity, 0))));
    },
    reset() {
      negotiated = null;
    },
    // The one writable field: the cache mode (virtio 1.2 5.2.6.3, VIRTIO_BLK_F_CONFIG_WCE).
    setConfig: (offset, data) => {
      if (readonly || offset !== Config.writeback || data.length !== 1 || (data[0] as number) > 1)
        throw new RangeError(
          `config write of ${data.length} byte(s) at ${offset}: only the writeback byte (${Config.writeback}) is writable`,
        );
      Atomics.store(cache, 0, data[0] as number);
      config = encodeConfig(geometry(Number(Atomics.load(capacity, 0))));
    },
  };
}
