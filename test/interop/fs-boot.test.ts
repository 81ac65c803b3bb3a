/**
 * `vmshift fs` as the virtio-fs back-end of a QEMU 10 guest (vhost-user-fs-pci): the guest mounts
 * the shared directory, reads a file the host put there, writes checksummed files that match on
 * the host, and does the directory work a Linux guest does (mkdir, create, rename, truncate,
 * chmod, symlink, unlink, rmdir, fsync, statfs); and symlinks planted by the host that point
 * outside the shared directory lead nowhere (the guest resolves them in its own namespace, the
 * back-end never follows them). Skips loudly when QEMU or the guest is missing.
 */
import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import { lstat, mkdir, readdir, readFile, symlink, writeFile } from "node:fs/promises";
import { describe, test } from "node:test";
import { skipBanner } from "./blk-helpers.js";
import { field, fsDeviceArgs, fsFixture, startFs } from "./fs-helpers.js";
import { GUEST_CRASH, MiB, probeInterop, sha256OfFileRange } from "./rig.js";

const probe = await probeInterop({ needQsd: false });
const skip = skipBanner("test/interop/fs-boot.test", probe.ok ? null : probe.reason);
if (!probe.ok && process.env.VMSHIFT_REQUIRE_INTEROP === "1") {
  test("QEMU interop rig is available (VMSHIFT_REQUIRE_INTEROP=1)", () => assert.fail(probe.reason));
}

describe("vmshift fs: a QEMU guest mounts the shared directory", { timeout: 180_000 }, () => {
  const fx = fsFixture("fs-boot", probe.ok);

  test("mount, read, write checksummed files, directory operations; host sees the same bytes", {
    skip,
  }, async () => {
    const rig = fx.rig();
    const share = rig.path("share");
    await mkdir(share);
    const hostData = randomBytes(3 * MiB + 123);
    await writeFile(`${share}/from-host.bin`, hostData);
    const be = await startFs(rig, { name: "fs", sharedDir: share });
    fx.backends.push(be);
    const vm = await rig.startVm({ name: "vm", extraArgs: fsDeviceArgs(be.socket, "share") });
    await vm.guest.ready();
    await vm.guest.runOk("rig_fs_mount share /mnt");

    // Host → guest.
    const hostSha = await sha256OfFileRange(`${share}/from-host.bin`, 0, hostData.length);
    const r1 = await vm.guest.runOk("rig_fsum /mnt/from-host.bin");
    assert.equal(field(r1, "RIG-FSUM", "sha256"), hostSha, "guest reads what the host wrote");

    // Guest → host: files of several sizes, in a new directory.
    await vm.guest.runOk("mkdir -p /mnt/dir/sub");
    const sums = new Map<string, string>();
    for (const [name, mib] of [
      ["a.bin", 1],
      ["dir/b.bin", 4],
      ["dir/sub/c.bin", 9],
    ] as const) {
      const r = await vm.guest.runOk(`rig_fwrite /mnt/${name} ${mib}`, { timeoutMs: 60_000 });
      sums.set(name, field(r, "RIG-FWROTE", "sha256"));
    }
    for (const [name, sha] of sums) {
      const size = (await lstat(`${share}/${name}`)).size;
      assert.equal(await sha256OfFileRange(`${share}/${name}`, 0, size), sha, `${name} on the host`);
      const r = await vm.guest.runOk(`rig_fsum /mnt/${name}`);
      assert.equal(field(r, "RIG-FSUM", "sha256"), sha, `${name} read back in the guest`);
    }

    // Directory work; each step checked on the host.
    const r2 = await vm.guest.runOk(
      [
        "cd /mnt/dir",
        "echo one > f1; echo two > f2; ln -s f1 l1",
        "mv f2 f3",
        "truncate -s 5000 f1 2>/dev/null || dd if=/dev/zero of=f1 bs=1 count=0 seek=5000 2>/dev/null",
        "chmod 640 f3",
        "sync",
        'echo "RIG-LS n=$(ls | wc -l) l1=$(readlink l1) f1=$(stat -c %s f1) f3=$(stat -c %a f3)"',
        "rm f3; rm l1; mkdir gone; rmdir gone",
        'echo "RIG-LSAFTER n=$(ls -a | wc -l)"',
        "df /mnt | tail -n 1 | awk '{print \"RIG-DF blocks=\" $2}'",
        "cd /; umount /mnt; echo RIG-UMOUNTED",
      ].join("\n"),
    );
    assert.equal(field(r2, "RIG-LS", "n"), "5", "b.bin sub f1 f3 l1");
    assert.equal(field(r2, "RIG-LS", "l1"), "f1");
    assert.equal(field(r2, "RIG-LS", "f1"), "5000");
    assert.equal(field(r2, "RIG-LS", "f3"), "640");
    assert.equal(field(r2, "RIG-LSAFTER", "n"), "5", ". .. b.bin sub f1");
    assert.ok(Number(field(r2, "RIG-DF", "blocks")) > 0, "statfs answers");
    assert.deepEqual((await readdir(`${share}/dir`)).sort(), ["b.bin", "f1", "sub"]);
    assert.equal((await lstat(`${share}/dir/f1`)).size, 5000);
    assert.equal((await readFile(`${share}/dir/f1`)).subarray(0, 4).toString(), "one\n");
    assert.deepEqual(vm.console.grep(GUEST_CRASH), []);
    assert.deepEqual((await be.log()).match(/error: .*/g) ?? [], [], "no error in the back-end's log");
    await vm.close();
  });

  test("symlinks the host planted towards the outside lead nowhere; the guest cannot climb out", {
    skip,
  }, async () => {
    const rig = fx.rig();
    const share = rig.path("share2");
    await mkdir(share);
    const secret = randomBytes(16).toString("hex");
    await writeFile(rig.path("secret.txt"), `${secret}\n`);
    await symlink(rig.path("secret.txt"), `${share}/abs`);
    await symlink("../secret.txt", `${share}/rel`);
    await symlink(rig.dir, `${share}/outdir`);
    const be = await startFs(rig, { name: "fs2", sharedDir: share });
    fx.backends.push(be);
    const vm = await rig.startVm({ name: "vm2", extraArgs: fsDeviceArgs(be.socket, "share") });
    await vm.guest.ready();
    const r = await vm.guest.run(
      [
        "rig_fs_mount share /mnt",
        "cat /mnt/abs /mnt/rel /mnt/outdir/secret.txt /mnt/../secret.txt 2>&1",
        "ls /mnt/outdir/ 2>&1",
        "echo pwned > /mnt/rel 2>&1; echo pwned > /mnt/abs 2>&1",
        'echo "RIG-LINKS abs=$(readlink /mnt/abs) rel=$(readlink /mnt/rel)"',
      ].join("\n"),
    );
    assert.ok(!r.output.join("\n").includes(secret), "the secret outside the share never reaches the guest");
    assert.equal(field(r, "RIG-LINKS", "rel"), "../secret.txt", "links read as text");
    assert.equal((await readFile(rig.path("secret.txt"), "utf8")).trim(), secret, "the outside file is untouched");
    await vm.close();
  });
});
