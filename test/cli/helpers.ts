/** Runs `vmshift` (dist/src/cli/main.js) as a child process, as an operator would. */
import { type ChildProcess, spawn } from "node:child_process";
import { readFileSync } from "node:fs";
import { createInterface } from "node:readline";
import { fileURLToPath } from "node:url";
import { Ajv2020 } from "ajv/dist/2020.js";

export const MAIN = fileURLToPath(new URL("../../src/cli/main.js", import.meta.url));
export const REPO = fileURLToPath(new URL("../../../", import.meta.url));

export interface Finished {
  code: number | null;
  signal: NodeJS.Signals | null;
  stdout: string;
  stderr: string;
}

/** Runs to the end; SIGKILLs it (and rejects) past `timeoutMs`. */
export function runCli(args: string[], timeoutMs = 60_000, env: NodeJS.ProcessEnv = {}): Promise<Finished> {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, [MAIN, ...args], {
      stdio: ["ignore", "pipe", "pipe"],
      env: { ...process.env, ...env },
    });
    let stdout = "";
    let stderr = "";
    child.stdout.on("data", (d: Buffer) => {
      stdout += d.toString();
    });
    child.stderr.on("data", (d: Buffer) => {
      stderr += d.toString();
    });
    const timer = setTimeout(() => {
      child.kill("SIGKILL");
      reject(new Error(`vmshift ${args.join(" ")} did not finish in ${timeoutMs} ms: ${stderr}`));
    }, timeoutMs);
    child.once("exit", (code, signal) => {
      clearTimeout(timer);
      resolve({ code, signal, stdout, stderr });
    });
  });
}

/** A running `vmshift ... --json`: its events as they come, and a way to wait for one. */
export class CliProcess {
  readonly child: ChildProcess;
  readonly events: Record<string, unknown>[] = [];
  readonly lines: string[] = [];
  stderr = "";
  readonly exited: Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
  readonly #waiters: {
    pred: (e: Record<string, unknown>) => boolean;
    resolve: (e: Record<string, unknown>) => void;
  }[] = [];

  constructor(args: string[]) {
    this.child = spawn(process.execPath, [MAIN, ...args], { stdio: ["ignore", "pipe", "pipe"] });
    this.exited = new Promise((r) => this.child.once("exit", (code, signal) => r({ code, signal })));
    this.child.stderr?.on("data", (d: Buffer) => {
      this.stderr += d.toString();
    });
    createInterface({ input: this.child.stdout as NodeJS.ReadableStream }).on("line", (l) => {
      this.lines.push(l);
      let e: Record<string, unknown>;
      try {
        e = JSON.parse(l) as Record<string, unknown>;
      } catch {
        return;
      }
      this.events.push(e);
      for (const w of [...this.#waiters])
        if (w.pred(e)) {
          this.#waiters.splice(this.#waiters.indexOf(w), 1);
          w.resolve(e);
        }
    });
  }

  /** The first event matching `pred`, past or future; rejects if the process exits first. */
  next(pred: (e: Record<string, unknown>) => boolean, what: string): Promise<Record<string, unknown>> {
    const seen = this.events.find(pred);
    if (seen) return Promise.resolve(seen);
    return Promise.race([
      new Promise<Record<string, unknown>>((resolve) => this.#waiters.push({ pred, resolve })),
      this.exited.then(() => {
        const e = this.events.find(pred);
        if (e) return e;
        throw new Error(`vmshift exited before ${what}: ${this.stderr.slice(-1500)}`);
      }),
    ]);
  }

  async kill(): Promise<void> {
    if (this.child.exitCode === null && this.child.signalCode === null) {
      this.child.kill("SIGKILL");
      await this.exited;
    }
  }
}

/** Validates one event against docs/events.schema.json; returns the errors (empty: valid). */
export function eventValidator(): (e: unknown) => string[] {
  const schema = JSON.parse(readFileSync(`${REPO}docs/events.schema.json`, "utf8")) as object;
  const ajv = new Ajv2020({ allErrors: true, strict: false });
  const validate = ajv.compile(schema);
  return (e) => (validate(e) ? [] : (validate.errors ?? []).map((x) => `${x.instancePath} ${x.message}`));
}

/** No stack trace: no "    at " frame lines, no "Error:" dump of an uncaught exception. */
export function assertNoStack(stderr: string): string | null {
  if (/^\s+at .+[:(]/m.test(stderr)) return "a stack trace";
  if (/node:internal|Uncaught|triggerUncaughtException/.test(stderr)) return "an uncaught exception";
  return null;
}
