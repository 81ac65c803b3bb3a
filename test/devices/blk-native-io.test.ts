/**
 * The blk handler's native I/O path (one preadv/pwritev per request over guest-memory triples,
 * inline or on the queue's own pool) served by the framework in this process, driven by
 * VhostUserFrontend over a real socket, with guest memory of two regions:
 * - a request whose buffers straddle the regions' boundary still works (the general path), and
 *   one whose buffers lie in both regions goes native;
 * - many scattered reads and writes in flight at once, on every I/O model: each completes once,
 *   the bytes are right, and the dirty log of the reads holds every page they wrote and nothing
 *   but those, the status bytes and the used ring.
 */
import assert from "node:assert/strict";
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, describe, test } from "node:test";
import { blkDevice } from "../../src/devices/blk/device.js";
import type { DirtySink } from "../../src/memory/dirty-source.js";
import { GuestMemory } from "../../src/memory/guest-memory.js";
import { GuestMemoryRegion } from "../../src/memory/region.js";
import { VhostUserDaemon } from "../../src/vhost-user/backend/daemon.js";
import { VhostUserFrontend } from "../../src/vhost-user/frontend/frontend.js";
import { featureMask, VirtioFeature } from "../../src/vhost-user/protocol/constants.js";
import { type Segment, SplitQueueDriver } from "../../src/virtio/driver.js";
import {
  VIRTIO_BLK_S_OK,
  VIRTIO_BLK_T_IN,
  VIRTIO_BLK_T_OUT,
  VirtioBlkDriver,
} from "../vhost-user/helpers/virtio-blk-driver.js";

const MiB = 1 << 20;
const PAGE = 4096;
const QUEUE = 1024;
const RING = { size: QUEUE, descTable: 0x1000, availRing: 0x5000, usedRing: 0x6000 };
const SCRATCH = { headers: 0x10000, statuses: 0x14000 };
/** The boundary between the two regions. */
const SPLIT = 4 * MiB;
const VERSION_1 = featureMask(VirtioFeature.VIRTIO_F_VERSION_1);

const dir = mkdtempSync(join(tmpdir(), "vmshift-blk-native-"));
after(() => rmSync(dir, { recursive: true, force: true }));

class Pages implements DirtySink {
  readonly set = new Set<number>();
  markRange(gpa: number, len: number): void {
    for (let p = Math.floor(gpa / PAGE); p * PAGE < gpa + len; p++) this.set.add(p);
  }
  markFrames(frames: ArrayLike<number>, pageSize: number, base: number): void {
    for (let i = 0; i < frames.length; i++) this.markRange(base + (frames[i] as number) * pageSize, pageSize);
  }
}

function pattern(n: number, seed: number): Uint8Array {
  const b = new Uint8Array(n);
  for (let i = 0; i < n; i++) b[i] = (i * 13 + seed * 101 + (i >> 10)) & 0xff;
  return b;
}

