/**
 * The QEMU interop rig: real QEMU (the vhost-user front-end) with a tiny busybox guest, driven over QMP
 * and the serial console, against any vhost-user-blk back-end listening on a unix socket
 * (qemu-storage-daemon as the reference, ours later). See docs/interop-rig.md.
 *
 *   const probe = await probeInterop();            // skip the tests loudly unless probe.ok
 *   await using rig = await Rig.create("name");    // or: t.after(() => rig.close())
 *   const img = await rig.createRawImage("disk.img", 64 << 20);
 *   const qsd = await rig.startQsd({ name: "qsd", image: img });
 *   const vm = await rig.startVm({ name: "vm", vhostUserBlk: [{ socket: qsd.socket }] });
 *   await vm.guest.ready();
 *   const sha = await vm.guest.write("/dev/vda", 1, 4);
 *
 * Every process is bounded in time (process.ts) and killed by rig.close() or when the test process dies;
 * every wait has a timeout and reports the console tail / stderr when it fails.
 */
import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { createHash } from "node:crypto";
import { existsSync, rmSync } from "node:fs";
import { mkdtemp, open, readdir, rm, stat, truncate, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { after, afterEach, before } from "node:test";
import { setTimeout as sleep } from "node:timers/promises";
import { fileURLToPath } from "node:url";
import { promisify } from "node:util";
import { GuestAgent, SerialConsole } from "./console.js";
import { liveProcesses, ManagedProcess } from "./process.js";
import { QmpClient } from "./qmp.js";

export {
  ConsoleTimeoutError,
  GuestAgent,
  GuestCommandError,
  type GuestResult,
  parseRigRecords,
  type RigRecord,
  SerialConsole,
} from "./console.js";
export { type ExitInfo, liveProcesses, ManagedProcess } from "./process.js";
export { QmpClient, QmpError, type QmpEvent, QmpTimeoutError } from "./qmp.js";

const execFileP = promisify(execFile);

// ---------------------------------------------------------------- tools and guest

export interface Tools {
  qemu: string;
  qemuVersion: string;
  /** qemu-storage-daemon, or null when missing (tests that need it skip). */
  qsd: string | null;
  accel: string;
}

export interface GuestImage {
  kernel: string;
  initrd: string;
  kver: string;
}

export type Probe = { ok: true; tools: Tools; guest: GuestImage } | { ok: false; reason: string };

/** The repository root: the nearest ancestor with scripts/build-guest.sh (works from test/ and dist/test/). */
export function repoRoot(): string {
  let d = dirname(fileURLToPath(import.meta.url));
  for (let i = 0; i < 6; i++) {
    if (existsSync(join(d, "scripts", "build-guest.sh"))) return d;
    d = dirname(d);
  }
  throw new Error("rig: cannot find the repository root (scripts/build-guest.sh)");
}

async function which(cmd: string): Promise<string | null> {
  if (cmd.includes("/")) return existsSync(cmd) ? cmd : null;
  for (const dir of (process.env.PATH ?? "/usr/bin:/bin").split(":")) {
    const p = join(dir || ".", cmd);
    if (existsSync(p)) return p;
  }
  return null;
}

/** The accelerator: $VMSHIFT_ACCEL or "tcg" (KVM on this kind of machine is kvm-pvm, unusable for QEMU). */
export function defaultAccel(): string {
  return process.env.VMSHIFT_ACCEL || "tcg";
}

/** Finds QEMU and qemu-storage-daemon ($VMSHIFT_QEMU / $VMSHIFT_QSD override PATH) and checks the accelerator. */
export async function findTools(accel = defaultAccel()): Promise<Tools> {
  const qemu = await which(process.env.VMSHIFT_QEMU || "qemu-system-x86_64");
  if (!qemu) throw new Error("qemu-system-x86_64 not found (run: sh scripts/install-debian.sh as root)");
  const { stdout: v } = await execFileP(qemu, ["--version"], { timeout: 10_000 });
  const qemuVersion = /version (\S+)/.exec(v)?.[1] ?? v.split("\n")[0] ?? "?";
  const accelName = accel.split(",")[0]!;
  const { stdout: accels } = await execFileP(qemu, ["-accel", "help"], { timeout: 10_000 });
  if (!accels.split("\n").some((l) => l.trim() === accelName)) {
    throw new Error(
      `QEMU ${qemuVersion} at ${qemu} has no '${accelName}' accelerator (has: ${accels.replace(/\s+/g, " ")})`,
    );
  }
  if (accelName === "kvm") {
    try {
      const fh = await open("/dev/kvm", "r+");
      await fh.close();
    } catch (e) {
      throw new Error(`accel=kvm but /dev/kvm is not usable: ${(e as Error).message}`);
    }
  }
  const qsd = await which(process.env.VMSHIFT_QSD || "qemu-storage-daemon");
  return { qemu, qemuVersion, qsd, accel };
}

let guestPromise: Promise<GuestImage> | undefined;

/**
 * Kernel + initramfs, built by scripts/build-guest.sh on first use (cached under $VMSHIFT_CACHE or
 * .tmp/cache; a cached build returns in milliseconds). $VMSHIFT_GUEST_KERNEL / $VMSHIFT_GUEST_INITRD override.
 */
export function ensureGuest(): Promise<GuestImage> {
  guestPromise ??= (async () => {
    const k = process.env.VMSHIFT_GUEST_KERNEL;
    const i = process.env.VMSHIFT_GUEST_INITRD;
    if (k && i) return { kernel: k, initrd: i, kver: "custom" };
    const script = join(repoRoot(), "scripts", "build-guest.sh");
    let out: string;
    try {
      ({ stdout: out } = await execFileP("sh", [script], { timeout: 300_000, maxBuffer: 1 << 20 }));
    } catch (e) {
      const err = e as { stderr?: string; message: string };
      throw new Error(`scripts/build-guest.sh failed: ${err.message}\n${err.stderr ?? ""}`);
    }
    const get = (key: string) => new RegExp(`^${key}=(.*)$`, "m").exec(out)?.[1];
    const kernel = get("KERNEL");
    const initrd = get("INITRD");
    if (!kernel || !initrd) throw new Error(`scripts/build-guest.sh printed no KERNEL=/INITRD=:\n${out}`);
    return { kernel, initrd, kver: get("KVER") ?? "?" };
  })();
  guestPromise.catch(() => {
    guestPromise = undefined;
  });
  return guestPromise;
}

/**
 * Everything the interop tests need, or the reason they cannot run. Never throws: tests skip with
 * `reason` (and print it), or fail when $VMSHIFT_REQUIRE_INTEROP=1.
 */
export async function probeInterop(opts: { needQsd?: boolean } = {}): Promise<Probe> {
  try {
    const tools = await findTools();
    if (opts.needQsd !== false && !tools.qsd) {
      return { ok: false, reason: "qemu-storage-daemon not found (run: sh scripts/install-debian.sh as root)" };
    }
    const guest = await ensureGuest();
    return { ok: true, tools, guest };
  } catch (e) {
    return { ok: false, reason: (e as Error).message };
  }
}

// ---------------------------------------------------------------- the rig: a work dir and its processes

export interface QsdOptions {
  name: string;
  /** A raw image file. */
  image: string;
  /** Unix socket path of the vhost-user-blk export (default <dir>/<name>.sock). */
  socket?: string;
  /** Image locking; off by default so two daemons can serve one image during a migration. */
  locking?: boolean;
  writable?: boolean;
  numQueues?: number;
  /** Extra options for the file blockdev, e.g. "cache.direct=on,aio=native". */
  fileOptions?: string;
  lifetimeMs?: number;
}

export interface VhostUserBlkOptions {
  /** The back-end's socket (QEMU connects as the client). */
  socket: string;
  id?: string;
  numQueues?: number;
  queueSize?: number;
  /** packed=on: offer the guest packed virtqueues (VIRTIO_F_RING_PACKED). */
  packed?: boolean;
}

export interface VmOptions {
  name: string;
  memMiB?: number;
  /** maxmem (MiB): room for memory devices (virtio-mem) above the boot RAM. */
  maxMemMiB?: number;
  smp?: number;
  /** -accel value, default defaultAccel(). */
  accel?: string;
  vhostUserBlk?: VhostUserBlkOptions[];
  /** Start with `-incoming defer` (a migration destination). */
  incoming?: boolean;
  /** Extra kernel command-line arguments. */
  append?: string;
  /** A script the guest runs at boot before the agent starts (rig.run=). */
  bootScript?: string;
  /** Power off after bootScript. */
  poweroffAfterBoot?: boolean;
  /** QEMU trace event patterns (-trace), written to <name>.stderr.log. */
  trace?: string[];
  extraArgs?: string[];
  lifetimeMs?: number;
}

export class Qsd {
  constructor(
    readonly name: string,
    readonly socket: string,
    readonly proc: ManagedProcess,
  ) {}

  async close(): Promise<void> {
    await this.proc.stop();
  }
}

export class Vm {
  readonly guest: GuestAgent;

  constructor(
    readonly name: string,
    readonly proc: ManagedProcess,
    readonly qmp: QmpClient,
    readonly console: SerialConsole,
    readonly qmpSocket: string,
  ) {
    this.guest = new GuestAgent(console);
  }

  /** query-status's "status": running, paused, inmigrate, postmigrate, ... */
  async status(): Promise<string> {
    const r = await this.qmp.execute<{ status: string }>("query-status");
    return r.status;
  }

  async waitStatus(want: string, timeoutMs = 30_000): Promise<void> {
    const deadline = Date.now() + timeoutMs;
    let st = "";
    while (Date.now() < deadline) {
      st = await this.status();
      if (st === want) return;
      await sleep(100);
    }
    throw new Error(`${this.name}: status is '${st}', wanted '${want}' within ${timeoutMs} ms`);
  }

  /** Asks QEMU to quit, then SIGTERM/SIGKILL; always resolves once the process is gone. */
  async close(): Promise<void> {
    if (this.proc.running) {
      await this.qmp.execute("quit", undefined, { timeoutMs: 2000 }).catch(() => {});
      await Promise.race([this.proc.exited, sleep(2000)]);
    }
    this.qmp.close();
    await this.proc.stop();
    this.console.close();
  }
}

export interface RigOptions {
  /** Keep the work dir (logs, images) after close(); also $VMSHIFT_KEEP_RIG=1. */
  keep?: boolean;
}

/** Marks a work dir kept on purpose: sweepStaleDirs leaves it for a day (a failed CI run's evidence). */
const KEPT_MARKER = "KEPT";
const KEPT_FOR_MS = 24 * 3600 * 1000;

export class Rig {
  private readonly vms: Vm[] = [];
  private readonly qsds: Qsd[] = [];
  private closed = false;
  private counter = 0;

  private constructor(
    readonly dir: string,
    readonly tools: Tools,
    readonly guestImage: GuestImage,
    private keep: boolean,
  ) {}

  /**
   * Keeps the work dir after close() (logs, console output, images), marked so that later test
   * processes do not sweep it for a day: what a failed test leaves for whoever looks next.
   */
  keepForInspection(): void {
    this.keep = true;
    openDirs.delete(this.dir);
  }

  /**
   * A fresh work dir under the system temp dir (short paths: unix socket paths are limited to 107 bytes),
   * named vmshift-rig-<pid>-<name>-XXXXXX so dirs left by a test process that was SIGKILLed can be swept.
   */
  static async create(name: string, opts: RigOptions = {}): Promise<Rig> {
    const tools = await findTools();
    const guest = await ensureGuest();
    await sweepStaleDirs();
    const safe = name.replace(/[^a-z0-9-]/gi, "").slice(0, 20);
    const dir = await mkdtemp(join(tmpdir(), `vmshift-rig-${process.pid}-${safe}-`));
    const keep = opts.keep ?? process.env.VMSHIFT_KEEP_RIG === "1";
    if (!keep) {
      if (openDirs.size === 0) process.on("exit", removeOpenDirsSync);
      openDirs.add(dir);
    }
    return new Rig(dir, tools, guest, keep);
  }

  path(name: string): string {
    return join(this.dir, name);
  }

  /** A sparse raw image of `sizeBytes`. */
  async createRawImage(name: string, sizeBytes: number): Promise<string> {
    const p = this.path(name);
    await writeFile(p, "");
    await truncate(p, sizeBytes);
    return p;
  }

  /** qemu-storage-daemon exporting `image` (raw) as vhost-user-blk; resolves once its socket exists. */
  async startQsd(o: QsdOptions): Promise<Qsd> {
    if (!this.tools.qsd) throw new Error("qemu-storage-daemon not found");
    const socket = o.socket ?? this.path(`${o.name}.sock`);
    const fileOpts = [`driver=file`, `node-name=file0`, `filename=${o.image}`, `locking=${o.locking ? "on" : "off"}`];
    if (o.fileOptions) fileOpts.push(o.fileOptions);
    const exp = [
      "type=vhost-user-blk",
      "id=exp0",
      "node-name=disk0",
      "addr.type=unix",
      `addr.path=${socket}`,
      `writable=${o.writable === false ? "off" : "on"}`,
    ];
    if (o.numQueues) exp.push(`num-queues=${o.numQueues}`);
    const args = [
      "--blockdev",
      fileOpts.join(","),
      "--blockdev",
      "driver=raw,node-name=disk0,file=file0",
      "--export",
      exp.join(","),
    ];
    const proc = new ManagedProcess(this.tools.qsd, args, {
      name: `qsd ${o.name}`,
      lifetimeMs: o.lifetimeMs ?? 180_000,
      stderrLog: this.path(`${o.name}.log`),
    });
    const qsd = new Qsd(o.name, socket, proc);
    this.qsds.push(qsd);
    await waitForSocket(socket, proc, 10_000);
    return qsd;
  }

  /** Starts QEMU (q35, memfd RAM with share=on, -nodefaults) with the rig's kernel and initramfs. */
  async startVm(o: VmOptions): Promise<Vm> {
    const mem = o.memMiB ?? 256;
    const qmpSocket = this.path(`${o.name}.qmp`);
    const append = ["console=ttyS0", "panic=-1", "rig.vm=" + o.name];
    if (o.bootScript) append.push("rig.run=" + Buffer.from(o.bootScript).toString("base64"));
    if (o.poweroffAfterBoot) append.push("rig.poweroff=1");
    if (o.append) append.push(o.append);
    const args = [
      "-nodefaults",
      "-machine",
      "q35,memory-backend=mem",
      "-accel",
      o.accel ?? this.tools.accel,
      "-smp",
      String(o.smp ?? 1),
      "-m",
      o.maxMemMiB ? `${mem}M,maxmem=${o.maxMemMiB}M` : `${mem}M`,
      "-object",
      `memory-backend-memfd,id=mem,size=${mem}M,share=on`,
      "-display",
      "none",
      "-no-reboot",
      "-chardev",
      "stdio,id=con0,signal=off",
      "-serial",
      "chardev:con0",
      "-qmp",
      `unix:${qmpSocket},server=on,wait=off`,
      "-kernel",
      this.guestImage.kernel,
      "-initrd",
      this.guestImage.initrd,
      "-append",
      append.join(" "),
    ];
    (o.vhostUserBlk ?? []).forEach((d, i) => {
      const id = d.id ?? `vblk${i}`;
      args.push("-chardev", `socket,id=${id}-chr,path=${d.socket}`);
      let dev = `vhost-user-blk-pci,chardev=${id}-chr,id=${id}`;
      if (d.numQueues) dev += `,num-queues=${d.numQueues}`;
      if (d.queueSize) dev += `,queue-size=${d.queueSize}`;
      if (d.packed) dev += ",packed=on";
      args.push("-device", dev);
    });
    for (const t of o.trace ?? []) args.push("-trace", t);
    if (o.incoming) args.push("-incoming", "defer");
    args.push(...(o.extraArgs ?? []));
    await writeFile(this.path(`${o.name}.cmdline`), [this.tools.qemu, ...args].join(" ") + "\n");
    const proc = new ManagedProcess(this.tools.qemu, args, {
      name: `qemu ${o.name}`,
      lifetimeMs: o.lifetimeMs ?? 180_000,
      stderrLog: this.path(`${o.name}.stderr.log`),
      pipeStdio: true,
    });
    const why = () => `${proc.describeExit()}; stderr: ${proc.stderr().trim().slice(-2000) || "(empty)"}`;
    const con = new SerialConsole(
      proc.child.stdout!,
      proc.child.stdin!,
      this.path(`${o.name}.console.log`),
      why,
      proc.exited,
    );
    const ac = new AbortController();
    void proc.exited.then(() => ac.abort(new Error(why())));
    let qmp: QmpClient;
    try {
      qmp = await QmpClient.connect(qmpSocket, { timeoutMs: 15_000, signal: ac.signal });
    } catch (e) {
      await proc.stop();
      con.close();
      throw new Error(`${o.name}: QMP did not come up: ${(e as Error).message}; ${why()}`);
    }
    const vm = new Vm(o.name, proc, qmp, con, qmpSocket);
    this.vms.push(vm);
    return vm;
  }

  /**
   * Kills every process (QMP quit, SIGTERM, SIGKILL), removes sockets and, unless kept, the work dir.
   * Safe to call twice and after failures.
   */
  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    await Promise.allSettled(this.vms.map((v) => v.close()));
    await Promise.allSettled(this.qsds.map((q) => q.close()));
    if (this.keep) {
      for (const v of this.vms) await rm(v.qmpSocket, { force: true });
      for (const q of this.qsds) await rm(q.socket, { force: true });
      await writeFile(join(this.dir, KEPT_MARKER), `${new Date().toISOString()}\n`);
      process.stderr.write(`rig: kept ${this.dir}\n`);
    } else {
      await rm(this.dir, { recursive: true, force: true });
      openDirs.delete(this.dir);
    }
  }

  async [Symbol.asyncDispose](): Promise<void> {
    await this.close();
  }

  /** A unique migration URI in the work dir (a unix socket: no port clashes with parallel runs). */
  migrationUri(): string {
    return `unix:${this.path(`mig-${++this.counter}.sock`)}`;
  }
}

