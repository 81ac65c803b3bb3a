/**
 * Block I/O between a file and guest memory by (window, offset, length) triples (native blkio.cc):
 * a triple outside its window is refused before anything is read or written; a table pins the
 * mappings of its windows; reads and writes scatter and gather in order, short reads past the end
 * of the file read zeros; the pool completes many transfers in flight with the right bytes, and
 * closing it with transfers in flight finishes every one, joins its threads and closes its fd; a
 * worker that ends with transfers queued and its pool never closed neither hangs nor crashes, and
 * the pool's threads finish and go.
 */
import assert from "node:assert/strict";
import { closeSync, mkdtempSync, openSync, readdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, test } from "node:test";
import { Worker } from "node:worker_threads";
import { SysError } from "../../src/sys/errors.js";
import { EFAULT, GuestIoPool, GuestIoTable, guestIo, guestIoRaw } from "../../src/sys/guest-io.js";
import { liveMappings, Mapping } from "../../src/sys/mapping.js";
import { collectUntil, countFds, gc } from "../helpers/proc.js";

const PAGE = 4096;
const dir = mkdtempSync(join(tmpdir(), "vmshift-guest-io-"));
after(() => rmSync(dir, { recursive: true, force: true }));

function pattern(n: number, seed: number): Uint8Array {
  const b = new Uint8Array(n);
  for (let i = 0; i < n; i++) b[i] = (i * 31 + seed * 7 + (i >> 12)) & 0xff;
  return b;
}

function file(name: string, data: Uint8Array): { path: string; fd: number } {
  const path = join(dir, name);
  writeFileSync(path, data);
  return { path, fd: openSync(path, "r+") };
}

const threads = () => readdirSync("/proc/self/task").length;
const triples = (...t: number[]) => Uint32Array.from(t);

test("a triple outside its window is refused (EFAULT) and nothing is read or written", async () => {
  const m = Mapping.anonymous(16 * PAGE);
  const bytes = new Uint8Array(m.windows[0] as SharedArrayBuffer);
  bytes.fill(0xaa);
  const img = file("refuse.img", pattern(64 * PAGE, 1));
  try {
    const t = new GuestIoTable(m.windows);
    const hostile = [
      triples(0, 15 * PAGE, 2 * PAGE), // runs past the window's end
      triples(0, 0, PAGE, 1, 0, PAGE), // a window the table does not have (after a good triple)
      triples(0, 0xffffffff, 0xffffffff), // offset + length wraps in 32 bits
      triples(0, 16 * PAGE, 1), // one byte past the end
    ];
    const pool = new GuestIoPool(1);
    for (const segs of hostile) {
      const count = segs.length / 3;
      assert.equal(guestIoRaw(t, img.fd, false, 0, segs, count), -EFAULT);
      assert.equal(guestIoRaw(t, img.fd, true, 0, segs, count), -EFAULT);
      assert.equal(pool.transfer(t, img.fd, false, 0, segs, count), -EFAULT, "refused at submission");
      assert.equal(pool.transfer(t, img.fd, true, 0, segs, count, true), -EFAULT);
      assert.equal(pool.inFlight, 0);
      assert.throws(
        () => guestIo(t, img.fd, false, 0, segs, count),
        (e: unknown) => e instanceof SysError && e.code === "EFAULT" && e.syscall === "preadv",
      );
    }
    pool.close();
    assert.ok(
      bytes.every((b) => b === 0xaa),
      "guest memory untouched",
    );
    assert.deepEqual(new Uint8Array(readFileSync(img.path)), pattern(64 * PAGE, 1), "file untouched");
    // More triples than the list holds, or than one transfer takes: a TypeError, no transfer.
    assert.throws(() => guestIoRaw(t, img.fd, false, 0, triples(0, 0, PAGE), 2), TypeError);
    assert.throws(() => guestIoRaw(t, img.fd, false, 0, new Uint32Array(3 * 1025), 1025), TypeError);
    // Windows that are not our mappings.
    assert.throws(() => new GuestIoTable([new SharedArrayBuffer(PAGE)]), TypeError);
    assert.throws(() => new GuestIoTable([new ArrayBuffer(PAGE) as unknown as SharedArrayBuffer]), TypeError);
  } finally {
    closeSync(img.fd);
    m.close();
  }
});

