import assert from "node:assert/strict";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { test } from "node:test";
import { GuestMemory } from "../../src/memory/guest-memory.js";
import { GuestMemoryRegion } from "../../src/memory/region.js";
import { MigrationError } from "../../src/migration/errors.js";
import { MigrationSource } from "../../src/migration/source.js";
import { connectEndpoint } from "../../src/migration/transport.js";
import { Workload } from "../../src/migration/workload.js";
import { spawnNode } from "../helpers/proc.js";
import { countFds, fillPattern, MiB, rawDigest, settle } from "./helpers.js";

test("the destination process is killed mid-precopy: the source fails typed and keeps running", async () => {
  const fds = countFds();
  const dir = mkdtempSync(join(tmpdir(), "vmshift-kill-"));
  const path = join(dir, "mig.sock");
  const { child, done } = spawnNode(new URL("./dest-child.js", import.meta.url), [path, "32"]);
  await new Promise<void>((r) => child.stdout?.on("data", (d: string) => d.includes("ready") && r()));
  const mem = new GuestMemory([GuestMemoryRegion.memfd(0, 32 * MiB)]);
  fillPattern(mem);
  const wl = await Workload.start({ memory: mem, pattern: "random", pagesPerSecond: 0 });
  const h = wl.sourceHooks();
  let stopped = 0;
  let resumed = 0;
  const source = new MigrationSource({
    memory: mem,
    downtimeLimitMs: 0.001,
    maxRounds: 1000,
    hooks: {
      ...h,
      stopWriters: () => {
        stopped++;
        return h.stopWriters?.();
      },
      resumeWriters: () => {
        resumed++;
        return h.resumeWriters?.();
      },
    },
  });
  source.events.on("round", (r) => {
    if (r.round === 2) child.kill("SIGKILL");
  });
  const s = await connectEndpoint({ kind: "unix", path });
  await assert.rejects(source.run(s), (e: unknown) => e instanceof MigrationError && e.code === "CONNECTION_LOST");
  const res = await done;
  assert.equal(res.signal, "SIGKILL");
  assert.equal(stopped, resumed);
  // The source's writers keep running: wait for the condition, not for a time.
  const w0 = wl.pagesWritten;
  while (wl.pagesWritten <= w0) await settle();
  await wl.close();
  const before = rawDigest(mem);
  assert.equal(before.length, 1);
  mem.close();
  rmSync(dir, { recursive: true, force: true });
  await settle();
  // A leak is growth; the runtime may have closed one of its own fds meanwhile.
  const after = countFds();
  assert.ok(after <= fds, `no fd leaked (${after} open, ${fds} before)`);
});
