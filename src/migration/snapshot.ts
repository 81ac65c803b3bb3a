/**
 * Background snapshot and restore.
 *
 * saveSnapshot(): a consistent point-in-time image of running guest memory. At the snapshot
 * point (writers stopped for a moment) every region is write-protected through userfaultfd;
 * then the writers run on. A write to a page not yet saved faults: the main thread copies the
 * page to the file first and then lets the write through. A background pass saves the rest.
 * Each page is therefore saved exactly once, with its content at the snapshot point.
 * Discarded blocks are never read and never stored.
 *
 * The file (docs/migration-stream.md, "Snapshot files") is the migration stream's header and
 * records, with page data at fixed offsets so that a lazy restore can fetch any page:
 *   header | CAPABILITIES(SNAPSHOT) | REGION* | DISCARD* | LAYOUT
 *   | page data of region i at LAYOUT.dataOffsets[i] (+ page * 4096; zero pages are holes)
 *   | at LAYOUT.trailerOffset: PAGE_CRCS* | DEVICE_STATE* | DIGEST* | END
 *
 * restoreSnapshot(): eager (pread every stored page into memory) or lazy (userfaultfd
 * MISSING: the guest runs at once, faults are served from the file, a background pass
 * places the rest; zero pages and discarded blocks get UFFDIO_ZEROPAGE on fault only).
 * Every page read is checked against its CRC.
 */
import { createHash } from "node:crypto";
import { DiscardMap } from "../memory/discard-map.js";
import type { GuestMemory } from "../memory/guest-memory.js";
import type { GuestMemoryRegion } from "../memory/region.js";
import { isZero } from "../sys/bulk.js";
import { type Fd, pread, pwrite } from "../sys/fd.js";
import { fdatasync } from "../sys/io.js";
import { createPrivateFile, fileSize, O_RDONLY, openFile, truncate } from "../sys/memfd.js";
import type { Watch } from "../sys/poller.js";
import {
  UFFD_EVENT_PAGEFAULT,
  UFFDIO_REGISTER_MODE_MISSING,
  UFFDIO_REGISTER_MODE_WP,
  UffdFeature,
  Userfaultfd,
} from "../sys/userfaultfd.js";
import { hex } from "./digest.js";
import { MigrationError } from "./errors.js";
import { MigrationEvents, percentile } from "./events.js";
import {
  Capability,
  checkRecordCrc,
  checkStreamHeader,
  decodeCapabilities,
  decodeDeviceState,
  decodeDigest,
  decodeDiscard,
  decodeLayout,
  decodePageCrcs,
  decodeRecordHead,
  decodeRegion,
  encodeCapabilities,
  encodeDeviceState,
  encodeDigest,
  encodeDiscard,
  encodeLayout,
  encodePageCrcs,
  encodeRecord,
  encodeRegion,
  encodeStreamHeader,
  PayloadReader,
  pageCrc,
  RECORD_HEADER_SIZE,
  RECORD_OVERHEAD,
  RecordType,
  recordName,
  STREAM_HEADER_SIZE,
} from "./format.js";
import { PAGE, PageSet } from "./page-set.js";
import type { DeviceState } from "./source.js";

export interface SnapshotHooks {
  /** Around the snapshot point: writers stop, protection is armed, writers resume. */
  stopWriters?(): void | Promise<void>;
  resumeWriters?(): void | Promise<void>;
  saveDeviceState?(): DeviceState[] | Promise<DeviceState[]>;
  /** Called at the snapshot point, writers stopped (tests take a reference copy here). */
  atSnapshotPoint?(): void | Promise<void>;
}

export interface SnapshotOptions {
  memory: GuestMemory;
  discard?: ReadonlyMap<GuestMemoryRegion, DiscardMap>;
  path: string;
  /** Replace an existing snapshot file (default: refuse with EEXIST). Symlinks are never followed. */
  overwrite?: boolean;
  hooks?: SnapshotHooks;
}

export interface SnapshotResult {
  path: string;
  totalMs: number;
  /** Writers stopped to arm write protection. */
  pauseMs: number;
  pagesSaved: number;
  zeroPages: number;
  /** Pages saved because a writer hit them first. */
  writeFaults: number;
  writeFaultMedianUs: number;
  writeFaultP99Us: number;
  fileBytes: number;
  digests: string[];
}

