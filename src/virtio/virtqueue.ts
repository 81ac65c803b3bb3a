import type { GuestMemory } from "../memory/guest-memory.js";
import type { ChainOwner, DescriptorChain } from "./chain.js";
import type { VirtqueueError } from "./errors.js";

/**
 * What a device loop needs from its queue, whichever the layout (SplitQueue, PackedQueue): pop,
 * return, and the notification-suppression steps. `slots` in addUsed() is the chain's
 * DescriptorChain.slots (split rings ignore it).
 */
export interface DeviceVirtqueue extends ChainOwner {
  readonly packed: boolean;
  readonly size: number;
  readonly maxChainLength: number;
  /**
   * VIRTIO_RING_F_EVENT_IDX was negotiated: the driver names the used position it wants to hear
   * about (split used_event, packed off_wrap), so asking needsNotification() after every
   * completion signals at most once per re-arm of the driver.
   */
  readonly eventIdx: boolean;
  readonly broken: VirtqueueError | null;
  /** Next avail position (split: avail ring index mod 2^16; packed: ring slot). */
  readonly nextAvail: number;
  /** Next used position (split: used idx mod 2^16; packed: ring slot). */
  readonly nextUsed: number;
  popChain(): DescriptorChain | null;
  addUsed(head: number, len: number, slots?: number): void;
  availableCount(): number;
  needsNotification(): boolean;
  enableNotification(): boolean;
  disableNotification(): void;
  setMemory(memory: GuestMemory): void;
}
