/**
 * Queue workers serving groups of queues (DeviceInfo.queueWorkers): which thread serves which
 * queue, every queue of a shared thread served while the others are loaded or stopped, and a
 * session's threads all gone when it ends. Real sockets, memfd memory, eventfds.
 */
import assert from "node:assert/strict";
import { readdirSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { test } from "node:test";
import { GuestMemory } from "../../src/memory/guest-memory.js";
import { GuestMemoryRegion } from "../../src/memory/region.js";
import { VhostUserDaemon } from "../../src/vhost-user/backend/daemon.js";
import type { VhostUserDevice } from "../../src/vhost-user/backend/device.js";
import { FRONTEND_PROTOCOL_FEATURES, VhostUserFrontend } from "../../src/vhost-user/frontend/frontend.js";
import { featureMask, ProtocolFeature, VirtioFeature } from "../../src/vhost-user/protocol/constants.js";
import { SplitQueueDriver } from "../../src/virtio/driver.js";
import { splitQueueLayout } from "../../src/virtio/ring.js";
import { threadDevice } from "../helpers/thread-device.js";

const MiB = 1 << 20;
const SIZE = 64;
const tasks = () => readdirSync("/proc/self/task").length;
const fds = () => readdirSync("/proc/self/fd").length;

async function until(what: string, cond: () => boolean, ms = 5000): Promise<void> {
  const end = Date.now() + ms;
  while (!cond()) {
    if (Date.now() > end) assert.fail(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 2));
  }
}

interface Rig {
  fe: VhostUserFrontend;
  mem: GuestMemory;
  drivers: SplitQueueDriver[];
  close(): Promise<void>;
}

async function rig(device: VhostUserDevice): Promise<Rig> {
  const path = join(tmpdir(), `vmshift-qw-${process.pid}-${Math.random().toString(36).slice(2)}.sock`);
  const daemon = VhostUserDaemon.listen(device, path);
  const serving = daemon.serve();
  const mem = new GuestMemory([GuestMemoryRegion.memfd(0, 16 * MiB)]);
  const fe = VhostUserFrontend.connect(path, {
    timeoutMs: 5000,
    protocolFeatures: FRONTEND_PROTOCOL_FEATURES | featureMask(ProtocolFeature.MQ),
  });
  const features = featureMask(VirtioFeature.VIRTIO_F_VERSION_1, 29 /* EVENT_IDX */);
  await fe.negotiate();
  await fe.setOwner();
  await fe.setFeatures(features);
  await fe.setMemTable(mem);
  const drivers: SplitQueueDriver[] = [];
  for (let q = 0; q < device.info.numQueues; q++) {
    const d = new SplitQueueDriver(mem, { ...splitQueueLayout(0x10000 + q * 0x10000, SIZE), features });
    await fe.startVring(q, d.layout);
    drivers.push(d);
  }
  return {
    fe,
    mem,
    drivers,
    async close() {
      fe.close();
      await daemon.close();
      await serving;
      mem.close();
    },
  };
}

/** [queue, threadId, backlog] of the reply at `addr`. */
function reply(r: Rig, addr: number): [number, number, number] {
  const b = r.mem.read(addr, 12);
  const dv = new DataView(b.buffer, b.byteOffset, 12);
  return [dv.getUint32(0, true), dv.getUint32(4, true), dv.getUint32(8, true)];
}

/** `n` requests on queue `q`, all in flight at once; resolves with each reply's [queue, threadId]. */
async function burst(r: Rig, q: number, n: number): Promise<[number, number, number][]> {
  const d = r.drivers[q] as SplitQueueDriver;
  const dst = 8 * MiB + q * 0x10000;
  const heads = new Map<number, number>();
  for (let i = 0; i < n; i++) {
    r.mem.fill(dst + i * 12, 12, 0xee);
    heads.set(d.add([], [{ addr: dst + i * 12, len: 12 }]), i);
  }
  if (d.publish()) r.fe.kick(q);
  const out: [number, number, number][] = [];
  await until(`queue ${q}'s ${n} replies`, () => {
    for (let u = d.getUsed(); u; u = d.getUsed()) {
      assert.equal(u.len, 12);
      const i = heads.get(u.head) as number;
      out.push(reply(r, dst + i * 12));
    }
    return out.length === n;
  });
  return out;
}

