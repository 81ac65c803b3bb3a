/**
 * The queues one worker thread serves, and the loop that serves them: after a batch, the worker
 * polls every queue of its group for a short while (the adaptive PollWindow) before it re-arms
 * their notifications and sleeps. This is what QEMU's event loop does for the virtqueues of one
 * iothread (aio_poll: io_poll_begin turns every handler's notifications off, the poll watches
 * them all, io_poll_end turns them back on): one thread awake for several queues instead of one
 * wake-up per queue per request. A group of one queue is the plain device loop (disable
 * notifications, pop until empty, notify, poll, re-arm).
 *
 * The group is fair: after each member's batch (at most a ring's worth) the poll and the re-arm
 * look at the members in turn, starting after the one just served.
 *
 * The members are QueueRunners; this part knows only what it needs of them, so it is tested
 * on its own (test/vhost-user/queue-group.test.ts).
 */
import { PollWindow } from "./poll-window.js";

export interface GroupMember {
  /** Can take requests now: started, enabled, not broken, not stopping, not at its in-flight limit. */
  readonly runnable: boolean;
  /** Requests are waiting in its ring. */
  hasWork(): boolean;
  /** Notifications off: the driver does not kick while the worker polls. */
  quiet(): void;
  /** Notifications back on. True when requests arrived meanwhile (they get no kick: serve them). */
  rearm(): boolean;
  /**
   * Pops and serves requests until the ring is empty (then notifies the driver of the batch),
   * until the queue can take no more (in-flight limit, broken), or until it has served a ring's
   * worth (then it notifies and returns with requests still waiting: the group serves the others
   * before it comes back, so a driver that keeps its ring full cannot starve the other queues).
   */
  drain(): void;
}

export class QueueGroup {
  readonly window: PollWindow;
  readonly #members: GroupMember[] = [];
  readonly #now: () => number;
  /** When the poll before the last sleep began (ms); -1 while awake. */
  #sleptAt = -1;
  /** serve() is running: a nested call only queues its member. */
  #serving = false;
  readonly #again = new Set<GroupMember>();
  /** Index of the member served last: the next scan starts after it. */
  #last = -1;
  /** Batches served, polls that found work, sleeps (tests and diagnostics). */
  readonly counts = { drains: 0, pollHits: 0, sleeps: 0 };

  constructor(pollMaxUs: number, now: () => number = () => performance.now()) {
    this.window = new PollWindow(pollMaxUs);
    this.#now = now;
  }

  add(m: GroupMember): void {
    if (!this.#members.includes(m)) this.#members.push(m);
  }

  get size(): number {
    return this.#members.length;
  }

  /**
   * Other members with requests waiting in their rings (a handler deciding whether to hold the
   * thread: blocking there also holds up those).
   */
  othersWaiting(m: GroupMember): number {
    let n = 0;
    for (const o of this.#members) if (o !== m && o.runnable && o.hasWork()) n++;
    return n;
  }

  /** A member's kick eventfd fired: the window learns how long the group slept, then serves. */
  kicked(m: GroupMember): void {
    if (this.#sleptAt >= 0) {
      this.window.afterSleep((this.#now() - this.#sleptAt) * 1000);
      this.#sleptAt = -1;
    }
    this.serve(m);
  }

  /**
   * Serves `first`, then every member that has requests, until the whole group is idle for a
   * poll window and every runnable member's notifications are back on.
   */
  serve(first: GroupMember): void {
    if (this.#serving) {
      this.#again.add(first);
      return;
    }
    this.#serving = true;
    try {
      this.#drain(first);
      for (;;) {
        const queued = this.#takeQueued();
        if (queued) {
          this.#drain(queued);
          continue;
        }
        const found = this.#poll();
        if (found) {
          this.counts.pollHits++;
          this.#drain(found);
          continue;
        }
        // Re-arm every member (each one's notifications are off after its batch or the poll);
        // one whose driver added requests meanwhile is served again.
        let pending: GroupMember | null = null;
        const n = this.#members.length;
        for (let i = 1; i <= n; i++) {
          const m = this.#members[(this.#last + i) % n] as GroupMember;
          if (m.runnable && m.rearm()) pending ??= m;
        }
        if (pending) {
          this.#drain(pending);
          continue;
        }
        this.counts.sleeps++;
        return;
      }
    } finally {
      this.#serving = false;
    }
  }

  #drain(m: GroupMember): void {
    this.counts.drains++;
    this.#last = this.#members.indexOf(m);
    m.drain();
  }

  #takeQueued(): GroupMember | null {
    for (const m of this.#again) {
      this.#again.delete(m);
      if (m.runnable) return m;
    }
    return null;
  }

  /** Polls the group's rings for up to the window; the member with requests, or null. */
  #poll(): GroupMember | null {
    const start = this.#now();
    this.#sleptAt = start;
    const us = this.window.us;
    if (us <= 0) return null;
    for (const m of this.#members) if (m.runnable) m.quiet();
    const until = start + us / 1000;
    // In turn, starting after the member served last (no allocation: this loop spins).
    const n = this.#members.length;
    do {
      for (let i = 1; i <= n; i++) {
        const m = this.#members[(this.#last + i) % n] as GroupMember;
        if (m.runnable && m.hasWork()) {
          this.#sleptAt = -1;
          return m;
        }
      }
    } while (this.#now() < until);
    return null;
  }
}
