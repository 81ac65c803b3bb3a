/**
 * Trusted migration: every attack of issue 11, performed, with the harmless outcome asserted.
 * Real TLS 1.3 (node:tls) with certificates made by openssl per run (tls-creds.ts), real TCP
 * sockets, real migrations.
 */
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { once } from "node:events";
import { readFileSync } from "node:fs";
import { createServer, connect as netConnect, type Socket } from "node:net";
import { join } from "node:path";
import type { Duplex } from "node:stream";
import { after, test } from "node:test";
import tls from "node:tls";
import { MigrationDestination } from "../../src/migration/destination.js";
import { MigrationError } from "../../src/migration/errors.js";
import type { Phase } from "../../src/migration/events.js";
import {
  encodeNonce,
  encodePageRequest,
  encodePreempt,
  encodeStreamHeader,
  RecordType,
} from "../../src/migration/format.js";
import { MAX_REQUEST_PAGES, MigrationSource, REQUEST_QUEUE_BYTES } from "../../src/migration/source.js";
import {
  acceptEndpoint,
  type ClientTls,
  connectEndpoint,
  type Endpoint,
  type ListenOptions,
  loadPskFile,
  loadX509Credentials,
  MigrationListener,
  peerIdentity,
} from "../../src/migration/transport.js";
import { UnixSocket } from "../../src/sys/unix-socket.js";
import { countFds, fillPattern, hooks, MiB, makeMemory, rawDigest, recordOffsets, socketPair } from "./helpers.js";
import { JsonLines } from "./netns.js";
import { CLIENT_CN, makeTestCreds } from "./tls-creds.js";

const creds = makeTestCreds();
after(() => creds.close());

const server = (dir: string, authz?: string) => ({
  ...loadX509Credentials(dir, "server"),
  ...(authz ? { authz } : {}),
});
const client = (dir: string, hostname?: string): ClientTls => ({
  ...loadX509Credentials(dir, "client"),
  ...(hostname ? { hostname } : {}),
});
const loopback: Endpoint = { kind: "tcp", host: "127.0.0.1", port: 0 };

function portOf(l: MigrationListener): number {
  return (l.endpoint as { port: number }).port;
}

/** Resolves once `s` has closed (whoever closed it). */
function closed(s: Socket | Duplex): Promise<void> {
  return (s as Socket).closed ? Promise.resolve() : once(s, "close").then(() => undefined);
}

/** Waits for `cond` (polled on the event loop), failing after `ms`. */
async function until(cond: () => boolean, ms: number, what: string): Promise<void> {
  const end = performance.now() + ms;
  while (!cond()) {
    if (performance.now() > end) assert.fail(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 5));
  }
}

/**
 * Bytes that are no TLS ClientHello, always the same: an HTTP request padded with letters.
 * Random bytes were not always refused at once: a first byte of 0x16 (or an SSLv2-style header)
 * can announce a record longer than what follows, and the handshake then waits for its
 * deadline; one CI run in a few hundred saw that.
 */
function notTls(n: number): Buffer {
  const b = Buffer.alloc(n, "A");
  b.write("GET / HTTP/1.1\r\nHost: localhost\r\n\r\n");
  return b;
}

/** Bytes inside an authenticated TLS session that are no migration stream header. */
const NOT_A_STREAM = Buffer.alloc(64, 0xa5);

/** A TLS client from raw node:tls (an attacker does not use our transport). */
function rawTlsClient(port: number, o: tls.ConnectionOptions): tls.TLSSocket {
  const s = tls.connect({ port, host: "127.0.0.1", servername: "localhost", ...o });
  s.on("error", () => undefined);
  return s;
}

