/**
 * Inflight I/O tracking across a back-end that dies: the back-end runs in a child process and
 * is SIGKILLed with one request in flight and one not yet taken; the next back-end gets the
 * same inflight region (SET_INFLIGHT_FD) and completes each request exactly once.
 */
import assert from "node:assert/strict";
import { type ChildProcess, spawn } from "node:child_process";
import { test } from "node:test";
import { fileURLToPath } from "node:url";
import { Mapping } from "../../src/sys/mapping.js";
import { featureMask, ProtocolFeature } from "../../src/vhost-user/protocol/constants.js";
import type { InflightDescription } from "../../src/vhost-user/protocol/payloads.js";
import { tempSocketPath } from "../helpers/temp-socket.js";
import { connectRaw, nextCall, setUpRaw } from "./raw-frontend.js";

const GATE = fileURLToPath(new URL("../helpers/gate-device.js", import.meta.url));

function startBackend(path: string, gate: boolean): Promise<ChildProcess> {
  const child = spawn(process.execPath, [GATE, path], {
    env: { ...process.env, VMSHIFT_TEST_GATE: gate ? "1" : "0" },
    stdio: ["ignore", "pipe", "inherit"],
  });
  return new Promise((resolve, reject) => {
    child.once("error", reject);
    child.once("exit", (code) => reject(new Error(`back-end exited early (${code})`)));
    child.stdout?.once("data", () => resolve(child));
  });
}

test("a back-end killed with a request in flight: the next one resubmits it, nothing lost or done twice", async () => {
  const path = tempSocketPath("inflight");
  const proto = featureMask(ProtocolFeature.LOG_SHMFD, ProtocolFeature.REPLY_ACK, ProtocolFeature.INFLIGHT_SHMFD);
  const first = await startBackend(path, true);
  const f = connectRaw(path);
  let second: ChildProcess | null = null;
  try {
    await setUpRaw(f, { protocolFeatures: proto });
    // QEMU's order: GET_INFLIGHT_FD once, then SET_INFLIGHT_FD at every start.
    const got = await f.conn.request("GET_INFLIGHT_FD", { mmapSize: 0n, mmapOffset: 0n, numQueues: 1, queueSize: 64 });
    const desc = got?.payload as InflightDescription;
    const inflightFd = got?.fds[0];
    assert.ok(inflightFd, "GET_INFLIGHT_FD returns an fd");
    assert.equal(desc.numQueues, 1);
    assert.equal(desc.queueSize, 64);
    const inflight = { fd: inflightFd, size: desc.mmapSize, numQueues: 1, queueSize: 64 };
    await f.conn.request("GET_VRING_BASE", { index: 0, num: 0 });
    await setUpRaw(f, { protocolFeatures: proto, inflight });
    const view = Mapping.map(inflightFd, Number(desc.mmapSize));
    const region = view.bytes(0, Number(desc.mmapSize)) as Uint8Array;
    // X blocks in the first back-end; Y waits behind it in the avail ring.
    f.mem.write(0x100000, Uint8Array.of(0xff, 1, 2, 3));
    f.mem.write(0x101000, Uint8Array.of(7, 8, 9));
    f.driver.add([{ addr: 0x100000, len: 4 }], [{ addr: 0x200000, len: 4 }]);
    f.driver.add([{ addr: 0x101000, len: 3 }], [{ addr: 0x201000, len: 3 }]);
    if (f.driver.publish()) f.kick.signal();
    // Wait until the back-end recorded X as in flight (desc[0].inflight, after the 16-byte header).
    for (let i = 0; i < 500 && region[16] !== 1; i++) await new Promise((r) => setTimeout(r, 10));
    assert.equal(region[16], 1, "X was never marked in flight");
    first.kill("SIGKILL");
    await new Promise((r) => first.once("exit", r));
    f.conn.close();
    // The next back-end life, same guest memory and rings, same inflight region.
    second = await startBackend(path, false);
    const g = connectRaw(path, f);
    const usedIdx = f.mem.readU16(f.driver.usedRing + 2);
    assert.equal(usedIdx, 0);
    const done = nextCall(g);
    await setUpRaw(g, { protocolFeatures: proto, inflight, base: usedIdx });
    await done;
    const results: { head: number; len: number }[] = [];
    for (let i = 0; i < 100 && results.length < 2; i++) {
      const u = g.driver.getUsed();
      if (u) results.push(u);
      else await new Promise((r) => setTimeout(r, 10));
    }
    assert.deepEqual(results.map((r) => r.len).sort(), [3, 4]);
    assert.equal(new Set(results.map((r) => r.head)).size, 2, "each request completed once");
    assert.deepEqual([...g.mem.read(0x200000, 4)], [0xff, 1, 2, 3]);
    assert.deepEqual([...g.mem.read(0x201000, 3)], [7, 8, 9]);
    await new Promise((r) => setTimeout(r, 100));
    assert.equal(g.driver.getUsed(), null, "a request was completed twice");
    assert.equal(region[16], 0, "X still marked in flight");
    view.close();
    inflightFd.close();
    g.close();
  } finally {
    first.kill("SIGKILL");
    second?.kill("SIGKILL");
  }
});

