/** WarningLimiter: the token bucket behind the per-queue warnings (issue 12, item 7). */
import assert from "node:assert/strict";
import { test } from "node:test";
import { WarningLimiter } from "../../src/vhost-user/backend/warning-limiter.js";

test("WarningLimiter: a burst, then the refill rate; the next warning counts what was dropped", () => {
  let t = 0;
  const l = new WarningLimiter({ burst: 3, perSecond: 2, now: () => t });
  const out = Array.from({ length: 10 }, (_, i) => l.admit(`w${i}`));
  assert.deepEqual(out.slice(0, 3), ["w0", "w1", "w2"]);
  assert.ok(out.slice(3).every((m) => m === null));
  t += 500; // one token back
  assert.equal(l.admit("w10"), "w10 (7 similar warnings suppressed before this one)");
  assert.equal(l.admit("w11"), null);
  assert.equal(l.suppressedTotal, 8);
});