test("the destination ignores an idle connection, garbage, no certificate, another CA's and a wrong-identity source, then completes the real TLS migration", async () => {
  const fds = countFds();
  const l = await MigrationListener.listen(loopback, { tls: server(creds.good, CLIENT_CN), handshakeTimeoutMs: 3000 });
  // Closed whatever happens: a listener or socket left open keeps the test process alive.
  const opened: { destroy(): unknown }[] = [];
  try {
    const port = portOf(l);
    const refused: MigrationError[] = [];
    l.onReject = (e) => refused.push(e);
    const main = l.accept();
    // 1. An idle TCP connection, ahead of everyone (it used to become the main stream and block it).
    const idle = netConnect(port, "127.0.0.1");
    idle.on("error", () => undefined);
    opened.push(idle);
    await once(idle, "connect");
    // 2. Garbage bytes where a TLS ClientHello should be.
    const garbage = netConnect(port, "127.0.0.1", () => garbage.write(notTls(4096)));
    garbage.on("error", () => undefined);
    opened.push(garbage);
    // 3. TLS without a client certificate.
    const noCert = rawTlsClient(port, { ca: readFileSync(`${creds.good}/ca-cert.pem`) });
    opened.push(noCert);
    // 4. A client certificate from another CA (the attacker does not check our server either).
    const foreign = loadX509Credentials(creds.foreign, "client");
    const foreignCa = rawTlsClient(port, { cert: foreign.cert, key: foreign.key, rejectUnauthorized: false });
    foreignCa.on("secureConnect", () => foreignCa.write(encodeStreamHeader()));
    opened.push(foreignCa);
    // 5. Our CA, wrong identity: a complete MigrationSource with other memory.
    const evil = makeMemory();
    fillPattern(evil, 99);
    const intruder = connectEndpoint(l.endpoint, { tls: client(creds.intruder) }).then((s) =>
      new MigrationSource({ memory: evil }).run(s),
    );
    // 6. An authenticated client that sends garbage inside TLS.
    const garbler = await connectEndpoint(l.endpoint, { tls: client(creds.good) });
    garbler.on("error", () => undefined);
    opened.push(garbler);
    garbler.write(NOT_A_STREAM);
    const attackers = await Promise.allSettled([intruder]);
    const ie = (attackers[0] as PromiseRejectedResult).reason;
    assert.ok(ie instanceof MigrationError, `the intruder failed typed: ${ie}`);
    await Promise.all([closed(garbage), closed(noCert), closed(foreignCa), closed(garbler)]);
    assert.ok(!idle.closed, "the idle connection is still pending (it just does not block anyone)");
    // The real source, last in line.
    const src = makeMemory();
    const dst = makeMemory();
    fillPattern(src, 1);
    const h = hooks();
    const sourceRun = connectEndpoint(l.endpoint, { tls: client(creds.good) }).then((s) =>
      new MigrationSource({ memory: src, hooks: h }).run(s),
    );
    const stream = await main;
    assert.deepEqual(peerIdentity(stream)?.name, CLIENT_CN);
    const [rs, rd] = await Promise.all([sourceRun, new MigrationDestination({ memory: dst }).run(stream)]);
    assert.ok(rs.digests.every((d) => d.match) && rd.digests.every((d) => d.match));
    assert.deepEqual(rawDigest(dst), rawDigest(src), "the destination holds the real source's memory");
    assert.notDeepEqual(rawDigest(dst), rawDigest(evil));
    const st = l.stats;
    assert.equal(st.accepted, 1, "only the real source became a channel");
    assert.ok(st.unauthenticated >= 4, `garbage hello, no cert, other CA, wrong CN: ${JSON.stringify(st)}`);
    assert.ok(st.garbage >= 1, "garbage inside TLS");
    assert.ok(
      refused.some((e) => e.code === "AUTH_FAILED" && /intruder/.test(e.message)),
      refused.map((e) => e.message).join("\n"),
    );
    // The idle connection goes at its deadline (a timer of the listener: waited for, not slept).
    await closed(idle);
    assert.equal(l.stats.timedOut, 1);
    await l.close();
    for (const m of [src, dst, evil]) m.close();
    await until(() => countFds() === fds, 5000, "fds back to the start");
  } finally {
    for (const s of opened) s.destroy();
    await l.close();
  }
});

