/**
 * VhostUserFrontend against scripted peers over a socket pair: which requests wait for a reply
 * (exactly what the negotiated features promise), the SET_LOG_BASE deadline, a hang-up mid-request,
 * the PROTOCOL_FEATURES rule for SET_VRING_ENABLE, memory without an fd, and fd hygiene.
 */
import assert from "node:assert/strict";
import { test } from "node:test";
import { GuestMemory } from "../../src/memory/guest-memory.js";
import { GuestMemoryRegion } from "../../src/memory/region.js";
import { UnixSocket } from "../../src/sys/unix-socket.js";
import { Connection } from "../../src/vhost-user/connection.js";
import { FrontendError } from "../../src/vhost-user/frontend/errors.js";
import { VhostUserFrontend } from "../../src/vhost-user/frontend/frontend.js";
import {
  type FrontendRequests,
  featureMask,
  ProtocolFeature,
  type RequestMessage,
  VhostUserError,
  VirtioFeature,
} from "../../src/vhost-user/protocol/index.js";
import { openFdCount } from "./fixtures.js";

interface Seen {
  name: string;
  needReply: boolean;
  fds: number;
  payload: unknown;
}

interface PeerScript {
  features: bigint;
  protocol?: bigint;
  /** Requests the peer never answers. */
  silentOn?: string[];
  /** The peer hangs up when it receives this request. */
  hangUpOn?: string;
}

/** A backend that answers GET_* and acks NEED_REPLY, and records what it saw. */
function fakePeer(script: PeerScript) {
  const [a, b] = UnixSocket.pair();
  const peer = Connection.frontend(b, { label: "fake backend" });
  const seen: Seen[] = [];
  peer.on("request", (m: RequestMessage<FrontendRequests>) => {
    seen.push({ name: m.name, needReply: m.needReply, fds: m.fds.length, payload: m.payload });
    for (const f of m.fds) f.close();
    if (m.name === script.hangUpOn) return peer.close();
    if (script.silentOn?.includes(m.name)) return;
    const done = (p: Promise<unknown>) => void p.catch(() => {});
    switch (m.name) {
      case "GET_FEATURES":
        return done(peer.reply(m, script.features));
      case "GET_PROTOCOL_FEATURES":
        return done(peer.reply(m, script.protocol ?? 0n));
      case "GET_VRING_BASE":
        return done(peer.reply(m, { index: m.payload.index, num: 7 }));
      case "SET_LOG_BASE":
        return done(peer.reply(m, { kind: "u64", value: 0n }));
      case "GET_INFLIGHT_FD":
        // QEMU's reading of mmap size 0: this back-end has nothing in flight to track.
        return done(peer.reply(m, { ...m.payload, mmapSize: 0n }));
      default:
        return done(peer.ack(m));
    }
  });
  const fe = new VhostUserFrontend(a, { timeoutMs: 300, label: "fake" });
  return { fe, peer, seen };
}

const F = VirtioFeature;
const LOGGING_FEATURES = featureMask(F.VIRTIO_F_VERSION_1, F.VHOST_F_LOG_ALL, F.VHOST_USER_F_PROTOCOL_FEATURES);
const RING = { size: 8, descTable: 0x1000, availRing: 0x1800, usedRing: 0x2000 };

async function started(fe: VhostUserFrontend, memory: GuestMemory): Promise<void> {
  await fe.start({ memory, features: featureMask(F.VIRTIO_F_VERSION_1), rings: [RING] });
}

