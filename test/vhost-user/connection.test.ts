/**
 * Connection and MessageFramer over a real UnixSocket.pair() with real fds (memfd, eventfd):
 * chunking, fd attribution, reply matching, REPLY_ACK, timeout, disconnect, malformed input, leaks.
 */
import assert from "node:assert/strict";
import { once } from "node:events";
import { test } from "node:test";
import { type Fd, isOpenFd } from "../../src/sys/fd.js";
import { UnixSocket } from "../../src/sys/unix-socket.js";
import { Connection, MessageFramer, type RawMessage } from "../../src/vhost-user/connection.js";
import {
  encodeRequest,
  FRONTEND_INDEX,
  type FrontendRequests,
  type RequestMessage,
  VhostUserError,
} from "../../src/vhost-user/protocol/index.js";
import { eventFd, header, hex, le64, memfds, openFdCount } from "./fixtures.js";

const region = (i: number) => ({
  guestAddress: BigInt(i) << 32n,
  size: 0x1000n,
  userAddress: 0x7f00_0000_0000n + (BigInt(i) << 32n),
  mmapOffset: 0n,
});

function setMemTable(n: number, fds: Fd[]) {
  return encodeRequest(
    FRONTEND_INDEX,
    "SET_MEM_TABLE",
    { regions: Array.from({ length: n }, (_, i) => region(i)) },
    { fds },
  );
}

function pair(options = {}) {
  const [a, b] = UnixSocket.pair();
  const front = Connection.frontend(a, { label: "front", ...options });
  const back = Connection.frontend(b, { label: "back", ...options });
  return { front, back };
}

/** The next `n` requests the back end sees. */
function nextRequests(back: Connection<FrontendRequests>, n: number): Promise<RequestMessage<FrontendRequests>[]> {
  return new Promise((resolve) => {
    const got: RequestMessage<FrontendRequests>[] = [];
    const on = (m: RequestMessage<FrontendRequests>) => {
      got.push(m);
      if (got.length === n) {
        back.off("request", on);
        resolve(got);
      }
    };
    back.on("request", on);
  });
}

function closeFds(msgs: { fds: Fd[] }[]) {
  for (const m of msgs) for (const f of m.fds) f.close();
}

test("framer: a message fed one byte at a time, fds on the first byte", () => {
  const fds = memfds(2);
  const bytes = setMemTable(2, fds).bytes;
  const framer = new MessageFramer();
  const out: RawMessage[] = [];
  for (let i = 0; i < bytes.length; i++) out.push(...framer.push(bytes.subarray(i, i + 1), i === 0 ? fds : []));
  assert.equal(out.length, 1);
  assert.equal(out[0]?.header.size, 72);
  assert.equal(out[0]?.fds.length, 2);
  assert.equal(framer.pendingBytes, 0);
  closeFds(out);
});

test("framer: several messages in one chunk; fds go to the last message starting in it", () => {
  const a = encodeRequest(FRONTEND_INDEX, "GET_FEATURES", undefined).bytes;
  const b = encodeRequest(FRONTEND_INDEX, "SET_VRING_NUM", { index: 0, num: 256 }).bytes;
  const fd = memfds(1);
  const c = encodeRequest(FRONTEND_INDEX, "SET_LOG_BASE", { mmapSize: 4096n, mmapOffset: 0n }, { fds: fd }).bytes;
  const all = new Uint8Array([...a, ...b, ...c]);
  // First chunk: a, b and the first 5 bytes of c (c's sendmsg carried the fd).
  const framer = new MessageFramer();
  const first = framer.push(all.subarray(0, a.length + b.length + 5), fd);
  assert.deepEqual(
    first.map((m) => m.header.request),
    [1, 8],
  );
  assert.ok(first.every((m) => m.fds.length === 0));
  const rest = framer.push(all.subarray(a.length + b.length + 5));
  assert.equal(rest.length, 1);
  assert.equal(rest[0]?.fds.length, 1);
  closeFds(rest);
});