test("out-of-order completion before the crash: the in-flight head is resubmitted and the completed one is not redone", async () => {
  const path = tempSocketPath("inflight2");
  const proto = featureMask(ProtocolFeature.LOG_SHMFD, ProtocolFeature.REPLY_ACK, ProtocolFeature.INFLIGHT_SHMFD);
  const backend = await startBackend(path, false);
  const f = connectRaw(path);
  try {
    await setUpRaw(f, { protocolFeatures: proto });
    const got = await f.conn.request("GET_INFLIGHT_FD", { mmapSize: 0n, mmapOffset: 0n, numQueues: 1, queueSize: 64 });
    const desc = got?.payload as InflightDescription;
    const inflightFd = got?.fds[0];
    assert.ok(inflightFd);
    await f.conn.request("GET_VRING_BASE", { index: 0, num: 0 });
    // The state an asynchronous back-end leaves when it completed Y (head 1) but not X (head 0)
    // and then died: avail [X, Y], used [Y] (used idx 1), inflight: X in flight.
    f.mem.write(0x100000, Uint8Array.of(5, 5, 5, 5));
    f.mem.write(0x101000, Uint8Array.of(6, 6, 6));
    f.driver.add([{ addr: 0x100000, len: 4 }], [{ addr: 0x200000, len: 4 }]);
    f.driver.add([{ addr: 0x101000, len: 3 }], [{ addr: 0x201000, len: 3 }]);
    f.driver.publish();
    const used = f.driver.usedRing;
    f.mem.writeU32(used + 4, 1);
    f.mem.writeU32(used + 8, 3);
    f.mem.writeU16(used + 2, 1);
    const view = Mapping.map(inflightFd, Number(desc.mmapSize));
    const dv = new DataView((view.bytes(0, 64) as Uint8Array).buffer, 0, 64);
    dv.setUint16(8, 1, true); // version
    dv.setUint16(10, 64, true); // desc_num
    dv.setUint16(12, 1, true); // last_batch_head: Y
    dv.setUint16(14, 1, true); // used_idx recorded: 1 (consistent with the ring)
    dv.setUint8(16, 1); // desc[0] (X) in flight
    dv.setUint32(16 + 8, 1, true); // its counter
    // The driver's used_event is stale (0: it never saw Y's completion signalled, as when a
    // back-end dies between publishing and signalling). Event-idx suppression alone would never
    // notify it again: the new back-end must interrupt once when it takes the ring over.
    const called = nextCall(f);
    await setUpRaw(f, {
      protocolFeatures: proto,
      inflight: { fd: inflightFd, size: desc.mmapSize, numQueues: 1, queueSize: 64 },
      base: 1,
    });
    await Promise.race([
      called,
      new Promise((_, reject) =>
        setTimeout(() => reject(new Error("the guest was never interrupted after the takeover")), 3000),
      ),
    ]);
    await new Promise((r) => setTimeout(r, 100));
    assert.equal(f.mem.readU16(used + 2), 2, "exactly one more completion");
    assert.equal(f.mem.readU32(used + 4 + 8), 0, "the second used element is X");
    assert.deepEqual([...f.mem.read(0x200000, 4)], [5, 5, 5, 5]);
    assert.deepEqual([...f.mem.read(0x201000, 3)], [0, 0, 0], "Y was done again");
    view.close();
    inflightFd.close();
  } finally {
    f.close();
    backend.kill("SIGKILL");
  }
});

