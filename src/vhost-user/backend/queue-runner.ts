/**
 * One virtqueue inside a queue worker: the queue (a SplitQueue, or a PackedQueue when
 * VIRTIO_F_RING_PACKED was negotiated), the device's handler for it, its kick watch, its
 * inflight bookkeeping and its control messages (memory, start, enable, fds, stop, close),
 * handled strictly in order. The worker thread (queue-worker.ts) hosts one runner per queue of
 * its group; the QueueGroup decides when each one drains its ring.
 *
 * The fds it uses (kick, call, err) are owned by the control plane, which never closes one
 * before this runner has acknowledged it stopped using it.
 *
 * A handler may complete a request later: process() then returns a promise of the used length
 * (vhost-user-blk does its reads and writes on libuv's thread pool). Up to MAX_IN_FLIGHT
 * requests of this queue are then in flight at once and complete in any order; the inflight
 * region records each one. Before the ring stops (GET_VRING_BASE), before a new memory table
 * and before the handler closes, the runner waits until none is in flight.
 */
import { GuestMemory } from "../../memory/guest-memory.js";
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
import type { GroupMember, QueueGroup } from "./queue-group.js";
import { WarningLimiter } from "./warning-limiter.js";
import type { FromWorker, RingConfig, ToQueue } from "./worker-protocol.js";

const MAX_IN_FLIGHT = Math.max(1, Number(process.env.VMSHIFT_QUEUE_MAX_IN_FLIGHT ?? 64));
/**
 * Without EVENT_IDX: most completions one notification waits for while the worker keeps serving
 * inline requests (VMSHIFT_NOTIFY_BATCH): the driver hears of a long batch's first results
 * before the batch ends. With EVENT_IDX every completion is checked (see drain()).
 */
const NOTIFY_BATCH = Math.max(1, Number(process.env.VMSHIFT_NOTIFY_BATCH ?? 16));
const one = new BigUint64Array([1n]);
const drainBuf = new BigUint64Array(1);

/** What a runner needs from the worker that hosts it. */
export interface RunnerHost {
  factory: QueueHandlerFactory;
  group: QueueGroup;
  markDirty(gpa: number, len: number): void;
  post(m: FromWorker): void;
}

export class QueueRunner implements GroupMember {
  readonly index: number;
  readonly #data: unknown;
  readonly #host: RunnerHost;
  #memory: GuestMemory | null = null;
  #handler: QueueHandler | null = null;
  #features = 0n;
  #queue: DeviceVirtqueue | null = null;
  #kick: Watch | null = null;
  #callFd = -1;
  #errFd = -1;
  #enabled = false;
  #broken = false;
  #inflight: InflightQueue | null = null;
  #packedInflight: PackedInflightQueue | null = null;
  /** Requests that were in flight when the previous back-end died, to run before anything new. */
  #resubmit: number[] = [];
  #resubmitPacked: PackedInflightRequest[] = [];
  /** Requests whose handler returned a promise that has not settled yet. */
  #inFlight = 0;
  /** drain() stopped popping at MAX_IN_FLIGHT: the next completion resumes it. */
  #starved = false;
  /** No new request is taken (the ring is stopping, or the memory table is being replaced). */
  #quiescing = false;
  #drainWaiters: (() => void)[] = [];
  /** A batched notification (notifyLater) is still to be sent. */
  #notifyPending = false;
  /** The driver was told not to notify (by drain() or quiet(), undone by rearm()). */
  #notifyOff = false;
  /** Completions published since the last notify(). */
  #unnotified = 0;
  /** Warnings the guest triggers per chain (malformed chains, failed requests): rate-limited. */
  readonly #guestWarnings = new WarningLimiter();
  /** Control messages run strictly in order, even when one awaits. */
  #chain: Promise<void> = Promise.resolve();
  #closed = false;

  constructor(index: number, data: unknown, host: RunnerHost) {
    this.index = index;
    this.#data = data;
    this.#host = host;
    host.group.add(this);
  }

  /** Queues a control message behind the ones before it. */
  enqueue(m: ToQueue): void {
    this.#chain = this.#chain.then(() => this.#handle(m));
  }

