/**
 * The guest's serial console (QEMU `-chardev stdio` on pipes): every byte goes to a log file, lines are
 * kept for waits, and a small command agent in the guest's /init (scripts/guest/init.sh) runs scripts
 * sent over it. The protocol, one line each:
 *     host → guest   RIGCMD <id> / base64 of the script in 76-column lines / "."
 *     guest → host   RIG-BEGIN <id> / whatever the script prints / RIG-END <id> rc=<n>
 * The kernel may print into the middle of this; results are found by pattern, never by position.
 */
import { createWriteStream, type WriteStream } from "node:fs";
import type { Readable, Writable } from "node:stream";

/** A kernel console message: "[    1.974620] ..." (printk with its timestamp). */
const KERNEL_LINE = /^\[\s*\d+\.\d+\] /;
/** The same, anywhere in a line (printk's timestamp has six decimals). */
const KERNEL_MID = /\[\s*\d+\.\d{6}\] /;

export class ConsoleTimeoutError extends Error {
  constructor(what: string, timeoutMs: number, tail: string) {
    super(`console: ${what} not seen within ${timeoutMs} ms; console tail:\n${tail}`);
    this.name = "ConsoleTimeoutError";
  }
}

interface LineWaiter {
  from: number;
  test: (line: string) => boolean;
  resolve: (index: number) => void;
  reject: (e: Error) => void;
}

const MAX_LINES = 200_000;

export class SerialConsole {
  /** Every complete line so far, "\r" removed. */
  readonly lines: string[] = [];
  private partial = "";
  /** The start of a program's line that a kernel message cut off (joined to the next line). */
  private cut = "";
  private readonly log: WriteStream;
  private readonly waiters = new Set<LineWaiter>();
  private closedError: Error | null = null;

  constructor(
    output: Readable,
    private readonly input: Writable,
    readonly logPath: string,
    /** Says why the console closed (e.g. "qemu vm exited with 1; stderr: ..."). */
    private readonly whyClosed: () => string,
    /**
     * The console closes once the output ends and this settles: QEMU's stdout reaches EOF a moment
     * before its exit status is known, and the waits that fail should report that status.
     */
    closeAfter: Promise<unknown> = Promise.resolve(),
  ) {
    this.log = createWriteStream(logPath, { flags: "a" });
    this.log.on("error", () => {});
    input.on("error", () => {}); // EPIPE after QEMU exited: the waits report the exit instead
    output.on("data", (b: Buffer) => this.onData(b));
    output.on("close", () => {
      const t = setTimeout(() => this.close(), 2000); // in case closeAfter never settles
      void closeAfter.finally(() => {
        clearTimeout(t);
        this.close();
      });
    });
  }

  /** Index of the next line to arrive: pass it as `from` to wait only for later output. */
  cursor(): number {
    return this.lines.length;
  }

  write(text: string): void {
    if (this.closedError) throw this.closedError;
    this.input.write(text);
  }

  /** Resolves with the index of the first line at or after `from` that matches. */
  waitFor(
    pattern: RegExp | string | ((line: string) => boolean),
    opts: { from?: number; timeoutMs?: number } = {},
  ): Promise<number> {
    const test =
      typeof pattern === "string"
        ? (l: string) => l.includes(pattern)
        : typeof pattern === "function"
          ? pattern
          : (l: string) => pattern.test(l);
    const from = opts.from ?? 0;
    for (let i = from; i < this.lines.length; i++) if (test(this.lines[i]!)) return Promise.resolve(i);
    if (this.closedError) return Promise.reject(this.closedError);
    const timeoutMs = opts.timeoutMs ?? 30_000;
    return new Promise<number>((resolve, reject) => {
      const w: LineWaiter = {
        from,
        test,
        resolve: (i) => {
          clearTimeout(t);
          resolve(i);
        },
        reject: (e) => {
          clearTimeout(t);
          reject(e);
        },
      };
      const t = setTimeout(() => {
        this.waiters.delete(w);
        reject(new ConsoleTimeoutError(String(pattern), timeoutMs, this.tail()));
      }, timeoutMs);
      this.waiters.add(w);
    });
  }

