/**
 * `vhost`: a request's round trip through a vring, and a control message's round trip, with the
 * same vmshift front-end (VhostUserFrontend + SplitQueueDriver, in this process) driving two
 * back-ends in the same run:
 *  - ours: VhostUserDaemon serving the `null` example device, in a child process (so it does not
 *    share an event loop with the driver), its queue in a worker thread as always;
 *  - the reference: qemu-storage-daemon's vhost-user-blk export of a null-co block node.
 * Each request is a virtio-blk IN of 512 bytes (header, data, status): qsd runs it through its
 * block layer (null-co does no I/O); our null device completes any chain with length 0.
 * Figures: requests/s at queue depth 1 and 32, QD1 latency (median, p99), GET_FEATURES round
 * trip (median, p99), and the back-end's CPU time per request at QD32 (all its threads, from
 * /proc: it moves less with the host's load than the others). Medians over RUNS runs, the
 * back-ends alternating so drift hits both.
 * Skips (with a line on stderr) when qemu-storage-daemon is missing.
 */
import { type ChildProcess, spawn, spawnSync } from "node:child_process";
import { existsSync, mkdtempSync, readdirSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { nullDevice } from "../src/devices/examples/echo.js";
import { GuestMemory } from "../src/memory/guest-memory.js";
import { GuestMemoryRegion } from "../src/memory/region.js";
import { VhostUserDaemon } from "../src/vhost-user/backend/daemon.js";
import { VhostUserFrontend } from "../src/vhost-user/frontend/frontend.js";
import { featureMask, VirtioFeature } from "../src/vhost-user/protocol/constants.js";
import { SplitQueueDriver } from "../src/virtio/driver.js";
import { type Figure, figure, median } from "./report.js";

const RUNS = 5;
const LOAD_MS = 700;
const CONTROL_ROUND_TRIPS = 1000;
const QUEUE_SIZE = 128;
const MiB = 1 << 20;
const VERSION_1 = featureMask(VirtioFeature.VIRTIO_F_VERSION_1);
/** What a guest kernel's driver takes when offered (both back-ends offer it). */
const EVENT_IDX = featureMask(VirtioFeature.VIRTIO_RING_F_EVENT_IDX);
const REF = "qemu-storage-daemon null-co (vhost-user-blk)";
/** Scratch layout in guest memory: a header, a data buffer and a status byte per slot. */
const HEADERS = 0x10000;
const DATA = 0x100000;
const STATUS = 0x20000;
const DATA_LEN = 512;

// ---------------------------------------------------------------- the child: our daemon

if (process.argv[2] === "--serve-null" && process.argv[1] === fileURLToPath(import.meta.url)) {
  const path = process.argv[3] as string;
  const daemon = VhostUserDaemon.listen(nullDevice({ maxQueueSize: 1024 }), path);
  process.stdout.write("ready\n");
  process.on("SIGTERM", () => {
    void daemon.close().then(() => process.exit(0));
  });
  await daemon.serve();
}

// ---------------------------------------------------------------- the driver side

interface Session {
  /** The back-end's process (its CPU time is read from /proc). */
  pid: number;
  fe: VhostUserFrontend;
  memory: GuestMemory;
  queue: SplitQueueDriver;
  close(): void;
}

async function openSession(socket: string, pid: number): Promise<Session> {
  const memory = new GuestMemory([GuestMemoryRegion.memfd(0, 4 * MiB)]);
  const fe = VhostUserFrontend.connect(socket, { timeoutMs: 5000 });
  const close = () => {
    fe.close();
    memory.close();
  };
  try {
    const layout = SplitQueueDriver.at(memory, 0x1000, QUEUE_SIZE).layout;
    const { acked } = await fe.start({ memory, features: VERSION_1, optionalFeatures: EVENT_IDX, rings: [layout] });
    const queue = SplitQueueDriver.at(memory, 0x1000, QUEUE_SIZE, { features: acked });
    for (let slot = 0; slot < QUEUE_SIZE; slot++) {
      memory.writeU32(HEADERS + 16 * slot, 0); // VIRTIO_BLK_T_IN
      memory.writeU32(HEADERS + 16 * slot + 4, 0);
      memory.writeU64(HEADERS + 16 * slot + 8, BigInt(slot)); // sector
    }
    return { pid, fe, memory, queue, close };
  } catch (e) {
    close();
    throw e;
  }
}

interface Load {
  /** Requests completed. */
  done: number;
  rps: number;
  latencies: number[];
  /** How often the driver slept on the call eventfd, and kicked, per 1000 requests. */
  sleepsPerK: number;
  kicksPerK: number;
}

/**
 * How long the driver polls for completions before it sleeps on the call eventfd: 0 is an
 * interrupt-driven driver (a guest kernel's), 30 µs a polling one (a DPDK/SPDK-style or
 * busy-polling driver). Both back-ends are measured in both regimes.
 */
const POLL_MS = 0.03;

/** Keeps `depth` requests in flight for LOAD_MS; per-request latency from add() to getUsed(). */
async function load(s: Session, depth: number, pollMs = 0): Promise<Load> {
  const q = s.queue;
  const free = Array.from({ length: depth }, (_, i) => i);
  const slotOf = new Int32Array(QUEUE_SIZE);
  const started = new Float64Array(QUEUE_SIZE);
  const latencies: number[] = [];
  let inFlight = 0;
  let done = 0;
  let sleeps = 0;
  let kicks = 0;
  const submit = () => {
    const slot = free.pop() as number;
    const head = q.add(
      [{ addr: HEADERS + 16 * slot, len: 16 }],
      [
        { addr: DATA + DATA_LEN * slot, len: DATA_LEN },
        { addr: STATUS + slot, len: 1 },
      ],
    );
    slotOf[head] = slot;
    started[head] = performance.now();
    inFlight++;
  };
  q.disableInterrupts();
  const t0 = performance.now();
  const end = t0 + LOAD_MS;
  while (free.length > 0) submit();
  if (q.publish()) s.fe.kick(0);
  let stopping = false;
  for (;;) {
    const since = s.fe.vring(0).calls;
    let got = 0;
    for (let u = q.getUsed(); u; u = q.getUsed()) {
      latencies.push(performance.now() - (started[u.head] as number));
      free.push(slotOf[u.head] as number);
      inFlight--;
      done++;
      got++;
    }
    if (!stopping && performance.now() >= end) stopping = true;
    if (stopping && inFlight === 0) break;
    if (got > 0 && !stopping) {
      while (free.length > 0) submit();
      if (q.publish()) {
        s.fe.kick(0);
        kicks++;
      }
      continue;
    }
    // Like a polling driver (and like both back-ends' own event loops), look for completions
    // for a few microseconds before paying for a sleep and a wake-up.
    if (pollMs > 0) {
      const until = performance.now() + pollMs;
      while (!q.hasUsed() && performance.now() < until);
      if (q.hasUsed()) continue;
    }
    // Sleep with interrupts on; awake, turn them off while collecting and submitting, as a
    // guest kernel's driver does (virtqueue_disable_cb in its interrupt handler).
    if (q.enableInterrupts()) {
      q.disableInterrupts();
      continue;
    }
    sleeps++;
    await s.fe.waitCall(0, { since, timeoutMs: 5000 });
    q.disableInterrupts();
  }
  const elapsed = performance.now() - t0;
  const perK = (n: number) => (1000 * n) / Math.max(1, done);
  return { done, rps: done / (elapsed / 1000), latencies, sleepsPerK: perK(sleeps), kicksPerK: perK(kicks) };
}

/**
 * CPU time a process has used so far, all its threads, in ns (/proc/PID/task/TID/schedstat; a
 * thread that exits meanwhile is left out): what a back-end spends per request, wake-ups,
 * polling and helper threads included. It moves less with the host's load than requests/s.
 */
function cpuNs(pid: number): number {
  let total = 0;
  let tids: string[] = [];
  try {
    tids = readdirSync(`/proc/${pid}/task`);
  } catch {
    return Number.NaN;
  }
  for (const tid of tids) {
    try {
      total += Number(readFileSync(`/proc/${pid}/task/${tid}/schedstat`, "utf8").split(" ")[0]);
    } catch {
      // the thread is gone
    }
  }
  return total;
}

async function controlRoundTrips(s: Session): Promise<number[]> {
  const out: number[] = [];
  for (let i = 0; i < CONTROL_ROUND_TRIPS; i++) {
    const t = performance.now();
    await s.fe.getFeatures();
    out.push(performance.now() - t);
  }
  return out;
}

function percentile(xs: readonly number[], p: number): number {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.min(s.length - 1, Math.floor((p / 100) * s.length))] as number;
}

