/**
 * The backend framework driven over a real unix socket by a hand-rolled front-end (raw
 * protocol messages through Connection), with real memfd guest memory, real eventfds, and the
 * echo device processing requests in its queue worker thread.
 */
import assert from "node:assert/strict";
import { readdirSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, test } from "node:test";
import { echoDevice } from "../../src/devices/examples/echo.js";
import type { GuestMemoryRegion } from "../../src/memory/region.js";
import { DirtyLogArea } from "../../src/memory/shared-dirty-log.js";
import { EventFd } from "../../src/sys/eventfd.js";
import { UnixSocket } from "../../src/sys/unix-socket.js";
import { VhostUserDaemon } from "../../src/vhost-user/backend/daemon.js";
import {
  featureMask,
  ProtocolFeature,
  VHOST_VRING_F_LOG,
  VirtioFeature,
} from "../../src/vhost-user/protocol/constants.js";
import { VhostUserError } from "../../src/vhost-user/protocol/errors.js";
import { features, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX } from "../../src/virtio/features.js";
import { connectRaw, echoRaw, type RawFrontend, setUpRaw } from "./raw-frontend.js";

const PATH = join(tmpdir(), `vmshift-backend-${process.pid}.sock`);
const MiB = 1024 * 1024;
let daemon: VhostUserDaemon;
let serving: Promise<void>;
const logs: string[] = [];

const fdCount = () => readdirSync("/proc/self/fd").length;
let fdsBefore = 0;

before(() => {
  fdsBefore = fdCount();
  daemon = VhostUserDaemon.listen(echoDevice({ queues: 2, config: new Uint8Array([1, 2, 3, 4, 5, 6, 7, 8]) }), PATH);
  daemon.on("log", (level, msg) => logs.push(`${level}: ${msg}`));
  serving = daemon.serve();
});

after(async () => {
  await daemon.close();
  await serving;
});

type Frontend = RawFrontend;

const connect = async (): Promise<Frontend> => connectRaw(PATH);

/** Negotiation checks for a 2-queue device with a config space, then the common set-up. */
async function setUp(f: Frontend): Promise<void> {
  const offered = (await f.conn.request("GET_FEATURES", undefined as never))?.payload as bigint;
  assert.ok(offered & featureMask(VirtioFeature.VHOST_USER_F_PROTOCOL_FEATURES));
  assert.ok(offered & featureMask(VirtioFeature.VHOST_F_LOG_ALL));
  const proto = (await f.conn.request("GET_PROTOCOL_FEATURES", undefined as never))?.payload as bigint;
  const want = featureMask(
    ProtocolFeature.LOG_SHMFD,
    ProtocolFeature.REPLY_ACK,
    ProtocolFeature.MQ,
    ProtocolFeature.CONFIG,
  );
  assert.equal(proto & want, want, "MQ and CONFIG are offered for a 2-queue device with a config space");
  await setUpRaw(f, { protocolFeatures: want });
}

const echo = echoRaw;

test("echo round trips through the queue worker; config space; GET_VRING_BASE stops the ring", async () => {
  const f = await connect();
  try {
    await setUp(f);
    const out = await echo(f, new TextEncoder().encode("hello, vhost-user"), 0x100000, 0x200000);
    assert.equal(new TextDecoder().decode(out), "hello, vhost-user");
    for (let i = 0; i < 50; i++) {
      const data = Uint8Array.from({ length: 100 + i }, (_, k) => (k * 7 + i) & 0xff);
      assert.deepEqual(await echo(f, data, 0x100000 + i * 4096, 0x300000), data);
    }
    const cfg = await f.conn.request("GET_CONFIG", { offset: 2, flags: 0, data: new Uint8Array(4) });
    assert.deepEqual([...(cfg?.payload as { data: Uint8Array } | undefined)!.data], [3, 4, 5, 6]);
    await f.conn.request("SET_CONFIG", { offset: 0, flags: 0, data: Uint8Array.of(9) });
    const cfg2 = await f.conn.request("GET_CONFIG", { offset: 0, flags: 0, data: new Uint8Array(2) });
    assert.deepEqual([...(cfg2?.payload as { data: Uint8Array } | undefined)!.data], [9, 2]);
    const base = await f.conn.request("GET_VRING_BASE", { index: 0, num: 0 });
    assert.deepEqual(base?.payload, { index: 0, num: 51 });
    assert.equal((await f.conn.request("GET_QUEUE_NUM", undefined as never))?.payload, 2n);
  } finally {
    f.close();
  }
  await new Promise((r) => setTimeout(r, 50));
});

