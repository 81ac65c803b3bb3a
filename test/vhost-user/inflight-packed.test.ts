/**
 * The packed inflight region (PackedInflightQueue) at each point a back-end can die: after
 * completing requests out of order, half-way through returning one (before and after its used
 * descriptor reached the ring), half-way through taking one. The next life must resubmit
 * exactly the requests whose completion the driver has not seen, oldest first, and resume the
 * ring where the driver expects it. Plus a region a hostile front-end filled with garbage:
 * a typed error, never an index past the queue.
 */
import assert from "node:assert/strict";
import { after, before, test } from "node:test";
import { GuestMemory } from "../../src/memory/guest-memory.js";
import { GuestMemoryRegion } from "../../src/memory/region.js";
import {
  InflightCorrupt,
  inflightQueueSizePacked,
  PackedInflightQueue,
} from "../../src/vhost-user/backend/inflight-packed.js";
import { PackedQueue } from "../../src/virtio/packed.js";
import { PackedQueueDriver } from "../../src/virtio/packed-driver.js";

const SIZE = 8;
let mem: GuestMemory;
before(() => {
  mem = new GuestMemory([GuestMemoryRegion.memfd(0, 0x40000)]);
});
after(() => mem.close());

function setup() {
  mem.fill(0, 0x40000);
  const driver = PackedQueueDriver.at(mem, 0x1000, SIZE);
  const l = driver.layout;
  const queue = new PackedQueue(mem, {
    size: SIZE,
    descRing: l.descTable,
    driverArea: l.availRing,
    deviceArea: l.usedRing,
  });
  const shared = { buffer: new SharedArrayBuffer(inflightQueueSizePacked(SIZE)), offset: 0, queueSize: SIZE };
  const region = new PackedInflightQueue(shared);
  region.init(queue.nextUsed, queue.usedWrap);
  return { driver, queue, region, shared, l };
}

/** The next life: a new tracker over the same region, recovering against the ring's flags. */
function restart(s: ReturnType<typeof setup>) {
  const region = new PackedInflightQueue(s.shared);
  assert.equal(region.version, 1);
  const r = region.recover((slot) => mem.readU16(s.l.descTable + 16 * slot + 14));
  return { region, r };
}

function add(driver: PackedQueueDriver, n: number, tag: number): number {
  const segs = Array.from({ length: n }, (_, k) => ({ addr: 0x10000 + tag * 0x100 + k * 8, len: 8 }));
  return driver.add(segs.slice(0, 1), segs.slice(1));
}

test("test_out_of_order_completion_then_death_resubmits_only_the_unfinished", () => {
  const s = setup();
  const { driver, queue, region } = s;
  // Some laps first.
  for (let i = 0; i < 11; i++) {
    add(driver, 1, 0);
    const c = queue.popChain();
    assert.ok(c);
    const e = region.begin(queue);
    region.used(e, queue.usedPositionAfter(c.slots), () => queue.addUsed(c.head, 0, c.slots));
    assert.ok(driver.getUsed());
  }
  const x = add(driver, 2, 1);
  const y = add(driver, 3, 2);
  const z = add(driver, 1, 3);
  const cx = queue.popChain();
  const ex = region.begin(queue);
  const cy = queue.popChain();
  const ey = region.begin(queue);
  const cz = queue.popChain();
  const ez = region.begin(queue);
  assert.ok(cx && cy && cz);
  // Y completes first, then the back-end dies with X and Z in flight.
  region.used(ey, queue.usedPositionAfter(cy.slots), () => queue.addUsed(cy.head, 5, cy.slots));
  void ex;
  void ez;
  const { r } = restart(s);
  assert.deepEqual(
    r.pending.map((p) => p.descs[p.descs.length - 1]?.id),
    [x, z],
    "X then Z, in the order they were taken",
  );
  assert.deepEqual(
    r.pending.map((p) => p.descs.length),
    [2, 1],
  );
  assert.deepEqual({ idx: r.usedIdx, wrap: r.usedWrap }, { idx: queue.nextUsed, wrap: queue.usedWrap });
  assert.equal(r.pending[0]?.descs[0]?.addr, 0x10100n, "the ring descriptors as the driver wrote them");
  assert.deepEqual(driver.getUsed(), { head: y, len: 5 });
});

test("test_death_before_the_used_descriptor_reached_the_ring_rolls_back", () => {
  const s = setup();
  const { driver, queue, region } = s;
  const x = add(driver, 2, 1);
  const c = queue.popChain();
  assert.ok(c);
  const e = region.begin(queue);
  assert.throws(
    () =>
      region.used(e, queue.usedPositionAfter(c.slots), () => {
        throw new Error("died");
      }),
    /died/,
  );
  const { r } = restart(s);
  assert.deepEqual(
    r.pending.map((p) => p.descs[p.descs.length - 1]?.id),
    [x],
    "resubmitted",
  );
  assert.deepEqual({ idx: r.usedIdx, wrap: r.usedWrap }, { idx: 0, wrap: true }, "used position rolled back");
  assert.equal(driver.getUsed(), null);
});

test("test_death_after_the_used_descriptor_reached_the_ring_commits", () => {
  const s = setup();
  const { driver, queue, region } = s;
  const x = add(driver, 2, 1);
  const c = queue.popChain();
  assert.ok(c);
  const e = region.begin(queue);
  assert.throws(
    () =>
      region.used(e, queue.usedPositionAfter(c.slots), () => {
        queue.addUsed(c.head, 7, c.slots);
        throw new Error("died");
      }),
    /died/,
  );
  const { r } = restart(s);
  assert.deepEqual(r.pending, [], "not done twice");
  assert.deepEqual({ idx: r.usedIdx, wrap: r.usedWrap }, { idx: 2, wrap: true });
  assert.deepEqual(driver.getUsed(), { head: x, len: 7 });
});

test("test_the_region_keeps_working_after_recovery (entries reused, no leak)", () => {
  const s = setup();
  const { driver, queue, region } = s;
  add(driver, 2, 1);
  queue.popChain();
  region.begin(queue);
  const { region: r2, r } = restart(s);
  assert.equal(r.pending.length, 1);
  // The successor completes the resubmitted request, then runs many more through the region.
  const p = r.pending[0];
  assert.ok(p);
  const chain = queue.chainFrom(p.descs);
  r2.used(p.entry, queue.usedPositionAfter(chain.slots), () => queue.addUsed(chain.head, 0, chain.slots));
  assert.ok(driver.getUsed());
  for (let i = 0; i < 50; i++) {
    add(driver, 1 + (i % 3), 0);
    const c = queue.popChain();
    assert.ok(c);
    const e = r2.begin(queue);
    r2.used(e, queue.usedPositionAfter(c.slots), () => queue.addUsed(c.head, 0, c.slots));
    assert.ok(driver.getUsed());
  }
  assert.deepEqual(restart(s).r.pending, []);
});

test("test_garbage_region_from_the_front_end_is_a_typed_error", () => {
  const s = setup();
  const bytes = new Uint8Array(s.shared.buffer);
  for (let i = 12; i < bytes.length; i++) bytes[i] = (i * 37) & 0xff;
  assert.throws(() => restart(s), InflightCorrupt);
  // A free list that loops on itself.
  const s2 = setup();
  const dv = new DataView(s2.shared.buffer);
  dv.setUint16(32 + 2, 0, true); // desc[0].next = 0
  assert.throws(() => restart(s2), /loops/);
});
