/**
 * The native fault path (native/src/postcopy.cc): with a preempt channel over a plain socket the
 * destination's faults are served by its fault thread and the source's answers by its request
 * server; with VMSHIFT_POSTCOPY_THREAD=0 both stay on the main threads. Real sockets, real
 * userfaultfd, guest threads that fault while the background stream runs.
 */
import assert from "node:assert/strict";
import { readdirSync, readFileSync } from "node:fs";
import type { Socket } from "node:net";
import { after, test } from "node:test";
import { DiscardMap } from "../../src/memory/discard-map.js";
import { MigrationDestination } from "../../src/migration/destination.js";
import { encodePageRequest, encodeRecord, RecordType } from "../../src/migration/format.js";
import { MigrationSource } from "../../src/migration/source.js";
import { connectEndpoint, loadX509Credentials, MigrationListener } from "../../src/migration/transport.js";
import { Workload } from "../../src/migration/workload.js";
import { countFds, expectBoth, fillPattern, hooks, makeMemory, rawDigest, settle, socketPair } from "./helpers.js";
import { CLIENT_CN, makeTestCreds } from "./tls-creds.js";

const creds = makeTestCreds();

/** The names of this process's threads (/proc/self/task/N/comm). */
function taskNames(): string[] {
  return readdirSync("/proc/self/task").map((t) => {
    try {
      return readFileSync(`/proc/self/task/${t}/comm`, "utf8").trim();
    } catch {
      return ""; // the thread ended meanwhile
    }
  });
}
after(() => creds.close());

async function postcopy(threadOn: boolean) {
  const saved = process.env.VMSHIFT_POSTCOPY_THREAD;
  if (threadOn) delete process.env.VMSHIFT_POSTCOPY_THREAD;
  else process.env.VMSHIFT_POSTCOPY_THREAD = "0";
  const fds = countFds();
  const src = makeMemory();
  const dst = makeMemory();
  try {
    fillPattern(src);
    let guest: Workload | null = null;
    const [a, b] = await socketPair();
    const [pa, pb] = await socketPair();
    const source = new MigrationSource({ memory: src, mode: "postcopy", postcopyAfterRounds: 0 });
    const destination = new MigrationDestination({
      memory: dst,
      acceptPreempt: async () => pb,
      hooks: {
        resume: async () => {
          guest = await Workload.start({ memory: dst, mode: "touch", pattern: "random", threads: 2 });
        },
      },
    });
    // Every turn of the event loop until the run ends, this process's thread names: the fault
    // thread and the request server live for the whole postcopy phase.
    const threadNames = new Set<string>();
    let running = true;
    const sample = () => {
      for (const n of taskNames()) threadNames.add(n);
      if (running) setImmediate(sample);
    };
    sample();
    const [rs, rd] = await Promise.all([source.run(a, { preempt: pa }), destination.run(b)]).finally(() => {
      running = false;
    });
    await (guest as unknown as Workload).close();
    // Named so that an operator's top -H / ps -L and perf tell them apart from node's own threads.
    for (const n of ["vmshift-fault", "vmshift-pserve"])
      assert.equal(
        threadNames.has(n),
        threadOn,
        `thread ${n} ${threadOn ? "missing" : "running"}: ${[...threadNames]}`,
      );
    assert.deepEqual(rawDigest(dst), rawDigest(src));
    assert.ok(rs.digests.every((d) => d.match));
    const pc = rd.postcopy;
    assert.ok(pc && pc.remoteFaults > 0, "the guest faulted pages in from the source");
    assert.equal(pc.faultThread, threadOn);
    assert.ok((pc.preemptPages ?? 0) > 0, "requested pages came on the preempt channel");
    assert.ok(pc.latencyMedianUs > 0 && pc.latencyP99Us >= pc.latencyMedianUs);
    assert.ok((pc.latencyHistogram?.reduce((x, y) => x + y, 0) ?? 0) > 0, "latencies were counted");
    const q = rs.requests as NonNullable<typeof rs.requests>;
    assert.ok(q.requests > 0 && q.pagesQueued > 0, "the source counted the requests it served");
    console.log(
      JSON.stringify({
        faultThread: threadOn,
        remote: pc.remoteFaults,
        preemptPages: pc.preemptPages,
        medianUs: +pc.latencyMedianUs.toFixed(0),
        p99Us: +pc.latencyP99Us.toFixed(0),
      }),
    );
  } finally {
    if (saved === undefined) delete process.env.VMSHIFT_POSTCOPY_THREAD;
    else process.env.VMSHIFT_POSTCOPY_THREAD = saved;
    src.close();
    dst.close();
  }
  await settle();
  assert.ok(countFds() <= fds, "fds leaked (sockets, userfaultfd, eventfds, the threads' duplicates)");
}