test("framer: fds in a chunk where no message starts are a framing error; they are closed (issue 12: fd hoarding)", () => {
  const bytes = encodeRequest(FRONTEND_INDEX, "SET_VRING_CALL", { index: 0, noFd: false }, { fds: [0] }).bytes;
  const framer = new MessageFramer();
  assert.equal(framer.push(bytes.subarray(0, 4)).length, 0);
  const fd = memfds(1);
  const raw = (fd[0] as Fd).fd;
  assert.throws(
    () => framer.push(bytes.subarray(4), fd),
    (e: unknown) => e instanceof VhostUserError && e.code === "BAD_FD_COUNT" && /middle of a message/.test(e.message),
  );
  assert.equal(isOpenFd(raw), false, "the fd is closed");
  assert.throws(
    () => framer.push(bytes),
    (e: unknown) => e instanceof VhostUserError && e.code === "CLOSED",
  );
});

test("framer: more than 8 fds on one message is a framing error; every fd is closed", () => {
  const bytes = encodeRequest(FRONTEND_INDEX, "SET_VRING_CALL", { index: 0, noFd: false }, { fds: [0] }).bytes;
  const framer = new MessageFramer();
  const fds = memfds(9);
  const raws = fds.map((f) => f.fd);
  assert.throws(
    () => framer.push(bytes, fds),
    (e: unknown) => e instanceof VhostUserError && e.code === "BAD_FD_COUNT" && e.value === 9,
  );
  assert.ok(
    raws.every((r) => !isOpenFd(r)),
    "all 9 closed",
  );
});

test("framer: a header announcing more than the limit is fatal and closes every fd", () => {
  const framer = new MessageFramer(4096);
  const fd = memfds(1);
  const raw = (fd[0] as Fd).fd;
  assert.throws(
    () => framer.push(hex(header(5, 1, 4097)), fd),
    (e: unknown) => e instanceof VhostUserError && e.code === "PAYLOAD_TOO_LARGE" && e.value === 4097,
  );
  assert.ok(!isOpenFd(raw));
  assert.throws(
    () => framer.push(hex("00")),
    (e: unknown) => e instanceof VhostUserError && e.code === "CLOSED",
  );
});

test("socket: a SET_MEM_TABLE sent one byte per sendmsg arrives whole with its 2 memfds", async () => {
  const { front, back } = pair();
  const fds = memfds(2);
  const { bytes } = setMemTable(2, fds);
  const got = nextRequests(back, 1);
  for (let i = 0; i < bytes.length; i++) await front.socket.send(bytes.subarray(i, i + 1), i === 0 ? fds : []);
  const [msg] = await got;
  assert.equal(msg?.name, "SET_MEM_TABLE");
  if (msg?.name !== "SET_MEM_TABLE") return;
  assert.equal(msg.payload.regions.length, 2);
  assert.equal(msg.fds.length, 2);
  assert.ok(msg.fds.every((f) => isOpenFd(f.fd)));
  closeFds([msg]);
  for (const f of fds) f.close();
  front.close();
  back.close();
});

test("socket: three messages in one sendmsg, the eventfd on the kick", async () => {
  const { front, back } = pair();
  const kick = eventFd();
  const parts = [
    encodeRequest(FRONTEND_INDEX, "SET_VRING_NUM", { index: 0, num: 128 }).bytes,
    encodeRequest(FRONTEND_INDEX, "SET_VRING_BASE", { index: 0, num: 0 }).bytes,
    encodeRequest(FRONTEND_INDEX, "SET_VRING_KICK", { index: 0, noFd: false }, { fds: [kick] }).bytes,
  ];
  const got = nextRequests(back, 3);
  // The fd rides on the first byte of the sendmsg; the kernel hands it to the recvmsg that
  // returns that byte, so here all three messages come in one chunk and only the kick may take it.
  await front.socket.send(new Uint8Array(parts.flatMap((p) => [...p])), [kick]);
  const msgs = await got;
  assert.deepEqual(
    msgs.map((m) => m.name),
    ["SET_VRING_NUM", "SET_VRING_BASE", "SET_VRING_KICK"],
  );
  // One sendmsg = one fd-carrying skb = the last message starting in the chunk gets it.
  assert.equal(msgs[2]?.fds.length, 1);
  closeFds(msgs);
  kick.close();
  front.close();
  back.close();
});

