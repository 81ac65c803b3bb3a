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
import { MigrationSource } from "../../src/migration/source.js";
import { connectEndpoint, MigrationListener } from "../../src/migration/transport.js";
import { Workload } from "../../src/migration/workload.js";
import { countFds, fillPattern, hooks, makeMemory, proxyPair, rawDigest, settle, socketPair } from "./helpers.js";

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
    postcopyRecovery: { accept: () => listener.accept("recover"), timeoutMs: 10_000 },
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
  assert.ok(countFds() <= fds, "fds leaked (sockets, userfaultfd)"); // a leak is growth (the runtime may close one of its own fds meanwhile)
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
    postcopyRecovery: { accept: () => listener.accept("recover"), timeoutMs: 10_000 },
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

test("`vmshift migrate` postcopy through a proxy that cuts the first connection: it pauses, reconnects, completes", async () => {
  const { spawn } = await import("node:child_process");
  const { createServer, Socket: NetSocket } = await import("node:net");
  const { JsonLines } = await import("./netns.js");
  const cli = new URL("../../src/cli/main.js", import.meta.url).pathname;
  // A free port for the destination.
  const probe = await MigrationListener.listen({ kind: "tcp", host: "127.0.0.1", port: 0 });
  const port = probe.endpoint.kind === "tcp" ? probe.endpoint.port : 0;
  await probe.close();
  // Every connection is forwarded to the destination; the first one is cut after 48 KiB (of 180-700,
  // by how much the workload wrote: mostly zero pages, sent as flags), in the background stream.
  let connections = 0;
  const open = new Set<import("node:net").Socket>();
  const proxy = createServer((c) => {
    const n = connections++;
    const up = new NetSocket().connect(port, "127.0.0.1");
    for (const s of [c, up]) {
      open.add(s);
      s.on("error", () => undefined);
      s.on("close", () => open.delete(s));
    }
    let forwarded = 0;
    c.on("data", (d: Buffer) => {
      if (n === 0 && forwarded + d.length >= 48 * 1024) {
        c.destroy();
        up.destroy();
        return;
      }
      forwarded += d.length;
      up.write(d);
    });
    up.on("data", (d: Buffer) => c.write(d));
    c.on("close", () => up.destroy());
    up.on("close", () => c.destroy());
  });
  await new Promise<void>((r) => proxy.listen(0, "127.0.0.1", r));
  const proxyPort = (proxy.address() as { port: number }).port;
  const dst = new JsonLines(
    spawn(process.execPath, [cli, "migrate", "--listen", `tcp:127.0.0.1:${port}`, "--size", "32", "--json"]),
  );
  try {
    const deadline = Date.now() + 10_000;
    while (!dst.stderr.includes("listening") && Date.now() < deadline) await new Promise((r) => setTimeout(r, 20));
    const src = new JsonLines(
      spawn(process.execPath, [
        cli,
        "migrate",
        "--to",
        `tcp:127.0.0.1:${proxyPort}`,
        "--size",
        "32",
        "--mode",
        "postcopy",
        "--postcopy-after",
        "0",
        "--no-preempt",
        "--recovery-timeout",
        "10000",
        "--json",
      ]),
    );
    try {
      assert.equal(await src.exit(30_000), 0, src.tail());
      assert.equal(await dst.exit(10_000), 0, dst.tail());
    } finally {
      src.child.kill("SIGKILL");
    }
    for (const side of [src, dst])
      assert.ok(
        side.events.some((e) => e.event === "phase" && e.phase === "postcopy-paused"),
        `paused: ${side.tail()}`,
      );
    const rs = await src.next("complete", 1000);
    const rd = await dst.next("complete", 1000);
    assert.deepEqual(
      ((rs.result as Record<string, unknown>).digests as { source: string }[]).map((d) => d.source),
      ((rd.result as Record<string, unknown>).digests as { source: string }[]).map((d) => d.source),
    );
    assert.ok(((rs.result as Record<string, unknown>).digests as { match: boolean }[]).every((d) => d.match));
    assert.equal(connections, 2, "the first connection and the recovery one");
  } finally {
    dst.child.kill("SIGKILL");
    for (const s of open) s.destroy();
    await new Promise((r) => proxy.close(r));
  }
});

for (const withRecovery of [true, false]) {
  test(`the connection lost between POSTCOPY_RUN and RESUMED${withRecovery ? ", with recovery: it resumes and completes" : ": the source does not run the guest again"}`, async () => {
    const src = makeMemory();
    const dst = makeMemory();
    fillPattern(src);
    const before = rawDigest(src);
    const listener = await MigrationListener.listen({ kind: "tcp", host: "127.0.0.1", port: 0 });
    const [a, b] = await socketPair();
    const h = hooks();
    const source = new MigrationSource({
      memory: src,
      mode: "postcopy",
      postcopyAfterRounds: 0,
      hooks: h,
      ...(withRecovery
        ? { postcopyRecovery: { reconnect: () => connectEndpoint(listener.endpoint), timeoutMs: 10_000 } }
        : {}),
    });
    const destination = new MigrationDestination({
      memory: dst,
      ...(withRecovery ? { postcopyRecovery: { accept: () => listener.accept("recover"), timeoutMs: 10_000 } } : {}),
      // The guest starts here, and the link goes before RESUMED can tell the source.
      hooks: { resume: () => void b.destroy() },
    });
    const [s, d] = await Promise.allSettled([source.run(a), destination.run(b)]);
    await listener.close();
    if (withRecovery) {
      assert.equal(s.status, "fulfilled", `source: ${(s as PromiseRejectedResult).reason}`);
      assert.equal(d.status, "fulfilled", `destination: ${(d as PromiseRejectedResult).reason}`);
      assert.deepEqual(rawDigest(dst), rawDigest(src));
    } else {
      assert.equal(s.status, "rejected");
      assert.equal(d.status, "rejected");
      // It cannot know whether the destination ran: the guest must not run in two places.
      assert.equal(h.resumed, 0, "the source did not resume its writers");
    }
    assert.deepEqual(rawDigest(src), before);
    src.close();
    dst.close();
  });
}
