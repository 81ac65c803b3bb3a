/**
 * A QEMU 10 guest with a virtio-mem device (memory-backend-memfd, share=on) and `vmshift blk` as its
 * disk: memory is plugged and unplugged (QMP qom-set requested-size) while the guest does O_DIRECT
 * disk I/O from freshly allocated buffers — the guest onlines plugged memory as ZONE_MOVABLE, which
 * user pages prefer, and the guest tool reports (from /proc/self/pagemap) how many of its buffers'
 * pages lie in the virtio-mem device's memory: the device reads and writes exactly those pages.
 * Every round's data must read back, the last one must be on the host image, and our back-end must
 * have followed the memory table: with dynamic-memslots=on, QEMU maps plugged memory as memslots come
 * and go (ADD_MEM_REG / REM_MEM_REG); with it off, the device's whole memory is one region from the
 * start, unplugged blocks discarded by QEMU, and the back-end only ever touches what the guest hands it.
 *
 * Then a migration (precopy, `vmshift blk` on both sides) — only after everything was unplugged:
 * QEMU 10.0.2 under TCG aborts (tlb_reset_dirty_range_all assertion) migrating a guest with plugged
 * virtio-mem memory, with or without any vhost-user device. The destination plugs memory again and
 * its I/O runs from it. Skips loudly when QEMU or the guest is missing.
 */
import assert from "node:assert/strict";
import { readdirSync, readFileSync, readlinkSync, statSync } from "node:fs";
import { open } from "node:fs/promises";
import { describe, test } from "node:test";
import { type BlkBackend, blkFixture, skipBanner, startBlk } from "./blk-helpers.js";
import { GUEST_CRASH, MiB, migrate, parseRigRecords, probeInterop, type Rig, type Vm } from "./rig.js";

const probe = await probeInterop();
const skip = skipBanner("test/interop/blk-virtio-mem.test", probe.ok ? null : probe.reason);
if (!probe.ok && process.env.VMSHIFT_REQUIRE_INTEROP === "1") {
  test("QEMU interop rig is available (VMSHIFT_REQUIRE_INTEROP=1)", () => assert.fail(probe.reason));
}

const BOOT_MIB = 256;
const VMEM_MIB = 1024;
const IO_OFF_MIB = 8;
const IO_MIB = 4;

interface VirtioMemInfo {
  memaddr: number;
  size: number;
  "requested-size": number;
  "max-size": number;
}

function vmemArgs(dynamicMemslots: boolean): string[] {
  return [
    "-object",
    `memory-backend-memfd,id=vmem0,size=${VMEM_MIB}M,share=on`,
    "-device",
    `virtio-mem-pci,id=vm0,memdev=vmem0,requested-size=0,block-size=2M,dynamic-memslots=${dynamicMemslots ? "on" : "off"}`,
  ];
}

async function vmemInfo(vm: Vm): Promise<VirtioMemInfo> {
  const devs = await vm.qmp.execute<{ type: string; data: VirtioMemInfo & { id: string } }[]>("query-memory-devices");
  const d = devs.find((x) => x.type === "virtio-mem" && x.data.id === "vm0");
  assert.ok(d, "the virtio-mem device is listed");
  return d.data;
}

/** Asks for `mib` MiB and waits until the guest has (un)plugged it. */
async function resize(vm: Vm, mib: number, timeoutMs = 90_000): Promise<number> {
  const t0 = Date.now();
  await vm.qmp.execute("qom-set", { path: "/machine/peripheral/vm0", property: "requested-size", value: mib * MiB });
  for (;;) {
    const i = await vmemInfo(vm);
    if (i.size === mib * MiB) return Date.now() - t0;
    if (Date.now() - t0 > timeoutMs) throw new Error(`virtio-mem: size ${i.size / MiB} MiB, wanted ${mib} MiB`);
    await new Promise((r) => setTimeout(r, 100));
  }
}

function memioRounds(vm: Vm): { round: number; ok: boolean; inrange: number; sha: string }[] {
  return parseRigRecords(vm.console.lines, "RIG-MEMIO").map((r) => ({
    round: Number(r.fields.round),
    ok: r.fields.ok === "1",
    inrange: Number(r.fields.inrange),
    sha: r.fields.sha as string,
  }));
}

/** FNV-1a 64 of a file range (what vmshift-io memio prints as sha). */
async function fnv64(path: string, off: number, len: number): Promise<string> {
  const fh = await open(path, "r");
  try {
    const b = Buffer.alloc(len);
    await fh.read(b, 0, len, off);
    let h = 0xcbf29ce484222325n;
    for (const x of b) h = ((h ^ BigInt(x)) * 0x100000001b3n) & 0xffffffffffffffffn;
    return h.toString(16).padStart(16, "0");
  } finally {
    await fh.close();
  }
}

