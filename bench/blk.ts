/**
 * `npm run bench -- blk`: `vmshift blk` against qemu-storage-daemon on the same raw image contents
 * in the same run, in two views (ratio = ours / QSD's, medians of several runs):
 *
 * 1. Back-end efficiency: a front-end in Node (VhostUserFrontend + SplitQueueDriver, no guest)
 *    drives each back-end — both run as child processes — with 4 KiB random reads and writes at
 *    queue depth 1 and 32 (32 per queue), on one and two queues, for a fixed time per run.
 *    Packed-ring rows: the same load on packed rings (PackedQueueDriver) against our back-end,
 *    beside our split-ring figure of the same run (qemu-storage-daemon offers no packed rings).
 * 2. In a QEMU guest (the interop rig: QEMU 10, TCG, busybox guest): /bin/vmshift-io
 *    (scripts/guest/vmshift-io.c, O_DIRECT on /dev/vda) measures 4 KiB random reads at QD1 (IOPS)
 *    and sequential 1 MiB reads and writes (MB/s). No guest sends FLUSH (its block layer's
 *    write_cache is set to write through, which QSD's guest is by its config space anyway). One guest per back-end, each on its own copy
 *    of the image, measured in turn; a third guest with `packed=on` on its own `vmshift blk`
 *    gives the packed rows (against our split-ring guest). Under TCG the guest's CPU is the limit; this view shows that
 *    nothing in our path is pathological, not the back-end's ceiling.
 *
 * The images are on the host page cache (no O_DIRECT in either back-end): this measures the
 * back-ends' per-request cost, not the disk. Needs qemu-storage-daemon (skips without it); the
 * guest view also needs QEMU and the rig's guest (skips loudly without them).
 * Only one view: BLK_BENCH_VIEW=backend|guest, or `npm run bench -- blk --view=guest`.
 * BLK_BENCH_ONLY=rand|seq: only the 4 KiB random rows or only the sequential ones (both views).
 * BLK_BENCH_RUNS=N: rounds per row (default 5; the row is the median).
 * BLK_BENCH_QUEUES=1|2|1,2: only the one-queue or two-queue rows of the backend view.
 * BLK_BENCH_CPU=1: each back-end's CPU time per request (all its threads, /proc) of every random
 *   run of the backend view, on stderr. Per-round figures and the
 * per-round ratio (ours / QSD of the same round) go to stderr, so the spread can be read off.
 * BLK_BENCH_DIRECT=1: both back-ends bypass the host page cache (`--direct`; QSD cache.direct=on).
 * BLK_BENCH_IO=sync|async|adaptive: our back-ends' --io (default: the program's own).
 * BLK_BENCH_FLAGS="...": more flags for our back-ends (e.g. "--queue-workers 2").
 * BLK_BENCH_GUEST_MIB=N: MiB per in-guest sequential run (default 1024: ~0.5-1 s per run; with 128
 *   a run lasted ~0.1 s and one scheduling hiccup moved it by tens of per cent).
 * BLK_BENCH_VARIANT_ENV="K=V ...": the in-guest view boots a fourth guest on our back-end with that
 *   environment and reports it against our plain one (an A/B of a knob within one run).
 */
