/**
 * Issue 12, items 2 and 3: a peer that hoards fds through the framing, and a peer that abuses
 * the device-state transfer. Each attack is performed for real over a unix socket; the
 * assertions are the harmless outcome: the fd count back to its baseline, the transfer bounded
 * in size and time, and the daemon serving the next front-end.
 */
import assert from "node:assert/strict";
import { openSync, unlinkSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, test } from "node:test";
import { GuestMemory } from "../../src/memory/guest-memory.js";
import { GuestMemoryRegion } from "../../src/memory/region.js";
import { EventFd } from "../../src/sys/eventfd.js";
import { Fd } from "../../src/sys/fd.js";
import { UnixSocket } from "../../src/sys/unix-socket.js";
import { VhostUserDaemon } from "../../src/vhost-user/backend/daemon.js";
import type { RawMessage } from "../../src/vhost-user/connection.js";
import { VhostUserFrontend } from "../../src/vhost-user/frontend/frontend.js";
import { featureMask, ProtocolFeature, VirtioFeature } from "../../src/vhost-user/protocol/constants.js";
import { VhostUserError } from "../../src/vhost-user/protocol/errors.js";
import { FRONTEND_INDEX } from "../../src/vhost-user/protocol/frontend-requests.js";
import { encodeRequest } from "../../src/vhost-user/protocol/message.js";
import { U64 } from "../../src/vhost-user/protocol/payloads.js";
import { SplitQueueDriver } from "../../src/virtio/driver.js";
import { countFds } from "../helpers/proc.js";
import { statefulDevice } from "../helpers/stateful-device.js";
import { header, hex } from "./fixtures.js";
import { Peer } from "./malformed-peer.js";

const PATH = join(tmpdir(), `vmshift-hostile-${process.pid}.sock`);
const DEADLINE_MS = 400;
const MAX_STATE = 64 * 1024;
let daemon: VhostUserDaemon;
let serving: Promise<void>;
let fdsBase = 0;
// With a config space, so the Peer's handshake (which negotiates CONFIG) is served.
const device = { ...statefulDevice(), getConfig: (_offset: number, size: number) => new Uint8Array(size) };

before(() => {
  fdsBase = countFds();
  daemon = VhostUserDaemon.listen(device, PATH);
  daemon.on("log", () => undefined);
  serving = daemon.serve({ session: { deviceStateTimeoutMs: DEADLINE_MS, maxDeviceStateBytes: MAX_STATE } });
});

after(async () => {
  await daemon.close();
  await serving;
});

/** Waits until the daemon has no session, then checks the fds are back to the baseline (+ the listener). */
async function settled(what: string, extra = 0): Promise<void> {
  for (let i = 0; i < 400 && daemon.session; i++) await new Promise((r) => setTimeout(r, 5));
  assert.equal(countFds(), fdsBase + 1 + extra, `${what}: fds not back to the baseline`);
}

/** A well-behaved front-end is served after the attack. */
async function nextFrontendServed(): Promise<void> {
  const p = new Peer(PATH);
  try {
    await p.handshake(true);
    await p.echo(7);
  } finally {
    p.close();
  }
}

/** Resolves when the daemon hangs up on `s`. */
function hangUp(s: UnixSocket): Promise<void> {
  return new Promise((resolve) =>
    s.startReceiving(
      () => undefined,
      () => resolve(),
    ),
  );
}

test("framing: a 4096-byte header then 1-byte sends each with 8 fds: dropped at the first, every fd closed", async () => {
  const s = UnixSocket.connect(PATH);
  const fds = Array.from({ length: 8 }, () => new EventFd());
  const before = countFds();
  try {
    let isGone = false;
    const gone = hangUp(s).then(() => {
      isGone = true;
    });
    await s.send(hex(header(5, 1, 4096))); // SET_MEM_TABLE announcing 4 KiB
    for (let sent = 0; sent < 1000 && !isGone; sent++) {
      try {
        await s.send(
          Uint8Array.of(0),
          fds.map((f) => f.fd),
        );
      } catch {
        break; // EPIPE: the daemon hung up
      }
      await new Promise((r) => setImmediate(r));
    }
    await gone;
    // The daemon holds none of the fds it was sent: only ours (8 eventfds + the socket) remain.
    assert.ok(countFds() <= before, `the daemon holds ${countFds() - before} fds`);
  } finally {
    s.close();
    for (const f of fds) f.close();
  }
  await settled("header + fd bytes");
  await nextFrontendServed();
  await settled("next front-end");
});