/** Work dirs to remove if the process exits without rig.close() (an uncaught error). */
const openDirs = new Set<string>();
function removeOpenDirsSync(): void {
  for (const d of openDirs) rmSync(d, { recursive: true, force: true });
}

/** Removes vmshift-rig-<pid>-* dirs whose process is gone (it was SIGKILLed: no exit hook ran). */
async function sweepStaleDirs(): Promise<void> {
  let names: string[];
  try {
    names = await readdir(tmpdir());
  } catch {
    return;
  }
  for (const n of names) {
    const m = /^vmshift-rig-(\d+)-/.exec(n);
    if (!m || Number(m[1]) === process.pid) continue;
    const kept = await stat(join(tmpdir(), n, KEPT_MARKER)).catch(() => null);
    if (kept && Date.now() - kept.mtimeMs < KEPT_FOR_MS) continue;
    try {
      process.kill(Number(m[1]), 0);
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code === "ESRCH") await rm(join(tmpdir(), n), { recursive: true, force: true });
    }
  }
}

async function waitForSocket(path: string, proc: ManagedProcess, timeoutMs: number): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    try {
      if ((await stat(path)).isSocket()) return;
    } catch {
      // not there yet
    }
    if (!proc.running) throw new Error(`${proc.describeExit()} before creating ${path}: ${proc.stderr().trim()}`);
    if (Date.now() > deadline) throw new Error(`${proc.opts.name}: no socket ${path} after ${timeoutMs} ms`);
    await sleep(20);
  }
}

