/** printable() and safeJson(): peer text made safe for a terminal (issue 12, item 7). */
import assert from "node:assert/strict";
import { test } from "node:test";
import { counted, printable, safeJson } from "../../src/cli/printable.js";

test("printable() and safeJson() escape what a terminal acts on and cut long text", () => {
  assert.equal(printable("a\x1b[2Jb\u009b\u202e\n"), "a\\x1b[2Jb\\x9b\\u202e\\n");
  assert.match(printable("x".repeat(5000)), /^x{2000}… \(3000 more characters\)$/);
  const j = safeJson({ m: "\x1b\u009b\u202e" });
  assert.equal(j, '{"m":"\\u001b\\u009b\\u202e"}');
  assert.deepEqual(JSON.parse(j), { m: "\x1b\u009b\u202e" });
});

test('counted(): singular for exactly one (a one-round migration says "1 round")', () => {
  assert.equal(counted(1, "round"), "1 round");
  assert.equal(counted(0, "round"), "0 rounds");
  assert.equal(counted(3, "round"), "3 rounds");
});