function align(n: number, a: number): number {
  return Math.ceil(n / a) * a;
}

interface SaveRegion {
  region: GuestMemoryRegion;
  pages: number;
  discard: DiscardMap | undefined;
  dataOffset: number;
  saved: PageSet;
  zero: PageSet;
  crcs: Uint32Array;
}

export function writeProtectSnapshotUnavailable(): string | null {
  try {
    const f = Userfaultfd.supportedFeatures();
    if ((f & UffdFeature.WP_HUGETLBFS_SHMEM) === 0n) return "userfaultfd lacks WP_HUGETLBFS_SHMEM";
    return null;
  } catch (e) {
    return `userfaultfd unavailable: ${(e as Error).message}`;
  }
}

export async function saveSnapshot(o: SnapshotOptions, events = new MigrationEvents()): Promise<SnapshotResult> {
  const t0 = performance.now();
  events.emit("phase", { phase: "snapshot", atMs: 0 });
  const regions: SaveRegion[] = [];
  const meta: Buffer[] = [encodeStreamHeader()];
  const hasDiscard = o.memory.regions.some((r) => o.discard?.has(r));
  meta.push(
    encodeCapabilities({
      capabilities:
        Capability.SNAPSHOT | Capability.ZERO_PAGES | Capability.DIGEST | (hasDiscard ? Capability.DISCARD : 0),
      pageSize: PAGE,
      regionCount: o.memory.regions.length,
      totalBytes: o.memory.size,
    }),
  );
  o.memory.regions.forEach((r, index) => {
    meta.push(encodeRegion({ index, guestBase: r.guestBase, size: r.size, pageSize: r.pageSize }));
  });
  o.memory.regions.forEach((r, index) => {
    const d = o.discard?.get(r);
    if (d) meta.push(encodeDiscard({ region: index, blockSize: d.blockSize, states: d.toBytes() }));
  });
  const layoutSize = RECORD_OVERHEAD + 12 + 8 * o.memory.regions.length;
  let pos = align(meta.reduce((n, b) => n + b.length, 0) + layoutSize, PAGE);
  for (const region of o.memory.regions) {
    const pages = region.size / PAGE;
    regions.push({
      region,
      pages,
      discard: o.discard?.get(region),
      dataOffset: pos,
      saved: new PageSet(pages),
      zero: new PageSet(pages),
      crcs: new Uint32Array(pages),
    });
    pos += region.size;
  }
  const trailerOffset = pos;
  meta.push(
    encodeLayout(
      trailerOffset,
      regions.map((r) => r.dataOffset),
    ),
  );

  // Owner-only, not through a symlink, not over an existing file unless asked (createPrivateFile).
  const fd = createPrivateFile(o.path, { overwrite: o.overwrite ?? false });
  let uffd: Userfaultfd | null = null;
  let watch: Watch | null = null;
  let writersStopped = false;
  let pagesSaved = 0;
  let zeroPages = 0;
  let writeFaults = 0;
  const faultUs: number[] = [];
  let faultError: Error | null = null;
  try {
    // Sized up front: zero pages and discarded blocks stay holes, and read back as zeros.
    truncate(fd, trailerOffset);
    let off = 0;
    for (const b of meta) {
      writeAll(fd, b, off);
      off += b.length;
    }
    const save = (sr: SaveRegion, p: number): void => {
      const view = sr.region.bytes(p * PAGE, PAGE) as Uint8Array;
      if (isZero(view)) {
        sr.zero.set(p);
        zeroPages++;
      } else {
        writeAll(fd, view, sr.dataOffset + p * PAGE);
        sr.crcs[p] = pageCrc(view);
      }
      sr.saved.set(p);
      pagesSaved++;
    };

    // The snapshot point.
    writersStopped = true;
    const tp = performance.now();
    await o.hooks?.stopWriters?.();
    const devices = (await o.hooks?.saveDeviceState?.()) ?? [];
    await o.hooks?.atSnapshotPoint?.();
    const shmem = o.memory.regions.some((r) => r.backing.kind !== "anonymous");
    uffd = Userfaultfd.create({
      features: (shmem ? UffdFeature.WP_HUGETLBFS_SHMEM : 0n) | UffdFeature.WP_UNPOPULATED,
    });
    for (const sr of regions) {
      uffd.register(sr.region.hostAddress, sr.region.size, UFFDIO_REGISTER_MODE_WP);
      uffd.writeProtect(sr.region.hostAddress, sr.region.size, true);
    }
    const u = uffd;
    watch = u.onMessages((msgs) => {
      for (const m of msgs) {
        if (m.event !== UFFD_EVENT_PAGEFAULT) continue;
        const t = performance.now();
        try {
          const addr = m.address & ~4095n;
          const sr = regions.find(
            (r) => addr >= r.region.hostAddress && addr < r.region.hostAddress + BigInt(r.region.size),
          );
          if (!sr) continue;
          const p = Number(addr - sr.region.hostAddress) / PAGE;
          if (!sr.saved.has(p) && !sr.discard?.isDiscarded(p * PAGE)) {
            save(sr, p);
            writeFaults++;
          }
          u.writeProtect(addr, PAGE, false);
          faultUs.push((performance.now() - t) * 1000);
        } catch (e) {
          faultError ??= e as Error;
        }
      }
    });
    await o.hooks?.resumeWriters?.();
    writersStopped = false;
    const pauseMs = performance.now() - tp;

    // Background pass: runs of up to 64 pages, saved then unprotected in one ioctl.
    for (const sr of regions) {
      const base = sr.region.hostAddress;
      let k = 0;
      for (let p = 0; p < sr.pages; p += 64) {
        if (faultError) throw faultError;
        const n = Math.min(64, sr.pages - p);
        if (sr.discard?.isDiscarded(p * PAGE) && sr.discard.isDiscarded((p + n - 1) * PAGE)) continue;
        for (let q = p; q < p + n; q++) if (!sr.saved.has(q) && !sr.discard?.isDiscarded(q * PAGE)) save(sr, q);
        u.writeProtect(base + BigInt(p * PAGE), n * PAGE, false);
        // Let write faults in between (they are served from this thread's event loop).
        if (++k % 16 === 0) await new Promise((r) => setImmediate(r));
      }
    }
    watch.close();
    watch = null;
    for (const sr of regions) u.unregister(sr.region.hostAddress, sr.region.size);
    u.close();
    uffd = null;
    if (faultError) throw faultError;

    // Trailer: per-page checksums, device state, digests of the stored image.
    const trailer: Buffer[] = regions.map((sr, i) => encodePageCrcs(i, sr.crcs, sr.zero.bytes));
    for (const d of devices) trailer.push(encodeDeviceState(d.name, d.blob));
    const digests = regions.map((sr) => imageDigest(fd, sr));
    digests.forEach((d, i) => {
      trailer.push(encodeDigest(i, d));
    });
    trailer.push(encodeRecord(RecordType.End));
    off = trailerOffset;
    for (const b of trailer) {
      writeAll(fd, b, off);
      off += b.length;
    }
    fdatasync(fd, o.path);
    const sorted = faultUs.sort((a, b) => a - b);
    const result: SnapshotResult = {
      path: o.path,
      totalMs: performance.now() - t0,
      pauseMs,
      pagesSaved,
      zeroPages,
      writeFaults,
      writeFaultMedianUs: percentile(sorted, 50),
      writeFaultP99Us: percentile(sorted, 99),
      fileBytes: off,
      digests: digests.map(hex),
    };
    events.emit("phase", { phase: "complete", atMs: performance.now() - t0 });
    return result;
  } catch (e) {
    watch?.close();
    // Closing the uffd drops write protection and wakes any blocked writer.
    uffd?.close();
    if (writersStopped) await o.hooks?.resumeWriters?.();
    throw e;
  } finally {
    fd.close();
  }
}

