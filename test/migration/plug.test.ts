/**
 * virtio-mem style (un)plug while a precopy migration runs: the new plug state travels ahead
 * of the next pages, the destination drops what it had received for a block that was
 * unplugged, and a block plugged meanwhile arrives with what the guest wrote there.
 */
import assert from "node:assert/strict";
import { test } from "node:test";
import { DiscardMap } from "../../src/memory/discard-map.js";
import type { GuestMemoryRegion } from "../../src/memory/region.js";
import { MigrationDestination } from "../../src/migration/destination.js";
import { MigrationSource } from "../../src/migration/source.js";
import { Workload } from "../../src/migration/workload.js";
import { MADV_REMOVE } from "../../src/sys/mapping.js";
import { fillPattern, MiB, makeMemory, rawDigest, socketPair } from "./helpers.js";

test("blocks unplugged and plugged during precopy: plug state follows, the destination drops the unplugged block, memory equal", async () => {
  const src = makeMemory();
  const dst = makeMemory();
  const r0 = src.regions[0] as GuestMemoryRegion;
  const d0 = dst.regions[0] as GuestMemoryRegion;
  const smap = new DiscardMap(r0.size, 2 * MiB);
  smap.discard(12 * MiB, 2 * MiB);
  const dmap = new DiscardMap(d0.size, 2 * MiB);
  fillPattern(src, 3, (gpa) => gpa < 16 * MiB && smap.isDiscarded(gpa));
  const srcDiscard = new Map([[r0, smap]]);
  const wl = await Workload.start({ memory: src, pattern: "random", pagesPerSecond: 20000, discard: srcDiscard });
  const [a, b] = await socketPair();
  const source = new MigrationSource({
    memory: src,
    discard: srcDiscard,
    downtimeLimitMs: 1,
    maxRounds: 4,
    whenNotConverged: "switchover",
    hooks: wl.sourceHooks(),
  });
  let changed = false;
  source.events.on("round", (r) => {
    if (r.round !== 1) return;
    // After a full pass (the block at 4 MiB went over): the VMM unplugs it and drops its
    // memory, and plugs the one at 12 MiB, where the guest then writes.
    smap.discard(4 * MiB, 2 * MiB);
    r0.mapping?.advise(4 * MiB, 2 * MiB, MADV_REMOVE);
    smap.populate(12 * MiB, 2 * MiB);
    src.fill(12 * MiB + 8192, 4096, 0xab);
    changed = true;
  });
  const [rs, rd] = await Promise.all([
    source.run(a),
    new MigrationDestination({ memory: dst, discard: new Map([[d0, dmap]]) }).run(b),
  ]);
  await wl.close();
  assert.ok(changed, "the plug state changed while the migration ran");
  assert.ok(rs.rounds >= 1);
  assert.deepEqual([...dmap.ranges(false)], [[4 * MiB, 2 * MiB]], "the destination's plug state is the source's");
  assert.deepEqual([...dmap.ranges(false)], [...smap.ranges(false)]);
  assert.ok(rs.digests.every((d) => d.match) && rd.digests.every((d) => d.match));
  const skip = (gpa: number) => gpa < 16 * MiB && smap.isDiscarded(gpa);
  assert.deepEqual(rawDigest(dst, skip), rawDigest(src, skip));
  const res = d0.mapping?.residency(4 * MiB, 2 * MiB);
  assert.ok(res);
  const resident = res.reduce((n, v) => n + (v & 1), 0);
  assert.equal(resident, 0, "nothing of the unplugged block stays populated on the destination");
  assert.deepEqual(dst.read(12 * MiB + 8192, 4096), new Uint8Array(4096).fill(0xab), "the plugged block's new data");
  src.close();
  dst.close();
});
