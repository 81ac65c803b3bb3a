export type VirtqueueErrorCode =
  // Setup (the queue is not created)
  | "BAD_QUEUE_SIZE" // size is 0, not a power of two, or above 32768
  | "MISALIGNED_RING" // desc table not 16-aligned, avail ring not 2-aligned, used ring not 4-aligned
  | "RING_OUT_OF_MEMORY" // a ring area is not entirely inside (writable, for the used ring) guest memory
  // Ring level: the queue is broken (SplitQueue.broken) until it is set up again
  | "AVAIL_IDX_JUMP" // avail idx moved more than the queue size past nextAvail
  | "RING_ACCESS" // a ring area stopped being guest memory (e.g. the memory table changed under it)
  | "RING_OVERRUN" // (packed) a chain runs past the ring slots the driver owns: no end to skip to
  | "QUEUE_BROKEN" // the queue broke earlier; `cause` is the original error
  // Chain level: this request is dropped; the queue continues
  | "HEAD_OUT_OF_RANGE" // the avail ring names a head index >= queue size
  | "NEXT_OUT_OF_RANGE" // a descriptor's next index >= the size of its table
  | "DESCRIPTOR_LOOP" // a chain visits the same descriptor twice
  | "CHAIN_TOO_LONG" // more buffer descriptors than the limit (the queue size by default)
  | "INDIRECT_NOT_NEGOTIATED" // VIRTQ_DESC_F_INDIRECT without VIRTIO_RING_F_INDIRECT_DESC
  | "NESTED_INDIRECT" // VIRTQ_DESC_F_INDIRECT inside an indirect table
  | "INDIRECT_WITH_NEXT" // VIRTQ_DESC_F_INDIRECT together with VIRTQ_DESC_F_NEXT
  | "BAD_INDIRECT_LENGTH" // indirect table length 0, not a multiple of 16, or more entries than allowed
  | "ADDRESS_OVERFLOW" // addr + len wraps past 2^64
  | "ADDRESS_OUT_OF_RANGE" // [addr, addr+len) is not entirely guest memory (writable, for a write buffer)
  | "READABLE_AFTER_WRITABLE" // a device-readable descriptor follows a device-writable one
  // Caller mistakes (device or driver code in this process, not guest input)
  | "BAD_USED_HEAD" // addUsed() with a head index >= queue size
  | "BAD_USED_ELEMENT" // (driver side) the device returned an id that is not in flight
  | "NO_SPACE" // (driver side) not enough free descriptors
  | "BAD_ARGUMENT";

/** The values that were wrong, as received (64-bit guest values stay exact as bigint). */
export interface VirtqueueErrorDetails {
  /** Head descriptor index of the chain the error belongs to. */
  head?: number;
  /** Index of the offending descriptor in its table. */
  index?: number;
  /** True when the offending descriptor is in an indirect table. */
  indirect?: boolean;
  address?: bigint;
  length?: number;
  flags?: number;
  /** The offending index/size/next value. */
  value?: number;
  /** The limit it broke. */
  limit?: number;
  /** (packed) Ring slots the refused chain took: what addUsed() needs to return it. */
  slots?: number;
}

/**
 * A virtqueue that a peer (guest driver or device) filled with something the spec forbids,
 * or a setup that cannot work. Never thrown after an out-of-bounds access: every check runs
 * before the memory is touched.
 */
export class VirtqueueError extends Error {
  override readonly name = "VirtqueueError";
  constructor(
    readonly code: VirtqueueErrorCode,
    message: string,
    readonly details: VirtqueueErrorDetails = {},
    options?: { cause?: unknown },
  ) {
    super(message, options);
  }

  /** True for errors after which the queue is unusable (the device should set NEEDS_RESET). */
  get breaksQueue(): boolean {
    return (
      this.code === "AVAIL_IDX_JUMP" ||
      this.code === "RING_ACCESS" ||
      this.code === "RING_OVERRUN" ||
      this.code === "QUEUE_BROKEN"
    );
  }
}
