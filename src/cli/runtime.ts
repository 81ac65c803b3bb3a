/**
 * What every `vmshift` command runs inside: stdout that survives its reader going away
 * (`vmshift probe | head`), a cancel signal that SIGINT/SIGTERM fire (the command reports a
 * `cancelled` event and exits 130), a progress line that is redrawn only on a terminal, a
 * logger, and one rule for exit codes: 0 done, 1 failed, 2 bad usage, 130 cancelled.
 */
import { createLogger, type LogFormat, type Logger, type LogLevel } from "./log.js";
import type { COMMON_OPTIONS } from "./options.js";
import { COMMON_USAGE, type OptionSpecs, type OptionValues, parseOptions, UsageError } from "./options.js";
import { safeJson } from "./printable.js";

export const EXIT_OK = 0;
export const EXIT_FAILED = 1;
export const EXIT_USAGE = 2;
export const EXIT_CANCELLED = 130;

/** The reason a cancelled command's signal carries. */
export class CancelledError extends Error {
  override readonly name = "CancelledError";
  readonly code = "CANCELLED";
  constructor(readonly signalName: string) {
    super(`cancelled by ${signalName}`);
  }
}

export interface CommandContext {
  /** "migrate", "blk" ... */
  readonly name: string;
  /** Aborted (with a CancelledError) on SIGINT or SIGTERM. */
  readonly signal: AbortSignal;
  readonly log: Logger;
  /** One line to stdout; dropped once stdout's reader is gone. */
  out(line: string): void;
  /** One JSON object as a line to stdout. */
  json(o: unknown): void;
  /** A progress line: redrawn in place on a terminal, nothing otherwise. */
  readonly progress: ProgressLine;
}

/** A progress line on a terminal; a no-op elsewhere (no `\r` in logs and pipes). */
export class ProgressLine {
  readonly #write: (s: string) => void;
  readonly enabled: boolean;
  #shown = false;

  constructor(stream: { isTTY?: boolean; write(s: string): unknown }, enabled = stream.isTTY === true) {
    this.enabled = enabled;
    this.#write = (s) => {
      try {
        stream.write(s);
      } catch {
        // a closed terminal: nothing to redraw
      }
    };
  }

  update(line: string): void {
    if (!this.enabled) return;
    this.#write(`\r\x1b[2K${line}`);
    this.#shown = true;
  }

  /** Leaves the last line standing (ends it with a newline). */
  done(): void {
    if (this.enabled && this.#shown) this.#write("\n");
    this.#shown = false;
  }
}

let stdoutGuard: { write(s: string): void; readonly closed: boolean } | null = null;

/** stdout that turns EPIPE (the reader left) into "stop writing", not a crash. One per process. */
export function guardedStdout(): { write(s: string): void; readonly closed: boolean } {
  stdoutGuard ??= makeGuardedStdout();
  return stdoutGuard;
}

function makeGuardedStdout(): { write(s: string): void; readonly closed: boolean } {
  let closed = false;
  const onError = (e: NodeJS.ErrnoException) => {
    if (e.code === "EPIPE" || e.code === "ERR_STREAM_DESTROYED") closed = true;
    else throw e;
  };
  process.stdout.on("error", onError);
  process.stderr.on("error", () => undefined);
  return {
    write(s) {
      if (closed) return;
      try {
        process.stdout.write(s);
      } catch (e) {
        onError(e as NodeJS.ErrnoException);
      }
    },
    get closed() {
      return closed;
    },
  };
}

export interface RunOptions {
  name: string;
  /** Parsed before the command runs; undefined: defaults. */
  logLevel?: LogLevel;
  logFormat?: LogFormat;
}

/**
 * Runs `fn` with a context and turns its outcome into an exit code: UsageError → 2 (one line),
 * CancelledError (or a return after cancel) → 130, any other error → 1 (one line; the stack
 * only at --log-level debug or trace).
 */
