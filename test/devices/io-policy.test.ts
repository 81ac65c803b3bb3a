/**
 * The blk I/O policy: where a request's read or write runs. Inline for a request alone (no hop
 * at queue depth 1) and for a write on the page cache; the pool when others of its queue are there
 * and it waits for the device (O_DIRECT, or flushed on its own); a cached read with others there is
 * tried inline and only a page-cache miss goes to the pool, except a large one while the pool is
 * idle (spread: it overlaps the next, done inline). sync and async as they say.
 */
import assert from "node:assert/strict";
import { test } from "node:test";
import { IoPolicy, Placement, SPREAD_MIN_BYTES } from "../../src/devices/blk/io-policy.js";

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

test("spread (opt-in): a large cached read goes to an idle pool when others wait; small ones, busy pools and writes never", () => {
  let others = 0;
  const cached = new IoPolicy("adaptive", false, () => others, true);
  const big = SPREAD_MIN_BYTES;
  assert.equal(cached.place(false, false, big, true), Placement.Inline, "alone: inline, however large");
  others = 2;
  assert.equal(cached.place(false, false, big, true), Placement.Pool, "large, others waiting, pool idle: the pool");
  assert.equal(cached.place(false, false, big, false), Placement.CacheFirst, "the pool busy: inline from the cache");
  assert.equal(cached.place(false, false, big - 512, true), Placement.CacheFirst, "small: the hop costs more");
  assert.equal(cached.place(true, false, 4 * big, true), Placement.Inline, "writes: the inode lock serializes them");
  const off = new IoPolicy("adaptive", false, () => others);
  assert.equal(off.place(false, false, 4 * big, true), Placement.CacheFirst, "spread off (the default)");
  const direct = new IoPolicy("adaptive", true, () => others, true);
  assert.equal(direct.place(false, false, 4 * big, true), Placement.Pool, "O_DIRECT: the pool as before");
});
