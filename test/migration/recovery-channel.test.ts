/**
 * The recovery module and MigrationChannel on their own, over real TCP sockets: a channel is
 * replaced mid-stream on both sides in one step, a stray connection is turned away, the limit
 * holds, and the preempt connection goes with the channel it belongs to.
 */
import assert from "node:assert/strict";
import { createServer, type Server, type Socket } from "node:net";
import { test } from "node:test";
import { MigrationChannel, RecordReader, RecordWriter } from "../../src/migration/channel.js";
import { MigrationError } from "../../src/migration/errors.js";
import {
  decodePageRequest,
  decodeRound,
  encodeNonce,
  encodeRound,
  encodeStreamHeader,
  RecordType,
} from "../../src/migration/format.js";
import { PageSet } from "../../src/migration/page-set.js";
import { answerRecovery, offerRecovery, recoverConnection } from "../../src/migration/recovery.js";
import { connectEndpoint } from "../../src/migration/transport.js";
import { countFds } from "./helpers.js";

/** A listener whose connections are taken in order with accept(). */
async function listen(): Promise<{ server: Server; port: number; accept(): Promise<Socket>; close(): void }> {
  const queue: Socket[] = [];
  const waiters: ((s: Socket) => void)[] = [];
  const all: Socket[] = [];
  const server = createServer((s) => {
    all.push(s);
    s.on("error", () => undefined);
    const w = waiters.shift();
    if (w) w(s);
    else queue.push(s);
  });
  await new Promise<void>((r) => server.listen(0, "127.0.0.1", r));
  const port = (server.address() as { port: number }).port;
  return {
    server,
    port,
    accept: () => {
      const s = queue.shift();
      return s ? Promise.resolve(s) : new Promise((r) => waiters.push(r));
    },
    close: () => {
      server.close();
      for (const s of all) s.destroy();
    },
  };
}

const connect = (port: number) => connectEndpoint({ kind: "tcp", host: "127.0.0.1", port });
const lost = new MigrationError("CONNECTION_LOST", "the test cut the connection");
const PAGES = 64;

test("recovery: a channel replaced mid-stream on both sides, a stray turned away first", async () => {
  const fds = countFds();
  const l = await listen();
  const nonce = 0x1234_5678_9abcn;
  try {
    const [a, b] = await Promise.all([connect(l.port), l.accept()]);
    const src = MigrationChannel.over(a, {}, {});
    const dst = MigrationChannel.over(b, { reuseBuffer: true });
    // Mid-stream: rounds 1..3 cross, then the connection is cut.
    for (let r = 1; r <= 3; r++) await src.writer.write(encodeRound(r, r * 4096));
    for (let r = 1; r <= 3; r++) assert.equal(decodeRound((await dst.reader.next()).payload).round, r);
    const before = src.bytesWritten;
    const old = { a, b };
    a.destroy();
    await assert.rejects(dst.reader.next(), { code: "TRUNCATED" });
    src.drop();
    dst.drop();

    // The destination holds pages 0..9 and waits on page 40.
    const present = new PageSet(PAGES);
    for (let p = 0; p < 10; p++) present.set(p);
    const refused: MigrationError[] = [];
    let strayDone = false;
    const destination = recoverConnection({
      limitMs: 10_000,
      cause: lost,
      peer: null,
      role: "destination",
      candidate: () => l.accept(),
      handshake: (s, deadline) =>
        answerRecovery(s, nonce, [present], [[0, 40]], async (p) => {
          const left = deadline - performance.now();
          return Promise.race([p, new Promise<never>((_, rej) => setTimeout(() => rej(new Error("late")), left))]);
        }),
      fatal: (e) => e.code === "ABORTED",
      refused: (e) => refused.push(e),
    });
    const source = recoverConnection({
      limitMs: 10_000,
      cause: lost,
      peer: null,
      role: "source",
      retryMs: 10,
      candidate: async () => {
        // Somebody else's recovery connection (another nonce) reaches the listener first.
        if (!strayDone) {
          strayDone = true;
          const stray = await connect(l.port);
          stray.on("error", () => undefined);
          stray.write(encodeStreamHeader());
          stray.write(encodeNonce(RecordType.Recover, nonce + 1n));
        }
        return connect(l.port);
      },
      handshake: (s, deadline) => offerRecovery(s, nonce, [PAGES], deadline),
      fatal: (e) => e.code === "PEER_FAILED" || e.code === "BAD_RECORD",
    });
    const [dParts, sGot] = await Promise.all([destination, source]);
    // One step each: the old connection is gone, the new one is the channel.
    dst.replace(dParts);
    src.replace(sGot.parts);
    assert.ok(old.a.destroyed && old.b.destroyed);
    assert.equal(src.replacements, 1);
    assert.equal(dst.replacements, 1);
    assert.equal(refused.length, 1);
    assert.equal(refused[0]?.code, "BAD_RECORD");
    // What the destination holds, as the source now knows it; the page it waits on, asked again.
    assert.equal(sGot.held[0]?.count(), 10);
    assert.ok(sGot.held[0]?.has(9) && !sGot.held[0]?.has(10));
    const again = await src.reader.next();
    assert.equal(again.type, RecordType.PageRequest);
    assert.deepEqual(decodePageRequest(again.payload), { region: 0, page: 40, count: 1 });
    // The stream goes on over the new connection, counted from its own start.
    await src.writer.write(encodeRound(4, 0));
    const r4 = await dst.reader.next();
    assert.equal(decodeRound(r4.payload).round, 4);
    assert.ok(r4.offset < 64, `offset ${r4.offset} is on the new connection`);
    assert.ok(src.bytesWritten > before, "bytes of both connections are counted");
    src.destroy();
    dst.destroy();
  } finally {
    l.close();
  }
  // Closed sockets leave the fd table once their close has run.
  for (let i = 0; i < 100 && countFds() > fds; i++) await new Promise((r) => setImmediate(r));
  assert.ok(countFds() <= fds, "fds leaked (sockets)");
});

