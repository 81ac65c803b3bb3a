/**
 * The addon's surface, typed. This is the only module that loads `native/` (a lint rule keeps
 * every other module out of it); everything else goes through the owners and wrappers in this
 * folder. The addon is a Node-API module: one binary serves every supported Node line, and every
 * thread that loads it (main or worker) gets its own instance.
 *
 * Loading is lazy: nothing is loaded until the first call, so `vmshift --help`, `--version` and
 * `blk --print-capabilities` run where the addon cannot load. After the first call `native`'s
 * properties are the addon's own functions (no indirection on the hot paths).
 *
 * Where the binary comes from, first that loads wins:
 *  1. prebuilds/linux-x64/vmshift.napi.node, shipped inside the npm package (built by `npm pack`);
 *  2. native/build/Release/vmshift.node, a source build (`npm run build`, or the package's
 *     install step when no prebuild fits this machine).
 * VMSHIFT_NATIVE_PATH replaces both (see addonCandidates).
 */

import { existsSync } from "node:fs";
import { createRequire } from "node:module";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

export type View = ArrayBufferView | ArrayBuffer | SharedArrayBuffer;
export type U64 = number | bigint;

export interface NativeWatch {
  stop(): void;
  ref(on: boolean): void;
  update(events: number): void;
}

export interface Native {
  memfdCreate(name: string, flags: number): number;
  open(path: string, flags: number, mode: number): number;
  close(fd: number): void;
  dup(fd: number): number;
  fcntl(fd: number, cmd: number, arg: number): number;
  ftruncate(fd: number, size: U64): void;
  fallocate(fd: number, mode: number, offset: U64, length: U64): void;
  fstat(fd: number): [size: number, mode: number, blksize: number];
  mmap(fd: number, length: U64, offset: U64, prot: number, flags: number, windowSize: number): SharedArrayBuffer[];
  retire(firstWindow: SharedArrayBuffer): void;
  liveMappings(): number;
  addressOf(view: View): bigint;
  madvise(view: View, advice: number): void;
  mincore(view: View, out: Uint8Array): void;
  read(fd: number, view: View): number;
  write(fd: number, view: View): number;
  pread(fd: number, view: View, position: U64): number;
  pwrite(fd: number, view: View, position: U64): number;
  /** One system call over up to 1024 views; bytes or -errno. */
  preadv(fd: number, views: readonly ArrayBufferView[], position: U64): number;
  pwritev(fd: number, views: readonly ArrayBufferView[], position: U64): number;
  fdatasync(fd: number): number;
  ioctl(fd: number, request: number, arg?: View | U64): number;
  eventfd(initval: number, flags: number): number;
  userfaultfd(flags: number): number;
  unixListen(path: string, backlog: number): number;
  unixConnect(path: string): number;
  accept(fd: number): number;
  socketpair(): [number, number];
  shutdown(fd: number, how: number): void;
  setsockopt(fd: number, level: number, name: number, value: number): void;
  sendmsg(fd: number, view: View, fds: readonly number[] | null): number;
  /** -errno, or [bytes, truncated, ...fds] */
  recvmsg(fd: number, view: View): number | number[];
  watch(fd: number, events: number, cb: (status: number, events: number) => void): NativeWatch;
  copyPages(
    dst: View,
    dstIndex: Uint32Array | null,
    src: View,
    srcIndex: Uint32Array | null,
    count: number,
    pageSize: number,
  ): void;
  scanClear(bitmap: Uint32Array, out: Uint32Array, startWord: number): [found: number, nextWord: number];
  isZero(view: View): boolean;
  /** Copies all of `src` to the start of `dst` (memmove); returns the byte count. */
  memcpy(dst: View, src: View): number;
  /** XXH64 (seed 0) of `count` pages (index list or consecutive), two u32 words (low, high) per page in `out`. */
  hashPages(src: View, srcIndex: Uint32Array | null, count: number, pageSize: number, out: Uint32Array): void;
  // postcopy.cc: the fault path's native threads (see src/sys/postcopy-thread.ts)
  faultThreadCreate(sock: number, notify: number, regions: Float64Array, streamOffset: number): number;
  faultThreadRegion(
    id: number,
    region: number,
    present: Uint8Array,
    waiting: Uint8Array,
    discard: Uint8Array | null,
    blockSize: number,
  ): void;
  faultThreadAddDomain(id: number, uffd: number, ranges: Float64Array): void;
  faultThreadStart(id: number): void;
  faultThreadStatus(id: number, out: Float64Array): [state: number, code: string, message: string];
  faultThreadTakeLatencies(id: number): Float64Array;
  faultThreadDomainStats(id: number, domain: number, out: Float64Array): void;
  faultThreadStop(
    id: number,
  ): [pending: Float64Array, domainStats: Float64Array, stats: Float64Array, latencies: Float64Array];
  requestServerCreate(sock: number, notify: number, streamOffset: number): number;
  requestServerRegion(
    id: number,
    memory: View,
    sent: Uint8Array,
    discard: Uint8Array | null,
    blockSize: number,
    absentIsZero: boolean,
  ): void;
  requestServerStart(id: number): void;
  requestServerQueue(id: number, region: number, page: number): void;
  requestServerFinish(id: number): void;
  requestServerStatus(id: number, out: Float64Array): [state: number, code: string, message: string];
  requestServerStop(id: number): void;
  // blkio.cc: block I/O between a file and guest memory (see src/sys/guest-io.ts)
  guestIoTable(windows: readonly SharedArrayBuffer[]): object;
  guestIoRun(table: object, fd: number, write: boolean, position: U64, segments: Uint32Array, count: number): number;
  guestIoPool(threads: number): [pool: object, eventfd: number];
  guestIoSubmit(
    pool: object,
    table: object,
    fd: number,
    flags: number,
    position: U64,
    segments: Uint32Array,
    count: number,
    tag: number,
  ): number;
  guestIoHarvest(pool: object, out: Float64Array): number;
  guestIoPoolClose(pool: object): void;
  recvThreadCreate(
    sock: number,
    notify: number,
    ring: SharedArrayBuffer,
    meta: Float64Array,
    ctl: Int32Array,
    hashes: Uint32Array,
    prefix: Uint8Array,
    config: Float64Array,
  ): number;
  recvThreadRelease(id: number): void;
  recvThreadTakeBig(id: number, slot: number, dst: Uint8Array): number;
  recvThreadStatus(id: number): [what: string, at: number, had: number, needed: number, errno: number];
  recvThreadStop(id: number): void;
  crc32(data: View, seed: number): number;
}