async function startMemio(vm: Vm, info: VirtioMemInfo): Promise<void> {
  const lo = info.memaddr.toString(16);
  const hi = (info.memaddr + info["max-size"]).toString(16);
  await vm.guest.runOk(
    // One round per run, so a stop never cuts a round between its write and its report.
    "rm -f /tmp/memio-stop; (while [ ! -e /tmp/memio-stop ]; do " +
      `vmshift-io memio /dev/vda ${IO_OFF_MIB} ${IO_MIB} 1 ${lo} ${hi} || echo RIG-MEMIO-FAILED; done; ` +
      "echo RIG-MEMIO-EXIT) > /dev/console 2>&1 &",
  );
}

async function stopMemio(vm: Vm): Promise<void> {
  await vm.guest.runOk("touch /tmp/memio-stop");
  await vm.console.waitFor(/RIG-MEMIO-EXIT/, { timeoutMs: 20_000 });
}

async function waitRounds(vm: Vm, more: number): Promise<void> {
  const n = memioRounds(vm).length;
  const deadline = Date.now() + 60_000;
  while (memioRounds(vm).length < n + more) {
    if (Date.now() > deadline) throw new Error(`memio: no ${more} more rounds (at ${n})`);
    await new Promise((r) => setTimeout(r, 100));
  }
}

/** The QEMU process under the rig's wrappers (setpriv/timeout): the descendant whose executable is QEMU. */
function qemuPid(pid: number): number | null {
  const todo = [pid];
  while (todo.length) {
    const p = todo.shift() as number;
    try {
      if (readlinkSync(`/proc/${p}/exe`).includes("qemu-system")) return p;
      todo.push(
        ...readFileSync(`/proc/${p}/task/${p}/children`, "utf8").trim().split(/\s+/).filter(Boolean).map(Number),
      );
    } catch {
      // gone, or not ours to read
    }
  }
  return null;
}

/**
 * Bytes allocated in the virtio-mem device's memfd (found among QEMU's fds by its size): after
 * everything is unplugged, anything allocated there was touched after QEMU discarded it.
 */
function vmemAllocated(vm: Vm): number {
  const pid = qemuPid(vm.proc.pid ?? 0);
  assert.ok(pid, "QEMU's pid");
  for (const fd of readdirSync(`/proc/${pid}/fd`)) {
    try {
      if (!readlinkSync(`/proc/${pid}/fd/${fd}`).startsWith("/memfd:")) continue;
      const st = statSync(`/proc/${pid}/fd/${fd}`);
      if (st.size === VMEM_MIB * MiB) return st.blocks * 512;
    } catch {
      // closed meanwhile
    }
  }
  throw new Error("no memfd of the virtio-mem device's size among QEMU's fds");
}

async function memRegions(be: BlkBackend): Promise<{ add: bigint[]; rem: bigint[]; seq: string[] }> {
  const add: bigint[] = [];
  const rem: bigint[] = [];
  const seq: string[] = [];
  for (const r of await be.requests()) {
    const gpa = /"guestAddress":"(0x[0-9a-f]+)"/.exec(r.detail)?.[1];
    const size = /"size":"(0x[0-9a-f]+)"/.exec(r.detail)?.[1];
    if ((r.name === "ADD_MEM_REG" || r.name === "REM_MEM_REG") && gpa) {
      (r.name === "ADD_MEM_REG" ? add : rem).push(BigInt(gpa));
      seq.push(`${r.name === "ADD_MEM_REG" ? "+" : "-"}${gpa}/${Number(BigInt(size ?? "0")) / MiB}M`);
    }
  }
  return { add, rem, seq };
}

