/**
 * A queue worker: one thread per virtqueue. It owns the queue (a SplitQueue, or a PackedQueue
 * when VIRTIO_F_RING_PACKED was negotiated) and the device's handler,
 * waits for kicks in its own event loop, and marks every guest write in the shared dirty log
 * through its own DirtyLogWriter. The fds it uses (kick, call, err) are owned by the control
 * plane, which never closes one before this worker has acknowledged it stopped using it.
 *
 * Postcopy: a guest page that has not arrived blocks this thread in the kernel until the
 * front-end places it; the control plane's thread is never the one that faults.
 *
 * A handler may complete a request later: process() then returns a promise of the used length
 * (vhost-user-blk does its reads and writes on libuv's thread pool). Up to MAX_IN_FLIGHT
 * requests of this queue are then in flight at once and complete in any order; the inflight
 * region records each one. Before the ring stops (GET_VRING_BASE), before a new memory table
 * and before the handler closes, this worker waits until none is in flight.
 */
import { parentPort, workerData } from "node:worker_threads";
import { GuestMemory } from "../../memory/guest-memory.js";
import { DirtyLogWriter } from "../../memory/shared-dirty-log.js";
import { EAGAIN } from "../../sys/errors.js";
import { readRaw, writeRaw } from "../../sys/io.js";
import { READABLE, Watch } from "../../sys/poller.js";
import type { DescriptorChain } from "../../virtio/chain.js";
import { VirtqueueError } from "../../virtio/errors.js";
import { PackedQueue } from "../../virtio/packed.js";
import { decodePackedVringBase } from "../../virtio/packed-ring.js";
import { SplitQueue } from "../../virtio/queue.js";
import type { DeviceVirtqueue } from "../../virtio/virtqueue.js";
import type { QueueHandler, QueueHandlerFactory } from "./device.js";
import { InflightQueue } from "./inflight.js";
import { PackedInflightQueue, type PackedInflightRequest } from "./inflight-packed.js";
import { PollWindow } from "./poll-window.js";
import { WarningLimiter } from "./warning-limiter.js";
import type { FromWorker, RingConfig, ToWorker, WorkerInit } from "./worker-protocol.js";

const port = parentPort;
if (!port) throw new Error("queue-worker must run in a worker thread");
const init = workerData as WorkerInit;
const factory = ((await import(init.module)) as { createQueueHandler?: QueueHandlerFactory }).createQueueHandler;
if (typeof factory !== "function") throw new Error(`${init.module} does not export createQueueHandler`);
const log = DirtyLogWriter.fromHandle(init.log);

let memory: GuestMemory | null = null;
let handler: QueueHandler | null = null;
let features = 0n;
let queue: DeviceVirtqueue | null = null;
let kick: Watch | null = null;
let callFd = -1;
let errFd = -1;
let enabled = false;
let broken = false;
let inflight: InflightQueue | null = null;
let packedInflight: PackedInflightQueue | null = null;
/** Requests that were in flight when the previous back-end died, to run before anything new. */
let resubmit: number[] = [];
let resubmitPacked: PackedInflightRequest[] = [];
/** Requests whose handler returned a promise that has not settled yet. */
let inFlight = 0;
const MAX_IN_FLIGHT = Math.max(1, Number(process.env.VMSHIFT_QUEUE_MAX_IN_FLIGHT ?? 64));
/** processQueue() stopped popping at MAX_IN_FLIGHT: the next completion resumes it. */
let starved = false;
/** No new request is taken (the ring is stopping, or the memory table is being replaced). */
let quiescing = false;
let drainWaiters: (() => void)[] = [];
/** The queue whose batched notification (notifyLater) is still to be sent. */
let notifyPending: DeviceVirtqueue | null = null;
/** Completions published since the last notify(). */
let unnotified = 0;
/**
 * Without EVENT_IDX: most completions one notification waits for while the worker keeps serving
 * inline requests (VMSHIFT_NOTIFY_BATCH): the driver hears of a long batch's first results
 * before the batch ends. With EVENT_IDX every completion is checked (see processQueue).
 */
const NOTIFY_BATCH = Math.max(1, Number(process.env.VMSHIFT_NOTIFY_BATCH ?? 16));
const one = new BigUint64Array([1n]);
const drainBuf = new BigUint64Array(1);