function writeAll(fd: Fd, b: Uint8Array, off: number): void {
  let done = 0;
  while (done < b.length) done += pwrite(fd, b.subarray(done), off + done);
}

function readAll(fd: Fd, b: Uint8Array, off: number): void {
  let done = 0;
  while (done < b.length) {
    const n = pread(fd, b.subarray(done), off + done);
    if (n === 0) throw new MigrationError("TRUNCATED", "snapshot file ends early", off + done);
    done += n;
  }
}

/** sha256 of the region as stored (plugged blocks, in order), read back from the file. */
function imageDigest(
  fd: Fd,
  sr: { region: GuestMemoryRegion; dataOffset: number; discard: DiscardMap | undefined },
): Uint8Array {
  const h = createHash("sha256");
  const buf = new Uint8Array(1024 * 1024);
  const ranges: Iterable<[number, number]> = sr.discard ? sr.discard.ranges(true) : [[0, sr.region.size]];
  for (const [off, len] of ranges) {
    for (let p = off; p < off + len; p += buf.length) {
      const n = Math.min(buf.length, off + len - p);
      readAll(fd, buf.subarray(0, n), sr.dataOffset + p);
      h.update(buf.subarray(0, n));
    }
  }
  return new Uint8Array(h.digest());
}

// ---------------------------------------------------------------------------------------------
// Restore

