/**
 * `vmshift blk` behind QEMU 10's `vhost-user-blk-pci,packed=on`: the guest negotiates packed
 * virtqueues (its virtio features, /sys/block/vda/device/features, have bit 34 set), writes
 * checksummed data and reads it back on one and on two queues, the host image matches; the
 * back-end is SIGKILLed while it holds a request and its successor resubmits it from the packed
 * inflight region; and the guest migrates (precopy, and postcopy with a real postcopy phase)
 * between two QEMUs each with its own `vmshift blk`, with no oops and no mismatch.
 * Skips loudly when QEMU or the guest is missing (VMSHIFT_REQUIRE_INTEROP=1 fails instead).
 */
import assert from "node:assert/strict";
import { describe, test } from "node:test";
import { setTimeout as sleep } from "node:timers/promises";
import { blkFixture, skipBanner, startBlk } from "./blk-helpers.js";
import { linesAcrossMigration, loopReached } from "./console.js";
import { GUEST_CRASH, MiB, migrate, parseRigRecords, probeInterop, sha256OfFileRange, type Vm } from "./rig.js";

const probe = await probeInterop();
const skip = skipBanner("test/interop/blk-packed.test", probe.ok ? null : probe.reason);
if (!probe.ok && process.env.VMSHIFT_REQUIRE_INTEROP === "1") {
  test("QEMU interop rig is available (VMSHIFT_REQUIRE_INTEROP=1)", () => assert.fail(probe.reason));
}

const VIRTIO_F_RING_PACKED = 34;
const maxLoopN = (lines: string[]) => Math.max(0, ...parseRigRecords(lines, "RIG-LOOP").map((r) => Number(r.fields.n)));