// ---------------------------------------------------------------- the two back-ends

function startOurs(socket: string): Promise<ChildProcess> {
  const child = spawn(process.execPath, [fileURLToPath(import.meta.url), "--serve-null", socket], {
    stdio: ["ignore", "pipe", "inherit"],
  });
  return new Promise((resolve, reject) => {
    child.once("error", reject);
    child.once("exit", (code) => reject(new Error(`our daemon exited early (${code})`)));
    child.stdout?.once("data", () => resolve(child));
  });
}

async function startQsd(bin: string, socket: string): Promise<ChildProcess> {
  const child = spawn(
    bin,
    [
      "--blockdev",
      "driver=null-co,node-name=n0,size=1073741824",
      "--export",
      `type=vhost-user-blk,id=e0,node-name=n0,addr.type=unix,addr.path=${socket},writable=on`,
    ],
    { stdio: ["ignore", "ignore", "inherit"] },
  );
  for (let i = 0; i < 500 && !existsSync(socket); i++) {
    if (child.exitCode !== null) throw new Error(`qemu-storage-daemon exited (${child.exitCode})`);
    await new Promise((r) => setTimeout(r, 10));
  }
  if (!existsSync(socket)) throw new Error("qemu-storage-daemon did not create its socket");
  return child;
}

function stop(child: ChildProcess): Promise<void> {
  if (child.exitCode !== null || child.signalCode !== null) return Promise.resolve();
  return new Promise((resolve) => {
    child.removeAllListeners("exit");
    child.once("exit", () => resolve());
    child.kill("SIGTERM");
  });
}

