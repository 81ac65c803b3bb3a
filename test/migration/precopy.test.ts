import assert from "node:assert/strict";
import { test } from "node:test";
import { GuestMemory } from "../../src/memory/guest-memory.js";
import type { GuestMemoryRegion } from "../../src/memory/region.js";
import { MigrationDestination } from "../../src/migration/destination.js";
import type { RoundStats } from "../../src/migration/events.js";
import { MigrationSource } from "../../src/migration/source.js";
import { Workload } from "../../src/migration/workload.js";
import { fillPattern, makeMemory, rawDigest, socketPair } from "./helpers.js";

for (const pattern of ["sequential", "random", "hotset"] as const) {
  test(`precopy with a ${pattern} writer: destination equals the source byte for byte`, async () => {
    const src = makeMemory();
    const dst = makeMemory();
    fillPattern(src);
    // The writer works in the first region only: the second keeps its zero pages (1 in 4) for
    // the whole migration, however slowly round 1 runs on a loaded machine, so the zero-page
    // path is exercised for certain (a writer over all of memory may have filled every zero page
    // before round 1 reaches it).
    const [written, untouched] = src.regions as [GuestMemoryRegion, GuestMemoryRegion];
    const wl = await Workload.start({ memory: new GuestMemory([written]), pattern, pagesPerSecond: 20000, threads: 1 });
    const [a, b] = await socketPair();
    try {
      const source = new MigrationSource({ memory: src, hooks: wl.sourceHooks(), downtimeLimitMs: 50, maxRounds: 30 });
      const rounds: RoundStats[] = [];
      source.events.on("round", (r) => rounds.push(r));
      const destination = new MigrationDestination({ memory: dst });
      const [rs, rd] = await Promise.all([source.run(a), destination.run(b)]);
      // Writers are paused (the migration stopped them): the source is frozen at switchover.
      assert.deepEqual(rawDigest(dst), rawDigest(src));
      assert.ok(rs.digests.every((d) => d.match));
      assert.deepEqual(
        rs.digests.map((d) => d.source),
        rd.digests.map((d) => d.destination),
      );
      assert.ok(rs.rounds >= 1 && rounds.length === rs.rounds);
      const zeroInUntouched = untouched.size / 4096 / 4;
      assert.ok(rs.zeroPages >= zeroInUntouched, `zero pages went as flags (${rs.zeroPages} < ${zeroInUntouched})`);
      const first = rounds[0] as RoundStats;
      assert.ok(first.bytesSent < src.size, `round 1 sent ${first.bytesSent}: zero pages not sent in full`);
      assert.ok(wl.pagesWritten > 0);
      console.log(
        JSON.stringify({
          pattern,
          rounds: rs.rounds,
          downtimeMs: +rs.downtimeMs.toFixed(2),
          totalMs: +rs.totalMs.toFixed(1),
          MBps: +(rounds[0] ? rounds[0].bandwidth / 1e6 : 0).toFixed(1),
        }),
      );
    } finally {
      // Also on a failed assertion: a live writer thread would keep the test file from exiting.
      await wl.close();
      a.destroy();
      b.destroy();
      src.close();
      dst.close();
    }
  });
}
