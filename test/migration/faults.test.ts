import assert from "node:assert/strict";
import { test } from "node:test";
import type { DirtySource } from "../../src/memory/dirty-source.js";
import { RegionBitmapSource } from "../../src/memory/dirty-tracker.js";
import { MigrationDestination } from "../../src/migration/destination.js";
import { MigrationError } from "../../src/migration/errors.js";
import { MigrationSource } from "../../src/migration/source.js";
import { Workload } from "../../src/migration/workload.js";
import {
  countFds,
  expectBoth,
  fillPattern,
  hooks,
  MiB,
  makeMemory,
  proxyPair,
  rawDigest,
  recordOffsets,
  settle,
  socketPair,
} from "./helpers.js";

test("a flipped bit is CORRUPT at the offset of its record; the source keeps all its memory", async () => {
  const fds = countFds();
  const src = makeMemory();
  const dst = makeMemory();
  fillPattern(src);
  const before = rawDigest(src);
  const flipAt = 5 * MiB + 12345;
  const px = await proxyPair({ flipAt });
  const h = hooks();
  const [se, de] = await expectBoth(
    new MigrationSource({ memory: src, hooks: h }).run(px.source),
    new MigrationDestination({ memory: dst }).run(px.destination),
  );
  assert.equal(de.code, "CORRUPT");
  const starts = recordOffsets(px.captured()).filter((o) => o <= flipAt);
  assert.equal(de.offset, starts[starts.length - 1], "offset of the record holding the flipped byte");
  assert.equal(se.code, "PEER_FAILED");
  assert.equal(se.details.peerCode, "CORRUPT");
  assert.deepEqual(rawDigest(src), before, "source memory untouched");
  assert.equal(h.resumed, h.stopped, "writers resumed if they had been stopped");
  src.close();
  dst.close();
  await settle();
  assert.ok(countFds() <= fds, "no fd leaked"); // a leak is growth (the runtime may close one of its own fds meanwhile)
});

test("a truncated stream is TRUNCATED at the exact byte where it ended", async () => {
  const src = makeMemory();
  const dst = makeMemory();
  fillPattern(src);
  const cutAt = 3 * MiB + 777;
  const px = await proxyPair({ cutAt });
  const [se, de] = await expectBoth(
    new MigrationSource({ memory: src }).run(px.source),
    new MigrationDestination({ memory: dst }).run(px.destination),
  );
  assert.equal(de.code, "TRUNCATED");
  assert.equal(de.offset, cutAt);
  assert.ok(se.code === "CONNECTION_LOST" || se.code === "PEER_FAILED", se.code);
  src.close();
  dst.close();
});

test("a bad stream header and a cut inside the header are typed errors at offset 0/8", async () => {
  const dst = makeMemory();
  for (const [bytes, code] of [
    [Buffer.from("GARBAGE!GARBAGE!"), "BAD_HEADER"],
    [Buffer.from("VMSHIFT\0"), "TRUNCATED"],
  ] as const) {
    const [a, b] = await socketPair();
    const d = new MigrationDestination({ memory: dst }).run(b);
    a.end(bytes);
    a.on("error", () => undefined);
    await assert.rejects(d, (e: unknown) => e instanceof MigrationError && e.code === code);
    a.destroy();
  }
  dst.close();
});

test("a region of the wrong size is REGION_MISMATCH; the source is told and resumes", async () => {
  const src = makeMemory([16 * MiB, 8 * MiB]);
  const dst = makeMemory([16 * MiB, 4 * MiB]);
  fillPattern(src);
  const [a, b] = await socketPair();
  const h = hooks();
  const [se, de] = await expectBoth(
    new MigrationSource({ memory: src, hooks: h }).run(a),
    new MigrationDestination({ memory: dst }).run(b),
  );
  assert.equal(de.code, "REGION_MISMATCH");
  assert.equal(de.details.region, 1);
  assert.equal(de.offset, 16 + 32 + 36, "the second REGION record");
  assert.equal(se.code, "PEER_FAILED");
  assert.equal(se.details.peerCode, "REGION_MISMATCH");
  src.close();
  dst.close();
});