test("bad control messages get a NACK, and the session goes on", async () => {
  const f = await connect();
  try {
    await setUp(f);
    const nack = (p: Promise<unknown>) =>
      assert.rejects(p, (e: unknown) => e instanceof VhostUserError && e.code === "NACK");
    await nack(f.conn.request("SET_VRING_NUM", { index: 7, num: 64 })); // no such queue
    await nack(f.conn.request("SET_VRING_NUM", { index: 1, num: 100 })); // not a power of two
    await nack(f.conn.request("SET_VRING_NUM", { index: 1, num: 4096 })); // above the device maximum
    await nack(f.conn.request("SET_FEATURES", 1n << 60n)); // not offered
    // Ring in memory the back-end does not have: refused when the ring starts.
    await f.conn.request("SET_VRING_NUM", { index: 1, num: 16 });
    await f.conn.request("SET_VRING_ADDR", {
      index: 1,
      flags: 0,
      descriptor: 0x1234n,
      used: 0x5678n,
      available: 0x9abcn,
      log: 0n,
    });
    const k = new EventFd();
    await nack(f.conn.request("SET_VRING_KICK", { index: 1, noFd: false }, { fds: [k.fd] }));
    k.close();
    // Overlapping regions in a memory table.
    const r = f.mem.regions[0] as GuestMemoryRegion;
    const desc = { guestAddress: 0n, size: BigInt(r.size), userAddress: r.hostAddress, mmapOffset: 0n };
    await nack(
      f.conn.request(
        "SET_MEM_TABLE",
        { regions: [desc, { ...desc, guestAddress: 4096n }] },
        { fds: [r.backing.fd!, r.backing.fd!] },
      ),
    );
    // Still serving, with the old memory table intact.
    const out = await echo(f, Uint8Array.of(1, 2, 3), 0x100000, 0x200000);
    assert.deepEqual([...out], [1, 2, 3]);
  } finally {
    f.close();
  }
  await new Promise((r) => setTimeout(r, 50));
});

test("dirty logging: written buffers and the used ring are marked; a replaced log is never marked again; LOG_ALL off stops marking", async () => {
  const f = await connect();
  try {
    await setUp(f);
    const LOG_ALL = featureMask(VirtioFeature.VHOST_F_LOG_ALL);
    const base =
      features(VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX) | featureMask(VirtioFeature.VHOST_USER_F_PROTOCOL_FEATURES);
    const logA = DirtyLogArea.create(4 * MiB);
    await f.conn.request(
      "SET_LOG_BASE",
      { mmapSize: BigInt(logA.size), mmapOffset: 0n },
      { fds: [logA.fd!], needReply: false, expectReply: true },
    );
    await f.conn.request("SET_FEATURES", base | LOG_ALL);
    const d = f.driver;
    await f.conn.request("SET_VRING_ADDR", {
      index: 0,
      flags: VHOST_VRING_F_LOG,
      descriptor: f.uva(d.descTable),
      used: f.uva(d.usedRing),
      available: f.uva(d.availRing),
      log: BigInt(d.usedRing),
    });
    logA.take();
    await echo(f, new Uint8Array(5000), 0x100000, 0x2ff000); // 5000 bytes written from 0x2ff000: pages 0x2ff, 0x300
    const usedPage = Math.floor(d.usedRing / 4096);
    assert.deepEqual(
      [...logA.take()].sort((a, b) => a - b),
      [usedPage, 0x2ff, 0x300].sort((a, b) => a - b),
    );
    // Replace the log (QEMU grows it): after the reply nothing lands in the old one.
    const logB = DirtyLogArea.create(8 * MiB);
    await f.conn.request(
      "SET_LOG_BASE",
      { mmapSize: BigInt(logB.size), mmapOffset: 0n },
      { fds: [logB.fd!], needReply: false, expectReply: true },
    );
    // Marks of the last request may land in A up to the reply (the worker marks after writing);
    // from the reply on, none may.
    logA.take();
    await echo(f, new Uint8Array(10), 0x100000, 0x280000);
    assert.deepEqual(logA.peek(), [], "the replaced log was marked");
    assert.ok(logB.isDirty(0x280000));
    // Migration cancelled: LOG_ALL cleared, marking stops.
    logB.take();
    await f.conn.request("SET_FEATURES", base);
    await echo(f, new Uint8Array(10), 0x100000, 0x290000);
    assert.deepEqual(logB.peek(), [], "marked after LOG_ALL was cleared");
    logA.close();
    logB.close();
  } finally {
    f.close();
  }
  await new Promise((r) => setTimeout(r, 50));
});

test("the daemon takes the next front-end after a disconnect, and a malformed stream only costs that connection", async () => {
  const raw = UnixSocket.connect(PATH);
  // A header announcing a 1 MiB payload: beyond any real message.
  await raw.send(Uint8Array.from([1, 0, 0, 0, 1, 0, 0, 0, 0, 0, 16, 0]));
  await new Promise<void>((resolve) =>
    raw.startReceiving(
      () => undefined,
      () => resolve(),
    ),
  );
  raw.close();
  const f = await connect();
  try {
    await setUp(f);
    assert.deepEqual([...(await echo(f, Uint8Array.of(42), 0x100000, 0x200000))], [42]);
  } finally {
    f.close();
  }
  await new Promise((r) => setTimeout(r, 100));
  // Wait for the daemon to finish tearing the session down, then count fds.
  for (let i = 0; i < 50 && daemon.session; i++) await new Promise((r) => setTimeout(r, 20));
  assert.equal(fdCount(), fdsBefore + 1, "fds leaked (the +1 is the daemon's listening socket)");
});
