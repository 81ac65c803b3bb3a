/**
 * A request's guest buffers as the addon's (window, offset, length) triples (src/sys/guest-io.ts)
 * over one GuestIoTable made of every window of every region of a memory table: the handler
 * hands a whole request to one native call instead of making a view per buffer.
 *
 * A buffer that is not inside one window of one region (it straddles a region or a 1 GiB
 * window boundary) cannot be one triple: add() says so and the caller takes the general path.
 * A buffer the device writes into (a read request) must not lie in a read-only region.
 */
import type { GuestMemory } from "../../memory/guest-memory.js";
import type { GuestMemoryRegion } from "../../memory/region.js";
import { GUEST_IO_MAX_SEGMENTS, GuestIoTable } from "../../sys/guest-io.js";
import { WINDOW_SHIFT, WINDOW_SIZE } from "../../sys/mapping.js";

export class GuestSegments {
  readonly table: GuestIoTable;
  readonly memory: GuestMemory;
  /** Triples of the request being built; count() of them are valid. */
  readonly segments = new Uint32Array(3 * GUEST_IO_MAX_SEGMENTS);
  #count = 0;
  /** Table index of each region's first window. */
  readonly #firstWindow = new Map<GuestMemoryRegion, number>();
  #lastRegion: GuestMemoryRegion | undefined;
  #lastFirst = 0;

  constructor(memory: GuestMemory) {
    this.memory = memory;
    const windows: SharedArrayBuffer[] = [];
    for (const r of memory.regions) {
      this.#firstWindow.set(r, windows.length);
      windows.push(...r.windows);
    }
    this.table = new GuestIoTable(windows);
  }

  get count(): number {
    return this.#count;
  }

  /** Starts a new request. */
  reset(): void {
    this.#count = 0;
  }

  /**
   * Appends [gpa, gpa+len); false (nothing appended) when it is not inside one window of one
   * region, or when `intoGuest` and the region is read-only, or when the list is full.
   */
  add(gpa: number, len: number, intoGuest: boolean): boolean {
    const r = this.memory.findRegion(gpa);
    if (!r || gpa + len > r.end || (intoGuest && r.readonly) || this.#count >= GUEST_IO_MAX_SEGMENTS) return false;
    let first: number;
    if (r === this.#lastRegion) first = this.#lastFirst;
    else {
      first = this.#firstWindow.get(r) as number;
      this.#lastRegion = r;
      this.#lastFirst = first;
    }
    const pos = gpa - r.guestBase + r.start;
    const w = pos >>> 0 === pos ? pos >>> WINDOW_SHIFT : Math.floor(pos / WINDOW_SIZE);
    const off = pos - w * WINDOW_SIZE;
    if (off + len > WINDOW_SIZE) return false;
    const s = this.segments;
    const k = 3 * this.#count++;
    s[k] = first + w;
    s[k + 1] = off;
    s[k + 2] = len;
    return true;
  }
}
