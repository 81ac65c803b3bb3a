/**
 * Handlers that complete later (process() returns a promise): several requests of a queue in
 * flight, completed in the order they finish; GET_VRING_BASE answers only once none is in
 * flight; a rejection completes its request with length 0 and the queue goes on.
 */
import assert from "node:assert/strict";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { test } from "node:test";
import { VhostUserDaemon } from "../../src/vhost-user/backend/daemon.js";
import { asyncDevice } from "../helpers/async-device.js";
import { connectRaw, type RawFrontend, setUpRaw } from "./raw-frontend.js";

async function collect(f: RawFrontend, n: number): Promise<{ head: number; len: number }[]> {
  const out: { head: number; len: number }[] = [];
  for (let i = 0; i < 500 && out.length < n; i++) {
    const u = f.driver.getUsed();
    if (u) out.push(u);
    else await new Promise((r) => setTimeout(r, 5));
  }
  return out;
}

function request(f: RawFrontend, slot: number, data: number[]): number {
  f.mem.write(0x100000 + slot * 0x1000, Uint8Array.from(data));
  return f.driver.add(
    [{ addr: 0x100000 + slot * 0x1000, len: data.length }],
    [{ addr: 0x200000 + slot * 0x1000, len: data.length }],
  );
}

async function withDaemon(fn: (f: RawFrontend) => Promise<void>): Promise<void> {
  const path = join(tmpdir(), `vmshift-async-${process.pid}-${Math.random().toString(36).slice(2)}.sock`);
  const daemon = VhostUserDaemon.listen(asyncDevice(), path);
  const serving = daemon.serve();
  const f = connectRaw(path);
  try {
    await setUpRaw(f);
    await fn(f);
  } finally {
    f.conn.close();
    await daemon.close();
    await serving;
  }
}

test("requests in flight together complete in the order they finish, each with its own data", async () => {
  await withDaemon(async (f) => {
    const slow = request(f, 0, [120, 1, 1]);
    const mid = request(f, 1, [60, 2, 2, 2]);
    const fast = request(f, 2, [0, 3]);
    if (f.driver.publish()) f.kick.signal();
    const used = await collect(f, 3);
    assert.deepEqual(
      used.map((u) => u.head),
      [fast, mid, slow],
      "out-of-order completion",
    );
    assert.deepEqual(
      used.map((u) => u.len),
      [2, 4, 3],
    );
    assert.deepEqual([...f.mem.read(0x200000, 3)], [120, 1, 1]);
    assert.deepEqual([...f.mem.read(0x201000, 4)], [60, 2, 2, 2]);
    assert.deepEqual([...f.mem.read(0x202000, 2)], [0, 3]);
  });
});

test("GET_VRING_BASE answers only after the requests in flight completed", async () => {
  await withDaemon(async (f) => {
    const head = request(f, 0, [150, 9]);
    if (f.driver.publish()) f.kick.signal();
    await new Promise((r) => setTimeout(r, 20)); // taken, not finished
    assert.equal(f.mem.readU16(f.driver.usedRing + 2), 0, "still in flight");
    const r = await f.conn.request("GET_VRING_BASE", { index: 0, num: 0 });
    assert.equal(f.mem.readU16(f.driver.usedRing + 2), 1, "completed before the reply");
    assert.ok(r, "GET_VRING_BASE has a reply");
    assert.equal((r.payload as { num: number }).num, 1, "the ring stopped after it");
    assert.deepEqual(f.driver.getUsed(), { head, len: 2 });
  });
});

test("a rejected request completes with length 0 and the queue goes on", async () => {
  await withDaemon(async (f) => {
    const bad = request(f, 0, [0xfe, 1]);
    const good = request(f, 1, [5, 7]);
    if (f.driver.publish()) f.kick.signal();
    const used = await collect(f, 2);
    assert.deepEqual(
      new Map(used.map((u) => [u.head, u.len])),
      new Map([
        [bad, 0],
        [good, 2],
      ]),
    );
  });
});