test("socket: the kernel glues a plain send before an fd-carrying one; the fd still goes to its message", async () => {
  const [a, b] = UnixSocket.pair();
  const call = eventFd();
  await a.send(encodeRequest(FRONTEND_INDEX, "SET_VRING_NUM", { index: 1, num: 64 }).bytes);
  await a.send(encodeRequest(FRONTEND_INDEX, "SET_VRING_CALL", { index: 1, noFd: false }, { fds: [call] }).bytes, [
    call,
  ]);
  const chunk = b.tryReceive();
  assert.ok(chunk);
  // One recvmsg returned both messages (8 + 12 and 8 + 12 bytes) and the eventfd of the second.
  assert.equal(chunk.data.length, 40);
  assert.equal(chunk.fds.length, 1);
  const out = new MessageFramer().push(chunk.data, chunk.fds, chunk.fdsTruncated);
  assert.deepEqual(
    out.map((m) => [m.header.request, m.fds.length]),
    [
      [8, 0],
      [13, 1],
    ],
  );
  closeFds(out);
  call.close();
  a.close();
  b.close();
});

test("reply matching: concurrent GET_FEATURES / GET_PROTOCOL_FEATURES / GET_VRING_BASE", async () => {
  const { front, back } = pair();
  back.on("request", (m) => {
    if (m.name === "GET_FEATURES") void back.reply(m, 0x1_7500_7e46n);
    else if (m.name === "GET_PROTOCOL_FEATURES") void back.reply(m, 0x8f2bn);
    else if (m.name === "GET_VRING_BASE") void back.reply(m, { index: m.payload.index, num: 42 });
  });
  const [f, p, v] = await Promise.all([
    front.request("GET_FEATURES", undefined),
    front.request("GET_PROTOCOL_FEATURES", undefined),
    front.request("GET_VRING_BASE", { index: 3, num: 0 }),
  ]);
  assert.equal(f?.payload, 0x1_7500_7e46n);
  assert.equal(p?.payload, 0x8f2bn);
  assert.deepEqual(v?.payload, { index: 3, num: 42 });
  front.close();
  back.close();
});

test("REPLY_ACK: NEED_REPLY once negotiated; 0 resolves, non-zero rejects with NACK", async () => {
  const { front, back } = pair();
  front.setProtocolFeatures(0x8f2bn);
  assert.equal(front.replyAck, true);
  const seen: boolean[] = [];
  back.on("request", (m) => {
    seen.push(m.needReply);
    void back.ack(m, m.name === "SET_VRING_ENABLE" && m.payload.index === 1 ? 1n : 0n);
  });
  const ok = await front.request("SET_VRING_ENABLE", { index: 0, num: 1 });
  assert.equal(ok?.payload, 0n);
  await assert.rejects(
    front.request("SET_VRING_ENABLE", { index: 1, num: 1 }),
    (e: unknown) =>
      e instanceof VhostUserError && e.code === "NACK" && e.request === "SET_VRING_ENABLE" && e.value === 1n,
  );
  // A request with an explicit reply does not carry NEED_REPLY ("brings no behavioural change").
  const noAck = await front.request("SET_OWNER", undefined, { needReply: false });
  assert.equal(noAck, null);
  assert.deepEqual(seen.slice(0, 2), [true, true]);
  front.close();
  back.close();
});

test("timeout names the request; the late reply is dropped quietly", async () => {
  const { front, back } = pair();
  const held: RequestMessage<FrontendRequests>[] = [];
  back.on("request", (m) => held.push(m));
  const errors: VhostUserError[] = [];
  front.on("protocolError", (e) => errors.push(e));
  await assert.rejects(
    front.request("GET_FEATURES", undefined, { timeoutMs: 30 }),
    (e: unknown) =>
      e instanceof VhostUserError && e.code === "TIMEOUT" && e.request === "GET_FEATURES" && /30 ms/.test(e.message),
  );
  assert.equal(front.pendingReplies, 0);
  const m = held[0];
  assert.ok(m);
  await back.reply(m as Extract<typeof m, { name: "GET_FEATURES" }>, 1n);
  // The next request still matches its own reply.
  back.removeAllListeners("request");
  back.on("request", (r) => {
    if (r.name === "GET_QUEUE_NUM") void back.reply(r, 4n);
  });
  const q = await front.request("GET_QUEUE_NUM", undefined);
  assert.equal(q?.payload, 4n);
  assert.deepEqual(errors, []);
  front.close();
  back.close();
});

