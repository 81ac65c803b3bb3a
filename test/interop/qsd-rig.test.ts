/**
 * The rig against the reference back-end: qemu-storage-daemon serving vhost-user-blk to a real QEMU.
 * If these fail, fix the rig (or the machine) before blaming a back-end under test.
 * Skips loudly when QEMU, qemu-storage-daemon, the accelerator or the guest build is missing;
 * VMSHIFT_REQUIRE_INTEROP=1 turns that skip into a failure.
 */
import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";
import { loopReached } from "./console.js";
import {
  GUEST_CRASH,
  liveProcesses,
  MiB,
  migrate,
  parseRigRecords,
  probeInterop,
  Rig,
  sha256OfFileRange,
} from "./rig.js";

const probe = await probeInterop();
const skip = probe.ok ? false : `QEMU interop rig unavailable: ${probe.reason}`;
if (!probe.ok) {
  const msg = `\n${"!".repeat(78)}\n!! SKIPPING test/interop/qsd-rig.test: ${probe.reason}\n!! (VMSHIFT_REQUIRE_INTEROP=1 turns this skip into a failure)\n${"!".repeat(78)}\n`;
  process.stderr.write(msg);
  if (process.env.VMSHIFT_REQUIRE_INTEROP === "1") {
    test("QEMU interop rig is available (VMSHIFT_REQUIRE_INTEROP=1)", () => {
      assert.fail(probe.reason);
    });
  }
} else {
  const { tools, guest } = probe;
  process.stderr.write(`interop rig: QEMU ${tools.qemuVersion} accel=${tools.accel} guest kernel ${guest.kver}\n`);
}

// skip is set on each test (not the suite) so the runner counts them as skipped, not as nothing.
describe("qemu-storage-daemon vhost-user-blk through the rig", { timeout: 120_000 }, () => {
  let rig: Rig | undefined;
  before(async () => {
    if (probe.ok) rig = await Rig.create("qsd-rig");
  });
  after(async () => {
    await rig?.close();
    assert.equal(liveProcesses(), 0, "every QEMU / qsd process is gone after rig.close()");
  });

  test("guest writes checksummed data to /dev/vda; reads it back; the host image matches", { skip }, async () => {
    assert.ok(rig);
    const img = await rig.createRawImage("disk.img", 64 * MiB);
    const qsd = await rig.startQsd({ name: "qsd", image: img });
    const t0 = Date.now();
    const vm = await rig.startVm({ name: "vm", vhostUserBlk: [{ socket: qsd.socket }] });
    await vm.guest.ready();
    const bootMs = Date.now() - t0;

    const size = await vm.guest.runOk("cat /sys/block/vda/size");
    assert.ok(size.output.includes(String((64 * MiB) / 512)), `vda is 64 MiB: ${size.output.join("|")}`);

    const written = await vm.guest.write("/dev/vda", 1, 4);
    const readBack = await vm.guest.sum("/dev/vda", 1, 4);
    assert.equal(readBack, written, "guest reads back what it wrote");
    assert.equal(await sha256OfFileRange(img, 1 * MiB, 4 * MiB), written, "host image holds the guest's data");

    // A failing command reports its exit code and does not wedge the agent.
    const bad = await vm.guest.run("echo to-stderr >&2; exit 3");
    assert.equal(bad.rc, 3);
    assert.ok(bad.output.some((l) => l.includes("to-stderr")));

    await vm.close();
    await qsd.close();
    process.stderr.write(`interop rig: boot to agent ready ${bootMs} ms\n`);
  });

  test("precopy migration between two QEMUs, each with its own qsd; the guest goes on with intact data", {
    skip,
  }, async () => {
    assert.ok(rig);
    const img = await rig.createRawImage("mig.img", 64 * MiB);
    // Both daemons serve the same file (locking=off), as two hosts would share storage.
    const qa = await rig.startQsd({ name: "qsd-a", image: img });
    const qb = await rig.startQsd({ name: "qsd-b", image: img });
    const [src, dst] = await Promise.all([
      rig.startVm({ name: "src", vhostUserBlk: [{ socket: qa.socket }] }),
      rig.startVm({ name: "dst", vhostUserBlk: [{ socket: qb.socket }], incoming: true }),
    ]);
    await src.guest.ready();
    const before = await src.guest.write("/dev/vda", 1, 4);
    // Disk I/O and RAM dirtying keep going across the migration.
    await src.guest.runOk("rig_loop /dev/vda 8 8 0.1; rig_dirty 16 0.05");
    const loopStart = src.console.cursor();
    await src.console.waitFor(loopReached("RIG-LOOP", 3), { from: loopStart, timeoutMs: 20_000 });

    const result = await migrate(src, dst, { uri: rig.migrationUri(), timeoutMs: 60_000 });
    assert.equal(result.status, "completed");
    assert.equal(await src.status(), "postmigrate");
    assert.equal(await dst.status(), "running");

    // The loop continues on the destination: a later iteration shows up on dst's console.
    const lastSrcN = Math.max(...parseRigRecords(src.console.lines, "RIG-LOOP").map((r) => Number(r.fields.n)));
    await dst.console.waitFor(loopReached("RIG-LOOP", lastSrcN + 2), { timeoutMs: 20_000 });

    await dst.guest.runOk("rig_loop_stop; rig_dirty_stop");
    await dst.console.waitFor(/RIG-LOOP-STOPPED/, { timeoutMs: 10_000 });
    assert.equal(await dst.guest.sum("/dev/vda", 1, 4), before, "data written before migration reads back on dst");
    const afterSha = await dst.guest.write("/dev/vda", 20, 2);

    const all = [...src.console.lines, ...dst.console.lines];
    assert.deepEqual(
      all.filter((l) => l.includes("io=MISMATCH")),
      [],
      "no read-back mismatch in the I/O loop",
    );
    assert.deepEqual(dst.console.grep(GUEST_CRASH), [], "destination guest kernel is healthy");

    // Host view: the last write to each loop slot, and both single writes, are in the image.
    const lastBySlot = new Map<number, string>();
    for (const r of parseRigRecords(all, "RIG-LOOP")) lastBySlot.set(Number(r.fields.off), r.fields.sha256!);
    assert.ok(lastBySlot.size > 0);
    for (const [off, sha] of lastBySlot) {
      assert.equal(await sha256OfFileRange(img, off * MiB, MiB), sha, `loop slot at ${off} MiB`);
    }
    assert.equal(await sha256OfFileRange(img, 1 * MiB, 4 * MiB), before);
    assert.equal(await sha256OfFileRange(img, 20 * MiB, 2 * MiB), afterSha);

    process.stderr.write(
      `interop rig: precopy ${result.status} total ${result.totalTimeMs} ms, downtime ${result.downtimeMs} ms, ` +
        `${result.ram.transferred} bytes, ${result.ram.dirtySyncCount} sync rounds, wall ${result.wallMs} ms; ` +
        `loop n ${lastSrcN} on src → ${Math.max(...parseRigRecords(dst.console.lines, "RIG-LOOP").map((r) => Number(r.fields.n)))} on dst\n`,
    );
  });
});
