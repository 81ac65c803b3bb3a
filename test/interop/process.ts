/**
 * Child processes of the rig (QEMU, qemu-storage-daemon) that cannot outlive their deadline or the test
 * process. Each runs as `setpriv --pdeathsig KILL -- timeout -k 5 SECS setpriv --pdeathsig KILL -- CMD`:
 * `timeout` bounds its life even if every JS timer is lost, and the two parent-death signals make the
 * command die with the test process even on SIGKILL (where no exit hook runs). Tools missing → degrade
 * to a JS timer and the exit hook.
 */
import { type ChildProcess, execFileSync, spawn } from "node:child_process";
import { createWriteStream, type WriteStream } from "node:fs";

export interface ExitInfo {
  code: number | null;
  signal: NodeJS.Signals | null;
  /** true when the lifetime limit killed it (`timeout` exits 124, or 137 after its -k). */
  timedOut: boolean;
}

export interface ManagedOptions {
  /** A short name for messages and log files. */
  name: string;
  /** Hard limit on the process's life. */
  lifetimeMs: number;
  /** stderr is appended here (and the last few KiB kept for error messages). */
  stderrLog: string;
  /** Pipe stdin/stdout (the serial console) instead of ignoring them. */
  pipeStdio?: boolean;
  cwd?: string;
}

const live = new Set<ManagedProcess>();
let hooksInstalled = false;

function installExitHooks(): void {
  if (hooksInstalled) return;
  hooksInstalled = true;
  // Synchronous: the only thing that can run in an 'exit' listener.
  process.on("exit", () => {
    for (const p of live) p.killNow("SIGKILL");
  });
  for (const sig of ["SIGTERM", "SIGINT", "SIGHUP"] as const) {
    process.once(sig, () => {
      for (const p of live) p.killNow("SIGKILL");
      process.exit(128 + (sig === "SIGTERM" ? 15 : sig === "SIGINT" ? 2 : 1));
    });
  }
}

let wrapper: { setpriv: boolean; timeout: boolean } | undefined;
function detectWrapper(): { setpriv: boolean; timeout: boolean } {
  if (wrapper) return wrapper;
  const has = (cmd: string, args: string[], needle: string): boolean => {
    try {
      return execFileSync(cmd, args, { encoding: "utf8", stdio: ["ignore", "pipe", "pipe"] }).includes(needle);
    } catch {
      return false;
    }
  };
  wrapper = {
    setpriv: has("setpriv", ["--help"], "pdeathsig"),
    timeout: has("timeout", ["--help"], "kill-after"),
  };
  return wrapper;
}

/** The argv that runs `cmd` under the lifetime limit and the parent-death signals. */
export function wrappedArgv(cmd: string, args: string[], lifetimeMs: number): string[] {
  const w = detectWrapper();
  const pd = w.setpriv ? ["setpriv", "--pdeathsig", "KILL", "--"] : [];
  const secs = Math.max(1, Math.ceil(lifetimeMs / 1000));
  const to = w.timeout ? ["timeout", "--kill-after=5", String(secs)] : [];
  return [...pd, ...to, ...(w.timeout ? pd : []), cmd, ...args];
}

export class ManagedProcess {
  readonly child: ChildProcess;
  readonly exited: Promise<ExitInfo>;
  exitInfo: ExitInfo | null = null;
  private stderrTail = "";
  private readonly stderrStream: WriteStream;
  private readonly backstop: NodeJS.Timeout;

  constructor(
    readonly command: string,
    readonly args: string[],
    readonly opts: ManagedOptions,
  ) {
    installExitHooks();
    const argv = wrappedArgv(command, args, opts.lifetimeMs);
    this.stderrStream = createWriteStream(opts.stderrLog, { flags: "a" });
    this.stderrStream.on("error", () => {}); // the rig dir may be removed while QEMU still prints
    this.child = spawn(argv[0]!, argv.slice(1), {
      cwd: opts.cwd,
      stdio: [opts.pipeStdio ? "pipe" : "ignore", opts.pipeStdio ? "pipe" : "ignore", "pipe"],
    });
    live.add(this);
    this.child.stderr!.on("data", (b: Buffer) => {
      this.stderrStream.write(b);
      this.stderrTail = (this.stderrTail + b.toString("utf8")).slice(-8192);
    });
    // The JS-side limit, a little after `timeout`'s own: only matters when `timeout` is missing.
    this.backstop = setTimeout(() => this.killNow("SIGKILL"), opts.lifetimeMs + 8000);
    this.backstop.unref();
    this.exited = new Promise<ExitInfo>((resolve) => {
      const done = (code: number | null, signal: NodeJS.Signals | null) => {
        if (this.exitInfo) return;
        clearTimeout(this.backstop);
        live.delete(this);
        this.exitInfo = { code, signal, timedOut: code === 124 || (code === 137 && detectWrapper().timeout) };
        this.stderrStream.end();
        resolve(this.exitInfo);
      };
      this.child.once("exit", done);
      this.child.once("error", (e) => {
        this.stderrTail += `\nspawn failed: ${e.message}`;
        done(127, null);
      });
    });
  }

  get pid(): number | undefined {
    return this.child.pid;
  }

  get running(): boolean {
    return this.exitInfo === null;
  }

  /** The last few KiB of stderr, for error messages. */
  stderr(): string {
    return this.stderrTail;
  }

  killNow(signal: NodeJS.Signals): void {
    if (this.exitInfo || this.child.pid === undefined) return;
    try {
      process.kill(this.child.pid, signal);
    } catch {
      // already gone
    }
  }

  /** SIGTERM, then SIGKILL after `graceMs`; resolves when the process has exited. */
  async stop(graceMs = 3000): Promise<ExitInfo> {
    if (this.exitInfo) return this.exitInfo;
    this.killNow("SIGTERM");
    const t = setTimeout(() => this.killNow("SIGKILL"), graceMs);
    try {
      return await this.exited;
    } finally {
      clearTimeout(t);
    }
  }

  describeExit(): string {
    const e = this.exitInfo;
    if (!e) return `${this.opts.name} is running`;
    const how = e.timedOut
      ? "hit its lifetime limit"
      : e.signal
        ? `was killed by ${e.signal}`
        : `exited with ${e.code}`;
    return `${this.opts.name} ${how}`;
  }
}

/** Processes still alive (for leak checks in tests). */
export function liveProcesses(): number {
  return live.size;
}