test("SET_LOG_BASE: no NEED_REPLY, one fd, reply awaited with LOG_SHMFD; a silent peer gives TIMEOUT naming it", async () => {
  const before = openFdCount();
  const memory = new GuestMemory([GuestMemoryRegion.memfd(0, 1 << 20)]);
  const { fe, peer, seen } = fakePeer({
    features: LOGGING_FEATURES,
    protocol: featureMask(ProtocolFeature.LOG_SHMFD, ProtocolFeature.REPLY_ACK),
    silentOn: ["SET_LOG_BASE"],
  });
  try {
    await started(fe, memory);
    await assert.rejects(fe.startLogging(), (e: unknown) => {
      assert.ok(e instanceof VhostUserError, String(e));
      assert.equal(e.code, "TIMEOUT");
      assert.equal(e.request, "SET_LOG_BASE");
      return true;
    });
    assert.equal(fe.logging, false, "a failed start leaves logging off");
    const slb = seen.filter((s) => s.name === "SET_LOG_BASE");
    assert.equal(slb.length, 1);
    assert.equal(slb[0]?.needReply, false, "SET_LOG_BASE already solicits a reply: no NEED_REPLY");
    assert.equal(slb[0]?.fds, 1);
    assert.deepEqual(slb[0]?.payload, { mmapSize: 32n, mmapOffset: 0n }, "1 MiB of guest = 256 pages = 32 bytes");
    assert.equal(
      seen.filter((s) => s.name === "SET_FEATURES").length,
      1,
      "LOG_ALL not set after a failed SET_LOG_BASE",
    );
    const acked = seen.filter((s) => s.name === "SET_VRING_NUM");
    assert.equal(acked[0]?.needReply, true, "REPLY_ACK negotiated: NEED_REPLY on requests without a reply");
    assert.equal(seen.find((s) => s.name === "GET_FEATURES")?.needReply, false, "never NEED_REPLY on GET_*");
  } finally {
    fe.close();
    peer.close();
    memory.close();
  }
  assert.equal(openFdCount(), before, "the log, eventfds and sockets are closed");
});

test("logging on and off: LOG_ALL in SET_FEATURES, VHOST_VRING_F_LOG + used ring GPA in SET_VRING_ADDR", async () => {
  const memory = new GuestMemory([GuestMemoryRegion.memfd(0, 1 << 20)]);
  const { fe, peer, seen } = fakePeer({
    features: LOGGING_FEATURES,
    protocol: featureMask(ProtocolFeature.LOG_SHMFD),
  });
  try {
    await started(fe, memory);
    const log = await fe.startLogging();
    log.area.mark(0x5000, 1); // as a backend would
    await fe.getFeatures(); // a round trip: the peer has handled everything sent before
    const addrs = seen
      .filter((s) => s.name === "SET_VRING_ADDR")
      .map((s) => s.payload as { flags: number; log: bigint });
    assert.deepEqual(
      addrs.map((a) => [a.flags, a.log]),
      [
        [0, 0x2000n],
        [1, 0x2000n],
      ],
    );
    const feats = seen.filter((s) => s.name === "SET_FEATURES").map((s) => s.payload as bigint);
    assert.equal(feats.at(-1), featureMask(F.VIRTIO_F_VERSION_1, F.VHOST_F_LOG_ALL, F.VHOST_USER_F_PROTOCOL_FEATURES));
    const frames: number[] = [];
    await fe.stopLogging({ markRange: () => {}, markFrames: (f) => frames.push(...Array.from(f)) });
    await fe.getFeatures();
    assert.deepEqual(frames, [5], "stop hands over what is still in the log");
    assert.equal(seen.filter((s) => s.name === "SET_FEATURES").at(-1)?.payload, fe.ackedFeatures);
    const lastAddr = seen.filter((s) => s.name === "SET_VRING_ADDR").at(-1)?.payload as { flags: number } | undefined;
    assert.equal(lastAddr?.flags, 0, "VHOST_VRING_F_LOG cleared");
    assert.equal(
      seen.every((s) => !s.needReply),
      true,
      "no REPLY_ACK: nothing but GET_* and SET_LOG_BASE is waited for",
    );
  } finally {
    fe.close();
    peer.close();
    memory.close();
  }
});

test("a peer hanging up during SET_LOG_BASE fails it and every call waiter with DISCONNECTED", async () => {
  const memory = new GuestMemory([GuestMemoryRegion.memfd(0, 1 << 20)]);
  const { fe, peer } = fakePeer({
    features: LOGGING_FEATURES,
    protocol: featureMask(ProtocolFeature.LOG_SHMFD),
    hangUpOn: "SET_LOG_BASE",
  });
  try {
    await started(fe, memory);
    const waiter = fe.waitCall(0, { timeoutMs: 5000 });
    await assert.rejects(fe.startLogging(), (e: unknown) => {
      assert.ok(e instanceof VhostUserError);
      assert.equal(e.code, "DISCONNECTED");
      assert.equal(e.request, "SET_LOG_BASE");
      return true;
    });
    await assert.rejects(waiter, (e: unknown) => e instanceof VhostUserError && e.code === "DISCONNECTED");
  } finally {
    fe.close();
    peer.close();
    memory.close();
  }
});

