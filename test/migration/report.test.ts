/**
 * MigrationReport: the versioned events of a real migration between two in-process sides.
 * A precopy run: every event valid against docs/events.schema.json, running totals that only
 * grow, QEMU's query-migrate fields filled in, the destination's own view (bytes received,
 * verified). A corrupted stream: exactly one `failed` per side, with the code and the offset of
 * the bad record on the destination.
 */
import assert from "node:assert/strict";
import { test } from "node:test";
import { MigrationDestination } from "../../src/migration/destination.js";
import { type MigrationEvent, type MigrationInfo, MigrationReport } from "../../src/migration/report.js";
import { MigrationSource } from "../../src/migration/source.js";
import { eventValidator } from "../cli/helpers.js";
import { expectBoth, fillPattern, hooks, MiB, makeMemory, proxyPair, recordOffsets, socketPair } from "./helpers.js";

test("precopy: versioned events with running totals, query-migrate fields and the destination's own view", async () => {
  const src = makeMemory();
  const dst = makeMemory();
  fillPattern(src);
  const [a, b] = await socketPair();
  const source = new MigrationSource({ memory: src, hooks: hooks(), downtimeLimitMs: 10_000 });
  const destination = new MigrationDestination({ memory: dst });
  const events: MigrationEvent[] = [];
  new MigrationReport({
    role: "source",
    mode: "precopy",
    events: source.events,
    totalBytes: src.size,
    transferred: () => a.bytesWritten,
    emit: (e) => events.push(e),
  });
  new MigrationReport({
    role: "destination",
    mode: "precopy",
    events: destination.events,
    totalBytes: dst.size,
    transferred: () => b.bytesRead,
    emit: (e) => events.push(e),
  });
  try {
    await Promise.all([source.run(a), destination.run(b)]);
  } finally {
    src.close();
    dst.close();
  }
  const validate = eventValidator();
  for (const e of events) assert.deepEqual(validate(e), [], JSON.stringify(e).slice(0, 300));
  for (const e of events) assert.equal(e.version, 1);
  const infos = (role: string) =>
    events.filter((e) => e.role === role && "info" in e).map((e) => (e as { info: MigrationInfo }).info);
  // Running totals never go down.
  for (const role of ["source", "destination"]) {
    const xs = infos(role).map((i) => i.ram.transferredBytes);
    assert.deepEqual(
      xs,
      [...xs].sort((x, y) => x - y),
      `${role}: transferred bytes only grow`,
    );
  }
  const complete = (role: string) =>
    events.find((e) => e.event === "complete" && e.role === role) as Extract<MigrationEvent, { event: "complete" }>;
  const s = complete("source");
  const d = complete("destination");
  assert.equal(s.info.status, "completed");
  assert.equal(s.info.ram.totalBytes, 24 * MiB);
  assert.ok(s.info.ram.transferredBytes >= 18 * MiB, "3 pages in 4 carry data");
  assert.equal(s.info.ram.remainingBytes, 0);
  assert.ok(s.info.ram.dirtySyncCount >= 2);
  assert.ok(s.info.setupTimeMs !== null && s.info.downtimeMs !== null);
  assert.ok(s.info.totalTimeMs >= (s.info.downtimeMs ?? 0));
  assert.equal(s.result.verified, true);
  // The destination's view: what it received (not "bytesSent 0"), and that it verified it.
  assert.equal(d.info.role, "destination");
  assert.equal(d.info.ram.transferredBytes, s.info.ram.transferredBytes, "received = sent");
  assert.equal(d.info.verified, true);
  assert.equal(d.info.downtimeMs, null, "the destination does not know the source's downtime");
  const rounds = events.filter((e) => e.event === "round") as Extract<MigrationEvent, { event: "round" }>[];
  assert.ok(rounds.length >= 1);
  const heat = rounds[0]?.round.dirtyHeat ?? [];
  assert.equal(heat.length, 128);
  assert.equal(
    heat.reduce((x, y) => x + y, 0),
    rounds[0]?.round.pagesSent,
    "the heat map accounts for every page sent in the round",
  );
  for (const r of rounds) assert.equal(r.info.rounds, r.round.round, "info.rounds is the running count");
});

test("a corrupted stream: one failed event per side, the destination's with the bad record's offset", async () => {
  const src = makeMemory();
  const dst = makeMemory();
  fillPattern(src);
  const flipAt = 5 * MiB + 12345;
  const px = await proxyPair({ flipAt });
  const source = new MigrationSource({ memory: src, hooks: hooks() });
  const destination = new MigrationDestination({ memory: dst });
  const events: MigrationEvent[] = [];
  for (const [role, ev] of [
    ["source", source.events],
    ["destination", destination.events],
  ] as const)
    new MigrationReport({ role, mode: "precopy", events: ev, totalBytes: src.size, emit: (e) => events.push(e) });
  try {
    await expectBoth(source.run(px.source), destination.run(px.destination));
  } finally {
    src.close();
    dst.close();
  }
  const failed = events.filter((e) => e.event === "failed") as Extract<MigrationEvent, { event: "failed" }>[];
  assert.deepEqual(failed.map((e) => e.role).sort(), ["destination", "source"], "one failed event per side");
  const d = failed.find((e) => e.role === "destination");
  assert.equal(d?.code, "CORRUPT");
  const start = recordOffsets(px.captured())
    .filter((o) => o <= flipAt)
    .at(-1);
  assert.equal(d?.offset, start, "the offset of the first byte of the bad record");
  assert.doesNotMatch(d?.message ?? "", /at stream offset/, "the offset is a field, not repeated in the text");
  assert.equal(d?.info.status, "failed");
  assert.ok(!events.some((e) => e.event === "phase" && e.phase === "failed"), "failure reported once, not twice");
  const validate = eventValidator();
  for (const e of failed) assert.deepEqual(validate(e), []);
});
