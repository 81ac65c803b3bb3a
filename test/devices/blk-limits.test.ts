/**
 * issue 12, item 4: what a guest can make `vmshift blk --direct` allocate. The attack: one
 * read of 1000 descriptors over the same unaligned 1 MiB of an 8 MiB guest (1000 MiB through
 * the O_DIRECT bounce buffer, kept afterwards, on the old code). Now seg_max (126) and size_max
 * (1 MiB) are enforced (IOERR, nothing allocated), and a request inside the limits bounces in
 * chunks: the process's peak RSS (VmHWM, reset through /proc/self/clear_refs just before the
 * request) grows by a few MiB, not by the request's size.
 */
import assert from "node:assert/strict";
import { mkdtempSync, readFileSync, rmSync, truncateSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, test } from "node:test";
import { type BlkDevice, blkDevice, SEG_MAX, SIZE_MAX } from "../../src/devices/blk/device.js";
import { GuestMemory } from "../../src/memory/guest-memory.js";
import { GuestMemoryRegion } from "../../src/memory/region.js";
import { VhostUserDaemon } from "../../src/vhost-user/backend/daemon.js";
import { VhostUserFrontend } from "../../src/vhost-user/frontend/frontend.js";
import { featureMask, VirtioFeature } from "../../src/vhost-user/protocol/constants.js";
import { SplitQueueDriver } from "../../src/virtio/driver.js";
import {
  VIRTIO_BLK_S_IOERR,
  VIRTIO_BLK_S_OK,
  VIRTIO_BLK_T_IN,
  VIRTIO_BLK_T_OUT,
  VirtioBlkDriver,
} from "../vhost-user/helpers/virtio-blk-driver.js";

const MiB = 1 << 20;
const QUEUE = 1024;
const RING = { size: QUEUE, descTable: 0x10000, availRing: 0x14000, usedRing: 0x15000 };
const SCRATCH = { headers: 0x18000, statuses: 0x1c000 };
/** One unaligned MiB of guest memory: every descriptor of the attack points here. */
const UNALIGNED = 0x100000 + 1;
const VERSION_1 = featureMask(VirtioFeature.VIRTIO_F_VERSION_1);

const dir = mkdtempSync(join(tmpdir(), "vmshift-blk-limits-"));
const image = join(dir, "disk.img");
let device: BlkDevice;
let daemon: VhostUserDaemon;
let serving: Promise<void>;
let mem: GuestMemory;
let fe: VhostUserFrontend;
let blk: VirtioBlkDriver;

function status(field: "VmHWM" | "VmRSS"): number {
  const m = new RegExp(`^${field}:\\s+(\\d+) kB`, "m").exec(readFileSync("/proc/self/status", "utf8"));
  if (!m) throw new Error(`no ${field} in /proc/self/status`);
  return Number(m[1]) * 1024;
}

/** Peak RSS growth while `fn` runs: the high-water mark is reset to the current RSS first. */
async function peakGrowth(fn: () => Promise<void>): Promise<number> {
  writeFileSync("/proc/self/clear_refs", "5");
  const base = status("VmRSS");
  await fn();
  return status("VmHWM") - base;
}

before(async () => {
  writeFileSync(image, Buffer.alloc(0));
  truncateSync(image, 2048 * MiB); // sparse: the attack reads 1000 MiB of it
  device = blkDevice({ path: image, direct: true });
  const sock = join(dir, "blk.sock");
  daemon = VhostUserDaemon.listen(device, sock);
  serving = daemon.serve();
  mem = new GuestMemory([GuestMemoryRegion.memfd(0, 8 * MiB)]);
  fe = VhostUserFrontend.connect(sock, { timeoutMs: 30_000 });
  const queue = new SplitQueueDriver(mem, { ...RING, features: VERSION_1 });
  await fe.start({ memory: mem, features: VERSION_1, rings: [RING] });
  blk = new VirtioBlkDriver(fe, 0, queue, mem, SCRATCH);
});

after(async () => {
  fe.close();
  await daemon.close();
  await serving;
  mem.close();
  rmSync(dir, { recursive: true, force: true });
});

const segments = (n: number, len = MiB) => Array.from({ length: n }, () => ({ addr: UNALIGNED, len }));

test("the attack: 1000 descriptors over the same unaligned MiB → IOERR, RSS unchanged", async () => {
  let st = -1;
  const growth = await peakGrowth(async () => {
    st = (await blk.run({ type: VIRTIO_BLK_T_IN, sector: 0, data: segments(1000) })).status;
  });
  assert.equal(st, VIRTIO_BLK_S_IOERR, "more than seg_max segments");
  assert.ok(growth < 32 * MiB, `peak RSS grew by ${(growth / MiB).toFixed(1)} MiB`);
});

test("seg_max and size_max: one over either is IOERR, at the limit it is served", async () => {
  const over = await blk.run({ type: VIRTIO_BLK_T_OUT, sector: 0, data: segments(SEG_MAX + 1, 4096) });
  assert.equal(over.status, VIRTIO_BLK_S_IOERR, "seg_max + 1 segments");
  const big = await blk.run({ type: VIRTIO_BLK_T_IN, sector: 0, data: [{ addr: 0x200000, len: SIZE_MAX + 512 }] });
  assert.equal(big.status, VIRTIO_BLK_S_IOERR, "a segment over size_max");
  const fine = await blk.run({ type: VIRTIO_BLK_T_OUT, sector: 8, data: segments(4, SIZE_MAX) });
  assert.equal(fine.status, VIRTIO_BLK_S_OK, "4 unaligned segments of size_max");
});

test(`inside the limits (${SEG_MAX} unaligned MiB): bounced in chunks, peak RSS bounded, data right`, async () => {
  mem.fill(UNALIGNED, MiB, 0xee);
  let done = { status: -1, len: 0 };
  const growth = await peakGrowth(async () => {
    done = await blk.run({ type: VIRTIO_BLK_T_IN, sector: 2048, data: segments(SEG_MAX) });
  });
  assert.equal(done.status, VIRTIO_BLK_S_OK);
  assert.equal(done.len, SEG_MAX * MiB + 1);
  assert.ok(
    mem.read(UNALIGNED, MiB).every((b) => b === 0),
    "the (sparse) image's zeros reached guest memory",
  );
  assert.ok(growth < 32 * MiB, `peak RSS grew by ${(growth / MiB).toFixed(1)} MiB for a ${SEG_MAX} MiB request`);
});