import { type ChildProcess, spawn, spawnSync } from "node:child_process";
import { mkdtempSync, readFileSync, rmSync, statSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { setTimeout as sleep } from "node:timers/promises";
import { fileURLToPath } from "node:url";
import { VIRTIO_BLK_F_FLUSH } from "../src/devices/blk/constants.js";
import { GuestMemory } from "../src/memory/guest-memory.js";
import { GuestMemoryRegion } from "../src/memory/region.js";
import { FRONTEND_PROTOCOL_FEATURES, VhostUserFrontend } from "../src/vhost-user/frontend/frontend.js";
import { featureMask, ProtocolFeature, VirtioFeature } from "../src/vhost-user/protocol/constants.js";
import { SplitQueueDriver } from "../src/virtio/driver.js";
import { PackedQueueDriver } from "../src/virtio/packed-driver.js";
import { splitQueueLayout } from "../src/virtio/ring.js";
import { type BlkBackend, startBlk } from "../test/interop/blk-helpers.js";
import { parseRigRecords, probeInterop, Rig, type Vm } from "../test/interop/rig.js";
import { type Figure, figure, median } from "./report.js";

const MiB = 1 << 20;
const IMAGE = 256 * MiB;
const QUEUE_SIZE = 128;
const RUNS = Number(process.env.BLK_BENCH_RUNS ?? 5);
const RUN_MS = Number(process.env.BLK_BENCH_MS ?? 1000);
const VERSION_1 = featureMask(VirtioFeature.VIRTIO_F_VERSION_1);
const DIRECT = process.env.BLK_BENCH_DIRECT === "1";
const OUR_IO = process.env.BLK_BENCH_IO as "sync" | "async" | "adaptive" | undefined;
/** Our extra command-line flags for the chosen cache / I/O mode, and BLK_BENCH_FLAGS. */
const OUR_FLAGS = [
  ...(DIRECT ? ["--direct"] : []),
  ...(OUR_IO ? ["--io", OUR_IO] : []),
  ...(process.env.BLK_BENCH_FLAGS ?? "").split(" ").filter(Boolean),
];
/** BLK_BENCH_ONLY=rand|seq: only the 4 KiB random rows or only the sequential ones. */
const ONLY = process.env.BLK_BENCH_ONLY;
/** BLK_BENCH_QUEUES=1|2|1,2: the queue counts of the backend view (default both). */
const QUEUES = (process.env.BLK_BENCH_QUEUES ?? "1,2").split(",").map(Number);
/** Pages per request of the sequential rows (a guest's seg_max). */
const SEQ_SEGS = 126;
const T_IN = 0;
const T_OUT = 1;

interface Backend {
  name: string;
  socket: string;
  proc: ChildProcess;
}

function repoRoot(): string {
  let d = dirname(fileURLToPath(import.meta.url));
  for (let i = 0; i < 5; i++) {
    try {
      if (statSync(join(d, "package.json")).isFile()) return d;
    } catch {
      // up
    }
    d = dirname(d);
  }
  throw new Error("repo root not found");
}

async function waitSocket(b: Backend): Promise<void> {
  for (let i = 0; i < 500; i++) {
    try {
      if (statSync(b.socket).isSocket()) return;
    } catch {
      // not yet
    }
    if (b.proc.exitCode !== null) throw new Error(`${b.name} exited (${b.proc.exitCode})`);
    await sleep(20);
  }
  throw new Error(`${b.name}: no socket`);
}

async function startOurs(dir: string, image: string, queues: number): Promise<Backend> {
  const socket = join(dir, `vmshift-${queues}.sock`);
  const main = join(repoRoot(), "dist", "src", "cli", "blk-main.js");
  const args = [main, "--socket-path", socket, "--image", image, "--queues", String(queues), ...OUR_FLAGS];
  // BLK_BENCH_NODE_FLAGS: extra node flags for our back-end (e.g. --cpu-prof for a profile).
  const flags = (process.env.BLK_BENCH_NODE_FLAGS ?? "").split(" ").filter(Boolean);
  const proc = spawn(process.execPath, [...flags, ...args], {
    stdio: ["ignore", "ignore", "inherit"],
    env: { ...process.env, VMSHIFT_BLK_TRACE: "0" },
  });
  const b = { name: "vmshift blk", socket, proc };
  await waitSocket(b);
  return b;
}

async function startQsd(qsd: string, dir: string, image: string, queues: number): Promise<Backend> {
  const socket = join(dir, `qsd-${queues}.sock`);
  const proc = spawn(
    qsd,
    [
      "--blockdev",
      `driver=file,node-name=file0,filename=${image},locking=off${DIRECT ? ",cache.direct=on" : ""}`,
      "--blockdev",
      "driver=raw,node-name=disk0,file=file0",
      "--export",
      `type=vhost-user-blk,id=exp0,node-name=disk0,addr.type=unix,addr.path=${socket},writable=on,num-queues=${queues}`,
    ],
    { stdio: ["ignore", "ignore", "inherit"] },
  );
  const b = { name: "qemu-storage-daemon", socket, proc };
  await waitSocket(b);
  return b;
}

async function stop(b: Backend): Promise<void> {
  if (b.proc.exitCode !== null) return;
  const gone = new Promise((r) => b.proc.once("exit", r));
  b.proc.kill("SIGTERM");
  const t = setTimeout(() => b.proc.kill("SIGKILL"), 3000);
  await gone;
  clearTimeout(t);
}

/** One queue's requests: a slot per request in flight (header, 4 KiB buffer, status byte). */
class BlkQueue {
  readonly #free: number[] = [];
  readonly #slotOf = new Map<number, number>();
  completed = 0;
  errors = 0;
  constructor(
    readonly fe: VhostUserFrontend,
    readonly index: number,
    readonly driver: SplitQueueDriver | PackedQueueDriver,
    readonly mem: GuestMemory,
    readonly scratch: number,
    readonly depth: number,
    readonly segs = 1,
    readonly bigData = 0,
  ) {
    for (let s = depth - 1; s >= 0; s--) this.#free.push(s);
  }
  #hdr(s: number) {
    return this.scratch + s * 16;
  }
  #status(s: number) {
    return this.scratch + 4096 + s;
  }
  #buf(s: number) {
    return this.scratch + 8192 + s * 4096;
  }
  /**
   * Data buffers of slot `s`: one 4 KiB page, or `segs` pages interleaved with the other slots'
   * (not contiguous in guest memory, like a guest's page-cache or O_DIRECT pages).
   */
  #data(s: number): { addr: number; len: number }[] {
    if (this.segs === 1) return [{ addr: this.#buf(s), len: 4096 }];
    return Array.from({ length: this.segs }, (_, k) => ({
      addr: this.bigData + (k * this.depth + s) * 4096,
      len: 4096,
    }));
  }
  submit(type: number, sector: number): void {
    const s = this.#free.pop() as number;
    const h = this.#hdr(s);
    this.mem.writeU32(h, type);
    this.mem.writeU32(h + 4, 0);
    this.mem.writeU32(h + 8, sector);
    this.mem.writeU32(h + 12, 0);
    const data = this.#data(s);
    const st = [{ addr: this.#status(s), len: 1 }];
    const head =
      type === T_OUT
        ? this.driver.add([{ addr: h, len: 16 }, ...data], st, { indirect: this.segs > 1 })
        : this.driver.add([{ addr: h, len: 16 }], [...data, ...st], { indirect: this.segs > 1 });
    this.#slotOf.set(head, s);
  }
  get free(): number {
    return this.#free.length;
  }
  reap(): number {
    let n = 0;
    for (let u = this.driver.getUsed(); u; u = this.driver.getUsed()) {
      const s = this.#slotOf.get(u.head) as number;
      this.#slotOf.delete(u.head);
      if (this.mem.readU8(this.#status(s)) !== 0) this.errors++;
      this.#free.push(s);
      n++;
    }
    this.completed += n;
    return n;
  }
  /** Keeps `depth` requests in flight until `until` (ms): random 4 KiB, or sequential `segs` pages. */
  async run(until: number, write: boolean, sectors: number): Promise<void> {
    let x = (this.index + 1) * 2654435761;
    const span = this.segs * 8;
    let next = 0;
    while (Date.now() < until) {
      while (this.free > 0) {
        x = (x * 1103515245 + 12345) >>> 0;
        if (this.segs === 1) this.submit(write ? T_OUT : T_IN, (x % (sectors / 8)) * 8);
        else {
          if (next + span > sectors) next = 0;
          this.submit(write ? T_OUT : T_IN, next);
          next += span;
        }
      }
      if (this.driver.publish()) this.fe.kick(this.index);
      for (;;) {
        const since = this.fe.vring(this.index).calls;
        if (this.reap() > 0) break;
        if (this.driver.enableInterrupts()) continue;
        await this.fe.waitCall(this.index, { since, timeoutMs: 5000 });
      }
    }
    // Drain what is still in flight.
    while (this.free < this.depth) {
      const since = this.fe.vring(this.index).calls;
      if (this.reap() > 0) continue;
      if (this.driver.enableInterrupts()) continue;
      await this.fe.waitCall(this.index, { since, timeoutMs: 5000 });
    }
  }
}

/** CPU time (user + system, all threads) of process `pid` so far, µs; NaN when unknown. */
function cpuUs(pid: number | undefined): number {
  if (pid === undefined) return Number.NaN;
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, "utf8");
    const f = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
    // Fields 14 and 15 of proc(5) (utime, stime), in clock ticks of 10 ms.
    return (Number(f[11]) + Number(f[12])) * 10_000;
  } catch {
    return Number.NaN;
  }
}

/** BLK_BENCH_CPU=1: the back-end's CPU µs per request of each timed run, on stderr. */
const SHOW_CPU = process.env.BLK_BENCH_CPU === "1";

/** IOPS of one timed run against `socket` (`pid`: the back-end's, for BLK_BENCH_CPU). */
async function measure(
  socket: string,
  queues: number,
  depth: number,
  write: boolean,
  packed = false,
  segs = 1,
  pid?: number,
): Promise<number> {
  const mem = new GuestMemory([GuestMemoryRegion.memfd(0, 16 * MiB)]);
  const fe = VhostUserFrontend.connect(socket, {
    timeoutMs: 5000,
    protocolFeatures: FRONTEND_PROTOCOL_FEATURES | featureMask(ProtocolFeature.MQ),
  });
  try {
    await fe.negotiate();
    await fe.setOwner();
    const offered = fe.backendFeatures ?? 0n;
    const PACKED = featureMask(VirtioFeature.VIRTIO_F_RING_PACKED);
    if (packed && (offered & PACKED) === 0n) throw new Error("the back-end offers no packed rings");
    // + EVENT_IDX when offered; large requests go in indirect tables, as a guest's do. FLUSH as
    // a Linux guest takes it: without it our back-end is writethrough (every write flushed, as
    // virtio 1.2 5.2.5.2 asks when the driver cannot flush) while QSD never flushes.
    const INDIRECT = segs > 1 ? featureMask(VirtioFeature.VIRTIO_RING_F_INDIRECT_DESC) : 0n;
    const FLUSH = featureMask(VIRTIO_BLK_F_FLUSH);
    const features = VERSION_1 | (offered & (featureMask(29) | INDIRECT | FLUSH)) | (packed ? PACKED : 0n);
    await fe.setFeatures(features);
    await fe.setMemTable(mem);
    const qs: BlkQueue[] = [];
    for (let q = 0; q < queues; q++) {
      const base = 0x10000 + q * 0x100000;
      const indirectTables = INDIRECT ? { address: 12 * MiB + q * MiB, entries: segs + 2 } : undefined;
      const options = { features, ...(indirectTables ? { indirectTables } : {}) };
      const driver = packed
        ? PackedQueueDriver.at(mem, base, QUEUE_SIZE, options)
        : new SplitQueueDriver(mem, { ...splitQueueLayout(base, QUEUE_SIZE), ...options });
      await fe.startVring(q, driver.layout);
      qs.push(new BlkQueue(fe, q, driver, mem, base + 0x10000, depth, segs, 4 * MiB + q * 4 * MiB));
    }
    const sectors = IMAGE / 512;
    // Warm-up, then the timed run.
    await Promise.all(qs.map((q) => q.run(Date.now() + 100, write, sectors)));
    for (const q of qs) q.completed = 0;
    const cpu0 = cpuUs(pid);
    const t0 = performance.now();
    await Promise.all(qs.map((q) => q.run(Date.now() + RUN_MS, write, sectors)));
    const secs = (performance.now() - t0) / 1000;
    const errors = qs.reduce((a, q) => a + q.errors, 0);
    if (errors) throw new Error(`${errors} requests failed`);
    const done = qs.reduce((a, q) => a + q.completed, 0);
    if (SHOW_CPU && pid !== undefined) {
      const per = (cpuUs(pid) - cpu0) / done;
      process.stderr.write(
        `bench blk: cpu pid ${pid} ${queues}q qd${depth} ${write ? "w" : "r"}: ${per.toFixed(1)} µs/request\n`,
      );
    }
    return done / secs;
  } finally {
    fe.close();
    mem.close();
  }
}

/** Ours / QSD's of the same round, for reading the spread off stderr. */
function roundRatios(ours: readonly number[], qsd: readonly number[]): string {
  return ours.map((x, i) => (x / (qsd[i] as number)).toFixed(2)).join("/");
}

/** Writes `bytes` of 0xa5 to `path`: allocated, in the page cache, reads hit real data. */
function fillImage(path: string, bytes: number): void {
  const chunk = Buffer.alloc(MiB, 0xa5);
  writeFileSync(path, Buffer.alloc(0));
  for (let i = 0; i < bytes / MiB; i++) writeFileSync(path, chunk, { flag: "a" });
}

/** View 1: the Node front-end against each back-end. */
async function backendView(qsd: string): Promise<Figure[]> {
  const dir = mkdtempSync(join(tmpdir(), "vmshift-bench-blk-"));
  const image = join(dir, "disk.img");
  fillImage(image, IMAGE);
  const figures: Figure[] = [];
  try {
    for (const queues of QUEUES) {
      const ours = await startOurs(dir, image, queues);
      const ref = await startQsd(qsd, dir, image, queues);
      try {
        for (const depth of ONLY === "seq" ? [] : [1, 32]) {
          for (const write of [false, true]) {
            const a: number[] = [];
            const b: number[] = [];
            const p: number[] = [];
            for (let r = 0; r < RUNS; r++) {
              a.push(await measure(ours.socket, queues, depth, write, false, 1, ours.proc.pid));
              b.push(await measure(ref.socket, queues, depth, write, false, 1, ref.proc.pid));
              p.push(await measure(ours.socket, queues, depth, write, true));
            }
            const metric = `4k rand${write ? "write" : "read"} qd${depth} ${queues}q`;
            figures.push(figure("blk", metric, "IOPS", "higher", median(a), "qemu-storage-daemon", median(b)));
            figures.push(figure("blk", `${metric} packed`, "IOPS", "higher", median(p), "vmshift split", median(a)));
            process.stderr.write(
              `bench blk: ${metric}: vmshift ${a.map(Math.round).join("/")} qsd ${b.map(Math.round).join("/")} ` +
                `vmshift packed ${p.map(Math.round).join("/")} (per-round ratio ${roundRatios(a, b)})\n`,
            );
          }
        }
        // What a guest's 1 MiB O_DIRECT I/O looks like on the ring: requests of 126 scattered 4 KiB
        // pages (seg_max), about three in flight at once.
        for (const write of queues === 1 && ONLY !== "rand" ? [false, true] : []) {
          const a: number[] = [];
          const b: number[] = [];
          const p: number[] = [];
          const mbps = (iops: number) => (iops * SEQ_SEGS * 4096) / 1e6;
          for (let r = 0; r < RUNS; r++) {
            a.push(mbps(await measure(ours.socket, queues, 3, write, false, SEQ_SEGS)));
            b.push(mbps(await measure(ref.socket, queues, 3, write, false, SEQ_SEGS)));
            p.push(mbps(await measure(ours.socket, queues, 3, write, true, SEQ_SEGS)));
          }
          const metric = `seq${write ? "write" : "read"} 504k qd3 1q`;
          figures.push(figure("blk", metric, "MB/s", "higher", median(a), "qemu-storage-daemon", median(b)));
          figures.push(figure("blk", `${metric} packed`, "MB/s", "higher", median(p), "vmshift split", median(a)));
          const f = (xs: number[]) => xs.map((x) => x.toFixed(0)).join("/");
          process.stderr.write(
            `bench blk: ${metric}: vmshift ${f(a)} qsd ${f(b)} vmshift packed ${f(p)} MB/s (per-round ratio ${roundRatios(a, b)})\n`,
          );
        }
      } finally {
        await stop(ours);
        await stop(ref);
      }
    }
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
  return figures;
}

// ---------------------------------------------------------------- view 2: in a QEMU guest

/** Seconds of 4 KiB random reads per run. */
const GUEST_RAND_SECS = Number(process.env.BLK_BENCH_GUEST_SECS ?? 3);
/** MiB read / written sequentially per run, in 1 MiB requests. */
const GUEST_SEQ_MIB = Number(process.env.BLK_BENCH_GUEST_MIB ?? 1024);
/** Each guest's image: at least 256 MiB, and large enough for one sequential run. */
const GUEST_IMAGE = Math.max(256, GUEST_SEQ_MIB) * MiB;
const GUEST_SEQ_BS = MiB;
/** Every QEMU / back-end process of the view dies after this, whatever happens. */
const GUEST_LIFETIME_MS = 300_000;

interface GuestOp {
  metric: string;
  unit: string;
  /** The vmshift-io command line in the guest. */
  cmd: string;
  /** The RIG-IO field holding the figure. */
  field: string;
  timeoutMs: number;
}

const GUEST_OPS: GuestOp[] = [
  {
    metric: "in-guest 4k randread QD1",
    unit: "IOPS",
    cmd: `vmshift-io randread /dev/vda ${GUEST_RAND_SECS}`,
    field: "iops",
    timeoutMs: GUEST_RAND_SECS * 1000 + 60_000,
  },
  {
    metric: "in-guest seqwrite 1M",
    unit: "MB/s",
    cmd: `vmshift-io seqwrite /dev/vda ${GUEST_SEQ_MIB} ${GUEST_SEQ_BS}`,
    field: "mbps",
    timeoutMs: 60_000 + GUEST_SEQ_MIB * 100,
  },
  {
    metric: "in-guest seqread 1M",
    unit: "MB/s",
    cmd: `vmshift-io seqread /dev/vda ${GUEST_SEQ_MIB} ${GUEST_SEQ_BS}`,
    field: "mbps",
    timeoutMs: 60_000 + GUEST_SEQ_MIB * 100,
  },
];

/** BLK_BENCH_ONLY for the in-guest operations. */
function wanted(op: GuestOp): boolean {
  if (ONLY === "seq") return op.metric.includes("seq");
  if (ONLY === "rand") return op.metric.includes("rand");
  return true;
}

/** Runs one vmshift-io command in `vm` and returns its figure; throws with the output on any failure. */
async function guestFigure(vm: Vm, op: GuestOp): Promise<number> {
  const r = await vm.guest.run(`${op.cmd} 2>&1`, { timeoutMs: op.timeoutMs });
  const rec = parseRigRecords(r.output, "RIG-IO")[0];
  const v = Number(rec?.fields[op.field]);
  if (r.rc !== 0 || !rec || !Number.isFinite(v) || v <= 0) {
    throw new Error(`${vm.name}: '${op.cmd}' failed (rc=${r.rc}):\n${r.output.join("\n")}`);
  }
  return v;
}

function skipGuest(reason: string): Figure[] {
  const bar = "!".repeat(78);
  process.stderr.write(`${bar}\n!! bench blk: SKIPPING the in-guest view: ${reason}\n${bar}\n`);
  return [];
}

/**
 * View 2: one guest per back-end (booted together, then measured in turn so only one guest is busy
 * at a time); per round every operation runs on both, the first guest alternating between rounds.
 */
async function guestView(): Promise<Figure[]> {
  const probe = await probeInterop();
  if (!probe.ok) return skipGuest(probe.reason);
  const t0 = Date.now();
  const rig = await Rig.create("bench-blk");
  const backends: BlkBackend[] = [];
  try {
    const ourImage = rig.path("vmshift.img");
    const qsdImage = rig.path("qsd.img");
    const packedImage = rig.path("vmshift-packed.img");
    fillImage(ourImage, GUEST_IMAGE);
    fillImage(qsdImage, GUEST_IMAGE);
    fillImage(packedImage, GUEST_IMAGE);
    const ours = await startBlk(rig, {
      name: "vmshift",
      image: ourImage,
      env: { VMSHIFT_BLK_TRACE: "0" },
      lifetimeMs: GUEST_LIFETIME_MS,
      direct: DIRECT,
      ...(OUR_IO ? { io: OUR_IO } : {}),
    });
    backends.push(ours);
    const oursPacked = await startBlk(rig, {
      name: "vmshift-packed",
      image: packedImage,
      env: { VMSHIFT_BLK_TRACE: "0" },
      lifetimeMs: GUEST_LIFETIME_MS,
      direct: DIRECT,
      ...(OUR_IO ? { io: OUR_IO } : {}),
    });
    backends.push(oursPacked);
    // BLK_BENCH_VARIANT_ENV="K=V ...": a fourth guest on our back-end with that environment,
    // reported against our plain one in the same rounds (an A/B of a knob in one run).
    const variantEnv = Object.fromEntries(
      (process.env.BLK_BENCH_VARIANT_ENV ?? "")
        .split(" ")
        .filter(Boolean)
        .map((kv) => [kv.slice(0, kv.indexOf("=")), kv.slice(kv.indexOf("=") + 1)]),
    );
    const variantImage = rig.path("vmshift-variant.img");
    if (Object.keys(variantEnv).length) fillImage(variantImage, GUEST_IMAGE);
    const variant = Object.keys(variantEnv).length
      ? await startBlk(rig, {
          name: "vmshift-variant",
          image: variantImage,
          env: { VMSHIFT_BLK_TRACE: "0", ...variantEnv },
          lifetimeMs: GUEST_LIFETIME_MS,
          direct: DIRECT,
          ...(OUR_IO ? { io: OUR_IO } : {}),
        })
      : null;
    if (variant) backends.push(variant);
    const ref = await rig.startQsd({
      name: "qsd",
      image: qsdImage,
      lifetimeMs: GUEST_LIFETIME_MS,
      ...(DIRECT ? { fileOptions: "cache.direct=on" } : {}),
    });
    const vms = await Promise.all([
      rig.startVm({ name: "vm-vmshift", vhostUserBlk: [{ socket: ours.socket }], lifetimeMs: GUEST_LIFETIME_MS }),
      rig.startVm({ name: "vm-qsd", vhostUserBlk: [{ socket: ref.socket }], lifetimeMs: GUEST_LIFETIME_MS }),
      rig.startVm({
        name: "vm-vmshift-packed",
        vhostUserBlk: [{ socket: oursPacked.socket, packed: true }],
        lifetimeMs: GUEST_LIFETIME_MS,
      }),
      ...(variant
        ? [
            rig.startVm({
              name: "vm-vmshift-variant",
              vhostUserBlk: [{ socket: variant.socket }],
              lifetimeMs: GUEST_LIFETIME_MS,
            }),
          ]
        : []),
    ]);
    await Promise.all(vms.map((vm) => vm.guest.ready()));
    const tool = await vms[0]!.guest.run("command -v vmshift-io");
    if (tool.rc !== 0) {
      return skipGuest(
        "the guest has no /bin/vmshift-io (scripts/build-guest.sh builds it with gcc -static: install gcc + libc6-dev)",
      );
    }
    process.stderr.write(`bench blk: in-guest: two guests up in ${((Date.now() - t0) / 1000).toFixed(1)} s\n`);
    // Warm-up (not counted): the first requests of a back-end pay for JIT / first touch.
    for (const vm of vms) {
      await vm.guest.runOk(
        `vmshift-io randread /dev/vda 1 && vmshift-io seqwrite /dev/vda 16 ${GUEST_SEQ_BS} && ` +
          `vmshift-io seqread /dev/vda 16 ${GUEST_SEQ_BS}`,
        { timeoutMs: 60_000 },
      );
    }
    // The same write path on every guest: QSD's config space says write-through (wce 0), so its
    // guest never sends FLUSH, while ours say writeback and vmshift-io's final fdatasync becomes a
    // FLUSH (our fdatasync of everything written). The block layer's own switch (not the device's
    // cache_type) stops the guest's flushes without telling the device: no row measures a flush.
    for (const vm of vms) await vm.guest.runOk("echo 'write through' > /sys/block/vda/queue/write_cache");
    const packedFeatures = (await vms[2]!.guest.runOk("cat /sys/block/vda/device/features")).output.join("");
    if (!/^[01]{34}1/m.test(packedFeatures))
      throw new Error(`the packed guest did not negotiate packed rings: ${packedFeatures}`);
    // What each guest's block layer makes of the device (the requests it sends depend on them).
    const limits = "max_segments max_segment_size max_sectors_kb max_hw_sectors_kb nr_requests";
    for (const vm of vms) {
      const q = await vm.guest.runOk(`cd /sys/block/vda/queue && for f in ${limits}; do echo $f=$(cat $f); done`);
      process.stderr.write(`bench blk: ${vm.name}: ${q.output.join(" ")}\n`);
    }
    const stat = async () =>
      Promise.all(vms.map(async (vm) => (await vm.guest.runOk("cat /sys/block/vda/stat")).output.join(" ").trim()));
    const statBefore = await stat();
    const results = GUEST_OPS.map(() => vms.map((): number[] => []));
    for (let r = 0; r < RUNS; r++) {
      // Each round starts with the next guest: every back-end has its turn at every position.
      const order = vms.map((_, i) => (i + r) % vms.length);
      for (const [o, op] of GUEST_OPS.entries()) {
        if (!wanted(op)) continue;
        for (const v of order) results[o]![v]!.push(await guestFigure(vms[v]!, op));
      }
    }
    // The guests' own counters over the measured rounds: requests and sectors, read and written
    // (/sys/block/vda/stat fields 1, 3, 5, 7): the mean request size each back-end was sent.
    const statAfter = await stat();
    for (const [i, vm] of vms.entries()) {
      const a = (statBefore[i] as string).split(/\s+/).map(Number);
      const b = (statAfter[i] as string).split(/\s+/).map(Number);
      const d = (k: number) => (b[k] as number) - (a[k] as number);
      const kib = (ios: number, sectors: number) => (ios > 0 ? ((sectors * 512) / ios / 1024).toFixed(0) : "-");
      process.stderr.write(
        `bench blk: ${vm.name}: ${d(0)} reads of ${kib(d(0), d(2))} KiB, ${d(4)} writes of ${kib(d(4), d(6))} KiB on average\n`,
      );
    }
    const figures: Figure[] = [];
    for (const [o, op] of GUEST_OPS.entries()) {
      if (!wanted(op)) continue;
      const [a, b, p, v] = results[o] as [number[], number[], number[], number[] | undefined];
      figures.push(figure("blk", op.metric, op.unit, "higher", median(a), "qemu-storage-daemon", median(b)));
      figures.push(figure("blk", `${op.metric} packed`, op.unit, "higher", median(p), "vmshift split", median(a)));
      if (v?.length) {
        figures.push(figure("blk", `${op.metric} variant`, op.unit, "higher", median(v), "vmshift", median(a)));
        process.stderr.write(`bench blk: ${op.metric}: variant ${v.map((x) => x.toFixed(1)).join("/")} ${op.unit}\n`);
      }
      const fmt = (xs: number[]) => xs.map((x) => (op.unit === "IOPS" ? Math.round(x) : x.toFixed(1))).join("/");
      process.stderr.write(
        `bench blk: ${op.metric}: vmshift ${fmt(a)} qsd ${fmt(b)} vmshift packed ${fmt(p)} ${op.unit}` +
          ` (per-round ratio ${roundRatios(a, b)})\n`,
      );
    }
    for (const vm of vms) {
      const bad = vm.console.grep(/I\/O error|blk_update_request|BUG:|Oops/);
      if (bad.length) throw new Error(`${vm.name}: guest kernel complained:\n${bad.join("\n")}`);
    }
    process.stderr.write(`bench blk: in-guest view took ${((Date.now() - t0) / 1000).toFixed(1)} s\n`);
    return figures;
  } finally {
    await rig.close();
    await Promise.all(backends.map((b) => b.close()));
  }
}

/** BLK_BENCH_VIEW or --view=: "backend", "guest", or both (default). */
function views(): Set<string> {
  const arg = process.argv.find((a) => a.startsWith("--view="))?.slice("--view=".length);
  const v = arg ?? process.env.BLK_BENCH_VIEW ?? "all";
  if (v === "all") return new Set(["backend", "guest"]);
  if (v !== "backend" && v !== "guest") throw new Error(`bench blk: unknown view '${v}' (backend, guest, all)`);
  return new Set([v]);
}

export async function run(): Promise<Figure[]> {
  const which = spawnSync("sh", ["-c", "command -v qemu-storage-daemon"], { encoding: "utf8" });
  const qsd = process.env.VMSHIFT_QSD ?? which.stdout.trim();
  if (!qsd) {
    process.stderr.write("bench blk: qemu-storage-daemon not found; nothing to compare against\n");
    return [];
  }
  const want = views();
  const figures: Figure[] = [];
  if (want.has("backend")) figures.push(...(await backendView(qsd)));
  if (want.has("guest")) {
    try {
      figures.push(...(await guestView()));
    } catch (e) {
      // Keep the other view's figures, but fail the run.
      process.stderr.write(`bench blk: the in-guest view FAILED: ${(e as Error).stack ?? String(e)}\n`);
      process.exitCode = 1;
    }
  }
  return figures;
}
