/**
 * vhost-user with packed rings, end to end between the vmshift front-end (PackedQueueDriver) and
 * a framework back-end in a child process: VIRTIO_F_RING_PACKED offered and negotiated,
 * requests through several laps of the ring, GET_VRING_BASE in vhost-user's packed encoding
 * (avail index and wrap counter low, used ones high) and a restart from it; dirty logging (the
 * used descriptor's page, the device area's, the written buffer's; not what is only read); and a back-end
 * killed with a request in flight, whose successor resubmits it from the packed inflight region.
 */
import assert from "node:assert/strict";
import { type ChildProcess, spawn } from "node:child_process";
import { test } from "node:test";
import { fileURLToPath } from "node:url";
import { GuestMemory } from "../../src/memory/guest-memory.js";
import { GuestMemoryRegion } from "../../src/memory/region.js";
import { Mapping } from "../../src/sys/mapping.js";
import { PACKED_HEADER } from "../../src/vhost-user/backend/inflight-packed.js";
import { VhostUserFrontend } from "../../src/vhost-user/frontend/frontend.js";
import { featureMask, ProtocolFeature, VirtioFeature } from "../../src/vhost-user/protocol/constants.js";
import { PackedQueueDriver } from "../../src/virtio/packed-driver.js";
import { decodePackedVringBase, encodePackedVringBase } from "../../src/virtio/packed-ring.js";
import { tempSocketPath } from "../helpers/temp-socket.js";

const GATE = fileURLToPath(new URL("../helpers/gate-device.js", import.meta.url));
const VERSION_1 = featureMask(VirtioFeature.VIRTIO_F_VERSION_1);
const PACKED = featureMask(VirtioFeature.VIRTIO_F_RING_PACKED);
const EVENT_IDX = featureMask(VirtioFeature.VIRTIO_RING_F_EVENT_IDX);
const INDIRECT = featureMask(VirtioFeature.VIRTIO_RING_F_INDIRECT_DESC);

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

async function life(path: string, memory: GuestMemory, features: bigint): Promise<VhostUserFrontend> {
  const fe = VhostUserFrontend.connect(path, { timeoutMs: 5000 });
  const n = await fe.negotiate();
  assert.ok((n.features & PACKED) !== 0n, "the back-end offers VIRTIO_F_RING_PACKED");
  await fe.setOwner();
  await fe.setFeatures(features);
  await fe.setMemTable(memory);
  return fe;
}

/** Collects `n` used descriptors (the back-end completes asynchronously to us). */
async function collect(q: PackedQueueDriver, n: number): Promise<{ head: number; len: number }[]> {
  const out: { head: number; len: number }[] = [];
  const deadline = Date.now() + 5000;
  while (out.length < n && Date.now() < deadline) {
    const u = q.getUsed();
    if (u) out.push(u);
    else await new Promise((r) => setTimeout(r, 2));
  }
  return out;
}

test("a packed ring through several laps, GET_VRING_BASE in the packed encoding, and a restart from it", async () => {
  const path = tempSocketPath("packed");
  const memory = new GuestMemory([GuestMemoryRegion.memfd(0, 4 * 1024 * 1024)]);
  const backend = await startBackend(path, false);
  try {
    const f = VERSION_1 | PACKED | EVENT_IDX | INDIRECT;
    const fe = await life(path, memory, f);
    const q = PackedQueueDriver.at(memory, 0x1000, 16, {
      features: f,
      indirectTables: { address: 0x8000, entries: 4 },
    });
    await fe.startVring(0, q.layout);
    // 40 requests of 1-3 descriptors (or one indirect) through a ring of 16: the wrap counters flip.
    for (let i = 0; i < 40; i++) {
      const data = Uint8Array.of(i, i + 1, i + 2, i + 3, i + 4, i + 5);
      memory.write(0x100000, data);
      const split = i % 3;
      const readable =
        split === 0
          ? [{ addr: 0x100000, len: 6 }]
          : [
              { addr: 0x100000, len: 2 },
              { addr: 0x100002, len: 4 },
            ];
      const writable =
        split === 2
          ? [
              { addr: 0x200000, len: 3 },
              { addr: 0x200003, len: 3 },
            ]
          : [{ addr: 0x200000, len: 6 }];
      q.add(readable, writable, { indirect: i % 4 === 3 });
      if (q.publish()) fe.kick(0);
      const [u] = await collect(q, 1);
      assert.equal(u?.len, 6, `request ${i}`);
      assert.deepEqual([...memory.read(0x200000, 6)], [...data], `request ${i}`);
    }
    const base = await fe.stopVring(0);
    assert.deepEqual(decodePackedVringBase(base), q.position, "GET_VRING_BASE = the driver's positions");
    assert.equal(base, encodePackedVringBase(q.position));
    // Restart from that base (what QEMU does across a stop/start) and go on.
    await fe.startVring(0, q.layout, base);
    for (let i = 0; i < 20; i++) {
      memory.write(0x100000, Uint8Array.of(9, i));
      q.add([{ addr: 0x100000, len: 2 }], [{ addr: 0x200000, len: 2 }]);
      if (q.publish()) fe.kick(0);
      const [u] = await collect(q, 1);
      assert.equal(u?.len, 2);
      assert.deepEqual([...memory.read(0x200000, 2)], [9, i]);
    }
    fe.close();
  } finally {
    backend.kill("SIGKILL");
    memory.close();
  }
});