test("scatter and gather in order, several windows, a read past the end of the file fills zeros", () => {
  const a = Mapping.anonymous(8 * PAGE);
  const b = Mapping.anonymous(8 * PAGE);
  const img = file("rw.img", new Uint8Array(6 * PAGE));
  try {
    const t = new GuestIoTable([...a.windows, ...b.windows]);
    const src = pattern(5 * PAGE, 2);
    a.write(0, src.subarray(0, 3 * PAGE));
    b.write(0, src.subarray(3 * PAGE));
    // Out of order in memory, odd lengths: a's pages 2,0,1 then b's first 2 pages.
    const wsegs = triples(0, 2 * PAGE, PAGE, 0, 0, PAGE - 100, 0, PAGE - 100, PAGE + 100, 1, 0, 2 * PAGE);
    assert.equal(guestIo(t, img.fd, true, PAGE, wsegs, 4), 5 * PAGE);
    const disk = new Uint8Array(readFileSync(img.path));
    const want = new Uint8Array(5 * PAGE);
    want.set(src.subarray(2 * PAGE, 3 * PAGE), 0);
    want.set(src.subarray(0, 2 * PAGE), PAGE);
    want.set(src.subarray(3 * PAGE), 3 * PAGE);
    assert.deepEqual(disk.subarray(PAGE, 6 * PAGE), want);
    // Read 3 pages from 1 page before the end: 1 page of data, 2 of zeros.
    b.write(4 * PAGE, new Uint8Array(3 * PAGE).fill(0x55));
    assert.equal(guestIo(t, img.fd, false, 5 * PAGE, triples(1, 4 * PAGE, 3 * PAGE), 1), 3 * PAGE);
    const got = new Uint8Array(3 * PAGE);
    b.read(4 * PAGE, got);
    assert.deepEqual(got.subarray(0, PAGE), disk.subarray(5 * PAGE, 6 * PAGE));
    assert.ok(got.subarray(PAGE).every((x) => x === 0));
  } finally {
    closeSync(img.fd);
    a.close();
    b.close();
  }
});

test("a table keeps its mappings mapped after close() and collection of every view, until it goes", async () => {
  const base = await collectUntil(liveMappings() - 1000, 5);
  let m: Mapping | null = Mapping.anonymous(4 * PAGE);
  let t: GuestIoTable | null = new GuestIoTable(m.windows);
  const img = file("pin.img", pattern(4 * PAGE, 3));
  try {
    m.close();
    m = null;
    assert.equal(await collectUntil(base), base + 1, "pinned: not munmapped");
    // The range is retired (private zeros) but still mapped: I/O into it is harmless.
    assert.equal(guestIo(t, img.fd, false, 0, triples(0, 0, 4 * PAGE), 1), 4 * PAGE);
    t = null;
    gc();
    assert.equal(await collectUntil(base), base, "unpinned with the table");
  } finally {
    closeSync(img.fd);
  }
});