export async function runCommand(o: RunOptions, fn: (ctx: CommandContext) => Promise<number>): Promise<number> {
  const stdout = guardedStdout();
  const log = createLogger({ name: o.name, level: o.logLevel ?? "info", format: o.logFormat ?? "text" });
  const ac = new AbortController();
  let signals = 0;
  const onSignal = (sig: NodeJS.Signals) => {
    signals++;
    // A second Ctrl-C means "now": the command had its chance to clean up.
    if (signals > 1) process.exit(EXIT_CANCELLED);
    log.debug(`${sig}: cancelling`);
    ac.abort(new CancelledError(sig));
  };
  process.on("SIGINT", onSignal);
  process.on("SIGTERM", onSignal);
  const ctx: CommandContext = {
    name: o.name,
    signal: ac.signal,
    log,
    out: (l) => stdout.write(`${l}\n`),
    // Peer text may ride in an event (a FAIL message): bounded, terminal controls escaped.
    json: (v) => stdout.write(`${safeJson(v)}\n`),
    progress: new ProgressLine(process.stderr),
  };
  try {
    return await fn(ctx);
  } catch (e) {
    return exitCodeFor(o.name, e, log, ac.signal);
  } finally {
    process.off("SIGINT", onSignal);
    process.off("SIGTERM", onSignal);
  }
}

/** The exit code (and the one line) for an error that reached the top of a command. */
export function exitCodeFor(name: string, e: unknown, log: Logger, signal?: AbortSignal): number {
  if (e instanceof UsageError) {
    usageLine(name, e.message);
    return EXIT_USAGE;
  }
  if (e instanceof CancelledError || signal?.aborted) return EXIT_CANCELLED;
  const err = e as { code?: unknown; message?: unknown; stack?: unknown };
  log.error({ ...(typeof err?.code === "string" ? { code: err.code } : {}) }, String(err?.message ?? e));
  log.debug({ stack: String(err?.stack ?? "") }, "stack");
  return EXIT_FAILED;
}

/** `vmshift NAME: MESSAGE (see vmshift NAME --help)` on stderr: one line. */
export function usageLine(name: string, message: string): void {
  const cmd = name ? `vmshift ${name}` : "vmshift";
  try {
    process.stderr.write(`${cmd}: ${message} (see '${cmd} --help')\n`);
  } catch {
    // stderr gone
  }
}

export interface CommandDef<S extends OptionSpecs> {
  name: string;
  /** The usage text without the common options (they are appended). */
  usage: string;
  options: S;
  /** Positional arguments allowed (default 0). */
  positionals?: number;
  run(values: OptionValues<S & typeof COMMON_OPTIONS>, ctx: CommandContext, positionals: string[]): Promise<number>;
}

/** The full usage text of a command. */
export function usageOf(def: { usage: string }): string {
  return `${def.usage.trimEnd()}\ncommon options:\n${COMMON_USAGE}\n`;
}

/**
 * A command as `(argv) => exit code`: options parsed and validated first (a bad one: exit 2,
 * one line), `--help`/`-h` prints the usage on stdout and exits 0, then `run` inside
 * runCommand.
 */
export function defineCommand<const S extends OptionSpecs>(def: CommandDef<S>): (argv: string[]) => Promise<number> {
  return async (argv) => {
    let parsed: ReturnType<typeof parseOptions<S>>;
    try {
      parsed = parseOptions(argv, def.options, { positionals: def.positionals ?? 0 });
    } catch (e) {
      if (!(e instanceof UsageError)) throw e;
      usageLine(def.name, e.message);
      return EXIT_USAGE;
    }
    const v = parsed.values;
    if (v.help) {
      guardedStdout().write(usageOf(def));
      return EXIT_OK;
    }
    return runCommand({ name: def.name, logLevel: v.logLevel, logFormat: v.logFormat }, (ctx) =>
      def.run(v, ctx, parsed.positionals),
    );
  };
}