/** Each queue's serving threadId (every reply of a queue from the same thread). */
async function threadsOf(r: Rig, rounds = 5): Promise<number[]> {
  const seen: Set<number>[] = r.drivers.map(() => new Set());
  for (let round = 0; round < rounds; round++) {
    const replies = await Promise.all(r.drivers.map((_, q) => burst(r, q, 16)));
    replies.forEach((rs, q) => {
      for (const [queue, thread] of rs) {
        assert.equal(queue, q, "a reply names its own queue");
        seen[q]?.add(thread);
      }
    });
  }
  return seen.map((s) => {
    assert.equal(s.size, 1, "one thread per queue");
    return [...s][0] as number;
  });
}

test("four queues on two workers: queues 0 and 2 share a thread, 1 and 3 the other; all load at once", async () => {
  const r = await rig(threadDevice(4, 2));
  try {
    const t = await threadsOf(r);
    assert.equal(t[0], t[2]);
    assert.equal(t[1], t[3]);
    assert.notEqual(t[0], t[1]);
  } finally {
    await r.close();
  }
});

test("without queueWorkers every queue has its own thread; queueWorkers 1 puts them all on one", async () => {
  const own = await rig(threadDevice(3));
  try {
    assert.equal(new Set(await threadsOf(own)).size, 3);
  } finally {
    await own.close();
  }
  const one = await rig(threadDevice(3, 1));
  try {
    assert.equal(new Set(await threadsOf(one)).size, 1);
  } finally {
    await one.close();
  }
});

test("a queue stopped on a shared thread: the other keeps serving; the stopped one resumes at its base", async () => {
  const r = await rig(threadDevice(2, 1));
  try {
    await threadsOf(r, 2);
    const base = await r.fe.stopVring(0);
    assert.equal(base, 32, "two bursts of 16 taken from queue 0");
    // Queue 0 gets a request while stopped: not served; queue 1 is.
    const d0 = r.drivers[0] as SplitQueueDriver;
    d0.add([], [{ addr: 9 * MiB, len: 8 }]);
    d0.publish();
    assert.equal((await burst(r, 1, 16)).length, 16);
    assert.equal(d0.hasUsed(), false, "a stopped ring is not served");
    await r.fe.startVring(0, d0.layout, base);
    await until("the request left in queue 0 while it was stopped", () => d0.getUsed() !== null);
    assert.equal((await burst(r, 0, 16)).length, 16);
  } finally {
    await r.close();
  }
});

test("a session's worker threads all end with it, and no fd stays open", async () => {
  const t0 = tasks();
  const f0 = fds();
  const r = await rig(threadDevice(4, 2));
  await threadsOf(r, 1);
  assert.ok(tasks() >= t0 + 2, "two worker threads while serving");
  await r.close();
  await until("the worker threads to end", () => tasks() <= t0);
  await until("the fds to be closed", () => fds() <= f0);
});

/**
 * A request on queue 1 published without a kick (it waits until the thread is awake anyway),
 * then one on queue 0, kicked: the replies land at 10 MiB (queue 1) and 11 MiB (queue 0).
 */
function unkickedThenKicked(r: Rig): [SplitQueueDriver, SplitQueueDriver] {
  const [d0, d1] = r.drivers as [SplitQueueDriver, SplitQueueDriver];
  d1.add([], [{ addr: 10 * MiB, len: 12 }]);
  d1.publish();
  d0.add([], [{ addr: 11 * MiB, len: 12 }]);
  d0.publish();
  r.fe.kick(0);
  return [d0, d1];
}

test("a handler's backlog counts the other queues of its thread that have requests waiting", async () => {
  const shared = await rig(threadDevice(2, 1));
  try {
    const [d0, d1] = unkickedThenKicked(shared);
    await until("both served", () => d0.hasUsed() && d1.hasUsed());
    assert.deepEqual(reply(shared, 11 * MiB).slice(2), [1], "queue 0's request saw queue 1's waiting");
    assert.deepEqual(reply(shared, 10 * MiB).slice(2), [0], "queue 1's request, served by the poll, saw nothing else");
  } finally {
    await shared.close();
  }
  // On a thread of its own a queue's backlog is its own.
  const own = await rig(threadDevice(2));
  try {
    const [d0] = unkickedThenKicked(own);
    await until("queue 0 served", () => d0.hasUsed());
    assert.deepEqual(reply(own, 11 * MiB).slice(2), [0]);
  } finally {
    await own.close();
  }
});