test("500 idle connections: the listener holds at most maxPending of them, the real migration goes through, nothing leaks", async () => {
  const fds = countFds();
  const maxPending = 16;
  const l = await MigrationListener.listen(loopback, {
    tls: server(creds.good, CLIENT_CN),
    maxPending,
    handshakeTimeoutMs: 60_000,
  });
  // The attacker is another process: its 500 sockets are not ours to count.
  const code = `const net=require("node:net");let n=0;const all=[];for(let i=0;i<500;i++){const s=net.connect(${portOf(l)},"127.0.0.1",()=>{if(++n===500)console.log(JSON.stringify({event:"connected",n}))});s.on("error",()=>{});all.push(s)}setInterval(()=>{},1000)`;
  const flood = new JsonLines(spawn(process.execPath, ["-e", code], { stdio: ["ignore", "pipe", "pipe"] }));
  try {
    await flood.next("connected", 30_000);
    const seen = () => {
      const s = l.stats;
      return s.pending + s.overflow + s.timedOut + s.garbage + s.unauthenticated;
    };
    await until(() => seen() >= 500, 30_000, "the listener to see all 500");
    assert.ok(l.stats.pending <= maxPending, JSON.stringify(l.stats));
    // + the listening socket and the flood child's stdout/stderr pipes.
    assert.ok(countFds() <= fds + maxPending + 3, `fds ${countFds()} with ${fds} at the start`);
    const src = makeMemory();
    const dst = makeMemory();
    fillPattern(src);
    const [rs, rd] = await Promise.all([
      connectEndpoint(l.endpoint, { tls: client(creds.good) }).then((s) => new MigrationSource({ memory: src }).run(s)),
      l.accept().then((s) => new MigrationDestination({ memory: dst }).run(s)),
    ]);
    assert.ok(rs.digests.every((d) => d.match) && rd.digests.every((d) => d.match));
    assert.deepEqual(rawDigest(dst), rawDigest(src));
    src.close();
    dst.close();
  } finally {
    flood.child.kill("SIGKILL");
    await l.close();
  }
  await until(() => countFds() === fds, 5000, "fds back to the start");
});

test("a MITM that rewrites one byte of one TLS record: the migration fails typed on both sides, the source keeps running", async () => {
  const l = await MigrationListener.listen(loopback, { tls: server(creds.good, CLIENT_CN) });
  // source -> proxy -> destination; the proxy flips one bit 256 KiB into the forward stream.
  const FLIP = 256 * 1024;
  const proxy = createServer((c) => {
    const up = netConnect(portOf(l), "127.0.0.1");
    let off = 0;
    c.on("data", (d: Buffer) => {
      if (FLIP >= off && FLIP < off + d.length) {
        d = Buffer.from(d);
        d[FLIP - off] = (d[FLIP - off] as number) ^ 0x01;
      }
      off += d.length;
      up.write(d);
    });
    up.on("data", (d: Buffer) => c.write(d));
    for (const s of [c, up]) s.on("error", () => undefined);
    c.on("close", () => up.destroy());
    up.on("close", () => c.destroy());
  });
  await new Promise<void>((r) => proxy.listen(0, "127.0.0.1", r));
  const src = makeMemory();
  const dst = makeMemory();
  fillPattern(src);
  const before = rawDigest(src);
  const h = hooks();
  const s = await connectEndpoint(
    { kind: "tcp", host: "127.0.0.1", port: (proxy.address() as { port: number }).port },
    { tls: client(creds.good, "localhost") },
  );
  const [sr, dr] = await Promise.allSettled([
    new MigrationSource({ memory: src, hooks: h }).run(s),
    l.accept().then((d) => new MigrationDestination({ memory: dst }).run(d)),
  ]);
  assert.equal(sr.status, "rejected");
  assert.equal(dr.status, "rejected");
  const se = (sr as PromiseRejectedResult).reason;
  const de = (dr as PromiseRejectedResult).reason;
  assert.ok(se instanceof MigrationError && de instanceof MigrationError, `${se} / ${de}`);
  assert.ok(["TRUNCATED", "CONNECTION_LOST"].includes(de.code), de.code);
  assert.match(de.message, /decrypt|bad record mac|ssl|tls/i, "TLS itself caught the rewrite");
  assert.ok(["CONNECTION_LOST", "PEER_FAILED", "AUTH_FAILED"].includes(se.code), se.code);
  assert.equal(h.resumed, h.stopped, "the source runs on");
  assert.deepEqual(rawDigest(src), before);
  proxy.close();
  await l.close();
  src.close();
  dst.close();
});

