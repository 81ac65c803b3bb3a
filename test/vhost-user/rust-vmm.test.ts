/**
 * Both directions against peers that answer as rust-vmm's vhost crate does (helpers/
 * rust-vmm-peers.ts): our front-end and `vmshift probe` against a rust-vmm-style back-end (the
 * size-0 GET_CONFIG header, the echoed SET_LOG_BASE), and our back-end against a rust-vmm-style
 * front-end that reads SET_LOG_BASE's reply as header + 16 bytes.
 */
import assert from "node:assert/strict";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { test } from "node:test";
import { probe, probeCommand } from "../../src/cli/probe.js";
import { echoDevice } from "../../src/devices/examples/echo.js";
import { DirtyLogArea } from "../../src/memory/shared-dirty-log.js";
import { VhostUserDaemon } from "../../src/vhost-user/backend/daemon.js";
import { VhostUserFrontend } from "../../src/vhost-user/frontend/frontend.js";
import { featureMask, ProtocolFeature, VirtioFeature } from "../../src/vhost-user/protocol/constants.js";
import { VhostUserError } from "../../src/vhost-user/protocol/errors.js";
import { LogCodec, U64 } from "../../src/vhost-user/protocol/payloads.js";
import { countFds } from "../helpers/proc.js";
import { RustVmmBackend, RustVmmFrontend } from "./helpers/rust-vmm-peers.js";

const F = VirtioFeature;
const P = ProtocolFeature;
const CONFIG = Uint8Array.from({ length: 60 }, (_, i) => i + 1);
const BACKEND = {
  features: featureMask(F.VIRTIO_F_VERSION_1, F.VHOST_F_LOG_ALL, F.VHOST_USER_F_PROTOCOL_FEATURES),
  protocolFeatures: featureMask(P.MQ, P.LOG_SHMFD, P.REPLY_ACK, P.CONFIG),
  config: CONFIG,
};

test("vmshift probe reads a rust-vmm back-end's config: the size-0 header for 256 bytes is a refusal, 60 is tried next", async () => {
  const path = join(tmpdir(), `vmshift-rustvmm-be-${process.pid}.sock`);
  const be = new RustVmmBackend(path, BACKEND);
  try {
    const r = await probe(path, { timeoutMs: 3000 });
    assert.deepEqual(r.config, CONFIG);
    assert.equal(r.queues, 1);
    const out: string[] = [];
    assert.equal(await probeCommand(["--socket", path, "--json"], (l) => out.push(l)), 0);
    assert.equal(JSON.parse(out[0] as string).configSize, 60);
    // The front-end itself: a size-0 header is a NACK, not BAD_SIZE.
    const fe = VhostUserFrontend.connect(path, { timeoutMs: 3000 });
    try {
      await fe.negotiate();
      await assert.rejects(fe.getConfig(0, 256), (e: unknown) => e instanceof VhostUserError && e.code === "NACK");
      assert.deepEqual(await fe.getConfig(4, 8), CONFIG.slice(4, 12));
    } finally {
      fe.close();
    }
  } finally {
    await be.close();
  }
});

test("our front-end starts logging against a rust-vmm back-end (its SET_LOG_BASE reply is the 16-byte log echo)", async () => {
  const path = join(tmpdir(), `vmshift-rustvmm-log-${process.pid}.sock`);
  const be = new RustVmmBackend(path, BACKEND);
  const fe = VhostUserFrontend.connect(path, { timeoutMs: 3000 });
  try {
    await fe.negotiate();
    await fe.setOwner();
    await fe.setFeatures(featureMask(F.VIRTIO_F_VERSION_1));
    const log = await fe.startLogging(1 << 20); // was: BAD_SIZE (we required 8 bytes)
    assert.ok(log);
    assert.ok(be.seen.includes("SET_LOG_BASE"));
    await fe.stopLogging();
    assert.equal(await fe.getFeatures(), BACKEND.features, "the stream is still in step");
  } finally {
    fe.close();
    await be.close();
  }
});

test("a rust-vmm front-end reads our SET_LOG_BASE reply as header + 16 bytes and stays in step", async () => {
  const path = join(tmpdir(), `vmshift-rustvmm-fe-${process.pid}.sock`);
  const fds = countFds();
  const daemon = VhostUserDaemon.listen(echoDevice(), path);
  daemon.on("log", () => undefined);
  const serving = daemon.serve();
  const fe = new RustVmmFrontend(path);
  const area = DirtyLogArea.create(1 << 20);
  try {
    const features = await fe.u64("GET_FEATURES");
    await fe.u64("GET_PROTOCOL_FEATURES");
    let code = await fe.send("SET_PROTOCOL_FEATURES", U64.encode(featureMask(P.LOG_SHMFD, P.REPLY_ACK)));
    await fe.waitForAck(code); // no NEED_REPLY yet: nothing to read
    fe.needReplyOnEveryRequest();
    code = await fe.send("SET_OWNER", new Uint8Array(0));
    await fe.waitForAck(code);
    code = await fe.send(
      "SET_FEATURES",
      U64.encode(features & featureMask(F.VIRTIO_F_VERSION_1, F.VHOST_USER_F_PROTOCOL_FEATURES)),
    );
    await fe.waitForAck(code);
    const desc = { mmapSize: BigInt(area.size), mmapOffset: BigInt(area.offset) };
    code = await fe.send("SET_LOG_BASE", LogCodec.encode(desc), [area.fd!]);
    // recv_reply::<VhostUserLog>: exactly 12 + 16 bytes (with our old 8-byte reply it blocked here).
    const reply = await fe.recvReply(code, 16);
    assert.deepEqual(LogCodec.decode(reply, "SET_LOG_BASE"), desc);
    assert.equal(await fe.u64("GET_FEATURES"), features, "the next reply is GET_FEATURES': no stray bytes");
    assert.equal(fe.buffered, 0);
  } finally {
    fe.close();
    area.close();
    await daemon.close();
    await serving;
  }
  assert.equal(countFds(), fds);
});

test('the u64 form stays available for a front-end that reads exactly 8 bytes (logBaseReply: "u64")', async () => {
  const path = join(tmpdir(), `vmshift-rustvmm-u64-${process.pid}.sock`);
  const daemon = VhostUserDaemon.listen(echoDevice(), path);
  daemon.on("log", () => undefined);
  const serving = daemon.serve({ session: { logBaseReply: "u64" } });
  const fe = new RustVmmFrontend(path);
  const area = DirtyLogArea.create(1 << 20);
  try {
    await fe.u64("GET_FEATURES");
    await fe.u64("GET_PROTOCOL_FEATURES");
    await fe.send("SET_PROTOCOL_FEATURES", U64.encode(featureMask(P.LOG_SHMFD)));
    const code = await fe.send("SET_LOG_BASE", LogCodec.encode({ mmapSize: BigInt(area.size), mmapOffset: 0n }), [
      area.fd!,
    ]);
    assert.equal(U64.decode(await fe.recvReply(code, 8), "SET_LOG_BASE"), BigInt(area.size));
    await fe.u64("GET_FEATURES");
    assert.equal(fe.buffered, 0);
  } finally {
    fe.close();
    area.close();
    await daemon.close();
    await serving;
  }
});