test("framing: more than 8 fds on one message drops the peer", async () => {
  const s = UnixSocket.connect(PATH);
  try {
    const gone = hangUp(s);
    const fds = Array.from({ length: 8 }, () => new EventFd());
    const m = encodeRequest(FRONTEND_INDEX, "SET_OWNER", undefined).bytes;
    // 8 fds on the header's first 6 bytes, 8 more on the rest of it: 16 on one message.
    await s.send(
      m.subarray(0, 6),
      fds.map((f) => f.fd),
    );
    await s
      .send(
        m.subarray(6),
        fds.map((f) => f.fd),
      )
      .catch(() => undefined);
    await gone;
    for (const f of fds) f.close();
  } finally {
    s.close();
  }
  await settled("16 fds on one message");
  await nextFrontendServed();
});

test("framing: requests queued behind a blocked CHECK_DEVICE_STATE stay in the socket, not in the daemon", async () => {
  const p = new Peer(PATH);
  const [mine, theirs] = UnixSocket.pair();
  const call = new EventFd();
  try {
    await p.handshake(true);
    // A load transfer whose writer we hold open: CHECK_DEVICE_STATE waits for its end.
    const r = await p.request("SET_DEVICE_STATE_FD", { direction: 1, phase: 0 }, [theirs.fd]);
    theirs.close();
    assert.equal(U64.decode(r.payload, "SET_DEVICE_STATE_FD"), 0x100n);
    const before = countFds();
    await p.send(encodeRequest(FRONTEND_INDEX, "CHECK_DEVICE_STATE", undefined).bytes);
    // Then as many SET_VRING_CALL (each with an fd) as the socket takes, without waiting.
    const msg = encodeRequest(
      FRONTEND_INDEX,
      "SET_VRING_CALL",
      { index: 0, noFd: false },
      { needReply: true, fds: [call.fd] },
    ).bytes;
    let queued = 0;
    while (queued < 2000) {
      const n = p.socket.trySend(msg, [call.fd]);
      if (n === null) break;
      if (n < msg.length) await p.send(msg.subarray(n));
      queued++;
    }
    assert.ok(queued > 8, `only ${queued} messages went out`);
    // The daemon reads at most what came with the chunk it was handling: a handful, not `queued`.
    assert.ok(countFds() - before <= 8, `daemon holds ${countFds() - before} fds of ${queued} messages`);
    // The transfer's deadline answers CHECK_DEVICE_STATE (a failure: no EOF came), then the rest is served.
    const check = await p.next();
    assert.notEqual(check, "closed");
    assert.equal((check as RawMessage).header.request, FRONTEND_INDEX.byName("CHECK_DEVICE_STATE").code);
    assert.equal(U64.decode((check as RawMessage).payload, "CHECK_DEVICE_STATE"), 1n);
    for (let i = 0; i < queued; i++) {
      const a = await p.next();
      assert.notEqual(a, "closed");
      assert.equal(U64.decode((a as RawMessage).payload, "SET_VRING_CALL"), 0n);
    }
    await p.request("SET_VRING_CALL", { index: 0, noFd: false }, [p.call.fd]);
    await p.echo(3);
  } finally {
    mine.close();
    call.close();
    p.close();
  }
  await settled("blocked queue");
});

test("device state: a regular file as the transfer fd is refused (0x101) and closed; the session goes on", async () => {
  const file = join(tmpdir(), `vmshift-hostile-state-${process.pid}`);
  writeFileSync(file, "not a pipe");
  const p = new Peer(PATH);
  try {
    await p.handshake(true);
    const fd = new Fd(openSync(file, "r+"));
    const before = countFds();
    const r = await p.request("SET_DEVICE_STATE_FD", { direction: 0, phase: 0 }, [fd]);
    fd.close();
    assert.equal(U64.decode(r.payload, "SET_DEVICE_STATE_FD"), 0x101n, "status 1, no fd");
    assert.equal(r.fds.length, 0);
    assert.equal(countFds(), before - 1, "the daemon did not keep the file's fd");
    await p.echo(1);
  } finally {
    p.close();
    unlinkSync(file);
  }
  await settled("regular file");
});

