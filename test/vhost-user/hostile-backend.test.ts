/**
 * issue 12, item 1: a back-end that turns the fds we hand it against us. It ftruncates the
 * guest memory memfd it received in SET_MEM_TABLE (and the dirty log of SET_LOG_BASE): sealed,
 * that fails with EPERM and our process keeps reading and writing guest memory (unsealed, the
 * next access was a SIGBUS that killed the VMM). Memory that cannot be sealed is refused unless
 * the caller opts out. A POSTCOPY_ADVISE reply whose fd is not a userfaultfd is refused and closed.
 */
import assert from "node:assert/strict";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { test } from "node:test";
import { GuestMemory } from "../../src/memory/guest-memory.js";
import { GuestMemoryRegion } from "../../src/memory/region.js";
import { SysError } from "../../src/sys/errors.js";
import type { Fd } from "../../src/sys/fd.js";
import {
  addSeals,
  F_SEAL_SEAL,
  F_SEAL_SHRINK,
  F_SEAL_WRITE,
  fileSize,
  getSeals,
  truncate,
} from "../../src/sys/memfd.js";
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

const MiB = 1 << 20;
const F = VirtioFeature;
const FEATURES = featureMask(F.VIRTIO_F_VERSION_1, F.VHOST_F_LOG_ALL, F.VHOST_USER_F_PROTOCOL_FEATURES);

interface Attempt {
  request: string;
  /** The errno name ftruncate failed with, or "succeeded". */
  truncate: string;
  /** addSeals(F_SEAL_WRITE) by the peer: refused once F_SEAL_SEAL is set. */
  sealWrite: string;
}

function errnoOf(fn: () => void): string {
  try {
    fn();
    return "succeeded";
  } catch (e) {
    return e instanceof SysError ? e.code : String(e);
  }
}

/**
 * A back-end that tries to shrink every fd it is given to 0 bytes, then answers as a normal
 * back-end would. `advise` is the fd it answers POSTCOPY_ADVISE with.
 */
function hostileBackend(protocol: bigint, advise?: () => Fd | number) {
  const [a, b] = UnixSocket.pair();
  const peer = Connection.frontend(b, { label: "hostile backend" });
  const attempts: Attempt[] = [];
  peer.on("request", (m: RequestMessage<FrontendRequests>) => {
    for (const f of m.fds) {
      attempts.push({
        request: m.name,
        truncate: errnoOf(() => truncate(f, 0)),
        sealWrite: errnoOf(() => addSeals(f, F_SEAL_WRITE)),
      });
      f.close();
    }
    const done = (p: Promise<unknown>) => void p.catch(() => {});
    switch (m.name) {
      case "GET_FEATURES":
        return done(peer.reply(m, FEATURES));
      case "GET_PROTOCOL_FEATURES":
        return done(peer.reply(m, protocol));
      case "SET_LOG_BASE":
        return done(peer.reply(m, { kind: "u64", value: 0n }));
      case "POSTCOPY_ADVISE":
        return done(peer.reply(m, undefined as never, advise ? [advise()] : []));
      default:
        return done(peer.ack(m));
    }
  });
  return { fe: new VhostUserFrontend(a, { timeoutMs: 5000, label: "hostile" }), peer, attempts };
}