/** Every function the addon must export (checked once at load). */
const FUNCTIONS = [
  "memfdCreate",
  "open",
  "close",
  "dup",
  "fcntl",
  "ftruncate",
  "fallocate",
  "fstat",
  "mmap",
  "retire",
  "liveMappings",
  "addressOf",
  "madvise",
  "mincore",
  "read",
  "write",
  "pread",
  "pwrite",
  "preadv",
  "pwritev",
  "fdatasync",
  "ioctl",
  "eventfd",
  "userfaultfd",
  "unixListen",
  "unixConnect",
  "accept",
  "socketpair",
  "shutdown",
  "setsockopt",
  "sendmsg",
  "recvmsg",
  "watch",
  "copyPages",
  "scanClear",
  "isZero",
  "memcpy",
  "hashPages",
  "faultThreadCreate",
  "faultThreadRegion",
  "faultThreadAddDomain",
  "faultThreadStart",
  "faultThreadStatus",
  "faultThreadTakeLatencies",
  "faultThreadDomainStats",
  "faultThreadStop",
  "requestServerCreate",
  "requestServerRegion",
  "requestServerStart",
  "requestServerQueue",
  "requestServerFinish",
  "requestServerStatus",
  "requestServerStop",
  "guestIoTable",
  "guestIoRun",
  "guestIoPool",
  "guestIoSubmit",
  "guestIoHarvest",
  "guestIoPoolClose",
  "recvThreadCreate",
  "recvThreadRelease",
  "recvThreadTakeBig",
  "recvThreadStatus",
  "recvThreadStop",
  "crc32",
] as const satisfies readonly (keyof Native)[];

