/**
 * Kernel write-protect dirty tracking of this process's own writes: userfaultfd in WP_ASYNC
 * mode (the kernel resolves write faults itself, no round trip) plus the PAGEMAP_SCAN ioctl
 * on /proc/self/pagemap, which returns the written ranges and re-protects them in one call.
 * Kernel 6.7 and later; Debian's headers predate both, so the layouts are written out here
 * (include/uapi/linux/fs.h, userfaultfd.h).
 *
 * It needs no cooperation from the writer (any JS or native code writing through this
 * process's mapping is seen), but tracking is per mapping: writes through another mapping of
 * the same memfd (another process, a second mmap) are not seen. Those writers keep their own
 * dirty logs.
 */
import { SysError } from "../sys/errors.js";
import type { Fd } from "../sys/fd.js";
import { IOWR, ioctl } from "../sys/ioctl.js";
import { addressOf } from "../sys/mapping.js";
import { O_RDONLY, openFile } from "../sys/memfd.js";
import { UFFDIO_REGISTER_MODE_WP, UffdFeature, Userfaultfd } from "../sys/userfaultfd.js";
import type { DirtySink, DirtySource } from "./dirty-source.js";
import type { GuestMemory } from "./guest-memory.js";

const PM_SCAN_ARG_SIZE = 96;
export const PAGEMAP_SCAN = IOWR("f", 16, PM_SCAN_ARG_SIZE);
export const PM_SCAN_WP_MATCHING = 1n << 0n;
export const PM_SCAN_CHECK_WPASYNC = 1n << 1n;
export const PAGE_IS_WPALLOWED = 1n << 0n;
export const PAGE_IS_WRITTEN = 1n << 1n;
export const PAGE_IS_FILE = 1n << 2n;
export const PAGE_IS_PRESENT = 1n << 3n;
const PAGE_REGION_WORDS = 3; // start, end, categories
const VEC_LEN = 4096;

/** Why write-protect tracking cannot run here, or null when it can. */
export function writeProtectTrackingUnavailable(): string | null {
  let features: bigint;
  try {
    features = Userfaultfd.supportedFeatures();
  } catch (e) {
    return `userfaultfd unavailable: ${(e as Error).message}`;
  }
  for (const [name, bit] of [
    ["WP_ASYNC", UffdFeature.WP_ASYNC],
    ["WP_UNPOPULATED", UffdFeature.WP_UNPOPULATED],
  ] as const) {
    if ((features & bit) === 0n) return `the kernel's userfaultfd lacks ${name} (needs Linux 6.7+)`;
  }
  return null;
}

interface Tracked {
  guestBase: number;
  start: bigint;
  size: number;
}

export class WriteProtectDirtySource implements DirtySource {
  readonly name = "uffd write-protect";
  readonly #memory: GuestMemory;
  #uffd: Userfaultfd | null = null;
  #pagemap: Fd | null = null;
  #tracked: Tracked[] = [];
  readonly #arg = new BigUint64Array(PM_SCAN_ARG_SIZE / 8);
  readonly #vec = new BigUint64Array(VEC_LEN * PAGE_REGION_WORDS);

  constructor(memory: GuestMemory) {
    this.#memory = memory;
  }

  start(): void {
    if (this.#uffd) return;
    const why = writeProtectTrackingUnavailable();
    if (why) throw new Error(`write-protect dirty tracking: ${why}`);
    const shmem = (Userfaultfd.supportedFeatures() & UffdFeature.WP_HUGETLBFS_SHMEM) !== 0n;
    const uffd = Userfaultfd.create({
      features: UffdFeature.WP_ASYNC | UffdFeature.WP_UNPOPULATED | (shmem ? UffdFeature.WP_HUGETLBFS_SHMEM : 0n),
    });
    try {
      this.#pagemap = openFile("/proc/self/pagemap", O_RDONLY);
      for (const r of this.#memory.regions) {
        const start = r.hostAddress;
        uffd.register(start, r.size, UFFDIO_REGISTER_MODE_WP);
        uffd.writeProtect(start, r.size, true);
        this.#tracked.push({ guestBase: r.guestBase, start, size: r.size });
      }
    } catch (e) {
      uffd.close();
      this.#pagemap?.close();
      this.#pagemap = null;
      this.#tracked = [];
      throw e;
    }
    this.#uffd = uffd;
  }

  /** Written pages since the last sync (re-protected by the same scan). */
  sync(sink: DirtySink): void {
    if (!this.#uffd || !this.#pagemap) throw new Error("write-protect tracking not started");
    const a = this.#arg;
    const vec = this.#vec;
    const vecAddr = addressOf(vec);
    for (const t of this.#tracked) {
      const end = t.start + BigInt(t.size);
      let pos = t.start;
      while (pos < end) {
        a.fill(0n);
        a[0] = BigInt(PM_SCAN_ARG_SIZE);
        a[1] = PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC;
        a[2] = pos;
        a[3] = end;
        a[5] = vecAddr;
        a[6] = BigInt(VEC_LEN);
        a[9] = PAGE_IS_WRITTEN; // category_mask
        a[11] = PAGE_IS_WRITTEN; // return_mask
        const n = ioctl(this.#pagemap, PAGEMAP_SCAN, a, "PAGEMAP_SCAN");
        for (let i = 0; i < n; i++) {
          const s = vec[i * PAGE_REGION_WORDS] as bigint;
          const e = vec[i * PAGE_REGION_WORDS + 1] as bigint;
          sink.markRange(t.guestBase + Number(s - t.start), Number(e - s));
        }
        const walkEnd = a[4] as bigint;
        if (walkEnd <= pos) throw new SysError("ioctl", 5, "PAGEMAP_SCAN made no progress");
        pos = walkEnd;
      }
    }
  }

  stop(): void {
    const u = this.#uffd;
    this.#uffd = null;
    if (u) {
      for (const t of this.#tracked) {
        try {
          u.unregister(t.start, t.size);
        } catch {
          // region already unmapped: closing the uffd drops it anyway
        }
      }
      u.close();
    }
    this.#pagemap?.close();
    this.#pagemap = null;
    this.#tracked = [];
  }
}