interface FileRecord {
  type: number;
  offset: number;
  next: number;
  payload: PayloadReader;
}

function readRecordAt(fd: Fd, offset: number, size: number): FileRecord {
  if (offset + RECORD_HEADER_SIZE > size)
    throw new MigrationError("TRUNCATED", "snapshot file ends inside a record header", size);
  const head = new Uint8Array(RECORD_HEADER_SIZE);
  readAll(fd, head, offset);
  const h = decodeRecordHead(head, offset);
  const total = RECORD_OVERHEAD + h.length;
  if (offset + total > size)
    throw new MigrationError("TRUNCATED", `snapshot file ends inside ${recordName(h.type)}`, size);
  const whole = Buffer.allocUnsafe(total);
  readAll(fd, whole, offset);
  checkRecordCrc(whole, offset);
  const payload = whole.subarray(RECORD_HEADER_SIZE, RECORD_HEADER_SIZE + h.length);
  return { type: h.type, offset, next: offset + total, payload: new PayloadReader(payload, h.type, offset) };
}

export interface RestoreOptions {
  /** Fresh memory with the snapshot's layout. */
  memory: GuestMemory;
  discard?: ReadonlyMap<GuestMemoryRegion, DiscardMap>;
  path: string;
  /** Serve pages through userfaultfd as the guest touches them (default: eager). */
  lazy?: boolean;
  /** Lazy: hold the background pass until startBackground() (only faults are served until then). */
  deferBackground?: boolean;
  loadDeviceState?(state: DeviceState): void | Promise<void>;
}

export interface RestoreResult {
  totalMs: number;
  pagesRestored: number;
  /** Lazy: faults served from the file (and their latency). */
  faults: number;
  faultMedianUs: number;
  faultP99Us: number;
  digests: { region: number; file: string; memory: string; match: boolean }[];
}

interface RestoreRegion {
  region: GuestMemoryRegion;
  pages: number;
  discard: DiscardMap;
  dataOffset: number;
  crcs: Uint32Array;
  zero: PageSet;
  placed: PageSet;
}

/** A restore in progress: for a lazy one the guest may run as soon as this exists. */
export interface Restore {
  /** Resolves when every page is in memory and verified (lazy: after the background pass). */
  readonly done: Promise<RestoreResult>;
  /** Starts a deferred background pass (no-op otherwise). */
  startBackground(): void;
}

