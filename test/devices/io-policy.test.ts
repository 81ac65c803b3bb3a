/**
 * The blk I/O policy: where a request's read or write runs. Inline for a request alone in the
 * ring (no hop at queue depth 1), the pool when others wait behind it and it is worth the hop
 * (any size with O_DIRECT, 64 KiB and more on the page cache); sync and async as they say.
 */
import assert from "node:assert/strict";
import { test } from "node:test";
import { CACHED_OFFLOAD_MIN, IoPolicy } from "../../src/devices/blk/io-policy.js";

test("adaptive: inline when alone, the pool when more waits and it is worth the hop", () => {
  let waiting = 0;
  const cached = new IoPolicy("adaptive", false, () => waiting);
  const direct = new IoPolicy("adaptive", true, () => waiting);
  assert.equal(cached.offload(1 << 20), false, "alone: inline");
  assert.equal(direct.offload(4096), false, "alone: inline, even with O_DIRECT");
  waiting = 2;
  assert.equal(cached.offload(1 << 20), true, "a large cached request with others behind it");
  assert.equal(cached.offload(CACHED_OFFLOAD_MIN - 512), false, "a small cached one: the copy is cheaper than the hop");
  assert.equal(direct.offload(4096), true, "O_DIRECT: every request waits for the device");
  assert.equal(new IoPolicy("adaptive", false, undefined).offload(1 << 20), false, "no backlog known: inline");
});

test("sync and async ignore the ring", () => {
  const many = () => 100;
  assert.equal(new IoPolicy("sync", true, many).offload(1 << 20), false);
  assert.equal(new IoPolicy("async", false, () => 0).offload(512), true);
});