// ---------------------------------------------------------------- migration

export interface MigrateOptions {
  /** Where the stream goes, e.g. rig.migrationUri() (a fresh unix socket in the rig dir) or "tcp:127.0.0.1:PORT". */
  uri: string;
  /** Bytes per second; default 10 GB/s, i.e. no cap (QEMU 7.2 defaulted to 32 MiB/s). */
  maxBandwidth?: number;
  /** Enable postcopy-ram on both sides and switch to postcopy after `postcopyAfterMs`. */
  postcopy?: boolean;
  postcopyAfterMs?: number;
  /** Extra migration capabilities for both sides. */
  capabilities?: Record<string, boolean>;
  downtimeLimitMs?: number;
  /** Whole-migration limit; on expiry the migration is cancelled and the call rejects. */
  timeoutMs?: number;
  /** How long the destination may take to reach "running" after completion. */
  resumeTimeoutMs?: number;
  /** Extra migrate-set-parameters per side (e.g. tls-creds, tls-hostname, tls-authz). */
  parameters?: { source?: Record<string, unknown>; destination?: Record<string, unknown> };
}

export interface MigrationResult {
  status: string;
  totalTimeMs: number | undefined;
  downtimeMs: number | undefined;
  setupTimeMs: number | undefined;
  /** Bytes sent, pages sent in full, zero pages, sync rounds, postcopy page requests. */
  ram: {
    transferred?: number;
    normalBytes?: number;
    duplicate?: number;
    dirtySyncCount?: number;
    postcopyRequests?: number;
    mbps?: number;
  };
  wallMs: number;
  /** The final query-migrate reply as QEMU sent it. */
  raw: Record<string, unknown>;
  /** The src query-migrate statuses seen while polling, deduplicated. */
  statuses: string[];
}

