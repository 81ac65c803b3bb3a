import { readdirSync } from "node:fs";
import { GuestMemory } from "../../src/memory/guest-memory.js";
import { GuestMemoryRegion } from "../../src/memory/region.js";
import { SplitQueueDriver } from "../../src/virtio/driver.js";
import { SplitQueue, type SplitQueueConfig } from "../../src/virtio/queue.js";

/**
 * Guest memory for the virtqueue tests (real memfds):
 *   [0x00000, 0x40000)  region A
 *   [0x40000, 0x80000)  region B (adjacent: buffers may straddle A/B)
 *   [0x80000, 0x100000) hole
 *   [0x100000, 0x110000) read-only region
 */
export const MEMORY_END = 0x80000;
export const HOLE = 0x90000;
export const ROM = 0x100000;
export const RING_BASE = 0x1000;
export const INDIRECT_BASE = 0x20000;
export const INDIRECT_ENTRIES = 32;
export const DATA = 0x30000;

export function makeMemory(): GuestMemory {
  return new GuestMemory([
    GuestMemoryRegion.memfd(0, 0x40000),
    GuestMemoryRegion.memfd(0x40000, 0x40000),
    GuestMemoryRegion.memfd(ROM, 0x10000, { readonly: true }),
  ]);
}

export interface Pair {
  driver: SplitQueueDriver;
  queue: SplitQueue;
}

/** A driver that lays out the rings at RING_BASE and a device queue over the same rings. */
export function makePair(
  memory: GuestMemory,
  size: number,
  features = 0n,
  device: Partial<SplitQueueConfig> = {},
): Pair {
  const driver = SplitQueueDriver.at(memory, RING_BASE, size, {
    features,
    indirectTables: { address: INDIRECT_BASE, entries: INDIRECT_ENTRIES },
  });
  const queue = new SplitQueue(memory, { ...driver.layout, features, ...device });
  return { driver, queue };
}

export function bytes(...values: number[]): Uint8Array {
  return Uint8Array.from(values);
}

export function openFds(): number {
  return readdirSync("/proc/self/fd").length;
}