test("postcopy over TLS: an intruder of our CA with the right nonce offers itself as preempt and as recovery connection, strays arrive during the pause; the real ones win", async () => {
  // No authz here: the intruder passes TLS, so only the binding to the main peer stops it.
  const opts: ListenOptions = { tls: server(creds.good), handshakeTimeoutMs: 3000 };
  const l = await MigrationListener.listen(loopback, opts);
  const il = await MigrationListener.listen(loopback, opts);
  const good = { tls: client(creds.good) };
  const bad = { tls: client(creds.intruder) };
  const src = makeMemory();
  const dst = makeMemory();
  fillPattern(src);
  const before = rawDigest(src);
  // The destination's side of the main stream: tapped (cleartext) for the nonce, cut 2 MiB in.
  let tapped = Buffer.alloc(0);
  let nonce: bigint | null = null;
  let mainDst: Duplex | null = null;
  const intruders: Duplex[] = [];
  const strays: Socket[] = [];
  const offerIntruder = async (record: Buffer, kind: "preempt" | "recover"): Promise<Duplex> => {
    const s = await connectEndpoint(il.endpoint, bad);
    s.on("error", () => undefined);
    s.write(encodeStreamHeader());
    s.write(record);
    intruders.push(s);
    return il.accept(kind);
  };
  let preemptCalls = 0;
  let recoverCalls = 0;
  const destination = new MigrationDestination({
    memory: dst,
    acceptPreempt: () =>
      preemptCalls++ === 0 ? offerIntruder(encodePreempt(nonce as bigint), "preempt") : l.accept("preempt"),
    postcopyRecovery: {
      accept: () =>
        recoverCalls++ === 0
          ? offerIntruder(encodeNonce(RecordType.Recover, nonce as bigint), "recover")
          : l.accept("recover"),
      timeoutMs: 20_000,
    },
  });
  const refused: MigrationError[] = [];
  destination.events.on("refused", (e) => refused.push(e as MigrationError));
  const phases: Phase[] = [];
  destination.events.on("phase", (p) => {
    phases.push(p.phase);
    if (p.phase !== "postcopy-paused") return;
    // Strays during the pause: idle, and garbage.
    const idle = netConnect(portOf(l), "127.0.0.1");
    const junk = netConnect(portOf(l), "127.0.0.1", () => junk.write(notTls(512)));
    for (const s of [idle, junk]) {
      s.on("error", () => undefined);
      strays.push(s);
    }
  });
  const source = new MigrationSource({
    memory: src,
    mode: "postcopy",
    postcopyAfterRounds: 0,
    postcopyRecovery: { reconnect: () => connectEndpoint(l.endpoint, good), timeoutMs: 20_000 },
  });
  const a = await connectEndpoint(l.endpoint, good);
  const pa = await connectEndpoint(l.endpoint, good);
  const sourceRun = source.run(a, { preempt: pa });
  mainDst = await l.accept();
  const md = mainDst;
  let got = 0;
  md.on("data", (c: Buffer) => {
    got += c.length;
    if (nonce === null) {
      tapped = Buffer.concat([tapped, c]);
      for (const o of recordOffsets(tapped))
        if (tapped[o] === RecordType.Session && o + 16 <= tapped.length) nonce = tapped.readBigUInt64LE(o + 8);
    }
    if (got > 2 * MiB && !md.destroyed) md.destroy();
  });
  const [rs, rd] = await Promise.all([sourceRun, destination.run(md)]);
  assert.ok(rs.digests.every((d) => d.match) && rd.digests.every((d) => d.match));
  assert.deepEqual(rawDigest(dst), rawDigest(src));
  assert.deepEqual(rawDigest(src), before);
  assert.ok(phases.includes("postcopy-paused"), phases.join(","));
  const auth = refused.filter((e) => e.code === "AUTH_FAILED");
  assert.equal(auth.length, 2, `the intruder refused as preempt and as recovery: ${refused.map((e) => e.message)}`);
  assert.ok(auth.every((e) => /CN=intruder/.test(e.message)));
  assert.ok(strays.length === 2);
  assert.equal(l.stats.accepted, 3, "main, preempt, recovery: the strays took nothing");
  await Promise.all(intruders.map(closed));
  for (const s of strays) s.destroy();
  await Promise.all([l.close(), il.close()]);
  src.close();
  dst.close();
});

