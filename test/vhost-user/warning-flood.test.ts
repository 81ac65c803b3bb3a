/**
 * issue 12, item 7: a guest that submits malformed chains as fast as it can. Each one is
 * refused and returned (used length 0), but the warnings are rate-limited per queue worker:
 * a burst, then about one a second, the next one saying how many were dropped. On the old
 * code every chain was one log line (and one message to the control plane).
 */
import assert from "node:assert/strict";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { test } from "node:test";
import { echoDevice } from "../../src/devices/examples/echo.js";
import { GuestMemory } from "../../src/memory/guest-memory.js";
import { GuestMemoryRegion } from "../../src/memory/region.js";
import { VhostUserDaemon } from "../../src/vhost-user/backend/daemon.js";
import { VhostUserFrontend } from "../../src/vhost-user/frontend/frontend.js";
import { featureMask, VirtioFeature } from "../../src/vhost-user/protocol/constants.js";
import { SplitQueueDriver } from "../../src/virtio/driver.js";

const MiB = 1 << 20;
const QUEUE = 1024;
const RING = { size: QUEUE, descTable: 0x10000, availRing: 0x14000, usedRing: 0x15000 };
const VERSION_1 = featureMask(VirtioFeature.VIRTIO_F_VERSION_1);
const FLOOD = 1000;

test(`${FLOOD} malformed chains: every one returned, the log stays a handful of lines`, async () => {
  const dir = mkdtempSync(join(tmpdir(), "vmshift-flood-"));
  const sock = join(dir, "echo.sock");
  const daemon = VhostUserDaemon.listen(echoDevice(), sock);
  const warnings: string[] = [];
  daemon.on("log", (level, msg) => {
    if (level === "warn") warnings.push(msg);
  });
  const serving = daemon.serve();
  const mem = new GuestMemory([GuestMemoryRegion.memfd(0, 4 * MiB)]);
  const fe = VhostUserFrontend.connect(sock, { timeoutMs: 30_000 });
  try {
    const q = new SplitQueueDriver(mem, { ...RING, features: VERSION_1 });
    await fe.start({ memory: mem, features: VERSION_1, rings: [RING] });
    const t0 = performance.now();
    // One descriptor far outside guest memory, offered FLOOD times.
    q.writeDescriptor(0, 0x7fff_0000_0000n, 64, 0, 0);
    for (let i = 0; i < FLOOD; i++) q.offerHead(0);
    if (q.publish()) fe.kick(0);
    const usedIdx = () => mem.atomicLoadU16(RING.usedRing + 2);
    while (usedIdx() !== FLOOD) {
      const since = fe.vring(0).calls;
      if (usedIdx() === FLOOD) break;
      await fe.waitCall(0, { since, timeoutMs: 30_000 }).catch((e) => {
        throw new Error(`used idx ${usedIdx()}, calls ${fe.vring(0).calls} since ${since}: ${e.message}`);
      });
    }
    // Stopping the ring is a round trip to the worker: the warnings it posted before are in.
    await fe.stopVring(0);
    const seconds = (performance.now() - t0) / 1000;
    const bound = 10 + Math.ceil(seconds) + 1;
    const chainWarnings = warnings.filter((w) => /chain 0/.test(w));
    assert.ok(chainWarnings.length >= 1, "the first malformed chain is reported");
    assert.ok(
      chainWarnings.length <= bound,
      `${chainWarnings.length} warnings for ${FLOOD} malformed chains in ${seconds.toFixed(1)} s (at most ${bound})`,
    );
  } finally {
    fe.close();
    await daemon.close();
    await serving;
    mem.close();
    rmSync(dir, { recursive: true, force: true });
  }
});
