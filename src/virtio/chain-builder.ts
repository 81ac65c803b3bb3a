/**
 * The checks every buffer descriptor of a chain passes, split or packed: they share this so a
 * hostile descriptor is refused the same way whichever ring layout carried it. The rings only
 * differ in how they find the next descriptor (split: `next` links with loop detection; packed:
 * consecutive ring slots), and hand each one here.
 */
import type { GuestMemory } from "../memory/guest-memory.js";
import { inGuestMemory } from "./bounds.js";
import { type ChainOwner, DescriptorChain } from "./chain.js";
import { VirtqueueError, type VirtqueueErrorCode, type VirtqueueErrorDetails } from "./errors.js";
import { VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE, VIRTQ_DESC_SIZE } from "./ring.js";

const FIELDS = 3;

export function u64(lo: number, hi: number): bigint {
  return (BigInt(hi) << 32n) | BigInt(lo);
}

export function chainError(
  head: number,
  index: number,
  indirect: boolean,
  code: VirtqueueErrorCode,
  message: string,
  extra: VirtqueueErrorDetails = {},
): VirtqueueError {
  return new VirtqueueError(code, `chain ${head}: ${message}`, { head, index, indirect, ...extra });
}

/** A DataView of [gpa, gpa+len) when it lies in one region window, else null. */
export function viewOf(mem: GuestMemory, gpa: number, len: number): DataView | null {
  const u8 = mem.slice(gpa, len);
  return u8 ? new DataView(u8.buffer, u8.byteOffset, u8.byteLength) : null;
}

/** Where an indirect table lies once its descriptor passed the checks. */
export interface IndirectTable {
  address: number;
  entries: number;
}

/**
 * Collects the buffers of one chain, checking each before it is kept: address + length does
 * not overflow 64 bits, the buffer lies in guest memory (writable memory for a device-writable
 * buffer), readable buffers come first, at most `maxChainLength` buffers. Reused for every
 * chain (one scratch array per queue).
 */
export class ChainBuilder {
  readonly maxChainLength: number;
  readonly indirectDesc: boolean;
  readonly #scratch: Float64Array;
  #memory: GuestMemory;
  #head = 0;
  #n = 0;
  #readable = 0;
  #readableLen = 0;
  #writableLen = 0;

  constructor(memory: GuestMemory, maxChainLength: number, indirectDesc: boolean) {
    if (!Number.isInteger(maxChainLength) || maxChainLength < 1 || maxChainLength > 65536) {
      throw new VirtqueueError("BAD_ARGUMENT", `maxChainLength ${maxChainLength} is not in [1, 65536]`, {
        value: maxChainLength,
      });
    }
    this.#memory = memory;
    this.maxChainLength = maxChainLength;
    this.indirectDesc = indirectDesc;
    this.#scratch = new Float64Array(maxChainLength * FIELDS);
  }

  set memory(m: GuestMemory) {
    this.#memory = m;
  }

  get count(): number {
    return this.#n;
  }

  /** Starts a chain; `head` names it in errors (split: head index, packed: buffer id or slot). */
  begin(head: number): void {
    this.#head = head;
    this.#n = 0;
    this.#readable = 0;
    this.#readableLen = 0;
    this.#writableLen = 0;
  }

  /** Renames the chain (packed: the buffer id is only known at its last descriptor). */
  set head(h: number) {
    this.#head = h;
  }