  // --- GroupMember -------------------------------------------------------------------------

  get runnable(): boolean {
    return (
      this.#queue !== null &&
      this.#handler !== null &&
      this.#enabled &&
      !this.#broken &&
      !this.#quiescing &&
      !this.#starved
    );
  }

  // A ring in memory the driver made invalid throws from any access: drain() then finds the
  // error and reports the queue broken (it stops being runnable).

  hasWork(): boolean {
    try {
      return (this.#queue?.availableCount() ?? 0) > 0;
    } catch {
      return true;
    }
  }

  quiet(): void {
    // Each poll quiets the whole group: the queue just drained already is (without EVENT_IDX
    // that would be a used-ring write, and a dirty-log mark while logging, per poll).
    if (this.#notifyOff) return;
    try {
      this.#queue?.disableNotification();
      this.#notifyOff = true;
    } catch (e) {
      this.#fail(e as Error);
    }
  }

  rearm(): boolean {
    this.#notifyOff = false;
    try {
      return this.#queue?.enableNotification() ?? false;
    } catch {
      return true;
    }
  }

  /** The device loop with notification suppression (see SplitQueue). */
  drain(): void {
    const q = this.#queue;
    const h = this.#handler;
    if (!q || !h || !this.runnable) return;
    try {
      this.#resubmitInflight(q, h);
      q.disableNotification();
      this.#notifyOff = true;
      // A ring's worth per turn: the other queues of this thread are served before the next.
      for (let budget = q.size; ; budget--) {
        if (budget === 0) {
          this.#notify(q);
          return;
        }
        if (this.#inFlight >= MAX_IN_FLIGHT) {
          // Notifications stay off: the next completion takes up the rest.
          this.#starved = true;
          this.#notify(q);
          return;
        }
        let chain: DescriptorChain | null;
        try {
          chain = q.popChain();
        } catch (e) {
          if (!(e instanceof VirtqueueError) || q.broken) throw e;
          // A malformed chain from the driver: never acted on. Its head goes back with
          // length 0 so the driver is not left waiting; the queue goes on.
          this.#guestWarn(`queue ${this.index}: ${e.message}`);
          const head = e.details.head;
          if (q.packed) {
            // A packed ring cannot skip slots: the refused chain goes back by id and slot count.
            // The driver waits for that used element like for any other: it is notified with the batch.
            if (head !== undefined) {
              this.#complete(q, head, 0, e.details.slots ?? 1, this.#begin(q, head));
              this.#unnotified++;
            }
          } else if (head !== undefined && head < q.size) {
            this.#complete(q, head, 0, 1, -1);
            this.#unnotified++;
          }
          continue;
        }
        if (!chain) break;
        this.#run(q, h, chain, this.#begin(q, chain.head));
        // Under EVENT_IDX the driver is asked after every completion (one load of its event
        // index): it only says yes when the batch crosses the index it set when it re-armed, so
        // a sleeping driver is woken by the first completion of a batch and collects while the
        // rest runs, and an awake one costs no call at all. Without it a driver that leaves
        // interrupts on would get a call per request: one per NOTIFY_BATCH completions instead,
        // and one when the ring is drained.
        if (this.#unnotified >= (q.eventIdx ? 1 : NOTIFY_BATCH)) this.#notify(q);
      }
      // The ring is empty: tell the driver about the batch before polling or sleeping.
      this.#notify(q);
    } catch (e) {
      this.#fail(e as Error);
    }
  }

  /** The queue cannot go on: reported, the front-end's error eventfd signalled. */
  #fail(e: Error): void {
    this.#broken = true;
    this.#unnotified = 0;
    this.#event("error", `queue ${this.index} needs reset: ${e.message}`);
    this.#signal(this.#errFd);
    try {
      if (this.#queue?.needsNotification()) this.#signal(this.#callFd);
    } catch {
      // nothing more to tell the driver through this ring
    }
  }

  // --- requests ----------------------------------------------------------------------------

  #event(level: "warn" | "error", message: string): void {
    this.#host.post({ type: "event", queue: this.index, level, message });
  }

  #guestWarn(message: string): void {
    const m = this.#guestWarnings.admit(message);
    if (m !== null) this.#event("warn", m);
  }

  #signal(fd: number): void {
    if (fd < 0) return;
    const r = writeRaw(fd, one);
    if (r < 0 && r !== -EAGAIN) this.#guestWarn(`queue ${this.index}: eventfd write failed (errno ${-r})`);
  }

