/**
 * Reconnect under QEMU 10 (`-chardev socket,...,reconnect-ms=500`): the `vmshift blk` process is
 * SIGKILLed while it holds one of the guest's requests (each request is held 30 ms in its worker,
 * and the kill waits for such a moment: BlkBackend.killWhileHolding), a new one starts on the same socket, QEMU reconnects and hands back the
 * inflight region (GET/SET_INFLIGHT_FD), the new back-end resubmits the heads that were in flight,
 * and the guest's I/O loop goes on with no I/O error and every block as written. The lives
 * alternate between --io sync and --io async.
 * Skips loudly when QEMU or the guest is missing (VMSHIFT_REQUIRE_INTEROP=1 fails instead).
 */
import assert from "node:assert/strict";
import { describe, test } from "node:test";
import { setTimeout as sleep } from "node:timers/promises";
import { blkFixture, skipBanner, startBlk } from "./blk-helpers.js";
import { loopReached } from "./console.js";
import { GUEST_CRASH, MiB, parseRigRecords, probeInterop, sha256OfFileRange } from "./rig.js";

const probe = await probeInterop();
const skip = skipBanner("test/interop/blk-reconnect.test", probe.ok ? null : probe.reason);
if (!probe.ok && process.env.VMSHIFT_REQUIRE_INTEROP === "1") {
  test("QEMU interop rig is available (VMSHIFT_REQUIRE_INTEROP=1)", () => assert.fail(probe.reason));
}

const maxLoopN = (lines: string[]) => Math.max(0, ...parseRigRecords(lines, "RIG-LOOP").map((r) => Number(r.fields.n)));

describe("vmshift blk: back-end restart while the guest runs", { timeout: 120_000 }, () => {
  const fx = blkFixture("blk-rc", probe.ok);
  const backends = fx.backends;

  test("SIGKILL mid-I/O, restart: in-flight requests resubmitted, none lost, data intact", { skip }, async () => {
    const rig = fx.rig();
    const img = await rig.createRawImage("rc.img", 64 * MiB);
    const socket = rig.path("rc.sock");
    const env = { VMSHIFT_BLK_DELAY_MS: "30" };
    const first = await startBlk(rig, { name: "blk-1", image: img, socket, env });
    backends.push(first);
    const vm = await rig.startVm({
      name: "vm",
      extraArgs: [
        "-chardev",
        `socket,id=rc-chr,path=${socket},reconnect-ms=500`,
        "-device",
        "vhost-user-blk-pci,chardev=rc-chr,id=rc0",
      ],
    });
    await vm.guest.ready();
    const before = await vm.guest.write("/dev/vda", 1, 4);
    await vm.guest.runOk("rig_loop /dev/vda 8 8 0.05");
    await vm.console.waitFor(loopReached("RIG-LOOP", 2), { timeoutMs: 30_000 });

    const kills: number[] = [];
    const held: (number | null)[] = [];
    let current = first;
    // Three lives after the first. Each kill lands while the back-end holds a request (see
    // killWhileHolding), so every restart has a head to resubmit.
    for (let round = 2; round <= 4; round++) {
      await sleep(300);
      kills.push(maxLoopN(vm.console.lines));
      held.push(await current.killWhileHolding());
      await sleep(200);
      // Lives alternate between the two I/O models: what one left in flight, the other resubmits.
      const io = round % 2 === 0 ? "async" : "sync";
      current = await startBlk(rig, { name: `blk-${round}`, image: img, socket, env, io });
      backends.push(current);
      const n = maxLoopN(vm.console.lines);
      await vm.console.waitFor(loopReached("RIG-LOOP", n + 2), { timeoutMs: 30_000 });
    }
    await vm.guest.runOk("rig_loop_stop");
    await vm.console.waitFor(/RIG-LOOP-STOPPED/, { timeoutMs: 20_000 });
    assert.equal(await vm.guest.sum("/dev/vda", 1, 4), before, "data written before the restarts reads back");

    const lines = vm.console.lines;
    assert.deepEqual(
      lines.filter((l) => l.includes("io=MISMATCH")),
      [],
    );
    assert.deepEqual(vm.console.grep(GUEST_CRASH), []);
    assert.deepEqual(vm.console.grep(/I\/O error|blk_update_request/), [], "no I/O error in the guest");
    const lastBySlot = new Map<number, string>();
    for (const r of parseRigRecords(lines, "RIG-LOOP")) lastBySlot.set(Number(r.fields.off), r.fields.sha256 as string);
    for (const [off, sha] of lastBySlot) assert.equal(await sha256OfFileRange(img, off * MiB, MiB), sha, `slot ${off}`);

    // The restarted back-ends got the inflight region back and resubmitted what was in flight.
    let resubmitted = 0;
    for (const b of backends.slice(1)) {
      const names = (await b.requests()).map((r) => r.name);
      assert.ok(names.includes("SET_INFLIGHT_FD"), `${b.name}: SET_INFLIGHT_FD (${names.join(",")})`);
      for (const m of (await b.log()).matchAll(/resubmitting (\d+) in-flight/g)) resubmitted += Number(m[1]);
    }
    const caught = held.filter((h) => h !== null).length;
    assert.equal(caught, held.length, `every kill caught a held request (held heads: ${held.join(",")})`);
    assert.ok(resubmitted >= caught, `every caught request was resubmitted (${resubmitted} for ${caught} kills)`);
    process.stderr.write(
      `blk reconnect: killed at loop n=${kills.join(",")} holding heads ${held.join(",")}; ` +
        `${resubmitted} request(s) resubmitted; ` +
        `loop reached n=${maxLoopN(lines)}\n`,
    );
    await vm.close();
  });
});
