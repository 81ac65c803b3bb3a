import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";
import type { GuestMemory } from "../../src/memory/guest-memory.js";
import { features, VIRTIO_F_NOTIFY_ON_EMPTY, VIRTIO_RING_F_EVENT_IDX } from "../../src/virtio/features.js";
import { SplitQueue } from "../../src/virtio/queue.js";
import {
  availEventOffset,
  VIRTQ_AVAIL_F_NO_INTERRUPT,
  VIRTQ_USED_F_NO_NOTIFY,
  vringNeedEvent,
} from "../../src/virtio/ring.js";
import { DATA, makeMemory, makePair } from "./helpers.js";

let mem: GuestMemory;
before(() => {
  mem = makeMemory();
});
after(() => mem.close());

const EVENT_IDX = features(VIRTIO_RING_F_EVENT_IDX);

function addOne(d: ReturnType<typeof makePair>["driver"], i = 0): number {
  return d.add([{ addr: DATA + i, len: 1 }], [{ addr: DATA + 0x100 + i, len: 1 }]);
}

test("test_vring_need_event_matches_the_spec_formula", () => {
  // (u16)(new_idx - event_idx - 1) < (u16)(new_idx - old)
  assert.equal(vringNeedEvent(0, 1, 0), true, "event 0, idx moved 0 -> 1");
  assert.equal(vringNeedEvent(1, 1, 0), false, "not yet past event 1");
  assert.equal(vringNeedEvent(1, 2, 1), true);
  assert.equal(vringNeedEvent(2, 5, 0), true, "a batch that crosses the event");
  assert.equal(vringNeedEvent(7, 5, 0), false, "a batch that stops short");
  assert.equal(vringNeedEvent(0xffff, 0x0001, 0xfffe), true, "across the 16-bit wrap");
  assert.equal(vringNeedEvent(0x0001, 0x0001, 0xfffe), false);
  assert.equal(vringNeedEvent(3, 3, 3), false, "nothing new");
});

describe("without EVENT_IDX", () => {
  test("test_used_f_no_notify_suppresses_kicks", () => {
    const { driver, queue } = makePair(mem, 8);
    addOne(driver);
    assert.equal(driver.publish(), true, "notifications are on after reset");
    queue.disableNotification();
    assert.equal(mem.readU16(queue.usedRing) & VIRTQ_USED_F_NO_NOTIFY, VIRTQ_USED_F_NO_NOTIFY);
    addOne(driver, 1);
    assert.equal(driver.publish(), false);
    assert.equal(driver.publish(), false, "nothing new, no kick");
    // Re-enabling reports the chains that arrived while kicks were off.
    assert.equal(queue.enableNotification(), true);
    assert.equal(mem.readU16(queue.usedRing), 0);
    queue.popChain();
    queue.popChain();
    assert.equal(queue.enableNotification(), false);
    addOne(driver, 2);
    assert.equal(driver.publish(), true);
  });

  test("test_avail_f_no_interrupt_suppresses_used_notifications", () => {
    const { driver, queue } = makePair(mem, 8);
    assert.equal(queue.needsNotification(), false, "nothing used yet");
    addOne(driver);
    addOne(driver, 1);
    driver.publish();
    const a = queue.popChain();
    const b = queue.popChain();
    assert.ok(a && b);
    queue.addUsed(a.head, 0);
    assert.equal(queue.needsNotification(), true);
    assert.equal(queue.needsNotification(), false, "already signalled");
    driver.disableInterrupts();
    assert.equal(mem.readU16(queue.availRing) & VIRTQ_AVAIL_F_NO_INTERRUPT, VIRTQ_AVAIL_F_NO_INTERRUPT);
    queue.addUsed(b.head, 0);
    assert.equal(queue.needsNotification(), false);
    assert.equal(driver.enableInterrupts(), true, "a used element is already waiting");
    assert.equal(driver.getUsed()?.head, a.head);
    assert.equal(driver.getUsed()?.head, b.head);
    assert.equal(driver.enableInterrupts(), false);
  });

  test("test_notify_on_empty_overrides_no_interrupt", () => {
    const { driver, queue } = makePair(mem, 8, features(VIRTIO_F_NOTIFY_ON_EMPTY));
    driver.disableInterrupts();
    addOne(driver);
    addOne(driver, 1);
    driver.publish();
    const a = queue.popChain();
    assert.ok(a);
    queue.addUsed(a.head, 0);
    assert.equal(queue.needsNotification(), false, "the avail ring is not empty yet");
    const b = queue.popChain();
    assert.ok(b);
    queue.addUsed(b.head, 0);
    assert.equal(queue.needsNotification(), true, "the avail ring ran empty");
  });
});

