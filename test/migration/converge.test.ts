/**
 * Auto-converge and the bandwidth limit, which no other test exercises: a writer too fast to
 * converge gets throttled level by level (and its stall is reported), and a limited migration
 * cannot finish faster than its limit allows. Real TCP sockets and worker-thread writers.
 */
import assert from "node:assert/strict";
import { test } from "node:test";
import { MigrationDestination } from "../../src/migration/destination.js";
import type { RoundStats } from "../../src/migration/events.js";
import { MigrationSource } from "../../src/migration/source.js";
import { Workload } from "../../src/migration/workload.js";
import { fillPattern, MiB, makeMemory, rawDigest, socketPair } from "./helpers.js";

test("auto-converge: a writer that keeps dirtying more than a round sends is throttled level by level, stall reported", async () => {
  const src = makeMemory();
  const dst = makeMemory();
  fillPattern(src);
  // Unthrottled, as fast as the thread goes over all 24 MiB: far more dirty than a 1 ms downtime allows.
  const wl = await Workload.start({ memory: src, pattern: "random", threads: 1 });
  const [a, b] = await socketPair();
  const source = new MigrationSource({
    memory: src,
    hooks: wl.sourceHooks(),
    downtimeLimitMs: 1,
    maxRounds: 8,
    whenNotConverged: "switchover",
    autoConverge: { startRound: 2, threshold: 0.05, maxLevel: 4 },
  });
  const levels: number[] = [];
  source.events.on("throttle", (t) => levels.push(t.level));
  const rounds: RoundStats[] = [];
  source.events.on("round", (r) => rounds.push(r));
  const [rs] = await Promise.all([source.run(a), new MigrationDestination({ memory: dst }).run(b)]);
  await wl.close();
  assert.ok(levels.length >= 2, `throttled more than once: ${levels.join(",")}`);
  assert.deepEqual(
    levels,
    levels.map((_, i) => i + 1),
    "one level more each time",
  );
  assert.ok(Math.max(...levels) <= 4, "never past maxLevel");
  const throttled = rounds.filter((r) => r.throttle > 0);
  assert.ok(throttled.length > 0, "rounds report the throttle level in force");
  assert.ok(
    throttled.some((r) => r.writerStallMs > 0),
    "and the time the writer spent throttled",
  );
  assert.ok(rs.digests.every((d) => d.match));
  assert.deepEqual(rawDigest(dst), rawDigest(src));
  src.close();
  dst.close();
});

test("a bandwidth limit: the stream never goes faster than the limit allows, memory equal", async () => {
  const src = makeMemory();
  const dst = makeMemory();
  fillPattern(src);
  const [a, b] = await socketPair();
  const limit = 40e6; // bytes/s: ~18 MiB of pages take ~0.47 s
  const t0 = performance.now();
  const [rs] = await Promise.all([
    new MigrationSource({ memory: src, bandwidthLimit: limit }).run(a),
    new MigrationDestination({ memory: dst }).run(b),
  ]);
  const seconds = (performance.now() - t0) / 1000;
  assert.ok(rs.bytesSent > 16 * MiB, `the pages went (${rs.bytesSent} bytes)`);
  // Only a lower bound: a slow machine makes it longer, never shorter. The limiter paces each
  // write after it is handed over, so the last record (at most 1 MiB) may go unpaced.
  const floor = (rs.bytesSent - 2 * MiB) / limit;
  assert.ok(seconds >= floor * 0.95, `${rs.bytesSent} bytes in ${seconds.toFixed(2)} s at a ${limit / 1e6} MB/s limit`);
  const r1 = rs.roundStats[0] as RoundStats;
  assert.ok(r1.bandwidth <= limit * 1.5, `round 1 measured ${(r1.bandwidth / 1e6).toFixed(1)} MB/s`);
  assert.ok(rs.digests.every((d) => d.match));
  assert.deepEqual(rawDigest(dst), rawDigest(src));
  src.close();
  dst.close();
});
