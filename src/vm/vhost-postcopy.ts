/**
 * src/vm: glue between the migration engine and a VM's devices — the one place that imports
 * both src/migration and src/vhost-user (neither imports the other).
 *
 * VhostUserPostcopy: a vhost-user back-end at a postcopy destination. It reads and writes guest
 * memory through its own mapping of the same shared memory, so a page that has not arrived yet
 * must make its worker wait, and the page must be fetched and the worker woken — by the
 * destination, through the back-end's userfaultfd. The sequence is QEMU's:
 *
 *   advise():  POSTCOPY_ADVISE ; <- reply(userfaultfd)           (refused up front without PAGEFAULT)
 *   listen():  POSTCOPY_LISTEN NEED_REPLY ; <- ack
 *              memory table, postcopy form: per region ADD_MEM_REG(fd) ; <- reply(back-end address),
 *              or SET_MEM_TABLE ; <- reply(table); the back-end's address table becomes a fault
 *              domain of the MigrationDestination; then the ack (fd-less ADD_MEM_REG u64 0, or an
 *              empty SET_MEM_TABLE), after which the back-end registers its mappings
 *   end():     POSTCOPY_END ; <- u64 status, and our copy of the userfaultfd is closed
 */
import type { GuestMemory } from "../memory/guest-memory.js";
import type { FaultDomainStats, FaultRange, MigrationDestination } from "../migration/destination.js";
import type { BackendRegionBase, VhostUserFrontend } from "../vhost-user/frontend/frontend.js";

export class VhostUserPostcopy {
  readonly frontend: VhostUserFrontend;
  readonly #destination: MigrationDestination;
  readonly #guest: GuestMemory;
  #stats: FaultDomainStats | null = null;
  #ranges: FaultRange[] = [];
  #ended = false;

  private constructor(frontend: VhostUserFrontend, destination: MigrationDestination, guest: GuestMemory) {
    this.frontend = frontend;
    this.#destination = destination;
    this.#guest = guest;
  }

  /** Why `frontend`'s back-end cannot take part in postcopy (null: it can). Sends nothing. */
  static refusal(frontend: VhostUserFrontend): string | null {
    return frontend.postcopyRefusal();
  }

  /**
   * POSTCOPY_ADVISE, once features are negotiated and before the migration starts. A back-end
   * without PAGEFAULT is refused here with FrontendError NOT_NEGOTIATED and the reason, before
   * anything is sent: run that migration as precopy (with the back-end's dirty log) instead.
   * `guest` is the destination's migrated memory.
   */
  static async advise(
    frontend: VhostUserFrontend,
    destination: MigrationDestination,
    guest: GuestMemory,
  ): Promise<VhostUserPostcopy> {
    await frontend.postcopyAdvise();
    return new VhostUserPostcopy(frontend, destination, guest);
  }

  /**
   * POSTCOPY_LISTEN, then `memory` (the back-end's whole memory table) in its postcopy form.
   * Call it from the destination's `resume` hook (postcopy has started there, the guest has not
   * run yet), before the back-end's rings start. The parts of the table that are migrated
   * guest memory are served; a region outside it (not migrated) must be populated before the
   * back-end touches it, or its fault fails the migration.
   */
  async listen(memory: GuestMemory): Promise<FaultDomainStats> {
    const uffd = this.frontend.postcopyUserfaultfd;
    if (!uffd || this.#ended) throw new Error("VhostUserPostcopy.listen: postcopy is not advised");
    await this.frontend.postcopyListen();
    await this.frontend.setMemTable(memory, {
      beforePostcopyAck: (bases) => {
        this.#ranges = this.#rangesOf(bases);
        // Watched from now on; the back-end registers only after the ack that follows.
        this.#stats = this.#destination.addFaultDomain(uffd, this.#ranges);
      },
    });
    if (!this.#stats) throw new Error("VhostUserPostcopy.listen: the memory table produced no address table");
    return this.#stats;
  }

  /** The back-end's fault counters (null before listen()). */
  get stats(): FaultDomainStats | null {
    return this.#stats;
  }

  /** The back-end's addresses → guest-physical ranges given to the destination. */
  get ranges(): readonly FaultRange[] {
    return this.#ranges;
  }

  /**
   * POSTCOPY_END. Call it as soon as the destination's run() has resolved: from then on the
   * destination no longer watches the back-end's userfaultfd, and a fault the back-end takes
   * (a page never sent: zero on the source, never populated here) waits until this releases it.
   */
  async end(): Promise<void> {
    if (this.#ended) return;
    this.#ended = true;
    await this.frontend.postcopyEnd();
  }

  #rangesOf(bases: readonly BackendRegionBase[]): FaultRange[] {
    const out: FaultRange[] = [];
    for (const b of bases) {
      for (const g of this.#guest.regions) {
        const lo = Math.max(b.guestAddress, g.guestBase);
        const hi = Math.min(b.guestAddress + b.size, g.end);
        if (lo >= hi) continue;
        out.push({ guestBase: lo, size: hi - lo, hostStart: b.backendAddress + BigInt(lo - b.guestAddress) });
      }
    }
    return out;
  }
}
