import type { GuestMemory } from "../memory/guest-memory.js";
import { VirtqueueError } from "./errors.js";
import {
  availRingSize,
  descTableSize,
  isPowerOfTwo,
  MAX_QUEUE_SIZE,
  usedRingSize,
  VIRTQ_AVAIL_ALIGN,
  VIRTQ_DESC_ALIGN,
  VIRTQ_USED_ALIGN,
} from "./ring.js";

/**
 * True when every byte of [gpa, gpa+len) is guest memory (and, with `writable`, none of it is
 * in a read-only region). No exceptions on the hot path: a buffer inside one region is one
 * lookup (GuestMemory caches the last region it found).
 */
export function inGuestMemory(mem: GuestMemory, gpa: number, len: number, writable: boolean): boolean {
  const end = gpa + len;
  if (!Number.isSafeInteger(end)) return false;
  let pos = gpa;
  while (pos < end) {
    const r = mem.findRegion(pos);
    if (!r || (writable && r.readonly)) return false;
    pos = r.end;
  }
  return true;
}

/** A ring address from a peer or a caller as an exact number, or a VirtqueueError. */
export function toAddress(v: number | bigint, what: string): number {
  if (typeof v === "bigint") {
    if (v >= 0n && v <= BigInt(Number.MAX_SAFE_INTEGER)) return Number(v);
  } else if (Number.isSafeInteger(v) && v >= 0) {
    return v;
  }
  throw new VirtqueueError("RING_OUT_OF_MEMORY", `${what} address ${v} is not a guest address`, {
    address: typeof v === "bigint" ? v : undefined,
  });
}

/** One area of a ring layout: its name, guest address, alignment, length, and whether the device writes it. */
export type RingArea = readonly [what: string, addr: number, align: number, len: number, writable: boolean];

/**
 * The checks every ring layout shares: each area aligned (MISALIGNED_RING), then each entirely
 * inside guest memory, writable where the device writes it (RING_OUT_OF_MEMORY).
 */
export function checkRingAreas(memory: GuestMemory, areas: readonly RingArea[]): void {
  for (const [what, addr, align] of areas) {
    if (addr % align !== 0) {
      throw new VirtqueueError("MISALIGNED_RING", `${what} at 0x${addr.toString(16)} is not ${align}-byte aligned`, {
        address: BigInt(addr),
        limit: align,
      });
    }
  }
  for (const [what, addr, , len, writable] of areas) {
    if (!inGuestMemory(memory, addr, len, writable)) {
      throw new VirtqueueError(
        "RING_OUT_OF_MEMORY",
        `${what} [0x${addr.toString(16)}, +${len}) is not inside ${writable ? "writable " : ""}guest memory`,
        { address: BigInt(addr), length: len },
      );
    }
  }
}

/**
 * The checks a queue setup must pass before the first access (virtio 1.x "Virtqueue
 * Alignment"): a power-of-two size up to 32768, each area aligned, each area entirely inside
 * guest memory, the used ring (which the device writes) inside writable memory.
 */
export function checkSplitQueueLayout(
  memory: GuestMemory,
  size: number,
  descTable: number,
  availRing: number,
  usedRing: number,
): void {
  if (!Number.isInteger(size) || !isPowerOfTwo(size) || size > MAX_QUEUE_SIZE) {
    throw new VirtqueueError("BAD_QUEUE_SIZE", `queue size ${size} is not a power of two in [1, 32768]`, {
      value: size,
      limit: MAX_QUEUE_SIZE,
    });
  }
  const areas = [
    ["descriptor table", descTable, VIRTQ_DESC_ALIGN, descTableSize(size), false],
    ["avail ring", availRing, VIRTQ_AVAIL_ALIGN, availRingSize(size), false],
    ["used ring", usedRing, VIRTQ_USED_ALIGN, usedRingSize(size), true],
  ] as const;
  checkRingAreas(memory, areas);
}
