/**
 * `vmshift demo`: boots a micro-VM (KVM, vCPUs running the long-mode dirtying program) and
 * live-migrates it, while it runs, to a second process (`vmshift demo-destination`, spawned
 * here) over a unix socket: precopy rounds with KVM dirty tracking (bitmap or rings), stop,
 * the vCPU state as a device-state record, the VM rebuilt and resumed over the received
 * memory there, which checks that the guest's counter continues with no gap. Postcopy: the
 * destination runs the vCPU at once and its memory arrives on demand.
 *
 * Without /dev/kvm the same migration moves a worker-thread workload's memory (the engine's
 * Workload) and the output says so.
 */
import { type ChildProcess, spawn } from "node:child_process";
import { mkdtempSync, rmSync } from "node:fs";
import type { Socket } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { createInterface } from "node:readline";
import { fileURLToPath } from "node:url";
import { DIRTY_BASE } from "../kvm/guest.js";
import { kvmUnavailableReason } from "../kvm/kvm.js";
import { type DirtyTracking, MicroVm } from "../kvm/micro-vm.js";
import type { GuestMemory } from "../memory/guest-memory.js";
import type { FaultStats, MigrationResult, RoundStats } from "../migration/events.js";
import { EVENT_VERSION, type MigrationInfo, MigrationReport, r1 } from "../migration/report.js";
import { MigrationSource, type SourceHooks } from "../migration/source.js";
import { connectEndpoint, parseEndpoint } from "../migration/transport.js";
import { Workload } from "../migration/workload.js";
import { VmSource } from "../vm/migrate.js";
import { demoMemory } from "./demo-destination.js";
import { counted } from "./printable.js";

const MiB = 1024 * 1024;

export interface VmDemoOptions {
  sizeMiB: number;
  /** vCPUs of the micro-VM, each dirtying its own share of memory (default 1). */
  vcpus?: number;
  /** Guest dirty rate limit, MiB/s (0: as fast as the guest goes). */
  dirtyRateMiB: number;
  mode: "precopy" | "postcopy";
  dirtyTracking: DirtyTracking;
  json: boolean;
  /** Run the worker-thread workload even when KVM is there (tests). */
  forceWorkload?: boolean;
  downtimeLimitMs?: number;
  /** Migration bandwidth limit, bytes/s (default 0: unlimited). */
  bandwidthLimit?: number;
  /** Postcopy: precopy rounds first (default 0: the destination runs before any page is there). */
  postcopyAfterRounds?: number;
  /** The whole run, ms (default 60 s): past it the child is killed and the demo fails. */
  timeoutMs?: number;
  out: (line: string) => void;
  /** A live progress line (TTY only); null prints plain lines. */
  status?: ((line: string) => void) | null;
  /** Every versioned event (docs/events.schema.json), whether or not `json` prints them. */
  onEvent?: (e: Record<string, unknown>) => void;
  /** Cancels the migration (the source fails with ABORTED; a `cancelled` event is emitted). */
  signal?: AbortSignal;
}

export interface CounterReport {
  /** vCPU 0's last report on the source and first on the destination. */
  sourceLast: number;
  destinationFirst: number;
  /** Every vCPU's counter continued exactly (first report there = last here + 1). */
  continued: boolean;
  destinationAfter: number | null;
  /** Per vCPU: [last on the source, first on the destination]. */
  vcpus: [number, number][];
}

export interface VmDemoResult {
  event: "result";
  verified: boolean;
  guest: "kvm" | "worker-threads";
  kvmUnavailable: string | null;
  mode: "precopy" | "postcopy";
  dirtyTracking: DirtyTracking | "worker bitmap";
  sizeMiB: number;
  rounds: number;
  bytes: number;
  throughputMBps: number;
  downtimeMs: number;
  /**
   * Precopy: the part of the downtime from the stop to the last page and the vCPU state sent;
   * the destination resumes then, and both sides' digests are compared after it runs.
   */
  stopAndCopyMs: number | null;
  totalMs: number;
  converged: boolean;
  digestsEqual: boolean;
  digests: { region: number; source: string; destination: string; match: boolean }[];
  counter: CounterReport | null;
  postcopy: FaultStats | null;
  error?: string;
}

interface ChildLine {
  event: string;
  [k: string]: unknown;
}