const post = (m: FromWorker) => port.postMessage(m);
const event = (level: "warn" | "error", message: string) => post({ type: "event", level, message });
/** Warnings the guest triggers per chain (malformed chains, failed requests): rate-limited. */
const guestWarnings = new WarningLimiter();
const guestWarn = (message: string) => {
  const m = guestWarnings.admit(message);
  if (m !== null) event("warn", m);
};

function signal(fd: number): void {
  if (fd < 0) return;
  const r = writeRaw(fd, one);
  if (r < 0 && r !== -EAGAIN) guestWarn(`queue ${init.queue}: eventfd write failed (errno ${-r})`);
}

function markDirty(gpa: number, len: number): void {
  log.mark(gpa, len);
}

/**
 * Returns a request. `token`: its inflight entry for a packed ring (what begin() returned),
 * -1 when it is not tracked.
 */
function complete(q: DeviceVirtqueue, head: number, len: number, slots: number, token: number): void {
  if (q instanceof PackedQueue) {
    if (packedInflight && token >= 0) {
      packedInflight.used(token, q.usedPositionAfter(slots), () => q.addUsed(head, len, slots));
    } else q.addUsed(head, len, slots);
    return;
  }
  const s = q as SplitQueue;
  inflight?.beforeUsed(head);
  s.addUsed(head, len);
  inflight?.afterUsed(head, s.nextUsed);
}

/** Records the chain just popped (or refused) as in flight; its token for complete(). */
function begin(q: DeviceVirtqueue, head: number): number {
  if (q instanceof PackedQueue) return packedInflight ? packedInflight.begin(q) : -1;
  inflight?.begin(head);
  return head;
}

function run(q: DeviceVirtqueue, h: QueueHandler, chain: DescriptorChain, token: number): void {
  let r: number | Promise<number>;
  try {
    r = h.process(chain);
  } catch (e) {
    guestWarn(`queue ${init.queue}: request failed: ${(e as Error).message}`);
    r = 0;
  }
  if (typeof r === "number") {
    complete(q, chain.head, r, chain.slots, token);
    unnotified++;
    return;
  }
  inFlight++;
  const head = chain.head;
  const slots = chain.slots;
  r.then(
    (len) => completeLater(q, head, len, slots, token),
    (e) => {
      guestWarn(`queue ${init.queue}: request failed: ${(e as Error).message}`);
      completeLater(q, head, 0, slots, token);
    },
  );
}

/**
 * Sends the used-buffer notification for everything published since the last one, if the driver
 * wants it (needsNotification() applies EVENT_IDX / packed event suppression over the whole
 * batch: it asks whether the batch crossed the driver's event index, not only its last entry).
 */
function notify(q: DeviceVirtqueue): void {
  unnotified = 0;
  try {
    if (!q.broken && q.needsNotification()) signal(callFd);
  } catch {
    // a broken queue was already reported
  }
}

/**
 * Completions of requests that finished on another thread: every one libuv delivers in this
 * turn of the event loop goes into the used ring as it comes, and one notification covers them
 * all, sent from the check phase (setImmediate) right after the poll phase that delivered them.
 * The woken driver competes for the same cores: one wake-up per batch, not one per request.
 */
function notifyLater(q: DeviceVirtqueue): void {
  if (notifyPending === q) return;
  if (notifyPending) flushNotify();
  notifyPending = q;
  setImmediate(flushNotify);
}

/**
 * Sends a batched notification now. Done before the worker acknowledges a stop, a new memory
 * table or close: after that acknowledgement the control plane may close the call fd.
 */
function flushNotify(): void {
  const q = notifyPending;
  if (!q) return;
  notifyPending = null;
  notify(q);
}

/** A request whose handler finished asynchronously: publish it; the notification is batched. */
function completeLater(q: DeviceVirtqueue, head: number, len: number, slots: number, token: number): void {
  inFlight--;
  try {
    if (!q.broken) {
      complete(q, head, len, slots, token);
      unnotified++;
    }
  } catch (e) {
    event("error", `queue ${init.queue}: completing head ${head}: ${(e as Error).message}`);
  }
  if (inFlight === 0 && drainWaiters.length > 0) {
    // Someone waits for the queue to drain (stop, new memory table, close): the driver hears of
    // this completion before that goes on.
    if (unnotified > 0) notifyLater(q);
    flushNotify();
    for (const w of drainWaiters.splice(0)) w();
  }
  if (starved && !quiescing && queue === q) {
    starved = false;
    // processQueue() notifies at the end of its batch, this completion included.
    processQueue();
  }
  if (unnotified > 0) notifyLater(q);
}

