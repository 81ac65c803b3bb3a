import assert from "node:assert/strict";
import { after, before, test } from "node:test";
import type { GuestMemory } from "../../src/memory/guest-memory.js";
import { features, VIRTIO_RING_F_EVENT_IDX } from "../../src/virtio/features.js";
import { availEventOffset } from "../../src/virtio/ring.js";
import { DATA, makeMemory, makePair } from "./helpers.js";

let mem: GuestMemory;
before(() => {
  mem = makeMemory();
});
after(() => mem.close());

type Mark = [gpa: number, len: number];

/** Every byte that differs between two snapshots of [base, base+before.length), as runs. */
function changedRuns(base: number, before: Uint8Array, now: Uint8Array): Mark[] {
  const runs: Mark[] = [];
  for (let i = 0; i < before.length; i++) {
    if (before[i] === now[i]) continue;
    const last = runs[runs.length - 1];
    if (last && last[0] + last[1] === base + i) last[1]++;
    else runs.push([base + i, 1]);
  }
  return runs;
}

function covered(marks: readonly Mark[]): Set<number> {
  const s = new Set<number>();
  for (const [a, n] of marks) for (let i = 0; i < n; i++) s.add(a + i);
  return s;
}

test("test_buffer_writes_are_marked_byte_for_byte", () => {
  const marks: Mark[] = [];
  const { driver, queue } = makePair(mem, 8, 0n, { markDirty: (gpa, len) => marks.push([gpa, len]) });
  mem.fill(DATA, 0x400, 0);
  driver.add(
    [{ addr: DATA, len: 16 }],
    [
      { addr: DATA + 0x100, len: 3 },
      { addr: DATA + 0x200, len: 10 },
      { addr: DATA + 0x300, len: 10 },
    ],
  );
  driver.publish();
  const c = queue.popChain();
  assert.ok(c);
  c.readReadable();
  assert.equal(marks.length, 0, "reads mark nothing");

  const snapshot = mem.read(DATA, 0x400);
  // 8 bytes starting 2 bytes into the writable part: the last byte of buffer 0, 7 of buffer 1.
  c.writeWritable(new Uint8Array(8).fill(0x5a), 2);
  assert.deepEqual(marks, [
    [DATA + 0x102, 1],
    [DATA + 0x200, 7],
  ]);
  assert.deepEqual(changedRuns(DATA, snapshot, mem.read(DATA, 0x400)), marks, "marked = changed");
});

test("test_used_ring_writes_are_marked_at_the_log_address", () => {
  const LOG = 0x7000_0000; // vhost-user log_guest_addr: need not be where the ring is mapped here
  const marks: Mark[] = [];
  const ef = features(VIRTIO_RING_F_EVENT_IDX);
  const { driver, queue } = makePair(mem, 8, ef, {
    markDirty: (gpa, len) => marks.push([gpa, len]),
    usedLogAddress: LOG,
  });
  for (let i = 0; i < 10; i++) {
    driver.add([{ addr: DATA, len: 1 }], []);
    driver.publish();
    const c = queue.popChain();
    assert.ok(c);
    const before = mem.read(queue.usedRing, 6 + 8 * 8);
    marks.length = 0;
    queue.addUsed(c.head, 0x1234 + i);
    const slot = i % 8;
    assert.deepEqual(marks, [
      [LOG + 4 + 8 * slot, 8],
      [LOG + 2, 2],
    ]);
    // Everything that changed in the used ring is covered by a mark (shifted to LOG).
    const changed = changedRuns(queue.usedRing, before, mem.read(queue.usedRing, 6 + 8 * 8));
    const cov = covered(marks);
    for (const [a, n] of changed) for (let k = 0; k < n; k++) assert.ok(cov.has(a - queue.usedRing + LOG + k));
    driver.getUsed();
  }
  marks.length = 0;
  queue.enableNotification();
  assert.deepEqual(marks, [[LOG + availEventOffset(8), 2]], "avail_event is a used-ring write too");
});

test("test_flags_writes_and_turning_the_log_on_and_off", () => {
  const marks: Mark[] = [];
  const { driver, queue } = makePair(mem, 8);
  driver.add([], [{ addr: DATA, len: 4 }]);
  driver.publish();
  const c = queue.popChain();
  assert.ok(c);
  c.writeWritable(Uint8Array.of(1));
  assert.equal(marks.length, 0, "no log yet");
  queue.setDirtyLog((gpa, len) => marks.push([gpa, len]));
  queue.disableNotification();
  queue.enableNotification();
  c.writeWritable(Uint8Array.of(2, 3), 1);
  queue.addUsed(c.head, c.written);
  const u = queue.usedRing;
  const expected: Mark[] = [
    [u, 2],
    [u, 2],
    [DATA + 1, 2],
    [u + 4, 8],
    [u + 2, 2],
  ];
  assert.deepEqual(marks, expected);
  assert.equal(c.written, 3);
  queue.setDirtyLog(null);
  marks.length = 0;
  queue.disableNotification();
  assert.deepEqual(marks, []);
});
