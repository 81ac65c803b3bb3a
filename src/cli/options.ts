/**
 * One option discipline for every `vmshift` command: typed, validated options declared once
 * (the usage text is written beside them), `--help`/`-h`, the logging options every command
 * takes, and one error type for bad input. A command never sees an unchecked string: an
 * integer option is an integer in its range, an enum is one of its values, or the command
 * does not run (exit 2, one line on stderr, no stack trace).
 */
import { parseArgs } from "node:util";

/** Bad command-line input: the process exits 2 with this one line. */
export class UsageError extends Error {
  override readonly name = "UsageError";
  readonly code = "USAGE";
}

interface Common {
  /** One-letter alias (`-h`). */
  short?: string;
}
export interface BooleanOption extends Common {
  type: "boolean";
}
export interface StringOption extends Common {
  type: "string";
  default?: string;
  /** Rejects an empty value unless set. */
  allowEmpty?: boolean;
}
export interface EnumOption<V extends string = string> extends Common {
  type: "enum";
  values: readonly V[];
  default?: V;
}
export interface NumberOption extends Common {
  /** integer: whole numbers only. */
  type: "integer" | "number";
  default?: number;
  min?: number;
  max?: number;
  /** What the number counts, for messages: "MiB", "ms". */
  unit?: string;
}
export type OptionSpec = BooleanOption | StringOption | EnumOption | NumberOption;
export type OptionSpecs = Record<string, OptionSpec>;

type ValueOf<S extends OptionSpec> = S extends BooleanOption
  ? boolean
  : S extends EnumOption<infer V>
    ? S extends { default: string }
      ? V
      : V | undefined
    : S extends NumberOption
      ? S extends { default: number }
        ? number
        : number | undefined
      : S extends { default: string }
        ? string
        : string | undefined;

/** `--dirty-rate` → `dirtyRate`. */
type Camel<K extends string> = K extends `${infer A}-${infer B}` ? `${A}${Capitalize<Camel<B>>}` : K;

export type OptionValues<S extends OptionSpecs> = { -readonly [K in keyof S & string as Camel<K>]: ValueOf<S[K]> };

export interface Parsed<S extends OptionSpecs> {
  values: OptionValues<S>;
  positionals: string[];
}

/** Options every command accepts (help and logging). */
export const COMMON_OPTIONS = {
  help: { type: "boolean", short: "h" },
  "log-level": { type: "enum", values: ["trace", "debug", "info", "warn", "error", "silent"], default: "info" },
  "log-format": { type: "enum", values: ["text", "json"], default: "text" },
} as const satisfies OptionSpecs;

export const COMMON_USAGE = `  -h, --help             this text
  --log-level LEVEL      trace|debug|info|warn|error|silent (default info); logs go to stderr
  --log-format text|json text (default) or one JSON object per line, both with timestamps`;

const camel = (k: string) => k.replace(/-([a-z])/g, (_, c: string) => c.toUpperCase());

function checkNumber(name: string, spec: NumberOption, raw: string): number {
  const unit = spec.unit ? ` (${spec.unit})` : "";
  const range =
    spec.min !== undefined && spec.max !== undefined
      ? ` ${spec.min}..${spec.max}`
      : spec.min !== undefined
        ? ` >= ${spec.min}`
        : spec.max !== undefined
          ? ` <= ${spec.max}`
          : "";
  const what = `${spec.type === "integer" ? "an integer" : "a number"}${range}${unit}`;
  const n = raw.trim() === "" ? Number.NaN : Number(raw);
  if (!Number.isFinite(n) || (spec.type === "integer" && !Number.isInteger(n)))
    throw new UsageError(`--${name} must be ${what}, got '${raw}'`);
  if ((spec.min !== undefined && n < spec.min) || (spec.max !== undefined && n > spec.max))
    throw new UsageError(`--${name} must be ${what}, got ${raw}`);
  return n;
}

/**
 * Parses and validates `argv` against `specs` (plus COMMON_OPTIONS). Throws UsageError for an
 * unknown option, a missing value, a value of the wrong type or out of range. `--help` is
 * returned as `values.help`; the caller prints its usage and exits 0.
 */
