/**
 * The addon's surface, typed. This is the only module that loads `native/`; everything else
 * goes through the owners in this folder. The addon is context-aware, so every worker thread
 * loads its own instance of it.
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
  /** XXH64 (seed 0) of `count` pages (index list or consecutive), two u32 words (low, high) per page in `out`. */
  hashPages(src: View, srcIndex: Uint32Array | null, count: number, pageSize: number, out: Uint32Array): void;
}

/** Finds native/build/Release from both src/ (a loader) and dist/src/ (compiled). */
export function nativeBuildDir(): string {
  let dir = dirname(fileURLToPath(import.meta.url));
  for (let i = 0; i < 6; i++) {
    const candidate = join(dir, "native", "build", "Release");
    if (existsSync(join(candidate, "vmshift.node"))) return candidate;
    dir = dirname(dir);
  }
  throw new Error("vmshift native addon not built: run `npm run build` (native/build/Release/vmshift.node)");
}

const require = createRequire(import.meta.url);
export const native: Native = require(join(nativeBuildDir(), "vmshift.node")) as Native;