export class MigrationError extends Error {
  constructor(
    message: string,
    readonly result?: Record<string, unknown>,
  ) {
    super(message);
    this.name = "MigrationError";
  }
}

/** migrate-set-capabilities with {name: state} pairs. */
export async function setCapabilities(vm: Vm, caps: Record<string, boolean>): Promise<void> {
  const capabilities = Object.entries(caps).map(([capability, state]) => ({ capability, state }));
  if (capabilities.length) await vm.qmp.execute("migrate-set-capabilities", { capabilities });
}

/** Caps the migration stream (bytes/s). */
export async function setMaxBandwidth(vm: Vm, bytesPerSecond: number): Promise<void> {
  await vm.qmp.execute("migrate-set-parameters", { "max-bandwidth": bytesPerSecond });
}

/** Switches a running precopy migration to postcopy. */
export async function startPostcopy(vm: Vm): Promise<void> {
  await vm.qmp.execute("migrate-start-postcopy");
}

export async function queryMigrate(vm: Vm): Promise<Record<string, unknown>> {
  return vm.qmp.execute<Record<string, unknown>>("query-migrate");
}

const FINAL = new Set(["completed", "failed", "cancelled", "postcopy-paused"]);

/**
 * Migrates `src` to `dst` (started with incoming: true) and waits until it completes and the
 * destination runs. Rejects with MigrationError on failure, cancellation, postcopy-paused (which
 * QEMU would otherwise wait in forever) or timeout (the migration is cancelled first).
 */