/**
 * Resolves once no request is in flight (at most `ms`; false when some still were), with every
 * batched notification sent.
 */
function drained(ms = 10_000): Promise<boolean> {
  if (inFlight === 0) {
    flushNotify();
    return Promise.resolve(true);
  }
  return new Promise((resolve) => {
    const t = setTimeout(() => {
      drainWaiters = drainWaiters.filter((w) => w !== done);
      resolve(false);
    }, ms);
    const done = () => {
      clearTimeout(t);
      resolve(true);
    };
    drainWaiters.push(done);
  });
}

/**
 * Adaptive polling, as QEMU's event loop does (poll-max-ns): before going back to sleep on the
 * kick eventfd, watch the avail index for a short while. A driver with requests in flight
 * usually adds the next ones soon after it collected the last, and catching them here saves a
 * sleep/wake round trip through the kernel and the event loop (~25 µs on these machines), on
 * both sides: a worker that is still polling is not kicked. The window adapts to how long the
 * worker then sleeps (see PollWindow). VMSHIFT_POLL_US sets the maximum, 32 µs by default as in
 * QEMU (0 disables polling). Longer windows catch a driver that collects a whole batch before it
 * adds the next (64-128 µs: QD32 about 1.0x qemu-storage-daemon on a host with CPU to spare) but
 * cost CPU that a busy host's other work, the driver included, needs: docs/benchmarks.md, vhost.
 */
const pollWindow = new PollWindow(Number(process.env.VMSHIFT_POLL_US ?? 32));
/** When the worker began the poll before its last sleep (performance.now()); -1 while awake. */
let sleptAt = -1;
/** When the last pollForMore() began. */
let polledAt = 0;

function pollForMore(q: DeviceVirtqueue): boolean {
  polledAt = performance.now();
  const us = pollWindow.us;
  if (us <= 0) return false;
  const until = polledAt + us / 1000;
  do {
    if (q.availableCount() > 0) return true;
  } while (performance.now() < until);
  return false;
}

/**
 * Runs what the previous back-end left in flight, in its original order. A request that no
 * longer passes the checks is returned with length 0 (the ring stays in step).
 */
function resubmitInflight(q: DeviceVirtqueue, h: QueueHandler): void {
  while (resubmit.length > 0) {
    const head = resubmit.shift() as number;
    let chain: DescriptorChain;
    try {
      chain = (q as SplitQueue).chainAt(head);
    } catch (e) {
      if (!(e instanceof VirtqueueError) || q.broken) throw e;
      event("warn", `queue ${init.queue}: resubmitted ${e.message}`);
      complete(q, head, 0, 1, head);
      continue;
    }
    run(q, h, chain, head);
  }
  while (resubmitPacked.length > 0) {
    const r = resubmitPacked.shift() as PackedInflightRequest;
    const last = r.descs[r.descs.length - 1] as { id: number };
    let chain: DescriptorChain;
    try {
      chain = (q as PackedQueue).chainFrom(r.descs);
    } catch (e) {
      if (!(e instanceof VirtqueueError) || q.broken) throw e;
      event("warn", `queue ${init.queue}: resubmitted ${e.message}`);
      complete(q, last.id, 0, r.descs.length, r.entry);
      continue;
    }
    run(q, h, chain, r.entry);
  }
}