for (const preempt of [false, true])
  test(`a page-request flood${preempt ? " (preempt channel)" : ""}: each page is queued at most once, the serving socket's queue stays bounded, oversized requests are refused; the migration completes`, async () => {
    const src = makeMemory([32 * MiB, 8 * MiB]);
    const dst = makeMemory([32 * MiB, 8 * MiB]);
    fillPattern(src);
    const [a, b] = await socketPair();
    const [pa, pb] = preempt ? await socketPair() : [undefined, undefined];
    const pages0 = (32 * MiB) / 4096;
    const source = new MigrationSource({ memory: src, mode: "postcopy", postcopyAfterRounds: 0 });
    const refused: MigrationError[] = [];
    source.events.on("refused", (e) => refused.push(e as MigrationError));
    let flooded = 0;
    const destination = new MigrationDestination({
      memory: dst,
      ...(pb ? { acceptPreempt: async () => pb } : {}),
      hooks: {
        // The guest "runs" here: the attacker (on the destination's socket) asks for everything,
        // again and again. Whole records, written between the destination's own.
        resume: () => {
          // The attack: 8 requests for the whole 32 MiB region (192 bytes on the wire).
          for (let i = 0; i < 8; i++) b.write(encodePageRequest(0, 0, pages0));
          for (let round = 0; round < 8; round++)
            for (let p = 0; p < pages0; p += MAX_REQUEST_PAGES) {
              b.write(encodePageRequest(0, p, MAX_REQUEST_PAGES));
              flooded++;
            }
        },
      },
    });
    const rss0 = process.memoryUsage().rss;
    const [rs, rd] = await Promise.all([source.run(a, { preempt: pa }), destination.run(b)]);
    assert.equal(rd.preempt ?? false, preempt);
    const rss1 = process.memoryUsage().rss;
    assert.ok(rs.digests.every((d) => d.match) && rd.digests.every((d) => d.match));
    assert.deepEqual(rawDigest(dst), rawDigest(src));
    const q = rs.requests as NonNullable<typeof rs.requests>;
    assert.equal(q.refused, 8, "the 8 whole-region requests are refused");
    assert.ok(refused.length === 8 && refused.every((e) => e.code === "REQUEST_REFUSED"));
    assert.ok(q.requests >= flooded + 8);
    assert.ok(q.pagesQueued <= pages0 + (8 * MiB) / 4096, `each page at most once: ${q.pagesQueued}`);
    assert.ok(q.duplicates >= 7 * pages0, `asked again, not queued again: ${q.duplicates}`);
    // The serving socket never held more than the bound plus the one page record that crossed it.
    assert.ok(q.maxQueuedBytes <= REQUEST_QUEUE_BYTES + 4096 + 64, `queued ${q.maxQueuedBytes}`);
    // Unbounded, the same flood queued 8 x 8 x 32 MiB of page copies; the destination's own
    // 40 MiB of memory is most of what grows here.
    assert.ok(rss1 - rss0 < 160 * MiB, `rss grew ${((rss1 - rss0) / MiB).toFixed(0)} MiB`);
    src.close();
    dst.close();
  });