// Compile-time check that FUNCTIONS lists every member of Native.
type Missing = Exclude<keyof Native, (typeof FUNCTIONS)[number]>;
const complete: Missing extends never ? true : Missing = true;
void complete;

/** The prebuilt binary's place inside the package, for this platform. */
export const PREBUILD = join("prebuilds", `${process.platform}-${process.arch}`, "vmshift.napi.node");
const BUILD = join("native", "build", "Release", "vmshift.node");

/** The addon could not be loaded (no binary for this machine, or a Node line without the Node-API it needs). */
export class NativeLoadError extends Error {
  override readonly name = "NativeLoadError";
}

/** The package root: the nearest directory above this module with a package.json. */
function packageRoot(): string {
  let dir = dirname(fileURLToPath(import.meta.url));
  for (let i = 0; i < 6; i++) {
    if (existsSync(join(dir, "package.json"))) return dir;
    dir = dirname(dir);
  }
  throw new NativeLoadError(`vmshift: no package.json above ${fileURLToPath(import.meta.url)}`);
}

/** Finds native/build/Release (a source build) from both src/ (a loader) and dist/src/ (compiled). */
export function nativeBuildDir(): string {
  const dir = join(packageRoot(), "native", "build", "Release");
  if (existsSync(join(dir, "vmshift.node"))) return dir;
  throw new NativeLoadError("vmshift native addon not built: run `npm run build` (native/build/Release/vmshift.node)");
}

/**
 * The binaries to try, in order, that exist. VMSHIFT_NATIVE_PATH, when set, is the only one (an
 * addon built elsewhere; set to a path that does not exist, it shows what runs without the addon).
 */
export function addonCandidates(): string[] {
  const override = process.env.VMSHIFT_NATIVE_PATH;
  if (override) return existsSync(override) ? [override] : [];
  const root = packageRoot();
  return [join(root, PREBUILD), join(root, BUILD)].filter((p) => existsSync(p));
}

let loadedFrom: string | null = null;

/** Which binary was loaded (null before the first native call). */
export function nativeAddonPath(): string | null {
  return loadedFrom;
}

function load(): void {
  if (loadedFrom !== null) return;
  const require = createRequire(import.meta.url);
  const failures: string[] = [];
  for (const path of addonCandidates()) {
    let addon: Record<string, unknown>;
    try {
      addon = require(path) as Record<string, unknown>;
    } catch (e) {
      failures.push(`${path}: ${(e as Error).message}`);
      continue;
    }
    const missing = FUNCTIONS.filter((f) => typeof addon[f] !== "function");
    if (missing.length > 0) {
      failures.push(`${path}: stale binary, missing ${missing.join(", ")}`);
      continue;
    }
    for (const f of FUNCTIONS) (native as unknown as Record<string, unknown>)[f] = addon[f];
    loadedFrom = path;
    return;
  }
  throw new NativeLoadError(
    `vmshift native addon could not be loaded on Node ${process.version} (${process.platform}-${process.arch}); ` +
      "it needs Node.js ^24.16.0 or >=26.1.0 on linux-x64" +
      (failures.length > 0 ? `:\n  ${failures.join("\n  ")}` : ": no binary found (run `npm run build`)"),
  );
}

/** Loads the addon now (it otherwise loads on the first native call); throws NativeLoadError. */
export function loadNative(): void {
  load();
}

function stub(name: (typeof FUNCTIONS)[number]): (...args: unknown[]) => unknown {
  return (...args: unknown[]) => {
    load();
    return (native[name] as (...a: unknown[]) => unknown)(...args);
  };
}

/** The addon's functions; each loads the addon on first use, then is replaced by the real one. */
export const native: Native = Object.fromEntries(FUNCTIONS.map((f) => [f, stub(f)])) as unknown as Native;
