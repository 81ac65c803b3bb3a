/**
 * Postcopy (PAGEFAULT): POSTCOPY_ADVISE hands the front-end our userfaultfd, POSTCOPY_LISTEN
 * registers the regions with it, memory-table updates while listening are answered with where
 * we mapped each region and registered only after the front-end's ack, POSTCOPY_END ends it.
 */
import { UFFDIO_REGISTER_MODE_MISSING, Userfaultfd } from "../../../sys/userfaultfd.js";
import { hasFeature, ProtocolFeature } from "../../protocol/constants.js";
import { VhostUserError } from "../../protocol/errors.js";
import type { MemoryRegion } from "../../protocol/payloads.js";
import type { MappedRegion } from "../memory-table.js";
import type { HandlerTable, SessionState } from "../state.js";

let available: boolean | null = null;

/**
 * Whether this process can open a userfaultfd that also catches kernel-mode faults (a pread
 * into guest memory), which postcopy needs. Checked once; PAGEFAULT is offered only then.
 */
export function postcopyAvailable(): boolean {
  if (available === null) {
    try {
      Userfaultfd.create({ userModeOnly: false }).close();
      available = true;
    } catch {
      available = false;
    }
  }
  return available;
}

/** A region as described in our postcopy replies: its user address is where WE mapped it. */
export function ourMapping(r: MappedRegion): MemoryRegion {
  return {
    guestAddress: BigInt(r.guestAddress),
    size: BigInt(r.size),
    userAddress: r.region.hostAddress,
    mmapOffset: r.mmapOffset,
  };
}

/**
 * The page-aligned range userfaultfd registers for a region: its whole mapping, which starts a
 * page below the region when the front-end's mmap_offset was not page aligned.
 */
export function uffdRange(r: MappedRegion): [address: bigint, length: number] {
  const m = r.region.mapping;
  return m ? [m.address, m.length] : [r.region.hostAddress, r.size];
}

export function register(s: SessionState, r: MappedRegion): void {
  if (!s.uffd || r.registered || r.region.closed) return;
  s.uffd.register(...uffdRange(r), UFFDIO_REGISTER_MODE_MISSING);
  r.registered = true;
}

/** QEMU's acknowledgement of our postcopy mapping reply: a bare u64 0 on the same request. */
export function postcopyAck(s: SessionState, request: string, value: bigint): void {
  const pending = s.awaitingPostcopyAck;
  if (!pending) {
    // QEMU acknowledges its memory-table update in postcopy even when no region was added:
    // a harmless no-op, unless it reports a failure.
    if (value === 0n) return;
    throw new VhostUserError("NACK", "front-end reported a failed memory-table update", { request, value });
  }
  if (value !== 0n) throw new VhostUserError("NACK", "front-end refused our postcopy mappings", { request, value });
  s.awaitingPostcopyAck = null;
  // Only now may the guest fault on these mappings: register them.
  for (const r of pending) register(s, r);
}

export function closePostcopy(s: SessionState): void {
  s.uffd?.close();
  s.uffd = null;
}

export const postcopyHandlers: HandlerTable = {
  async POSTCOPY_ADVISE(s, m) {
    if (!hasFeature(s.protocolFeatures, ProtocolFeature.PAGEFAULT)) {
      // A reply without a userfaultfd is the spec's way to say no.
      s.events.log("warn", "POSTCOPY_ADVISE without VHOST_USER_PROTOCOL_F_PAGEFAULT negotiated: refused");
      await s.conn.reply(m, undefined, []);
      return;
    }
    // Kernel-mode faults must be delivered too (a pread into guest memory), so no
    // UFFD_USER_MODE_ONLY: this needs the privilege QEMU's own postcopy needs.
    let uffd: Userfaultfd;
    try {
      uffd = Userfaultfd.create({ userModeOnly: false });
    } catch (e) {
      // The same reply: the front-end refuses postcopy, the connection goes on.
      s.events.log("warn", `POSTCOPY_ADVISE: no userfaultfd (${(e as Error).message}): refused`);
      await s.conn.reply(m, undefined, []);
      return;
    }
    s.uffd?.close();
    s.uffd = uffd;
    await s.conn.reply(m, undefined, [uffd.fd]);
  },

  async POSTCOPY_LISTEN(s, m) {
    if (!s.uffd)
      throw new VhostUserError("UNEXPECTED_REQUEST", "POSTCOPY_LISTEN before POSTCOPY_ADVISE", { request: m.name });
    s.postcopyListening = true;
    for (const r of s.memory.regions) register(s, r);
    await s.conn.ack(m);
  },

  async POSTCOPY_END(s, m) {
    s.postcopyListening = false;
    for (const r of s.memory.regions) r.registered = false;
    closePostcopy(s);
    await s.conn.reply(m, 0n);
  },
};
