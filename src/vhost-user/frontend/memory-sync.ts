/**
 * The front-end's memory table as the back-end knows it, and how to bring the back-end up to
 * date: ADD_MEM_REG / REM_MEM_REG for what changed when CONFIGURE_MEM_SLOTS is negotiated, else
 * one SET_MEM_TABLE (at most 8 regions); in postcopy (after POSTCOPY_LISTEN) the variant QEMU
 * sends, where the back-end answers each region with the address it mapped it at and only our
 * acknowledgement lets it register the mappings with its userfaultfd.
 *
 * Addresses: each region's "user address" is its host address in this process; ring guest
 * addresses are translated into that same space (userAddress()).
 */
import type { GuestMemory } from "../../memory/guest-memory.js";
import type { GuestMemoryRegion } from "../../memory/region.js";
import type { Fd } from "../../sys/fd.js";
import { isSizeSealed } from "../../sys/memfd.js";
import type { Connection } from "../connection.js";
import { VHOST_MEMORY_BASELINE_NREGIONS } from "../protocol/constants.js";
import { VhostUserError } from "../protocol/errors.js";
import type { FrontendRequests } from "../protocol/frontend-requests.js";
import type { MemoryRegion } from "../protocol/payloads.js";
import { FrontendError } from "./errors.js";

/** One entry of the memory table as sent to the backend. */
interface SentRegion {
  desc: MemoryRegion;
  region: GuestMemoryRegion;
  /** Postcopy: where the back-end mapped this region (from its SET_MEM_TABLE / ADD_MEM_REG reply). */
  backendAddress?: bigint;
}

/**
 * One region of the back-end's address table (postcopy): the back-end registered
 * [backendAddress, +size) with its userfaultfd, and it holds guest-physical [guestAddress, +size).
 */
export interface BackendRegionBase {
  guestAddress: number;
  size: number;
  /** The region's address in the back-end's process (its reply's user address). */
  backendAddress: bigint;
  /** The same region in this process. */
  frontendAddress: bigint;
}

export interface MemTableOptions {
  /**
   * Postcopy (after POSTCOPY_LISTEN): called with the back-end's address table once its replies
   * are in and before the acknowledgement that lets it register its mappings, so whoever
   * serves its faults is ready before the first one can happen (QEMU registers the client
   * bases with its postcopy code at the same point).
   */
  beforePostcopyAck?(bases: readonly BackendRegionBase[]): void | Promise<void>;
}

function describe(r: GuestMemoryRegion, request: string, allowUnsealed: boolean): MemoryRegion {
  if (!r.backing.fd || r.backing.fd.closed)
    throw new FrontendError(
      "NO_FD",
      `region at 0x${r.guestBase.toString(16)} (${r.backing.kind}) has no fd to share`,
      request,
    );
  if (!allowUnsealed && !isSizeSealed(r.backing.fd))
    throw new FrontendError(
      "UNSEALED",
      `region at 0x${r.guestBase.toString(16)} (${r.backing.kind}) is not size-sealed: the back-end could truncate it under us (allowUnsealedMemory to share it anyway)`,
      request,
    );
  return {
    guestAddress: BigInt(r.guestBase),
    size: BigInt(r.size),
    userAddress: r.hostAddress,
    mmapOffset: BigInt(r.backing.offset),
  };
}

/** The back-end's reply for one region must describe that region; its address is kept. */
function checkBase(sent: SentRegion, reply: MemoryRegion, request: string): bigint {
  if (reply.guestAddress !== sent.desc.guestAddress || reply.size !== sent.desc.size)
    throw new VhostUserError("BAD_VALUE", "postcopy: the reply describes another region", {
      request,
      value: `[0x${reply.guestAddress.toString(16)}, +0x${reply.size.toString(16)})`,
      expected: `[0x${sent.desc.guestAddress.toString(16)}, +0x${sent.desc.size.toString(16)})`,
    });
  if (reply.userAddress === 0n)
    throw new VhostUserError("BAD_VALUE", "postcopy: the back-end mapped the region at address 0", { request });
  return reply.userAddress;
}

const same = (a: MemoryRegion, b: MemoryRegion) =>
  a.guestAddress === b.guestAddress &&
  a.size === b.size &&
  a.userAddress === b.userAddress &&
  a.mmapOffset === b.mmapOffset;

export class MemoryTableSync {
  readonly #conn: Connection<FrontendRequests>;
  #table: SentRegion[] = [];
  #memory: GuestMemory | null = null;
  readonly #allowUnsealed: boolean;

  /** `allowUnsealed`: share regions whose fd is not size-sealed (FrontendOptions.allowUnsealedMemory). */
  constructor(conn: Connection<FrontendRequests>, allowUnsealed = false) {
    this.#conn = conn;
    this.#allowUnsealed = allowUnsealed;
  }

  get memory(): GuestMemory | null {
    return this.#memory;
  }

  get empty(): boolean {
    return this.#table.length === 0;
  }

