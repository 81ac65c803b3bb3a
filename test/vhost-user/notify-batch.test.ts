/**
 * Used-buffer notifications from a queue worker: never one too few, and no more than the
 * driver's suppression asks for. Without EVENT_IDX one call (eventfd write) covers a batch of
 * completions; with it the driver is asked after every completion, so a sleeping driver hears of
 * a batch's first completion at once and an awake one gets none. A driver that re-arms and
 * sleeps must always be woken (a missed notification hangs a guest's I/O for good).
 */
import assert from "node:assert/strict";
import { test } from "node:test";
import { echoDevice } from "../../src/devices/examples/echo.js";
import { VhostUserDaemon } from "../../src/vhost-user/backend/daemon.js";
import type { VhostUserDevice } from "../../src/vhost-user/backend/device.js";
import { SplitQueueDriver } from "../../src/virtio/driver.js";
import { features, VIRTIO_RING_F_EVENT_IDX } from "../../src/virtio/features.js";
import { PackedQueueDriver } from "../../src/virtio/packed-driver.js";
import { asyncDevice } from "../helpers/async-device.js";
import { HOLD, holdDevice } from "../helpers/hold-device.js";
import { tempSocketPath } from "../helpers/temp-socket.js";
import { connectWith, type RawFrontend, setUpRaw } from "./raw-frontend.js";

type Driver = SplitQueueDriver | PackedQueueDriver;
type Front = RawFrontend<Driver>;

async function withQueue(
  device: VhostUserDevice,
  ring: "split" | "packed",
  eventIdx: boolean,
  fn: (f: Front) => Promise<void>,
): Promise<void> {
  const path = tempSocketPath(`notify-${ring}-${eventIdx ? "idx" : "flags"}`);
  const dev = ring === "packed" ? { ...device, info: { ...device.info, packedRing: true } } : device;
  const daemon = VhostUserDaemon.listen(dev, path);
  const serving = daemon.serve();
  const o = { features: eventIdx ? features(VIRTIO_RING_F_EVENT_IDX) : 0n };
  const f = connectWith<Driver>(path, undefined, (mem) =>
    ring === "packed" ? PackedQueueDriver.at(mem, 0x10000, 64, o) : SplitQueueDriver.at(mem, 0x10000, 64, o),
  );
  try {
    await setUpRaw(f, { eventIdx });
    await fn(f);
  } finally {
    f.close();
    await daemon.close();
    await serving;
  }
}

/** Echo request `slot`: its first byte is the async device's delay in ms. */
function add(f: Front, slot: number, delayMs: number): number {
  const src = 0x100000 + slot * 0x100;
  f.mem.write(src, Uint8Array.of(delayMs, slot & 0xff, 7));
  return f.driver.add([{ addr: src, len: 3 }], [{ addr: 0x200000 + slot * 0x100, len: 3 }]);
}

/** Counts call notifications (eventfd writes, summed from the counter) as they come. */
class Calls {
  count = 0n;
  #waiters: (() => void)[] = [];
  readonly #watch;
  constructor(f: Front) {
    this.#watch = f.call.onSignal((n) => {
      this.count += n;
      for (const w of this.#waiters.splice(0)) w();
    });
  }
  /** Resolves once more than `since` calls came; rejects after `ms` (a notification was missed). */
  after(since: bigint, ms: number, what: string): Promise<void> {
    if (this.count > since) return Promise.resolve();
    return new Promise((resolve, reject) => {
      const t = setTimeout(() => reject(new Error(`no notification within ${ms} ms: ${what}`)), ms);
      this.#waiters.push(() => {
        clearTimeout(t);
        resolve();
      });
    });
  }
  close(): void {
    this.#watch.close();
  }
}