function findQsd(): string | null {
  const bin = process.env.VMSHIFT_QSD || "qemu-storage-daemon";
  const r = spawnSync(bin, ["--version"], { stdio: "ignore" });
  return r.status === 0 ? bin : null;
}

interface Samples {
  qd1: number[];
  qd32: number[];
  pollQd1: number[];
  pollQd32: number[];
  pollP50: number[];
  p50: number[];
  p99: number[];
  ctl50: number[];
  ctl99: number[];
  cpu32: number[];
}

async function measure(s: Session, into: Samples): Promise<void> {
  const one = await load(s, 1);
  const cpu0 = cpuNs(s.pid);
  const many = await load(s, 32);
  const cpu = (cpuNs(s.pid) - cpu0) / many.done;
  // Let both sides settle after the load (its wake-ups and collections): measured straight
  // after it, either back-end's round trip doubles.
  await new Promise((r) => setTimeout(r, 200));
  const ctl = await controlRoundTrips(s);
  into.qd1.push(one.rps);
  into.qd32.push(many.rps);
  into.cpu32.push(cpu / 1000);
  if (process.env.VMSHIFT_BENCH_DEBUG)
    process.stderr.write(
      `qd32: ${many.rps.toFixed(0)} req/s, sleeps/k ${many.sleepsPerK.toFixed(1)}, kicks/k ${many.kicksPerK.toFixed(1)}\n`,
    );
  const pollOne = await load(s, 1, POLL_MS);
  into.pollQd1.push(pollOne.rps);
  into.pollQd32.push((await load(s, 32, POLL_MS)).rps);
  into.pollP50.push(percentile(pollOne.latencies, 50) * 1000);
  into.p50.push(percentile(one.latencies, 50) * 1000);
  into.p99.push(percentile(one.latencies, 99) * 1000);
  into.ctl50.push(percentile(ctl, 50) * 1000);
  into.ctl99.push(percentile(ctl, 99) * 1000);
}

export async function run(): Promise<Figure[]> {
  const qsdBin = findQsd();
  if (!qsdBin) {
    process.stderr.write("!! vhost bench SKIPPED: qemu-storage-daemon not found (set VMSHIFT_QSD or install it)\n");
    return [];
  }
  const dir = mkdtempSync(join(tmpdir(), "vmshift-bench-vhost-"));
  const children: ChildProcess[] = [];
  const sessions: Session[] = [];
  try {
    const oursSock = join(dir, "ours.sock");
    const qsdSock = join(dir, "qsd.sock");
    const oursChild = await startOurs(oursSock);
    children.push(oursChild);
    const qsdChild = await startQsd(qsdBin, qsdSock);
    children.push(qsdChild);
    const ours = await openSession(oursSock, oursChild.pid as number);
    sessions.push(ours);
    const qsd = await openSession(qsdSock, qsdChild.pid as number);
    sessions.push(qsd);
    const empty = (): Samples => ({
      qd1: [],
      qd32: [],
      pollQd1: [],
      pollQd32: [],
      pollP50: [],
      p50: [],
      p99: [],
      ctl50: [],
      ctl99: [],
      cpu32: [],
    });
    const a = empty();
    const b = empty();
    // Warm-up (JIT, worker start, qsd coroutine pools), not counted.
    await load(ours, 32);
    await load(qsd, 32);
    for (let i = 0; i < RUNS; i++) {
      if (i % 2 === 0) {
        await measure(ours, a);
        await measure(qsd, b);
      } else {
        await measure(qsd, b);
        await measure(ours, a);
      }
    }
    const f = (metric: string, unit: string, better: "lower" | "higher", k: keyof Samples) =>
      figure("vhost", metric, unit, better, median(a[k]), REF, median(b[k]));
    return [
      f("requests/s, queue depth 1", "req/s", "higher", "qd1"),
      f("requests/s, queue depth 32", "req/s", "higher", "qd32"),
      f("request latency QD1, median", "us", "lower", "p50"),
      f("request latency QD1, p99", "us", "lower", "p99"),
      f("requests/s, queue depth 1, polling driver", "req/s", "higher", "pollQd1"),
      f("requests/s, queue depth 32, polling driver", "req/s", "higher", "pollQd32"),
      f("request latency QD1, median, polling driver", "us", "lower", "pollP50"),
      f("GET_FEATURES round trip, median", "us", "lower", "ctl50"),
      f("GET_FEATURES round trip, p99", "us", "lower", "ctl99"),
      f("back-end CPU time per request, queue depth 32", "us", "lower", "cpu32"),
    ];
  } finally {
    for (const s of sessions) s.close();
    await Promise.all(children.map(stop));
    rmSync(dir, { recursive: true, force: true });
  }
}
