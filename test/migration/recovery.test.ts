/**
 * Postcopy recovery: once the destination runs, a lost connection pauses both sides (the
 * destination's faulting threads wait) until a new connection resumes the migration; the
 * destination says which pages it holds and the source sends the rest. Real TCP sockets.
 */
import assert from "node:assert/strict";
import type { Socket } from "node:net";
import { test } from "node:test";
import { MigrationDestination } from "../../src/migration/destination.js";
import { MigrationError } from "../../src/migration/errors.js";
import type { Phase } from "../../src/migration/events.js";
import { encodeNonce, encodeStreamHeader, RecordType } from "../../src/migration/format.js";
import { MigrationSource, type SourceHooks } from "../../src/migration/source.js";
import { connectEndpoint, MigrationListener } from "../../src/migration/transport.js";
import { Workload } from "../../src/migration/workload.js";
import { countFds, fillPattern, makeMemory, proxyPair, rawDigest, settle, socketPair } from "./helpers.js";

function hooks(): SourceHooks & { stopped: number; resumed: number } {
  const h = {
    stopped: 0,
    resumed: 0,
    stopWriters() {
      h.stopped++;
    },
    resumeWriters() {
      h.resumed++;
    },
  };
  return h;
}

test("postcopy connection cut mid-stream: both sides pause, a new connection resumes it, memory equal", async () => {
  const fds = countFds();
  const src = makeMemory();
  const dst = makeMemory();
  fillPattern(src);
  const before = rawDigest(src);
  const listener = await MigrationListener.listen({ kind: "tcp", host: "127.0.0.1", port: 0 });
  // The first connection is cut 4 MiB into the stream: well after POSTCOPY_RUN.
  const px = await proxyPair({ cutAt: 4 * 1024 * 1024 });
  let guest: Workload | null = null;
  const strays: Socket[] = [];
  const source = new MigrationSource({
    memory: src,
    mode: "postcopy",
    postcopyAfterRounds: 0,
    hooks: hooks(),
    postcopyRecovery: {
      reconnect: async () => {
        // Somebody else's connection reaches the destination first: it must be ignored.
        const stray = await connectEndpoint(listener.endpoint);
        stray.on("error", () => undefined);
        stray.write(encodeStreamHeader());
        stray.write(encodeNonce(RecordType.Recover, 42n));
        strays.push(stray);
        return connectEndpoint(listener.endpoint);
      },
      timeoutMs: 10_000,
    },
  });
  const destination = new MigrationDestination({
    memory: dst,
    postcopyRecovery: { accept: () => listener.accept(), timeoutMs: 10_000 },
    hooks: {
      resume: async () => {
        guest = await Workload.start({ memory: dst, mode: "touch", pattern: "random", threads: 2 });
      },
    },
  });
  const phases = { source: [] as Phase[], destination: [] as Phase[] };
  source.events.on("phase", (p) => phases.source.push(p.phase));
  destination.events.on("phase", (p) => phases.destination.push(p.phase));
  const [rs, rd] = await Promise.all([source.run(px.source), destination.run(px.destination)]);
  await (guest as unknown as Workload).close();
  assert.equal(px.captured().length, 4 * 1024 * 1024, "the first connection was cut");
  for (const side of ["source", "destination"] as const)
    assert.deepEqual(
      phases[side].filter((p) => p.startsWith("postcopy")),
      ["postcopy", "postcopy-paused", "postcopy"],
      `${side} phases: ${phases[side].join(",")}`,
    );
  assert.deepEqual(rawDigest(dst), rawDigest(src));
  assert.deepEqual(rawDigest(src), before, "the source's memory is what it was");
  assert.ok(rs.digests.every((d) => d.match) && rd.digests.every((d) => d.match));
  assert.ok(rs.bytesSent > 4 * 1024 * 1024, "bytes of both connections are counted");
  for (const s of strays) s.destroy();
  await listener.close();
  src.close();
  dst.close();
  await settle();
  assert.equal(countFds(), fds, "fds leaked (sockets, userfaultfd)");
});

test("the preempt channel lost with recovery on: the migration pauses, resumes on one connection, completes", async () => {
  const src = makeMemory();
  const dst = makeMemory();
  fillPattern(src);
  const listener = await MigrationListener.listen({ kind: "tcp", host: "127.0.0.1", port: 0 });
  const [a, b] = await socketPair();
  const [pa, pb] = await socketPair();
  let guest: Workload | null = null;
  const source = new MigrationSource({
    memory: src,
    mode: "postcopy",
    postcopyAfterRounds: 0,
    postcopyRecovery: { reconnect: () => connectEndpoint(listener.endpoint), timeoutMs: 10_000 },
  });
  const destination = new MigrationDestination({
    memory: dst,
    acceptPreempt: async () => pb,
    postcopyRecovery: { accept: () => listener.accept(), timeoutMs: 10_000 },
    hooks: {
      resume: async () => {
        guest = await Workload.start({ memory: dst, mode: "touch", pattern: "random", threads: 2 });
        setTimeout(() => pb.destroy(), 5);
      },
    },
  });
  const paused: string[] = [];
  source.events.on("phase", (p) => p.phase === "postcopy-paused" && paused.push("source"));
  destination.events.on("phase", (p) => p.phase === "postcopy-paused" && paused.push("destination"));
  const [rs, rd] = await Promise.all([source.run(a, { preempt: pa }), destination.run(b)]);
  await (guest as unknown as Workload).close();
  assert.deepEqual(paused.sort(), ["destination", "source"]);
  assert.deepEqual(rawDigest(dst), rawDigest(src));
  assert.ok(rs.digests.every((d) => d.match) && rd.digests.every((d) => d.match));
  await listener.close();
  src.close();
  dst.close();
});

test("no recovery connection within the limit: both sides fail typed, no hang, the source does not run the guest again", async () => {
  const src = makeMemory();
  const dst = makeMemory();
  fillPattern(src);
  const before = rawDigest(src);
  const px = await proxyPair({ cutAt: 2 * 1024 * 1024 });
  const h = hooks();
  let attempts = 0;
  const t0 = performance.now();
  const [s, d] = await Promise.allSettled([
    new MigrationSource({
      memory: src,
      mode: "postcopy",
      postcopyAfterRounds: 0,
      hooks: h,
      postcopyRecovery: {
        reconnect: async () => {
          attempts++;
          throw new Error("network unreachable");
        },
        timeoutMs: 600,
      },
    }).run(px.source),
    new MigrationDestination({
      memory: dst,
      postcopyRecovery: { accept: () => new Promise<never>(() => undefined), timeoutMs: 600 },
    }).run(px.destination),
  ]);
  assert.equal(s.status, "rejected");
  assert.equal(d.status, "rejected");
  const se = (s as PromiseRejectedResult).reason;
  const de = (d as PromiseRejectedResult).reason;
  assert.ok(se instanceof MigrationError && se.code === "CONNECTION_LOST", `source: ${se}`);
  assert.ok(de instanceof MigrationError && de.code === "CONNECTION_LOST", `destination: ${de}`);
  assert.match(se.message, /not recovered within 600 ms/);
  assert.match(de.message, /not recovered within 600 ms/);
  assert.ok(attempts >= 2, `the source kept trying (${attempts} attempts)`);
  assert.ok(performance.now() - t0 < 8000, "gave up at its limit");
  assert.equal(h.resumed, 0, "the destination ran: the source must not run the guest too");
  assert.deepEqual(rawDigest(src), before);
  src.close();
  dst.close();
});
