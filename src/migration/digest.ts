import { createHash } from "node:crypto";
import type { DiscardMap } from "../memory/discard-map.js";
import type { GuestMemoryRegion } from "../memory/region.js";

const CHUNK = 1024 * 1024;

/**
 * SHA-256 over the plugged blocks of a region, in address order (discarded blocks are never
 * read: on the source they may hold stale data, on the destination reading would populate
 * them). Both sides hash the same byte ranges because the destination applies the source's
 * discard map first.
 */
export function regionDigest(region: GuestMemoryRegion, discard?: DiscardMap, written?: Uint8Array): Uint8Array {
  const h = createHash("sha256");
  const ranges: Iterable<[number, number]> = discard ? discard.ranges(true) : [[0, region.size]];
  for (const [off, len] of ranges) {
    let pos = off;
    while (pos < off + len) {
      // Chunks never cross a 1 GiB window: CHUNK divides the window size and `pos` stays aligned.
      const n = Math.min(CHUNK - (pos % CHUNK), off + len - pos);
      if (written) {
        hashPages(h, region, pos, n, written);
      } else {
        const view = region.bytes(pos, n);
        if (!view) throw new Error(`region view [${pos}, +${n}) crosses a window`);
        h.update(view);
      }
      pos += n;
    }
  }
  return new Uint8Array(h.digest());
}

const ZEROS = new Uint8Array(CHUNK);

/**
 * Hashes [pos, pos+n) where pages whose bit is clear in `written` are known to be zero (fresh
 * memory never written): they hash from a constant buffer instead of being read, since reading a
 * never-populated memfd page faults a new page in (about as slow as hashing it several times).
 */
function hashPages(
  h: ReturnType<typeof createHash>,
  region: GuestMemoryRegion,
  pos: number,
  n: number,
  written: Uint8Array,
): void {
  const first = pos / 4096;
  const count = Math.ceil(n / 4096);
  let k = 0;
  while (k < count) {
    const set = bit(written, first + k);
    let m = 1;
    while (k + m < count && bit(written, first + k + m) === set) m++;
    const at = pos + k * 4096;
    const len = Math.min(m * 4096, pos + n - at);
    if (set) h.update(region.bytes(at, len) as Uint8Array);
    else h.update(ZEROS.subarray(0, len));
    k += m;
  }
}

function bit(b: Uint8Array, p: number): boolean {
  return (((b[p >>> 3] as number) >>> (p & 7)) & 1) === 1;
}

export function hex(b: Uint8Array): string {
  return Buffer.from(b).toString("hex");
}
