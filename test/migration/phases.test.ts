import assert from "node:assert/strict";
import { test } from "node:test";
import { MigrationError } from "../../src/migration/errors.js";
import {
  DESTINATION_TRANSITIONS,
  destinationPhases,
  SOURCE_TRANSITIONS,
  sourcePhases,
} from "../../src/migration/phases.js";

test("phases: the source's precopy path emits each phase once, in the diagram's order", () => {
  const seen: string[] = [];
  const m = sourcePhases((p) => seen.push(p));
  for (const p of ["setup", "precopy", "switchover", "verify", "complete"] as const) m.to(p);
  assert.deepEqual(seen, ["setup", "precopy", "switchover", "verify", "complete"]);
  assert.ok(m.final);
});

test("phases: postcopy recovery pauses from postcopy or verify and goes on in postcopy", () => {
  const m = sourcePhases(() => {});
  for (const p of ["setup", "precopy", "postcopy", "postcopy-paused", "postcopy", "verify"] as const) m.to(p);
  m.to("postcopy-paused");
  m.to("postcopy");
  m.to("verify");
  m.to("complete");
  const d = destinationPhases(() => {});
  for (const p of ["setup", "precopy", "postcopy", "postcopy-paused", "postcopy", "verify", "complete"] as const)
    d.to(p);
  assert.equal(d.phase, "complete");
});

test("phases: an illegal transition is a typed error and changes nothing", () => {
  const seen: string[] = [];
  const m = sourcePhases((p) => seen.push(p));
  m.to("setup");
  m.to("precopy");
  m.to("switchover");
  // A precopy switchover never pauses: the destination can be taken back until RESUMED.
  assert.throws(
    () => m.to("postcopy-paused"),
    (e: unknown) =>
      e instanceof MigrationError &&
      e.code === "ILLEGAL_TRANSITION" &&
      e.details.from === "switchover" &&
      e.details.to === "postcopy-paused",
  );
  assert.equal(m.phase, "switchover");
  assert.deepEqual(seen, ["setup", "precopy", "switchover"]);
  const d = destinationPhases(() => {});
  d.to("setup");
  d.to("precopy");
  d.to("verify");
  // The destination that resumed in precopy cannot start postcopy, nor pause.
  for (const to of ["postcopy", "postcopy-paused", "precopy", "setup"] as const)
    assert.throws(() => d.to(to), { code: "ILLEGAL_TRANSITION" });
  d.to("complete");
  // Final: not even failed.
  assert.throws(() => d.to("failed"), { code: "ILLEGAL_TRANSITION" });
  assert.ok(d.final);
});

test("phases: every phase but the final ones can fail, and each table is closed", () => {
  for (const table of [SOURCE_TRANSITIONS, DESTINATION_TRANSITIONS] as Record<string, readonly string[]>[]) {
    for (const [from, tos] of Object.entries(table)) {
      for (const to of tos) assert.ok(to in table, `${from} -> ${to}: ${to} is not a phase of this table`);
      if (from !== "idle" && tos.length > 0) assert.ok(tos.includes("failed"), `${from} cannot fail`);
    }
    assert.deepEqual(table.complete, []);
    assert.deepEqual(table.failed, []);
  }
  assert.equal("switchover" in DESTINATION_TRANSITIONS, false);
});
