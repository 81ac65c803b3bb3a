/**
 * issue 13, item 6: a memory region whose mmap_offset is not page aligned. The spec puts no
 * alignment on it ("mmap offset: offset where region starts in the mapped memory"); we used to
 * NACK it. Now the back-end maps from the page below and starts the region inside that page.
 * A real memfd, shared by a real front-end whose own region starts at 4096 + 512 in it.
 */
import assert from "node:assert/strict";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { test } from "node:test";
import { echoDevice } from "../../src/devices/examples/echo.js";
import { GuestMemory } from "../../src/memory/guest-memory.js";
import { GuestMemoryRegion } from "../../src/memory/region.js";
import { Mapping } from "../../src/sys/mapping.js";
import { createMemfd } from "../../src/sys/memfd.js";
import { VhostUserDaemon } from "../../src/vhost-user/backend/daemon.js";
import { VhostUserFrontend } from "../../src/vhost-user/frontend/frontend.js";
import { featureMask, VirtioFeature } from "../../src/vhost-user/protocol/constants.js";
import { SplitQueueDriver } from "../../src/virtio/driver.js";
import { openFdCount } from "./fixtures.js";

const MiB = 1 << 20;
const OFFSET = 4096 + 512;
const SIZE = 4 * MiB;
const VERSION_1 = featureMask(VirtioFeature.VIRTIO_F_VERSION_1);
const RING = { size: 16, descTable: 0x1000, availRing: 0x2000, usedRing: 0x3000 };
const SRC = 0x100000;
const DST = 0x240000;

test("mmap_offset 4096+512: the back-end reads and writes the right bytes through a ring, and logs the right pages", async () => {
  const before = openFdCount();
  const dir = mkdtempSync(join(tmpdir(), "vmshift-unaligned-"));
  const sock = join(dir, "echo.sock");
  const daemon = VhostUserDaemon.listen(echoDevice(), sock);
  const serving = daemon.serve();
  // The file holds the region and a page either side of it: nothing of the region is past EOF.
  const fd = createMemfd("vmshift-unaligned", OFFSET + SIZE + 4096, { sealSize: true });
  const region = GuestMemoryRegion.fromFd(fd, 0, SIZE, OFFSET, "memfd");
  const memory = new GuestMemory([region]);
  // A second view of the whole file, to see where the region's bytes really are.
  const file = Mapping.map(fd, OFFSET + SIZE + 4096);
  const fe = VhostUserFrontend.connect(sock, { timeoutMs: 10_000 });
  try {
    assert.equal(region.start, 512, "the region starts 512 bytes into its first mapped page");
    assert.equal(region.backing.offset, OFFSET, "the front-end describes it at the unaligned offset");
    memory.write(0, Uint8Array.of(0xaa));
    assert.equal(file.bytes(OFFSET, 1)?.[0], 0xaa, "guest address 0 is file byte 4096+512");

    const q = new SplitQueueDriver(memory, { ...RING, features: VERSION_1 });
    // Was: SET_MEM_TABLE NACKed ("unaligned mmap offset"), so start() failed here.
    await fe.start({ memory, features: VERSION_1, rings: [RING] });
    await fe.startLogging();

    const data = Uint8Array.from({ length: 3000 }, (_, i) => (i * 7 + 3) & 0xff);
    memory.write(SRC, data);
    q.add([{ addr: SRC, len: data.length }], [{ addr: DST, len: data.length }]);
    if (q.publish()) fe.kick(0);
    let used = q.getUsed();
    while (!used) {
      const since = fe.vring(0).calls;
      used = q.getUsed();
      if (used) break;
      await fe.waitCall(0, { since, timeoutMs: 10_000 });
      used = q.getUsed();
    }
    assert.equal(used.len, data.length, "the echo wrote every byte");
    assert.deepEqual(memory.read(DST, data.length), data, "the back-end read the bytes the front-end wrote");
    assert.deepEqual(
      file.bytes(OFFSET + DST, data.length),
      data,
      "and wrote them at the same file offset the front-end maps guest address DST at",
    );

    const frames = new Set<number>();
    await fe.stopLogging({
      markRange: (gpa, len) => {
        for (let p = Math.floor(gpa / 4096); p * 4096 < gpa + len; p++) frames.add(p);
      },
      markFrames: (fr) => {
        for (const x of Array.from(fr)) frames.add(x);
      },
    });
    assert.ok(frames.has(DST / 4096), `the written buffer's page is in the log: ${[...frames]}`);
    assert.ok(!frames.has(SRC / 4096), "the read buffer is not");
    assert.ok(!frames.has(DST / 4096 - 1) && !frames.has(DST / 4096 + 1), "nor the pages either side of the write");
    assert.ok(frames.has(RING.usedRing / 4096), "the used ring's page is");
  } finally {
    fe.close();
    await daemon.close();
    await serving;
    file.close();
    memory.close();
    rmSync(dir, { recursive: true, force: true });
  }
  assert.equal(openFdCount(), before, "no fd left open");
});

test("a region offset that is not a multiple of 8 is refused with a typed error, its fd closed", () => {
  const before = openFdCount();
  const fd = createMemfd("vmshift-odd", 2 * MiB, { sealSize: true });
  assert.throws(
    () => GuestMemoryRegion.fromFd(fd, 0, MiB, 4096 + 100, "memfd"),
    (e: unknown) => (e as { code?: string }).code === "BAD_REGION" && /multiple of 8/.test(String(e)),
  );
  assert.ok(fd.closed);
  assert.equal(openFdCount(), before);
});