export async function migrate(src: Vm, dst: Vm, o: MigrateOptions): Promise<MigrationResult> {
  const timeoutMs = o.timeoutMs ?? 60_000;
  const caps: Record<string, boolean> = { events: true, ...o.capabilities };
  if (o.postcopy) caps["postcopy-ram"] = true;
  await setCapabilities(src, caps);
  await setCapabilities(dst, caps);
  const params: Record<string, unknown> = { "max-bandwidth": o.maxBandwidth ?? 10_000_000_000 };
  if (o.downtimeLimitMs !== undefined) params["downtime-limit"] = o.downtimeLimitMs;
  await src.qmp.execute("migrate-set-parameters", { ...params, ...o.parameters?.source });
  if (o.parameters?.destination) await dst.qmp.execute("migrate-set-parameters", o.parameters.destination);
  await dst.qmp.execute("migrate-incoming", { uri: o.uri });
  const t0 = Date.now();
  await src.qmp.execute("migrate", { uri: o.uri });
  let postcopyTimer: NodeJS.Timeout | undefined;
  let postcopyError: unknown;
  if (o.postcopy) {
    postcopyTimer = setTimeout(() => {
      startPostcopy(src).catch((e: unknown) => {
        postcopyError = e;
      });
    }, o.postcopyAfterMs ?? 500);
  }
  const statuses: string[] = [];
  let r: Record<string, unknown> = {};
  try {
    for (;;) {
      r = await queryMigrate(src);
      const st = String(r.status);
      if (statuses[statuses.length - 1] !== st) statuses.push(st);
      if (FINAL.has(st)) break;
      if (!src.proc.running) throw new MigrationError(`source died during migration: ${src.proc.describeExit()}`, r);
      if (!dst.proc.running)
        throw new MigrationError(`destination died during migration: ${dst.proc.describeExit()}`, r);
      if (Date.now() - t0 > timeoutMs) {
        await src.qmp.execute("migrate_cancel").catch(() => {});
        throw new MigrationError(`migration timed out after ${timeoutMs} ms (status ${st})`, r);
      }
      await sleep(50);
    }
  } finally {
    clearTimeout(postcopyTimer);
  }
  const wallMs = Date.now() - t0;
  const status = String(r.status);
  if (status !== "completed") {
    const why = r["error-desc"] ? `: ${String(r["error-desc"])}` : "";
    throw new MigrationError(
      `migration ended in '${status}'${why}${postcopyError ? ` (${String(postcopyError)})` : ""}`,
      r,
    );
  }
  await dst.waitStatus("running", o.resumeTimeoutMs ?? 15_000);
  const ram = (r.ram ?? {}) as Record<string, number>;
  return {
    status,
    totalTimeMs: r["total-time"] as number | undefined,
    downtimeMs: r.downtime as number | undefined,
    setupTimeMs: r["setup-time"] as number | undefined,
    ram: {
      transferred: ram.transferred,
      normalBytes: ram["normal-bytes"],
      duplicate: ram.duplicate,
      dirtySyncCount: ram["dirty-sync-count"],
      postcopyRequests: ram["postcopy-requests"],
      mbps: ram.mbps,
    },
    wallMs,
    raw: r,
    statuses,
  };
}