describe("with EVENT_IDX", () => {
  test("test_avail_event_decides_kicks", () => {
    const { driver, queue } = makePair(mem, 8, EVENT_IDX);
    addOne(driver);
    assert.equal(driver.publish(), true, "avail_event 0: the first chain kicks");
    addOne(driver, 1);
    assert.equal(driver.publish(), false, "the device has not asked again");
    // The device flags bits mean nothing under EVENT_IDX; disable writes nothing.
    queue.disableNotification();
    assert.equal(mem.readU16(queue.usedRing), 0);
    assert.ok(queue.popChain());
    assert.ok(queue.popChain());
    assert.equal(queue.enableNotification(), false);
    assert.equal(mem.readU16(queue.usedRing + availEventOffset(8)), 2, "avail_event = nextAvail");
    addOne(driver, 2);
    addOne(driver, 3);
    assert.equal(driver.publish(), true, "a batch crossing avail_event kicks once");
  });

  test("test_enable_notification_sees_a_chain_that_raced_in", () => {
    const { driver, queue } = makePair(mem, 8, EVENT_IDX);
    addOne(driver);
    driver.publish();
    // The driver publishes before the device asks for a kick: no kick, but the re-check finds it.
    assert.equal(queue.enableNotification(), true);
    assert.ok(queue.popChain());
    assert.equal(queue.enableNotification(), false);
  });

  test("test_used_event_decides_used_notifications", () => {
    const { driver, queue } = makePair(mem, 16, EVENT_IDX);
    for (let i = 0; i < 6; i++) addOne(driver, i);
    driver.publish();
    const chains = [0, 1, 2, 3, 4, 5].map(() => queue.popChain());
    driver.setUsedEvent(2); // notify me once used idx passes 2
    queue.addUsed(chains[0]?.head ?? -1, 0);
    assert.equal(queue.needsNotification(), false, "used idx 1");
    queue.addUsed(chains[1]?.head ?? -1, 0);
    assert.equal(queue.needsNotification(), false, "used idx 2 = used_event: not passed yet");
    queue.addUsed(chains[2]?.head ?? -1, 0);
    assert.equal(queue.needsNotification(), true, "used idx 3 passed used_event");
    // A batch: 3 elements, then one decision.
    driver.setUsedEvent(4);
    queue.addUsed(chains[3]?.head ?? -1, 0);
    queue.addUsed(chains[4]?.head ?? -1, 0);
    queue.addUsed(chains[5]?.head ?? -1, 0);
    assert.equal(queue.needsNotification(), true, "the batch 3..6 crossed used_event 4");
    // The driver's getUsed() keeps used_event at lastUsed while interrupts are on.
    for (let i = 0; i < 6; i++) driver.getUsed();
    assert.equal(mem.readU16(queue.availRing + 4 + 2 * 16), 6);
    driver.disableInterrupts();
    assert.equal(mem.readU16(queue.availRing) & VIRTQ_AVAIL_F_NO_INTERRUPT, 0, "flags are unused under EVENT_IDX");
  });

  test("test_used_notification_across_the_wrap", () => {
    const { driver } = makePair(mem, 8, EVENT_IDX);
    driver.startAt(0xfffe);
    const queue = new SplitQueue(mem, { ...driver.layout, features: EVENT_IDX, nextAvail: 0xfffe, nextUsed: 0xfffe });
    for (let i = 0; i < 3; i++) addOne(driver, i);
    assert.equal(driver.publish(), true, "avail_event 0 lies in the window (0xfffe, 0x0001]");
    const chains = [queue.popChain(), queue.popChain(), queue.popChain()];
    assert.equal(queue.nextAvail, 1);
    driver.setUsedEvent(0xffff);
    queue.addUsed(chains[0]?.head ?? -1, 0);
    assert.equal(queue.needsNotification(), false, "used idx 0xffff");
    queue.addUsed(chains[1]?.head ?? -1, 0);
    queue.addUsed(chains[2]?.head ?? -1, 0);
    assert.equal(queue.readUsedIdx(), 1);
    assert.equal(queue.needsNotification(), true, "used idx wrapped past 0xffff");
  });
});
