/**
 * `npm run bench -- blk`: back-end efficiency of `vmshift blk` against qemu-storage-daemon on the
 * same raw image in the same run. A front-end in Node (VhostUserFrontend + SplitQueueDriver, no
 * guest) drives each back-end — both run as child processes — with 4 KiB random reads and
 * writes at queue depth 1 and 32 (32 per queue), on one and two queues, for a fixed time per run;
 * the figure is the median IOPS of several runs, and ratio = our IOPS / QSD's.
 * The image is on the host page cache (no O_DIRECT on either side): this measures the back-ends'
 * per-request cost, not the disk. Needs qemu-storage-daemon (skips the comparison without it).
 */
import { type ChildProcess, spawn, spawnSync } from "node:child_process";
import { mkdtempSync, rmSync, statSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { setTimeout as sleep } from "node:timers/promises";
import { fileURLToPath } from "node:url";
import { GuestMemory } from "../src/memory/guest-memory.js";
import { GuestMemoryRegion } from "../src/memory/region.js";
import { FRONTEND_PROTOCOL_FEATURES, VhostUserFrontend } from "../src/vhost-user/frontend/frontend.js";
import { featureMask, ProtocolFeature, VirtioFeature } from "../src/vhost-user/protocol/constants.js";
import { SplitQueueDriver } from "../src/virtio/driver.js";
import { splitQueueLayout } from "../src/virtio/ring.js";
import { type Figure, figure, median } from "./report.js";

const MiB = 1 << 20;
const IMAGE = 256 * MiB;
const QUEUE_SIZE = 128;
const RUNS = Number(process.env.BLK_BENCH_RUNS ?? 3);
const RUN_MS = Number(process.env.BLK_BENCH_MS ?? 1000);
const VERSION_1 = featureMask(VirtioFeature.VIRTIO_F_VERSION_1);
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
  const proc = spawn(process.execPath, [main, "--socket-path", socket, "--image", image, "--queues", String(queues)], {
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
      `driver=file,node-name=file0,filename=${image},locking=off`,
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
    readonly driver: SplitQueueDriver,
    readonly mem: GuestMemory,
    readonly scratch: number,
    readonly depth: number,
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
  submit(type: number, sector: number): void {
    const s = this.#free.pop() as number;
    const h = this.#hdr(s);
    this.mem.writeU32(h, type);
    this.mem.writeU32(h + 4, 0);
    this.mem.writeU32(h + 8, sector);
    this.mem.writeU32(h + 12, 0);
    const data = [{ addr: this.#buf(s), len: 4096 }];
    const st = [{ addr: this.#status(s), len: 1 }];
    const head =
      type === T_OUT
        ? this.driver.add([{ addr: h, len: 16 }, ...data], st)
        : this.driver.add([{ addr: h, len: 16 }], [...data, ...st]);
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
  /** Keeps `depth` requests in flight until `until` (ms). */
  async run(until: number, write: boolean, sectors: number): Promise<void> {
    let x = (this.index + 1) * 2654435761;
    while (Date.now() < until) {
      while (this.free > 0) {
        x = (x * 1103515245 + 12345) >>> 0;
        this.submit(write ? T_OUT : T_IN, (x % (sectors / 8)) * 8);
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

/** IOPS of one timed run against `socket`. */
async function measure(socket: string, queues: number, depth: number, write: boolean): Promise<number> {
  const mem = new GuestMemory([GuestMemoryRegion.memfd(0, 8 * MiB)]);
  const fe = VhostUserFrontend.connect(socket, {
    timeoutMs: 5000,
    protocolFeatures: FRONTEND_PROTOCOL_FEATURES | featureMask(ProtocolFeature.MQ),
  });
  try {
    await fe.negotiate();
    await fe.setOwner();
    const offered = fe.backendFeatures ?? 0n;
    await fe.setFeatures(VERSION_1 | (offered & featureMask(29))); // + EVENT_IDX when offered
    await fe.setMemTable(mem);
    const qs: BlkQueue[] = [];
    for (let q = 0; q < queues; q++) {
      const base = 0x10000 + q * 0x100000;
      const layout = splitQueueLayout(base, QUEUE_SIZE);
      const driver = new SplitQueueDriver(mem, { ...layout, features: VERSION_1 | (offered & featureMask(29)) });
      await fe.startVring(q, layout);
      qs.push(new BlkQueue(fe, q, driver, mem, base + 0x10000, depth));
    }
    const sectors = IMAGE / 512;
    // Warm-up, then the timed run.
    await Promise.all(qs.map((q) => q.run(Date.now() + 100, write, sectors)));
    for (const q of qs) q.completed = 0;
    const t0 = performance.now();
    await Promise.all(qs.map((q) => q.run(Date.now() + RUN_MS, write, sectors)));
    const secs = (performance.now() - t0) / 1000;
    const errors = qs.reduce((a, q) => a + q.errors, 0);
    if (errors) throw new Error(`${errors} requests failed`);
    return qs.reduce((a, q) => a + q.completed, 0) / secs;
  } finally {
    fe.close();
    mem.close();
  }
}

export async function run(): Promise<Figure[]> {
  const which = spawnSync("sh", ["-c", "command -v qemu-storage-daemon"], { encoding: "utf8" });
  const qsd = process.env.VMSHIFT_QSD ?? which.stdout.trim();
  if (!qsd) {
    process.stderr.write("bench blk: qemu-storage-daemon not found; nothing to compare against\n");
    return [];
  }
  const dir = mkdtempSync(join(tmpdir(), "vmshift-bench-blk-"));
  const image = join(dir, "disk.img");
  // Allocated and in the page cache: reads hit real data, writes overwrite.
  const chunk = Buffer.alloc(MiB, 0xa5);
  writeFileSync(image, Buffer.alloc(0));
  for (let i = 0; i < IMAGE / MiB; i++) writeFileSync(image, chunk, { flag: "a" });
  const figures: Figure[] = [];
  try {
    for (const queues of [1, 2]) {
      const ours = await startOurs(dir, image, queues);
      const ref = await startQsd(qsd, dir, image, queues);
      try {
        for (const depth of [1, 32]) {
          for (const write of [false, true]) {
            const a: number[] = [];
            const b: number[] = [];
            for (let r = 0; r < RUNS; r++) {
              a.push(await measure(ours.socket, queues, depth, write));
              b.push(await measure(ref.socket, queues, depth, write));
            }
            const metric = `4k rand${write ? "write" : "read"} qd${depth} ${queues}q`;
            figures.push(figure("blk", metric, "IOPS", "higher", median(a), "qemu-storage-daemon", median(b)));
            process.stderr.write(
              `bench blk: ${metric}: vmshift ${a.map(Math.round).join("/")} qsd ${b.map(Math.round).join("/")}\n`,
            );
          }
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