async function plugScenario(rig: Rig, backends: BlkBackend[], dynamicMemslots: boolean, withMigration: boolean) {
  const tag = dynamicMemslots ? "dyn" : "static";
  const img = await rig.createRawImage(`vmem-${tag}.img`, 64 * MiB);
  const a = await startBlk(rig, { name: `blk-${tag}-a`, image: img });
  backends.push(a);
  const append = "memhp_default_state=online_movable";
  const src = await rig.startVm({
    name: `vmem-${tag}`,
    memMiB: BOOT_MIB,
    maxMemMiB: BOOT_MIB + VMEM_MIB,
    vhostUserBlk: [{ socket: a.socket }],
    extraArgs: vmemArgs(dynamicMemslots),
    append,
  });
  await src.guest.ready();
  const info = await vmemInfo(src);
  const vmemLo = BigInt(info.memaddr);
  const vmemHi = vmemLo + BigInt(info["max-size"]);
  const before = await memRegions(a);
  await startMemio(src, info);
  await waitRounds(src, 2);

  // Plug and unplug while the I/O runs; each step waits for the guest to follow.
  const steps: string[] = [];
  let allocatedPlugged = 0;
  for (const mib of [512, 256, 768, 128, 0]) {
    const ms = await resize(src, mib);
    await waitRounds(src, 3);
    if (mib === 768) allocatedPlugged = vmemAllocated(src);
    const r = memioRounds(src);
    const last3 = r.slice(-3);
    steps.push(`${mib} MiB in ${ms} ms, in-range pages of the last rounds ${last3.map((x) => x.inrange).join("/")}`);
  }
  await stopMemio(src);
  // Everything is unplugged (the last step): QEMU discarded every block, and nobody — the guest,
  // QEMU, our back-end — touched one since: the device's memfd holds no page.
  const allocated = vmemAllocated(src);
  assert.ok(allocatedPlugged > 0, "plugged memory in use shows as allocated (the check below can fail)");
  assert.equal(allocated, 0, "no page of unplugged virtio-mem memory is populated");
  const rounds = memioRounds(src);
  assert.ok(rounds.length > 15, `${rounds.length} rounds`);
  assert.deepEqual(
    rounds.filter((r) => !r.ok),
    [],
    "every round read back what it wrote",
  );
  assert.deepEqual(src.console.grep(/RIG-MEMIO-FAILED/), []);
  const inVmem = rounds.filter((r) => r.inrange > 0);
  assert.ok(inVmem.length > 0, "some rounds did their I/O from buffers in virtio-mem memory");
  const lastRound = rounds.at(-1);
  assert.equal(
    await fnv64(img, IO_OFF_MIB * MiB, IO_MIB * MiB),
    lastRound?.sha,
    "the last round's data is on the image",
  );
  assert.deepEqual(src.console.grep(GUEST_CRASH), []);
  assert.deepEqual(src.console.grep(/I\/O error|blk_update_request/), []);
  assert.deepEqual((await a.log()).match(/error: .*/g) ?? [], [], "no error in the back-end's log");

  // What our back-end saw of the memory table.
  const after = await memRegions(a);
  const inDevice = (g: bigint) => g >= vmemLo && g < vmemHi;
  const addedVmem = after.add.filter(inDevice);
  const removedVmem = after.rem.filter(inDevice);
  if (dynamicMemslots) {
    assert.ok(addedVmem.length > 0, "plugged memory arrived as ADD_MEM_REG of memslots in the device's range");
    assert.ok(removedVmem.length > 0, "unplugged memslots went as REM_MEM_REG");
    assert.equal(
      before.add.filter(inDevice).length,
      0,
      "nothing of the device's memory was mapped before anything was plugged",
    );
  } else {
    assert.equal(removedVmem.length, 0, "without dynamic memslots the table does not change");
  }
  process.stderr.write(
    `virtio-mem (${tag}): ${rounds.length} rounds, ${inVmem.length} with buffers in the device's memory ` +
      `(max ${Math.max(...rounds.map((r) => r.inrange))} of ${2 * IO_MIB * 256} pages); memfd ${allocatedPlugged / MiB} MiB ` +
      `allocated with 768 MiB plugged, ${allocated} bytes after unplugging all; back-end: ` +
      `${after.add.length} ADD_MEM_REG (${addedVmem.length} in the device), ${after.rem.length} REM_MEM_REG ` +
      `(${removedVmem.length} in the device) [${after.seq.join(" ")}]; ${steps.join("; ")}\n`,
  );

  if (!withMigration) {
    await src.close();
    return;
  }
  // Everything is unplugged: a configuration QEMU 10 survives. Migrate, then plug on the destination.
  const b = await startBlk(rig, { name: `blk-${tag}-b`, image: img });
  backends.push(b);
  const dst = await rig.startVm({
    name: `vmem-${tag}-dst`,
    memMiB: BOOT_MIB,
    maxMemMiB: BOOT_MIB + VMEM_MIB,
    vhostUserBlk: [{ socket: b.socket }],
    extraArgs: vmemArgs(dynamicMemslots),
    append,
    incoming: true,
  });
  assert.equal((await vmemInfo(src)).size, 0);
  const result = await migrate(src, dst, { uri: rig.migrationUri(), timeoutMs: 60_000 });
  assert.equal(result.status, "completed");
  const ms = await resize(dst, 384);
  await startMemio(dst, await vmemInfo(dst));
  await waitRounds(dst, 4);
  await stopMemio(dst);
  // The destination's console starts at the switch-over: its rounds are all after the migration.
  const dr = memioRounds(dst);
  assert.ok(dr.length >= 4);
  assert.deepEqual(
    dr.filter((r) => !r.ok),
    [],
  );
  assert.ok(
    dr.some((r) => r.inrange > 0),
    "on the destination too, from plugged memory",
  );
  assert.equal(await fnv64(img, IO_OFF_MIB * MiB, IO_MIB * MiB), dr.at(-1)?.sha);
  assert.deepEqual(dst.console.grep(GUEST_CRASH), []);
  process.stderr.write(
    `virtio-mem (${tag}) migration with nothing plugged: ${result.status} in ${result.totalTimeMs} ms; ` +
      `destination plugged 384 MiB in ${ms} ms, ${dr.length} rounds, ${dr.filter((r) => r.inrange > 0).length} from it\n`,
  );
  await Promise.all([src.close(), dst.close()]);
}

describe("vmshift blk with a virtio-mem guest", { timeout: 300_000 }, () => {
  const fx = blkFixture("blk-vmem", probe.ok);

  test("dynamic-memslots=on: plug/unplug during I/O, then migrate (nothing plugged) and plug there", {
    skip,
  }, async () => {
    await plugScenario(fx.rig(), fx.backends, true, true);
  });

  test("dynamic-memslots=off: plug/unplug during I/O", { skip }, async () => {
    await plugScenario(fx.rig(), fx.backends, false, false);
  });
});
