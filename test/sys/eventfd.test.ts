/** EventFd: counter semantics, and a signal from a worker thread waking the main loop. */
import assert from "node:assert/strict";
import { test } from "node:test";
import { EventFd } from "../../src/sys/eventfd.js";
import { startWorker } from "../helpers/workers.js";

test("counter semantics: signals add up, drain takes all, semaphore mode takes one", () => {
  const e = new EventFd();
  assert.equal(e.drain(), 0n, "nothing signalled");
  e.signal(3n);
  e.signal(4n);
  e.signal();
  assert.equal(e.drain(), 8n);
  assert.equal(e.drain(), 0n, "drained");
  e.close();

  const s = new EventFd(undefined, { semaphore: true, initial: 2 });
  assert.equal(s.drain(), 1n);
  assert.equal(s.drain(), 1n);
  assert.equal(s.drain(), 0n);
  s.close();
});

test("a worker signals; the main thread's onSignal sees every count", async () => {
  const e = new EventFd();
  const count = 10;
  const expected = (count * (count + 1)) / 2;
  let total = 0n;
  let calls = 0;
  const reached = new Promise<void>((resolve) => {
    const w = e.onSignal((n) => {
      assert.ok(n > 0n, "onSignal only fires with a non-zero count");
      calls++;
      total += n;
      if (total >= BigInt(expected)) {
        w.close();
        resolve();
      }
    });
  });
  const worker = startWorker({ kind: "eventfd", fd: e.fd.fd, count });
  assert.equal(await worker.next(), "done");
  await reached;
  assert.equal(total, BigInt(expected), "the counter is the sum of the signals");
  assert.ok(calls >= 1 && calls <= count);
  assert.equal(await worker.exited, 0);
  assert.equal(e.drain(), 0n, "nothing left over");
  e.close();
});
