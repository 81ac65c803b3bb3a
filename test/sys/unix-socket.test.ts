/**
 * UnixSocket/UnixListener: partial writes, ordering, end of stream, errors, fd limits.
 */
import assert from "node:assert/strict";
import { test } from "node:test";
import { SysError } from "../../src/sys/errors.js";
import { EventFd } from "../../src/sys/eventfd.js";
import { type Fd, isOpenFd } from "../../src/sys/fd.js";
import { createMemfd } from "../../src/sys/memfd.js";
import { type Chunk, MAX_FDS_PER_MESSAGE, UnixSocket } from "../../src/sys/unix-socket.js";

const MiB = 1024 * 1024;

function pattern(len: number, seed: number): Uint8Array {
  const b = new Uint8Array(len);
  let x = seed;
  for (let i = 0; i < len; i++) {
    x = (x * 1103515245 + 12345) >>> 0;
    b[i] = x >>> 24;
  }
  return b;
}

/** Collects everything `s` receives until `total` bytes arrived (or the peer ends). */
function collect(s: UnixSocket, total: number): Promise<{ data: Uint8Array; chunks: Chunk[] }> {
  return new Promise((resolve, reject) => {
    const out = new Uint8Array(total);
    const chunks: Chunk[] = [];
    let n = 0;
    s.startReceiving(
      (c) => {
        chunks.push(c);
        if (n + c.data.length > total) return reject(new Error(`received more than ${total} bytes`));
        out.set(c.data, n);
        n += c.data.length;
        if (n === total) {
          s.stopReceiving();
          resolve({ data: out, chunks });
        }
      },
      (e) => reject(e ?? new Error(`ended after ${n} of ${total} bytes`)),
    );
  });
}

test("an 8 MiB message (far above the socket buffer) arrives whole after partial writes", async () => {
  const [a, b] = UnixSocket.pair();
  const big = pattern(8 * MiB, 1);
  const recv = collect(b, big.length);
  const first = a.trySend(big);
  assert.ok(first !== null && first < big.length, `one sendmsg takes only part of 8 MiB (took ${first})`);
  await a.send(big.subarray(first)); // the rest: partial writes again, resumed on writability
  const { data, chunks } = await recv;
  assert.ok(chunks.length > 1, "the data came in several chunks");
  assert.ok(Buffer.from(data).equals(Buffer.from(big)), "reassembled exactly");
  a.close();
  b.close();
});

test("queued sends keep their order across partial writes", async () => {
  const [a, b] = UnixSocket.pair();
  const parts = Array.from({ length: 6 }, (_, i) => pattern(MiB + i * 777, i + 10));
  const total = parts.reduce((n, p) => n + p.length, 0);
  const recv = collect(b, total);
  const sent = parts.map((p) => a.send(p)); // all queued before any completes
  const order: number[] = [];
  sent.forEach((p, i) => {
    void p.then(() => order.push(i));
  });
  await Promise.all(sent);
  assert.deepEqual(order, [0, 1, 2, 3, 4, 5], "sends resolve in order");
  const { data } = await recv;
  let off = 0;
  for (const p of parts) {
    assert.ok(Buffer.from(data.subarray(off, off + p.length)).equals(Buffer.from(p)));
    off += p.length;
  }
  a.close();
  b.close();
});

test("a socket that is receiving can also send more than its buffer (both directions at once)", async () => {
  const [a, b] = UnixSocket.pair();
  const big = pattern(4 * MiB, 7);
  const toB = collect(b, big.length);
  const toA = collect(a, big.length);
  await Promise.all([a.send(big), b.send(big)]);
  assert.ok(Buffer.from((await toB).data).equals(Buffer.from(big)));
  assert.ok(Buffer.from((await toA).data).equals(Buffer.from(big)));
  a.close();
  b.close();
});