export function parseOptions<const S extends OptionSpecs>(
  argv: readonly string[],
  specs: S,
  opts: { positionals?: number } = {},
): Parsed<S & typeof COMMON_OPTIONS> {
  const all: OptionSpecs = { ...COMMON_OPTIONS, ...specs };
  const nodeSpecs: Record<string, { type: "string" | "boolean"; short?: string }> = {};
  for (const [k, s] of Object.entries(all))
    nodeSpecs[k] = { type: s.type === "boolean" ? "boolean" : "string", ...(s.short ? { short: s.short } : {}) };
  // A negative number is a value, not an option: `--rate -1` reaches the range check.
  const args: string[] = [];
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i] as string;
    const next = argv[i + 1];
    const spec = a.startsWith("--") ? all[a.slice(2)] : undefined;
    if (spec && spec.type !== "boolean" && next !== undefined && /^-\d/.test(next)) {
      args.push(`${a}=${next}`);
      i++;
    } else args.push(a);
  }
  let parsed: ReturnType<typeof parseArgs>;
  try {
    parsed = parseArgs({ args, options: nodeSpecs, allowPositionals: true, strict: true });
  } catch (e) {
    // node:util's messages are multi-line and mention "parseArgs": say it our way.
    const m = (e as Error).message;
    const unknown = /Unknown option '([^']+)'/.exec(m);
    if (unknown) throw new UsageError(`unknown option ${unknown[1]}`);
    const arg = /Option '(?:-\w, )?(--[\w-]+)[^']*' argument missing/.exec(m);
    if (arg) throw new UsageError(`${arg[1]} needs a value`);
    const ambiguous = /Option '(?:-\w, )?(--[\w-]+)' argument is ambiguous/.exec(m);
    if (ambiguous)
      throw new UsageError(`${ambiguous[1]} needs a value (write ${ambiguous[1]}=VALUE for one starting with -)`);
    const noArg = /Option '(?:-\w, )?(--[\w-]+)' does not take an argument/.exec(m);
    if (noArg) throw new UsageError(`${noArg[1]} takes no value`);
    throw new UsageError(m.split("\n")[0] ?? m);
  }
  const raw = parsed.values as Record<string, string | boolean | undefined>;
  const values: Record<string, unknown> = {};
  // --help wins over everything else: `vmshift migrate --size abc --help` prints the usage.
  if (raw.help === true) {
    values.help = true;
    return { values: values as OptionValues<S & typeof COMMON_OPTIONS>, positionals: parsed.positionals };
  }
  for (const [name, spec] of Object.entries(all)) {
    const v = raw[name];
    const key = camel(name);
    switch (spec.type) {
      case "boolean":
        values[key] = v === true;
        break;
      case "string":
        if (v === undefined) values[key] = spec.default;
        else if (v === "" && !spec.allowEmpty) throw new UsageError(`--${name} must not be empty`);
        else values[key] = v;
        break;
      case "enum":
        if (v === undefined) values[key] = spec.default;
        else if (!spec.values.includes(v as string))
          throw new UsageError(
            `--${name} must be ${spec.values.join(", ").replace(/, ([^,]*)$/, " or $1")}, got '${v}'`,
          );
        else values[key] = v;
        break;
      default:
        values[key] = v === undefined ? spec.default : checkNumber(name, spec, v as string);
    }
  }
  const max = opts.positionals ?? 0;
  if (parsed.positionals.length > max)
    throw new UsageError(`unexpected argument '${parsed.positionals[max] as string}'`);
  return { values: values as OptionValues<S & typeof COMMON_OPTIONS>, positionals: parsed.positionals };
}

/** A value that must be there: UsageError naming the option otherwise. */
export function required<T>(v: T | undefined, name: string, what = "VALUE"): T {
  if (v === undefined || v === "") throw new UsageError(`--${name} ${what} is required`);
  return v;
}

/** Exactly one of these options (by name → value). */
export function exactlyOne(given: Record<string, unknown>): string {
  const set = Object.entries(given).filter(([, v]) => v !== undefined && v !== false);
  const names = Object.keys(given).map((k) => `--${k}`);
  if (set.length !== 1) throw new UsageError(`give exactly one of ${names.join(", ").replace(/, ([^,]*)$/, " or $1")}`);
  return (set[0] as [string, unknown])[0];
}
