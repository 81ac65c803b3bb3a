/**
 * Precopy migration with `vmshift blk` as the vhost-user-blk back-end on both sides (two QEMU 10,
 * each with its own `vmshift blk` on the same image file: shared storage), the guest doing disk
 * I/O and dirtying RAM. Checks that QEMU really switched our back-end to dirty logging (the
 * back-end's request trace: SET_FEATURES with VHOST_F_LOG_ALL, SET_LOG_BASE with an fd), that
 * the guest goes on on the destination with intact data and no I/O error; and that a cancelled
 * migration (destination back-end killed mid-way) leaves the source running with its disk intact.
 * Skips loudly when QEMU or the guest is missing (VMSHIFT_REQUIRE_INTEROP=1 fails instead).
 */
import assert from "node:assert/strict";
import { describe, test } from "node:test";
import { setTimeout as sleep } from "node:timers/promises";
import { type BlkBackend, blkFixture, skipBanner, startBlk } from "./blk-helpers.js";
import { linesAcrossMigration, loopReached } from "./console.js";
import {
  GUEST_CRASH,
  MiB,
  migrate,
  parseRigRecords,
  probeInterop,
  queryMigrate,
  setCapabilities,
  sha256OfFileRange,
  type Vm,
} from "./rig.js";

const probe = await probeInterop();
const skip = skipBanner("test/interop/blk-migrate.test", probe.ok ? null : probe.reason);
if (!probe.ok && process.env.VMSHIFT_REQUIRE_INTEROP === "1") {
  test("QEMU interop rig is available (VMSHIFT_REQUIRE_INTEROP=1)", () => assert.fail(probe.reason));
}

const LOG_ALL = 1n << 26n;
const maxLoopN = (lines: string[]) => Math.max(0, ...parseRigRecords(lines, "RIG-LOOP").map((r) => Number(r.fields.n)));

/** SET_FEATURES values the back-end received, in order. */
async function featureWrites(be: BlkBackend): Promise<bigint[]> {
  return (await be.requests())
    .filter((r) => r.name === "SET_FEATURES")
    .map((r) => BigInt(r.detail.split(" ")[0] ?? "0"));
}

/** Every loop slot's last write (from the consoles) is what the image holds. */
async function checkLoopSlots(img: string, lines: string[]): Promise<number> {
  const lastBySlot = new Map<number, string>();
  for (const r of parseRigRecords(lines, "RIG-LOOP")) lastBySlot.set(Number(r.fields.off), r.fields.sha256 as string);
  for (const [off, sha] of lastBySlot) {
    assert.equal(await sha256OfFileRange(img, off * MiB, MiB), sha, `loop slot at ${off} MiB`);
  }
  return lastBySlot.size;
}

async function startLoad(vm: Vm): Promise<void> {
  await vm.guest.runOk("rig_loop /dev/vda 8 8 0.1; rig_dirty 16 0.05");
  await vm.console.waitFor(loopReached("RIG-LOOP", 3), { timeoutMs: 20_000 });
}

