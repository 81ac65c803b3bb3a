/**
 * convergence(): every branch of the precopy stop decision, table-driven. The source acts on
 * exactly these decisions (precopy / converge / faults tests cover the acting).
 */
import assert from "node:assert/strict";
import { test } from "node:test";
import {
  CONVERGENCE_DEFAULTS,
  type ConvergenceDecision,
  type ConvergenceInput,
  convergence,
  convergenceLimits,
  predictDowntimeMs,
} from "../../src/migration/convergence.js";

const MB = 1_000_000;
// 100 MB/s: 30 MB remaining predicts 300 ms, the default limit.
const last = { bytesSent: 40 * MB, bandwidth: 100 * MB };
const base: ConvergenceInput = { round: 3, last, remainingBytes: 50 * MB, throttle: 0, postcopy: false };

const cases: [
  name: string,
  input: Partial<ConvergenceInput>,
  options: Parameters<typeof convergenceLimits>[0],
  want: ConvergenceDecision,
][] = [
  ["before the first round: continue", { round: 0, last: null }, {}, { kind: "continue" }],
  [
    "before the first round, maxRounds 0: still one round",
    { round: 0, last: null },
    { maxRounds: 0 },
    { kind: "continue" },
  ],
  [
    "postcopy after 0 rounds: postcopy before any round",
    { round: 0, last: null, postcopy: true },
    { postcopyAfterRounds: 0 },
    { kind: "postcopy" },
  ],
  ["postcopy, default 1 round: continue before it", { round: 0, last: null, postcopy: true }, {}, { kind: "continue" }],
  [
    "postcopy after its rounds, downtime irrelevant",
    { round: 1, remainingBytes: 1, postcopy: true },
    {},
    { kind: "postcopy" },
  ],
  [
    "predicted downtime exactly at the limit: switchover",
    { remainingBytes: 30 * MB },
    {},
    { kind: "switchover", converged: true },
  ],
  [
    "under the limit at the last round: switchover, converged",
    { round: 30, remainingBytes: 10 * MB },
    {},
    { kind: "switchover", converged: true },
  ],
  [
    "postcopy never switches over on a good prediction",
    { round: 1, remainingBytes: 0, postcopy: true },
    { postcopyAfterRounds: 5 },
    { kind: "continue" },
  ],
  [
    "postcopy reaching maxRounds before its planned rounds: postcopy",
    { round: 4, postcopy: true },
    { postcopyAfterRounds: 9, maxRounds: 4 },
    { kind: "postcopy" },
  ],
  [
    "over the limit at maxRounds: not converged",
    { round: 30 },
    {},
    { kind: "not-converged", predictedDowntimeMs: 500, limitMs: 300 },
  ],
  [
    "over the limit at maxRounds, whenNotConverged switchover",
    { round: 30 },
    { whenNotConverged: "switchover" },
    { kind: "switchover", converged: false },
  ],
  [
    "zero bandwidth predicts forever",
    { round: 2, last: { bytesSent: 0, bandwidth: 0 }, remainingBytes: 4096 },
    { maxRounds: 2 },
    { kind: "not-converged", predictedDowntimeMs: Number.POSITIVE_INFINITY, limitMs: 300 },
  ],
  ["a custom limit", { remainingBytes: 50 * MB }, { downtimeLimitMs: 500 }, { kind: "switchover", converged: true }],
  ["too dirty from round 2: throttle to level 1", { round: 2 }, {}, { kind: "throttle", level: 1 }],
  ["too dirty in round 1: not yet", { round: 1 }, {}, { kind: "continue" }],
  ["throttle raises the current level by one", { throttle: 5 }, {}, { kind: "throttle", level: 6 }],
  ["at the highest level: continue", { throttle: 8 }, {}, { kind: "continue" }],
  [
    "dirty exactly at the threshold: continue",
    { remainingBytes: 31 * MB, last: { bytesSent: 62 * MB, bandwidth: 100 * MB } },
    {},
    { kind: "continue" },
  ],
  ["auto-converge off: continue", {}, { autoConverge: false }, { kind: "continue" }],
  [
    "auto-converge settings merge with the defaults",
    { round: 2 },
    { autoConverge: { startRound: 4 } },
    { kind: "continue" },
  ],
  [
    "a lower threshold throttles a round the default would not",
    { remainingBytes: 15 * MB, last: { bytesSent: 40 * MB, bandwidth: 10 * MB } },
    { autoConverge: { threshold: 0.25 } },
    { kind: "throttle", level: 1 },
  ],
];

for (const [name, input, options, want] of cases) {
  test(`convergence: ${name}`, () => {
    assert.deepEqual(convergence({ ...base, ...input }, convergenceLimits(options)), want);
  });
}

test("the defaults are in one frozen place and convergenceLimits falls back to them", () => {
  assert.deepEqual(convergenceLimits({}), {
    downtimeLimitMs: 300,
    maxRounds: 30,
    whenNotConverged: "fail",
    postcopyAfterRounds: 1,
    autoConverge: { startRound: 2, threshold: 0.5, maxLevel: 8 },
  });
  assert.ok(Object.isFrozen(CONVERGENCE_DEFAULTS) && Object.isFrozen(CONVERGENCE_DEFAULTS.autoConverge));
  const l = convergenceLimits({ autoConverge: { maxLevel: 2 } });
  assert.deepEqual(l.autoConverge, { startRound: 2, threshold: 0.5, maxLevel: 2 });
  assert.equal(CONVERGENCE_DEFAULTS.autoConverge?.maxLevel, 8, "options never change the defaults");
});

test("predictDowntimeMs: bytes over bandwidth in ms, infinite without bandwidth", () => {
  assert.equal(predictDowntimeMs(30 * MB, 100 * MB), 300);
  assert.equal(predictDowntimeMs(0, 100 * MB), 0);
  assert.equal(predictDowntimeMs(1, 0), Number.POSITIVE_INFINITY);
});
