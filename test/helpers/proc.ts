/**
 * Test helpers that look at the process from the kernel's side: open fds, mappings, and a
 * real garbage collection (mappings are munmapped only when V8 collects their last view).
 */
import { type ChildProcess, type StdioOptions, spawn } from "node:child_process";
import { readdirSync, readFileSync } from "node:fs";
import { setFlagsFromString } from "node:v8";
import { runInNewContext } from "node:vm";
import { liveMappings } from "../../src/sys/mapping.js";

/** Open fds of this process (the readdir's own fd included, consistently before and after). */
export function countFds(): number {
  return readdirSync("/proc/self/fd").length;
}

/** /proc/self/maps: one line per VMA. */
export function mapsLines(): string[] {
  return readFileSync("/proc/self/maps", "utf8")
    .split("\n")
    .filter((l) => l.length > 0);
}

export function countMaps(): number {
  return mapsLines().length;
}

/** /proc/self/maps lines whose path contains `name` (a memfd shows as "/memfd:NAME (deleted)"). */
export function mapsLinesMatching(name: string): string[] {
  return readFileSync("/proc/self/maps", "utf8")
    .split("\n")
    .filter((l) => l.includes(name));
}

setFlagsFromString("--expose-gc");
const gcFn = runInNewContext("gc") as (options?: unknown) => void;

export function gc(): void {
  gcFn();
}

const tick = () => new Promise<void>((r) => setImmediate(r));
const sleep = (ms: number) => new Promise<void>((r) => setTimeout(r, ms));

/**
 * Collects until liveMappings() reaches `target` (or stops changing). The deleter runs on a V8
 * background thread after the sweeper frees the buffers, so it takes a few GC + yield rounds.
 */
export async function collectUntil(target: number, rounds = 50): Promise<number> {
  let n = liveMappings();
  for (let i = 0; i < rounds && n > target; i++) {
    gc();
    await tick();
    await sleep(i < 5 ? 1 : 10);
    n = liveMappings();
  }
  return n;
}

export interface ChildResult {
  code: number | null;
  signal: NodeJS.Signals | null;
  stdout: string;
  stderr: string;
}

/**
 * Runs a compiled ESM file in a new node process. `extraFds` become fds 3, 4, ... in the
 * child (dup2 clears close-on-exec, so the child inherits exactly these).
 */
export function spawnNode(
  script: URL,
  args: string[] = [],
  extraFds: number[] = [],
): { child: ChildProcess; done: Promise<ChildResult> } {
  const stdio: StdioOptions = ["ignore", "pipe", "pipe", ...extraFds];
  const child = spawn(process.execPath, [script.pathname, ...args], { stdio });
  let stdout = "";
  let stderr = "";
  child.stdout?.setEncoding("utf8").on("data", (d: string) => {
    stdout += d;
  });
  child.stderr?.setEncoding("utf8").on("data", (d: string) => {
    stderr += d;
  });
  const done = new Promise<ChildResult>((resolve, reject) => {
    child.on("error", reject);
    child.on("close", (code, signal) => resolve({ code, signal, stdout, stderr }));
  });
  return { child, done };
}

interface Vma {
  start: bigint;
  end: bigint;
}

function parseVma(line: string): Vma {
  const range = line.slice(0, line.indexOf(" "));
  const [s, e] = range.split("-") as [string, string];
  return { start: BigInt(`0x${s}`), end: BigInt(`0x${e}`) };
}

/**
 * The number of VMAs in `after`, counting a VMA of `before` that has since been split into
 * several pieces (all inside it) as one. Splits inside an existing reservation are V8 and
 * glibc committing memory they reserved earlier (JIT code pages in the code range, a malloc
 * arena growing); they are not new mappings. A mapping the code under test leaked can never
 * lie inside a VMA that existed before it was made (mmap without MAP_FIXED never overlays),
 * so it always adds at least one to this count, even when several leaked ranges merge.
 */
export function mapsCountRelativeTo(before: readonly string[], after: readonly string[]): number {
  const b = before.map(parseVma);
  const a = after.map(parseVma);
  const hit = new Set<number>();
  let outside = 0;
  for (const v of a) {
    const i = b.findIndex((w) => v.start >= w.start && v.end <= w.end);
    if (i < 0) outside++;
    else hit.add(i);
  }
  return hit.size + outside;
}
