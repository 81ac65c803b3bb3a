/**
 * Our `vmshift blk` as a child process for the interop tests: spawned like QSD is (lifetime
 * limit, dies with the test process), with VMSHIFT_BLK_TRACE=1 so its stderr log lists every
 * vhost-user request it received.
 */

import { readFileSync } from "node:fs";
import { readFile, stat } from "node:fs/promises";
import { join } from "node:path";
import { setTimeout as sleep } from "node:timers/promises";
import { ManagedProcess, type Rig, repoRoot, rigFixture } from "./rig.js";

export interface BlkBackendOptions {
  name: string;
  image: string;
  socket?: string;
  queues?: number;
  /** --queue-workers (default: the program's own, half the host's CPUs). */
  queueWorkers?: number;
  readonly?: boolean;
  direct?: boolean;
  /** --io (default: the program's own, auto). */
  io?: "auto" | "sync" | "async" | "adaptive";
  lifetimeMs?: number;
  /** Extra environment (e.g. VMSHIFT_BLK_TRACE=0). */
  env?: Record<string, string>;
  /** --metrics tcp:127.0.0.1:0 (BlkBackend.metricsUrl() then says where). */
  metrics?: boolean;
}

export class BlkBackend {
  constructor(
    readonly name: string,
    readonly socket: string,
    readonly proc: ManagedProcess,
    readonly logPath: string,
  ) {}

  /** The backend's stderr so far. */
  async log(): Promise<string> {
    return readFile(this.logPath, "utf8").catch(() => "");
  }

  /** Resolves with its stderr once `re` matches it (the socket can exist before a line is written). */
  async waitLog(re: RegExp, timeoutMs = 10_000): Promise<string> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const text = await this.log();
      if (re.test(text)) return text;
      if (Date.now() > deadline)
        throw new Error(`${this.name}: no log line matching ${re} in ${timeoutMs} ms:\n${text}`);
      await new Promise((r) => setTimeout(r, 20));
    }
  }

  /** The /metrics URL it logged (started with `metrics: true`), waiting for the line. */
  async metricsUrl(timeoutMs = 10_000): Promise<string> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const m = /metrics at (http:\/\/\S+\/metrics)/.exec(this.proc.stderr());
      if (m) return m[1] as string;
      if (!this.proc.running || Date.now() > deadline) throw new Error(`${this.name}: no metrics URL logged`);
      await sleep(20);
    }
  }

  /** The vhost-user requests it logged (`TIME INFO  blk: trace: NAME payload`), in order. */
  async requests(): Promise<{ name: string; detail: string }[]> {
    const out: { name: string; detail: string }[] = [];
    for (const line of (await this.log()).split("\n")) {
      const m = / blk: trace: (\S+) ?(.*)$/.exec(line);
      if (m) out.push({ name: m[1] as string, detail: m[2] ?? "" });
    }
    return out;
  }

  /**
   * SIGKILLs the back-end at a moment it holds a request (started with VMSHIFT_BLK_DELAY_MS, one
   * queue): the process is stopped (SIGSTOP), its stderr drained, and killed only if its last
   * marker is "holding head H", else continued and tried again a little later. A kill at a
   * random moment can land between requests and leave nothing in flight: this one can't.
   * Returns the held head, or null when no attempt found one (then it was killed anyway).
   */
  async killWhileHolding(attempts = 150): Promise<number | null> {
    const pid = innermostPid(this.proc.pid ?? 0);
    const last = () => [...this.proc.stderr().matchAll(/(holding|released) head (\d+)/g)].at(-1);
    for (let i = 0; i < attempts && this.proc.running; i++) {
      try {
        process.kill(pid, "SIGSTOP");
      } catch {
        break;
      }
      // Stopped: whatever it wrote is in the pipe; wait until the tail stops changing.
      let seen = this.proc.stderr();
      for (let k = 0; k < 20; k++) {
        await sleep(15);
        const now = this.proc.stderr();
        if (now === seen) break;
        seen = now;
      }
      const m = last();
      if (m?.[1] === "holding") {
        process.kill(pid, "SIGKILL");
        await this.proc.exited;
        return Number(m[2]);
      }
      process.kill(pid, "SIGCONT");
      await sleep(10 + Math.floor(Math.random() * 50));
    }
    this.proc.killNow("SIGKILL");
    if (pid) {
      try {
        process.kill(pid, "SIGKILL");
      } catch {
        // gone
      }
    }
    await this.proc.exited;
    return null;
  }

  /** Sends `sig` to the vmshift process itself (not the wrappers around it). */
  signal(sig: NodeJS.Signals): void {
    process.kill(innermostPid(this.proc.pid ?? 0), sig);
  }

  async close(): Promise<void> {
    await this.proc.stop();
  }
}