export async function restoreSnapshot(o: RestoreOptions): Promise<Restore> {
  const t0 = performance.now();
  const fd = openFile(o.path, O_RDONLY);
  try {
    const size = fileSize(fd);
    const head = new Uint8Array(STREAM_HEADER_SIZE);
    if (size < STREAM_HEADER_SIZE) throw new MigrationError("TRUNCATED", "snapshot file shorter than its header", size);
    readAll(fd, head, 0);
    checkStreamHeader(head);
    let r = readRecordAt(fd, STREAM_HEADER_SIZE, size);
    if (r.type !== RecordType.Capabilities) throw r.payload.error("expected CAPABILITIES");
    const caps = decodeCapabilities(r.payload);
    if (!(caps.capabilities & Capability.SNAPSHOT))
      throw new MigrationError("BAD_HEADER", "a migration stream, not a snapshot file", r.offset);
    if (caps.regionCount !== o.memory.regions.length)
      throw new MigrationError("REGION_MISMATCH", `snapshot has ${caps.regionCount} regions`, r.offset);
    const regions: RestoreRegion[] = [];
    for (let i = 0; i < caps.regionCount; i++) {
      r = readRecordAt(fd, r.next, size);
      if (r.type !== RecordType.Region) throw r.payload.error(`expected REGION ${i}`);
      const d = decodeRegion(r.payload);
      const mine = o.memory.regions[i] as GuestMemoryRegion;
      if (d.index !== i || d.guestBase !== mine.guestBase || d.size !== mine.size || d.pageSize !== mine.pageSize)
        throw new MigrationError("REGION_MISMATCH", `region ${i} differs from the snapshot's`, r.offset, {
          region: i,
          file: d,
        });
      const pages = mine.size / PAGE;
      regions.push({
        region: mine,
        pages,
        discard: o.discard?.get(mine) ?? new DiscardMap(mine.size, 2 * 1024 * 1024, true),
        dataOffset: 0,
        crcs: new Uint32Array(0),
        zero: new PageSet(pages),
        placed: new PageSet(pages),
      });
    }
    r = readRecordAt(fd, r.next, size);
    while (r.type === RecordType.Discard) {
      const d = decodeDiscard(r.payload);
      const rr = regions[d.region];
      if (!rr || d.states.length * d.blockSize !== rr.region.size) throw r.payload.error("bad discard map");
      if (rr.discard.blockSize !== d.blockSize && !o.discard?.get(rr.region))
        rr.discard = new DiscardMap(rr.region.size, d.blockSize, true);
      rr.discard.applyBytes(d.states);
      r = readRecordAt(fd, r.next, size);
    }
    if (r.type !== RecordType.Layout) throw r.payload.error(`expected LAYOUT, got ${recordName(r.type)}`);
    const layout = decodeLayout(r.payload);
    if (layout.dataOffsets.length !== regions.length) throw r.payload.error("layout region count");
    regions.forEach((rr, i) => {
      rr.dataOffset = layout.dataOffsets[i] as number;
    });
    const digests = new Map<number, Uint8Array>();
    const devices: DeviceState[] = [];
    let off = layout.trailerOffset;
    for (;;) {
      r = readRecordAt(fd, off, size);
      off = r.next;
      if (r.type === RecordType.End) break;
      if (r.type === RecordType.PageCrcs) {
        const c = decodePageCrcs(r.payload);
        const rr = regions[c.region];
        if (!rr || c.crcs.length !== rr.pages) throw r.payload.error("page checksums for a bad region");
        rr.crcs = c.crcs;
        rr.zero = PageSet.wrap(c.zero, rr.pages);
      } else if (r.type === RecordType.DeviceState) devices.push(decodeDeviceState(r.payload));
      else if (r.type === RecordType.Digest) {
        const d = decodeDigest(r.payload);
        digests.set(d.region, d.sha256);
      } else throw r.payload.error(`unexpected ${recordName(r.type)} in the trailer`);
    }
    for (const d of devices) await o.loadDeviceState?.(d);
    const lazy = o.lazy ?? false;
    const restore = lazy ? new LazyRestore(fd, regions) : null;
    let start: () => void = () => undefined;
    const started = new Promise<void>((r) => {
      start = r;
    });
    if (!(lazy && o.deferBackground)) start();
    const done = (async (): Promise<RestoreResult> => {
      try {
        await started;
        let pagesRestored = 0;
        if (restore) pagesRestored = await restore.fill();
        else pagesRestored = eagerRestore(fd, regions);
        const cmp = regions.map((rr, i) => {
          const mine = hex(regionDigestOf(rr));
          const file = hex(digests.get(i) ?? new Uint8Array(0));
          return { region: i, file, memory: mine, match: mine === file };
        });
        if (cmp.some((c) => !c.match))
          throw new MigrationError("DIGEST_MISMATCH", "restored memory differs from the snapshot", undefined, {
            digests: cmp,
          });
        const lat = restore ? restore.latencies.sort((a, b) => a - b) : [];
        return {
          totalMs: performance.now() - t0,
          pagesRestored,
          faults: lat.length,
          faultMedianUs: percentile(lat, 50),
          faultP99Us: percentile(lat, 99),
          digests: cmp,
        };
      } finally {
        restore?.close();
        fd.close();
      }
    })();
    done.catch(() => undefined);
    return { done, startBackground: start };
  } catch (e) {
    fd.close();
    throw e;
  }
}

