/**
 * `dirty`: the costs on the dirty-tracking path of a migration, each against a C loop from
 * native/bench-ref.cc measured in the same run.
 *  - marking random pages (AtomicBitmap.markPage vs __atomic_fetch_or, same xorshift32 stream)
 *  - scan + clear of the dirty log at ~1% dirty (AtomicBitmap.snapshotAndClear vs a C loop)
 *  - copying scattered 4 KiB pages (native.copyPages with an index list vs a C memcpy loop),
 *    plus the plain-JS per-page copy, to show why copyPages exists
 *  - one 256 MiB copy in and one out (Mapping.write / read, native memcpy, as GuestMemory does)
 *    vs memcpy, and the plain Uint8Array.set they replaced
 * Medians of RUNS runs; the C and JS runs alternate so drift hits both alike.
 */
import { createRequire } from "node:module";
import { fileURLToPath } from "node:url";
import { AtomicBitmap } from "../src/memory/atomic-bitmap.js";
import { copyPages as nativeCopyPages } from "../src/sys/bulk.js";
import { Mapping } from "../src/sys/mapping.js";
import { createMemfd } from "../src/sys/memfd.js";
import { xorshift32 } from "../test/helpers/random.js";
import { type Figure, figure, median } from "./report.js";

interface BenchRef {
  markRandom(bitmap: Uint32Array, nops: number, seed: number): number;
  scanClear(bitmap: Uint32Array, out: Uint32Array): [ns: number, found: number];
  copyPages(dst: Uint8Array, src: Uint8Array, pageIdx: Uint32Array, count: number, pageSize: number): number;
  memcpy(dst: Uint8Array, src: Uint8Array, len: number): number;
}

// The C reference is a second Node-API addon, built beside the main one (bench only; run from dist/bench/).
const ref = createRequire(import.meta.url)(
  fileURLToPath(new URL("../../native/build/Release/vmshift_bench_ref.node", import.meta.url)),
) as BenchRef;

const RUNS = 7;
const PAGE = 4096;
const GiB = 2 ** 30;
const MiB = 2 ** 20;
const gc = (globalThis as { gc?: () => void }).gc ?? (() => {});
const now = () => performance.now() * 1e6; // ns

/** Alternates `a` and `b` RUNS times (after one warm-up each); medians of what they return. */
function paired(a: () => number, b: () => number): [number, number] {
  a();
  b();
  const as: number[] = [];
  const bs: number[] = [];
  for (let i = 0; i < RUNS; i++) {
    gc();
    as.push(a());
    bs.push(b());
  }
  return [median(as), median(bs)];
}

function mark(): Figure {
  const pages = 16 * MiB; // 64 GiB of guest memory at 4 KiB: a 2 MiB bitmap
  const bm = new AtomicBitmap(pages * PAGE);
  const nops = 10_000_000;
  const seed = 2463534242;
  const js = () => {
    let x = seed; // xorshift32 inline, exactly as in bench-ref.cc (a closure call would be measured too)
    const t0 = now();
    for (let i = 0; i < nops; i++) {
      x ^= x << 13;
      x ^= x >>> 17;
      x ^= x << 5;
      x >>>= 0;
      bm.markPage(x % pages);
    }
    return nops / ((now() - t0) / 1e9) / 1e6;
  };
  const c = () => nops / (ref.markRandom(bm.words, nops, seed) / 1e9) / 1e6;
  const [v, r] = paired(js, c);
  return figure(
    "dirty",
    "mark random page (64 GiB bitmap)",
    "M marks/s",
    "higher",
    v,
    "C __atomic_fetch_or loop (bench-ref markRandom)",
    r,
  );
}

function scanClear(guestBytes: number, label: string): Figure {
  const pages = guestBytes / PAGE;
  const bm = new AtomicBitmap(guestBytes);
  const next = xorshift32(0x5eed);
  const dirty = new Uint32Array(Math.floor(pages / 100));
  for (let i = 0; i < dirty.length; i++) dirty[i] = next() % pages;
  const out = new Uint32Array(dirty.length + 64);
  let jsFound = 0;
  let cFound = 0;
  const js = () => {
    bm.markPages(dirty); // re-dirty, untimed
    const t0 = now();
    const s = bm.snapshotAndClear();
    const dt = now() - t0;
    jsFound = s.length;
    return dt / 1e3;
  };
  const c = () => {
    bm.markPages(dirty);
    const [ns, found] = ref.scanClear(bm.words, out);
    cFound = found;
    return ns / 1e3;
  };
  const [v, r] = paired(js, c);
  if (jsFound !== cFound) throw new Error(`scan mismatch: vmshift found ${jsFound}, C found ${cFound}`);
  return figure(
    "dirty",
    `scan+clear ${label} (~1% dirty)`,
    "us",
    "lower",
    v,
    "C load/xchg/ctz loop (bench-ref scanClear)",
    r,
  );
}

