/**
 * Postcopy migration with `vmshift blk` on both sides under QEMU 10 (protocol feature PAGEFAULT):
 * POSTCOPY_ADVISE hands QEMU our userfaultfd, ADD_MEM_REG is answered with our mapping bases and
 * then acknowledged fd-less, POSTCOPY_LISTEN registers the regions, a queue worker that touches a
 * page not yet arrived blocks until QEMU places it, POSTCOPY_END ends it. The bandwidth is capped
 * so precopy cannot finish first: the postcopy phase really runs (postcopy-requests > 0), with the
 * guest doing disk I/O and dirtying RAM, and the data must be intact afterwards.
 * Skips loudly when QEMU or the guest is missing (VMSHIFT_REQUIRE_INTEROP=1 fails instead).
 */
import assert from "node:assert/strict";
import { readFile } from "node:fs/promises";
import { describe, test } from "node:test";
import { blkFixture, skipBanner, startBlk } from "./blk-helpers.js";
import { linesAcrossMigration, loopReached } from "./console.js";
import { GUEST_CRASH, MiB, migrate, parseRigRecords, probeInterop, sha256OfFileRange } from "./rig.js";

const probe = await probeInterop();
const skip = skipBanner("test/interop/blk-postcopy.test", probe.ok ? null : probe.reason);
if (!probe.ok && process.env.VMSHIFT_REQUIRE_INTEROP === "1") {
  test("QEMU interop rig is available (VMSHIFT_REQUIRE_INTEROP=1)", () => assert.fail(probe.reason));
}

const maxLoopN = (lines: string[]) => Math.max(0, ...parseRigRecords(lines, "RIG-LOOP").map((r) => Number(r.fields.n)));