/** The device loop with notification suppression (see SplitQueue). */
function processQueue(): void {
  const q = queue;
  const h = handler;
  if (!q || !h || !enabled || broken || quiescing) return;
  try {
    resubmitInflight(q, h);
    for (;;) {
      q.disableNotification();
      for (;;) {
        if (inFlight >= MAX_IN_FLIGHT) {
          // Notifications stay off: the next completion takes up the rest.
          starved = true;
          notify(q);
          return;
        }
        let chain: DescriptorChain | null;
        try {
          chain = q.popChain();
        } catch (e) {
          if (!(e instanceof VirtqueueError) || q.broken) throw e;
          // A malformed chain from the driver: never acted on. Its head goes back with
          // length 0 so the driver is not left waiting; the queue goes on.
          guestWarn(`queue ${init.queue}: ${e.message}`);
          const head = e.details.head;
          if (q.packed) {
            // A packed ring cannot skip slots: the refused chain goes back by id and slot count.
            // The driver waits for that used element like for any other: it is notified with the batch.
            if (head !== undefined) {
              complete(q, head, 0, e.details.slots ?? 1, begin(q, head));
              unnotified++;
            }
          } else if (head !== undefined && head < q.size) {
            complete(q, head, 0, 1, -1);
            unnotified++;
          }
          continue;
        }
        if (!chain) break;
        run(q, h, chain, begin(q, chain.head));
        // Under EVENT_IDX the driver is asked after every completion (one load of its event
        // index): it only says yes when the batch crosses the index it set when it re-armed, so
        // a sleeping driver is woken by the first completion of a batch and collects while the
        // rest runs, and an awake one costs no call at all. Without it a driver that leaves
        // interrupts on would get a call per request: one per NOTIFY_BATCH completions instead,
        // and one when the ring is drained.
        if (unnotified >= (q.eventIdx ? 1 : NOTIFY_BATCH)) notify(q);
      }
      // The ring is empty: tell the driver about the batch before polling or sleeping.
      notify(q);
      // Poll with notifications still off (the driver does not kick meanwhile), then re-arm.
      if (pollForMore(q)) continue;
      if (!q.enableNotification()) {
        sleptAt = polledAt;
        break;
      }
    }
  } catch (e) {
    broken = true;
    unnotified = 0;
    event("error", `queue ${init.queue} needs reset: ${(e as Error).message}`);
    signal(errFd);
    if (q.needsNotification()) signal(callFd);
  }
}

/** Other requests of this queue: in flight in the handler, or waiting in the ring (QueueContext.backlog). */
function backlog(): number {
  const q = queue;
  if (!q || q.broken || quiescing) return inFlight;
  try {
    return inFlight + q.availableCount();
  } catch {
    return inFlight;
  }
}

function watchKick(fd: number): void {
  kick?.close();
  kick = null;
  if (fd < 0) return;
  kick = new Watch(fd, READABLE, () => {
    readRaw(fd, drainBuf); // EAGAIN is fine: another wakeup already drained it
    if (sleptAt >= 0) {
      pollWindow.afterSleep((performance.now() - sleptAt) * 1000);
      sleptAt = -1;
    }
    processQueue();
  });
}

async function setMemory(m: GuestMemory): Promise<void> {
  memory = m;
  if (!handler) handler = await factory!({ queue: init.queue, memory: m, features, data: init.data, backlog });
  else handler.setMemory?.(m);
  queue?.setMemory(m);
}

function start(ring: RingConfig): void {
  if (!memory) throw new Error("no memory table");
  features = ring.features;
  broken = false;
  starved = false;
  resubmit = [];
  resubmitPacked = [];
  inflight = null;
  packedInflight = null;
  if (ring.packed) {
    startPacked(memory, ring);
    return;
  }
  const q = new SplitQueue(memory, {
    size: ring.size,
    descTable: ring.descTable,
    availRing: ring.availRing,
    usedRing: ring.usedRing,
    features: ring.features,
    nextAvail: ring.nextAvail & 0xffff,
    // A stopped ring resumes where the used ring is (SET_VRING_BASE only carries the avail index).
    nextUsed: 0,
    markDirty,
    usedLogAddress: ring.logAddress ?? ring.usedRing,
  });
  queue = q;
  const usedIdx = q.readUsedIdx();
  q.nextUsed = usedIdx;
  inflight = ring.inflight ? new InflightQueue(ring.inflight) : null;
  if (inflight) {
    if (inflight.version === 0) inflight.init();
    else {
      // Restarted back-end: what was in flight runs again, in its original order, and the
      // avail ring resumes after it (libvhost-user does the same).
      resubmit = inflight.recover(usedIdx);
      q.nextAvail = (usedIdx + resubmit.length) & 0xffff;
      if (resubmit.length) event("warn", `queue ${init.queue}: resubmitting ${resubmit.length} in-flight request(s)`);
    }
  }
}