function pageCopies(): Figure[] {
  const size = 256 * MiB;
  const map = () => {
    const fd = createMemfd("bench-copy", size);
    const m = Mapping.map(fd, size, { populate: true });
    fd.close();
    return m;
  };
  const srcMap = map();
  const dstMap = map();
  const src = new Uint8Array(srcMap.windows[0] as SharedArrayBuffer);
  const dst = new Uint8Array(dstMap.windows[0] as SharedArrayBuffer);
  for (let i = 0; i < size; i += PAGE) src[i] = i / PAGE; // distinct pages

  // A scattered page list: a quarter of the pages in random order.
  const total = size / PAGE;
  const count = total / 4;
  const all = Uint32Array.from({ length: total }, (_, i) => i);
  const next = xorshift32(77);
  for (let i = total - 1; i > 0; i--) {
    const j = next() % (i + 1);
    const t = all[i] as number;
    all[i] = all[j] as number;
    all[j] = t;
  }
  const idx = all.slice(0, count);
  const gbps = (ns: number) => (count * PAGE) / ns; // bytes per ns == GB/s

  const copyPages = () => {
    const t0 = now();
    nativeCopyPages(dst, idx, src, idx, count, PAGE);
    return gbps(now() - t0);
  };
  const perPageJs = () => {
    const t0 = now();
    for (let i = 0; i < count; i++) {
      const off = (idx[i] as number) * PAGE;
      dst.set(src.subarray(off, off + PAGE), off);
    }
    return gbps(now() - t0);
  };
  const c = () => gbps(ref.copyPages(dst, src, idx, count, PAGE));
  const [v, r] = paired(copyPages, c);
  const [vjs, rjs] = paired(perPageJs, c);
  const whole = () => {
    const t0 = now();
    dstMap.write(0, src);
    return size / (now() - t0);
  };
  // What Mapping.write did before it went through native memcpy: V8 copies to or from a
  // SharedArrayBuffer with relaxed atomics, word by word.
  const typedSet = () => {
    const t0 = now();
    dst.set(src);
    return size / (now() - t0);
  };
  const readOut = () => {
    const t0 = now();
    srcMap.read(0, dst);
    return size / (now() - t0);
  };
  const memcpy = () => size / ref.memcpy(dst, src, size);
  const [vw, rw] = paired(whole, memcpy);
  const [vr, rr] = paired(readOut, memcpy);
  const [vs, rs] = paired(typedSet, memcpy);
  if (dst[size - PAGE] !== src[size - PAGE]) throw new Error("copy check failed");
  srcMap.close();
  dstMap.close();
  return [
    figure(
      "dirty",
      "copy scattered 4 KiB pages (native.copyPages)",
      "GB/s",
      "higher",
      v,
      "C memcpy per page (bench-ref copyPages)",
      r,
    ),
    figure(
      "dirty",
      "copy scattered 4 KiB pages (plain JS u8.set per page)",
      "GB/s",
      "higher",
      vjs,
      "C memcpy per page (bench-ref copyPages)",
      rjs,
    ),
    figure(
      "dirty",
      "copy 256 MiB at once (Mapping.write = native memcpy)",
      "GB/s",
      "higher",
      vw,
      "C memcpy (bench-ref memcpy)",
      rw,
    ),
    figure(
      "dirty",
      "copy 256 MiB out at once (Mapping.read = native memcpy)",
      "GB/s",
      "higher",
      vr,
      "C memcpy (bench-ref memcpy)",
      rr,
    ),
    figure(
      "dirty",
      "copy 256 MiB at once (plain Uint8Array.set on the shared mapping, not used)",
      "GB/s",
      "higher",
      vs,
      "C memcpy (bench-ref memcpy)",
      rs,
    ),
  ];
}

export async function run(): Promise<Figure[]> {
  return [
    mark(),
    scanClear(GiB, "1 GiB (32 KiB bitmap)"),
    scanClear(64 * GiB, "64 GiB (2 MiB bitmap)"),
    ...pageCopies(),
  ];
}
