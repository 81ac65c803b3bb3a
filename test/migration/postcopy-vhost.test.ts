/**
 * Postcopy with a vhost-user back-end at the destination: the echo device in its own process
 * shares the destination's guest memory and serves requests while pages are still arriving;
 * its worker faults on its own userfaultfd and the destination serves and wakes it there.
 * A back-end without PAGEFAULT: postcopy refused before anything is sent, precopy with its
 * dirty log still correct. And the shared-memory facts the design rests on, shown directly.
 */
import assert from "node:assert/strict";
import { type ChildProcess, spawn } from "node:child_process";
import { rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { test } from "node:test";
import { fileURLToPath } from "node:url";
import { GuestMemory } from "../../src/memory/guest-memory.js";
import { GuestMemoryRegion } from "../../src/memory/region.js";
import { MigrationDestination } from "../../src/migration/destination.js";
import { MigrationSource } from "../../src/migration/source.js";
import { Workload } from "../../src/migration/workload.js";
import { SysError } from "../../src/sys/errors.js";
import { MADV_REMOVE, Mapping } from "../../src/sys/mapping.js";
import { createMemfd } from "../../src/sys/memfd.js";
import {
  UFFD_EVENT_PAGEFAULT,
  UFFDIO_REGISTER_MODE_MISSING,
  type UffdMessage,
  Userfaultfd,
} from "../../src/sys/userfaultfd.js";
import { FrontendError } from "../../src/vhost-user/frontend/errors.js";
import { FRONTEND_PROTOCOL_FEATURES, VhostUserFrontend } from "../../src/vhost-user/frontend/frontend.js";
import { featureMask, ProtocolFeature } from "../../src/vhost-user/protocol/constants.js";
import { type Segment, SplitQueueDriver } from "../../src/virtio/driver.js";
import { features, VIRTIO_F_VERSION_1 } from "../../src/virtio/features.js";
import { VhostUserPostcopy } from "../../src/vm/vhost-postcopy.js";
import { startWorker } from "../helpers/workers.js";
import { countFds, fillPattern, MiB, makeMemory, rawDigest, settle, socketPair } from "./helpers.js";

const PAGE = 4096;
const VERSION_1 = features(VIRTIO_F_VERSION_1);
const PAGEFAULT = ProtocolFeature.PAGEFAULT;
/** Device-private memory outside the migration: the ring, the echo's inputs and outputs. */
const SCRATCH = 256 * MiB;
const SCRATCH_SIZE = 2 * MiB;
const RING_SIZE = 128;
const IO = SCRATCH + 64 * 1024;
const BACKEND = fileURLToPath(new URL("./postcopy-vhost-backend.js", import.meta.url));

const sleep = (ms: number) => new Promise<void>((r) => setTimeout(r, ms));

async function within<T>(p: Promise<T>, ms: number, what: string): Promise<T> {
  let t: NodeJS.Timeout | undefined;
  const timeout = new Promise<never>((_, rej) => {
    t = setTimeout(() => rej(new Error(`${what}: nothing within ${ms} ms`)), ms);
  });
  try {
    return await Promise.race([p, timeout]);
  } finally {
    clearTimeout(t);
  }
}

interface Backend {
  path: string;
  stop(): Promise<void>;
}

/** The echo back-end in a child process (its own address space, its own userfaultfd). */
async function startBackend(name: string, mode?: "no-pagefault"): Promise<Backend> {
  const path = join(tmpdir(), `vmshift-pcv-${process.pid}-${name}.sock`);
  const child: ChildProcess = spawn(process.execPath, [BACKEND, path, ...(mode ? [mode] : [])], {
    stdio: ["pipe", "pipe", "inherit"],
  });
  const closed = new Promise<void>((r) => child.once("close", () => r()));
  await within(
    new Promise<void>((resolve, reject) => {
      child.stdout?.on("data", (b: Buffer) => {
        if (b.toString().includes("ready")) resolve();
      });
      child.once("exit", (code) => reject(new Error(`back-end exited (${code}) before it was ready`)));
    }),
    10_000,
    "back-end start",
  );
  return {
    path,
    async stop() {
      child.stdin?.end();
      child.kill("SIGTERM");
      await within(closed, 5000, "back-end exit").catch(() => {
        child.kill("SIGKILL");
        return closed;
      });
      rmSync(path, { force: true });
    },
  };
}

/** Echo requests on queue 0 through a SplitQueueDriver whose rings lie in the scratch region. */
class EchoQueue {
  readonly driver: SplitQueueDriver;
  readonly #fe: VhostUserFrontend;
  readonly #pending = new Map<number, (len: number) => void>();
  readonly #unwatch: () => void;

  private constructor(fe: VhostUserFrontend, driver: SplitQueueDriver) {
    this.#fe = fe;
    this.driver = driver;
    this.#unwatch = fe.onCall(0, () => this.#drain());
  }

  static async start(fe: VhostUserFrontend, memory: GuestMemory): Promise<EchoQueue> {
    const driver = SplitQueueDriver.at(memory, SCRATCH, RING_SIZE, { features: VERSION_1 });
    await fe.startVring(0, driver.layout);
    return new EchoQueue(fe, driver);
  }

  /** Queues one request (published, not kicked); resolves with the used length. */
  add(readable: Segment, writable: Segment): Promise<number> {
    const head = this.driver.add([readable], [writable]);
    return new Promise((resolve) => this.#pending.set(head, resolve));
  }

  kick(): void {
    if (this.driver.publish()) this.#fe.kick(0);
  }

  #drain(): void {
    for (;;) {
      const u = this.driver.getUsed();
      if (!u) return;
      const done = this.#pending.get(u.head);
      this.#pending.delete(u.head);
      done?.(u.len);
    }
  }

  close(): void {
    this.#unwatch();
  }
}

/** A scratch region, every page populated now (so no userfaultfd ever reports a fault in it). */
function scratchRegion(): GuestMemoryRegion {
  const r = GuestMemoryRegion.memfd(SCRATCH, SCRATCH_SIZE, { name: "pcv-scratch" });
  r.fill(0, SCRATCH_SIZE, 0xee);
  return r;
}

/**
 * Up to `n` guest pages the destination does not have yet (not in its page cache) whose source
 * content is not zero, from the end of memory backwards (the background stream sends from the
 * start, so these arrive last). mincore and the source's memory: nothing here touches them.
 */
function missingPages(dst: GuestMemory, src: GuestMemory, n: number): number[] {
  const out: number[] = [];
  for (let ri = dst.regions.length - 1; ri >= 0 && out.length < n; ri--) {
    const d = dst.regions[ri] as GuestMemoryRegion;
    const s = src.regions[ri] as GuestMemoryRegion;
    const res = (d.mapping as Mapping).residency(0, d.size);
    for (let p = res.length - 1; p >= 0 && out.length < n; p -= 3) {
      if (((res[p] as number) & 1) !== 0) continue;
      if (!(s.bytes(p * PAGE, PAGE) as Uint8Array).some((v) => v !== 0)) continue;
      out.push(d.guestBase + p * PAGE);
    }
  }
  return out;
}

// With a preempt channel over a plain socket the native fault thread reads the back-end's
// userfaultfd too, and the two placement paths wake its waiters.
for (const [table, preempt] of [
  ["ADD_MEM_REG", false],
  ["SET_MEM_TABLE", false],
  ["ADD_MEM_REG", true],
] as const) {
  test(`postcopy, back-end at the destination (${table}${preempt ? ", preempt channel: native fault thread" : ""}): its faults are served through its uffd, every request echoes the source's data, memory equal`, {
    timeout: 30_000,
  }, async () => {
    const fds = countFds();
    const backend = await startBackend(`pc-${table}`);
    const src = makeMemory();
    const dst = makeMemory();
    const scratch = scratchRegion();
    // The back-end's memory table: the migrated guest memory plus the device's scratch region.
    const backendMemory = new GuestMemory([...dst.regions, scratch]);
    fillPattern(src);
    const protocolFeatures =
      table === "SET_MEM_TABLE"
        ? FRONTEND_PROTOCOL_FEATURES & ~featureMask(ProtocolFeature.CONFIGURE_MEM_SLOTS)
        : FRONTEND_PROTOCOL_FEATURES;
    const fe = VhostUserFrontend.connect(backend.path, { timeoutMs: 5000, protocolFeatures });
    let wl: Workload | null = null;
    let queue: EchoQueue | null = null;
    try {
      await fe.negotiate();
      await fe.setOwner();
      await fe.setFeatures(VERSION_1);
      assert.ok(fe.hasProtocolFeature(PAGEFAULT));
      assert.equal(fe.hasProtocolFeature(ProtocolFeature.CONFIGURE_MEM_SLOTS), table === "ADD_MEM_REG");

      wl = await Workload.start({ memory: src, pattern: "random", pagesPerSecond: 100_000, threads: 2 });
      const [a, b] = await socketPair();
      const [pa, pb] = preempt ? await socketPair() : [undefined, undefined];
      const source = new MigrationSource({
        memory: src,
        mode: "postcopy",
        postcopyAfterRounds: 1,
        // Slow enough that the background stream is still running while the back-end works.
        bandwidthLimit: 40_000_000,
        hooks: wl.sourceHooks(),
      });
      const requests: { gpa: number; out: number; expected: Uint8Array; done: Promise<number> }[] = [];
      let pc: VhostUserPostcopy | null = null;
      const destination = new MigrationDestination({
        memory: dst,
        ...(pb ? { acceptPreempt: async () => pb } : {}),
        hooks: {
          // Postcopy has started here; nothing of the background stream has arrived yet.
          resume: async () => {
            const picks = missingPages(dst, src, 48);
            assert.ok(picks.length >= 16, `only ${picks.length} pages still missing at resume`);
            const stats = await (pc as VhostUserPostcopy).listen(backendMemory);
            assert.equal(stats.faults, 0);
            queue = await EchoQueue.start(fe, backendMemory);
            for (const [i, gpa] of picks.entries()) {
              const out = IO + i * PAGE;
              // The source is stopped: its page is what the destination must end up with.
              const expected = src.read(gpa, PAGE);
              requests.push({
                gpa,
                out,
                expected,
                done: queue.add({ addr: gpa, len: PAGE }, { addr: out, len: PAGE }),
              });
            }
            // Not awaited: the back-end's worker blocks on these pages until they are fetched,
            // which happens once this hook has returned.
            queue.kick();
          },
          // Every page has arrived and faults are still served: the requests can all finish.
          beforeVerify: async () => {
            await within(Promise.all(requests.map((r) => r.done)), 10_000, "echo requests");
          },
        },
      });
      pc = await VhostUserPostcopy.advise(fe, destination, dst);
      assert.ok(fe.postcopyUserfaultfd, "POSTCOPY_ADVISE brought the back-end's userfaultfd");
      const [rs, rd] = await Promise.all([source.run(a, { preempt: pa }), destination.run(b)]);
      await pc.end();
      assert.equal(fe.postcopyUserfaultfd, null, "closed after POSTCOPY_END");

      assert.equal(rs.mode, "postcopy");
      assert.ok(rs.digests.every((d) => d.match));
      assert.deepEqual(rawDigest(dst), rawDigest(src), "memory equal at the end");
      // The back-end's address table: its own mapping addresses, not ours.
      assert.equal(pc.ranges.length, 2);
      for (const r of pc.ranges) {
        const mine = dst.findRegion(r.guestBase) as GuestMemoryRegion;
        assert.notEqual(r.hostStart, mine.hostAddress, "the back-end's address, from its reply");
      }
      for (const r of requests) {
        assert.equal(await r.done, PAGE);
        assert.ok(
          Buffer.from(scratch.bytes(r.out - SCRATCH, PAGE) as Uint8Array).equals(Buffer.from(r.expected)),
          `echo of page 0x${r.gpa.toString(16)} carries the source's data`,
        );
      }
      const st = pc.stats;
      assert.ok(st);
      const pcs = rd.postcopy;
      assert.ok(pcs);
      // Nothing but the back-end ran on the destination: every fault was its, on its uffd.
      assert.equal(pcs.faults, st.faults);
      assert.ok(st.missing > 0, "the back-end's worker faulted on pages that had not arrived");
      assert.ok(pcs.remoteFaults > 0, "and they were requested from the source");
      assert.equal(pcs.faultThread ?? false, preempt, "served by the native fault thread with a preempt channel");
      // Woken on its uffd when the page arrived; only waiters are woken, not every page placed.
      assert.ok(st.wakes > 0 && st.wakes <= st.faults, `wakes ${st.wakes}, faults ${st.faults}`);
      console.log(
        JSON.stringify({
          table,
          requests: requests.length,
          backendFaults: st.faults,
          backendMissing: st.missing,
          backendWakes: st.wakes,
          remoteFaults: pcs.remoteFaults,
          medianUs: +pcs.latencyMedianUs.toFixed(0),
          totalMs: +rs.totalMs.toFixed(1),
        }),
      );
    } finally {
      (queue as EchoQueue | null)?.close();
      await wl?.close();
      fe.close();
      await backend.stop();
      src.close();
      dst.close();
      scratch.close();
    }
    await settle();
    assert.ok(countFds() <= fds, "no fd leaked (userfaultfds, sockets, eventfds, pipes)"); // a leak is growth (the runtime may close one of its own fds meanwhile)
  });
}

test("a back-end without PAGEFAULT: postcopy refused up front with the reason; precopy with its dirty log (SET_LOG_BASE) migrates correctly, its device state in the stream", {
  timeout: 30_000,
}, async () => {
  const backend = await startBackend("no-pf", "no-pagefault");
  // The destination's own back-end, which receives the device state (DEVICE_STATE record).
  const backendDst = await startBackend("no-pf-dst", "no-pagefault");
  const feState = VhostUserFrontend.connect(backendDst.path, { timeoutMs: 5000 });
  await feState.negotiate();
  await feState.setOwner();
  let sentState: Uint8Array | null = null;
  const src = makeMemory();
  const dst = makeMemory();
  const scratch = scratchRegion();
  fillPattern(src);
  const destination = new MigrationDestination({
    memory: dst,
    hooks: {
      loadDeviceState: async (s) => {
        assert.equal(s.name, "vhost-user:echo");
        await feState.loadDeviceState(s.blob);
      },
    },
  });
  let fe: VhostUserFrontend | null = null;
  let queue: EchoQueue | null = null;
  try {
    // Destination role: the back-end cannot take part in postcopy; nothing is sent.
    const feDst = VhostUserFrontend.connect(backend.path, { timeoutMs: 5000 });
    try {
      const n = await feDst.negotiate();
      assert.ok(n.offeredProtocolFeatures !== null && (n.offeredProtocolFeatures & featureMask(PAGEFAULT)) === 0n);
      await feDst.setOwner();
      await feDst.setFeatures(VERSION_1);
      assert.match(VhostUserPostcopy.refusal(feDst) ?? "", /does not offer VHOST_USER_PROTOCOL_F_PAGEFAULT/);
      await assert.rejects(
        VhostUserPostcopy.advise(feDst, destination, dst),
        (e: unknown) =>
          e instanceof FrontendError &&
          e.code === "NOT_NEGOTIATED" &&
          e.request === "POSTCOPY_ADVISE" &&
          /postcopy refused: the back-end does not offer VHOST_USER_PROTOCOL_F_PAGEFAULT/.test(e.message),
      );
      assert.equal(feDst.postcopyUserfaultfd, null);
      // Still in step with the back-end: no request went out, no reply is owed.
      assert.equal(await feDst.getFeatures(), n.features);
    } finally {
      feDst.close();
    }

    // Source role, precopy: the same back-end writes guest memory while it is copied; only
    // its dirty log tells the migration which pages it wrote.
    const srcView = new GuestMemory([...src.regions, scratch]);
    fe = VhostUserFrontend.connect(backend.path, { timeoutMs: 5000 });
    await fe.start({ memory: srcView, features: VERSION_1 });
    queue = await EchoQueue.start(fe, srcView);
    const log = await fe.startLogging();
    const q = queue;
    let stop = false;
    let x = 12345;
    const rand = () => {
      x ^= x << 13;
      x ^= x >>> 17;
      x ^= x << 5;
      return x >>> 0;
    };
    const pages = src.regions.flatMap((r) => Array.from({ length: r.size / PAGE }, (_, p) => r.guestBase + p * PAGE));
    let echoed = 0;
    const writer = (async () => {
      while (!stop) {
        const batch: Promise<number>[] = [];
        for (let i = 0; i < 16; i++) {
          const input = IO + i * PAGE;
          scratch.fill(input - SCRATCH, PAGE, (echoed + i + 1) & 0xff);
          const gpa = pages[rand() % pages.length] as number;
          batch.push(q.add({ addr: input, len: PAGE }, { addr: gpa, len: PAGE }));
        }
        q.kick();
        await within(Promise.all(batch), 5000, "echo batch");
        echoed += batch.length;
        await sleep(1);
      }
    })();
    const [a, b] = await socketPair();
    const source = new MigrationSource({
      memory: src,
      // The back-end is the only writer: its log is the only dirty source.
      sources: [log],
      mode: "precopy",
      // Several rounds whatever the rate: each round after the first sends only what the log reported.
      downtimeLimitMs: 0.001,
      maxRounds: 4,
      whenNotConverged: "switchover",
      hooks: {
        stopWriters: async () => {
          stop = true;
          await writer;
        },
        // The rings stopped, the back-end's own state goes as a device-state record.
        saveDeviceState: async () => {
          await (fe as VhostUserFrontend).stopVring(0);
          sentState = await (fe as VhostUserFrontend).saveDeviceState();
          return [{ name: "vhost-user:echo", blob: sentState }];
        },
      },
    });
    const [rs, rd] = await Promise.all([source.run(a), destination.run(b)]);
    assert.deepEqual(rd.deviceStates, ["vhost-user:echo"]);
    assert.ok(sentState, "the source's back-end state was saved");
    assert.deepEqual(await feState.saveDeviceState(), sentState, "the destination's back-end holds the same state");
    assert.equal(rs.mode, "precopy");
    assert.equal(rd.mode, "precopy");
    assert.ok(echoed >= 32, `the back-end wrote ${echoed} pages during the migration`);
    assert.ok(rs.rounds >= 2);
    assert.ok(
      rs.roundStats.slice(1).some((r) => r.dirtyPages > 0),
      "the back-end's log reported the pages it wrote during the rounds",
    );
    assert.ok(rs.digests.every((d) => d.match));
    assert.deepEqual(rawDigest(dst), rawDigest(src), "memory equal at the end");
    await fe.stopLogging();
    console.log(JSON.stringify({ echoed, rounds: rs.rounds, dirty: rs.roundStats.map((r) => r.dirtyPages) }));
  } finally {
    (queue as EchoQueue | null)?.close();
    fe?.close();
    feState.close();
    await backend.stop();
    await backendDst.stop();
    src.close();
    dst.close();
    scratch.close();
  }
});

/** Polls `u` until a fault message arrives. */
async function nextFault(u: Userfaultfd, ms: number): Promise<UffdMessage> {
  const deadline = performance.now() + ms;
  for (;;) {
    const m = u.readMessages().find((x) => x.event === UFFD_EVENT_PAGEFAULT);
    if (m) return m;
    if (performance.now() > deadline) throw new Error(`no fault within ${ms} ms`);
    await sleep(2);
  }
}

test("shared memory and MISSING faults: one UFFDIO_COPY serves every mapping; a waiter on another mapping needs UFFDIO_WAKE there", async () => {
  const fd = createMemfd("pcv-shmem", 4 * PAGE);
  const a = Mapping.map(fd, 4 * PAGE);
  const b = Mapping.map(fd, 4 * PAGE);
  const ua = Userfaultfd.create();
  const ub = Userfaultfd.create();
  const page = (v: number) => new Uint8Array(PAGE).fill(v);
  const sab = b.windows[0] as SharedArrayBuffer;
  try {
    ua.register(a.address, 4 * PAGE, UFFDIO_REGISTER_MODE_MISSING);
    // B (the "back-end") registers pages 0..2 only: page 3 stands for "not registered yet".
    ub.register(b.address, 3 * PAGE, UFFDIO_REGISTER_MODE_MISSING);

    // 1. A page placed through A is in the shared page cache: reading it through B raises no
    //    fault at all.
    assert.equal(ua.copy(a.address, page(1)), true);
    let w = startWorker({ kind: "uffd-read", sab, offset: 0 });
    assert.equal(await within(w.next(), 2000, "read through B"), 0x01010101);
    await w.exited;
    assert.deepEqual(ub.readMessages(), [], "no fault on B");

    // 2. A reader already waiting on B is not released by placing the page through A: it
    //    sleeps on B's userfaultfd until a UFFDIO_WAKE there (then it retries and finds the page).
    w = startWorker({ kind: "uffd-read", sab, offset: PAGE });
    const m = await nextFault(ub, 2000);
    assert.equal(m.address & ~4095n, b.address + BigInt(PAGE));
    assert.equal(ua.copy(a.address + BigInt(PAGE), page(2)), true);
    const got = w.next();
    assert.equal(await Promise.race([got, sleep(300).then(() => "still waiting")]), "still waiting");
    ub.wake(b.address + BigInt(PAGE), PAGE);
    assert.equal(await within(got, 2000, "woken reader"), 0x02020202);
    await w.exited;

    // 3. UFFDIO_COPY through B of a page already placed through A: EEXIST (never overwritten).
    assert.equal(ua.copy(a.address + BigInt(2 * PAGE), page(3)), true);
    assert.equal(ub.copy(b.address + BigInt(2 * PAGE), page(9)), false);
    assert.equal(new Uint8Array(sab, 2 * PAGE, 4)[0], 3);

    // 4. Where B has not registered (yet), UFFDIO_COPY through B fails (ENOENT); a wake is harmless.
    assert.throws(
      () => ub.copy(b.address + BigInt(3 * PAGE), page(4)),
      (e: unknown) => e instanceof SysError && e.code === "ENOENT",
    );
    ub.wake(b.address + BigInt(3 * PAGE), PAGE);

    // 5. MADV_REMOVE through A (postcopy's drop of stale pages) removes the page for B too:
    //    B faults on it again.
    a.advise(0, PAGE, MADV_REMOVE);
    w = startWorker({ kind: "uffd-read", sab, offset: 0 });
    const m2 = await nextFault(ub, 2000);
    assert.equal(m2.address & ~4095n, b.address);
    assert.equal(ua.copy(a.address, page(5)), true);
    ub.wake(b.address, PAGE);
    assert.equal(await within(w.next(), 2000, "reader after MADV_REMOVE"), 0x05050505);
    await w.exited;
  } finally {
    ua.close();
    ub.close();
    a.close();
    b.close();
    fd.close();
  }
});