describe("vmshift blk: precopy migration under QEMU", { timeout: 150_000 }, () => {
  const fx = blkFixture("blk-mig", probe.ok);
  const backends = fx.backends;

  test("precopy with I/O and RAM dirtying: logging switched on, data intact on the destination", { skip }, async () => {
    const rig = fx.rig();
    const img = await rig.createRawImage("mig.img", 64 * MiB);
    // The source logs its writes to guest memory from pool threads' reads (--io async).
    const a = await startBlk(rig, { name: "blk-a", image: img, io: "async" });
    const b = await startBlk(rig, { name: "blk-b", image: img });
    backends.push(a, b);
    const [src, dst] = await Promise.all([
      rig.startVm({ name: "src", vhostUserBlk: [{ socket: a.socket }] }),
      rig.startVm({ name: "dst", vhostUserBlk: [{ socket: b.socket }], incoming: true }),
    ]);
    await src.guest.ready();
    const before = await src.guest.write("/dev/vda", 1, 4);
    await startLoad(src);

    const result = await migrate(src, dst, { uri: rig.migrationUri(), timeoutMs: 60_000 });
    assert.equal(result.status, "completed");
    assert.equal(await src.status(), "postmigrate");
    assert.equal(await dst.status(), "running");

    const lastSrcN = maxLoopN(src.console.lines);
    await dst.console.waitFor(loopReached("RIG-LOOP", lastSrcN + 2), { timeoutMs: 30_000 });
    await dst.guest.runOk("rig_loop_stop; rig_dirty_stop");
    await dst.console.waitFor(/RIG-LOOP-STOPPED/, { timeoutMs: 20_000 });
    assert.equal(await dst.guest.sum("/dev/vda", 1, 4), before, "data written before migration reads back on dst");
    const afterSha = await dst.guest.write("/dev/vda", 20, 2);

    const all = linesAcrossMigration(src.console, dst.console);
    assert.deepEqual(
      all.filter((l) => l.includes("io=MISMATCH")),
      [],
    );
    assert.deepEqual(dst.console.grep(GUEST_CRASH), [], "destination guest kernel is healthy");
    assert.deepEqual(dst.console.grep(/I\/O error|blk_update_request/), [], "no I/O error on dst");
    assert.ok((await checkLoopSlots(img, all)) > 0);
    assert.equal(await sha256OfFileRange(img, 1 * MiB, 4 * MiB), before);
    assert.equal(await sha256OfFileRange(img, 20 * MiB, 2 * MiB), afterSha);

    // What the source back-end saw: logging switched on (LOG_ALL + a log fd) during the migration.
    const reqs = await a.requests();
    const feats = await featureWrites(a);
    assert.ok(
      feats.some((f) => (f & LOG_ALL) !== 0n),
      `SET_FEATURES with LOG_ALL: ${feats.map((f) => f.toString(16))}`,
    );
    const logBases = reqs.filter((r) => r.name === "SET_LOG_BASE");
    assert.ok(logBases.length > 0 && logBases.every((r) => r.detail.includes("fds=1")), "SET_LOG_BASE with an fd");
    assert.deepEqual((await a.log()).match(/ ERROR +blk: .*/g) ?? [], [], "no error in the source back-end's log");
    process.stderr.write(
      `blk precopy: ${result.status} total ${result.totalTimeMs} ms, downtime ${result.downtimeMs} ms, ` +
        `${result.ram.transferred} bytes, ${result.ram.dirtySyncCount} sync rounds; ` +
        `src back-end: ${logBases.length} SET_LOG_BASE, SET_FEATURES ${feats.map((f) => `0x${f.toString(16)}`).join(" ")}; ` +
        `loop n ${lastSrcN} on src → ${maxLoopN(dst.console.lines)} on dst\n`,
    );
    await Promise.all([src.close(), dst.close()]);
  });

  test("a cancelled migration (destination back-end killed) leaves the source running, disk intact", {
    skip,
  }, async () => {
    const rig = fx.rig();
    const img = await rig.createRawImage("cancel.img", 64 * MiB);
    const a = await startBlk(rig, { name: "blk-c", image: img });
    const b = await startBlk(rig, { name: "blk-d", image: img });
    backends.push(a, b);
    const [src, dst] = await Promise.all([
      rig.startVm({ name: "src2", vhostUserBlk: [{ socket: a.socket }] }),
      rig.startVm({ name: "dst2", vhostUserBlk: [{ socket: b.socket }], incoming: true }),
    ]);
    await src.guest.ready();
    const before = await src.guest.write("/dev/vda", 1, 4);
    await startLoad(src);

    // 5 MB/s: the ~100 MB of guest RAM cannot be sent before we pull the plug.
    await setCapabilities(src, { events: true });
    await src.qmp.execute("migrate-set-parameters", { "max-bandwidth": 5_000_000 });
    const uri = rig.migrationUri();
    await dst.qmp.execute("migrate-incoming", { uri });
    await src.qmp.execute("migrate", { uri });
    await sleep(2000);
    assert.equal(String((await queryMigrate(src)).status), "active");
    b.proc.killNow("SIGKILL");
    await b.proc.exited;
    await sleep(500);
    await src.qmp.execute("migrate_cancel");
    let st = "";
    for (let i = 0; i < 100; i++) {
      st = String((await queryMigrate(src)).status);
      if (st === "cancelled" || st === "failed") break;
      await sleep(100);
    }
    assert.ok(st === "cancelled" || st === "failed", `migration ended: ${st}`);
    assert.equal(await src.status(), "running", "the source guest keeps running");

    // The guest's I/O loop goes on on the source; logging was switched off again.
    const n = maxLoopN(src.console.lines);
    await src.console.waitFor(loopReached("RIG-LOOP", n + 3), { timeoutMs: 30_000 });
    await src.guest.runOk("rig_loop_stop; rig_dirty_stop");
    await src.console.waitFor(/RIG-LOOP-STOPPED/, { timeoutMs: 20_000 });
    assert.equal(await src.guest.sum("/dev/vda", 1, 4), before);
    assert.deepEqual(
      src.console.lines.filter((l) => l.includes("io=MISMATCH")),
      [],
    );
    assert.deepEqual(src.console.grep(GUEST_CRASH), []);
    assert.deepEqual(src.console.grep(/I\/O error|blk_update_request/), [], "no I/O error on the source");
    assert.ok((await checkLoopSlots(img, src.console.lines)) > 0);
    const feats = await featureWrites(a);
    assert.ok(
      feats.some((f) => (f & LOG_ALL) !== 0n),
      "logging was on during the migration",
    );
    assert.equal((feats.at(-1) ?? 0n) & LOG_ALL, 0n, "and is off after the cancel");
    process.stderr.write(`blk cancel: status ${st}, source loop went on to n=${maxLoopN(src.console.lines)}\n`);
    await Promise.all([src.close(), dst.close()]);
  });
});