test("postcopy over a plain preempt channel: faults served by the native fault thread, memory equal, nothing leaked", () =>
  postcopy(true));

test("the same with VMSHIFT_POSTCOPY_THREAD=0: served on the main threads, memory equal", () => postcopy(false));

/**
 * A relay for the preempt channel that flips one bit of what the source sends, `at` bytes in:
 * the fault thread must refuse the record (CORRUPT, at its stream offset) and place nothing of it.
 */
async function corruptingRelay(at: number): Promise<[Socket, Socket, () => void]> {
  const [pa, x1] = await socketPair();
  const [x2, pb] = await socketPair();
  let seen = 0;
  x1.on("data", (c: Buffer) => {
    if (at >= seen && at < seen + c.length) c[at - seen] = (c[at - seen] as number) ^ 0x40;
    seen += c.length;
    x2.write(c);
  });
  x2.on("data", (c: Buffer) => x1.write(c));
  for (const s of [x1, x2]) s.on("error", () => undefined);
  x1.on("close", () => x2.destroy());
  x2.on("close", () => x1.destroy());
  const close = () => {
    x1.destroy();
    x2.destroy();
  };
  return [pa, pb, close];
}

/**
 * A postcopy migration whose preempt channel goes through `relay` (which spoils what the source
 * sends there), a guest touching pages on the destination: both sides must fail typed, the
 * source keep its memory, and no fd stay open. The two errors, for the caller to check.
 */
async function refusedOnPreempt(
  relay: () => Promise<[Socket, Socket, () => void]>,
): Promise<{ se: { code: string; message: string }; de: { code: string; message: string } }> {
  const fds = countFds();
  const src = makeMemory();
  const dst = makeMemory();
  fillPattern(src);
  const before = rawDigest(src);
  const [a, b] = await socketPair();
  const [pa, pb, closeRelay] = await relay();
  let guest: Workload | null = null;
  const source = new MigrationSource({ memory: src, hooks: hooks(), mode: "postcopy", postcopyAfterRounds: 0 });
  const destination = new MigrationDestination({
    memory: dst,
    acceptPreempt: async () => pb,
    hooks: {
      resume: async () => {
        guest = await Workload.start({ memory: dst, mode: "touch", pattern: "random", threads: 1 });
      },
    },
  });
  const [se, de] = await expectBoth(source.run(a, { preempt: pa }), destination.run(b));
  await (guest as Workload | null)?.close();
  closeRelay();
  assert.ok(["PEER_FAILED", "CONNECTION_LOST"].includes(se.code), se.code);
  assert.deepEqual(rawDigest(src), before);
  src.close();
  dst.close();
  await settle();
  assert.ok(countFds() <= fds, "fds leaked");
  return { se, de };
}

test("a corrupt page record on the preempt channel: the fault thread fails the migration typed (CORRUPT at its offset); the source keeps its memory", async () => {
  // Stream header (16) + PREEMPT (20) = 36: the first PAGES record starts there; byte 36 + 30
  // is inside its page list or data.
  const { de } = await refusedOnPreempt(() => corruptingRelay(36 + 30));
  assert.equal(de.code, "CORRUPT", de.message);
  assert.match(de.message, /at stream offset 36\b/);
});