  /** Brings the back-end's table to `memory` (see the module comment). */
  async sync(
    memory: GuestMemory,
    o: { slots: boolean; maxSlots: () => Promise<number>; postcopy: boolean },
    options: MemTableOptions = {},
  ): Promise<void> {
    const request = o.slots ? "ADD_MEM_REG" : "SET_MEM_TABLE";
    const next: SentRegion[] = memory.regions.map((region) => ({
      region,
      desc: describe(region, request, this.#allowUnsealed),
    }));
    if (!o.slots) return this.#setMemTable(memory, next, o.postcopy, options);
    const max = await o.maxSlots();
    if (next.length > max)
      throw new FrontendError("TOO_MANY_REGIONS", `${next.length} regions, the backend has ${max} slots`, request);
    const conn = this.#conn;
    const postcopy = o.postcopy;
    // In postcopy a region sent before LISTEN has no known back-end address: send it again.
    const keep = this.#table.filter(
      (old) =>
        next.some((n) => same(n.desc, old.desc) && n.region === old.region) &&
        (!postcopy || old.backendAddress !== undefined),
    );
    for (const old of this.#table) {
      if (keep.includes(old)) continue;
      await conn.request("REM_MEM_REG", old.desc);
      this.#table = this.#table.filter((x) => x !== old);
    }
    let added = 0;
    for (const n of next) {
      const kept = keep.find((k) => k.region === n.region);
      if (kept) {
        if (kept.backendAddress !== undefined) n.backendAddress = kept.backendAddress;
        continue;
      }
      const fds = [n.region.backing.fd as Fd];
      if (!postcopy) {
        await conn.request("ADD_MEM_REG", { kind: "region", region: n.desc }, { fds });
      } else {
        const r = await conn.request(
          "ADD_MEM_REG",
          { kind: "region", region: n.desc },
          { fds, needReply: false, expectReply: true },
        );
        const reply = r?.payload;
        if (reply?.kind !== "region")
          throw new VhostUserError("BAD_VALUE", "postcopy: the back-end answered without its mapping address", {
            request,
            value: reply?.kind === "ack" ? reply.value : "nothing",
          });
        n.backendAddress = checkBase(n, reply.region, request);
        added++;
      }
      this.#table.push(n);
    }
    this.#table = next.filter((n) => this.#table.some((t) => t.region === n.region));
    this.#memory = memory;
    if (!postcopy) return;
    await options.beforePostcopyAck?.(this.backendRegionBases);
    // QEMU acks even when nothing was added; a back-end with nothing to acknowledge may take
    // that as a protocol error (ours hangs up), so the ack goes only after new regions.
    if (added > 0) await conn.request("ADD_MEM_REG", { kind: "ack", value: 0n }, { needReply: false });
  }

  async #setMemTable(
    memory: GuestMemory,
    next: SentRegion[],
    postcopy: boolean,
    options: MemTableOptions,
  ): Promise<void> {
    const request = "SET_MEM_TABLE";
    if (next.length > VHOST_MEMORY_BASELINE_NREGIONS)
      throw new FrontendError(
        "TOO_MANY_REGIONS",
        `${next.length} regions, SET_MEM_TABLE carries at most ${VHOST_MEMORY_BASELINE_NREGIONS} (CONFIGURE_MEM_SLOTS not negotiated)`,
        request,
      );
    const fds = next.map((s) => s.region.backing.fd as Fd);
    if (!postcopy) {
      await this.#conn.request(request, { regions: next.map((s) => s.desc) }, { fds });
      this.#table = next;
      this.#memory = memory;
      return;
    }
    const r = await this.#conn.request(
      request,
      { regions: next.map((s) => s.desc) },
      { fds, needReply: false, expectReply: true },
    );
    const reply = r?.payload;
    if (reply?.kind !== "table")
      throw new VhostUserError("BAD_VALUE", "postcopy: the back-end answered without its memory table", {
        request,
        value: reply?.kind === "ack" ? reply.value : "nothing",
      });
    if (reply.table.regions.length !== next.length)
      throw new VhostUserError("BAD_VALUE", "postcopy: the reply's table has another region count", {
        request,
        value: reply.table.regions.length,
        expected: next.length,
      });
    for (const [i, s] of next.entries())
      s.backendAddress = checkBase(s, reply.table.regions[i] as MemoryRegion, request);
    this.#table = next;
    this.#memory = memory;
    await options.beforePostcopyAck?.(this.backendRegionBases);
    // The acknowledgement: a table of 0 regions (byte-identical to a u64 0), no reply.
    await this.#conn.request(request, { regions: [] }, { needReply: false });
  }

  /** Postcopy is over: the back-end's addresses no longer matter. */
  forgetBackendAddresses(): void {
    for (const s of this.#table) delete s.backendAddress;
  }

  /** Postcopy: the back-end's address for each region of the table, as its replies gave them. */
  get backendRegionBases(): BackendRegionBase[] {
    const out: BackendRegionBase[] = [];
    for (const s of this.#table)
      if (s.backendAddress !== undefined)
        out.push({
          guestAddress: s.region.guestBase,
          size: s.region.size,
          backendAddress: s.backendAddress,
          frontendAddress: s.region.hostAddress,
        });
    return out;
  }

  /** The host (user) address of `[gpa, gpa+len)`, which must lie in one region of the table. */
  userAddress(gpa: number, len: number, request = "SET_VRING_ADDR"): bigint {
    for (const { region } of this.#table) {
      if (gpa >= region.guestBase && gpa + len <= region.end)
        return region.hostAddress + BigInt(gpa - region.guestBase);
    }
    throw new FrontendError(
      this.#table.length === 0 ? "BAD_STATE" : "BAD_ADDRESS",
      this.#table.length === 0
        ? "no memory table was sent"
        : `[0x${gpa.toString(16)}, +${len}) is not inside one region of the memory table`,
      request,
    );
  }

  /** The end of guest memory as the table covers it (the default size of a dirty log). */
  end(request: string): number {
    if (this.#table.length === 0) throw new FrontendError("BAD_STATE", "no memory table was sent", request);
    let end = 0;
    for (const { region } of this.#table) end = Math.max(end, region.end);
    return end;
  }

  clear(): void {
    this.#table = [];
    this.#memory = null;
  }
}
