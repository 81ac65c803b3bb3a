/**
 * Live migration of a QEMU 10 guest whose virtio-fs back-end is `vmshift fs`, on both sides (two
 * QEMUs, each with its own `vmshift fs` over the same directory). The guest keeps a file open
 * across the migration (one fd for reading, one for appending) and uses both on the destination:
 * the handles travelled in the back-end's device state (SET_DEVICE_STATE_FD save on the source,
 * load on the destination, CHECK_DEVICE_STATE), the destination back-end never saw an OPEN for
 * them. Meanwhile a loop writes files and reads them back through the back-end (READ replies are
 * written into guest memory: they must be in the dirty log), and must find its data on the
 * destination. Precopy, then postcopy (a real postcopy phase: the bandwidth is capped).
 * Skips loudly when QEMU or the guest is missing (VMSHIFT_REQUIRE_INTEROP=1 fails instead).
 */
import assert from "node:assert/strict";
import { mkdir, readFile, stat, writeFile } from "node:fs/promises";
import { describe, test } from "node:test";
import { skipBanner } from "./blk-helpers.js";
import { linesAcrossMigration, loopReached } from "./console.js";
import { type FsBackend, fsDeviceArgs, fsFixture, startFs } from "./fs-helpers.js";
import {
  GUEST_CRASH,
  type MigrateOptions,
  migrate,
  parseRigRecords,
  probeInterop,
  type Rig,
  sha256OfFileRange,
} from "./rig.js";

const probe = await probeInterop({ needQsd: false });
const skip = skipBanner("test/interop/fs-migrate.test", probe.ok ? null : probe.reason);
if (!probe.ok && process.env.VMSHIFT_REQUIRE_INTEROP === "1") {
  test("QEMU interop rig is available (VMSHIFT_REQUIRE_INTEROP=1)", () => assert.fail(probe.reason));
}

const LOG_ALL = 1n << 26n;
const maxN = (lines: string[]) => Math.max(0, ...parseRigRecords(lines, "RIG-FLOOP").map((r) => Number(r.fields.n)));

async function stateLines(be: FsBackend, what: string): Promise<{ inodes: number; handles: number; stale: number }[]> {
  const out: { inodes: number; handles: number; stale: number }[] = [];
  const re = new RegExp(
    `${what}: (\\d+) inode\\(s\\), (\\d+) handle\\(s\\)(?:, (\\d+) inode\\(s\\) and (\\d+) handle)?`,
    "g",
  );
  for (const m of (await be.log()).matchAll(re))
    out.push({ inodes: Number(m[1]), handles: Number(m[2]), stale: Number(m[3] ?? 0) + Number(m[4] ?? 0) });
  return out;
}