test("postcopy with a preempt channel over mutual TLS: served on the main threads (the TLS session stays in its socket), authenticated on every channel, memory equal", {
  timeout: 120_000,
}, async () => {
  const fds = countFds();
  const src = makeMemory();
  const dst = makeMemory();
  fillPattern(src);
  const l = await MigrationListener.listen(
    { kind: "tcp", host: "127.0.0.1", port: 0 },
    { tls: { ...loadX509Credentials(creds.good, "server"), authz: CLIENT_CN } },
  );
  const port = (l.endpoint as { port: number }).port;
  const tlsClient = { tls: { ...loadX509Credentials(creds.good, "client"), hostname: "localhost" } };
  let guest: Workload | null = null;
  try {
    // The listener admits a connection once its first record is in: the source must be writing.
    const a = await connectEndpoint({ kind: "tcp", host: "127.0.0.1", port }, tlsClient);
    const pa = await connectEndpoint({ kind: "tcp", host: "127.0.0.1", port }, tlsClient);
    const source = new MigrationSource({ memory: src, mode: "postcopy", postcopyAfterRounds: 0 });
    const destination = new MigrationDestination({
      memory: dst,
      acceptPreempt: () => l.accept("preempt"),
      hooks: {
        resume: async () => {
          guest = await Workload.start({ memory: dst, mode: "touch", pattern: "random", threads: 1 });
        },
      },
    });
    const [rs, rd] = await Promise.all([source.run(a, { preempt: pa }), l.accept().then((b) => destination.run(b))]);
    assert.deepEqual(rawDigest(dst), rawDigest(src));
    assert.ok(rs.digests.every((d) => d.match));
    const pc = rd.postcopy;
    assert.equal(rd.preempt, true);
    assert.ok(pc && pc.remoteFaults > 0 && (pc.preemptPages ?? 0) > 0);
    assert.equal(pc.faultThread, false, "a TLS channel is not handed to the native thread");
    console.log(
      JSON.stringify({
        tls: true,
        remote: pc.remoteFaults,
        medianUs: +pc.latencyMedianUs.toFixed(0),
        p99Us: +pc.latencyP99Us.toFixed(0),
      }),
    );
  } finally {
    await (guest as Workload | null)?.close();
    await l.close();
    src.close();
    dst.close();
  }
  await settle();
  assert.ok(countFds() <= fds, "fds leaked");
});

test("the fault thread and discarded blocks: a fault there gets a zero page without a request, even when the destination learnt the plug state from the stream (after the preempt channel)", {
  timeout: 120_000,
}, async () => {
  const fds = countFds();
  const src = makeMemory();
  const dst = makeMemory();
  fillPattern(src);
  const r0 = src.regions[0] as (typeof src.regions)[number];
  const map = new DiscardMap(r0.size, 2 * 1024 * 1024);
  // Dropped on the source: its content is gone, as virtio-mem's unplug does.
  map.discard(4 * 1024 * 1024, 2 * 1024 * 1024);
  (r0.bytes(4 * 1024 * 1024, 2 * 1024 * 1024) as Uint8Array).fill(0);
  let guest: Workload | null = null;
  try {
    const [a, b] = await socketPair();
    const [pa, pb] = await socketPair();
    const source = new MigrationSource({
      memory: src,
      mode: "postcopy",
      postcopyAfterRounds: 0,
      discard: new Map([[r0, map]]),
    });
    // No discard map given here: the destination creates one from the DISCARD records, which
    // come after PREEMPT. Once every page has arrived (faults still served) the guest sweeps all
    // of memory once, the discarded block too, which was never sent: it can only fault.
    const pages = dst.size / 4096;
    const destination = new MigrationDestination({
      memory: dst,
      acceptPreempt: async () => pb,
      hooks: {
        beforeVerify: async () => {
          const g = await Workload.start({ memory: dst, mode: "touch", pattern: "sequential", threads: 1 });
          guest = g;
          while (g.pagesWritten < pages) await new Promise((r) => setImmediate(r));
          await g.pause();
        },
      },
    });
    const [rs, rd] = await Promise.all([source.run(a, { preempt: pa }), destination.run(b)]);
    assert.ok(rs.digests.every((d) => d.match));
    assert.deepEqual(rawDigest(dst), rawDigest(src));
    const pc = rd.postcopy;
    assert.ok(pc?.faultThread);
    assert.ok(pc.discardFaults > 0, `faults in the discarded block: ${pc.discardFaults}`);
  } finally {
    await (guest as Workload | null)?.close();
    src.close();
    dst.close();
  }
  await settle();
  assert.ok(countFds() <= fds, "fds leaked");
});

/**
 * A relay for the preempt channel that passes the source's first `keep` bytes, then sends
 * `record` instead of anything the source sends after them.
 */