  /** Serves the ring through the group (which then polls the group's other rings too). */
  #process(): void {
    this.#host.group.serve(this);
  }

  /**
   * Returns a request. `token`: its inflight entry for a packed ring (what begin() returned),
   * -1 when it is not tracked.
   */
  #complete(q: DeviceVirtqueue, head: number, len: number, slots: number, token: number): void {
    if (q instanceof PackedQueue) {
      const tracker = this.#packedInflight;
      if (tracker && token >= 0) {
        tracker.used(token, q.usedPositionAfter(slots), () => q.addUsed(head, len, slots));
      } else q.addUsed(head, len, slots);
      return;
    }
    const s = q as SplitQueue;
    this.#inflight?.beforeUsed(head);
    s.addUsed(head, len);
    this.#inflight?.afterUsed(head, s.nextUsed);
  }

  /** Records the chain just popped (or refused) as in flight; its token for complete(). */
  #begin(q: DeviceVirtqueue, head: number): number {
    if (q instanceof PackedQueue) return this.#packedInflight ? this.#packedInflight.begin(q) : -1;
    this.#inflight?.begin(head);
    return head;
  }

  #run(q: DeviceVirtqueue, h: QueueHandler, chain: DescriptorChain, token: number): void {
    let r: number | Promise<number>;
    try {
      r = h.process(chain);
    } catch (e) {
      this.#guestWarn(`queue ${this.index}: request failed: ${(e as Error).message}`);
      r = 0;
    }
    if (typeof r === "number") {
      this.#complete(q, chain.head, r, chain.slots, token);
      this.#unnotified++;
      return;
    }
    this.#inFlight++;
    const head = chain.head;
    const slots = chain.slots;
    r.then(
      (len) => this.#completeLater(q, head, len, slots, token),
      (e) => {
        this.#guestWarn(`queue ${this.index}: request failed: ${(e as Error).message}`);
        this.#completeLater(q, head, 0, slots, token);
      },
    );
  }

  /**
   * Sends the used-buffer notification for everything published since the last one, if the driver
   * wants it (needsNotification() applies EVENT_IDX / packed event suppression over the whole
   * batch: it asks whether the batch crossed the driver's event index, not only its last entry).
   */
  #notify(q: DeviceVirtqueue): void {
    this.#unnotified = 0;
    try {
      if (!q.broken && q.needsNotification()) this.#signal(this.#callFd);
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
  #notifyLater(): void {
    if (this.#notifyPending) return;
    this.#notifyPending = true;
    setImmediate(this.#flushNotify);
  }

  /**
   * Sends a batched notification now. Done before the runner acknowledges a stop, a new memory
   * table or close: after that acknowledgement the control plane may close the call fd.
   */
  readonly #flushNotify = (): void => {
    if (!this.#notifyPending) return;
    this.#notifyPending = false;
    const q = this.#queue;
    if (q) this.#notify(q);
  };

  /** A request whose handler finished asynchronously: publish it; the notification is batched. */
  #completeLater(q: DeviceVirtqueue, head: number, len: number, slots: number, token: number): void {
    this.#inFlight--;
    try {
      if (!q.broken) {
        this.#complete(q, head, len, slots, token);
        this.#unnotified++;
      }
    } catch (e) {
      this.#event("error", `queue ${this.index}: completing head ${head}: ${(e as Error).message}`);
    }
    if (this.#inFlight === 0 && this.#drainWaiters.length > 0) {
      // Someone waits for the queue to drain (stop, new memory table, close): the driver hears of
      // this completion before that goes on.
      if (this.#unnotified > 0) this.#notify(q);
      this.#flushNotify();
      for (const w of this.#drainWaiters.splice(0)) w();
    }
    if (this.#starved && !this.#quiescing && this.#queue === q) {
      this.#starved = false;
      // drain() notifies at the end of its batch, this completion included.
      this.#process();
    }
    if (this.#unnotified > 0 && this.#queue === q) this.#notifyLater();
  }

  /**
   * Resolves once no request is in flight (at most `ms`; false when some still were), with every
   * batched notification sent.
   */
  #drained(ms = 10_000): Promise<boolean> {
    if (this.#inFlight === 0) {
      this.#flushNotify();
      return Promise.resolve(true);
    }
    return new Promise((resolve) => {
      const t = setTimeout(() => {
        this.#drainWaiters = this.#drainWaiters.filter((w) => w !== done);
        resolve(false);
      }, ms);
      const done = () => {
        clearTimeout(t);
        resolve(true);
      };
      this.#drainWaiters.push(done);
    });
  }

  /**
   * Runs what the previous back-end left in flight, in its original order. A request that no
   * longer passes the checks is returned with length 0 (the ring stays in step).
   */
  #resubmitInflight(q: DeviceVirtqueue, h: QueueHandler): void {
    while (this.#resubmit.length > 0) {
      const head = this.#resubmit.shift() as number;
      let chain: DescriptorChain;
      try {
        chain = (q as SplitQueue).chainAt(head);
      } catch (e) {
        if (!(e instanceof VirtqueueError) || q.broken) throw e;
        this.#event("warn", `queue ${this.index}: resubmitted ${e.message}`);
        this.#complete(q, head, 0, 1, head);
        continue;
      }
      this.#run(q, h, chain, head);
    }
    while (this.#resubmitPacked.length > 0) {
      const r = this.#resubmitPacked.shift() as PackedInflightRequest;
      const last = r.descs[r.descs.length - 1] as { id: number };
      let chain: DescriptorChain;
      try {
        chain = (q as PackedQueue).chainFrom(r.descs);
      } catch (e) {
        if (!(e instanceof VirtqueueError) || q.broken) throw e;
        this.#event("warn", `queue ${this.index}: resubmitted ${e.message}`);
        this.#complete(q, last.id, 0, r.descs.length, r.entry);
        continue;
      }
      this.#run(q, h, chain, r.entry);
    }
  }

  /**
   * Other requests of this queue (in flight in the handler, or waiting in the ring), plus the
   * other queues of this thread that have requests waiting (QueueContext.backlog).
   */
  readonly #backlog = (): number => {
    const q = this.#queue;
    const others = this.#host.group.size > 1 ? this.#host.group.othersWaiting(this) : 0;
    if (!q || q.broken || this.#quiescing) return this.#inFlight + others;
    try {
      return this.#inFlight + q.availableCount() + others;
    } catch {
      return this.#inFlight + others;
    }
  };

  #watchKick(fd: number): void {
    this.#kick?.close();
    this.#kick = null;
    if (fd < 0) return;
    this.#kick = new Watch(fd, READABLE, () => {
      readRaw(fd, drainBuf); // EAGAIN is fine: another wakeup already drained it
      this.#host.group.kicked(this);
    });
  }

  // --- control messages --------------------------------------------------------------------

  async #setMemory(m: GuestMemory): Promise<void> {
    this.#memory = m;
    if (!this.#handler) {
      this.#handler = await this.#host.factory({
        queue: this.index,
        memory: m,
        features: this.#features,
        data: this.#data,
        backlog: this.#backlog,
      });
    } else this.#handler.setMemory?.(m);
    this.#queue?.setMemory(m);
  }

  #start(ring: RingConfig): void {
    const memory = this.#memory;
    if (!memory) throw new Error("no memory table");
    this.#features = ring.features;
    this.#notifyOff = false;
    this.#broken = false;
    this.#starved = false;
    this.#resubmit = [];
    this.#resubmitPacked = [];
    this.#inflight = null;
    this.#packedInflight = null;
    if (ring.packed) {
      this.#startPacked(memory, ring);
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
      markDirty: this.#host.markDirty,
      usedLogAddress: ring.logAddress ?? ring.usedRing,
    });
    this.#queue = q;
    const usedIdx = q.readUsedIdx();
    q.nextUsed = usedIdx;
    const inflight = ring.inflight ? new InflightQueue(ring.inflight) : null;
    this.#inflight = inflight;
    if (inflight) {
      if (inflight.version === 0) inflight.init();
      else {
        // Restarted back-end: what was in flight runs again, in its original order, and the
        // avail ring resumes after it (libvhost-user does the same).
        this.#resubmit = inflight.recover(usedIdx);
        q.nextAvail = (usedIdx + this.#resubmit.length) & 0xffff;
        if (this.#resubmit.length)
          this.#event("warn", `queue ${this.index}: resubmitting ${this.#resubmit.length} in-flight request(s)`);
      }
    }
  }

  #startPacked(mem: GuestMemory, ring: RingConfig): void {
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
      markDirty: this.#host.markDirty,
      deviceLogAddress: ring.logAddress ?? ring.usedRing,
    });
    this.#queue = q;
    if (!ring.inflight) return;
    const tracker = new PackedInflightQueue(ring.inflight);
    this.#packedInflight = tracker;
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
    this.#resubmitPacked = r.pending;
    if (r.pending.length)
      this.#event("warn", `queue ${this.index}: resubmitting ${r.pending.length} in-flight request(s)`);
  }

  /**
   * Worker shutdown: no new request, the ones in flight finish (up to the drain timeout), then
   * the handler closes. A request still running uses the handler's files: they are leaked
   * rather than closed under it.
   */
  async close(): Promise<void> {
    await this.#chain;
    if (this.#closed) return;
    this.#closed = true;
    this.#watchKick(-1);
    this.#quiescing = true;
    const idle = await this.#drained();
    this.#queue = null;
    if (idle) this.#handler?.close?.();
    else this.#event("warn", `queue ${this.index}: closing with ${this.#inFlight} request(s) still in flight`);
    this.#handler = null;
  }

  async #handle(m: ToQueue): Promise<void> {
    const post = this.#host.post;
    try {
      switch (m.type) {
        case "memory":
          // Requests in flight finish against the table they were popped under.
          this.#quiescing = true;
          await this.#drained();
          this.#quiescing = false;
          await this.#setMemory(GuestMemory.fromShared(m.memory));
          this.#process();
          break;
        case "start": {
          this.#start(m.ring);
          this.#callFd = m.callFd;
          this.#errFd = m.errFd;
          this.#enabled = m.enabled;
          this.#watchKick(m.kickFd);
          // Buffers made available before the kick fd arrived get no kick of their own.
          this.#process();
          // A ring that already has used entries may be taken over from a back-end that died
          // between publishing them and signalling the guest: the guest then waits with an old
          // used_event, and event-idx suppression would keep it waiting for ever. One spurious
          // interrupt is harmless; a lost one hangs the guest's I/O.
          const q = this.#queue;
          if (q instanceof SplitQueue ? q.readUsedIdx() !== 0 : q instanceof PackedQueue && q.vringBase !== 0x8000_8000)
            this.#signal(this.#callFd);
          break;
        }
        case "enable":
          this.#enabled = m.enabled;
          this.#process();
          break;
        case "fds":
          this.#callFd = m.callFd;
          this.#errFd = m.errFd;
          break;
        case "stop": {
          this.#watchKick(-1);
          // GET_VRING_BASE: every request taken from the ring is completed before it answers.
          this.#quiescing = true;
          if (!(await this.#drained()))
            this.#event("warn", `queue ${this.index}: ${this.#inFlight} request(s) still in flight at stop`);
          this.#quiescing = false;
          this.#starved = false;
          const q = this.#queue;
          this.#queue = null;
          // GET_VRING_BASE: a packed ring reports both positions in vhost-user's encoding.
          const base = q instanceof PackedQueue ? q.vringBase : (q?.nextAvail ?? 0);
          post({ type: "done", id: m.id, nextAvail: base, nextUsed: q?.nextUsed ?? 0 });
          return;
        }
      }
      post({ type: "done", id: m.id });
    } catch (e) {
      post({ type: "done", id: m.id, error: (e as Error).message });
    }
  }
}
