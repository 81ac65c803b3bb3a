/**
 * The fs device served by the framework in this process (VhostUserDaemon, a queue worker per
 * queue), driven by VhostUserFrontend over a real socket with FUSE requests in guest memory:
 * - a READ reply is logged to the page (the data preadv'd straight into guest memory, the out
 *   header, the used ring) and nothing else;
 * - a FORGET on the hiprio queue reaches the request queue's worker (the inode goes: ESTALE);
 * - the device state (SET_DEVICE_STATE_FD / CHECK_DEVICE_STATE) saved from one daemon and loaded
 *   into a second one over the same directory before its rings start: the second one serves the
 *   first one's node ids and open handles; a malformed state fails CHECK_DEVICE_STATE.
 */
import assert from "node:assert/strict";
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, describe, test } from "node:test";
import { type FsDevice, fsDevice } from "../../src/devices/fs/device.js";
import type { DirtySink } from "../../src/memory/dirty-source.js";
import { GuestMemory } from "../../src/memory/guest-memory.js";
import { GuestMemoryRegion } from "../../src/memory/region.js";
import { VhostUserDaemon } from "../../src/vhost-user/backend/daemon.js";
import { VhostUserFrontend } from "../../src/vhost-user/frontend/frontend.js";
import { featureMask, VirtioFeature } from "../../src/vhost-user/protocol/constants.js";
import { SplitQueueDriver } from "../../src/virtio/driver.js";
import { cstr, Op, request, struct } from "../helpers/fuse-client.js";

const MiB = 1 << 20;
const PAGE = 4096;
const VERSION_1 = featureMask(VirtioFeature.VIRTIO_F_VERSION_1);
const RINGS = [
  { size: 64, descTable: 0x1000, availRing: 0x2000, usedRing: 0x3000 },
  { size: 64, descTable: 0x4000, availRing: 0x5000, usedRing: 0x6000 },
];
const REQ = 0x10000;
const OUT = 0x40000;
const ESTALE = 116;

const top = mkdtempSync(join(tmpdir(), "vmshift-fs-dev-"));
after(() => rmSync(top, { recursive: true, force: true }));

interface Served {
  device: FsDevice;
  daemon: VhostUserDaemon;
  serving: Promise<void>;
  fe: VhostUserFrontend;
  mem: GuestMemory;
  queues: SplitQueueDriver[];
  close(): Promise<void>;
}

async function serve(name: string, share: string, before?: (fe: VhostUserFrontend) => Promise<void>): Promise<Served> {
  const sock = join(top, `${name}.sock`);
  const device = fsDevice({ sharedDir: share });
  const daemon = VhostUserDaemon.listen(device, sock);
  const serving = daemon.serve();
  const mem = new GuestMemory([GuestMemoryRegion.memfd(0, 4 * MiB)]);
  const fe = VhostUserFrontend.connect(sock, { timeoutMs: 5000 });
  const close = async () => {
    fe.close();
    await daemon.close();
    await serving;
    device.close();
    mem.close();
  };
  const queues: SplitQueueDriver[] = [];
  try {
    // Rings are started after `before` (device state must load while they are stopped).
    await fe.start({ memory: mem, features: VERSION_1 });
    await before?.(fe);
    for (const [i, ring] of RINGS.entries()) {
      queues.push(new SplitQueueDriver(mem, { ...ring, features: VERSION_1 }));
      await fe.startVring(i, ring);
    }
  } catch (e) {
    await close();
    throw e;
  }
  return { device, daemon, serving, fe, mem, queues, close };
}

/** Puts a request in guest memory, runs it on queue `q`, returns the reply bytes (out header first). */
async function fuse(s: Served, bytes: Uint8Array, outLen = 8192, q = 1): Promise<{ used: number; reply: Uint8Array }> {
  s.mem.write(REQ, bytes);
  const queue = s.queues[q] as SplitQueueDriver;
  const head = queue.add([{ addr: REQ, len: bytes.length }], outLen ? [{ addr: OUT, len: outLen }] : []);
  if (queue.publish()) s.fe.kick(q);
  for (;;) {
    const since = s.fe.vring(q).calls;
    const u = queue.getUsed();
    if (u) {
      assert.equal(u.head, head);
      return { used: u.len, reply: s.mem.read(OUT, Math.min(u.len, outLen || 0)) };
    }
    if (queue.enableInterrupts()) continue;
    await s.fe.waitCall(q, { since, timeoutMs: 5000 });
  }
}

const view = (b: Uint8Array) => new DataView(b.buffer, b.byteOffset, b.byteLength);
const errorOf = (r: { reply: Uint8Array }) => view(r.reply).getInt32(4, true);

async function init(s: Served): Promise<void> {
  const r = await fuse(
    s,
    request(
      Op.INIT,
      0,
      struct(64, (v) => {
        v.setUint32(0, 7, true);
        v.setUint32(4, 38, true);
      }),
    ),
  );
  assert.equal(errorOf(r), 0);
}

async function create(s: Served, name: string): Promise<{ nodeid: bigint; fh: bigint }> {
  const r = await fuse(
    s,
    request(
      Op.CREATE,
      1,
      struct(16, (v) => {
        v.setUint32(0, 0o102, true);
        v.setUint32(4, 0o644, true);
      }),
      cstr(name),
    ),
  );
  assert.equal(errorOf(r), 0);
  return { nodeid: view(r.reply).getBigUint64(16, true), fh: view(r.reply).getBigUint64(16 + 128, true) };
}

const rw = (fh: bigint, offset: number, size: number) =>
  struct(40, (v) => {
    v.setBigUint64(0, fh, true);
    v.setBigUint64(8, BigInt(offset), true);
    v.setUint32(16, size, true);
  });

