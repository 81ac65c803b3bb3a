/**
 * The postcopy preempt channel: a second connection that carries only the pages the running
 * destination asked for, so they never queue behind the background stream. Real TCP sockets.
 */
import assert from "node:assert/strict";
import { once } from "node:events";
import { test } from "node:test";
import { MigrationDestination } from "../../src/migration/destination.js";
import type { MigrationError } from "../../src/migration/errors.js";
import { encodePreempt, encodeStreamHeader } from "../../src/migration/format.js";
import { MigrationSource } from "../../src/migration/source.js";
import { Workload } from "../../src/migration/workload.js";
import { Fd, shutdownSocket } from "../../src/sys/fd.js";
import { countFds, expectBoth, fillPattern, hooks, makeMemory, rawDigest, settle, socketPair } from "./helpers.js";

for (const after of [0, 1]) {
  test(`postcopy after ${after} round(s) with a preempt channel: requested pages come on it, memory equal`, async () => {
    const fds = countFds();
    const src = makeMemory();
    const dst = makeMemory();
    fillPattern(src);
    const wl = await Workload.start({ memory: src, pattern: "random", pagesPerSecond: 50000 });
    let guest: Workload | null = null;
    const [a, b] = await socketPair();
    const [pa, pb] = await socketPair();
    const source = new MigrationSource({
      memory: src,
      mode: "postcopy",
      postcopyAfterRounds: after,
      hooks: wl.sourceHooks(),
    });
    const destination = new MigrationDestination({
      memory: dst,
      acceptPreempt: async () => pb,
      hooks: {
        resume: async () => {
          guest = await Workload.start({ memory: dst, mode: "touch", pattern: "random", threads: 2 });
        },
      },
    });
    const [rs, rd] = await Promise.all([source.run(a, { preempt: pa }), destination.run(b)]);
    await (guest as unknown as Workload).close();
    await wl.close();
    assert.deepEqual(rawDigest(dst), rawDigest(src));
    assert.ok(rs.digests.every((d) => d.match));
    assert.equal(rs.preempt, true);
    assert.equal(rd.preempt, true);
    const pc = rd.postcopy;
    assert.ok(pc && pc.remoteFaults > 0, "the guest faulted pages in from the source");
    assert.ok((pc.preemptPages ?? 0) > 0, "requested pages arrived on the preempt channel");
    assert.ok((pc.preemptPages ?? 0) <= pc.remoteFaults, "only requested pages travel on the preempt channel");
    console.log(
      JSON.stringify({
        after,
        remote: pc.remoteFaults,
        preemptPages: pc.preemptPages,
        medianUs: +pc.latencyMedianUs.toFixed(0),
        p99Us: +pc.latencyP99Us.toFixed(0),
      }),
    );
    src.close();
    dst.close();
    await settle();
    assert.ok(countFds() <= fds, "fds leaked (sockets, userfaultfd)"); // a leak is growth (the runtime may close one of its own fds meanwhile)
  });
}

test("a preempt channel in precopy is closed unused; the stream does not announce it", async () => {
  const src = makeMemory();
  const dst = makeMemory();
  fillPattern(src);
  const [a, b] = await socketPair();
  const [pa, pb] = await socketPair();
  const ended = new Promise<void>((r) => pb.once("end", r));
  pb.resume();
  const [rs, rd] = await Promise.all([
    new MigrationSource({ memory: src }).run(a, { preempt: pa }),
    new MigrationDestination({ memory: dst, acceptPreempt: () => assert.fail("nothing to accept in precopy") }).run(b),
  ]);
  await ended;
  assert.equal(rs.preempt, undefined);
  assert.equal(rd.preempt, undefined);
  assert.deepEqual(rawDigest(dst), rawDigest(src));
  pb.destroy();
  src.close();
  dst.close();
});