function regionDigestOf(rr: RestoreRegion): Uint8Array {
  const h = createHash("sha256");
  for (const [off, len] of rr.discard.ranges(true)) h.update(rr.region.bytes(off, len) as Uint8Array);
  return new Uint8Array(h.digest());
}

function readPage(fd: Fd, rr: RestoreRegion, p: number, into: Uint8Array): void {
  const at = rr.dataOffset + p * PAGE;
  readAll(fd, into, at);
  const crc = pageCrc(into);
  if (crc !== rr.crcs[p])
    throw new MigrationError("CORRUPT", `page ${p} checksum mismatch in the snapshot file`, at, {
      expected: rr.crcs[p],
      actual: crc,
    });
}

function eagerRestore(fd: Fd, regions: RestoreRegion[]): number {
  let n = 0;
  for (const rr of regions) {
    for (let p = 0; p < rr.pages; p++) {
      if (rr.zero.has(p) || rr.discard.isDiscarded(p * PAGE)) continue;
      readPage(fd, rr, p, rr.region.bytes(p * PAGE, PAGE) as Uint8Array);
      n++;
    }
  }
  return n;
}

class LazyRestore {
  readonly #uffd: Userfaultfd;
  readonly #watch: Watch;
  readonly #regions: RestoreRegion[];
  readonly #fd: Fd;
  readonly #buf = new Uint8Array(PAGE);
  readonly latencies: number[] = [];
  #error: Error | null = null;

  constructor(fd: Fd, regions: RestoreRegion[]) {
    this.#fd = fd;
    this.#regions = regions;
    const u = Userfaultfd.create();
    try {
      for (const rr of regions) u.register(rr.region.hostAddress, rr.region.size, UFFDIO_REGISTER_MODE_MISSING);
    } catch (e) {
      u.close();
      throw e;
    }
    this.#uffd = u;
    this.#watch = u.onMessages((msgs) => {
      for (const m of msgs) {
        if (m.event !== UFFD_EVENT_PAGEFAULT) continue;
        const t = performance.now();
        const addr = m.address & ~4095n;
        const rr = regions.find(
          (x) => addr >= x.region.hostAddress && addr < x.region.hostAddress + BigInt(x.region.size),
        );
        if (!rr) continue;
        try {
          this.#place(rr, Number(addr - rr.region.hostAddress) / PAGE, true);
          this.latencies.push((performance.now() - t) * 1000);
        } catch (e) {
          this.#error ??= e as Error;
        }
      }
    });
  }

  /** Places page p (from the file, or a zero page); a page already there is left alone. */
  #place(rr: RestoreRegion, p: number, faulted: boolean): boolean {
    const addr = rr.region.hostAddress + BigInt(p * PAGE);
    if (rr.placed.has(p)) {
      if (faulted) this.#uffd.wake(addr, PAGE);
      return false;
    }
    const discarded = rr.discard.isDiscarded(p * PAGE);
    // Background: discarded blocks and zero pages stay unpopulated (holes read as zero).
    if (!faulted && (discarded || rr.zero.has(p))) return false;
    let placed: boolean;
    if (discarded || rr.zero.has(p)) placed = this.#uffd.zeropage(addr, PAGE);
    else {
      readPage(this.#fd, rr, p, this.#buf);
      placed = this.#uffd.copy(addr, this.#buf);
    }
    if (!placed) this.#uffd.wake(addr, PAGE);
    rr.placed.set(p);
    return placed;
  }

  async fill(): Promise<number> {
    let n = 0;
    let k = 0;
    for (const rr of this.#regions) {
      for (let p = 0; p < rr.pages; p++) {
        if (this.#error) throw this.#error;
        if (this.#place(rr, p, false)) n++;
        if (++k % 256 === 0) await new Promise((r) => setImmediate(r));
      }
    }
    if (this.#error) throw this.#error;
    // Everything stored is in place; unregistering lets zero pages and holes fill normally.
    this.close();
    return n;
  }

  #closed = false;
  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    this.#watch.close();
    for (const rr of this.#regions) {
      try {
        this.#uffd.unregister(rr.region.hostAddress, rr.region.size);
      } catch {
        // closing drops the registration anyway
      }
    }
    this.#uffd.close();
  }
}