test("pool: 256 transfers in flight complete once each, data read back equals what was written", async () => {
  const N = 256;
  const m = Mapping.anonymous(2 * N * PAGE);
  const img = file("pool.img", new Uint8Array(N * 2 * PAGE));
  const pool = new GuestIoPool(3);
  try {
    const t = new GuestIoTable(m.windows);
    const segs = new Uint32Array(6);
    for (let k = 0; k < N; k++) m.write(k * PAGE, pattern(PAGE, k));
    // Each write: its page, to file page 2k+1 (the list is reused at once: copied at submission).
    const writes: (number | Promise<number>)[] = [];
    for (let k = 0; k < N; k++) {
      segs.set([0, k * PAGE, PAGE]);
      writes.push(pool.transfer(t, img.fd, true, (2 * k + 1) * PAGE, segs, 1));
    }
    assert.deepEqual(await Promise.all(writes), new Array(N).fill(PAGE));
    // Each read: file pages 2k, 2k+1 into two pages of the second half, in reverse order.
    const reads: (number | Promise<number>)[] = [];
    for (let k = 0; k < N; k++) {
      const dst = (N + k) * PAGE;
      segs.set([0, dst + PAGE / 2, PAGE / 2, 0, dst, PAGE / 2]);
      reads.push(pool.transfer(t, img.fd, false, (2 * k + 1) * PAGE, segs, 2, k % 2 === 0));
    }
    assert.deepEqual(await Promise.all(reads), new Array(N).fill(PAGE));
    assert.equal(pool.inFlight, 0);
    for (let k = 0; k < N; k++) {
      const got = new Uint8Array(PAGE);
      m.read((N + k) * PAGE, got);
      const want = pattern(PAGE, k);
      assert.deepEqual(got.subarray(PAGE / 2), want.subarray(0, PAGE / 2), `page ${k}, first half`);
      assert.deepEqual(got.subarray(0, PAGE / 2), want.subarray(PAGE / 2), `page ${k}, second half`);
    }
  } finally {
    pool.close();
    closeSync(img.fd);
    m.close();
  }
});

test("close() with transfers in flight: every one finishes and settles, threads joined, no fd left", async () => {
  const fds = countFds();
  const before = threads();
  const m = Mapping.anonymous(64 * PAGE);
  const img = file("close.img", new Uint8Array(64 * 64 * PAGE));
  const t = new GuestIoTable(m.windows);
  for (let round = 0; round < 20; round++) {
    const pool = new GuestIoPool(4);
    assert.equal(threads(), before + 4);
    const results: (number | Promise<number>)[] = [];
    const segs = triples(0, 0, 64 * PAGE);
    m.write(0, new Uint8Array(64 * PAGE).fill(round + 1));
    for (let k = 0; k < 64; k++) results.push(pool.transfer(t, img.fd, true, k * 64 * PAGE, segs, 1));
    pool.close();
    assert.equal(pool.inFlight, 0, "settled by close()");
    assert.equal(pool.transfer(t, img.fd, true, 0, segs, 1), -108, "ESHUTDOWN after close");
    assert.deepEqual(await Promise.all(results), new Array(64).fill(64 * PAGE), "none lost");
    assert.equal(threads(), before, "threads joined");
    const disk = new Uint8Array(readFileSync(img.path));
    assert.ok(
      disk.every((x) => x === round + 1),
      `round ${round}: every transfer reached the file`,
    );
  }
  closeSync(img.fd);
  m.close();
  assert.equal(countFds(), fds, "the pools' eventfds are closed");
});

test("a worker that ends with transfers queued and the pool not closed: no hang, threads and eventfd gone", async () => {
  const fds = countFds();
  const before = threads();
  const img = file("orphan.img", new Uint8Array(0));
  closeSync(img.fd);
  const workerFds: number[] = [];
  for (let round = 0; round < 2; round++) {
    const w = new Worker(new URL("../helpers/guest-io-orphan.js", import.meta.url), {
      // 100 copies of 64 MiB: still going when the worker's environment is torn down.
      workerData: { path: img.path, transfers: 100, bytes: 64 << 20 },
    });
    const [msg] = (await Promise.race([
      new Promise((resolve) => w.once("message", (m) => resolve([m]))),
      new Promise((_, reject) => w.once("error", reject)),
    ])) as [{ inFlight: number; fd: number }];
    assert.ok(msg.inFlight > 0);
    assert.equal(await new Promise((resolve) => w.once("exit", resolve)), 0);
    workerFds.push(msg.fd);
  }
  // The orphaned pools' threads finish their queues and free everything: wait for that.
  for (let i = 0; i < 1500 && threads() > before; i++) await new Promise((r) => setTimeout(r, 20));
  assert.equal(threads(), before, "every pool thread returned");
  for (const fd of workerFds) closeSync(fd);
  assert.equal(countFds(), fds, "no eventfd or image fd left");
});
