/**
 * The blk handler's native I/O path (one preadv/pwritev per request over guest-memory triples,
 * inline or on the queue's own pool) served by the framework in this process, driven by
 * VhostUserFrontend over a real socket, with guest memory of two regions:
 * - a request whose buffers straddle the regions' boundary still works (the general path), and
 *   one whose buffers lie in both regions goes native;
 * - many scattered reads and writes in flight at once, on every I/O model: each completes once,
 *   the bytes are right, and the dirty log of the reads holds every page they wrote and nothing
 *   but those, the status bytes and the used ring;
 * - spread (adaptive, opt-in): of a batch of large cached reads, one goes to the queue's pool while the
 *   others are copied inline; all complete with the right bytes and an exact dirty log, and a
 *   ring stopped (GET_VRING_BASE) right after the kick loses none of them.
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

async function serve(name: string, io: "sync" | "async" | "adaptive", spread = false) {
  const image = join(dir, `${name}.img`);
  writeFileSync(image, new Uint8Array(8 * MiB));
  const device = blkDevice({ path: image, io, queueSize: QUEUE, spread });
  const sock = join(dir, `${name}.sock`);
  const daemon = VhostUserDaemon.listen(device, sock);
  const serving = daemon.serve();
  const mem = new GuestMemory([GuestMemoryRegion.memfd(0, SPLIT), GuestMemoryRegion.memfd(SPLIT, SPLIT)]);
  const fe = VhostUserFrontend.connect(sock, { timeoutMs: 5000 });
  await fe.start({ memory: mem, features: VERSION_1, rings: [RING] });
  const blk = new VirtioBlkDriver(fe, 0, new SplitQueueDriver(mem, { ...RING, features: VERSION_1 }), mem, SCRATCH);
  return {
    image,
    device,
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
        const { blk, mem, image } = s;
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

        await readAllLogged(s, N, SEGS, layout, want);
      } finally {
        await s.close();
      }
    });
  });
}

/**
 * With dirty logging on: `n` reads of `segs` pages each into layout(k, 0x280000) (cleared first),
 * in flight together. Each completes once with its data and status byte, reads back `want[k]`,
 * and the dirty log is exact.
 */
async function readAllLogged(
  s: Awaited<ReturnType<typeof serve>>,
  n: number,
  segs: number,
  layout: (k: number, base: number) => Segment[],
  want: readonly Uint8Array[],
): Promise<void> {
  const { blk, mem, fe } = s;
  const log = await fe.startLogging();
  log.start();
  const readPages = new Pages();
  for (let k = 0; k < n; k++) {
    const data = layout(k, 0x280000);
    scatter(mem, data, new Uint8Array(segs * PAGE));
    for (const x of data) readPages.markRange(x.addr, x.len);
    blk.submit({ type: VIRTIO_BLK_T_IN, sector: k * segs * 8, data });
  }
  blk.kick();
  const reads = await blk.drain();
  assert.equal(reads.length, n);
  assert.equal(new Set(reads.map((c) => c.head)).size, n, "each once");
  assert.ok(reads.every((c) => c.status === VIRTIO_BLK_S_OK && c.len === segs * PAGE + 1));
  for (let k = 0; k < n; k++) assert.deepEqual(gather(mem, layout(k, 0x280000)), want[k], `request ${k} read`);
  const got = new Pages();
  log.sync(got);
  await fe.stopLogging();
  assertLogExact(got, readPages);
}

/** The dirty log holds every page the reads wrote, and besides them only the status bytes and the used ring. */
function assertLogExact(got: Pages, readPages: Pages): void {
  for (const p of readPages.set) assert.ok(got.set.has(p), `page 0x${(p * PAGE).toString(16)} written, not logged`);
  const usedPages = new Set<number>();
  for (let a = RING.usedRing; a < RING.usedRing + 6 + 8 * QUEUE; a += PAGE) usedPages.add(Math.floor(a / PAGE));
  usedPages.add(Math.floor((RING.usedRing + 6 + 8 * QUEUE - 1) / PAGE));
  const allowed = new Set([...readPages.set, Math.floor(SCRATCH.statuses / PAGE), ...usedPages]);
  for (const p of got.set) assert.ok(allowed.has(p), `page 0x${(p * PAGE).toString(16)} logged, not written`);
}

