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
export function regionDigest(region: GuestMemoryRegion, discard?: DiscardMap): Uint8Array {
  const h = createHash("sha256");
  const ranges: Iterable<[number, number]> = discard ? discard.ranges(true) : [[0, region.size]];
  for (const [off, len] of ranges) {
    let pos = off;
    while (pos < off + len) {
      // Chunks never cross a 1 GiB window: CHUNK divides the window size and `pos` stays aligned.
      const n = Math.min(CHUNK - (pos % CHUNK), off + len - pos);
      const view = region.bytes(pos, n);
      if (!view) throw new Error(`region view [${pos}, +${n}) crosses a window`);
      h.update(view);
      pos += n;
    }
  }
  return new Uint8Array(h.digest());
}

export function hex(b: Uint8Array): string {
  return Buffer.from(b).toString("hex");
}
