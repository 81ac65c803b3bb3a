/**
 * `npm run bench -- fs`: `vmshift fs` in a QEMU guest (the interop rig: QEMU 10, TCG, busybox guest).
 * /bin/vmshift-io fsbench (scripts/guest/vmshift-io.c) measures, in a directory: sequential write
 * (1 MiB writes + fsync) and read (page cache dropped first) in MB/s, and metadata operations per
 * second (create, stat with the dentry/inode caches dropped, unlink of empty files).
 *
 * Reference: virtiofsd is not packaged for this distribution (Debian 12), so the figures are set
 * beside the same operations on the guest's own tmpfs, in the same guest, in the same run: what the
 * guest can do with no device at all. The ratio says how much of that the shared directory keeps;
 * under TCG the guest's CPU is the main limit on both sides. FS_BENCH_VIRTIOFSD=PATH compares with a
 * virtiofsd binary instead (same guest setup, its own share). Medians of FS_BENCH_RUNS (default 3).
 */
import { spawnSync } from "node:child_process";
import { mkdirSync } from "node:fs";
import { setTimeout as sleep } from "node:timers/promises";
import { type FsBackend, fsDeviceArgs, startFs } from "../test/interop/fs-helpers.js";
import { ManagedProcess, parseRigRecords, probeInterop, Rig, type Vm } from "../test/interop/rig.js";
import { type Figure, figure, median } from "./report.js";

const RUNS = Number(process.env.FS_BENCH_RUNS ?? 3);
const MIB = Number(process.env.FS_BENCH_MIB ?? 64);
const FILES = Number(process.env.FS_BENCH_FILES ?? 500);
const MAX_PAGES = Number(process.env.FS_BENCH_MAX_PAGES ?? 256);
const QUEUE_SIZE = 1024;
const LIFETIME_MS = 900_000;

const OPS = [
  { op: "seqwrite", metric: "seq write 1 MiB + fsync", unit: "MB/s", key: "mbps" },
  { op: "seqread", metric: "seq read 1 MiB (cold)", unit: "MB/s", key: "mbps" },
  { op: "create", metric: "create empty file", unit: "ops/s", key: "opsps" },
  { op: "stat", metric: "stat (cold dentry cache)", unit: "ops/s", key: "opsps" },
  { op: "unlink", metric: "unlink", unit: "ops/s", key: "opsps" },
] as const;

function skip(reason: string): Figure[] {
  const bar = "!".repeat(78);
  process.stderr.write(`${bar}\n!! bench fs: SKIPPING: ${reason}\n${bar}\n`);
  return [];
}

async function fsbench(vm: Vm, dir: string): Promise<Record<string, number>> {
  const r = await vm.guest.run(`vmshift-io fsbench ${dir} ${MIB} ${FILES} 2>&1`, { timeoutMs: 300_000 });
  if (r.rc !== 0) throw new Error(`fsbench in ${dir} failed (rc ${r.rc}):\n${r.output.join("\n")}`);
  const out: Record<string, number> = {};
  for (const rec of parseRigRecords(r.output, "RIG-FSBENCH")) {
    const o = OPS.find((x) => x.op === rec.fields.op);
    if (o) out[o.op] = Number(rec.fields[o.key]);
  }
  return out;
}

/** A virtiofsd given by FS_BENCH_VIRTIOFSD, on its own share; resolves once its socket exists. */
async function startVirtiofsd(rig: Rig, bin: string, share: string): Promise<{ socket: string; proc: ManagedProcess }> {
  const socket = rig.path("virtiofsd.sock");
  const proc = new ManagedProcess(bin, ["--socket-path", socket, "--shared-dir", share, "--cache", "auto"], {
    name: "virtiofsd",
    lifetimeMs: LIFETIME_MS,
    stderrLog: rig.path("virtiofsd.log"),
  });
  for (let i = 0; i < 200; i++) {
    if (spawnSync("test", ["-S", socket]).status === 0) return { socket, proc };
    if (!proc.running) throw new Error(`virtiofsd exited: ${proc.stderr()}`);
    await sleep(50);
  }
  throw new Error("virtiofsd: no socket");
}

export async function run(): Promise<Figure[]> {
  const probe = await probeInterop({ needQsd: false });
  if (!probe.ok) return skip(probe.reason);
  const t0 = Date.now();
  const rig = await Rig.create("bench-fs");
  const backends: { close(): Promise<void> }[] = [];
  try {
    const share = rig.path("share");
    mkdirSync(share);
    const ours: FsBackend = await startFs(rig, {
      name: "vmshift-fs",
      sharedDir: share,
      maxPages: MAX_PAGES,
      lifetimeMs: LIFETIME_MS,
    });
    backends.push(ours);
    const args = fsDeviceArgs(ours.socket, "share", { queueSize: QUEUE_SIZE });
    const virtiofsd = process.env.FS_BENCH_VIRTIOFSD;
    let refLabel = "guest tmpfs (no device)";
    if (virtiofsd) {
      const refShare = rig.path("share-ref");
      mkdirSync(refShare);
      const ref = await startVirtiofsd(rig, virtiofsd, refShare);
      backends.push({ close: async () => void (await ref.proc.stop()) });
      args.push(...fsDeviceArgs(ref.socket, "ref", { id: "vfs1", queueSize: QUEUE_SIZE }));
      refLabel = "virtiofsd";
    }
    const vm = await rig.startVm({ name: "vm", memMiB: 512, extraArgs: args, lifetimeMs: LIFETIME_MS });
    await vm.guest.ready();
    const tool = await vm.guest.run("command -v vmshift-io");
    if (tool.rc !== 0) return skip("the guest has no /bin/vmshift-io (build-guest.sh needs gcc + libc6-dev)");
    await vm.guest.runOk(`rig_fs_mount share /mnt${virtiofsd ? "; rig_fs_mount ref /ref" : ""}; mkdir -p /tmp/bench`);
    const refDir = virtiofsd ? "/ref" : "/tmp/bench";
    // Warm-up (not counted): JIT, first touch of the guest's memory.
    await fsbench(vm, "/mnt");
    await fsbench(vm, refDir);
    const ourRuns: Record<string, number>[] = [];
    const refRuns: Record<string, number>[] = [];
    for (let r = 0; r < RUNS; r++) {
      if (r % 2 === 0) {
        ourRuns.push(await fsbench(vm, "/mnt"));
        refRuns.push(await fsbench(vm, refDir));
      } else {
        refRuns.push(await fsbench(vm, refDir));
        ourRuns.push(await fsbench(vm, "/mnt"));
      }
    }
    const figures: Figure[] = [];
    for (const o of OPS) {
      const a = ourRuns.map((x) => x[o.op] ?? Number.NaN);
      const b = refRuns.map((x) => x[o.op] ?? Number.NaN);
      figures.push(figure("fs", o.metric, o.unit, "higher", median(a), refLabel, median(b)));
      process.stderr.write(`bench fs: ${o.metric}: vmshift fs ${a.join("/")} ${refLabel} ${b.join("/")} ${o.unit}\n`);
    }
    const bad = vm.console.grep(/BUG:|Oops|virtio_fs.*error/);
    if (bad.length) throw new Error(`guest kernel complained:\n${bad.join("\n")}`);
    process.stderr.write(
      `bench fs: ${MIB} MiB files, ${FILES} files per metadata pass, max_pages ${MAX_PAGES}, queue ${QUEUE_SIZE}, ` +
        `${RUNS} runs, ${((Date.now() - t0) / 1000).toFixed(1)} s\n`,
    );
    return figures;
  } finally {
    await rig.close();
    await Promise.all(backends.map((b) => b.close()));
  }
}