/** The guest's negotiated virtio features: a string of 0/1, one character per bit. */
async function guestFeatures(vm: Vm): Promise<string> {
  const r = await vm.guest.runOk("cat /sys/block/vda/device/features");
  const line = r.output.map((l) => l.trim()).find((l) => /^[01]{32,}$/.test(l));
  assert.ok(line, `features: ${r.output.join("|")}`);
  return line;
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

function checkGuest(vm: Vm, lines: string[]): void {
  assert.deepEqual(
    lines.filter((l) => l.includes("io=MISMATCH")),
    [],
  );
  assert.deepEqual(vm.console.grep(GUEST_CRASH), [], `${vm.name}: guest kernel is healthy`);
  assert.deepEqual(vm.console.grep(/I\/O error|blk_update_request|critical/), [], `${vm.name}: no I/O error`);
}

describe("vmshift blk with packed virtqueues under QEMU", { timeout: 240_000 }, () => {
  const fx = blkFixture("blk-packed", probe.ok);
  const backends = fx.backends;

  test("one queue: packed negotiated (feature bit 34), checksummed I/O, host image matches", { skip }, async () => {
    const rig = fx.rig();
    const img = await rig.createRawImage("p1.img", 64 * MiB);
    const be = await startBlk(rig, { name: "blk-p1", image: img });
    backends.push(be);
    const vm = await rig.startVm({ name: "vm-p1", vhostUserBlk: [{ socket: be.socket, packed: true }] });
    await vm.guest.ready();
    const f = await guestFeatures(vm);
    assert.equal(f[VIRTIO_F_RING_PACKED], "1", `VIRTIO_F_RING_PACKED negotiated: ${f}`);
    const written = await vm.guest.write("/dev/vda", 1, 8);
    assert.equal(await vm.guest.sum("/dev/vda", 1, 8), written, "guest reads back what it wrote");
    assert.equal(await sha256OfFileRange(img, 1 * MiB, 8 * MiB), written, "host image holds the guest's data");
    // Many small requests: the ring goes round many times (wrap counters).
    const small = await vm.guest.runOk(
      "dd if=/dev/urandom of=/tmp/s bs=4096 count=600 2>/dev/null; dd if=/tmp/s of=/dev/vda bs=4096 seek=4096 oflag=direct conv=fsync,notrunc 2>/dev/null; " +
        "a=$(sha256sum < /tmp/s | cut -d' ' -f1); b=$(dd if=/dev/vda bs=4096 skip=4096 count=600 iflag=direct 2>/dev/null | sha256sum | cut -d' ' -f1); echo SMALL $a $b",
    );
    const m = /SMALL (\w+) (\w+)/.exec(small.output.join("\n"));
    assert.ok(m, small.output.join("|"));
    assert.equal(m[1], m[2], "600 4 KiB O_DIRECT requests read back");
    assert.equal(await sha256OfFileRange(img, 16 * MiB, 600 * 4096), m[1]);
    checkGuest(vm, vm.console.lines);
    await vm.close();
    // The back-end saw the packed ring's vring base (both wrap counters set at the start).
    const bases = (await be.requests()).filter((r) => r.name === "SET_VRING_BASE").map((r) => r.detail);
    assert.ok(bases.length > 0, "SET_VRING_BASE");
    process.stderr.write(`blk packed 1q: features ${f.slice(0, 40)}…; SET_VRING_BASE ${bases.join(" ; ")}\n`);
  });

  test("two queues, packed, a thread per queue, a 2-vCPU guest: data intact on both sides", { skip }, async () => {
    const rig = fx.rig();
    const img = await rig.createRawImage("p2.img", 64 * MiB);
    const be = await startBlk(rig, { name: "blk-p2", image: img, queues: 2, queueWorkers: 2 });
    backends.push(be);
    await be.waitLog(/2 queue\(s\) on 2 thread\(s\)/);
    const vm = await rig.startVm({
      name: "vm-p2",
      smp: 2,
      vhostUserBlk: [{ socket: be.socket, numQueues: 2, packed: true }],
    });
    await vm.guest.ready();
    const f = await guestFeatures(vm);
    assert.equal(f[VIRTIO_F_RING_PACKED], "1", `VIRTIO_F_RING_PACKED negotiated: ${f}`);
    const q = await vm.guest.runOk("ls /sys/block/vda/mq/");
    assert.ok(q.output.join(" ").includes("1"), `two hardware queues: ${q.output.join("|")}`);
    // Writers on both vCPUs at once (taskset), so both queues carry requests.
    const r = await vm.guest.runOk(
      "for c in 0 1; do ( taskset -c $c dd if=/dev/urandom of=/tmp/w$c bs=1M count=6 2>/dev/null; " +
        "taskset -c $c dd if=/tmp/w$c of=/dev/vda bs=64k seek=$((c*96+32)) oflag=direct conv=fsync,notrunc 2>/dev/null ) & done; wait; " +
        "for c in 0 1; do echo MQ $c $(sha256sum < /tmp/w$c | cut -d' ' -f1) $(taskset -c $((1-c)) dd if=/dev/vda bs=64k skip=$((c*96+32)) count=96 iflag=direct 2>/dev/null | sha256sum | cut -d' ' -f1); done",
    );
    const rows = [...r.output.join("\n").matchAll(/MQ (\d) (\w+) (\w+)/g)];
    assert.equal(rows.length, 2, r.output.join("|"));
    for (const row of rows) {
      const c = Number(row[1]);
      assert.equal(row[2], row[3], `writer ${c} reads back`);
      assert.equal(await sha256OfFileRange(img, (c * 96 + 32) * 65536, 6 * MiB), row[2], `host image, writer ${c}`);
    }
    const inter = await vm.guest.runOk("grep -i virtio /proc/interrupts | wc -l");
    checkGuest(vm, vm.console.lines);
    await vm.close();
    process.stderr.write(`blk packed 2q: ok (${inter.output.join("").trim()} virtio interrupt lines)\n`);
  });

  test("reconnect: SIGKILL while holding a request, the next back-end resubmits it from the packed inflight region", {
    skip,
  }, async () => {
    const rig = fx.rig();
    const img = await rig.createRawImage("prc.img", 64 * MiB);
    const socket = rig.path("prc.sock");
    const env = { VMSHIFT_BLK_DELAY_MS: "30" };
    const first = await startBlk(rig, { name: "blk-prc-1", image: img, socket, env });
    backends.push(first);
    const vm = await rig.startVm({
      name: "vm-prc",
      extraArgs: [
        "-chardev",
        `socket,id=prc-chr,path=${socket},reconnect-ms=500`,
        "-device",
        "vhost-user-blk-pci,chardev=prc-chr,id=prc0,packed=on",
      ],
    });
    await vm.guest.ready();
    assert.equal((await guestFeatures(vm))[VIRTIO_F_RING_PACKED], "1");
    const before = await vm.guest.write("/dev/vda", 1, 4);
    await vm.guest.runOk("rig_loop /dev/vda 8 8 0.05");
    await vm.console.waitFor(loopReached("RIG-LOOP", 2), { timeoutMs: 30_000 });
    const held: (number | null)[] = [];
    let current = first;
    for (let round = 2; round <= 3; round++) {
      await sleep(300);
      held.push(await current.killWhileHolding());
      await sleep(200);
      const io = round % 2 === 0 ? "async" : "sync";
      current = await startBlk(rig, { name: `blk-prc-${round}`, image: img, socket, env, io });
      backends.push(current);
      const n = maxLoopN(vm.console.lines);
      await vm.console.waitFor(loopReached("RIG-LOOP", n + 2), { timeoutMs: 30_000 });
    }
    await vm.guest.runOk("rig_loop_stop");
    await vm.console.waitFor(/RIG-LOOP-STOPPED/, { timeoutMs: 20_000 });
    assert.equal(await vm.guest.sum("/dev/vda", 1, 4), before, "data written before the restarts reads back");
    checkGuest(vm, vm.console.lines);
    assert.ok((await checkLoopSlots(img, vm.console.lines)) > 0);
    let resubmitted = 0;
    for (const b of backends.slice(-2)) {
      const names = (await b.requests()).map((r) => r.name);
      assert.ok(names.includes("SET_INFLIGHT_FD"), `${b.name}: SET_INFLIGHT_FD`);
      for (const m of (await b.log()).matchAll(/resubmitting (\d+) in-flight/g)) resubmitted += Number(m[1]);
    }
    const caught = held.filter((h) => h !== null).length;
    assert.equal(caught, held.length, `every kill caught a held request (${held.join(",")})`);
    assert.ok(resubmitted >= caught, `every caught request was resubmitted (${resubmitted} for ${caught} kills)`);
    process.stderr.write(`blk packed reconnect: held ids ${held.join(",")}; ${resubmitted} resubmitted\n`);
    await vm.close();
  });

  for (const mode of ["precopy", "postcopy"] as const) {
    test(`${mode} migration of a packed-ring guest: no oops, no mismatch, data intact`, { skip }, async () => {
      const rig = fx.rig();
      const img = await rig.createRawImage(`pm-${mode}.img`, 64 * MiB);
      const a = await startBlk(rig, { name: `blk-${mode}-a`, image: img, io: "async" });
      const b = await startBlk(rig, { name: `blk-${mode}-b`, image: img, io: mode === "postcopy" ? "async" : "sync" });
      backends.push(a, b);
      const dev = (s: string) => [{ socket: s, packed: true }];
      const [src, dst] = await Promise.all([
        rig.startVm({ name: `src-${mode}`, vhostUserBlk: dev(a.socket), append: "init_on_alloc=0" }),
        rig.startVm({ name: `dst-${mode}`, vhostUserBlk: dev(b.socket), incoming: true }),
      ]);
      await src.guest.ready();
      assert.equal((await guestFeatures(src))[VIRTIO_F_RING_PACKED], "1");
      const before = await src.guest.write("/dev/vda", 1, 4);
      await src.guest.runOk("rig_loop /dev/vda 8 8 0.1; rig_dirty 16 0.05");
      await src.console.waitFor(loopReached("RIG-LOOP", 3), { timeoutMs: 30_000 });
      if (mode === "postcopy")
        await src.qmp.execute("migrate-set-parameters", { "max-postcopy-bandwidth": 10_000_000 });
      const result = await migrate(
        src,
        dst,
        mode === "postcopy"
          ? {
              uri: rig.migrationUri(),
              postcopy: true,
              postcopyAfterMs: 1500,
              maxBandwidth: 20_000_000,
              timeoutMs: 90_000,
            }
          : { uri: rig.migrationUri(), timeoutMs: 60_000 },
      );
      assert.equal(result.status, "completed");
      if (mode === "postcopy") {
        assert.ok(result.statuses.includes("postcopy-active"), `went through postcopy: ${result.statuses.join(" → ")}`);
        assert.ok((result.ram.postcopyRequests ?? 0) > 0, `postcopy page requests: ${result.ram.postcopyRequests}`);
      }
      assert.equal(await dst.status(), "running");
      const lastSrcN = maxLoopN(src.console.lines);
      await dst.console.waitFor(loopReached("RIG-LOOP", lastSrcN + 2), { timeoutMs: 30_000 });
      await dst.guest.runOk("rig_loop_stop; rig_dirty_stop");
      await dst.console.waitFor(/RIG-LOOP-STOPPED/, { timeoutMs: 20_000 });
      assert.equal(await dst.guest.sum("/dev/vda", 1, 4), before, "data written before migration reads back on dst");
      const afterSha = await dst.guest.write("/dev/vda", 20, 2);
      const all = linesAcrossMigration(src.console, dst.console);
      checkGuest(dst, all);
      assert.ok((await checkLoopSlots(img, all)) > 0);
      assert.equal(await sha256OfFileRange(img, 20 * MiB, 2 * MiB), afterSha);
      // The destination back-end resumed from the source's packed vring base (not a fresh ring).
      const srcBase = (await a.requests()).filter((r) => r.name === "GET_VRING_BASE");
      const dstBase = (await b.requests()).filter((r) => r.name === "SET_VRING_BASE").map((r) => r.detail);
      assert.ok(srcBase.length > 0, "the source ring was stopped with GET_VRING_BASE");
      assert.deepEqual((await b.log()).match(/error: .*/g) ?? [], [], "no error in the destination back-end");
      process.stderr.write(
        `blk packed ${mode}: ${result.statuses.join(" → ")}; total ${result.totalTimeMs} ms, downtime ${result.downtimeMs} ms, ` +
          `postcopy-requests ${result.ram.postcopyRequests ?? 0}; dst SET_VRING_BASE ${dstBase.join(" ; ")}; ` +
          `loop n ${lastSrcN} on src → ${maxLoopN(dst.console.lines)} on dst\n`,
      );
      await Promise.all([src.close(), dst.close()]);
    });
  }
});