test("without VHOST_USER_F_PROTOCOL_FEATURES: no GET_PROTOCOL_FEATURES, no SET_VRING_ENABLE; logging refused", async () => {
  const memory = new GuestMemory([GuestMemoryRegion.memfd(0, 1 << 20)]);
  const { fe, peer, seen } = fakePeer({ features: featureMask(F.VIRTIO_F_VERSION_1, F.VHOST_F_LOG_ALL) });
  try {
    await started(fe, memory);
    await fe.getFeatures(); // without REPLY_ACK only a round trip shows the peer has handled the rest
    assert.deepEqual(
      seen.map((s) => s.name),
      [
        "GET_FEATURES",
        "SET_OWNER",
        "SET_FEATURES",
        "SET_MEM_TABLE",
        "SET_VRING_NUM",
        "SET_VRING_BASE",
        "SET_VRING_ADDR",
        "SET_VRING_CALL",
        "SET_VRING_ERR",
        "SET_VRING_KICK",
        "GET_FEATURES",
      ],
    );
    assert.equal(fe.vring(0).enabled, true, "rings are enabled at SET_FEATURES without protocol features");
    await assert.rejects(
      fe.setVringEnable(0, false),
      (e: unknown) => e instanceof FrontendError && e.code === "NOT_NEGOTIATED",
    );
    await assert.rejects(fe.startLogging(), (e: unknown) => e instanceof FrontendError && e.request === "SET_LOG_BASE");
    assert.equal(await fe.stopVring(0), 7, "GET_VRING_BASE only");
    assert.equal(seen.at(-1)?.name, "GET_VRING_BASE");
  } finally {
    fe.close();
    peer.close();
    memory.close();
  }
});

test("memory without an fd, or a ring outside the table, is refused before anything is sent", async () => {
  const before = openFdCount();
  const memory = new GuestMemory([GuestMemoryRegion.anonymous(0, 1 << 20)]);
  const shared = new GuestMemory([GuestMemoryRegion.memfd(0, 1 << 20)]);
  const { fe, peer, seen } = fakePeer({ features: featureMask(F.VIRTIO_F_VERSION_1) });
  try {
    await fe.negotiate();
    await assert.rejects(fe.setMemTable(memory), (e: unknown) => e instanceof FrontendError && e.code === "NO_FD");
    assert.equal(
      seen.some((s) => s.name === "SET_MEM_TABLE"),
      false,
    );
    await fe.setMemTable(shared);
    await assert.rejects(
      fe.setVringAddr(0, { ...RING, usedRing: (1 << 20) - 16 }),
      (e: unknown) => e instanceof FrontendError && e.code === "BAD_ADDRESS",
    );
  } finally {
    fe.close();
    peer.close();
    memory.close();
    shared.close();
  }
  assert.equal(openFdCount(), before);
});

test('GET_INFLIGHT_FD answered with mmap size 0 is "no inflight" (null), not an error', async () => {
  const { fe, peer } = fakePeer({
    features: LOGGING_FEATURES,
    protocol: featureMask(ProtocolFeature.INFLIGHT_SHMFD, ProtocolFeature.REPLY_ACK),
  });
  try {
    await fe.negotiate();
    assert.equal(await fe.getInflight(1, 64), null);
  } finally {
    fe.close();
    peer.close();
  }
});

test("reset() without RESET_DEVICE stops the started rings (SET_VRING_ENABLE 0, GET_VRING_BASE), never the deprecated RESET_OWNER", async () => {
  const memory = new GuestMemory([GuestMemoryRegion.memfd(0, 1 << 20)]);
  const { fe, peer, seen } = fakePeer({
    features: LOGGING_FEATURES,
    protocol: featureMask(ProtocolFeature.REPLY_ACK),
  });
  try {
    await started(fe, memory);
    seen.length = 0;
    await fe.reset();
    assert.deepEqual(
      seen.map((x) => x.name),
      ["SET_VRING_ENABLE", "GET_VRING_BASE"],
    );
    assert.equal(fe.vring(0).started, false);
  } finally {
    fe.close();
    peer.close();
    memory.close();
  }
});