  /**
   * Checks an indirect descriptor (`index` in its table) and returns the table it points to.
   * `hasNext`: the descriptor also continues the chain (refused: INDIRECT with NEXT).
   */
  indirect(
    index: number,
    inIndirect: boolean,
    lo: number,
    hi: number,
    len: number,
    flags: number,
    hasNext: boolean,
  ): IndirectTable {
    const head = this.#head;
    const max = this.maxChainLength;
    this.#checkOverflow(index, inIndirect, lo, hi, len, flags);
    if (!this.indirectDesc) {
      throw chainError(
        head,
        index,
        inIndirect,
        "INDIRECT_NOT_NEGOTIATED",
        "indirect descriptor without VIRTIO_RING_F_INDIRECT_DESC",
        { flags },
      );
    }
    if (inIndirect)
      throw chainError(head, index, inIndirect, "NESTED_INDIRECT", "indirect descriptor inside an indirect table", {
        flags,
      });
    if (hasNext) {
      throw chainError(head, index, inIndirect, "INDIRECT_WITH_NEXT", "indirect descriptor also has NEXT", { flags });
    }
    if (len === 0 || len % VIRTQ_DESC_SIZE !== 0 || len / VIRTQ_DESC_SIZE > max) {
      throw chainError(
        head,
        index,
        inIndirect,
        "BAD_INDIRECT_LENGTH",
        `indirect table length ${len} is not a non-zero multiple of 16 of at most ${max} entries`,
        { address: u64(lo, hi), length: len, limit: max * VIRTQ_DESC_SIZE },
      );
    }
    const addr = hi * 0x1_0000_0000 + lo;
    // The spec has the device ignore VIRTQ_DESC_F_WRITE here; the table is only read.
    if (hi > 0x1fffff || !inGuestMemory(this.#memory, addr, len, false)) {
      throw chainError(
        head,
        index,
        inIndirect,
        "ADDRESS_OUT_OF_RANGE",
        `indirect table [0x${u64(lo, hi).toString(16)}, +${len}) is not guest memory`,
        { address: u64(lo, hi), length: len, flags },
      );
    }
    return { address: addr, entries: len / VIRTQ_DESC_SIZE };
  }

  #checkOverflow(index: number, inIndirect: boolean, lo: number, hi: number, len: number, flags: number): void {
    // addr + len past 2^64 is wrong whatever memory there is. len < 2^32, so it can only carry
    // into a high word that is already all ones.
    if (hi === 0xffffffff && lo + len > 0xffffffff) {
      throw chainError(
        this.#head,
        index,
        inIndirect,
        "ADDRESS_OVERFLOW",
        `addr 0x${u64(lo, hi).toString(16)} + len ${len} overflows 64 bits`,
        { address: u64(lo, hi), length: len, flags },
      );
    }
  }

  /** Checks a buffer descriptor and keeps it (only VIRTQ_DESC_F_NEXT and _WRITE of `flags` matter). */
  buffer(index: number, inIndirect: boolean, lo: number, hi: number, len: number, flags: number): void {
    const head = this.#head;
    this.#checkOverflow(index, inIndirect, lo, hi, len, flags);
    const addr = hi * 0x1_0000_0000 + lo;
    const writable = (flags & VIRTQ_DESC_F_WRITE) !== 0;
    // A zero-length buffer touches no memory, so its address does not matter.
    if (len !== 0 && (hi > 0x1fffff || !inGuestMemory(this.#memory, addr, len, writable))) {
      throw chainError(
        head,
        index,
        inIndirect,
        "ADDRESS_OUT_OF_RANGE",
        `buffer [0x${u64(lo, hi).toString(16)}, +${len}) is not ${writable ? "writable " : ""}guest memory`,
        { address: u64(lo, hi), length: len, flags },
      );
    }
    const n = this.#n;
    if (writable) {
      this.#writableLen += len;
    } else {
      if (this.#readable !== n) {
        throw chainError(
          head,
          index,
          inIndirect,
          "READABLE_AFTER_WRITABLE",
          "device-readable buffer after a device-writable one",
          { flags },
        );
      }
      this.#readable++;
      this.#readableLen += len;
    }
    if (n === this.maxChainLength)
      throw chainError(head, index, inIndirect, "CHAIN_TOO_LONG", `more than ${this.maxChainLength} buffers`, {
        value: n + 1,
        limit: this.maxChainLength,
      });
    const out = this.#scratch;
    out[n * FIELDS] = addr;
    out[n * FIELDS + 1] = len;
    out[n * FIELDS + 2] = flags & (VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE);
    this.#n = n + 1;
  }

  /** The chain collected since begin(). */
  finish(owner: ChainOwner, indirect: boolean, slots = 1): DescriptorChain {
    // Copied into a plain array (see DescriptorChain: no off-heap buffer per request).
    const scratch = this.#scratch;
    const n = this.#n * FIELDS;
    const d: number[] = [];
    for (let i = 0; i < n; i++) d.push(scratch[i] as number);
    return new DescriptorChain(
      owner,
      this.#head,
      d,
      this.#readable,
      this.#readableLen,
      this.#writableLen,
      indirect,
      slots,
    );
  }
}
