/**
 * FaultServer, the destination's postcopy fault path, against a fake fault source: faults are
 * injected as userfaultfd messages without sockets or a real userfaultfd, and the fake records
 * every UFFDIO_COPY / ZEROPAGE / WAKE the server issues (EEXIST when a page is already there,
 * as the kernel answers).
 */
import assert from "node:assert/strict";
import { test } from "node:test";
import { DiscardMap } from "../../src/memory/discard-map.js";
import { MigrationError } from "../../src/migration/errors.js";
import { type FaultFd, type FaultRange, FaultServer } from "../../src/migration/fault-server.js";
import type { PagesRecord } from "../../src/migration/format.js";
import { PAGE } from "../../src/migration/page-set.js";
import { ReceivedMemory } from "../../src/migration/received-memory.js";
import { UFFD_EVENT_PAGEFAULT, type UffdMessage } from "../../src/sys/userfaultfd.js";
import { MiB, makeMemory } from "./helpers.js";

/** A userfaultfd stand-in: pages placed by address, every call recorded. */
class FakeUffd implements FaultFd {
  readonly placed = new Map<bigint, Uint8Array | null>();
  readonly copies: bigint[] = [];
  readonly wakes: bigint[] = [];
  readonly eexist: bigint[] = [];
  cb: ((m: UffdMessage[]) => void) | null = null;
  closed = false;
  unregistered = 0;

  /** A thread touched `addr`: the message the kernel would queue. */
  fault(...addrs: bigint[]): void {
    if (!this.cb) throw new Error("nobody watches this userfaultfd");
    this.cb(addrs.map((a) => ({ event: UFFD_EVENT_PAGEFAULT, flags: 0n, address: a + 123n, a: 0n, b: a, c: 0n })));
  }