async function serve(name: string, io: "sync" | "async" | "adaptive") {
  const image = join(dir, `${name}.img`);
  writeFileSync(image, new Uint8Array(8 * MiB));
  const device = blkDevice({ path: image, io, queueSize: QUEUE });
  const sock = join(dir, `${name}.sock`);
  const daemon = VhostUserDaemon.listen(device, sock);
  const serving = daemon.serve();
  const mem = new GuestMemory([GuestMemoryRegion.memfd(0, SPLIT), GuestMemoryRegion.memfd(SPLIT, SPLIT)]);
  const fe = VhostUserFrontend.connect(sock, { timeoutMs: 5000 });
  await fe.start({ memory: mem, features: VERSION_1, rings: [RING] });
  const blk = new VirtioBlkDriver(fe, 0, new SplitQueueDriver(mem, { ...RING, features: VERSION_1 }), mem, SCRATCH);
  return {
    image,
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

/** Reads what `segs` hold, in order, as one array. */
function gather(mem: GuestMemory, segs: Segment[]): Uint8Array {
  const out = new Uint8Array(segs.reduce((n, s) => n + s.len, 0));
  let off = 0;
  for (const s of segs) {
    out.set(mem.read(s.addr, s.len), off);
    off += s.len;
  }
  return out;
}

function scatter(mem: GuestMemory, segs: Segment[], data: Uint8Array): void {
  let off = 0;
  for (const s of segs) {
    mem.write(s.addr, data.subarray(off, off + s.len));
    off += s.len;
  }
}

for (const io of ["sync", "async", "adaptive"] as const) {
  describe(`blk native I/O (${io})`, () => {
    test("buffers straddling the regions' boundary (general path) and buffers in both regions (native)", async () => {
      const s = await serve(`straddle-${io}`, io);
      try {
        const { blk, mem, image } = s;
        const straddling: Segment[] = [
          { addr: 0x200000, len: PAGE },
          { addr: SPLIT - 2048, len: PAGE }, // crosses into the second region
          { addr: SPLIT + 0x100000, len: 2048 },
        ];
        const spread: Segment[] = [
          { addr: SPLIT + 0x200000, len: PAGE },
          { addr: 0x300000, len: 3 * PAGE },
          { addr: SPLIT + 0x10000, len: 512 },
        ];
        for (const [k, segs] of [straddling, spread].entries()) {
          const len = segs.reduce((n, x) => n + x.len, 0);
          const data = pattern(len, k + 1);
          scatter(mem, segs, data);
          const sector = 64 + k * 64;
          const w = await blk.run({ type: VIRTIO_BLK_T_OUT, sector, data: segs });
          assert.equal(w.status, VIRTIO_BLK_S_OK);
          assert.deepEqual(new Uint8Array(readFileSync(image)).subarray(sector * 512, sector * 512 + len), data);
          // Read it back into the same layout, cleared first.
          scatter(mem, segs, new Uint8Array(len));
          const r = await blk.run({ type: VIRTIO_BLK_T_IN, sector, data: segs });
          assert.equal(r.status, VIRTIO_BLK_S_OK);
          assert.equal(r.len, len + 1, "data and status byte");
          assert.deepEqual(gather(mem, segs), data);
        }
      } finally {
        await s.close();
      }
    });

    test("48 scattered requests in flight: the right bytes, each completed once, the dirty log exact", async () => {
      const s = await serve(`flight-${io}`, io);
      try {
        const { blk, mem, fe, image } = s;
        const N = 48;
        const SEGS = 16;
        // Request k's page j: interleaved with the other requests' (like a guest's pages), half in
        // each region.
        const layout = (k: number, base: number): Segment[] =>
          Array.from({ length: SEGS }, (_, j) => ({
            addr: (j % 2 === 0 ? base : SPLIT + base) + (Math.floor(j / 2) * N + k) * PAGE,
            len: PAGE,
          }));
        const want = Array.from({ length: N }, (_, k) => pattern(SEGS * PAGE, k + 10));
        for (let k = 0; k < N; k++) {
          scatter(mem, layout(k, 0x100000), want[k] as Uint8Array);
          blk.submit({ type: VIRTIO_BLK_T_OUT, sector: k * SEGS * 8, data: layout(k, 0x100000) });
        }
        blk.kick();
        const writes = await blk.drain();
        assert.equal(writes.length, N);
        assert.ok(writes.every((c) => c.status === VIRTIO_BLK_S_OK));
        assert.equal(new Set(writes.map((c) => c.head)).size, N, "each once");
        const disk = new Uint8Array(readFileSync(image));
        for (let k = 0; k < N; k++)
          assert.deepEqual(disk.subarray(k * SEGS * PAGE, (k + 1) * SEGS * PAGE), want[k], `request ${k} on disk`);

        const log = await fe.startLogging();
        log.start();
        const readPages = new Pages();
        for (let k = 0; k < N; k++) {
          const segs = layout(k, 0x280000);
          for (const x of segs) readPages.markRange(x.addr, x.len);
          blk.submit({ type: VIRTIO_BLK_T_IN, sector: k * SEGS * 8, data: segs });
        }
        blk.kick();
        const reads = await blk.drain();
        assert.equal(reads.length, N);
        assert.ok(reads.every((c) => c.status === VIRTIO_BLK_S_OK && c.len === SEGS * PAGE + 1));
        for (let k = 0; k < N; k++) assert.deepEqual(gather(mem, layout(k, 0x280000)), want[k], `request ${k} read`);
        const got = new Pages();
        log.sync(got);
        await fe.stopLogging();
        for (const p of readPages.set)
          assert.ok(got.set.has(p), `page 0x${(p * PAGE).toString(16)} written, not logged`);
        const usedPages = new Set<number>();
        for (let a = RING.usedRing; a < RING.usedRing + 6 + 8 * QUEUE; a += PAGE) usedPages.add(Math.floor(a / PAGE));
        usedPages.add(Math.floor((RING.usedRing + 6 + 8 * QUEUE - 1) / PAGE));
        const allowed = new Set([...readPages.set, Math.floor(SCRATCH.statuses / PAGE), ...usedPages]);
        for (const p of got.set) assert.ok(allowed.has(p), `page 0x${(p * PAGE).toString(16)} logged, not written`);
      } finally {
        await s.close();
      }
    });
  });
}