  /** Lines at or after `from` that match. */
  grep(pattern: RegExp, from = 0): string[] {
    return this.lines.slice(from).filter((l) => pattern.test(l));
  }

  /** What the guest printed after the last line break (a line not yet ended). */
  get unfinished(): string {
    return this.partial;
  }

  tail(n = 30): string {
    const t = this.lines.slice(-n);
    if (this.partial) t.push(this.partial);
    return t.map((l) => `  | ${l}`).join("\n");
  }

  close(): void {
    if (this.closedError) return;
    if (this.partial) this.pushLine(this.partial);
    this.partial = "";
    this.closedError = new Error(`console closed: ${this.whyClosed()}; console tail:\n${this.tail()}`);
    for (const w of this.waiters) w.reject(this.closedError);
    this.waiters.clear();
    this.log.end();
  }

  private onData(b: Buffer): void {
    this.log.write(b);
    const text = this.partial + b.toString("latin1");
    const parts = text.split("\n");
    this.partial = parts.pop() ?? "";
    for (const p of parts) this.splitKernel(this.cut + p.replace(/\r/g, ""));
  }

  /**
   * The kernel prints to the console whenever it likes, also into the middle of a line a guest
   * program is writing ("RIG-FLOOP n=5 sha256=ab[   14.48] clocksource: ...\ncd io=ok"): the
   * kernel's part becomes a line of its own and the program's line is joined back together.
   */
  private splitKernel(line: string): void {
    this.cut = "";
    const m = KERNEL_MID.exec(line);
    if (m && m.index > 0) {
      this.cut = line.slice(0, m.index);
      this.pushLine(line.slice(m.index));
      return;
    }
    this.pushLine(line);
  }

  private pushLine(line: string): void {
    if (this.lines.length >= MAX_LINES) return; // a runaway guest: the log file still has everything
    const index = this.lines.push(line) - 1;
    for (const w of [...this.waiters]) {
      if (index >= w.from && w.test(line)) {
        this.waiters.delete(w);
        w.resolve(index);
      }
    }
  }
}

export interface GuestResult {
  id: string;
  rc: number;
  /** The lines the script printed (kernel messages that landed in between included). */
  output: string[];
}

export class GuestCommandError extends Error {
  constructor(
    readonly result: GuestResult,
    script: string,
  ) {
    super(
      `guest command ${result.id} exited with ${result.rc}\nscript:\n${script}\noutput:\n${result.output.join("\n")}`,
    );
    this.name = "GuestCommandError";
  }
}

/** Records printed by the helpers in scripts/guest/rig.sh ("RIG-WROTE dev=/dev/vda off=1 ..."). */
export interface RigRecord {
  kind: string;
  fields: Record<string, string>;
}

export function parseRigRecords(lines: string[], kind?: string): RigRecord[] {
  const out: RigRecord[] = [];
  for (const line of lines) {
    const m = /(RIG-[A-Z-]+)((?: [a-z0-9_]+=\S*)*)/.exec(line);
    if (!m) continue;
    if (kind !== undefined && m[1] !== kind) continue;
    const fields: Record<string, string> = {};
    for (const f of (m[2] ?? "").trim().split(" ")) {
      const eq = f.indexOf("=");
      if (eq > 0) fields[f.slice(0, eq)] = f.slice(eq + 1);
    }
    out.push({ kind: m[1]!, fields });
  }
  return out;
}

let commandSeq = 0;

/** Runs scripts in the guest through the /init agent. One command at a time per console. */
export class GuestAgent {
  private queue: Promise<unknown> = Promise.resolve();

  constructor(readonly console: SerialConsole) {}

  /** Waits for the agent's "RIG-READY" line (boot finished, modules loaded). */
  async ready(timeoutMs = 60_000): Promise<void> {
    await this.console.waitFor(/RIG-READY/, { timeoutMs });
  }

  /** Runs `script` (busybox sh, rig.sh helpers available) and resolves with its exit code and output. */
  run(script: string, opts: { timeoutMs?: number } = {}): Promise<GuestResult> {
    const next = this.queue.then(() => this.runNow(script, opts.timeoutMs ?? 30_000));
    this.queue = next.catch(() => {});
    return next;
  }