test("peer close: onEnd runs exactly once, without an error", async () => {
  const [a, b] = UnixSocket.pair();
  let ends = 0;
  let endError: Error | undefined;
  const chunks: Chunk[] = [];
  const ended = new Promise<void>((resolve) => {
    b.startReceiving(
      (c) => chunks.push(c),
      (e) => {
        ends++;
        endError = e;
        resolve();
      },
    );
  });
  await a.send(Uint8Array.of(1, 2, 3));
  a.close();
  await ended;
  for (let i = 0; i < 5; i++) await new Promise<void>((r) => setImmediate(r));
  assert.equal(ends, 1);
  assert.equal(endError, undefined);
  assert.deepEqual(
    chunks.map((c) => [...c.data]),
    [[1, 2, 3]],
  );
  b.close();
  assert.equal(ends, 1, "close after end does not call onEnd again");
});

test("send after close rejects with SysError EBADF; send to a closed peer rejects with EPIPE", async () => {
  const [a, b] = UnixSocket.pair();
  a.close();
  await assert.rejects(a.send(Uint8Array.of(1)), (e: unknown) => {
    assert.ok(e instanceof SysError);
    assert.equal(e.code, "EBADF");
    assert.equal(e.syscall, "sendmsg");
    return true;
  });
  await assert.rejects(b.send(Uint8Array.of(1)), (e: unknown) => {
    assert.ok(e instanceof SysError);
    assert.equal(e.code, "EPIPE");
    return true;
  });
  b.close();
});

test("close() with sends still queued rejects them", async () => {
  const [a, b] = UnixSocket.pair();
  const p = a.send(pattern(8 * MiB, 3)); // cannot complete: nobody reads b
  const q = a.send(Uint8Array.of(9));
  a.close();
  await assert.rejects(p, SysError);
  await assert.rejects(q, SysError);
  b.close();
});

test("up to 8 fds ride in one message; 9 are rejected with a clear error", async () => {
  const [a, b] = UnixSocket.pair();
  const fds: Fd[] = Array.from({ length: MAX_FDS_PER_MESSAGE }, (_, i) => createMemfd(`fd${i}`, 4096 * (i + 1)));
  const recv = new Promise<Chunk>((resolve, reject) =>
    b.startReceiving(resolve, (e) => reject(e ?? new Error("ended"))),
  );
  await a.send(Uint8Array.of(42), fds);
  const c = await recv;
  b.stopReceiving();
  assert.deepEqual([...c.data], [42]);
  assert.equal(c.fds.length, 8);
  assert.equal(c.fdsTruncated, false);
  // Received fds are new descriptors for the same files, in order.
  const { fileSize } = await import("../../src/sys/memfd.js");
  assert.deepEqual(
    c.fds.map((f) => fileSize(f)),
    fds.map((_, i) => 4096 * (i + 1)),
  );
  for (const f of c.fds) f.close();

  const nine = [...fds, createMemfd("fd8", 4096)];
  await assert.rejects(a.send(Uint8Array.of(1), nine), { name: "RangeError", message: /at most 8 fds per message/ });
  assert.throws(() => a.trySend(Uint8Array.of(1), nine), { name: "RangeError", message: /at most 8 fds/ });
  for (const f of nine) {
    assert.ok(isOpenFd(f.fd), "a rejected send does not take ownership of the fds");
    f.close();
  }
  a.close();
  b.close();
});

test("an EventFd sent over a socket rings in the receiver", async () => {
  const [a, b] = UnixSocket.pair();
  const e = new EventFd();
  const recv = new Promise<Chunk>((resolve, reject) =>
    b.startReceiving(resolve, (err) => reject(err ?? new Error("ended"))),
  );
  await a.send(Uint8Array.of(0), [e.fd]);
  const c = await recv;
  const remote = new EventFd(c.fds[0]);
  remote.signal(3n);
  assert.equal(e.drain(), 3n);
  remote.close();
  e.close();
  a.close();
  b.close();
});