for (const ring of ["split", "packed"] as const) {
  test(`${ring}: a batch of inline completions is one notification, not one per request (no EVENT_IDX)`, async () => {
    await withQueue(echoDevice(), ring, false, async (f) => {
      const calls = new Calls(f);
      try {
        const heads = new Set<number>();
        for (let s = 0; s < 8; s++) heads.add(add(f, s, 0));
        f.driver.publish();
        f.kick.signal();
        await calls.after(0n, 10_000, "the batch of 8");
        const used: number[] = [];
        for (let u = f.driver.getUsed(); u; u = f.driver.getUsed()) used.push(u.head);
        assert.deepEqual(new Set(used), heads, "all 8 were in the used ring before the notification");
        // GET_VRING_BASE: the worker has finished with the ring (and sent what it would send).
        await f.conn.request("GET_VRING_BASE", { index: 0, num: 0 });
        f.call.drain();
        assert.equal(calls.count, 1n, "one call for the batch (the worker used to send 8)");
      } finally {
        calls.close();
      }
    });
  });

  test(`${ring}: EVENT_IDX, a batch of 32 to a driver that re-armed once is one call, not one per completion`, async () => {
    await withQueue(echoDevice(), ring, true, async (f) => {
      const calls = new Calls(f);
      try {
        assert.equal(f.driver.enableInterrupts(), false);
        const heads = new Set<number>();
        for (let s = 0; s < 32; s++) heads.add(add(f, s, 0));
        f.driver.publish();
        f.kick.signal();
        await calls.after(0n, 10_000, "the batch of 32");
        // GET_VRING_BASE: the worker has finished with the ring (and sent what it would send).
        await f.conn.request("GET_VRING_BASE", { index: 0, num: 0 });
        f.call.drain();
        const used = new Set<number>();
        for (let u = f.driver.getUsed(); u; u = f.driver.getUsed()) used.add(u.head);
        assert.deepEqual(used, heads);
        assert.equal(calls.count, 1n, "asked after every completion, the driver said yes once");
      } finally {
        calls.close();
      }
    });
  });

  test(`${ring}: EVENT_IDX, a sleeping driver hears of a batch's first completion while the rest is still being served`, async () => {
    const hold = holdDevice();
    await withQueue(hold.device, ring, true, async (f) => {
      const calls = new Calls(f);
      try {
        // The driver re-arms (used_event / off_wrap at its next used position) and sleeps.
        assert.equal(f.driver.enableInterrupts(), false);
        const first = add(f, 0, 0);
        const second = add(f, 1, HOLD);
        f.driver.publish();
        f.kick.signal();
        // The worker is still inside the second request when the call for the first comes (it
        // used to wait for 16 completions or the end of the batch: here, for ever).
        await calls.after(0n, 10_000, "the first completion of the batch");
        // The second cannot complete before the test releases it.
        assert.equal(f.driver.getUsed()?.head, first);
        assert.equal(f.driver.getUsed(), null, "the second request is still being served");
        hold.release();
        // Re-armed again, the driver is woken for the second one too.
        const since = calls.count;
        if (!f.driver.enableInterrupts()) await calls.after(since, 10_000, "the second completion");
        assert.equal(f.driver.getUsed()?.head, second);
        await f.conn.request("GET_VRING_BASE", { index: 0, num: 0 });
        f.call.drain();
        assert.ok(calls.count <= 2n, `one call per re-arm (${calls.count})`);
      } finally {
        hold.release();
        calls.close();
      }
    });
  });

  test(`${ring}: EVENT_IDX, requests completing out of order on other threads: a re-armed driver is always woken`, async () => {
    await withQueue(asyncDevice(), ring, true, async (f) => {
      const calls = new Calls(f);
      // A deterministic mix of batch sizes and delays (0-3 ms), completing in any order.
      let x = 12345;
      const rnd = (n: number) => {
        x = (x * 1103515245 + 12345) >>> 0;
        return x % n;
      };
      try {
        let slot = 0;
        let completed = 0;
        let submitted = 0;
        for (let round = 0; round < 150; round++) {
          const n = 1 + rnd(8);
          for (let i = 0; i < n; i++) add(f, slot++ % 64, rnd(4));
          submitted += n;
          if (f.driver.publish()) f.kick.signal();
          // Linux's virtio loop: collect, re-arm, look again, and only then sleep.
          while (completed < submitted) {
            const since = calls.count;
            let got = 0;
            for (let u = f.driver.getUsed(); u; u = f.driver.getUsed()) got++;
            completed += got;
            if (got > 0 || completed === submitted) continue;
            if (f.driver.enableInterrupts()) continue;
            await calls.after(since, 10_000, `round ${round}: ${submitted - completed} request(s) outstanding`);
          }
          // Sometimes the driver keeps interrupts off for a while (NAPI-like), then re-arms.
          if (rnd(3) === 0) f.driver.disableInterrupts();
        }
        assert.equal(completed, submitted);
        const perRequest = Number(calls.count) / submitted;
        assert.ok(perRequest <= 1, `at most one notification per request (${calls.count} for ${submitted})`);
      } finally {
        calls.close();
      }
    });
  });
}