test("the vmshift front-end drives the restart itself (getInflight / setInflight): the held request is resubmitted once", async () => {
  const { GuestMemory } = await import("../../src/memory/guest-memory.js");
  const { GuestMemoryRegion } = await import("../../src/memory/region.js");
  const { VhostUserFrontend } = await import("../../src/vhost-user/frontend/frontend.js");
  const { SplitQueueDriver } = await import("../../src/virtio/driver.js");
  const { VirtioFeature } = await import("../../src/vhost-user/protocol/constants.js");
  const VERSION_1 = featureMask(VirtioFeature.VIRTIO_F_VERSION_1);
  const path = tempSocketPath("inflight3");
  const memory = new GuestMemory([GuestMemoryRegion.memfd(0, 4 * 1024 * 1024)]);
  const first = await startBackend(path, true);
  let second: ChildProcess | null = null;
  const life = async () => {
    const fe = VhostUserFrontend.connect(path, { timeoutMs: 5000 });
    await fe.start({ memory, features: VERSION_1 });
    return fe;
  };
  try {
    const fe = await life();
    assert.ok(fe.hasProtocolFeature(ProtocolFeature.INFLIGHT_SHMFD));
    const inflight = await fe.getInflight(1, 64);
    assert.ok(inflight, "the blk back-end tracks inflight I/O");
    await fe.setInflight(inflight);
    const q = SplitQueueDriver.at(memory, 0x1000, 64, { features: VERSION_1 });
    await fe.startVring(0, q.layout);
    memory.write(0x100000, Uint8Array.of(0xff, 1, 2, 3)); // held for ever by this life
    memory.write(0x101000, Uint8Array.of(7, 8, 9));
    q.add([{ addr: 0x100000, len: 4 }], [{ addr: 0x200000, len: 4 }]);
    q.add([{ addr: 0x101000, len: 3 }], [{ addr: 0x201000, len: 3 }]);
    if (q.publish()) fe.kick(0);
    const view = Mapping.map(inflight.fd, Number(inflight.mmapSize));
    const region = view.bytes(0, 32) as Uint8Array;
    for (let i = 0; i < 500 && region[16] !== 1; i++) await new Promise((r) => setTimeout(r, 10));
    assert.equal(region[16], 1, "the first request is in flight");
    first.kill("SIGKILL");
    await new Promise((r) => first.once("exit", r));
    fe.close();

    second = await startBackend(path, false);
    const fe2 = await life();
    await fe2.setInflight(inflight);
    await fe2.startVring(0, q.layout, memory.readU16(q.usedRing + 2));
    const lens: number[] = [];
    const deadline = Date.now() + 5000;
    while (lens.length < 2 && Date.now() < deadline) {
      const u = q.getUsed();
      if (u) lens.push(u.len);
      else await new Promise((r) => setTimeout(r, 5));
    }
    assert.deepEqual(lens.sort(), [3, 4], "both requests completed");
    assert.deepEqual([...memory.read(0x200000, 4)], [0xff, 1, 2, 3]);
    assert.deepEqual([...memory.read(0x201000, 3)], [7, 8, 9]);
    await new Promise((r) => setTimeout(r, 50));
    assert.equal(q.getUsed(), null, "nothing completed twice");
    view.close();
    inflight.fd.close();
    fe2.close();
  } finally {
    first.kill("SIGKILL");
    second?.kill("SIGKILL");
    memory.close();
  }
});
