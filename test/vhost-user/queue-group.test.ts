/**
 * The loop of one queue worker over its group of queues (QueueGroup), with scripted members and
 * a scripted clock: a batch, a poll over every runnable member, the re-arm, the sleep.
 */
import assert from "node:assert/strict";
import { test } from "node:test";
import { type GroupMember, QueueGroup } from "../../src/vhost-user/backend/queue-group.js";
import { queueGroups } from "../../src/vhost-user/backend/queue-thread.js";

/** A ring: `waiting` requests; `arrive` says how many come while the worker does what (by call count). */
class FakeMember implements GroupMember {
  readonly name: string;
  runnable = true;
  waiting = 0;
  notifications = true;
  served = 0;
  readonly calls: string[] = [];
  /** Requests that arrive right after the n-th hasWork() call (driver adding while we poll). */
  arriveOnPoll = new Map<number, number>();
  /** Requests that arrive between the poll and the re-arm (the race rearm() reports). */
  arriveBeforeRearm = 0;
  #polls = 0;
  /** Every member's drains, in order, when the test shares one log among them. */
  readonly #order: string[] | undefined;

  constructor(name: string, order?: string[]) {
    this.name = name;
    this.#order = order;
  }

  hasWork(): boolean {
    this.#polls++;
    this.waiting += this.arriveOnPoll.get(this.#polls) ?? 0;
    return this.waiting > 0;
  }

  quiet(): void {
    this.calls.push("quiet");
    this.notifications = false;
  }

  rearm(): boolean {
    this.calls.push("rearm");
    this.notifications = true;
    this.waiting += this.arriveBeforeRearm;
    this.arriveBeforeRearm = 0;
    return this.waiting > 0;
  }

  drain(): void {
    this.#order?.push(this.name);
    this.calls.push("drain");
    this.notifications = false;
    this.served += this.waiting;
    this.waiting = 0;
  }
}

/** A group of `names.length` fake members, added in that order (pollMaxUs 32 unless given). */
function group(names: string[], pollMaxUs = 32): { g: QueueGroup; m: FakeMember[] } {
  const g = new QueueGroup(pollMaxUs, clock());
  const m = names.map((n) => new FakeMember(n));
  for (const x of m) g.add(x);
  return { g, m };
}

/** A clock that moves 1 µs every time it is read. */
function clock(): () => number {
  let t = 0;
  return () => {
    t += 0.001;
    return t;
  };
}

test("one queue: the batch, a poll, the re-arm, then sleep with notifications on", () => {
  const {
    g,
    m: [a],
  } = group(["a"]) as { g: QueueGroup; m: [FakeMember] };
  a.waiting = 3;
  g.serve(a);
  assert.equal(a.served, 3);
  assert.deepEqual(a.calls, ["drain", "quiet", "rearm"]);
  assert.equal(a.notifications, true, "asleep with notifications on");
  assert.deepEqual(g.counts, { drains: 1, pollHits: 0, sleeps: 1 });
});

test("the poll finds another queue of the group: it is served without a kick", () => {
  const {
    g,
    m: [a, b],
  } = group(["a", "b"]) as { g: QueueGroup; m: [FakeMember, FakeMember] };
  a.waiting = 1;
  b.arriveOnPoll.set(3, 2); // b's driver adds two requests while the worker polls
  g.serve(a);
  assert.equal(a.served, 1);
  assert.equal(b.served, 2, "b's requests were caught by the poll");
  assert.ok(b.calls.indexOf("quiet") < b.calls.indexOf("drain"), "b's notifications were off while it was polled");
  assert.equal(g.counts.pollHits, 1);
  assert.equal(a.notifications && b.notifications, true, "both re-armed before the worker sleeps");
  assert.equal(g.counts.sleeps, 1);
});

test("a request that races the re-arm is served before the worker sleeps", () => {
  const {
    g,
    m: [a, b],
  } = group(["a", "b"]) as { g: QueueGroup; m: [FakeMember, FakeMember] };
  a.waiting = 1;
  b.arriveBeforeRearm = 1;
  g.serve(a);
  assert.equal(b.served, 1);
  assert.deepEqual(b.calls, ["quiet", "rearm", "drain", "quiet", "rearm"]);
  assert.equal(b.notifications, true);
});

test("a member that cannot take requests (stopped, at its in-flight limit) is neither polled nor re-armed", () => {
  const {
    g,
    m: [a, b],
  } = group(["a", "b"]) as { g: QueueGroup; m: [FakeMember, FakeMember] };
  b.runnable = false;
  b.notifications = false; // an in-flight-limited ring keeps them off until a completion resumes it
  b.waiting = 5;
  a.waiting = 1;
  g.serve(a);
  assert.deepEqual(b.calls, [], "b untouched");
  assert.equal(b.served, 0);
  assert.equal(b.notifications, false);
});

test("serve() called while serving (a completion resuming a queue) runs after the current batch, once", () => {
  const g = new QueueGroup(0, clock());
  const b = new FakeMember("b");
  const a = new (class extends FakeMember {
    override drain(): void {
      super.drain();
      if (this.served === 1) {
        b.waiting = 1;
        g.serve(b);
        assert.equal(b.served, 0, "not nested");
      }
    }
  })("a");
  g.add(a);
  g.add(b);
  a.waiting = 1;
  g.serve(a);
  assert.equal(b.served, 1);
  assert.equal(g.counts.sleeps, 1);
});

test("no polling (window 0): straight from the batch to the re-arm", () => {
  const {
    g,
    m: [a, b],
  } = group(["a", "b"], 0) as { g: QueueGroup; m: [FakeMember, FakeMember] };
  a.waiting = 2;
  b.arriveOnPoll.set(1, 1);
  g.serve(a);
  assert.deepEqual(a.calls, ["drain", "rearm"]);
  assert.equal(b.served, 0, "b was not polled: its driver kicks");
});

test("the window follows the kicks: a kick about 20 µs after the poll began doubles an 8 µs window", () => {
  let t = 0;
  // A clock that moves 4 µs each time it is read (the poll needs it to pass its end).
  const g = new QueueGroup(32, () => {
    t += 0.004;
    return t;
  });
  const a = new FakeMember("a");
  g.add(a);
  a.waiting = 1;
  g.serve(a);
  assert.equal(g.window.us, 8);
  t += 0.02; // the next kick, 20 µs later
  a.waiting = 1;
  g.kicked(a);
  assert.equal(g.window.us, 16);
  assert.equal(a.served, 2);
});

test("fair: a queue whose driver keeps its ring full does not starve the others of its thread", () => {
  const g = new QueueGroup(32, clock());
  const order: string[] = [];
  /** Serves at most 4 per batch (its ring's worth); its driver refills it for 10 batches. */
  const busy = new (class extends FakeMember {
    batches = 0;
    override drain(): void {
      order.push(this.name);
      const n = Math.min(this.waiting, 4);
      this.served += n;
      this.waiting -= n;
      if (++this.batches < 10) this.waiting += 4;
    }
  })("busy");
  const quiet = new FakeMember("quiet", order);
  const third = new FakeMember("third", order);
  for (const m of [busy, quiet, third]) g.add(m);
  busy.waiting = 8;
  quiet.waiting = 1;
  third.waiting = 1;
  g.serve(busy);
  assert.deepEqual(order.slice(0, 4), ["busy", "quiet", "third", "busy"], "the others are served in turn");
  assert.equal(busy.served, 8 + 9 * 4);
  assert.equal(quiet.served + third.served, 2);
  assert.equal(g.counts.sleeps, 1);
});

test("queueGroups: queue i on worker i mod n; out-of-range counts fall back to a worker per queue", () => {
  assert.deepEqual(queueGroups(4, 2), [
    [0, 2],
    [1, 3],
  ]);
  assert.deepEqual(queueGroups(3, 1), [[0, 1, 2]]);
  assert.deepEqual(queueGroups(2, 8), [[0], [1]]);
  assert.deepEqual(queueGroups(2, 0), [[0], [1]]);
  assert.deepEqual(queueGroups(2, Number.NaN), [[0], [1]]);
});