/** `n` reads of `segs` scattered pages each, written first; the layout of request k at `base`. */
function spreadLayout(n: number, segs: number) {
  return (k: number, base: number): Segment[] =>
    Array.from({ length: segs }, (_, j) => ({
      addr: (j % 2 === 0 ? base : SPLIT + base) + (Math.floor(j / 2) * n + k) * PAGE,
      len: PAGE,
    }));
}

/** Writes request k's pattern through the device (so the image's pages are in the page cache). */
async function writeAll(s: Awaited<ReturnType<typeof serve>>, n: number, segs: number): Promise<Uint8Array[]> {
  const layout = spreadLayout(n, segs);
  const want = Array.from({ length: n }, (_, k) => pattern(segs * PAGE, k + 40));
  for (let k = 0; k < n; k++) {
    scatter(s.mem, layout(k, 0x100000), want[k] as Uint8Array);
    s.blk.submit({ type: VIRTIO_BLK_T_OUT, sector: k * segs * 8, data: layout(k, 0x100000) });
  }
  s.blk.kick();
  const writes = await s.blk.drain();
  assert.ok(writes.length === n && writes.every((c) => c.status === VIRTIO_BLK_S_OK));
  return want;
}

describe("blk spread (opt-in): large cached reads of one batch overlap on the queue's pool", () => {
  const N = 8;
  const SEGS = 64; // 256 KiB a request: above SPREAD_MIN_BYTES

  // [I/O model, spread, reads of the batch whose copy runs on the pool]: adaptive with spread
  // sends the batch's first read to the idle pool and copies the rest inline from the page cache
  // (the pool stays busy until the worker's event loop turns again); without spread (the default)
  // all inline; sync never uses the pool, async always.
  const cases = [
    ["adaptive", true, 1],
    ["adaptive", false, 0],
    ["sync", true, 0],
    ["async", true, N],
  ] as const;
  for (const [io, spread, expected] of cases) {
    const name = `${io}${spread ? "" : " (spread off)"}`;
    test(`${name}: a batch of ${N} reads of 256 KiB: the right bytes, each once, the dirty log exact`, async () => {
      const s = await serve(`spread-${io}-${spread}`, io, spread);
      try {
        const { device } = s;
        const layout = spreadLayout(N, SEGS);
        const want = await writeAll(s, N, SEGS);
        const pooledBefore = device.stats()[0]?.pooled ?? 0;
        await readAllLogged(s, N, SEGS, layout, want);
        const pooled = (device.stats()[0]?.pooled ?? 0) - pooledBefore;
        assert.equal(pooled, expected, `${name}: reads whose copy ran on the pool`);
      } finally {
        await s.close();
      }
    });
  }

  test("adaptive: the ring stopped (GET_VRING_BASE) right after the kick: no spread read is lost", async () => {
    const s = await serve("spread-stop", "adaptive", true);
    try {
      const { blk, mem, fe, device } = s;
      const layout = spreadLayout(N, SEGS);
      const want = await writeAll(s, N, SEGS);
      for (let round = 0; round < 5; round++) {
        const pooledBefore = device.stats()[0]?.pooled ?? 0;
        for (let k = 0; k < N; k++) {
          const segs = layout(k, 0x280000);
          scatter(mem, segs, new Uint8Array(SEGS * PAGE));
          blk.submit({ type: VIRTIO_BLK_T_IN, sector: k * SEGS * 8, data: segs });
        }
        blk.kick();
        // GET_VRING_BASE is answered once nothing the worker took is in flight (the pooled read
        // included): whatever it took is in the used ring by then, the rest is taken after the
        // restart from the base it reports.
        const base = await fe.stopVring(0);
        const taken = base - (round + 1) * N;
        assert.ok(taken >= 0 && taken <= N, `base ${base}`);
        assert.equal(device.stats()[0]?.inFlight, 0, "nothing in flight once the ring is stopped");
        await fe.startVring(0, RING, base);
        fe.kick(0);
        const reads = await blk.drain();
        assert.equal(reads.length, N, `round ${round}: every read completed`);
        assert.equal(new Set(reads.map((c) => c.head)).size, N, "each once");
        assert.ok(reads.every((c) => c.status === VIRTIO_BLK_S_OK));
        for (let k = 0; k < N; k++) assert.deepEqual(gather(mem, layout(k, 0x280000)), want[k], `request ${k} read`);
        assert.ok((device.stats()[0]?.pooled ?? 0) - pooledBefore >= 1, "a read went to the pool");
      }
    } finally {
      await s.close();
    }
  });
});