  /** Like run(), but rejects with GuestCommandError unless the script exits 0. */
  async runOk(script: string, opts: { timeoutMs?: number } = {}): Promise<GuestResult> {
    const r = await this.run(script, opts);
    if (r.rc !== 0) throw new GuestCommandError(r, script);
    return r;
  }

  /** Writes `lenMiB` MiB of random data at `offMiB` (O_DIRECT + fsync); resolves with its sha256. */
  async write(dev: string, offMiB: number, lenMiB: number): Promise<string> {
    const r = await this.runOk(`rig_write ${dev} ${offMiB} ${lenMiB}`);
    return this.field(r, "RIG-WROTE", "sha256");
  }

  /** sha256 of `lenMiB` MiB at `offMiB`, read with O_DIRECT. */
  async sum(dev: string, offMiB: number, lenMiB: number): Promise<string> {
    const r = await this.runOk(`rig_sum ${dev} ${offMiB} ${lenMiB}`);
    return this.field(r, "RIG-SUM", "sha256");
  }

  private field(r: GuestResult, kind: string, name: string): string {
    const rec = parseRigRecords(r.output, kind)[0];
    const v = rec?.fields[name];
    if (v === undefined) throw new Error(`guest: no ${kind} ${name}= in output:\n${r.output.join("\n")}`);
    return v;
  }

  private async runNow(script: string, timeoutMs: number): Promise<GuestResult> {
    const id = `c${process.pid}-${++commandSeq}`;
    const from = this.console.cursor();
    const b64 = Buffer.from(script.endsWith("\n") ? script : script + "\n", "utf8").toString("base64");
    const lines = b64.match(/.{1,76}/g) ?? [];
    this.console.write(`RIGCMD ${id}\n${lines.join("\n")}\n.\n`);
    const endRe = new RegExp(`RIG-END ${id} rc=(\\d+)`);
    let end: number;
    try {
      end = await this.console.waitFor(endRe, { from, timeoutMs });
    } catch (e) {
      throw new Error(`guest command ${id} did not finish: ${(e as Error).message}\nscript:\n${script}`);
    }
    const begin = this.console.lines.findIndex((l, i) => i >= from && l.includes(`RIG-BEGIN ${id}`));
    const endLine = this.console.lines[end]!;
    const rc = Number(endRe.exec(endLine)?.[1] ?? "255");
    // Output before the END marker on the same line (no trailing newline from the script) counts too.
    const lastPart = endLine.slice(0, endLine.indexOf(`RIG-END ${id}`));
    // The guest kernel prints to the same console ("[    1.974620] tsc: ..."), at any time: such a
    // line between the markers is not the command's output (no command here runs dmesg).
    const output = this.console.lines.slice(begin < 0 ? from : begin + 1, end).filter((l) => !KERNEL_LINE.test(l));
    if (lastPart.trim()) output.push(lastPart);
    return { id, rc, output };
  }
}

/**
 * A wait condition for a guest loop's progress: its record with a count of at least `n`
 * ("RIG-LOOP n=12 ..."). At least, not exactly: one record may be lost to a console that
 * cannot be read whole, and progress past it is still progress.
 */
export function loopReached(kind: "RIG-LOOP" | "RIG-FLOOP", n: number): (line: string) => boolean {
  const re = new RegExp(`${kind} n=(\\d+) `);
  return (line) => {
    const m = re.exec(line);
    return m !== null && Number(m[1]) >= n;
  };
}

/**
 * The lines of a guest that printed on `src` and then went on on `dst` (a migration): a line the
 * guest had begun on the source when it stopped ends on the destination, so the source's
 * unfinished text is joined to the destination's first line instead of both being cut.
 */
export function linesAcrossMigration(src: SerialConsole, dst: SerialConsole): string[] {
  const tail = src.unfinished;
  if (!tail) return [...src.lines, ...dst.lines];
  const [first = "", ...rest] = dst.lines;
  return [...src.lines, tail + first, ...rest];
}
