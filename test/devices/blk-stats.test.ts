/**
 * vmshift blk's per-queue counters, from a real front-end's requests over a real socket: every
 * completed request counted once by type, bytes moved, errors (IOERR/UNSUPP), nothing left in
 * flight; a guest's bad request reaches the control plane as a log event (the handler never
 * writes to stderr itself); the counters as Prometheus serves them.
 */
import assert from "node:assert/strict";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, test } from "node:test";
import { addBlkMetrics, Metrics } from "../../src/cli/metrics.js";
import { blkDevice } from "../../src/devices/blk/device.js";
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
  VirtioBlkDriver,
} from "../vhost-user/helpers/virtio-blk-driver.js";

const MiB = 1 << 20;
const RING = { size: 64, descTable: 0x1000, availRing: 0x2000, usedRing: 0x3000 };
const VERSION_1 = featureMask(VirtioFeature.VIRTIO_F_VERSION_1);
const DATA = 0x100000;
const dir = mkdtempSync(join(tmpdir(), "vmshift-blk-stats-"));
after(() => rmSync(dir, { recursive: true, force: true }));

test("per-queue counters: requests by type, bytes, errors, in flight; warnings as log events; /metrics", async () => {
  const image = join(dir, "disk.img");
  writeFileSync(image, Buffer.alloc(4 * MiB, 0x5a));
  const device = blkDevice({ path: image, queues: 1 });
  const sock = join(dir, "blk.sock");
  const daemon = VhostUserDaemon.listen(device, sock);
  const logs: string[] = [];
  daemon.on("log", (level, m) => logs.push(`${level}: ${m}`));
  const serving = daemon.serve();
  const mem = new GuestMemory([GuestMemoryRegion.memfd(0, 4 * MiB)]);
  const fe = VhostUserFrontend.connect(sock, { timeoutMs: 5000 });
  const metrics = new Metrics({ process: false });
  addBlkMetrics(metrics, {
    queues: () => device.stats(),
    reconnects: () => 0,
    connected: () => true,
    dirtyLogActive: () => false,
  });
  const http = await metrics.serve({ host: "127.0.0.1", port: 0 });
  try {
    const queue = new SplitQueueDriver(mem, { ...RING, features: VERSION_1 });
    await fe.start({ memory: mem, features: VERSION_1, rings: [RING] });
    const blk = new VirtioBlkDriver(fe, 0, queue, mem, { headers: 0x10000, statuses: 0x11000 });
    assert.deepEqual(device.stats()[0], {
      queue: 0,
      reads: 0,
      writes: 0,
      flushes: 0,
      others: 0,
      readBytes: 0,
      writeBytes: 0,
      errors: 0,
      inFlight: 0,
      pooled: 0,
    });
    for (let i = 0; i < 3; i++) assert.equal((await blk.read(i * 8, DATA, 4096)).status, VIRTIO_BLK_S_OK);
    assert.equal((await blk.write(64, DATA, 8192)).status, VIRTIO_BLK_S_OK);
    assert.equal((await blk.run({ type: VIRTIO_BLK_T_FLUSH, sector: 0, data: [] })).status, VIRTIO_BLK_S_OK);
    // The guest's mistakes: a read past the end (IOERR), an unknown type (UNSUPP).
    assert.equal((await blk.read((4 * MiB) / 512, DATA, 512)).status, VIRTIO_BLK_S_IOERR);
    assert.equal((await blk.run({ type: 99, sector: 0, data: [] })).status, VIRTIO_BLK_S_UNSUPP);
    assert.deepEqual(device.stats()[0], {
      queue: 0,
      reads: 4,
      writes: 1,
      flushes: 1,
      others: 1,
      readBytes: 3 * 4096,
      writeBytes: 8192,
      errors: 2,
      inFlight: 0,
      pooled: 0,
    });
    // The warning travels from the queue's thread to the daemon's "log" event (a message, so
    // it may come after the completion): wait for it.
    const warned = () =>
      logs.some((l) => /^warn: queue 0: read of 512 bytes at sector 8192: outside the image/.test(l));
    const until = Date.now() + 5000;
    while (!warned() && Date.now() < until) await new Promise((r) => setTimeout(r, 5));
    assert.ok(warned(), `the bad read was logged through the daemon: ${logs.join(" | ")}`);
    const text = await (await fetch(`${http.url}/metrics`)).text();
    assert.match(text, /^vmshift_blk_requests_total\{queue="0",type="read"\} 4$/m);
    assert.match(text, /^vmshift_blk_requests_total\{queue="0",type="write"\} 1$/m);
    assert.match(text, /^vmshift_blk_bytes_total\{queue="0",direction="read"\} 12288$/m);
    assert.match(text, /^vmshift_blk_errors_total\{queue="0"\} 2$/m);
    assert.match(text, /^vmshift_blk_in_flight\{queue="0"\} 0$/m);
    assert.match(text, /^vmshift_blk_pooled_total\{queue="0"\} 0$/m, "QD1: every transfer inline");
    assert.match(text, /^vmshift_vhost_user_reconnects_total 0$/m);
    assert.match(text, /^vmshift_vhost_user_dirty_log_active 0$/m);
    assert.equal((await fetch(`${http.url}/other`)).status, 404);
  } finally {
    await http.close();
    fe.close();
    await daemon.close();
    await serving;
    mem.close();
  }
});
