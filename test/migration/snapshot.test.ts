import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import { lstatSync, mkdtempSync, readFileSync, rmSync, statSync, symlinkSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { test } from "node:test";
import { DiscardMap } from "../../src/memory/discard-map.js";
import type { GuestMemory } from "../../src/memory/guest-memory.js";
import type { GuestMemoryRegion } from "../../src/memory/region.js";
import { MigrationError } from "../../src/migration/errors.js";
import { restoreSnapshot, saveSnapshot, writeProtectSnapshotUnavailable } from "../../src/migration/snapshot.js";
import { Workload } from "../../src/migration/workload.js";
import { fillPattern, MiB, makeMemory, rawDigest } from "./helpers.js";

const dir = mkdtempSync(join(tmpdir(), "vmshift-snap-"));
test.after(() => rmSync(dir, { recursive: true, force: true }));

function copyOf(mem: GuestMemory): Uint8Array[] {
  return mem.regions.map((r) => Uint8Array.from(r.bytes(0, r.size) as Uint8Array));
}

function digestOf(images: Uint8Array[], skip?: (gpa: number) => boolean, bases: number[] = [0, 64 * MiB]): string[] {
  return images.map((img, i) => {
    const h = createHash("sha256");
    for (let off = 0; off < img.length; off += MiB)
      if (!skip?.((bases[i] as number) + off)) h.update(img.subarray(off, off + MiB));
    return h.digest("hex");
  });
}

for (const withDiscard of [false, true]) {
  test(`background snapshot while writers run, then eager and lazy restore${withDiscard ? " (discarded blocks)" : ""}`, async (t) => {
    const why = writeProtectSnapshotUnavailable();
    if (why) return t.skip(why);
    const src = makeMemory();
    const r0 = src.regions[0] as GuestMemoryRegion;
    const dm = new DiscardMap(r0.size, 2 * MiB);
    if (withDiscard) dm.discard(2 * MiB, 6 * MiB);
    const discard = withDiscard ? new Map([[r0, dm]]) : undefined;
    const skip = withDiscard ? (gpa: number) => gpa < 16 * MiB && dm.isDiscarded(gpa) : undefined;
    fillPattern(src, 3, skip);
    const wl = await Workload.start({
      memory: src,
      pattern: "random",
      pagesPerSecond: 0,
      threads: 1,
      ...(discard ? { discard } : {}),
    });
    let reference: Uint8Array[] = [];
    const path = join(dir, `snap-${withDiscard}.img`);
    const res = await saveSnapshot({
      memory: src,
      path,
      ...(discard ? { discard } : {}),
      hooks: {
        stopWriters: () => wl.pause(),
        resumeWriters: () => wl.resume(),
        atSnapshotPoint: () => {
          reference = copyOf(src);
        },
        saveDeviceState: () => [{ name: "dev", blob: Uint8Array.of(9) }],
      },
    });
    const written = wl.pagesWritten;
    await wl.close();
    assert.ok(written > 0);
    assert.ok(res.writeFaults > 0, "writers hit protected pages and were let through after the copy");
    assert.notDeepEqual(rawDigest(src), digestOf(reference), "memory moved on after the snapshot point");
    assert.ok(statSync(path).blocks * 512 < src.size, "zero pages and discarded blocks are holes in the file");
    console.log(
      JSON.stringify({
        withDiscard,
        totalMs: +res.totalMs.toFixed(1),
        pauseMs: +res.pauseMs.toFixed(2),
        writeFaults: res.writeFaults,
        wpMedianUs: +res.writeFaultMedianUs.toFixed(1),
        wpP99Us: +res.writeFaultP99Us.toFixed(1),
      }),
    );
    for (const lazy of [false, true]) {
      const dst = makeMemory();
      const dmap = new DiscardMap(16 * MiB, 2 * MiB);
      const loaded: string[] = [];
      const restore = await restoreSnapshot({
        memory: dst,
        path,
        lazy,
        deferBackground: true,
        discard: new Map([[dst.regions[0] as GuestMemoryRegion, dmap]]),
        loadDeviceState: (s) => {
          loaded.push(s.name);
        },
      });
      let guest: Workload | null = null;
      if (lazy)
        guest = await Workload.start({
          memory: dst,
          mode: "touch",
          threads: 1,
          discard: new Map([[dst.regions[0] as GuestMemoryRegion, dmap]]),
        });
      if (guest) while (guest.pagesWritten < 2000) await new Promise((r) => setTimeout(r, 5));
      restore.startBackground();
      const rr = await restore.done;
      await guest?.close();
      assert.deepEqual(loaded, ["dev"]);
      assert.ok(rr.digests.every((d) => d.match));
      assert.deepEqual(
        rawDigest(dst, skip),
        digestOf(reference, skip),
        `${lazy ? "lazy" : "eager"} restore equals the snapshot point`,
      );
      if (withDiscard) {
        const res0 = (dst.regions[0] as GuestMemoryRegion).mapping!.residency(2 * MiB, 6 * MiB);
        assert.equal(
          res0.reduce((n, v) => n + (v & 1), 0),
          0,
          "discarded blocks not populated by the restore",
        );
      }
      if (lazy) {
        assert.ok(rr.faults > 0, "the guest ran before its memory was in place");
        console.log(
          JSON.stringify({
            lazy,
            faults: rr.faults,
            medianUs: +rr.faultMedianUs.toFixed(1),
            p99Us: +rr.faultP99Us.toFixed(1),
          }),
        );
      }
      dst.close();
    }
    src.close();
  });
}

test("a corrupt snapshot page is CORRUPT at its file offset", async () => {
  const src = makeMemory([4 * MiB, 4 * MiB]);
  fillPattern(src);
  const path = join(dir, "corrupt.img");
  await saveSnapshot({ memory: src, path });
  const { openSync, writeSync, closeSync } = await import("node:fs");
  const fd = openSync(path, "r+");
  writeSync(fd, Buffer.from([0xff]), 0, 1, 4096 + 5 * 4096 + 7);
  closeSync(fd);
  const dst = makeMemory([4 * MiB, 4 * MiB]);
  const r = await restoreSnapshot({ memory: dst, path });
  await assert.rejects(
    r.done,
    (e: unknown) => e instanceof MigrationError && e.code === "CORRUPT" && e.offset === 4096 + 5 * 4096,
  );
  src.close();
  dst.close();
});

test("snapshot save onto a symlink or an existing file: refused, the target intact; --force replaces a file with a 0600 one", async (t) => {
  const mem = makeMemory();
  try {
    const target = join(dir, "victim");
    writeFileSync(target, "do not overwrite", { mode: 0o644 });
    const link = join(dir, "link.snap");
    symlinkSync(target, link);
    await assert.rejects(saveSnapshot({ memory: mem, path: link }), { code: "EEXIST" });
    await assert.rejects(saveSnapshot({ memory: mem, path: link, overwrite: true }), { code: "ELOOP" });
    assert.equal(readFileSync(target, "utf8"), "do not overwrite", "the symlink's target is intact");
    assert.equal(lstatSync(link).isSymbolicLink(), true);
    await assert.rejects(saveSnapshot({ memory: mem, path: target }), { code: "EEXIST" });
    assert.equal(readFileSync(target, "utf8"), "do not overwrite");
    const why = writeProtectSnapshotUnavailable();
    if (why) return t.skip(`overwrite part: ${why}`);
    const fresh = join(dir, "fresh.snap");
    await saveSnapshot({ memory: mem, path: fresh });
    assert.equal(statSync(fresh).mode & 0o777, 0o600, "a new snapshot is owner-only");
    await saveSnapshot({ memory: mem, path: target, overwrite: true });
    assert.equal(statSync(target).mode & 0o777, 0o600, "an overwritten file does not keep its old mode");
    assert.notEqual(readFileSync(target).subarray(0, 16).toString(), "do not overwrite");
  } finally {
    mem.close();
  }
});