export function blkMainPath(): string {
  return join(repoRoot(), "dist", "src", "cli", "blk-main.js");
}

/** Starts `node dist/src/cli/blk-main.js --socket-path ... --image ...`; resolves once the socket exists. */
export async function startBlk(rig: Rig, o: BlkBackendOptions): Promise<BlkBackend> {
  const socket = o.socket ?? rig.path(`${o.name}.sock`);
  const args = [blkMainPath(), "--socket-path", socket, "--image", o.image];
  if (o.queues) args.push("--queues", String(o.queues));
  if (o.queueWorkers) args.push("--queue-workers", String(o.queueWorkers));
  if (o.readonly) args.push("--readonly");
  if (o.direct) args.push("--direct");
  if (o.io) args.push("--io", o.io);
  if (o.metrics) args.push("--metrics", "tcp:127.0.0.1:0");
  const logPath = rig.path(`${o.name}.log`);
  const env = { VMSHIFT_BLK_TRACE: "1", ...o.env };
  // ManagedProcess inherits our environment: set the trace switch around the spawn.
  const saved: Record<string, string | undefined> = {};
  for (const [k, v] of Object.entries(env)) {
    saved[k] = process.env[k];
    process.env[k] = v;
  }
  let proc: ManagedProcess;
  try {
    proc = new ManagedProcess(process.execPath, args, {
      name: `vmshift blk ${o.name}`,
      lifetimeMs: o.lifetimeMs ?? 180_000,
      stderrLog: logPath,
    });
  } finally {
    for (const [k, v] of Object.entries(saved)) {
      if (v === undefined) delete process.env[k];
      else process.env[k] = v;
    }
  }
  const b = new BlkBackend(o.name, socket, proc, logPath);
  const deadline = Date.now() + 10_000;
  for (;;) {
    try {
      if ((await stat(socket)).isSocket()) break;
    } catch {
      // not yet
    }
    if (!proc.running) throw new Error(`${proc.describeExit()} before creating ${socket}: ${proc.stderr().trim()}`);
    if (Date.now() > deadline) {
      await proc.stop();
      throw new Error(`${o.name}: no socket after 10 s: ${proc.stderr().trim()}`);
    }
    await sleep(20);
  }
  return b;
}

/**
 * The innermost descendant of `pid`: ManagedProcess runs the command under setpriv/timeout
 * wrappers, and `timeout` forks the real process as its child.
 */
function innermostPid(pid: number): number {
  for (let depth = 0; depth < 4 && pid > 0; depth++) {
    let kids: string;
    try {
      kids = readFileSync(`/proc/${pid}/task/${pid}/children`, "utf8").trim();
    } catch {
      return pid;
    }
    if (!kids) return pid;
    pid = Number(kids.split(/\s+/)[0]);
  }
  return pid;
}

/** Prints the loud skip banner; returns the skip reason (or false). */
export function skipBanner(file: string, reason: string | null): string | false {
  if (reason === null) return false;
  const msg = `\n${"!".repeat(78)}\n!! SKIPPING ${file}: ${reason}\n!! (VMSHIFT_REQUIRE_INTEROP=1 turns this skip into a failure)\n${"!".repeat(78)}\n`;
  process.stderr.write(msg);
  return `QEMU interop rig unavailable: ${reason}`;
}

/**
 * The rig and back-ends of one describe(): the rig is created before its tests (when the
 * interop probe passed), and everything is closed after them and checked gone.
 */
export function blkFixture(name: string, available: boolean): { rig(): Rig; backends: BlkBackend[] } {
  return rigFixture<BlkBackend>(name, available);
}