class Pages implements DirtySink {
  readonly set = new Set<number>();
  markRange(gpa: number, len: number): void {
    for (let p = Math.floor(gpa / PAGE); p * PAGE < gpa + len; p++) this.set.add(p);
  }
  markFrames(frames: ArrayLike<number>, pageSize: number, base: number): void {
    for (let i = 0; i < frames.length; i++) this.markRange(base + (frames[i] as number) * pageSize, pageSize);
  }
}

describe("fs device through the framework (in-process daemon, real socket)", { timeout: 60_000 }, () => {
  test("WRITE and READ through guest memory; a READ is logged exactly: data pages, reply header, used ring", async () => {
    const share = mkdtempSync(join(top, "rw-"));
    const s = await serve("rw", share);
    try {
      await init(s);
      const { nodeid, fh } = await create(s, "f.bin");
      const data = new Uint8Array(3 * PAGE).map((_, i) => (i * 13) & 0xff);
      const w = await fuse(s, request(Op.WRITE, nodeid, rw(fh, 0, data.length), data));
      assert.equal(view(w.reply).getUint32(16, true), data.length);
      assert.deepEqual(new Uint8Array(readFileSync(join(share, "f.bin"))), data);

      const log = await s.fe.startLogging();
      log.start();
      // 5000 bytes from offset 100: header at OUT, data OUT+16 .. OUT+5016 (two pages).
      const r = await fuse(s, request(Op.READ, nodeid, rw(fh, 100, 5000)));
      assert.equal(r.used, 16 + 5000);
      assert.deepEqual(r.reply.subarray(16), data.subarray(100, 5100));
      const got = new Pages();
      log.sync(got);
      const want = new Set([OUT / PAGE, OUT / PAGE + 1, RINGS[1]!.usedRing / PAGE]);
      assert.deepEqual([...got.set].sort(), [...want].sort());
      await s.fe.stopLogging();
    } finally {
      await s.close();
    }
  });

  test("a FORGET on the hiprio queue reaches the request queue's inode table", async () => {
    const share = mkdtempSync(join(top, "forget-"));
    writeFileSync(join(share, "x"), "x");
    const s = await serve("forget", share);
    try {
      await init(s);
      const l = await fuse(s, request(Op.LOOKUP, 1, cstr("x")));
      const nodeid = view(l.reply).getBigUint64(16, true);
      const getattr = async () => errorOf(await fuse(s, request(Op.GETATTR, nodeid, new Uint8Array(16))));
      assert.equal(await getattr(), 0);
      const f = await fuse(
        s,
        request(
          Op.FORGET,
          nodeid,
          struct(8, (v) => v.setBigUint64(0, 1n, true)),
        ),
        0,
        0,
      );
      assert.equal(f.used, 0, "no reply to a FORGET");
      // The forget crosses threads asynchronously: wait until the inode is gone.
      const deadline = Date.now() + 5000;
      while ((await getattr()) !== -ESTALE) assert.ok(Date.now() < deadline, "the forget never arrived");
    } finally {
      await s.close();
    }
  });

  test("device state: saved on one daemon, loaded into another before its rings start; bad state refused", async () => {
    const share = mkdtempSync(join(top, "state-"));
    const a = await serve("state-a", share);
    let saved: Uint8Array;
    let file: { nodeid: bigint; fh: bigint };
    try {
      await init(a);
      file = await create(a, "held.txt");
      const text = new TextEncoder().encode("held open\n");
      await fuse(a, request(Op.WRITE, file.nodeid, rw(file.fh, 0, text.length), text));
      // As QEMU does: rings stopped, then the state.
      await a.fe.stopVring(0);
      await a.fe.stopVring(1);
      saved = await a.fe.saveDeviceState();
      assert.ok(saved.length > 0);
    } finally {
      await a.close();
    }
    await assert.rejects(
      serve("state-bad", share, (fe) => fe.loadDeviceState(new TextEncoder().encode("garbage"))),
      /state load failed|CHECK_DEVICE_STATE|NACK/,
    );
    const b = await serve("state-b", share, (fe) => fe.loadDeviceState(saved));
    try {
      // No INIT on the destination: the session continues.
      const r = await fuse(b, request(Op.READ, file.nodeid, rw(file.fh, 0, 100)));
      assert.equal(errorOf(r), 0);
      assert.equal(new TextDecoder().decode(r.reply.subarray(16)), "held open\n");
      const g = await fuse(b, request(Op.GETATTR, file.nodeid, new Uint8Array(16)));
      assert.equal(errorOf(g), 0, "the node id travelled");
    } finally {
      await b.close();
    }
    // A back-end whose request worker already runs (rings started, a session of its own) takes
    // the state through the worker: its own tables are replaced by the migrated ones.
    const c = await serve("state-c", share);
    try {
      await init(c);
      await c.fe.stopVring(0);
      await c.fe.stopVring(1);
      await c.fe.loadDeviceState(saved);
      assert.deepEqual(c.device.lastLoad, { staleInodes: 0, staleHandles: 0 });
      // Fresh rings, as a driver that starts over would lay them out.
      c.mem.fill(RINGS[0]!.descTable, 0x6000, 0);
      c.queues[0] = new SplitQueueDriver(c.mem, { ...RINGS[0]!, features: VERSION_1 });
      c.queues[1] = new SplitQueueDriver(c.mem, { ...RINGS[1]!, features: VERSION_1 });
      await c.fe.startVring(0, RINGS[0]!);
      await c.fe.startVring(1, RINGS[1]!);
      const r = await fuse(c, request(Op.READ, file.nodeid, rw(file.fh, 0, 100)));
      assert.equal(new TextDecoder().decode(r.reply.subarray(16)), "held open\n");
    } finally {
      await c.close();
    }
  });
});