test("dirty logging on a packed ring: the used descriptor's page, the device area's page and the buffer, not the driver area", async () => {
  const path = tempSocketPath("packed-log");
  const memory = new GuestMemory([GuestMemoryRegion.memfd(0, 4 * 1024 * 1024)]);
  const backend = await startBackend(path, false);
  try {
    const f = VERSION_1 | PACKED | EVENT_IDX;
    const fe = await life(path, memory, f);
    // The three parts on pages of their own: 3 (ring), 5 (driver area), 6 (device area).
    const q = new PackedQueueDriver(memory, {
      size: 16,
      descRing: 0x3000,
      driverArea: 0x5000,
      deviceArea: 0x6000,
      features: f,
    });
    await fe.startVring(0, q.layout);
    await fe.startLogging();
    memory.write(0x100000, Uint8Array.of(1, 2, 3));
    q.add([{ addr: 0x100000, len: 3 }], [{ addr: 0x240000, len: 3 }]);
    if (q.publish()) fe.kick(0);
    assert.deepEqual(
      (await collect(q, 1)).map((u) => u.len),
      [3],
    );
    const frames = new Set<number>();
    await fe.stopLogging({
      markRange: (gpa, len) => {
        for (let p = Math.floor(gpa / 4096); p * 4096 < gpa + len; p++) frames.add(p);
      },
      markFrames: (fr) => {
        for (const x of Array.from(fr)) frames.add(x);
      },
    });
    assert.ok(frames.has(0x240), `the buffer's page: ${[...frames]}`);
    assert.ok(frames.has(3), `the used descriptor's page of the ring: ${[...frames]}`);
    assert.ok(frames.has(6), `the device area's page: ${[...frames]}`);
    assert.ok(!frames.has(5), "the driver area is only read");
    assert.ok(!frames.has(0x100), "the readable buffer is only read");
    fe.close();
  } finally {
    backend.kill("SIGKILL");
    memory.close();
  }
});

test("packed inflight: a back-end killed with a request in flight; the next one resubmits it once", async () => {
  const path = tempSocketPath("packed-inflight");
  const memory = new GuestMemory([GuestMemoryRegion.memfd(0, 4 * 1024 * 1024)]);
  const first = await startBackend(path, true);
  let second: ChildProcess | null = null;
  try {
    const f = VERSION_1 | PACKED | EVENT_IDX;
    const fe = await life(path, memory, f);
    assert.ok(fe.hasProtocolFeature(ProtocolFeature.INFLIGHT_SHMFD));
    const inflight = await fe.getInflight(1, 16);
    assert.ok(inflight, "the back-end offers an inflight region");
    await fe.setInflight(inflight);
    const q = PackedQueueDriver.at(memory, 0x1000, 16, { features: f });
    await fe.startVring(0, q.layout);
    // Some traffic first, so the positions are not at the start of the ring.
    for (let i = 0; i < 21; i++) {
      q.add(
        [
          { addr: 0x102000, len: 1 },
          { addr: 0x102001, len: 1 },
        ],
        [{ addr: 0x202000, len: 2 }],
      );
      if (q.publish()) fe.kick(0);
      assert.equal((await collect(q, 1)).length, 1);
    }
    memory.write(0x100000, Uint8Array.of(0xff, 1, 2, 3)); // held for ever by this life
    memory.write(0x101000, Uint8Array.of(7, 8, 9));
    q.add([{ addr: 0x100000, len: 4 }], [{ addr: 0x200000, len: 4 }]);
    q.add(
      [
        { addr: 0x101000, len: 2 },
        { addr: 0x101002, len: 1 },
      ],
      [{ addr: 0x201000, len: 3 }],
    );
    if (q.publish()) fe.kick(0);
    const view = Mapping.map(inflight.fd, Number(inflight.mmapSize));
    const region = view.bytes(0, Number(inflight.mmapSize)) as Uint8Array;
    const anyInFlight = () => {
      for (let e = 0; e < 16; e++) if (region[PACKED_HEADER + 32 * e] === 1) return true;
      return false;
    };
    for (let i = 0; i < 500 && !anyInFlight(); i++) await new Promise((r) => setTimeout(r, 10));
    assert.ok(anyInFlight(), "the held request is recorded in flight");
    first.kill("SIGKILL");
    await new Promise((r) => first.once("exit", r));
    fe.close();

    second = await startBackend(path, false);
    const fe2 = await life(path, memory, f);
    await fe2.setInflight(inflight);
    // What QEMU sends after a crash is stale for a packed ring (there is no used index in guest
    // memory to take it from): the region, not this base, says where to resume.
    await fe2.startVring(0, q.layout, 0x8000_8000);
    const got = await collect(q, 2);
    assert.deepEqual(got.map((u) => u.len).sort(), [3, 4], "both requests completed");
    assert.deepEqual([...memory.read(0x200000, 4)], [0xff, 1, 2, 3]);
    assert.deepEqual([...memory.read(0x201000, 3)], [7, 8, 9]);
    // And the ring goes on from there.
    q.add([{ addr: 0x101000, len: 3 }], [{ addr: 0x203000, len: 3 }]);
    if (q.publish()) fe2.kick(0);
    assert.deepEqual(
      (await collect(q, 1)).map((u) => u.len),
      [3],
    );
    assert.equal(q.getUsed(), null, "nothing completed twice");
    assert.equal(anyInFlight(), false);
    view.close();
    inflight.fd.close();
    fe2.close();
  } finally {
    first.kill("SIGKILL");
    second?.kill("SIGKILL");
    memory.close();
  }
});