async function injectingRelay(keep: number, record: Uint8Array): Promise<[Socket, Socket, () => void]> {
  const [pa, x1] = await socketPair();
  const [x2, pb] = await socketPair();
  let seen = 0;
  let injected = false;
  x1.on("data", (c: Buffer) => {
    if (seen < keep) x2.write(c.subarray(0, keep - seen));
    seen += c.length;
    if (seen > keep && !injected) {
      injected = true;
      x2.write(record);
    }
  });
  x2.on("data", (c: Buffer) => x1.write(c));
  for (const s of [x1, x2]) s.on("error", () => undefined);
  x1.on("close", () => x2.destroy());
  x2.on("close", () => x1.destroy());
  const close = () => {
    x1.destroy();
    x2.destroy();
  };
  return [pa, pb, close];
}

/** A PAGES payload: region 0, the given page numbers and flags, then `dataPages` pages of data. */
function pagesPayload(pages: number[], flags: number[], dataPages: number, count = pages.length): Uint8Array {
  const head = (8 + pages.length * 5 + 3) & ~3;
  const payload = new Uint8Array(head + dataPages * 4096);
  const dv = new DataView(payload.buffer);
  dv.setUint32(0, 0, true);
  dv.setUint32(4, count, true);
  for (const [k, p] of pages.entries()) dv.setUint32(8 + k * 4, p, true);
  payload.set(flags, 8 + pages.length * 4);
  return payload;
}

// Each a record with a good CRC whose content the fault thread must refuse before placing anything.
const badPages: [string, Uint8Array, string, RegExp][] = [
  ["a page outside guest memory", pagesPayload([0x7fffffff], [1], 0), "BAD_PAGE", /outside its region/],
  ["a page flag that means nothing", pagesPayload([3], [2], 0), "BAD_RECORD", /unknown flags/],
  ["a full page without its data", pagesPayload([3, 4], [0, 1], 0), "BAD_RECORD", /data length does not match/],
  ["more pages than the payload holds", pagesPayload([3], [1], 0, 100), "BAD_RECORD", /count does not fit/],
];

for (const [what, payload, code, message] of badPages)
  test(`a page record with ${what} on the preempt channel: ${code} at its offset, nothing placed, typed on both sides`, {
    timeout: 120_000,
  }, async () => {
    const { de } = await refusedOnPreempt(() => injectingRelay(36, encodeRecord(RecordType.Pages, payload)));
    assert.equal(de.code, code, de.message);
    assert.match(de.message, message);
    assert.match(de.message, /at stream offset 36\b/);
  });

test("a page request for a region that does not exist, on the preempt channel: the source's request server fails the migration typed (BAD_RECORD), the source keeps its memory", {
  timeout: 120_000,
}, async () => {
  const fds = countFds();
  const src = makeMemory();
  const dst = makeMemory();
  fillPattern(src);
  const before = rawDigest(src);
  const [a, b] = await socketPair();
  const [pa, x1] = await socketPair();
  const [x2, pb] = await socketPair();
  // source <-> x1 | x2 <-> destination: the destination's first request is replaced by a bad one.
  let replaced = false;
  x1.on("data", (c: Buffer) => x2.write(c));
  x2.on("data", () => {
    if (replaced) return;
    replaced = true;
    x1.write(encodePageRequest(99, 0, 1));
  });
  for (const s of [x1, x2]) s.on("error", () => undefined);
  x1.on("close", () => x2.destroy());
  x2.on("close", () => x1.destroy());
  let guest: Workload | null = null;
  const h = hooks();
  const source = new MigrationSource({ memory: src, hooks: h, mode: "postcopy", postcopyAfterRounds: 0 });
  const destination = new MigrationDestination({
    memory: dst,
    acceptPreempt: async () => pb,
    hooks: {
      resume: async () => {
        guest = await Workload.start({ memory: dst, mode: "touch", pattern: "random", threads: 1 });
      },
    },
  });
  const [se, de] = await expectBoth(source.run(a, { preempt: pa }), destination.run(b));
  await (guest as Workload | null)?.close();
  x1.destroy();
  x2.destroy();
  assert.equal(se.code, "BAD_RECORD", se.message);
  assert.match(se.message, /region 99/);
  assert.ok(["PEER_FAILED", "CONNECTION_LOST", "TRUNCATED"].includes(de.code), de.code);
  assert.deepEqual(rawDigest(src), before);
  src.close();
  dst.close();
  await settle();
  assert.ok(countFds() <= fds, "fds leaked");
});