/** The destination process and its JSON lines. */
class DestinationProcess {
  readonly child: ChildProcess;
  readonly lines: ChildLine[] = [];
  readonly #waiters: { pred: (l: ChildLine) => boolean; resolve: (l: ChildLine) => void }[] = [];
  readonly exited: Promise<number | null>;
  stderr = "";

  constructor(args: string[], onLine: (l: ChildLine) => void) {
    const main = fileURLToPath(new URL("./main.js", import.meta.url));
    this.child = spawn(process.execPath, [main, "demo-destination", ...args], { stdio: ["ignore", "pipe", "pipe"] });
    this.exited = new Promise((r) => this.child.once("exit", (code) => r(code)));
    this.child.stderr?.on("data", (d: Buffer) => {
      this.stderr += d.toString();
    });
    const rl = createInterface({ input: this.child.stdout as NodeJS.ReadableStream });
    rl.on("line", (s) => {
      let l: ChildLine;
      try {
        l = JSON.parse(s) as ChildLine;
      } catch {
        return;
      }
      this.lines.push(l);
      onLine(l);
      for (const w of [...this.#waiters])
        if (w.pred(l)) {
          this.#waiters.splice(this.#waiters.indexOf(w), 1);
          w.resolve(l);
        }
    });
  }

  /** The first line matching `pred` (past or future); rejects if the child exits or after ms. */
  waitFor(pred: (l: ChildLine) => boolean, ms: number, what: string): Promise<ChildLine> {
    const seen = this.lines.find(pred);
    if (seen) return Promise.resolve(seen);
    let timer: NodeJS.Timeout | undefined;
    return Promise.race([
      new Promise<ChildLine>((resolve) => this.#waiters.push({ pred, resolve })),
      this.exited.then((code) => {
        const l = this.lines.find(pred);
        if (l) return l;
        throw new Error(`destination process exited (${code}) before ${what}: ${this.stderr.trim().slice(-500)}`);
      }),
      new Promise<never>((_, rej) => {
        timer = setTimeout(() => rej(new Error(`destination: no ${what} within ${ms} ms`)), ms);
      }),
    ]).finally(() => clearTimeout(timer));
  }

  async kill(): Promise<void> {
    if (this.child.exitCode === null && this.child.signalCode === null) {
      this.child.kill("SIGKILL");
      await this.exited;
    }
  }
}

function fmtMiB(b: number): string {
  return `${(b / MiB).toFixed(1)} MiB`;
}

/** Events that end a side's run (docs/events.schema.json): at most one per side. */
const TERMINAL_EVENTS = new Set(["complete", "failed", "cancelled"]);

export async function runVmDemo(o: VmDemoOptions): Promise<VmDemoResult> {
  const t0 = performance.now();
  const kvmReason = o.forceWorkload ? "worker-thread workload requested" : kvmUnavailableReason();
  const kvm = kvmReason === null;
  let ended = false;
  const emit = (ev: Record<string, unknown>) => {
    const e = { event: ev.event, version: EVENT_VERSION, t: r1(performance.now() - t0), ...ev };
    o.onEvent?.(e);
    if (o.json) o.out(JSON.stringify(e));
  };
  let report: MigrationReport | null = null;
  /** The one terminal event of a run that did not complete. */
  const endWith = (e: unknown) => {
    if (ended) return;
    ended = true;
    const reason = o.signal?.aborted ? String((o.signal.reason as Error | undefined)?.message ?? "cancelled") : null;
    if (report) {
      if (reason !== null) report.cancelled(reason);
      else report.failed(e);
      return;
    }
    const err = e as { code?: unknown; message?: unknown };
    if (reason !== null) emit({ event: "cancelled", reason });
    else
      emit({
        event: "failed",
        code: typeof err?.code === "string" ? err.code : "ERROR",
        message: String(err?.message ?? e),
        offset: null,
      });
  };
  const say = (line: string) => {
    if (!o.json) o.out(line);
  };
  const dir = mkdtempSync(join(tmpdir(), "vmshift-demo-"));
  const endpoint = `unix:${join(dir, "migration.sock")}`;
  const memory: GuestMemory = demoMemory(o.sizeMiB, "vmshift-demo-src");
  let vm: MicroVm | null = null;
  let workload: Workload | null = null;
  let child: DestinationProcess | null = null;
  let stream: Socket | null = null;
  let preemptConn: Socket | undefined;
  let ticker: NodeJS.Timeout | undefined;
  let overall: NodeJS.Timeout | undefined;
  const timeoutMs = o.timeoutMs ?? 60_000;
  try {
    if (kvm) {
      // A pattern over the whole guest first: no page is zero, so every page really travels.
      memory.fill(DIRTY_BASE, memory.size - DIRTY_BASE, 0xa5);
      vm = await MicroVm.create({
        memory,
        dirtyTracking: o.dirtyTracking,
        boot: { writesPerReport: 64, vcpus: o.vcpus ?? 1 },
      });
      vm.setDirtyRate((o.dirtyRateMiB * MiB) / 4096);
      vm.run();
      await vm.vcpu.waitForProgress(10, 10_000);
      say(
        `guest: micro-VM (KVM, ${vm.vcpus.length} vCPU${vm.vcpus.length > 1 ? "s, each in its own thread over its own share of memory" : ""}, long mode) with ${o.sizeMiB} MiB, dirtying ` +
          `${o.dirtyRateMiB > 0 ? `up to ${o.dirtyRateMiB} MiB/s` : "as fast as it can"}; ` +
          `dirty tracking: KVM ${o.dirtyTracking === "ring" ? "dirty rings (one per vCPU)" : "dirty bitmap"}`,
      );
    } else {
      workload = await Workload.start({
        memory,
        pattern: "sequential",
        pagesPerSecond: (o.dirtyRateMiB * MiB) / 4096,
        threads: 1,
      });
      say(
        `guest: NO KVM (${kvmReason}): migrating a worker-thread workload's memory instead ` +
          `(${o.sizeMiB} MiB, ${o.dirtyRateMiB} MiB/s, in-process dirty bitmap)`,
      );
    }
    emit({
      event: "start",
      guest: kvm ? "kvm" : "worker-threads",
      kvmUnavailable: kvmReason,
      mode: o.mode,
      dirtyTracking: kvm ? o.dirtyTracking : "worker bitmap",
      sizeMiB: o.sizeMiB,
      vcpus: kvm ? (vm?.vcpus.length ?? 1) : 0,
    });
    let destinationInfo: MigrationInfo | null = null;

    child = new DestinationProcess(
      ["--listen", endpoint, "--size", String(o.sizeMiB), "--mode", o.mode, "--guest", kvm ? "kvm" : "workload"],
      (l) => {
        // The child's versioned events (its own view), on this process's clock.
        if (l.version !== EVENT_VERSION) return;
        // Cancelled here: the destination then only sees its connection go and fails; that is
        // our cancel's echo, not a second outcome. The run's one terminal event is ours.
        if (o.signal?.aborted && TERMINAL_EVENTS.has(String(l.event))) return;
        if (l.info) destinationInfo = l.info as MigrationInfo;
        const { t: _t, version: _v, ...rest } = l;
        emit(rest);
      },
    );
    const failFast = new Promise<never>((_, rej) => {
      overall = setTimeout(() => rej(new Error(`demo did not finish within ${timeoutMs} ms`)), timeoutMs);
    });
    failFast.catch(() => undefined);
    const aborted = new Promise<never>((_, rej) => {
      if (o.signal?.aborted) rej(o.signal.reason);
      o.signal?.addEventListener("abort", () => rej(o.signal?.reason), { once: true });
    });
    aborted.catch(() => undefined);
    await Promise.race([child.waitFor((l) => l.event === "listening", 10_000, "listening"), failFast, aborted]);
    const ep = parseEndpoint(endpoint);
    const conn: Socket = await connectEndpoint(ep);
    stream = conn;
    // Postcopy: the pages the destination faults on come back on a connection of their own.
    if (o.mode === "postcopy" && ep.kind !== "fd") preemptConn = await connectEndpoint(ep);
    say(`destination: process ${child.child.pid}, ${endpoint}`);

    const vmSource = vm ? new VmSource(vm, o.mode) : null;
    const hooks: SourceHooks = vmSource ? vmSource.hooks() : (workload as Workload).sourceHooks();
    const source = new MigrationSource({
      memory,
      mode: o.mode,
      ...(vm ? { sources: [vm.dirtySource()] } : {}),
      hooks,
      downtimeLimitMs: o.downtimeLimitMs ?? 50,
      maxRounds: 30,
      whenNotConverged: "switchover",
      bandwidthLimit: o.bandwidthLimit ?? 0,
      // Postcopy: the destination starts at once and pulls every page it touches on demand.
      postcopyAfterRounds: o.postcopyAfterRounds ?? 0,
      ...(o.signal ? { signal: o.signal } : {}),
    });
    report = new MigrationReport({
      role: "source",
      mode: o.mode,
      events: source.events,
      totalBytes: memory.size,
      transferred: () => conn.bytesWritten + (preemptConn?.bytesWritten ?? 0),
      emit: (e) => emit(e as unknown as Record<string, unknown>),
      t0,
      ...(o.signal ? { signal: o.signal } : {}),
    });
    let last: RoundStats | null = null;
    let phase = "setup";
    const status = o.status ?? null;
    const line = () => {
      const round = (last?.round ?? 0) + (phase === "precopy" ? 1 : 0);
      const expect = last ? last.remainingBytes : memory.size;
      const sentNow = conn.bytesWritten - (sentBefore ?? 0);
      const frac = Math.max(0, Math.min(1, expect > 0 ? sentNow / expect : 1));
      const w = 24;
      const bar = "#".repeat(Math.round(frac * w)).padEnd(w, ".");
      const dirty = last ? `${(last.dirtyRate / MiB).toFixed(0)} MiB/s` : "-";
      const rem = last ? fmtMiB(last.remainingBytes) : fmtMiB(memory.size);
      const pd = last ? `${last.predictedDowntimeMs.toFixed(1)} ms` : "-";
      return `${phase.padEnd(10)} round ${String(round).padStart(2)} [${bar}] dirty ${dirty}, remaining ${rem}, predicted downtime ${pd}`;
    };
    let sentBefore = 0;
    const phaseAt = new Map<string, number>();
    source.events.on("phase", (p) => {
      phase = p.phase;
      phaseAt.set(p.phase, p.atMs);
      if (!o.json && !status) say(`source: ${p.phase} at ${p.atMs.toFixed(0)} ms`);
    });
    source.events.on("round", (r) => {
      last = r;
      sentBefore = conn.bytesWritten;
      if (!o.json && !status)
        say(
          `round ${r.round}: sent ${fmtMiB(r.bytesSent)} at ${(r.bandwidth / 1e6).toFixed(0)} MB/s, dirty rate ` +
            `${(r.dirtyRate / MiB).toFixed(0)} MiB/s, remaining ${fmtMiB(r.remainingBytes)}, predicted downtime ` +
            `${r.predictedDowntimeMs.toFixed(1)} ms`,
        );
    });
    source.events.on("throttle", (t) => {
      if (!o.json && !status) say(`auto-converge: throttle level ${t.level}`);
    });
    if (status) ticker = setInterval(() => status(line()), 100);

    let result: MigrationResult;
    try {
      result = await Promise.race([source.run(conn, { preempt: preemptConn }), failFast, aborted]);
    } finally {
      clearInterval(ticker);
      if (status) status(`${line()}\n`);
    }
    const done = await Promise.race([
      child.waitFor((l) => l.event === "destination-result" || l.event === "error", 15_000, "result"),
      failFast,
      aborted,
    ]);
    if (done.event === "error") throw new Error(`destination: ${String(done.code)}: ${String(done.message)}`);
    await child.exited;
    const dres = done.result as MigrationResult;
    const c = done.counter as {
      stoppedAt: number;
      firstReport: number;
      continued: boolean;
      vcpus: { stoppedAt: number; firstReport: number }[];
    } | null;
    const sourceAll = vmSource?.stoppedAtAll ?? [];
    const counter: CounterReport | null =
      kvm && c
        ? {
            sourceLast: vmSource?.stoppedAt ?? -1,
            destinationFirst: c.firstReport,
            // Every vCPU: the state that travelled is the one the source stopped with.
            continued:
              c.continued &&
              c.vcpus.length === sourceAll.length &&
              c.vcpus.every((v, i) => v.stoppedAt === sourceAll[i]),
            destinationAfter: (done.progressAfter as number | null) ?? null,
            vcpus: c.vcpus.map((v, i) => [sourceAll[i] ?? -1, v.firstReport]),
          }
        : null;
    const digestsEqual = result.digests.length > 0 && result.digests.every((d) => d.match);
    const verified = digestsEqual && (kvm ? counter?.continued === true : true);
    const totalMs = performance.now() - t0;
    const res: VmDemoResult = {
      event: "result",
      verified,
      guest: kvm ? "kvm" : "worker-threads",
      kvmUnavailable: kvmReason,
      mode: o.mode,
      dirtyTracking: kvm ? o.dirtyTracking : "worker bitmap",
      sizeMiB: o.sizeMiB,
      rounds: result.rounds,
      bytes: result.bytesSent,
      throughputMBps: result.totalMs > 0 ? result.bytesSent / 1e3 / result.totalMs : 0,
      downtimeMs: result.downtimeMs,
      stopAndCopyMs:
        phaseAt.has("switchover") && phaseAt.has("verify")
          ? (phaseAt.get("verify") as number) - (phaseAt.get("switchover") as number)
          : null,
      totalMs,
      converged: result.converged,
      digestsEqual,
      digests: result.digests,
      counter,
      postcopy: dres.postcopy ? { ...dres.postcopy } : null,
    };
    ended = true;
    emit({
      event: "summary",
      verified,
      guest: res.guest,
      kvmUnavailable: kvmReason,
      mode: o.mode,
      dirtyTracking: res.dirtyTracking,
      stopAndCopyMs: res.stopAndCopyMs === null ? null : r1(res.stopAndCopyMs),
      counter,
      source: report.info(),
      destination: destinationInfo,
    });
    if (!o.json) {
      say("");
      say(
        `${res.mode} migration of a ${kvm ? "running micro-VM" : "worker-thread workload (no KVM)"} ` +
          `to process ${child.child.pid}: ${counted(res.rounds, "round")}, ${fmtMiB(res.bytes)} sent, ` +
          `${res.throughputMBps.toFixed(0)} MB/s, downtime ${res.downtimeMs.toFixed(1)} ms` +
          `${res.stopAndCopyMs !== null ? ` (stop-and-copy ${res.stopAndCopyMs.toFixed(1)} ms, until the destination runs; memory verified after it resumed)` : ""}` +
          `, total ${res.totalMs.toFixed(0)} ms`,
      );
      say(
        `dirty tracking: ${kvm ? `KVM ${o.dirtyTracking}` : "in-process bitmap (worker threads)"}${res.converged ? "" : " (did not converge: switched over at the round limit)"}`,
      );
      if (res.postcopy)
        say(
          `postcopy: ${res.postcopy.remoteFaults} pages faulted in from the source` +
            `${res.postcopy.preemptPages ? ` (${res.postcopy.preemptPages} of them on the preempt channel)` : ""}, median ` +
            `${res.postcopy.latencyMedianUs.toFixed(0)} µs, p99 ${res.postcopy.latencyP99Us.toFixed(0)} µs`,
        );
      for (const d of res.digests)
        say(`region ${d.region}: source ${d.source.slice(0, 16)} destination ${d.destination.slice(0, 16)}`);
      say(digestsEqual ? "memory digests equal" : "MEMORY DIGESTS DIFFER");
      if (counter)
        say(
          `guest counter${counter.vcpus.length > 1 ? "s" : ""}: last report on the source ` +
            `${counter.vcpus.map(([a]) => a).join("/")}, first on the destination ` +
            `${counter.vcpus.map(([, b]) => b).join("/")}${counter.continued ? " (continue, no gap)" : " (GAP OR REPEAT)"}` +
            `${counter.destinationAfter !== null ? `, then vCPU 0 ran on to ${counter.destinationAfter}` : ""}`,
        );
      else say("guest counter: n/a (no KVM: a worker-thread workload has no vCPU to continue)");
      say(verified ? "verified" : "NOT VERIFIED");
    }
    return res;
  } catch (e) {
    endWith(e);
    throw e;
  } finally {
    clearInterval(ticker);
    clearTimeout(overall);
    stream?.destroy();
    preemptConn?.destroy();
    await child?.kill();
    await (workload as Workload | null)?.close();
    await vm?.close();
    memory.close();
    rmSync(dir, { recursive: true, force: true });
  }
}
