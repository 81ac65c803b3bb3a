/**
 * `vmshift blk` (spawned as `node dist/src/cli/blk-main.js`) as the vhost-user-blk back-end of a
 * real QEMU 10: the guest boots, writes checksummed data and reads it back, the host checks the
 * image; sub-sector-aligned I/O, discard, GET_ID (serial), a read-only disk, two queues, and an
 * online resize (SIGHUP, CONFIG_CHANGE_MSG on the back-end channel, the guest sees the new size).
 * Skips loudly when QEMU or the guest is missing (VMSHIFT_REQUIRE_INTEROP=1 fails instead).
 */
import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import { truncate } from "node:fs/promises";
import { describe, test } from "node:test";
import { setTimeout as sleep } from "node:timers/promises";
import { blkFixture, skipBanner, startBlk } from "./blk-helpers.js";
import { GUEST_CRASH, MiB, probeInterop, sha256OfFileRange } from "./rig.js";

const probe = await probeInterop();
const skip = skipBanner("test/interop/blk-boot.test", probe.ok ? null : probe.reason);
if (!probe.ok && process.env.VMSHIFT_REQUIRE_INTEROP === "1") {
  test("QEMU interop rig is available (VMSHIFT_REQUIRE_INTEROP=1)", () => assert.fail(probe.reason));
}

const zeroSha = (n: number) => createHash("sha256").update(Buffer.alloc(n)).digest("hex");