async function scenario(
  rig: Rig,
  backends: { close(): Promise<void> }[],
  tag: string,
  mig: Omit<MigrateOptions, "uri">,
) {
  const share = rig.path(`share-${tag}`);
  await mkdir(share);
  await writeFile(`${share}/held.txt`, "written-on-the-host-before-boot\n");
  const a = await startFs(rig, { name: `fs-a-${tag}`, sharedDir: share });
  const b = await startFs(rig, { name: `fs-b-${tag}`, sharedDir: share });
  backends.push(a, b);
  const [src, dst] = await Promise.all([
    rig.startVm({ name: `src-${tag}`, extraArgs: fsDeviceArgs(a.socket, "share"), append: "init_on_alloc=0" }),
    rig.startVm({
      name: `dst-${tag}`,
      extraArgs: fsDeviceArgs(b.socket, "share"),
      incoming: true,
      // Faults our back-end's userfaultfd reported to QEMU (postcopy).
      trace: mig.postcopy ? ["vhost_user_postcopy_fault_handler*"] : [],
    }),
  ]);
  await src.guest.ready();
  await src.guest.runOk("rig_fs_mount share /mnt; mkdir -p /mnt/loop; rig_fhold /mnt/held.txt");
  await src.console.waitFor(/RIG-FHOLD-OPEN/, { timeoutMs: 20_000 });
  await src.guest.runOk("rig_floop /mnt/loop 0.05; rig_dirty 16 0.05");
  await src.console.waitFor(loopReached("RIG-FLOOP", 3), { timeoutMs: 30_000 });

  const result = await migrate(src, dst, { uri: rig.migrationUri(), timeoutMs: 90_000, ...mig });
  assert.equal(result.status, "completed");
  assert.equal(await dst.status(), "running");

  // The loop goes on on the destination, and the held handles work there.
  const lastSrc = maxN(src.console.lines);
  await dst.console.waitFor(loopReached("RIG-FLOOP", lastSrc + 3), { timeoutMs: 30_000 });
  await dst.guest.runOk("touch /tmp/rig-fhold-go");
  await dst.console.waitFor(/RIG-FHOLD-CLOSED/, { timeoutMs: 20_000 });
  await dst.guest.runOk("rig_floop_stop; rig_dirty_stop");
  await dst.console.waitFor(/RIG-FLOOP-STOPPED/, { timeoutMs: 20_000 });

  const all = linesAcrossMigration(src.console, dst.console);
  const held = await readFile(`${share}/held.txt`, "utf8");
  assert.equal(
    held,
    "written-on-the-host-before-boot\nwritten-through-the-held-handle\n",
    "append through the held fd",
  );
  const heldRec = parseRigRecords(dst.console.lines, "RIG-FHOLD")[0];
  assert.equal(
    heldRec?.fields.sha256,
    await sha256OfFileRange(`${share}/held.txt`, 0, (await stat(`${share}/held.txt`)).size),
    "the fd opened on the source reads the whole file on the destination",
  );
  assert.deepEqual(dst.console.grep(/RIG-ERROR/), [], "no error in the guest");
  assert.deepEqual(
    all.filter((l) => l.includes("io=MISMATCH")),
    [],
    "every read-back matched (READ data is in the dirty log)",
  );
  assert.ok(maxN(dst.console.lines) > lastSrc, "the file loop ran on the destination");
  // Each loop file holds its last write.
  const last = new Map<string, string>();
  for (const r of parseRigRecords(all, "RIG-FLOOP")) last.set(r.fields.file as string, r.fields.sha256 as string);
  for (const [f, sha] of last) {
    const p = f.replace(/^\/mnt/, share);
    assert.equal(await sha256OfFileRange(p, 0, (await stat(p)).size), sha, f);
  }
  assert.deepEqual(dst.console.grep(GUEST_CRASH), [], "destination guest kernel is healthy");

  // The back-ends' side: logging on the source, the state saved there and loaded here.
  const ra = await a.requests();
  const rb = await b.requests();
  const feats = ra.filter((r) => r.name === "SET_FEATURES").map((r) => BigInt(r.detail.split(" ")[0] ?? "0"));
  assert.ok(
    feats.some((f) => (f & LOG_ALL) !== 0n),
    "the source was switched to dirty logging",
  );
  assert.ok(ra.some((r) => r.name === "SET_LOG_BASE"));
  assert.ok(ra.some((r) => r.name === "SET_DEVICE_STATE_FD") && ra.some((r) => r.name === "CHECK_DEVICE_STATE"));
  assert.ok(rb.some((r) => r.name === "SET_DEVICE_STATE_FD") && rb.some((r) => r.name === "CHECK_DEVICE_STATE"));
  const saved = await stateLines(a, "state saved");
  const loaded = await stateLines(b, "migrated state loaded");
  assert.equal(saved.length, 1, "one save on the source");
  assert.equal(loaded.length, 1, "one load on the destination");
  assert.ok((saved[0]?.handles ?? 0) >= 2, `the two held fds travelled: ${JSON.stringify(saved)}`);
  assert.deepEqual(loaded[0], saved[0], "everything saved was loaded, nothing stale");
  let faults = 0;
  if (mig.postcopy) {
    const names = rb.map((r) => r.name);
    assert.ok(names.indexOf("POSTCOPY_ADVISE") >= 0, "POSTCOPY_ADVISE");
    assert.ok(names.indexOf("POSTCOPY_LISTEN") > names.indexOf("POSTCOPY_ADVISE"), "POSTCOPY_LISTEN after ADVISE");
    assert.ok(names.indexOf("POSTCOPY_END") > names.indexOf("POSTCOPY_LISTEN"), "POSTCOPY_END");
    faults = (await readFile(rig.path(`dst-${tag}.stderr.log`), "utf8"))
      .split("\n")
      .filter((l) => l.includes("vhost_user_postcopy_fault_handler_found")).length;
  }
  assert.deepEqual((await a.log()).match(/error: .*/g) ?? [], []);
  assert.deepEqual((await b.log()).match(/error: .*/g) ?? [], []);
  process.stderr.write(
    `fs ${tag}: ${result.statuses.join(" → ")} total ${result.totalTimeMs} ms, downtime ${result.downtimeMs} ms, ` +
      `postcopy requests ${result.ram.postcopyRequests ?? 0}, faults on the dst back-end's uffd ${faults}; ` +
      `state ${JSON.stringify(saved[0])}; ` +
      `file loop n ${lastSrc} on src → ${maxN(dst.console.lines)} on dst\n`,
  );
  await Promise.all([src.close(), dst.close()]);
  return result;
}

describe("vmshift fs: live migration under QEMU", { timeout: 240_000 }, () => {
  const fx = fsFixture("fs-mig", probe.ok);

  test("precopy: a file held open in the guest reads and writes on the destination", { skip }, async () => {
    await scenario(fx.rig(), fx.backends, "pre", {});
  });

  test("postcopy: the same, through a real postcopy phase", { skip }, async () => {
    const rig = fx.rig();
    const result = await scenario(rig, fx.backends, "post", {
      postcopy: true,
      postcopyAfterMs: 1500,
      maxBandwidth: 20_000_000,
    });
    assert.ok(result.statuses.includes("postcopy-active"), `went through postcopy: ${result.statuses.join(" → ")}`);
    assert.ok((result.ram.postcopyRequests ?? 0) > 0, `postcopy page requests: ${result.ram.postcopyRequests}`);
  });
});