test("device state: a load larger than the cap is cut off; CHECK_DEVICE_STATE fails; the next transfer works", async () => {
  const memory = new GuestMemory([GuestMemoryRegion.memfd(0, 4 << 20)]);
  const fe = VhostUserFrontend.connect(PATH, { timeoutMs: 5000 });
  try {
    await fe.start({
      memory,
      features: featureMask(VirtioFeature.VIRTIO_F_VERSION_1),
      rings: [SplitQueueDriver.at(memory, 0x1000, 16).layout],
    });
    assert.ok(fe.hasProtocolFeature(ProtocolFeature.DEVICE_STATE));
    await fe.stopVring(0);
    await assert.rejects(fe.loadDeviceState(new Uint8Array(16 * MAX_STATE)), (e: unknown) => {
      assert.ok(e instanceof VhostUserError, String(e));
      return true;
    });
    // The connection may have lost its transfer, not its session.
    const state = await fe.saveDeviceState();
    assert.equal(state.byteLength, 12);
    await fe.loadDeviceState(state);
  } finally {
    fe.close();
    memory.close();
  }
  await settled("oversized load");
});

test("device state: a writer that never finishes is cut off at the deadline", async () => {
  const p = new Peer(PATH);
  const [mine, theirs] = UnixSocket.pair();
  try {
    await p.handshake(true);
    await p.request("SET_DEVICE_STATE_FD", { direction: 1, phase: 0 }, [theirs.fd]);
    theirs.close();
    await mine.send(Uint8Array.of(1, 2, 3)); // some state, then nothing, never EOF
    const t0 = Date.now();
    const r = await p.request("CHECK_DEVICE_STATE", undefined);
    assert.equal(U64.decode(r.payload, "CHECK_DEVICE_STATE"), 1n, "reported as failed");
    assert.ok(Date.now() - t0 < DEADLINE_MS + 2000, "within the deadline");
    await p.echo(2);
  } finally {
    mine.close();
    p.close();
  }
  await settled("endless writer");
});

test("front-end: a back-end feeding a reply byte by byte with fds is dropped; its fds are closed", async () => {
  const [a, b] = UnixSocket.pair();
  const fe = new VhostUserFrontend(a, { timeoutMs: 5000 });
  const fds = Array.from({ length: 8 }, () => new EventFd());
  const before = countFds();
  try {
    const features = fe.getFeatures();
    features.catch(() => undefined);
    await b.send(hex(header(1, 5, 4096))); // a GET_FEATURES "reply" announcing 4 KiB
    for (let i = 0; i < 100; i++) {
      if (fe.closed) break;
      await b
        .send(
          Uint8Array.of(0),
          fds.map((f) => f.fd),
        )
        .catch(() => undefined);
      await new Promise((r) => setImmediate(r));
    }
    await assert.rejects(features, (e: unknown) => e instanceof VhostUserError);
    assert.ok(fe.closed, "the front-end dropped the back-end");
    assert.ok(countFds() <= before, `the front-end holds ${countFds() - before} of the back-end's fds`);
  } finally {
    fe.close();
    b.close();
    for (const f of fds) f.close();
  }
});

test("front-end: a back-end's device state above the limit or past the deadline is refused", async () => {
  const slow = statefulDevice();
  const big = { ...slow, saveState: () => new Uint8Array(4 << 20) };
  const never = { ...slow, saveState: () => new Promise<Uint8Array>(() => undefined) };
  for (const [name, dev, check] of [
    ["oversized", big, "PAYLOAD_TOO_LARGE"],
    ["endless", never, "TIMEOUT"],
  ] as const) {
    const path = join(tmpdir(), `vmshift-hostile-${process.pid}-${name}.sock`);
    const d = VhostUserDaemon.listen(dev, path);
    d.on("log", () => undefined);
    const s = d.serve();
    const fe = VhostUserFrontend.connect(path, {
      timeoutMs: 5000,
      protocolFeatures: featureMask(ProtocolFeature.DEVICE_STATE, ProtocolFeature.REPLY_ACK),
    });
    try {
      await fe.negotiate();
      await assert.rejects(fe.saveDeviceState({ maxBytes: 1 << 20, timeoutMs: 300 }), (e: unknown) => {
        assert.ok(e instanceof VhostUserError && e.code === check, `${name}: ${String(e)}`);
        return true;
      });
    } finally {
      fe.close();
      await d.close();
      await s;
    }
  }
});
