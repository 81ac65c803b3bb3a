/**
 * The blk I/O policy: where a request's read or write runs. Inline for a request alone (no hop
 * at queue depth 1) and for a write on the page cache; the pool when others of its queue are there
 * and it waits for the device (O_DIRECT, or flushed on its own); a cached read with others there is
 * tried inline and only a page-cache miss goes to the pool. sync and async as they say.
 */
import assert from "node:assert/strict";
import { test } from "node:test";
import { IoPolicy, Placement } from "../../src/devices/blk/io-policy.js";

test("adaptive: inline when alone, the pool for what waits for the device, cache-first reads with others there", () => {
  let others = 0;
  const cached = new IoPolicy("adaptive", false, () => others);
  const direct = new IoPolicy("adaptive", true, () => others);
  assert.equal(cached.place(false), Placement.Inline, "alone: inline");
  assert.equal(cached.place(true), Placement.Inline, "alone: inline");
  assert.equal(cached.place(true, true), Placement.Inline, "alone: inline, even flushed");
  assert.equal(direct.place(false), Placement.Inline, "alone: inline, even with O_DIRECT");
  others = 2;
  assert.equal(cached.place(false), Placement.CacheFirst, "a cached read with others there: the miss goes to the pool");
  assert.equal(cached.place(true), Placement.Inline, "a cached write (writeback): inline");
  assert.equal(
    cached.place(true, true),
    Placement.Pool,
    "a write flushed on its own (writethrough) waits for the device",
  );
  assert.equal(direct.place(false), Placement.Pool, "O_DIRECT: every request waits for the device");
  assert.equal(direct.place(true), Placement.Pool, "O_DIRECT writes too");
  assert.equal(new IoPolicy("adaptive", false, undefined).place(false), Placement.Inline, "nothing known: inline");
});

test("sync and async ignore the queue", () => {
  const many = () => 100;
  assert.equal(new IoPolicy("sync", true, many).place(true, true), Placement.Inline);
  assert.equal(new IoPolicy("async", false, () => 0).place(false), Placement.Pool);
});