test("the source checks the destination: another CA's server, a wrong name, a unix endpoint without a name: AUTH_FAILED, nothing sent", async () => {
  const foreign = await MigrationListener.listen(loopback, { tls: server(creds.foreign) });
  await assert.rejects(connectEndpoint(foreign.endpoint, { tls: client(creds.good) }), (e: MigrationError) => {
    assert.equal(e.code, "AUTH_FAILED");
    return true;
  });
  const ours = await MigrationListener.listen(loopback, { tls: server(creds.good) });
  await assert.rejects(
    connectEndpoint(ours.endpoint, { tls: client(creds.good, "db.example") }),
    (e: MigrationError) => e.code === "AUTH_FAILED" && /db\.example/.test(e.message),
  );
  const unix = await MigrationListener.listen(
    { kind: "unix", path: join(creds.root, "mig.sock") },
    { tls: server(creds.good) },
  );
  await assert.rejects(
    connectEndpoint(unix.endpoint, { tls: client(creds.good) }),
    (e: MigrationError) => e.code === "AUTH_FAILED" && /--tls-hostname/.test(e.message),
  );
  const named = await connectEndpoint(unix.endpoint, { tls: client(creds.good, "localhost") });
  named.destroy();
  await Promise.all([foreign.close(), ours.close(), unix.close()]);
});

test("TLS 1.3 with a pre-shared key (QEMU's keys.psk): the right key migrates, another key is refused", async () => {
  const keys = loadPskFile(creds.psk);
  const l = await MigrationListener.listen(loopback, { tls: { kind: "psk", keys, authz: CLIENT_CN } });
  const [identity, key] = [...keys][0] as [string, Buffer];
  const wrong = [...loadPskFile(creds.intruderPsk)][0] as [string, Buffer];
  await assert.rejects(
    connectEndpoint(l.endpoint, { tls: { kind: "psk", identity: wrong[0], key: wrong[1] } }),
    (e: MigrationError) => e.code === "AUTH_FAILED",
  );
  const src = makeMemory();
  const dst = makeMemory();
  fillPattern(src);
  const s = await connectEndpoint(l.endpoint, { tls: { kind: "psk", identity, key } });
  assert.equal((s as tls.TLSSocket).getProtocol(), "TLSv1.3");
  const [rs] = await Promise.all([
    new MigrationSource({ memory: src }).run(s),
    l.accept().then((d) => {
      assert.deepEqual(peerIdentity(d), { kind: "psk", name: CLIENT_CN });
      return new MigrationDestination({ memory: dst }).run(d);
    }),
  ]);
  assert.ok(rs.digests.every((d) => d.match));
  assert.deepEqual(rawDigest(dst), rawDigest(src));
  assert.ok(l.stats.unauthenticated >= 1);
  await l.close();
  src.close();
  dst.close();
});

test("a destination that never says RESUMED: the source gives up at its deadline, typed, and runs on", async () => {
  const src = makeMemory();
  fillPattern(src);
  const [a, b] = await socketPair();
  b.resume(); // reads everything, answers nothing
  const h = hooks();
  await assert.rejects(
    new MigrationSource({ memory: src, hooks: h, deadlines: { resumedMs: 300 } }).run(a),
    (e: MigrationError) => e.code === "CONNECTION_LOST" && /RESUMED/.test(e.message),
  );
  assert.equal(h.stopped, 1);
  assert.equal(h.resumed, 1, "the source resumed its writers");
  b.destroy();
  src.close();
});

test("an inherited fd (`--listen fd:N` / `--to fd:N`) gets the same TLS, authorization and first-record check", async () => {
  for (const who of [creds.intruder, creds.good]) {
    const [ua, ub] = UnixSocket.pair();
    const fa = ua.fd.release();
    const fb = ub.fd.release();
    const src = makeMemory();
    const dst = makeMemory();
    fillPattern(src);
    const accepted = acceptEndpoint({ kind: "fd", fd: fb }, { tls: server(creds.good, CLIENT_CN) });
    const s = await connectEndpoint({ kind: "fd", fd: fa }, { tls: client(who, "localhost") });
    const sourceRun = new MigrationSource({ memory: src }).run(s);
    if (who === creds.intruder) {
      await assert.rejects(accepted, (e: MigrationError) => e.code === "AUTH_FAILED" && /intruder/.test(e.message));
      await assert.rejects(sourceRun, (e: unknown) => e instanceof MigrationError);
    } else {
      const [rs] = await Promise.all([
        sourceRun,
        accepted.then((d) => new MigrationDestination({ memory: dst }).run(d)),
      ]);
      assert.ok(rs.digests.every((d) => d.match));
      assert.deepEqual(rawDigest(dst), rawDigest(src));
    }
    src.close();
    dst.close();
  }
});

