/**
 * Guest memory on hugetlbfs: huge pages reserved and a hugetlbfs mounted by the test itself
 * (root only; skipped loudly otherwise), everything put back afterwards.
 */
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { test } from "node:test";
import { GuestMemory } from "../../src/memory/guest-memory.js";
import { GuestMemoryRegion } from "../../src/memory/region.js";
import { Mapping } from "../../src/sys/mapping.js";

const MiB = 1024 * 1024;
const NR = "/proc/sys/vm/nr_hugepages";

function meminfo(key: string): number {
  const m = new RegExp(`^${key}:\\s+(\\d+)`, "m").exec(readFileSync("/proc/meminfo", "utf8"));
  return m ? Number(m[1]) : 0;
}

/** Reserves `pages` free 2 MiB pages and mounts hugetlbfs; returns the mount and an undo. */
function setUp(pages: number): { dir: string; undo: () => void } | string {
  if (process.getuid?.() !== 0) return "not root: cannot reserve huge pages or mount hugetlbfs";
  const before = Number(readFileSync(NR, "utf8"));
  const undo: (() => void)[] = [];
  try {
    if (meminfo("HugePages_Free") < pages) {
      writeFileSync(NR, String(before + pages));
      undo.push(() => writeFileSync(NR, String(before)));
      if (meminfo("HugePages_Free") < pages)
        throw new Error(`only ${meminfo("HugePages_Free")} huge pages could be reserved`);
    }
    const dir = mkdtempSync(join(tmpdir(), "vmshift-huge-"));
    undo.push(() => rmSync(dir, { recursive: true, force: true }));
    execFileSync("mount", ["-t", "hugetlbfs", "-o", "pagesize=2M", "none", dir]);
    undo.push(() => execFileSync("umount", [dir]));
    return {
      dir,
      undo: () => {
        for (const u of undo.reverse()) u();
      },
    };
  } catch (e) {
    for (const u of undo.reverse()) u();
    return `hugetlbfs unavailable: ${(e as Error).message}`;
  }
}

test("a hugetlbfs-backed region: 2 MiB pages, shareable by fd, bounds-checked like any other", async (t) => {
  const env = setUp(4);
  if (typeof env === "string") {
    console.warn(`SKIP hugetlbfs test: ${env}`);
    t.skip(`SKIPPED LOUDLY: ${env}`);
    return;
  }
  try {
    const freeBefore = meminfo("HugePages_Free");
    const r = GuestMemoryRegion.hugetlbfs(join(env.dir, "guest-ram"), 1 << 30, 4 * MiB);
    assert.equal(r.pageSize, 2 * MiB);
    assert.equal(r.backing.kind, "hugetlbfs");
    const mem = new GuestMemory([r]);
    mem.write((1 << 30) + 2 * MiB - 3, Uint8Array.of(1, 2, 3, 4, 5, 6)); // across the huge-page boundary
    assert.deepEqual([...mem.read((1 << 30) + 2 * MiB - 3, 6)], [1, 2, 3, 4, 5, 6]);
    assert.ok(meminfo("HugePages_Free") <= freeBefore - 2, "both huge pages populated from the pool");
    // Another mapping of the same fd (what a vhost-user back-end does) sees the same bytes.
    const other = Mapping.map(r.backing.fd, 4 * MiB);
    assert.deepEqual([...(other.bytes(2 * MiB - 3, 6) as Uint8Array)], [1, 2, 3, 4, 5, 6]);
    assert.ok(readFileSync("/proc/self/maps", "utf8").includes(join(env.dir, "guest-ram")));
    other.close();
    assert.throws(() => mem.read((1 << 30) + 4 * MiB - 1, 2), /not guest memory/);
    // Dirty tracking at huge-page granularity.
    const bm = r.enableDirtyTracking(2 * MiB);
    mem.write((1 << 30) + 3 * MiB, Uint8Array.of(9));
    assert.deepEqual([...bm.dirtyPages()], [1]);
    mem.close();
    assert.throws(() => GuestMemoryRegion.hugetlbfs(join(env.dir, "odd"), 0, 3 * MiB), /multiple of the page size/);
  } finally {
    env.undo();
  }
});