// ---------------------------------------------------------------- host-side checks

/** sha256 (hex) of `length` bytes of a file at `offset`. */
export async function sha256OfFileRange(path: string, offset: number, length: number): Promise<string> {
  const fh = await open(path, "r");
  try {
    const h = createHash("sha256");
    const buf = Buffer.alloc(1 << 20);
    let pos = offset;
    let left = length;
    while (left > 0) {
      const { bytesRead } = await fh.read(buf, 0, Math.min(buf.length, left), pos);
      if (bytesRead === 0) break;
      h.update(buf.subarray(0, bytesRead));
      pos += bytesRead;
      left -= bytesRead;
    }
    return h.digest("hex");
  } finally {
    await fh.close();
  }
}

export const MiB = 1 << 20;

/** Lines that mean the guest kernel is hurt (oops, BUG, panic): after a migration these point at memory corruption. */
export const GUEST_CRASH = /BUG:|Oops|RIP:|Kernel panic|general protection fault|list_del corruption/;

/**
 * The rig and back-ends of one describe(): the rig is created before its tests (when the interop
 * probe passed); everything is closed after them and checked gone. A failed test keeps the work
 * dir (console logs, back-end logs, images) for inspection: its path is printed.
 */
export function rigFixture<B extends { close(): Promise<void> }>(
  name: string,
  available: boolean,
): { rig(): Rig; backends: B[] } {
  let rig: Rig | undefined;
  const backends: B[] = [];
  before(async () => {
    if (available) rig = await Rig.create(name);
  });
  afterEach((t) => {
    // TestContext.passed (Node >= 21.7); @types/node here predates it.
    if ((t as { passed?: boolean }).passed === false) rig?.keepForInspection();
  });
  after(async () => {
    await rig?.close();
    await Promise.all(backends.map((b) => b.close()));
    assert.equal(liveProcesses(), 0, "every QEMU / backend process is gone");
  });
  return {
    rig: () => {
      assert.ok(rig, "the rig was not created");
      return rig;
    },
    backends,
  };
}
