/** Messages between the backend's control plane (main thread) and its queue workers. */
import type { SharedGuestMemory } from "../../memory/guest-memory.js";
import type { DirtyLogWriterHandle } from "../../memory/shared-dirty-log.js";
import type { SharedInflightQueue } from "./inflight.js";

export interface WorkerInit {
  module: string;
  queue: number;
  data: unknown;
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

export type ToWorker =
  | { type: "memory"; id: number; memory: SharedGuestMemory }
  | { type: "start"; id: number; ring: RingConfig; kickFd: number; callFd: number; errFd: number; enabled: boolean }
  | { type: "enable"; id: number; enabled: boolean }
  | { type: "fds"; id: number; callFd: number; errFd: number }
  | { type: "stop"; id: number }
  | { type: "close"; id: number };

export type FromWorker =
  | { type: "ready" }
  | { type: "done"; id: number; nextAvail?: number; nextUsed?: number; error?: string }
  | { type: "event"; level: "warn" | "error"; message: string };