  #place(dst: bigint, data: Uint8Array | null): boolean {
    if (this.placed.has(dst)) {
      this.eexist.push(dst);
      return false;
    }
    this.placed.set(dst, data);
    this.copies.push(dst);
    return true;
  }

  copy(dst: bigint, src: ArrayBufferView): boolean {
    return this.#place(dst, new Uint8Array(src.buffer, src.byteOffset, src.byteLength).slice());
  }
  copyRun(dst: bigint, src: ArrayBufferView): number {
    const b = new Uint8Array(src.buffer, src.byteOffset, src.byteLength);
    let off = 0;
    while (off < b.length && this.#place(dst + BigInt(off), b.slice(off, off + PAGE))) off += PAGE;
    return off;
  }
  zeropage(start: bigint, _len: number): boolean {
    return this.#place(start, null);
  }
  zeropageRun(start: bigint, len: number): number {
    let off = 0;
    while (off < len && this.#place(start + BigInt(off), null)) off += PAGE;
    return off;
  }
  wake(start: bigint): void {
    this.wakes.push(start);
  }
  onMessages(cb: (m: UffdMessage[]) => void): { close(): void } {
    this.cb = cb;
    return { close: () => (this.cb = null) };
  }
  unregister(): void {
    this.unregistered++;
  }
  close(): void {
    this.closed = true;
  }
}

const HOST = 0x7f00_0000_0000n;

function setup(discard?: (mem: ReturnType<typeof makeMemory>) => Map<never, DiscardMap>) {
  const mem = makeMemory([4 * MiB, 2 * MiB]);
  const received = new ReceivedMemory(mem.regions, discard?.(mem));
  const requests: [number, number][] = [];
  const server = new FaultServer({ memory: mem, received, request: (r, p) => requests.push([r, p]) });
  const own = new FakeUffd();
  // Our own userfaultfd: region i at HOST + its guest base.
  const ranges: FaultRange[] = mem.regions.map((r) => ({
    guestBase: r.guestBase,
    size: r.size,
    hostStart: HOST + BigInt(r.guestBase),
  }));
  return { mem, received, requests, server, own, ranges };
}

/** A PAGES record as decodePages yields it: `full` pages with data (byte = page & 0xff), `zero` pages without. */
function pages(region: number, full: number[], zero: number[] = []): PagesRecord {
  const all = [...full, ...zero];
  const data = new Uint8Array(full.length * PAGE);
  full.forEach((p, k) => {
    data.fill(p & 0xff, k * PAGE, (k + 1) * PAGE);
  });
  return {
    region,
    pages: Uint32Array.from(all),
    flags: new Uint8Array(all.length),
    data,
    dataOffsets: Int32Array.from(all.map((_, k) => (k < full.length ? k * PAGE : -1))),
  };
}

test("a fault asks for its page once; the page is placed once and the latency counted", () => {
  const { mem, received, requests, server, own, ranges } = setup();
  try {
    server.start({ uffd: own, ranges });
    const r1 = mem.regions[1];
    assert.ok(r1);
    // Page 7 of region 1, faulted twice (two threads) before it arrives: one request.
    const addr = HOST + BigInt(r1.guestBase + 7 * PAGE);
    own.fault(addr, addr + 8n);
    assert.deepEqual(requests, [[1, 7]]);
    assert.deepEqual([...server.pending()], [[1, 7]]);
    server.placePages(received.get(1) as never, pages(1, [7]));
    assert.deepEqual(own.copies, [addr]);
    assert.equal((own.placed.get(addr) as Uint8Array)[100], 7);
    assert.ok(received.get(1)?.present.has(7));
    assert.deepEqual([...server.pending()], []);
    const s = server.stats();
    assert.equal(s.faults, 2);
    assert.equal(s.remoteFaults, 1);
    assert.ok(s.latencyMedianUs > 0);
    assert.equal(
      s.latencyHistogram?.reduce((a, b) => a + b, 0),
      1,
    );
    // A fault on a page that is already here: woken at once, nothing asked for.
    own.fault(addr);
    assert.equal(requests.length, 1);
    assert.deepEqual(own.wakes, [addr]);
    assert.equal(server.pages, 1);
    assert.equal(server.failure, null);
  } finally {
    server.stop();
    mem.close();
  }
});

test("EEXIST: a page the other path placed first is woken, never overwritten, and counted once", () => {
  const { mem, received, server, own, ranges } = setup();
  try {
    server.start({ uffd: own, ranges });
    const st = received.get(0) as NonNullable<ReturnType<typeof received.get>>;
    const at = (p: number) => HOST + BigInt(p * PAGE);
    // Page 11 is already mapped (a racing fault was served through the kernel meanwhile).
    own.placed.set(at(11), null);
    // A run 10..12 from the background stream: 10 placed, 11 EEXIST (woken), 12 placed.
    server.placePages(st, pages(0, [10, 11, 12]));
    assert.deepEqual(own.copies, [at(10), at(12)]);
    assert.ok(own.eexist.length > 0 && own.eexist.every((a) => a === at(11)));
    assert.deepEqual(own.wakes, [at(11)]);
    assert.equal(own.placed.get(at(11)), null, "not overwritten");
    // The same pages again (the preempt channel's copy of a page the stream sent too): skipped.
    server.placePages(st, pages(0, [10, 11, 12], [13]));
    assert.deepEqual(own.copies, [at(10), at(12), at(13)]);
    assert.equal(server.pages, 3);
    assert.equal(server.zero, 1);
  } finally {
    server.stop();
    mem.close();
  }
});

test("a fault outside the domain's guest memory is a typed BAD_PAGE; the server goes on serving", () => {
  const { mem, received, requests, server, own, ranges } = setup();
  try {
    server.start({ uffd: own, ranges });
    own.fault(HOST - 4096n);
    assert.ok(server.failure instanceof MigrationError);
    assert.equal(server.failure.code, "BAD_PAGE");
    assert.equal(requests.length, 0);
    own.fault(HOST + 3n * 4096n);
    assert.deepEqual(requests, [[0, 3]]);
    server.placePages(received.get(0) as never, pages(0, [3]));
    assert.deepEqual(own.copies, [HOST + 3n * 4096n]);
  } finally {
    server.stop();
    mem.close();
  }
});

test("a second fault domain: its fault is asked for, placed through our own userfaultfd, and woken there", () => {
  const { mem, received, requests, server, own, ranges } = setup();
  try {
    server.start({ uffd: own, ranges });
    const other = new FakeUffd();
    const OTHER = 0x5500_0000_0000n;
    // A back-end that maps only region 0, at its own address.
    const stats = server.addDomain(other, [{ guestBase: 0, size: 4 * MiB, hostStart: OTHER }]);
    assert.throws(
      () => server.addDomain(new FakeUffd(), [{ guestBase: 3 * MiB, size: 2 * MiB, hostStart: 0n }]),
      (e: unknown) => e instanceof MigrationError && e.code === "REGION_MISMATCH",
    );
    other.fault(OTHER + 5n * 4096n);
    assert.deepEqual(requests, [[0, 5]]);
    assert.equal(stats.missing, 1);
    server.placePages(received.get(0) as never, pages(0, [5, 6]));
    // Placed once, through our own mapping; the back-end's waiting thread woken at its address.
    assert.deepEqual(own.copies, [HOST + 5n * 4096n, HOST + 6n * 4096n]);
    assert.deepEqual(other.copies, []);
    assert.deepEqual(other.wakes, [OTHER + 5n * 4096n]);
    assert.equal(stats.wakes, 1);
    server.stop();
    assert.ok(own.closed && own.unregistered === 2, "our own userfaultfd unregistered and closed");
    assert.ok(!other.closed, "the back-end's stays its owner's");
    assert.equal(other.cb, null, "no longer watched");
    assert.throws(
      () => server.addDomain(new FakeUffd(), []),
      (e: unknown) => e instanceof MigrationError && e.code === "UNSUPPORTED",
    );
  } finally {
    server.stop();
    mem.close();
  }
});

test("a fault in a discarded block gets a zero page at once, without a request", () => {
  const { mem, requests, server, own, ranges } = setup((m) => {
    const d = new DiscardMap((m.regions[0] as { size: number }).size, 2 * MiB);
    d.discard(2 * MiB, 2 * MiB);
    return new Map([[m.regions[0] as never, d]]);
  });
  try {
    server.start({ uffd: own, ranges });
    const addr = HOST + BigInt(2 * MiB + 4 * PAGE);
    own.fault(addr);
    assert.deepEqual(requests, []);
    assert.ok(own.placed.has(addr));
    assert.equal(own.placed.get(addr), null);
    assert.equal(server.stats().discardFaults, 1);
  } finally {
    server.stop();
    mem.close();
  }
});