test("a source that stops converging reports NOT_CONVERGED at its round limit, never hangs", async () => {
  const src = makeMemory();
  const dst = makeMemory();
  const wl = await Workload.start({ memory: src, pattern: "random", pagesPerSecond: 0 });
  // The writer must be writing already: a round over fresh memory now takes well under a
  // millisecond, and a sync that finds nothing dirty would (rightly) converge.
  while (wl.pagesWritten === 0) await settle();
  const [a, b] = await socketPair();
  // Besides the writer (which a loaded machine may not schedule during a round), a source that
  // reports the same 64 pages at every sync: no round can find nothing dirty and converge.
  const churn: DirtySource = {
    name: "churn",
    start() {},
    sync(sink) {
      sink.markRange(0, 64 * 4096);
    },
    stop() {},
  };
  const [se, de] = await expectBoth(
    new MigrationSource({
      memory: src,
      sources: [new RegionBitmapSource(src), churn],
      hooks: wl.sourceHooks(),
      downtimeLimitMs: 0.001,
      maxRounds: 3,
      autoConverge: false,
    }).run(a),
    new MigrationDestination({ memory: dst }).run(b),
  );
  assert.equal(se.code, "NOT_CONVERGED");
  assert.equal(se.details.rounds, 3);
  assert.ok((se.details.predictedDowntimeMs as number) > 0.001);
  assert.ok(de.code === "TRUNCATED" || de.code === "CONNECTION_LOST", de.code);
  // The writers still run on the source: wait for the condition, not for a time.
  const w0 = wl.pagesWritten;
  while (wl.pagesWritten <= w0) await settle();
  await wl.close();
  src.close();
  dst.close();
});

for (const phase of ["setup", "precopy", "switchover"] as const) {
  test(`connection dropped during ${phase}: both sides fail typed, the source resumes its writers`, async () => {
    const src = makeMemory();
    const dst = makeMemory();
    fillPattern(src);
    const before = rawDigest(src);
    const [a, b] = await socketPair();
    const h = hooks();
    if (phase === "switchover")
      h.stopWriters = () => {
        h.stopped++;
        a.destroy();
      };
    const source = new MigrationSource({ memory: src, hooks: h });
    if (phase === "setup") source.events.on("phase", (p) => p.phase === "precopy" && b.destroy());
    if (phase === "precopy") b.once("data", () => setTimeout(() => b.destroy(), 5));
    const [se, de] = await expectBoth(source.run(a), new MigrationDestination({ memory: dst }).run(b));
    assert.ok(["CONNECTION_LOST", "TRUNCATED", "PEER_FAILED"].includes(se.code), se.code);
    assert.ok(["CONNECTION_LOST", "TRUNCATED"].includes(de.code), de.code);
    assert.equal(h.resumed, h.stopped);
    assert.deepEqual(rawDigest(src), before);
    src.close();
    dst.close();
  });
}

test("connection dropped during postcopy: both sides fail typed, no hang, the source keeps its memory but not its writers", async () => {
  const fds = countFds();
  const src = makeMemory();
  const dst = makeMemory();
  fillPattern(src);
  const before = rawDigest(src);
  const [a, b] = await socketPair();
  const h = hooks();
  const source = new MigrationSource({ memory: src, hooks: h, mode: "postcopy", postcopyAfterRounds: 0 });
  const destination = new MigrationDestination({
    memory: dst,
    // The guest runs here now; the link goes away while pages are still coming.
    hooks: { resume: () => void setTimeout(() => b.destroy(), 5) },
  });
  const [se, de] = await expectBoth(source.run(a), destination.run(b));
  assert.ok(["CONNECTION_LOST", "TRUNCATED", "PEER_FAILED"].includes(se.code), se.code);
  assert.ok(["CONNECTION_LOST", "TRUNCATED"].includes(de.code), de.code);
  // The destination ran: resuming the source would run the guest twice. Its memory is intact.
  assert.equal(h.resumed, 0, "the source resumed its writers after the destination had run");
  assert.deepEqual(rawDigest(src), before);
  src.close();
  dst.close();
  await settle();
  assert.ok(countFds() <= fds, "fds leaked (userfaultfd, sockets)"); // a leak is growth (the runtime may close one of its own fds meanwhile)
});