test("a destination that cannot accept a preempt channel refuses it up front; the source carries on", async () => {
  const src = makeMemory();
  const dst = makeMemory();
  fillPattern(src);
  const before = rawDigest(src);
  const [a, b] = await socketPair();
  const [pa, pb] = await socketPair();
  pb.resume();
  const h = hooks();
  const [se, de] = await expectBoth(
    new MigrationSource({ memory: src, mode: "postcopy", hooks: h }).run(a, { preempt: pa }),
    new MigrationDestination({ memory: dst }).run(b),
  );
  assert.equal(de.code, "UNSUPPORTED");
  assert.match(de.message, /preempt/);
  assert.equal(se.code, "PEER_FAILED");
  assert.equal(se.details?.peerCode, "UNSUPPORTED");
  assert.equal(h.resumed, h.stopped, "the writers run again on the source");
  assert.deepEqual(rawDigest(src), before);
  pb.destroy();
  src.close();
  dst.close();
});

test("a preempt connection from another migration (wrong nonce) is refused, the real one taken: both complete", async () => {
  const src = makeMemory();
  const dst = makeMemory();
  fillPattern(src);
  const [a, b] = await socketPair();
  const [pa, pb] = await socketPair();
  const [xa, xb] = await socketPair();
  // The first connection the destination is offered is somebody else's channel.
  xa.write(encodeStreamHeader());
  xa.write(encodePreempt(12345n));
  const offered = [xb, pb];
  const destination = new MigrationDestination({
    memory: dst,
    acceptPreempt: async () => offered.shift() ?? assert.fail("asked for a third preempt connection"),
  });
  const refused: Error[] = [];
  destination.events.on("refused", (e) => refused.push(e));
  const [rs, rd] = await Promise.all([
    new MigrationSource({ memory: src, mode: "postcopy", postcopyAfterRounds: 0 }).run(a, { preempt: pa }),
    destination.run(b),
  ]);
  assert.equal(rd.preempt, true);
  assert.ok(rs.digests.every((d) => d.match));
  assert.deepEqual(rawDigest(dst), rawDigest(src));
  assert.equal(refused.length, 1);
  assert.equal((refused[0] as MigrationError).code, "BAD_RECORD");
  assert.match((refused[0] as Error).message, /another migration/);
  assert.ok(xb.destroyed, "the stray connection is closed");
  xa.destroy();
  // Both ends close once the FIN exchange is done: wait for it, the next test counts fds.
  await Promise.all([a, b, pa, pb].map((s) => (s.closed ? null : once(s, "close"))));
  src.close();
  dst.close();
});

test("the preempt channel dropped while the destination runs: both sides fail typed, no hang, source memory intact", async () => {
  const fds = countFds();
  const src = makeMemory();
  const dst = makeMemory();
  fillPattern(src);
  const before = rawDigest(src);
  const [a, b] = await socketPair();
  const [pa, pb] = await socketPair();
  // The connection itself drops (shutdown reaches every fd of the socket, also the fault
  // threads' duplicates), not just our JS object for it.
  const borrowed = new Fd((pb as unknown as { _handle: { fd: number } })._handle.fd);
  const conn = borrowed.dup();
  borrowed.release();
  const drop = () => {
    shutdownSocket(conn);
    conn.close();
  };
  const h = hooks();
  const source = new MigrationSource({ memory: src, hooks: h, mode: "postcopy", postcopyAfterRounds: 0 });
  const destination = new MigrationDestination({
    memory: dst,
    acceptPreempt: async () => pb,
    hooks: { resume: () => void setTimeout(drop, 5) },
  });
  const [se, de] = await expectBoth(source.run(a, { preempt: pa }), destination.run(b));
  assert.ok(["CONNECTION_LOST", "TRUNCATED", "PEER_FAILED"].includes(se.code), se.code);
  assert.ok(["CONNECTION_LOST", "TRUNCATED"].includes(de.code), de.code);
  assert.equal(h.resumed, 0, "the destination ran: the source must not run the guest too");
  assert.deepEqual(rawDigest(src), before);
  src.close();
  dst.close();
  await settle();
  assert.ok(countFds() <= fds, "fds leaked"); // a leak is growth (the runtime may close one of its own fds meanwhile)
});
