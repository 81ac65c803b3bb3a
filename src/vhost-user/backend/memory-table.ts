/**
 * The back-end's view of guest memory: each region the front-end sends is mmap'd once from
 * its fd, and remembered with the front-end's user address, because vring addresses arrive in
 * the front-end's address space (SET_VRING_ADDR) and must be translated to guest-physical.
 */
import { GuestMemoryError } from "../../memory/errors.js";
import { toGpa, toLength } from "../../memory/guest-address.js";
import { GuestMemory } from "../../memory/guest-memory.js";
import { GuestMemoryRegion } from "../../memory/region.js";
import type { Fd } from "../../sys/fd.js";
import { fstat } from "../../sys/io.js";
import { VhostUserError } from "../protocol/errors.js";
import type { MemoryRegion } from "../protocol/payloads.js";

export interface MappedRegion {
  readonly guestAddress: number;
  readonly size: number;
  readonly userAddress: bigint;
  readonly mmapOffset: bigint;
  readonly region: GuestMemoryRegion;
  /** Registered with the postcopy userfaultfd. */
  registered: boolean;
}

const S_IFMT = 0o170000;
const S_IFREG = 0o100000;

/**
 * A shared mapping past the end of its file faults with SIGBUS on first access, which would
 * take the whole daemon down: a file (memfd, tmpfs, hugetlbfs) must hold [offset, offset+size).
 * Other fd kinds (devices) are left to mmap. A front-end that shrinks the file later can still
 * do it; sealing (F_SEAL_SHRINK) is the front-end's tool for that.
 */
export function checkFdCovers(fd: Fd, offset: bigint, size: bigint, what: string, request: string): void {
  const [fileSize, mode] = fstat(fd);
  if ((mode & S_IFMT) === S_IFREG && offset + size > BigInt(fileSize)) {
    throw new VhostUserError("BAD_VALUE", `${what} [offset ${offset}, +${size}) runs past the end of its file`, {
      request,
      value: offset + size,
      expected: `<= ${fileSize}`,
    });
  }
}

/** Maps one region description with its fd (ownership of `fd` is taken, also on error). */
export function mapRegion(desc: MemoryRegion, fd: Fd, request: string): MappedRegion {
  try {
    const size = toLength(desc.size, desc.guestAddress);
    const gpa = toGpa(desc.guestAddress);
    const off = toLength(desc.mmapOffset);
    if (size === 0) throw new VhostUserError("BAD_VALUE", "memory region with size 0", { request, value: desc.size });
    checkFdCovers(fd, desc.mmapOffset, desc.size, "memory region", request);
    // The spec puts no alignment on mmap_offset: one inside a page is mapped from the page
    // below and the region starts that many bytes into its mapping (GuestMemoryRegion.start).
    const region = GuestMemoryRegion.fromFd(fd, gpa, size, off, "external");
    return {
      guestAddress: gpa,
      size,
      userAddress: desc.userAddress,
      mmapOffset: desc.mmapOffset,
      region,
      registered: false,
    };
  } catch (e) {
    if (!fd.closed) fd.close();
    if (e instanceof GuestMemoryError) {
      throw new VhostUserError("BAD_VALUE", `memory region rejected: ${e.message}`, {
        request,
        value: desc.guestAddress,
        cause: e,
      });
    }
    throw e;
  }
}

export class BackendMemoryTable {
  #regions: MappedRegion[] = [];
  #memory: GuestMemory = new GuestMemory([]);

  get regions(): readonly MappedRegion[] {
    return this.#regions;
  }

  get memory(): GuestMemory {
    return this.#memory;
  }

  /**
   * Replaces the table; the caller closes the returned old regions once every worker has
   * switched (no worker may touch a mapping after it is closed).
   */
  replace(next: MappedRegion[], request: string): MappedRegion[] {
    let memory: GuestMemory;
    try {
      memory = new GuestMemory(next.map((r) => r.region));
    } catch (e) {
      throw new VhostUserError("BAD_VALUE", `memory table rejected: ${(e as Error).message}`, { request, cause: e });
    }
    const old = this.#regions;
    this.#regions = next;
    this.#memory = memory;
    return old;
  }

  add(r: MappedRegion, request: string): void {
    this.replace([...this.#regions, r], request);
  }

  /** Removes the region matching the description (guest address, size, user address). */
  remove(desc: MemoryRegion, request: string): MappedRegion {
    const i = this.#regions.findIndex(
      (r) =>
        BigInt(r.guestAddress) === desc.guestAddress &&
        BigInt(r.size) === desc.size &&
        r.userAddress === desc.userAddress,
    );
    if (i < 0) throw new VhostUserError("BAD_VALUE", "no such memory region", { request, value: desc.guestAddress });
    const r = this.#regions[i] as MappedRegion;
    this.replace(
      this.#regions.filter((_, k) => k !== i),
      request,
    );
    return r;
  }

  /** Front-end user address → guest-physical, for a range that must lie in one region. */
  uvaToGpa(uva: bigint, len: number, what: string, request: string): number {
    for (const r of this.#regions) {
      if (uva >= r.userAddress && uva + BigInt(len) <= r.userAddress + BigInt(r.size)) {
        return r.guestAddress + Number(uva - r.userAddress);
      }
    }
    throw new VhostUserError(
      "OUT_OF_RANGE",
      `${what} at user address 0x${uva.toString(16)} (+${len}) is not in any memory region`,
      {
        request,
        value: uva,
      },
    );
  }

  closeAll(): void {
    for (const r of this.#regions) r.region.close();
    this.#regions = [];
    this.#memory = new GuestMemory([]);
  }
}
