/**
 * The blk I/O policy: where a request's read or write runs. Inline for a request alone (no hop
 * at queue depth 1), the pool when others of its queue are there and it may block or is worth
 * the hop (anything with O_DIRECT or flushed on its own; 64 KiB and more on the page cache);
 * sync and async as they say.
 */
import assert from "node:assert/strict";
import { test } from "node:test";
import { CACHED_OFFLOAD_MIN, IoPolicy } from "../../src/devices/blk/io-policy.js";

test("adaptive: inline when alone, the pool when others are there and it may block or is worth the hop", () => {
  let others = 0;
  const cached = new IoPolicy("adaptive", false, () => others);
  const direct = new IoPolicy("adaptive", true, () => others);
  assert.equal(cached.offload(1 << 20, false), false, "alone: inline");
  assert.equal(cached.offload(4096, true), false, "alone: inline");
  assert.equal(direct.offload(4096, false), false, "alone: inline, even with O_DIRECT");
  others = 2;
  assert.equal(cached.offload(1 << 20, false), true, "a large cached read with others there");
  assert.equal(
    cached.offload(CACHED_OFFLOAD_MIN - 512, false),
    false,
    "a small cached read: the copy is cheaper than the hop",
  );
  assert.equal(cached.offload(4096, true), false, "a small cached write (writeback): the copy is cheaper than the hop");
  assert.equal(cached.offload(1 << 20, true), true, "a large cached write with others there");
  assert.equal(
    cached.offload(4096, true, true),
    true,
    "a write flushed on its own (writethrough) waits for the device",
  );
  assert.equal(direct.offload(4096, false), true, "O_DIRECT: every request waits for the device");
  assert.equal(new IoPolicy("adaptive", false, undefined).offload(1 << 20, true), false, "nothing known: inline");
});

test("sync and async ignore the queue", () => {
  const many = () => 100;
  assert.equal(new IoPolicy("sync", true, many).offload(1 << 20, true), false);
  assert.equal(new IoPolicy("async", false, () => 0).offload(512, false), true);
});
