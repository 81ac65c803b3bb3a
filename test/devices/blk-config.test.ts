/**
 * The virtio-blk config space and GET_ID to the letter of virtio 1.2 section 5.2 (issue 13, item 7):
 * writeback follows FLUSH, seg_max follows the queue size, GET_ID is NUL-padded ASCII, min_io_size
 * counts logical blocks.
 */
import assert from "node:assert/strict";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, test } from "node:test";
import { blkDevice, blkId } from "../../src/devices/blk/device.js";
import type { BlkWorkerData } from "../../src/devices/blk/handler.js";
import type { VhostUserDevice } from "../../src/vhost-user/backend/device.js";
import { autoQueueWorkers } from "../../src/vhost-user/backend/queue-thread.js";
import { featureMask, VirtioFeature } from "../../src/vhost-user/protocol/constants.js";

const dir = mkdtempSync(join(tmpdir(), "vmshift-blk-config-"));
after(() => rmSync(dir, { recursive: true, force: true }));
const image = join(dir, "disk.img");
writeFileSync(image, new Uint8Array(1 << 20));

const VERSION_1 = featureMask(VirtioFeature.VIRTIO_F_VERSION_1);
const FLUSH = featureMask(9);
const CONFIG_WCE = featureMask(11);
const LOG_ALL = featureMask(VirtioFeature.VHOST_F_LOG_ALL);
function config(d: VhostUserDevice, offset: number, size: number): Uint8Array {
  if (!d.getConfig) throw new Error("no config space");
  return d.getConfig(offset, size);
}
const u32 = (b: Uint8Array, off: number) => new DataView(b.buffer, b.byteOffset).getUint32(off, true);
const u16 = (b: Uint8Array, off: number) => new DataView(b.buffer, b.byteOffset).getUint16(off, true);

test("writeback: 0 when CONFIG_WCE is negotiated without FLUSH; 1 with FLUSH; a LOG_ALL toggle keeps the driver's choice", () => {
  const d = blkDevice({ path: image });
  const wb = () => config(d, 32, 1)[0];
  d.setFeatures?.(VERSION_1 | CONFIG_WCE);
  assert.equal(wb(), 0, "the spec: the device MUST initialize writeback to 0");
  assert.equal(d.writeback, false, "and behaves as writethrough");
  d.reset?.();
  d.setFeatures?.(VERSION_1 | CONFIG_WCE | FLUSH);
  assert.equal(wb(), 1);
  assert.equal(d.writeback, true);
  // The driver picks writethrough; migration toggles LOG_ALL through SET_FEATURES.
  d.setConfig?.(32, Uint8Array.of(0));
  d.setFeatures?.(VERSION_1 | CONFIG_WCE | FLUSH | LOG_ALL);
  d.setFeatures?.(VERSION_1 | CONFIG_WCE | FLUSH);
  assert.equal(wb(), 0, "the driver's writethrough survives");
  assert.equal(d.writeback, false);
  // Without FLUSH (and without CONFIG_WCE) nothing can make writes durable but the device.
  d.reset?.();
  d.setFeatures?.(VERSION_1);
  assert.equal(d.writeback, false);
});

test("seg_max is the queue size minus 2 (QEMU's rule), not 126 whatever the queue", () => {
  assert.equal(u32(config(blkDevice({ path: image }), 0, 60), 12), 126, "default queue of 128");
  assert.equal(u32(config(blkDevice({ path: image, queueSize: 64 }), 0, 60), 12), 62);
  assert.equal(u32(config(blkDevice({ path: image, queueSize: 256 }), 0, 60), 12), 254);
  assert.equal(u32(config(blkDevice({ path: image, maxQueueSize: 32 }), 0, 60), 12), 30);
  assert.throws(() => blkDevice({ path: image, queueSize: 2 }), RangeError);
});

test("queue workers: half the host's CPUs by default, at most one per queue; 0 refused", () => {
  assert.equal(autoQueueWorkers(2, 2), 1, "two CPUs: both queues on one thread");
  assert.equal(autoQueueWorkers(4, 4), 2);
  assert.equal(autoQueueWorkers(2, 64), 2, "never more threads than queues");
  assert.equal(autoQueueWorkers(8, 1), 1);
  assert.equal(blkDevice({ path: image, queues: 4 }).info.queueWorkers, autoQueueWorkers(4));
  assert.equal(blkDevice({ path: image, queues: 4, queueWorkers: 3 }).info.queueWorkers, 3);
  assert.throws(() => blkDevice({ path: image, queueWorkers: 0 }), RangeError);
});

test("min_io_size counts logical blocks (one), not 512-byte sectors", () => {
  const cfg = config(blkDevice({ path: image }), 0, 60);
  assert.equal(u32(cfg, 20), 512, "blk_size");
  assert.equal(u16(cfg, 26), 1);
});

test("GET_ID is NUL-padded ASCII of 20 bytes: a UTF-8 file name is not cut mid-character", () => {
  const id = blkId(undefined, "/images/disk-\u00fc\u00e9-\u4e2d\u6587-long-name.img");
  assert.equal(id.length, 20);
  assert.ok(
    [...id].every((b) => b === 0 || (b >= 0x20 && b <= 0x7e)),
    "ASCII or NUL only",
  );
  assert.equal(Buffer.from(id).toString("latin1"), "disk-__-__-long-name");
  const short = blkId("vd0", "/x");
  assert.deepEqual([...short], [0x76, 0x64, 0x30, ...Array(17).fill(0)]);
  assert.throws(() => blkId("caf\u00e9", "/x"), RangeError);
  assert.throws(() => blkId("x".repeat(21), "/x"), RangeError);
  const d = blkDevice({ path: image, serial: "serial-1" });
  const data = d.workerData ? (d.workerData(0) as BlkWorkerData) : null;
  assert.deepEqual(data?.id, blkId("serial-1", image));
});