function startPacked(mem: GuestMemory, ring: RingConfig): void {
  // SET_VRING_BASE carries both positions for a packed ring (there is no used idx in memory).
  const base = decodePackedVringBase(ring.nextAvail);
  const q = new PackedQueue(mem, {
    size: ring.size,
    descRing: ring.descTable,
    driverArea: ring.availRing,
    deviceArea: ring.usedRing,
    features: ring.features,
    nextAvail: base.availIdx,
    availWrap: base.availWrap,
    nextUsed: base.usedIdx,
    usedWrap: base.usedWrap,
    markDirty,
    deviceLogAddress: ring.logAddress ?? ring.usedRing,
  });
  queue = q;
  if (!ring.inflight) return;
  const tracker = new PackedInflightQueue(ring.inflight);
  packedInflight = tracker;
  if (tracker.version === 0) {
    tracker.init(q.nextUsed, q.usedWrap);
    return;
  }
  // Restarted back-end: the used position is the region's; the avail one follows the slots of
  // what is still in flight, which runs again first (as for split rings).
  const r = tracker.recover((slot) => mem.atomicLoadU16(q.descRing + 16 * slot + 14));
  let slots = 0;
  for (const p of r.pending) slots += p.descs.length;
  let availIdx = r.usedIdx + slots;
  let availWrap = r.usedWrap;
  if (availIdx >= q.size) {
    availIdx -= q.size;
    availWrap = !availWrap;
  }
  q.setPosition({ availIdx, availWrap, usedIdx: r.usedIdx, usedWrap: r.usedWrap });
  resubmitPacked = r.pending;
  if (r.pending.length) event("warn", `queue ${init.queue}: resubmitting ${r.pending.length} in-flight request(s)`);
}

async function handle(m: ToWorker): Promise<void> {
  try {
    switch (m.type) {
      case "memory":
        // Requests in flight finish against the table they were popped under.
        quiescing = true;
        await drained();
        quiescing = false;
        await setMemory(GuestMemory.fromShared(m.memory));
        processQueue();
        break;
      case "start":
        start(m.ring);
        callFd = m.callFd;
        errFd = m.errFd;
        enabled = m.enabled;
        watchKick(m.kickFd);
        // Buffers made available before the kick fd arrived get no kick of their own.
        processQueue();
        // A ring that already has used entries may be taken over from a back-end that died
        // between publishing them and signalling the guest: the guest then waits with an old
        // used_event, and event-idx suppression would keep it waiting for ever. One spurious
        // interrupt is harmless; a lost one hangs the guest's I/O.
        if (
          queue instanceof SplitQueue
            ? queue.readUsedIdx() !== 0
            : queue instanceof PackedQueue && queue.vringBase !== 0x8000_8000
        )
          signal(callFd);
        break;
      case "enable":
        enabled = m.enabled;
        processQueue();
        break;
      case "fds":
        callFd = m.callFd;
        errFd = m.errFd;
        break;
      case "stop": {
        watchKick(-1);
        // GET_VRING_BASE: every request taken from the ring is completed before it answers.
        quiescing = true;
        if (!(await drained())) event("warn", `queue ${init.queue}: ${inFlight} request(s) still in flight at stop`);
        quiescing = false;
        starved = false;
        const q = queue;
        queue = null;
        // GET_VRING_BASE: a packed ring reports both positions in vhost-user's encoding.
        const base = q instanceof PackedQueue ? q.vringBase : (q?.nextAvail ?? 0);
        post({ type: "done", id: m.id, nextAvail: base, nextUsed: q?.nextUsed ?? 0 });
        return;
      }
      case "close": {
        watchKick(-1);
        quiescing = true;
        const idle = await drained();
        queue = null;
        // A request still running uses the handler's files: leak them rather than close them under it.
        if (idle) handler?.close?.();
        else event("warn", `queue ${init.queue}: closing with ${inFlight} request(s) still in flight`);
        handler = null;
        log.close();
        port!.close();
        return;
      }
    }
    post({ type: "done", id: m.id });
  } catch (e) {
    post({ type: "done", id: m.id, error: (e as Error).message });
  }
}

// Messages are handled strictly in order, even when one awaits (the first memory table
// creates the handler asynchronously).
let chain = Promise.resolve();
port.on("message", (m: ToWorker) => {
  chain = chain.then(() => handle(m));
});
post({ type: "ready" });
