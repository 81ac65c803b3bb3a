import { AtomicBitmap } from "./atomic-bitmap.js";
import type { DirtySink, DirtySource, DirtySyncOptions } from "./dirty-source.js";
import type { DiscardMap } from "./discard-map.js";
import type { GuestMemory } from "./guest-memory.js";
import type { GuestMemoryRegion } from "./region.js";

/**
 * One dirty bitmap per region of a GuestMemory, as a DirtySink: every source syncs into it,
 * whatever its own page size or addressing. Marks outside guest memory are counted (a peer's
 * log may cover holes), never fatal.
 */
export class DirtyBitmap implements DirtySink {
  readonly memory: GuestMemory;
  readonly bitmaps: readonly AtomicBitmap[];
  readonly pageSize: number;
  /** Pages marked that no region holds. */
  outside = 0;

  constructor(memory: GuestMemory, pageSize = 4096) {
    this.memory = memory;
    this.pageSize = pageSize;
    this.bitmaps = memory.regions.map((r) => new AtomicBitmap(r.size, pageSize));
  }

  #index(r: GuestMemoryRegion): number {
    return this.memory.regions.indexOf(r);
  }

  markRange(gpa: number, len: number): void {
    let pos = gpa;
    const end = gpa + len;
    while (pos < end) {
      const r = this.memory.findRegion(pos);
      if (!r) {
        // Skip to the next region start (or the end).
        const next = this.memory.regions.find((x) => x.guestBase > pos);
        const stop = next ? Math.min(next.guestBase, end) : end;
        this.outside += Math.ceil((stop - pos) / this.pageSize);
        pos = stop;
        continue;
      }
      const n = Math.min(end, r.end) - pos;
      (this.bitmaps[this.#index(r)] as AtomicBitmap).markRange(pos - r.guestBase, n);
      pos += n;
    }
  }

  markFrames(frames: ArrayLike<number>, pageSize: number, base: number): void {
    let last: GuestMemoryRegion | undefined;
    let bm: AtomicBitmap | undefined;
    for (let i = 0; i < frames.length; i++) {
      const gpa = base + (frames[i] as number) * pageSize;
      if (!last || gpa < last.guestBase || gpa >= last.end) {
        last = this.memory.findRegion(gpa);
        if (!last) {
          this.outside++;
          continue;
        }
        bm = this.bitmaps[this.#index(last)];
      }
      (bm as AtomicBitmap).markRange(gpa - last.guestBase, pageSize);
    }
  }

  markAll(): void {
    for (const b of this.bitmaps) b.setAll();
  }

  /** Dirty pages of all regions right now. */
  count(): number {
    let n = 0;
    for (const b of this.bitmaps) n += b.count();
    return n;
  }

  /** Takes and clears the dirty pages of region `i` (page numbers from the region start). */
  take(i: number): Uint32Array {
    return (this.bitmaps[i] as AtomicBitmap).snapshotAndClear();
  }
}

/**
 * The in-process writes: GuestMemory marks each region's own bitmap (region.dirty) on every
 * write it makes, in any thread; this source snapshots them.
 */
export class RegionBitmapSource implements DirtySource {
  readonly name = "in-process bitmap";
  readonly #memory: GuestMemory;

  constructor(memory: GuestMemory) {
    this.#memory = memory;
  }

  start(): void {
    for (const r of this.#memory.regions) r.enableDirtyTracking().clear();
  }

  sync(sink: DirtySink): void {
    for (const r of this.#memory.regions) {
      if (!r.dirty) continue;
      sink.markFrames(r.dirty.snapshotAndClear(), r.dirty.pageSize, r.guestBase);
    }
  }

  stop(): void {}
}

export interface SyncReport {
  /** Pages dirty in the bitmap after this sync (including earlier, not yet taken ones). */
  dirtyPages: number;
  /** Wall time of the sync of each source, ms. */
  perSource: Record<string, number>;
  totalMs: number;
}

/**
 * Syncs any mix of DirtySources into one DirtyBitmap per round, then removes pages inside
 * discarded blocks (a discarded block is never reported dirty, whoever marked it).
 */
export class DirtyTracker {
  readonly bitmap: DirtyBitmap;
  readonly sources: DirtySource[];
  readonly #discard: Map<number, DiscardMap>;

  constructor(
    memory: GuestMemory,
    sources: DirtySource[],
    discard: ReadonlyMap<GuestMemoryRegion, DiscardMap> = new Map(),
  ) {
    this.bitmap = new DirtyBitmap(memory);
    this.sources = sources;
    this.#discard = new Map();
    for (const [r, m] of discard) {
      const i = memory.regions.indexOf(r);
      if (i < 0) throw new Error("discard map for a region that is not in this memory");
      if (m.size !== r.size) throw new RangeError(`discard map covers ${m.size} bytes, region has ${r.size}`);
      this.#discard.set(i, m);
    }
  }

  discardMap(regionIndex: number): DiscardMap | undefined {
    return this.#discard.get(regionIndex);
  }

  /** Starts every source and marks all plugged memory dirty (the first pass sends it all). */
  async start(): Promise<void> {
    for (const s of this.sources) await s.start();
    this.bitmap.markAll();
    this.#clearDiscarded();
  }

  async sync(options: DirtySyncOptions = {}): Promise<SyncReport> {
    const t0 = performance.now();
    const perSource: Record<string, number> = {};
    for (const s of this.sources) {
      const t = performance.now();
      await s.sync(this.bitmap, options);
      perSource[s.name] = (perSource[s.name] ?? 0) + performance.now() - t;
    }
    this.#clearDiscarded();
    return { dirtyPages: this.bitmap.count(), perSource, totalMs: performance.now() - t0 };
  }

  async stop(): Promise<void> {
    for (const s of this.sources) await s.stop();
  }

  #clearDiscarded(): void {
    for (const [i, m] of this.#discard) m.clearDiscarded(this.bitmap.bitmaps[i] as AtomicBitmap);
  }
}
