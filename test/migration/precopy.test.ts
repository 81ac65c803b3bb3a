import assert from "node:assert/strict";
import { test } from "node:test";
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
    const wl = await Workload.start({ memory: src, pattern, pagesPerSecond: 20000, threads: 1 });
    // A failed assertion must not leave the writer thread running: the test process would never exit.
    try {
      const [a, b] = await socketPair();
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
      assert.ok(rs.zeroPages > 0, "zero pages went as flags");
      const first = rounds[0] as RoundStats;
      assert.ok(first.bytesSent < src.size * 0.8, `round 1 sent ${first.bytesSent}: zero pages not sent in full`);
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
      await wl.close();
      src.close();
      dst.close();
    }
  });
}