test("peer disconnect fails every pending wait with DISCONNECTED naming the request", async () => {
  const { front, back } = pair();
  back.on("request", () => {});
  const a = front.request("GET_VRING_BASE", { index: 0, num: 0 });
  const b = front.request("GET_MAX_MEM_SLOTS", undefined);
  const closed = once(front, "close");
  await new Promise((r) => setTimeout(r, 10));
  back.close();
  await assert.rejects(
    a,
    (e: unknown) => e instanceof VhostUserError && e.code === "DISCONNECTED" && e.request === "GET_VRING_BASE",
  );
  await assert.rejects(
    b,
    (e: unknown) => e instanceof VhostUserError && e.code === "DISCONNECTED" && e.request === "GET_MAX_MEM_SLOTS",
  );
  await closed;
  assert.equal(front.closed, true);
  await assert.rejects(
    front.request("GET_FEATURES", undefined),
    (e: unknown) => e instanceof VhostUserError && e.code === "CLOSED",
  );
});

test("malformed messages become protocolError events; the connection goes on", async () => {
  const { front, back } = pair();
  const errors: VhostUserError[] = [];
  back.on("protocolError", (e) => errors.push(e));
  const got = nextRequests(back, 1);
  const fd = memfds(1);
  const raw = (fd[0] as Fd).fd;
  await front.socket.send(hex(`${header(9, 1, 39)} ${"00".repeat(39)}`)); // short SET_VRING_ADDR
  await front.socket.send(hex(`${header(45, 1, 0)}`)); // unknown request
  await front.socket.send(hex(`${header(2, 0, 8)} ${le64(0n)}`)); // version 0
  await front.socket.send(hex(`${header(13, 1, 8)} ${le64(0n)}`)); // SET_VRING_CALL without its fd
  await front.socket.send(hex(`${header(3, 1, 0)}`), fd); // SET_OWNER with a stray fd
  await front.request("SET_OWNER", undefined);
  const [ok] = await got;
  assert.equal(ok?.name, "SET_OWNER");
  assert.deepEqual(
    errors.map((e) => e.code),
    ["BAD_SIZE", "UNKNOWN_REQUEST", "BAD_VERSION", "BAD_FD_COUNT", "BAD_FD_COUNT"],
  );
  for (const f of fd) f.close();
  assert.ok(isOpenFd(raw) === false);
  front.close();
  back.close();
});

test("a payload above the limit closes the connection with PAYLOAD_TOO_LARGE", async () => {
  const { front, back } = pair({ maxPayloadSize: 1024 });
  const errors: VhostUserError[] = [];
  back.on("protocolError", (e) => errors.push(e));
  const closed = once(back, "close");
  await front.socket.send(hex(header(24, 1, 1025)));
  const [err] = (await closed) as [VhostUserError];
  assert.equal(err.code, "PAYLOAD_TOO_LARGE");
  assert.equal(errors[0]?.code, "PAYLOAD_TOO_LARGE");
  front.close();
});

test("no fd leaks: fds in good, bad, unexpected and half-received messages are all closed", async () => {
  const before = openFdCount();
  for (let round = 0; round < 3; round++) {
    const { front, back } = pair();
    back.on("protocolError", () => {});
    front.on("protocolError", () => {});
    back.on("request", (m) => {
      for (const f of m.fds) f.close();
      if (m.name === "GET_INFLIGHT_FD") {
        const shm = memfds(1);
        void back.reply(m, { mmapSize: 4096n, mmapOffset: 0n, numQueues: 1, queueSize: 128 }, shm).finally(() => {
          for (const f of shm) f.close();
        });
      } else void back.ack(m);
    });
    const mem = memfds(3);
    await front.request("SET_MEM_TABLE", { regions: [region(0), region(1), region(2)] }, { fds: mem });
    const inflight = await front.request("GET_INFLIGHT_FD", {
      mmapSize: 0n,
      mmapOffset: 0n,
      numQueues: 1,
      queueSize: 128,
    });
    assert.equal(inflight?.fds.length, 1);
    for (const f of inflight?.fds ?? []) f.close();
    // bad: 2 fds for a 3-region table
    await front.socket.send(setMemTable(3, mem).bytes, mem.slice(0, 2));
    // unexpected reply with an fd
    await back.socket.send(hex(`${header(28, 5, 0)}`), mem.slice(0, 1));
    // half a message with fds, then hang up
    await front.socket.send(setMemTable(3, mem).bytes.subarray(0, 20), mem);
    for (const f of mem) f.close();
    await new Promise((r) => setTimeout(r, 20));
    const closed = once(back, "close");
    front.close();
    await closed;
  }
  await new Promise((r) => setTimeout(r, 10));
  assert.equal(openFdCount(), before);
});
