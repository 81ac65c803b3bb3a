/**
 * The blk device served by the framework in this process, driven by VhostUserFrontend over a real
 * socket: requests of every type, hostile headers (short, no status byte, out of range, not whole
 * sectors, unknown type, bad discard flags), read-only, O_DIRECT with unaligned guest buffers,
 * and the dirty log of a read exact to the page (preads straight into guest memory are logged).
 */
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { once } from "node:events";
import { mkdtempSync, readFileSync, rmSync, truncateSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";
import { type BlkDevice, blkDevice } from "../../src/devices/blk/device.js";
import type { DirtySink } from "../../src/memory/dirty-source.js";
import { GuestMemory } from "../../src/memory/guest-memory.js";
import { GuestMemoryRegion } from "../../src/memory/region.js";
import { VhostUserDaemon } from "../../src/vhost-user/backend/daemon.js";
import { VhostUserFrontend } from "../../src/vhost-user/frontend/frontend.js";
import { featureMask, VirtioFeature } from "../../src/vhost-user/protocol/constants.js";
import { SplitQueueDriver } from "../../src/virtio/driver.js";
import {
  VIRTIO_BLK_S_IOERR,
  VIRTIO_BLK_S_OK,
  VIRTIO_BLK_S_UNSUPP,
  VIRTIO_BLK_T_FLUSH,
  VIRTIO_BLK_T_GET_ID,
  VIRTIO_BLK_T_IN,
  VirtioBlkDriver,
} from "../vhost-user/helpers/virtio-blk-driver.js";

const MiB = 1 << 20;
const PAGE = 4096;
const RING = { size: 64, descTable: 0x1000, availRing: 0x2000, usedRing: 0x3000 };
const SCRATCH = { headers: 0x10000, statuses: 0x11000 };
const DATA = 0x100000;
const VERSION_1 = featureMask(VirtioFeature.VIRTIO_F_VERSION_1);
const T_DISCARD = 11;
const T_WRITE_ZEROES = 13;

const dir = mkdtempSync(join(tmpdir(), "vmshift-blk-test-"));
const logs: string[] = [];

interface Served {
  device: BlkDevice;
  daemon: VhostUserDaemon;
  serving: Promise<void>;
  fe: VhostUserFrontend;
  mem: GuestMemory;
  blk: VirtioBlkDriver;
  close(): Promise<void>;
}

async function serve(
  name: string,
  o: {
    readonly?: boolean;
    direct?: boolean;
    io?: "sync" | "async" | "adaptive";
    path?: string;
    backendChannel?: boolean;
    features?: bigint;
  } = {},
): Promise<Served> {
  let image = o.path;
  if (!image) {
    image = join(dir, `${name}.img`);
    writeFileSync(image, pattern(4 * MiB));
  }
  const sock = join(dir, `${name}.sock`);
  const { path: _p, backendChannel, features: acked, ...opts } = o;
  const device = blkDevice({ path: image, ...opts });
  const daemon = VhostUserDaemon.listen(device, sock);
  daemon.on("log", (l, m) => logs.push(`${l}: ${m}`));
  const serving = daemon.serve();
  const mem = new GuestMemory([GuestMemoryRegion.memfd(0, 4 * MiB)]);
  const fe = VhostUserFrontend.connect(sock, { timeoutMs: 5000, backendChannel: !!backendChannel });
  await fe.start({ memory: mem, features: acked ?? VERSION_1, rings: [RING] });
  const queue = new SplitQueueDriver(mem, { ...RING, features: VERSION_1 });
  const blk = new VirtioBlkDriver(fe, 0, queue, mem, SCRATCH);
  return {
    device,
    daemon,
    serving,
    fe,
    mem,
    blk,
    async close() {
      fe.close();
      await daemon.close();
      await serving;
      mem.close();
    },
  };
}

function pattern(n: number): Buffer {
  const data = Buffer.alloc(n);
  for (let i = 0; i < data.length; i++) data[i] = (i * 7 + (i >> 9)) & 0xff;
  return data;
}

const imageBytes = (name: string, off: number, len: number) =>
  new Uint8Array(readFileSync(join(dir, `${name}.img`)).subarray(off, off + len));

/** A raw chain: readable and writable segments as given (for hostile layouts). */
async function raw(s: Served, readable: { addr: number; len: number }[], writable: { addr: number; len: number }[]) {
  const q = s.blk.queue;
  const head = q.add(readable, writable);
  if (q.publish()) s.fe.kick(0);
  for (;;) {
    const since = s.fe.vring(0).calls;
    const u = q.getUsed();
    if (u) {
      assert.equal(u.head, head);
      return u;
    }
    if (q.enableInterrupts()) continue;
    await s.fe.waitCall(0, { since, timeoutMs: 5000 });
  }
}

function header(mem: GuestMemory, at: number, type: number, sector: bigint): void {
  mem.writeU32(at, type);
  mem.writeU32(at + 4, 0);
  mem.writeU64(at + 8, sector);
}

class Pages implements DirtySink {
  readonly set = new Set<number>();
  markRange(gpa: number, len: number): void {
    for (let p = Math.floor(gpa / PAGE); p * PAGE < gpa + len; p++) this.set.add(p);
  }
  markFrames(frames: ArrayLike<number>, pageSize: number, base: number): void {
    for (let i = 0; i < frames.length; i++) this.markRange(base + (frames[i] as number) * pageSize, pageSize);
  }
}

after(() => rmSync(dir, { recursive: true, force: true }));

for (const io of ["sync", "async", "adaptive"] as const)
  describe(`blk device, ${io} I/O (in-process daemon, real socket)`, { timeout: 60_000 }, () => {
    const rw = `rw-${io}`;
    let s: Served;
    before(async () => {
      s = await serve(rw, { io });
    });
    after(async () => {
      await s.close();
    });

    test("read, write, flush, GET_ID", async () => {
      const { blk, mem } = s;
      let c = await blk.read(3, DATA, 2 * PAGE);
      assert.equal(c.status, VIRTIO_BLK_S_OK);
      assert.equal(c.len, 2 * PAGE + 1);
      assert.deepEqual(mem.read(DATA, 2 * PAGE), imageBytes(rw, 3 * 512, 2 * PAGE));
      const data = new Uint8Array(3 * 512).map((_, i) => (i * 13) & 0xff);
      mem.write(DATA + 0x8000, data);
      assert.equal((await blk.write(100, DATA + 0x8000, data.length)).status, VIRTIO_BLK_S_OK);
      assert.deepEqual(imageBytes(rw, 100 * 512, data.length), data);
      assert.equal((await blk.run({ type: VIRTIO_BLK_T_FLUSH, sector: 0, data: [] })).status, VIRTIO_BLK_S_OK);
      c = await blk.run({ type: VIRTIO_BLK_T_GET_ID, sector: 0, data: [{ addr: DATA, len: 20 }] });
      assert.equal(c.status, VIRTIO_BLK_S_OK);
      const id = `${rw}.img`;
      assert.equal(new TextDecoder().decode(mem.read(DATA, id.length)), id);
    });

    test("hostile headers: out of range, partial sectors, unknown type → IOERR/UNSUPP, image untouched", async () => {
      const { blk, mem } = s;
      const before = imageBytes(rw, 0, 4 * MiB);
      const sectors = (4 * MiB) / 512;
      assert.equal((await blk.read(sectors, DATA, 512)).status, VIRTIO_BLK_S_IOERR, "read at capacity");
      assert.equal((await blk.write(sectors - 1, DATA, 1024)).status, VIRTIO_BLK_S_IOERR, "write across the end");
      assert.equal((await blk.write(2 ** 52, DATA, 512)).status, VIRTIO_BLK_S_IOERR, "huge sector");
      assert.equal((await blk.write(0, DATA, 100)).status, VIRTIO_BLK_S_IOERR, "not whole sectors");
      assert.equal((await blk.run({ type: 99, sector: 0, data: [] })).status, VIRTIO_BLK_S_UNSUPP);
      // Sector 2^64-1: must not wrap around to a valid offset.
      header(mem, 0x20000, 1, 0xffffffffffffffffn);
      let u = await raw(
        s,
        [
          { addr: 0x20000, len: 16 },
          { addr: DATA, len: 512 },
        ],
        [{ addr: 0x20100, len: 1 }],
      );
      assert.equal(mem.readU8(0x20100), VIRTIO_BLK_S_IOERR);
      // A 10-byte header → IOERR; no writable buffer at all → completed with length 0.
      mem.writeU8(0x20100, 0xff);
      u = await raw(s, [{ addr: 0x20000, len: 10 }], [{ addr: 0x20100, len: 1 }]);
      assert.equal(mem.readU8(0x20100), VIRTIO_BLK_S_IOERR);
      u = await raw(s, [{ addr: 0x20000, len: 16 }], []);
      assert.equal(u.len, 0);
      // Discard with the unmap flag, and an unknown flag → UNSUPP; two segments (max 1) → UNSUPP.
      for (const [flags, segs] of [
        [1, 1],
        [2, 1],
        [0, 2],
      ] as const) {
        header(mem, 0x20000, flags === 2 ? T_WRITE_ZEROES : T_DISCARD, 0n);
        for (let k = 0; k < segs; k++) {
          mem.writeU64(0x20010 + k * 16, 0n);
          mem.writeU32(0x20018 + k * 16, 8);
          mem.writeU32(0x2001c + k * 16, flags);
        }
        await raw(s, [{ addr: 0x20000, len: 16 + 16 * segs }], [{ addr: 0x20100, len: 1 }]);
        assert.equal(mem.readU8(0x20100), VIRTIO_BLK_S_UNSUPP, `flags ${flags}, ${segs} segments`);
      }
      void u;
      assert.deepEqual(imageBytes(rw, 0, 4 * MiB), before, "no hostile request wrote the image");
    });

    test("write zeroes and discard read back as zeroes", async () => {
      const { mem } = s;
      for (const type of [T_WRITE_ZEROES, T_DISCARD]) {
        const sector = type === T_DISCARD ? 2048 : 1024;
        header(mem, 0x20000, type, BigInt(sector));
        mem.writeU64(0x20010, BigInt(sector));
        mem.writeU32(0x20018, 16);
        mem.writeU32(0x2001c, type === T_WRITE_ZEROES ? 1 : 0);
        await raw(s, [{ addr: 0x20000, len: 32 }], [{ addr: 0x20100, len: 1 }]);
        assert.equal(mem.readU8(0x20100), VIRTIO_BLK_S_OK);
        assert.deepEqual(imageBytes(rw, sector * 512, 8192), new Uint8Array(8192));
      }
    });

    test("dirty log: a read logs exactly its buffer pages, the status byte and the used ring", async () => {
      const { fe, blk } = s;
      const log = await fe.startLogging();
      log.start();
      // Straddles pages: 3 sectors starting 0x200 before a page boundary.
      assert.equal((await blk.read(8, DATA + 0x40e00, 1536)).status, VIRTIO_BLK_S_OK);
      const got = new Pages();
      log.sync(got);
      const want = new Set([DATA + 0x40000, DATA + 0x41000, SCRATCH.statuses, RING.usedRing].map((a) => a / PAGE));
      assert.deepEqual([...got.set].sort(), [...want].sort());
      await fe.stopLogging();
    });

    test("16 reads and writes in flight at once: each completes once, with the right bytes", async () => {
      const { blk, mem, fe } = s;
      const q = blk.queue;
      const heads = new Map<number, number>();
      for (let k = 0; k < 16; k++) {
        const hdr = 0x30000 + k * 16;
        const buf = 0x300000 + k * PAGE;
        const write = k % 2 === 1;
        header(mem, hdr, write ? 1 : 0, BigInt(64 + k * 8));
        if (write) mem.fill(buf, PAGE, k);
        const h = write
          ? q.add(
              [
                { addr: hdr, len: 16 },
                { addr: buf, len: PAGE },
              ],
              [{ addr: 0x31000 + k, len: 1 }],
            )
          : q.add(
              [{ addr: hdr, len: 16 }],
              [
                { addr: buf, len: PAGE },
                { addr: 0x31000 + k, len: 1 },
              ],
            );
        heads.set(h, k);
      }
      if (q.publish()) fe.kick(0);
      const done = new Set<number>();
      while (done.size < 16) {
        const since = fe.vring(0).calls;
        for (let u = q.getUsed(); u; u = q.getUsed()) {
          const k = heads.get(u.head) as number;
          assert.ok(!done.has(k), `request ${k} completed twice`);
          done.add(k);
          assert.equal(u.len, k % 2 === 1 ? 1 : PAGE + 1);
        }
        if (done.size < 16 && !q.enableInterrupts()) await fe.waitCall(0, { since, timeoutMs: 5000 });
      }
      for (let k = 0; k < 16; k++) {
        assert.equal(mem.readU8(0x31000 + k), VIRTIO_BLK_S_OK, `status of ${k}`);
        const img = imageBytes(rw, (64 + k * 8) * 512, PAGE);
        if (k % 2 === 1) assert.deepEqual(img, new Uint8Array(PAGE).fill(k), `write ${k}`);
        else assert.deepEqual(mem.read(0x300000 + k * PAGE, PAGE), img, `read ${k}`);
      }
    });
  });

describe("blk device: read-only and O_DIRECT", { timeout: 60_000 }, () => {
  test("read-only: writes, discard and write zeroes fail, reads work", async () => {
    const s = await serve("ro", { readonly: true });
    try {
      const before = imageBytes("ro", 0, 4 * MiB);
      assert.equal((await s.blk.write(0, DATA, 512)).status, VIRTIO_BLK_S_IOERR);
      header(s.mem, 0x20000, T_DISCARD, 0n);
      await raw(s, [{ addr: 0x20000, len: 32 }], [{ addr: 0x20100, len: 1 }]);
      assert.equal(s.mem.readU8(0x20100), VIRTIO_BLK_S_UNSUPP);
      assert.equal((await s.blk.read(0, DATA, 512)).status, VIRTIO_BLK_S_OK);
      assert.deepEqual(imageBytes("ro", 0, 4 * MiB), before);
    } finally {
      await s.close();
    }
  });

  test("O_DIRECT: aligned and unaligned guest buffers (bounce) both give the right bytes", async (t) => {
    let s: Served;
    try {
      s = await serve("direct", { direct: true });
    } catch (e) {
      t.skip(`O_DIRECT not supported here: ${(e as Error).message}`);
      return;
    }
    try {
      const { blk, mem } = s;
      for (const addr of [DATA, DATA + 3]) {
        mem.fill(addr, 8192, 0);
        assert.equal((await blk.read(16, addr, 8192)).status, VIRTIO_BLK_S_OK);
        assert.deepEqual(mem.read(addr, 8192), imageBytes("direct", 16 * 512, 8192), `read at +${addr - DATA}`);
        const data = new Uint8Array(1024).map((_, i) => (i + addr) & 0xff);
        mem.write(addr + 0x10000, data);
        assert.equal((await blk.write(40, addr + 0x10000, 1024)).status, VIRTIO_BLK_S_OK);
        assert.deepEqual(imageBytes("direct", 40 * 512, 1024), data, `write from +${addr - DATA}`);
      }
      // A read split in two descriptors of 100 and 412 bytes (not sector-sized).
      assert.equal(
        (
          await blk.run({
            type: VIRTIO_BLK_T_IN,
            sector: 5,
            data: [
              { addr: DATA, len: 100 },
              { addr: DATA + 0x900, len: 412 },
            ],
          })
        ).status,
        VIRTIO_BLK_S_OK,
      );
      const img = imageBytes("direct", 5 * 512, 512);
      assert.deepEqual(mem.read(DATA, 100), img.subarray(0, 100));
      assert.deepEqual(mem.read(DATA + 0x900, 412), img.subarray(100));
    } finally {
      await s.close();
    }
  });
});

test("online resize: a grown image, resize(), CONFIG_CHANGE_MSG: the front-end reads the new capacity, every worker uses it", async () => {
  const s = await serve("grow", { backendChannel: true });
  try {
    const { blk, fe, device, daemon } = s;
    const old = (4 * MiB) / 512;
    assert.equal((await blk.read(old, DATA, 512)).status, VIRTIO_BLK_S_IOERR, "past the end");
    assert.deepEqual(device.resize(), { from: old, to: old }, "unchanged");
    truncateSync(join(dir, "grow.img"), 6 * MiB);
    assert.deepEqual(device.resize(), { from: old, to: (6 * MiB) / 512 });
    assert.equal(device.capacitySectors, (6 * MiB) / 512);
    // The back-end tells the front-end on its request channel, as `vmshift blk` does on SIGHUP.
    const told = once(fe.backendEvents, "config-change", { signal: AbortSignal.timeout(5000) });
    assert.ok(daemon.session, "a session");
    await daemon.session.notifyConfigChange();
    await told;
    const cfg = await fe.getConfig(0, 8);
    assert.equal(new DataView(cfg.buffer, cfg.byteOffset).getBigUint64(0, true), BigInt((6 * MiB) / 512));
    assert.equal((await blk.read(old, DATA, 512)).status, VIRTIO_BLK_S_OK, "the new space reads (zeroes)");
    assert.deepEqual(s.mem.read(DATA, 512), new Uint8Array(512));
    assert.equal((await blk.read((6 * MiB) / 512, DATA, 512)).status, VIRTIO_BLK_S_IOERR, "past the new end");
  } finally {
    await s.close();
  }
});

for (const io of ["sync", "async"] as const)
  test(`cache mode (CONFIG_WCE, ${io} I/O): writethrough flushes every write on its own, writeback does not`, async () => {
    // FLUSH negotiated: the device starts in writeback.
    const s = await serve(`wce-${io}`, { io, features: VERSION_1 | featureMask(9, 11) });
    try {
      const { blk, fe, device, mem } = s;
      assert.ok(((fe.backendFeatures ?? 0n) >> 11n) & 1n, "VIRTIO_BLK_F_CONFIG_WCE offered");
      assert.deepEqual([...(await fe.getConfig(32, 1))], [1], "writeback by default");
      const write = async (sector: number) => {
        mem.write(DATA, new Uint8Array(4096).fill(sector));
        assert.equal((await blk.write(sector, DATA, 4096)).status, VIRTIO_BLK_S_OK);
      };
      await write(8);
      assert.equal(device.writeThroughFlushes, 0);
      await fe.setConfig(32, Uint8Array.of(0));
      assert.equal(device.writeback, false);
      assert.deepEqual([...(await fe.getConfig(32, 1))], [0], "the driver reads back writethrough");
      for (const sector of [16, 24, 32]) await write(sector);
      assert.equal(device.writeThroughFlushes, 3, "each write flushed before it completed");
      await fe.setConfig(32, Uint8Array.of(1));
      await write(40);
      assert.equal(device.writeThroughFlushes, 3, "writeback again: no flush of its own");
      // Only that byte is writable.
      await assert.rejects(fe.setConfig(0, Uint8Array.of(1, 2, 3, 4)));
      await assert.rejects(fe.setConfig(32, Uint8Array.of(7)));
      assert.equal(device.writeback, true);
    } finally {
      await s.close();
    }
  });

describe("blk device on a block device (a loop device)", { timeout: 60_000 }, () => {
  test("capacity from BLKGETSIZE64; reads, writes, FLUSH and DISCARD reach the backing file", async (t) => {
    const skip = (why: string) => {
      const msg = `!!! SKIPPED: ${why} !!!`;
      console.warn(msg);
      t.skip(msg);
    };
    if (process.getuid?.() !== 0) return skip("a loop device needs root");
    const backing = join(dir, "loop-backing.img");
    writeFileSync(backing, pattern(8 * MiB));
    let dev: string;
    try {
      dev = execFileSync("losetup", ["-f", "--show", backing], { encoding: "utf8" }).trim();
    } catch (e) {
      return skip(`losetup failed: ${(e as Error).message.split("\n")[0]}`);
    }
    try {
      const s = await serve("loop", { path: dev });
      try {
        const { blk, mem } = s;
        const file = (off: number, len: number) => new Uint8Array(readFileSync(backing).subarray(off, off + len));
        // fstat says 0 bytes for a block device: the capacity is the device's 8 MiB.
        const sectors = (8 * MiB) / 512;
        assert.equal((await blk.read(sectors - 8, DATA, 4096)).status, VIRTIO_BLK_S_OK, "the last 4 KiB");
        assert.deepEqual(mem.read(DATA, 4096), file(8 * MiB - 4096, 4096));
        assert.equal((await blk.read(sectors, DATA, 512)).status, VIRTIO_BLK_S_IOERR, "read at capacity");
        const data = new Uint8Array(8192).map((_, i) => (i * 13) & 0xff);
        mem.write(DATA + 0x10000, data);
        assert.equal((await blk.write(200, DATA + 0x10000, data.length)).status, VIRTIO_BLK_S_OK);
        assert.equal((await blk.run({ type: VIRTIO_BLK_T_FLUSH, sector: 0, data: [] })).status, VIRTIO_BLK_S_OK);
        assert.deepEqual(file(200 * 512, data.length), data, "in the backing file after FLUSH");
        header(mem, 0x20000, T_DISCARD, 0n);
        mem.writeU64(0x20010, 4096n);
        mem.writeU32(0x20018, 16);
        mem.writeU32(0x2001c, 0);
        await raw(s, [{ addr: 0x20000, len: 32 }], [{ addr: 0x20100, len: 1 }]);
        assert.equal(mem.readU8(0x20100), VIRTIO_BLK_S_OK);
        assert.equal((await blk.read(4096, DATA, 8192)).status, VIRTIO_BLK_S_OK);
        assert.deepEqual(mem.read(DATA, 8192), new Uint8Array(8192), "discarded sectors read as zeroes");
      } finally {
        await s.close();
      }
    } finally {
      execFileSync("losetup", ["-d", dev]);
    }
  });
});