describe("vmshift blk boots under QEMU", { timeout: 120_000 }, () => {
  const fx = blkFixture("blk-boot", probe.ok);
  const backends = fx.backends;

  test("guest I/O: checksummed writes read back, host image matches, discard, serial", { skip }, async () => {
    const rig = fx.rig();
    const img = await rig.createRawImage("disk.img", 64 * MiB);
    const be = await startBlk(rig, { name: "blk", image: img });
    backends.push(be);
    const vm = await rig.startVm({ name: "vm", vhostUserBlk: [{ socket: be.socket }] });
    await vm.guest.ready();

    const info = await vm.guest.runOk(
      "cat /sys/block/vda/size; cat /sys/block/vda/serial; echo; cat /sys/block/vda/queue/discard_max_bytes; cat /sys/block/vda/ro",
    );
    const text = info.output.join("\n");
    assert.ok(text.includes(String((64 * MiB) / 512)), `vda is 64 MiB: ${text}`);
    assert.ok(text.includes("disk.img"), `GET_ID gives the serial: ${text}`);
    assert.ok(/\n(16777216)\n/.test(`\n${text}\n`), `discard limit 16 MiB: ${text}`);

    const written = await vm.guest.write("/dev/vda", 1, 4);
    assert.equal(await vm.guest.sum("/dev/vda", 1, 4), written, "guest reads back what it wrote");
    assert.equal(await sha256OfFileRange(img, 1 * MiB, 4 * MiB), written, "host image holds the guest's data");

    // Odd sector counts at odd offsets (O_DIRECT, 512-byte units), then read back on both sides.
    const odd = await vm.guest.runOk(
      "dd if=/dev/urandom of=/tmp/o bs=512 count=7 2>/dev/null; dd if=/tmp/o of=/dev/vda bs=512 seek=20003 oflag=direct conv=fsync,notrunc 2>/dev/null; " +
        "a=$(sha256sum < /tmp/o | cut -d' ' -f1); b=$(dd if=/dev/vda bs=512 skip=20003 count=7 iflag=direct 2>/dev/null | sha256sum | cut -d' ' -f1); echo ODD $a $b",
    );
    const m = /ODD (\w+) (\w+)/.exec(odd.output.join("\n"));
    assert.ok(m, odd.output.join("|"));
    assert.equal(m[1], m[2], "7 sectors at sector 20003 read back");
    assert.equal(await sha256OfFileRange(img, 20003 * 512, 7 * 512), m[1]);

    // Discard a written MiB: it reads back as zeroes (we punch a hole) in the guest and on the host.
    await vm.guest.write("/dev/vda", 8, 1);
    await vm.guest.runOk("blkdiscard -o 8388608 -l 1048576 /dev/vda");
    assert.equal(await sha256OfFileRange(img, 8 * MiB, MiB), zeroSha(MiB), "discarded range is zero on the host");
    assert.equal(await vm.guest.sum("/dev/vda", 8, 1), zeroSha(MiB), "and in the guest");
    assert.equal(await vm.guest.sum("/dev/vda", 1, 4), written, "the rest is untouched");

    // The cache mode (CONFIG_WCE): the guest switches to writethrough; QEMU passes the config
    // write on (SET_CONFIG of the writeback byte); writes go on.
    const cache = async () => (await vm.guest.runOk("cat /sys/block/vda/cache_type")).output.join("").trim();
    assert.equal(await cache(), "write back");
    await vm.guest.runOk('echo "write through" > /sys/block/vda/cache_type');
    assert.equal(await cache(), "write through");
    const again = await vm.guest.write("/dev/vda", 12, 2);
    assert.equal(await sha256OfFileRange(img, 12 * MiB, 2 * MiB), again, "written through");
    assert.ok(
      (await be.requests()).some((r) => r.name === "SET_CONFIG"),
      "SET_CONFIG reached the back-end",
    );

    assert.deepEqual(vm.console.grep(GUEST_CRASH), []);
    assert.deepEqual(vm.console.grep(/I\/O error|blk_update_request|critical/), [], "no I/O error in the guest");
    await vm.close();
    const names = new Set((await be.requests()).map((r) => r.name));
    for (const n of ["GET_FEATURES", "ADD_MEM_REG", "SET_VRING_KICK", "GET_CONFIG"]) assert.ok(names.has(n), n);
  });

  test("online resize: the image grows, SIGHUP, QEMU passes CONFIG_CHANGE_MSG on, the guest uses the new space", {
    skip,
  }, async () => {
    const rig = fx.rig();
    const img = await rig.createRawImage("resize.img", 32 * MiB);
    const be = await startBlk(rig, { name: "blk-resize", image: img });
    backends.push(be);
    const vm = await rig.startVm({ name: "vm-resize", vhostUserBlk: [{ socket: be.socket }] });
    await vm.guest.ready();
    const size = async () => (await vm.guest.runOk("cat /sys/block/vda/size")).output.join("").trim();
    assert.equal(await size(), String((32 * MiB) / 512));
    await truncate(img, 64 * MiB);
    be.signal("SIGHUP");
    let now = "";
    for (let i = 0; i < 50 && now !== String((64 * MiB) / 512); i++) {
      await sleep(100);
      now = await size();
    }
    assert.equal(now, String((64 * MiB) / 512), "the guest sees 64 MiB");
    // Past the old end: written, read back, on the host.
    const written = await vm.guest.write("/dev/vda", 40, 2);
    assert.equal(await vm.guest.sum("/dev/vda", 40, 2), written);
    assert.equal(await sha256OfFileRange(img, 40 * MiB, 2 * MiB), written);
    const log = await be.log();
    assert.match(log, /capacity 65536 -> 131072 sectors/);
    assert.match(log, /front-end told \(CONFIG_CHANGE_MSG\)/);
    assert.deepEqual(vm.console.grep(/I\/O error/), []);
    await vm.close();
  });

  test("read-only: the guest sees ro=1, a write fails, reads work, the image is unchanged", { skip }, async () => {
    const rig = fx.rig();
    const img = await rig.createRawImage("ro.img", 16 * MiB);
    const be = await startBlk(rig, { name: "blk-ro", image: img, readonly: true });
    backends.push(be);
    const vm = await rig.startVm({ name: "vm-ro", vhostUserBlk: [{ socket: be.socket }] });
    await vm.guest.ready();
    const ro = await vm.guest.runOk("cat /sys/block/vda/ro");
    assert.ok(
      ro.output.some((l) => l.trim() === "1"),
      `ro: ${ro.output.join("|")}`,
    );
    assert.equal(await vm.guest.sum("/dev/vda", 0, 2), zeroSha(2 * MiB));
    const w = await vm.guest.run(
      "dd if=/dev/urandom of=/dev/vda bs=4096 count=1 oflag=direct conv=fsync 2>&1; echo rc=$?",
    );
    assert.ok(
      w.output.some((l) => /rc=[1-9]/.test(l)),
      `write to a read-only disk fails: ${w.output.join("|")}`,
    );
    assert.equal(await sha256OfFileRange(img, 0, 16 * MiB), zeroSha(16 * MiB), "image unchanged");
    await vm.close();
  });

  test("two queues on one worker thread, O_DIRECT with async I/O: a 2-vCPU guest, data intact", {
    skip,
  }, async () => {
    const rig = fx.rig();
    const img = await rig.createRawImage("mq.img", 32 * MiB);
    // --io async: several requests of each queue in flight at once, both queues on one pool.
    const be = await startBlk(rig, {
      name: "blk-mq",
      image: img,
      queues: 2,
      queueWorkers: 1,
      direct: true,
      io: "async",
    });
    backends.push(be);
    await be.waitLog(/2 queue\(s\) on 1 thread\(s\)/);
    const vm = await rig.startVm({ name: "vm-mq", smp: 2, vhostUserBlk: [{ socket: be.socket, numQueues: 2 }] });
    await vm.guest.ready();
    const q = await vm.guest.runOk("ls /sys/block/vda/mq/");
    assert.ok(q.output.join(" ").includes("1"), `two hardware queues: ${q.output.join("|")}`);
    // One writer pinned to each CPU (taskset is a busybox applet), so both queues carry requests.
    const r = await vm.guest.runOk(
      "for c in 0 1; do taskset -c $c dd if=/dev/urandom of=/dev/vda bs=64k seek=$((c * 128)) count=128 oflag=direct conv=fsync,notrunc 2>/dev/null & done; wait; " +
        "for c in 0 1; do echo MQ $c $(dd if=/dev/vda bs=64k skip=$((c * 128)) count=128 iflag=direct 2>/dev/null | sha256sum | cut -d' ' -f1); done",
    );
    const sums = r.output.map((l) => /MQ (\d) (\w+)/.exec(l)).filter((x) => x !== null);
    assert.equal(sums.length, 2, r.output.join("|"));
    for (const s of sums) {
      const c = Number(s[1]);
      assert.equal(await sha256OfFileRange(img, c * 8 * MiB, 8 * MiB), s[2], `cpu ${c}'s 8 MiB on the host`);
    }
    const starts = (await be.requests()).filter((x) => x.name === "SET_VRING_KICK").map((x) => x.detail);
    assert.ok(
      starts.some((d) => d.includes('"index":1')),
      `queue 1 started: ${starts.join("|")}`,
    );
    await vm.close();
  });
});
