/**
 * The CLI's logger: pino, to stderr, with levels, ISO timestamps and two formats: `text`
 * (one readable line: time, level, command, message, then any fields as key=value) and `json`
 * (pino's own line). Library code never writes to stderr: it emits events, and the command
 * that owns it logs them here.
 */
import { pino } from "pino";

export type LogLevel = "trace" | "debug" | "info" | "warn" | "error" | "silent";
export type LogFormat = "text" | "json";
export type Logger = pino.Logger;

export interface LoggerOptions {
  /** The command ("blk", "migrate"): every line carries it. */
  name: string;
  level?: LogLevel;
  format?: LogFormat;
  /** Where lines go (default: fd 2, synchronously, so nothing is lost at exit). */
  write?: (line: string) => void;
}

const LEVEL_NAMES: Record<number, string> = {
  10: "TRACE",
  20: "DEBUG",
  30: "INFO",
  40: "WARN",
  50: "ERROR",
  60: "FATAL",
};
const OMIT = new Set(["level", "time", "name", "msg", "pid", "hostname"]);

/** A pino JSON line as one line of text: `2026-01-01T00:00:00.000Z INFO  blk: message k=v`. */
export function textLine(json: string): string {
  let o: Record<string, unknown>;
  try {
    o = JSON.parse(json) as Record<string, unknown>;
  } catch {
    return json;
  }
  const level = (LEVEL_NAMES[o.level as number] ?? String(o.level)).padEnd(5);
  const fields = Object.entries(o)
    .filter(([k]) => !OMIT.has(k))
    .map(([k, v]) => `${k}=${typeof v === "string" && !/\s|"/.test(v) ? v : JSON.stringify(v)}`)
    .join(" ");
  return `${String(o.time)} ${level} ${String(o.name)}: ${String(o.msg ?? "")}${fields ? ` ${fields}` : ""}\n`;
}

export function createLogger(o: LoggerOptions): Logger {
  const write =
    o.write ??
    ((l: string) => {
      try {
        process.stderr.write(l);
      } catch {
        // stderr gone (EPIPE): nowhere left to say it
      }
    });
  const format = o.format ?? "text";
  const destination = { write: (line: string) => write(format === "json" ? line : textLine(line)) };
  return pino(
    {
      name: o.name,
      level: o.level ?? "info",
      base: undefined,
      timestamp: pino.stdTimeFunctions.isoTime,
    },
    destination,
  );
}