test("a back-end that ftruncates the guest memory and the dirty log it received gets EPERM; we keep using guest memory", async () => {
  const before = openFdCount();
  const memory = new GuestMemory([GuestMemoryRegion.memfd(0, 4 * MiB), GuestMemoryRegion.memfd(8 * MiB, 2 * MiB)]);
  const { fe, peer, attempts } = hostileBackend(featureMask(ProtocolFeature.LOG_SHMFD, ProtocolFeature.REPLY_ACK));
  try {
    for (const r of memory.regions) {
      const seals = getSeals(r.backing.fd as Fd);
      assert.equal(seals & (F_SEAL_SHRINK | F_SEAL_SEAL), F_SEAL_SHRINK | F_SEAL_SEAL, "sealed before it is shared");
    }
    await fe.negotiate();
    await fe.setOwner();
    await fe.setFeatures(featureMask(F.VIRTIO_F_VERSION_1));
    await fe.setMemTable(memory);
    const log = await fe.startLogging();
    await fe.getFeatures(); // a round trip: every fd sent so far was attacked
    assert.deepEqual(
      attempts.map((a) => a.request),
      ["SET_MEM_TABLE", "SET_MEM_TABLE", "SET_LOG_BASE"],
    );
    for (const a of attempts) {
      assert.equal(a.truncate, "EPERM", `${a.request}: ftruncate by the back-end`);
      assert.equal(a.sealWrite, "EPERM", `${a.request}: no seal can be added after F_SEAL_SEAL`);
    }
    for (const r of memory.regions) assert.equal(fileSize(r.backing.fd as Fd), r.size, "size unchanged");
    // Every page of guest memory and of the log is still there (a SIGBUS here killed the VMM).
    for (const r of memory.regions) {
      memory.fill(r.guestBase, r.size, 0x5a);
      const back = new Uint8Array(r.size);
      memory.read(r.guestBase, back);
      assert.ok(
        back.every((v) => v === 0x5a),
        "guest memory reads back what was written",
      );
    }
    log.area.mark(0, 10 * MiB);
    await fe.stopLogging();
  } finally {
    fe.close();
    peer.close();
    memory.close();
  }
  assert.equal(openFdCount(), before, "nothing leaked");
});

test("memory that cannot be size-sealed (a file) is not shared unless the caller opts out", async () => {
  const dir = mkdtempSync(join(tmpdir(), "vmshift-seal-"));
  const memory = new GuestMemory([GuestMemoryRegion.file(join(dir, "ram"), 0, 1 * MiB)]);
  try {
    const refused = hostileBackend(0n);
    try {
      await refused.fe.negotiate();
      await refused.fe.setOwner();
      await assert.rejects(refused.fe.setMemTable(memory), (e: unknown) => {
        assert.ok(e instanceof FrontendError, String(e));
        assert.equal(e.code, "UNSEALED");
        assert.equal(e.request, "SET_MEM_TABLE");
        return true;
      });
      await refused.fe.getFeatures();
      assert.equal(refused.attempts.length, 0, "nothing was sent");
    } finally {
      refused.fe.close();
      refused.peer.close();
    }
    const [a, b] = UnixSocket.pair();
    const peer = Connection.frontend(b, { label: "trusted backend" });
    let fds = 0;
    peer.on("request", (m: RequestMessage<FrontendRequests>) => {
      fds += m.fds.length;
      for (const f of m.fds) f.close();
      if (m.name === "GET_FEATURES") void peer.reply(m, FEATURES).catch(() => {});
      else if (m.name === "GET_PROTOCOL_FEATURES") void peer.reply(m, 0n).catch(() => {});
      else void peer.ack(m).catch(() => {});
    });
    const fe = new VhostUserFrontend(a, { timeoutMs: 5000, allowUnsealedMemory: true });
    try {
      await fe.negotiate();
      await fe.setMemTable(memory);
      await fe.getFeatures();
      assert.equal(fds, 1, "opted out: the file's fd went out");
    } finally {
      fe.close();
      peer.close();
    }
  } finally {
    memory.close();
    rmSync(dir, { recursive: true, force: true });
  }
});

test("POSTCOPY_ADVISE answered with a socket full of fake fault records: refused as BAD_FD, the fd closed", async () => {
  const before = openFdCount();
  const fake = UnixSocket.pair();
  // What a hostile back-end's "userfaultfd" would deliver: a uffd_msg PAGEFAULT record.
  const msg = new Uint8Array(32);
  msg[0] = 0x12;
  await fake[1].send(msg);
  const protocol = featureMask(ProtocolFeature.PAGEFAULT, ProtocolFeature.REPLY_ACK);
  const { fe, peer } = hostileBackend(protocol, () => fake[0].fd);
  try {
    await fe.negotiate();
    await fe.setOwner();
    await assert.rejects(fe.postcopyAdvise(), (e: unknown) => {
      assert.ok(e instanceof VhostUserError, String(e));
      assert.equal(e.code, "BAD_FD");
      assert.equal(e.request, "POSTCOPY_ADVISE");
      assert.match(e.message, /socket:\[\d+\].*anon_inode:\[userfaultfd\]/);
      return true;
    });
    assert.equal(fe.postcopyUserfaultfd, null, "nothing adopted");
  } finally {
    fe.close();
    peer.close();
    fake[0].close();
    fake[1].close();
  }
  assert.equal(openFdCount(), before, "the received fd was closed");
});