describe("vmshift blk: postcopy migration under QEMU", { timeout: 150_000 }, () => {
  const fx = blkFixture("blk-pc", probe.ok);
  const backends = fx.backends;

  test("migrate-start-postcopy with guest I/O: a real postcopy phase, data intact", { skip }, async () => {
    const rig = fx.rig();
    const img = await rig.createRawImage("pc.img", 64 * MiB);
    const a = await startBlk(rig, { name: "blk-a", image: img });
    // The destination's reads and writes run on libuv's pool: pool threads fault on pages that
    // have not arrived, and QEMU's placement wakes them.
    const b = await startBlk(rig, { name: "blk-b", image: img, io: "async" });
    backends.push(a, b);
    const [src, dst] = await Promise.all([
      // init_on_alloc=0 (Debian's kernel zeroes every page it allocates): see the reader below.
      rig.startVm({ name: "src", vhostUserBlk: [{ socket: a.socket }], append: "init_on_alloc=0" }),
      rig.startVm({
        name: "dst",
        vhostUserBlk: [{ socket: b.socket }],
        incoming: true,
        // Faults our back-end's userfaultfd reported to QEMU, and QEMU's wakes for them.
        trace: ["vhost_user_postcopy_fault_handler*", "vhost_user_postcopy_waker*"],
      }),
    ]);
    await src.guest.ready();
    const before = await src.guest.write("/dev/vda", 1, 4);
    await src.guest.runOk("rig_loop /dev/vda 8 8 0.1; rig_dirty 32 0.05");
    // Buffered reads after dropping the page cache: the kernel hands the device freshly freed pages
    // without touching them (with init_on_alloc=0), and those were dirty at the switch (our own preads dirtied them), so
    // after the switch our back-end is the first to touch pages that have not arrived: its pread
    // faults on its userfaultfd and the worker waits until QEMU places the page.
    const pc = await src.guest.runOk(
      "dd if=/dev/urandom of=/tmp/pc-src bs=1M count=24 2>/dev/null; dd if=/tmp/pc-src of=/dev/vda bs=1M seek=40 conv=fsync,notrunc 2>/dev/null; " +
        "echo PC-SHA $(sha256sum < /tmp/pc-src | cut -d' ' -f1); rm /tmp/pc-src; " +
        "( while [ ! -e /tmp/pc-stop ]; do echo 3 > /proc/sys/vm/drop_caches; echo PC-READ $(dd if=/dev/vda bs=1M skip=40 count=24 2>/dev/null | sha256sum | cut -d' ' -f1); done; echo PC-READER-STOPPED ) > /dev/console 2>&1 &",
    );
    const pcSha = /PC-SHA ([0-9a-f]{64})/.exec(pc.output.join("\n"))?.[1];
    assert.ok(pcSha, pc.output.join("|"));
    // Background postcopy is slow (10 MB/s), so most pages arrive on demand.
    await src.qmp.execute("migrate-set-parameters", { "max-postcopy-bandwidth": 10_000_000 });

    // 20 MB/s: ~100 MB of non-zero guest RAM cannot go over in the 1.5 s before the switch.
    const result = await migrate(src, dst, {
      uri: rig.migrationUri(),
      postcopy: true,
      postcopyAfterMs: 1500,
      maxBandwidth: 20_000_000,
      timeoutMs: 90_000,
    });
    assert.equal(result.status, "completed");
    assert.ok(result.statuses.includes("postcopy-active"), `went through postcopy: ${result.statuses.join(" → ")}`);
    assert.ok((result.ram.postcopyRequests ?? 0) > 0, `postcopy page requests: ${result.ram.postcopyRequests}`);
    assert.equal(await dst.status(), "running");

    const lastSrcN = maxLoopN(src.console.lines);
    await dst.console.waitFor(loopReached("RIG-LOOP", lastSrcN + 2), { timeoutMs: 30_000 });
    await dst.guest.runOk("touch /tmp/pc-stop; rig_loop_stop; rig_dirty_stop");
    const all = linesAcrossMigration(src.console, dst.console);
    await dst.console.waitFor(/RIG-LOOP-STOPPED/, { timeoutMs: 20_000 });
    assert.equal(await dst.guest.sum("/dev/vda", 1, 4), before, "data written before migration reads back on dst");
    const afterSha = await dst.guest.write("/dev/vda", 20, 2);

    assert.deepEqual(
      all.filter((l) => l.includes("io=MISMATCH")),
      [],
    );
    assert.deepEqual(dst.console.grep(GUEST_CRASH), [], "destination guest kernel is healthy");
    assert.deepEqual(dst.console.grep(/I\/O error|blk_update_request/), [], "no I/O error on dst");
    const lastBySlot = new Map<number, string>();
    for (const r of parseRigRecords(all, "RIG-LOOP")) lastBySlot.set(Number(r.fields.off), r.fields.sha256 as string);
    for (const [off, sha] of lastBySlot) assert.equal(await sha256OfFileRange(img, off * MiB, MiB), sha, `slot ${off}`);
    assert.equal(await sha256OfFileRange(img, 20 * MiB, 2 * MiB), afterSha);
    await dst.console.waitFor(/PC-READER-STOPPED/, { timeoutMs: 20_000 });
    const reads = all.concat(dst.console.lines).filter((l) => l.startsWith("PC-READ "));
    assert.ok(reads.length > 0);
    assert.deepEqual(
      reads.filter((l) => !l.includes(pcSha)),
      [],
      "every buffered read of the 24 MiB gave the data written",
    );
    assert.equal(await sha256OfFileRange(img, 40 * MiB, 24 * MiB), pcSha);

    // The destination back-end's side of the protocol.
    const reqs = await b.requests();
    const names = reqs.map((r) => r.name);
    const at = (n: string) => names.indexOf(n);
    assert.ok(at("POSTCOPY_ADVISE") >= 0, `POSTCOPY_ADVISE: ${names.join(",")}`);
    assert.ok(at("POSTCOPY_LISTEN") > at("POSTCOPY_ADVISE"), "POSTCOPY_LISTEN after ADVISE");
    const acks = reqs.filter((r) => r.name === "ADD_MEM_REG" && r.detail.includes('"ack"'));
    assert.ok(acks.length >= 1, "QEMU's fd-less ADD_MEM_REG ack");
    assert.ok(at("POSTCOPY_END") > at("POSTCOPY_LISTEN"), "POSTCOPY_END");
    const qtrace = await readFile(rig.path("dst.stderr.log"), "utf8");
    const backendFaults = qtrace
      .split("\n")
      .filter((l) => l.includes("vhost_user_postcopy_fault_handler_found")).length;
    const wakes = qtrace.split("\n").filter((l) => l.includes("vhost_user_postcopy_waker_found")).length;
    assert.ok(backendFaults > 0, "our queue worker faulted on pages not yet arrived, and QEMU resolved them");
    const blog = await b.log();
    assert.deepEqual(
      blog.match(/ (ERROR|WARN) +blk: .*/g) ?? [],
      [],
      "no warning or error in the destination back-end",
    );
    process.stderr.write(
      `blk postcopy: ${result.statuses.join(" → ")}; total ${result.totalTimeMs} ms, downtime ${result.downtimeMs} ms, ` +
        `${result.ram.transferred} bytes, postcopy-requests ${result.ram.postcopyRequests}; ` +
        `dst back-end: ${acks.length} ADD_MEM_REG ack(s), ${backendFaults} faults on its userfaultfd, ${wakes} wakes; loop n ${lastSrcN} on src → ${maxLoopN(dst.console.lines)} on dst\n`,
    );
    await Promise.all([src.close(), dst.close()]);
  });
});
