/** Messages between the backend's control plane (main thread) and its queue workers. */
import type { SharedGuestMemory } from "../../memory/guest-memory.js";
import type { DirtyLogWriterHandle } from "../../memory/shared-dirty-log.js";
import type { SharedInflightQueue } from "./inflight.js";

export interface WorkerInit {
  module: string;
  /** The queues this worker serves (its group), each with the device's workerData(queue). */
  queues: { queue: number; data: unknown }[];
  log: DirtyLogWriterHandle;
}

/** The ring as the worker needs it: guest-physical addresses, already translated and checked. */
export interface RingConfig {
  /** VIRTIO_F_RING_PACKED was negotiated: descTable is the descriptor ring, availRing/usedRing the driver/device areas. */
  packed: boolean;
  size: number;
  descTable: number;
  availRing: number;
  usedRing: number;
  /** Guest-physical address at which used-ring writes are logged, or null (no VHOST_VRING_F_LOG). */
  logAddress: number | null;
  features: bigint;
  /** SET_VRING_BASE: split rings the avail index; packed rings both positions (packed-ring.ts encoding). */
  nextAvail: number;
  /** This queue's inflight region (INFLIGHT_SHMFD), or null. */
  inflight: SharedInflightQueue | null;
}

/** A command for one queue of the worker's group (`queue`), acknowledged by a "done" with its id. */
export type ToQueue =
  | { type: "memory"; id: number; queue: number; memory: SharedGuestMemory }
  | {
      type: "start";
      id: number;
      queue: number;
      ring: RingConfig;
      kickFd: number;
      callFd: number;
      errFd: number;
      enabled: boolean;
    }
  | { type: "enable"; id: number; queue: number; enabled: boolean }
  | { type: "fds"; id: number; queue: number; callFd: number; errFd: number }
  | { type: "stop"; id: number; queue: number };

/** "close": the whole worker (every queue drains, every handler closes). */
export type ToWorker = ToQueue | { type: "close" };

export type FromWorker =
  | { type: "ready" }
  | { type: "done"; id: number; nextAvail?: number; nextUsed?: number; error?: string }
  | { type: "event"; queue: number; level: "warn" | "error"; message: string };
