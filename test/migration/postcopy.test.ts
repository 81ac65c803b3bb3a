import assert from "node:assert/strict";
import { test } from "node:test";
import { DiscardMap } from "../../src/memory/discard-map.js";
import type { GuestMemoryRegion } from "../../src/memory/region.js";
import { MigrationDestination } from "../../src/migration/destination.js";
import { MigrationSource } from "../../src/migration/source.js";
import { Workload } from "../../src/migration/workload.js";
import { startWorker } from "../helpers/workers.js";
import { countFds, fillPattern, MiB, makeMemory, rawDigest, settle, socketPair } from "./helpers.js";

for (const after of [1, 0]) {
  test(`postcopy after ${after} precopy round(s): the destination runs first, faults are served, memory equal`, async () => {
    const fds = countFds();
    const src = makeMemory();
    const dst = makeMemory();
    fillPattern(src);
    const wl = await Workload.start({ memory: src, pattern: "random", pagesPerSecond: 50000 });
    let guest: Workload | null = null;
    const [a, b] = await socketPair();
    const source = new MigrationSource({
      memory: src,
      mode: "postcopy",
      postcopyAfterRounds: after,
      hooks: {
        ...wl.sourceHooks(),
        saveDeviceState: () => [{ name: "cpu0", blob: Uint8Array.of(1, 2, 3) }],
      },
    });
    const loaded: string[] = [];
    const destination = new MigrationDestination({
      memory: dst,
      hooks: {
        loadDeviceState: (s) => {
          loaded.push(`${s.name}:${[...s.blob]}`);
        },
        // The guest starts here before its memory has arrived: its reads fault.
        resume: async () => {
          guest = await Workload.start({ memory: dst, mode: "touch", pattern: "random", threads: 2 });
        },
      },
    });
    const [rs, rd] = await Promise.all([source.run(a), destination.run(b)]);
    assert.equal(rs.mode, "postcopy");
    assert.deepEqual(loaded, ["cpu0:1,2,3"]);
    assert.ok(guest, "destination resumed");
    await (guest as unknown as Workload).close();
    assert.deepEqual(rawDigest(dst), rawDigest(src));
    assert.ok(rs.digests.every((d) => d.match));
    const pc = rd.postcopy;
    assert.ok(pc && pc.remoteFaults > 0, "the guest faulted pages in from the source");
    console.log(
      JSON.stringify({
        after,
        downtimeMs: +rs.downtimeMs.toFixed(2),
        totalMs: +rs.totalMs.toFixed(1),
        faults: pc?.faults,
        remote: pc?.remoteFaults,
        medianUs: pc ? +pc.latencyMedianUs.toFixed(0) : 0,
        p99Us: pc ? +pc.latencyP99Us.toFixed(0) : 0,
      }),
    );
    await wl.close();
    src.close();
    dst.close();
    await settle();
    assert.ok(countFds() <= fds, "no fd leaked (uffd, sockets)"); // a leak is growth (the runtime may close one of its own fds meanwhile)
  });
}

test("discarded blocks: never read or sent, never populated on the destination; a fault there is a zero page", async () => {
  const src = makeMemory();
  const dst = makeMemory();
  const r0 = src.regions[0] as GuestMemoryRegion;
  const d0 = dst.regions[0] as GuestMemoryRegion;
  const smap = new DiscardMap(r0.size, 2 * MiB);
  smap.discard(4 * MiB, 4 * MiB);
  smap.discard(14 * MiB, 2 * MiB);
  const dmap = new DiscardMap(d0.size, 2 * MiB);
  // Content in discarded blocks on the source must never travel.
  fillPattern(src);
  const srcDiscard = new Map([[r0, smap]]);
  const skip = (gpa: number) => gpa < 16 * MiB && smap.isDiscarded(gpa);
  const wl = await Workload.start({ memory: src, pattern: "hotset", pagesPerSecond: 20000, discard: srcDiscard });
  const [a, b] = await socketPair();
  let faultedZero = -1;
  const destination = new MigrationDestination({
    memory: dst,
    discard: new Map([[d0, dmap]]),
    hooks: {
      resume: async () => {
        // A guest thread touching a discarded block: a zero page, without asking the source.
        const w = startWorker({ kind: "uffd-read", sab: d0.windows[0] as SharedArrayBuffer, offset: 5 * MiB + 64 });
        faultedZero = (await w.next()) as number;
        await w.exited;
      },
    },
  });
  const [rs, rd] = await Promise.all([
    new MigrationSource({
      memory: src,
      discard: srcDiscard,
      mode: "postcopy",
      postcopyAfterRounds: 1,
      hooks: wl.sourceHooks(),
    }).run(a),
    destination.run(b),
  ]);
  assert.equal(faultedZero, 0);
  assert.ok((rd.postcopy?.discardFaults ?? 0) >= 1);
  assert.deepEqual([...dmap.ranges(false)], [...smap.ranges(false)], "plug state travelled");
  assert.ok(rs.digests.every((d) => d.match));
  assert.deepEqual(rawDigest(dst, skip), rawDigest(src, skip));
  // Not a single page of a discarded block is resident on the destination, except the one
  // page the guest touched.
  const res = d0.mapping!.residency(4 * MiB, 4 * MiB);
  const resident = res.reduce((n, v) => n + (v & 1), 0);
  assert.equal(resident, 1, "only the touched page is populated");
  const res2 = d0.mapping!.residency(14 * MiB, 2 * MiB);
  assert.equal(
    res2.reduce((n, v) => n + (v & 1), 0),
    0,
  );
  assert.ok(rs.pagesSent <= (src.size - 6 * MiB) / 4096 + 2000, "discarded pages not sent");
  await wl.close();
  src.close();
  dst.close();
});