const cli = new URL("../../src/cli/main.js", import.meta.url).pathname;

function runCli(args: string[]): Promise<{ code: number | null; stderr: string; stdout: string }> {
  return new Promise((resolve) => {
    const p = spawn(process.execPath, [cli, "migrate", ...args], { stdio: ["ignore", "pipe", "pipe"] });
    let stderr = "";
    let stdout = "";
    p.stderr.on("data", (d) => {
      stderr += d;
    });
    p.stdout.on("data", (d) => {
      stdout += d;
    });
    p.on("exit", (code) => resolve({ code, stderr, stdout }));
  });
}

test("`vmshift migrate`: plain beyond loopback exits 2 naming --tls-creds and --insecure; --insecure allows it", async () => {
  for (const args of [
    ["--listen", "tcp:0.0.0.0:0"],
    ["--to", "tcp:192.0.2.1:4444"],
  ]) {
    const r = await runCli([...args, "--size", "4"]);
    assert.equal(r.code, 2, r.stderr);
    assert.match(r.stderr, /--tls-creds/);
    assert.match(r.stderr, /--insecure/);
  }
  const bad = await runCli(["--listen", "tcp:127.0.0.1:0", "--tls-creds", "/nonexistent", "--size", "4"]);
  assert.equal(bad.code, 2, bad.stderr);
  // --insecure: it listens (and is stopped).
  const p = new JsonLines(
    spawn(process.execPath, [cli, "migrate", "--listen", "tcp:0.0.0.0:0", "--insecure", "--size", "4"], {
      stdio: ["ignore", "pipe", "pipe"],
    }),
  );
  await until(() => p.stderr.includes("listening"), 10_000, "the --insecure destination to listen");
  p.child.kill("SIGKILL");
});

test("`vmshift migrate` over TLS: an intruder's source exits 1, the real one migrates, both exit 0 with equal digests", async () => {
  const dst = new JsonLines(
    spawn(
      process.execPath,
      [cli, "migrate", "--listen", "tcp:127.0.0.1:0", "--size", "16", "--json"].concat([
        "--tls-creds",
        creds.good,
        "--tls-authz",
        CLIENT_CN,
      ]),
      { stdio: ["ignore", "pipe", "pipe"] },
    ),
  );
  const exited = dst.exit(60_000);
  try {
    await until(() => /listening on tcp:127\.0\.0\.1:\d+/.test(dst.stderr), 10_000, "listening");
    const ep = (/listening on (tcp:127\.0\.0\.1:\d+)/.exec(dst.stderr) as RegExpExecArray)[1] as string;
    const evil = await runCli(["--to", ep, "--size", "16", "--tls-creds", creds.intruder, "--json"]);
    assert.equal(evil.code, 1, evil.stderr);
    const real = await runCli(["--to", ep, "--size", "16", "--mode", "postcopy", "--tls-creds", creds.good, "--json"]);
    assert.equal(real.code, 0, real.stderr);
    assert.equal(await exited, 0, dst.tail());
    const rs = real.stdout
      .split("\n")
      .filter((x) => x.startsWith("{"))
      .map((x) => JSON.parse(x) as Record<string, unknown>)
      .find((e) => e.event === "complete") as Record<string, unknown>;
    const rd = await dst.next("complete", 1000);
    // The versioned `complete` event carries the result (docs/events.schema.json).
    type Result = { result: { digests: { source: string; destination: string }[] } };
    assert.deepEqual(
      (rs as unknown as Result).result.digests.map((d) => d.source),
      (rd as unknown as Result).result.digests.map((d) => d.destination),
    );
  } finally {
    dst.child.kill("SIGKILL");
  }
});