test("recovery: no connection within the limit is CONNECTION_LOST naming the limit and the cause", async () => {
  const l = await listen();
  try {
    const t0 = performance.now();
    await assert.rejects(
      recoverConnection({
        limitMs: 300,
        cause: lost,
        peer: null,
        role: "destination",
        candidate: () => new Promise<never>(() => undefined) as Promise<never>,
        handshake: async () => undefined,
        fatal: () => false,
      }).catch((e) => {
        throw e;
      }),
      (e: unknown) =>
        e instanceof MigrationError && e.code === "CONNECTION_LOST" && /not recovered within 300 ms/.test(e.message),
    );
    assert.ok(performance.now() - t0 >= 290);
  } finally {
    l.close();
  }
});

test("recovery: a fatal answer ends the loop at once (the destination failed)", async () => {
  const l = await listen();
  try {
    const destination = (async () => {
      const s = await l.accept();
      const r = new RecordReader(s);
      await r.readStreamHeader();
      await r.next();
      // FAIL instead of RECEIVED.
      const { encodeFail } = await import("../../src/migration/format.js");
      s.end(encodeFail("BAD_PAGE", "it failed here"));
      r.detach();
    })();
    await assert.rejects(
      recoverConnection({
        limitMs: 10_000,
        cause: lost,
        peer: null,
        role: "source",
        retryMs: 10,
        candidate: () => connect(l.port),
        handshake: (s, deadline) => offerRecovery(s, 1n, [PAGES], deadline),
        fatal: (e) => e.code === "PEER_FAILED",
      }),
      { code: "PEER_FAILED" },
    );
    await destination;
  } finally {
    l.close();
  }
});

test("channel: the preempt connection is owned by the channel and goes with the connection it belongs to", async () => {
  const l = await listen();
  try {
    const [a, b] = await Promise.all([connect(l.port), l.accept()]);
    const [p, q] = await Promise.all([connect(l.port), l.accept()]);
    const ch = MigrationChannel.over(a);
    ch.attachPreempt(p);
    assert.equal(ch.preempt, p);
    // Handed back: the channel no longer owns it.
    assert.equal(ch.detachPreempt(), p);
    assert.equal(ch.preempt, null);
    ch.attachPreempt(p);
    const [c, d] = await Promise.all([connect(l.port), l.accept()]);
    ch.replace({ stream: c, reader: new RecordReader(c), writer: new RecordWriter(c) });
    assert.ok(a.destroyed && p.destroyed, "the old connection and its preempt connection are destroyed");
    assert.equal(ch.preempt, null);
    assert.throws(
      () => ch.replace({ stream: c, reader: new RecordReader(c), writer: new RecordWriter(c) }),
      /its own connection/,
    );
    ch.destroy();
    assert.ok(c.destroyed);
    for (const s of [b, q, d]) s.destroy();
  } finally {
    l.close();
  }
});
