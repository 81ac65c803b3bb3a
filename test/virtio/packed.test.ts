/**
 * The packed virtqueue, both sides (PackedQueue, PackedQueueDriver): round trips through many
 * laps of the ring (wrap counters), out-of-order completion, indirect tables, event suppression
 * in both directions, vhost-user's vring base encoding, dirty marking of used descriptors, and a
 * hostile driver's rings (typed errors, chains returned with length 0, never an access outside
 * guest memory).
 */
import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";
import fc from "fast-check";
import type { GuestMemory } from "../../src/memory/guest-memory.js";
import { VirtqueueError } from "../../src/virtio/errors.js";
import { features, VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC } from "../../src/virtio/features.js";
import { PackedQueue, type PackedQueueConfig } from "../../src/virtio/packed.js";
import { PackedQueueDriver } from "../../src/virtio/packed-driver.js";
import {
  availFlags,
  decodePackedVringBase,
  EVENT_OFF_FLAGS,
  encodePackedVringBase,
  packedQueueLayout,
  RING_EVENT_FLAGS_DISABLE,
  VIRTQ_DESC_F_AVAIL,
  VIRTQ_DESC_F_USED,
} from "../../src/virtio/packed-ring.js";
import { VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE } from "../../src/virtio/ring.js";
import {
  DATA,
  HOLE,
  INDIRECT_BASE,
  INDIRECT_ENTRIES,
  MEMORY_END,
  makeMemory,
  openFds,
  RING_BASE,
  ROM,
} from "./helpers.js";

let mem: GuestMemory;
let fdsBefore = 0;
before(() => {
  fdsBefore = openFds();
  mem = makeMemory();
});
after(() => {
  mem.close();
  assert.equal(openFds(), fdsBefore, "every memfd is closed");
});

const BOTH = features(VIRTIO_RING_F_INDIRECT_DESC, VIRTIO_RING_F_EVENT_IDX);

function pair(size: number, f = BOTH, device: Partial<PackedQueueConfig> = {}) {
  mem.fill(RING_BASE, 0x10000);
  const driver = PackedQueueDriver.at(mem, RING_BASE, size, {
    features: f,
    indirectTables: { address: INDIRECT_BASE, entries: INDIRECT_ENTRIES },
  });
  const l = packedQueueLayout(RING_BASE, size);
  const queue = new PackedQueue(mem, { ...l, features: f, ...device });
  return { driver, queue, layout: l };
}

function code(fn: () => unknown): string {
  try {
    fn();
  } catch (e) {
    assert.ok(e instanceof VirtqueueError, String(e));
    return e.code;
  }
  return "OK";
}

describe("packed layout and vring base", () => {
  test("test_setup_checks_size_alignment_and_memory", () => {
    const l = packedQueueLayout(RING_BASE, 16);
    assert.equal(
      code(() => new PackedQueue(mem, { ...l, size: 0 })),
      "BAD_QUEUE_SIZE",
    );
    assert.equal(
      code(() => new PackedQueue(mem, { ...l, size: 32769 })),
      "BAD_QUEUE_SIZE",
    );
    // Not a power of two: fine for a packed ring.
    assert.equal(
      code(() => new PackedQueue(mem, { ...packedQueueLayout(RING_BASE, 12) })),
      "OK",
    );
    assert.equal(
      code(() => new PackedQueue(mem, { ...l, descRing: l.descRing + 8 })),
      "MISALIGNED_RING",
    );
    assert.equal(
      code(() => new PackedQueue(mem, { ...l, driverArea: l.driverArea + 2 })),
      "MISALIGNED_RING",
    );
    assert.equal(
      code(() => new PackedQueue(mem, { ...l, deviceArea: HOLE })),
      "RING_OUT_OF_MEMORY",
    );
    // The device writes the descriptor ring and the device area: not into read-only memory.
    assert.equal(
      code(() => new PackedQueue(mem, { ...l, descRing: ROM })),
      "RING_OUT_OF_MEMORY",
    );
    assert.equal(
      code(() => new PackedQueue(mem, { ...l, deviceArea: ROM })),
      "RING_OUT_OF_MEMORY",
    );
    assert.equal(
      code(() => new PackedQueue(mem, { ...l, driverArea: ROM })),
      "OK",
    );
    assert.equal(
      code(() => new PackedQueue(mem, { ...l, descRing: MEMORY_END - 16 * 15 })),
      "RING_OUT_OF_MEMORY",
    );
  });

  test("test_vring_base_encoding_avail_low_16_used_high_16", () => {
    // vhost-user: bits 0-14 avail index, 15 avail wrap, 16-30 used index, 31 used wrap.
    const b = { availIdx: 0x1234, availWrap: true, usedIdx: 0x0abc, usedWrap: false };
    const n = encodePackedVringBase(b);
    assert.equal(n, 0x1234 | 0x8000 | (0x0abc << 16));
    assert.deepEqual(decodePackedVringBase(n), b);
    assert.equal(encodePackedVringBase({ availIdx: 5, availWrap: false, usedIdx: 3, usedWrap: true }), 0x8003_0005);
    assert.deepEqual(decodePackedVringBase(0x8003_0005), { availIdx: 5, availWrap: false, usedIdx: 3, usedWrap: true });
  });

  test("test_set_position_refuses_more_than_size_in_flight", () => {
    const { queue } = pair(8);
    queue.setPosition({ availIdx: 2, availWrap: false, usedIdx: 2, usedWrap: true });
    assert.equal(queue.inFlightSlots, 8);
    assert.equal(
      code(() => queue.setPosition({ availIdx: 3, availWrap: false, usedIdx: 2, usedWrap: true })),
      "BAD_ARGUMENT",
    );
    assert.equal(
      code(() => queue.setPosition({ availIdx: 8, availWrap: true, usedIdx: 0, usedWrap: true })),
      "BAD_ARGUMENT",
    );
  });
});

describe("round trips", () => {
  test("test_chain_buffers_and_used_length", () => {
    const { driver, queue } = pair(8);
    mem.write(DATA, Uint8Array.of(1, 2, 3, 4));
    const id = driver.add(
      [
        { addr: DATA, len: 4 },
        { addr: DATA + 4, len: 0 },
      ],
      [{ addr: DATA + 0x100, len: 16 }],
    );
    assert.equal(driver.numFree, 5);
    const c = queue.popChain();
    assert.ok(c);
    assert.equal(c.head, id);
    assert.equal(c.slots, 3);
    assert.equal(c.readableCount, 2);
    assert.deepEqual([...c.readReadable()], [1, 2, 3, 4]);
    assert.equal(c.writeWritable(Uint8Array.of(9, 9)), 2);
    assert.equal(queue.popChain(), null);
    assert.equal(driver.getUsed(), null);
    queue.addUsed(c.head, c.written, c.slots);
    assert.deepEqual(driver.getUsed(), { head: id, len: 2 });
    assert.equal(driver.numFree, 8);
    assert.deepEqual([...mem.read(DATA + 0x100, 2)], [9, 9]);
  });

  test("test_many_laps_out_of_order_chains_of_any_length (wrap counters)", () => {
    // A model: random chain lengths and completion orders over a ring of 7 (not a power of
    // two), ~100 laps. The driver must get back exactly what it gave, each with its length.
    fc.assert(
      fc.property(
        fc.array(fc.record({ n: fc.integer({ min: 1, max: 4 }), pick: fc.nat(), indirect: fc.boolean() }), {
          minLength: 50,
          maxLength: 300,
        }),
        (ops) => {
          const { driver, queue } = pair(7);
          const held: { id: number; slots: number; len: number }[] = [];
          const expect = new Map<number, number>();
          let returned = 0;
          let given = 0;
          const collect = () => {
            for (let u = driver.getUsed(); u; u = driver.getUsed()) {
              assert.equal(u.len, expect.get(u.head), `length of id ${u.head}`);
              expect.delete(u.head);
              returned++;
            }
          };
          for (const op of ops) {
            const fits = op.indirect ? driver.numFree >= 1 : driver.numFree >= op.n;
            if (fits && driver.inFlight < 7) {
              const segs = Array.from({ length: op.n }, (_, k) => ({ addr: DATA + k * 64, len: 8 }));
              const id = driver.add(segs.slice(0, 1), segs.slice(1), { indirect: op.indirect });
              given++;
              const c = queue.popChain();
              assert.ok(c, "the chain just added is available");
              assert.equal(c.head, id);
              assert.equal(c.count, op.n);
              const len = (op.pick % 1000) + given;
              expect.set(id, len);
              held.push({ id: c.head, slots: c.slots, len });
            } else if (held.length > 0) {
              const [h] = held.splice(op.pick % held.length, 1);
              if (h) queue.addUsed(h.id, h.len, h.slots);
              collect();
            }
          }
          for (const h of held.splice(0)) queue.addUsed(h.id, h.len, h.slots);
          collect();
          assert.equal(returned, given);
          assert.equal(driver.inFlight, 0);
          assert.equal(queue.inFlightSlots, 0);
          assert.equal(queue.popChain(), null);
        },
      ),
      { seed: 0x9acced, numRuns: 60 },
    );
  });

  test("test_indirect_table_flattened_and_flags_in_it_ignored_but_write", () => {
    const { driver, queue } = pair(8);
    const id = driver.add([{ addr: DATA, len: 16 }], [{ addr: DATA + 64, len: 32 }], { indirect: true });
    // Rewrite the table's descriptors with junk flags: only WRITE counts there.
    const table = INDIRECT_BASE + id * INDIRECT_ENTRIES * 16;
    mem.writeU16(table + 14, VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_INDIRECT | VIRTQ_DESC_F_AVAIL);
    const c = queue.popChain();
    assert.ok(c);
    assert.equal(c.indirect, true);
    assert.equal(c.slots, 1);
    assert.equal(c.count, 2);
    assert.equal(c.readableLength, 16);
    assert.equal(c.writableLength, 32);
  });

  test("test_resume_from_vring_base", () => {
    const { driver, queue } = pair(8);
    for (let i = 0; i < 11; i++) {
      driver.add([{ addr: DATA, len: 1 }], []);
      const c = queue.popChain();
      assert.ok(c);
      queue.addUsed(c.head, 0, c.slots);
      assert.ok(driver.getUsed());
    }
    const base = queue.vringBase;
    assert.deepEqual(decodePackedVringBase(base), { availIdx: 3, availWrap: false, usedIdx: 3, usedWrap: false });
    // A new device over the same ring, resumed where the old one stopped.
    const l = packedQueueLayout(RING_BASE, 8);
    const p = decodePackedVringBase(base);
    const q2 = new PackedQueue(mem, {
      ...l,
      features: BOTH,
      nextAvail: p.availIdx,
      availWrap: p.availWrap,
      nextUsed: p.usedIdx,
      usedWrap: p.usedWrap,
    });
    const id = driver.add([{ addr: DATA, len: 1 }], []);
    const c = q2.popChain();
    assert.equal(c?.head, id);
  });
});

describe("event suppression", () => {
  test("test_device_disables_and_enables_kicks", () => {
    for (const f of [0n, BOTH]) {
      const { driver, queue, layout } = pair(8, f);
      queue.disableNotification();
      assert.equal(mem.readU16(layout.deviceArea + EVENT_OFF_FLAGS), RING_EVENT_FLAGS_DISABLE);
      driver.add([{ addr: DATA, len: 1 }], []);
      assert.equal(driver.publish(), false, "no kick while disabled");
      // Enabling finds the chain that arrived meanwhile.
      assert.equal(queue.enableNotification(), true);
      const c = queue.popChain();
      assert.ok(c);
      assert.equal(queue.enableNotification(), false);
      driver.add([{ addr: DATA, len: 1 }], []);
      assert.equal(driver.publish(), true, `kick once re-enabled (features ${f})`);
    }
  });

  test("test_event_idx_kick_only_when_passing_off_wrap", () => {
    const { driver, queue } = pair(4);
    assert.equal(queue.enableNotification(), false); // off_wrap = 0 | wrap 1
    driver.add([{ addr: DATA, len: 1 }], []);
    assert.equal(driver.publish(), true);
    // The device does not re-arm: the driver passed off_wrap once, later adds need no kick.
    driver.add([{ addr: DATA, len: 1 }], []);
    assert.equal(driver.publish(), false);
    for (let i = 0; i < 2; i++) {
      const c = queue.popChain();
      assert.ok(c);
      queue.addUsed(c.head, 0, c.slots);
    }
    // Re-armed at slot 2: adding 3 chains passes it across the wrap (slots 2, 3, 0).
    assert.equal(queue.enableNotification(), false);
    while (driver.getUsed());
    driver.add([{ addr: DATA, len: 1 }], []);
    driver.add([{ addr: DATA, len: 1 }], []);
    driver.add([{ addr: DATA, len: 1 }], []);
    assert.equal(driver.publish(), true);
  });

  test("test_driver_suppresses_used_notifications", () => {
    for (const f of [0n, BOTH]) {
      const { driver, queue } = pair(8, f);
      driver.disableInterrupts();
      driver.add([{ addr: DATA, len: 1 }], []);
      let c = queue.popChain();
      assert.ok(c);
      queue.addUsed(c.head, 0, c.slots);
      assert.equal(queue.needsNotification(), false);
      assert.equal(driver.enableInterrupts(), true, "a used descriptor is already waiting");
      assert.ok(driver.getUsed());
      driver.add([{ addr: DATA, len: 1 }], []);
      c = queue.popChain();
      assert.ok(c);
      queue.addUsed(c.head, 0, c.slots);
      assert.equal(queue.needsNotification(), true);
      assert.equal(queue.needsNotification(), false, "nothing new since the last call");
    }
  });

  test("test_event_idx_used_notification_across_the_wrap", () => {
    const { driver, queue } = pair(4);
    const held = [];
    for (let i = 0; i < 3; i++) {
      driver.add([{ addr: DATA, len: 1 }], []);
      held.push(queue.popChain());
    }
    for (const c of held) if (c) queue.addUsed(c.head, 0, c.slots);
    assert.equal(queue.needsNotification(), true, "used_event 0 passed");
    for (let i = 0; i < 3; i++) assert.ok(driver.getUsed());
    // Driver asks for the next used slot (3, wrap 1); device returns slots 3 and 0 (wrapped).
    assert.equal(driver.enableInterrupts(), false);
    const more = [];
    for (let i = 0; i < 2; i++) {
      driver.add([{ addr: DATA, len: 1 }], []);
      more.push(queue.popChain());
    }
    for (const c of more) if (c) queue.addUsed(c.head, 0, c.slots);
    assert.equal(queue.needsNotification(), true);
  });
});

describe("dirty marking", () => {
  test("test_used_descriptors_device_area_and_buffers_are_marked", () => {
    const marks: [number, number][] = [];
    const { driver, queue, layout } = pair(8, BOTH, { markDirty: (gpa, len) => marks.push([gpa, len]) });
    driver.add([], [{ addr: DATA, len: 8 }]);
    driver.add([{ addr: DATA + 0x100, len: 1 }], [{ addr: DATA + 0x200, len: 8 }]);
    const a = queue.popChain();
    const b = queue.popChain();
    assert.ok(a && b);
    b.writeWritable(Uint8Array.of(1));
    // Out of order: b first. Its used descriptor goes in slot 0 (the used position), which
    // then moves by b's 2 slots: a's goes in slot 2.
    queue.addUsed(b.head, 1, b.slots);
    queue.addUsed(a.head, 0, a.slots);
    queue.enableNotification();
    assert.deepEqual(marks, [
      [DATA + 0x200, 1],
      [layout.descRing, 16],
      [layout.descRing + 32, 16],
      [layout.deviceArea, 4],
    ]);
    assert.deepEqual(driver.getUsed(), { head: b.head, len: 1 });
    assert.deepEqual(driver.getUsed(), { head: a.head, len: 0 });
  });
});

describe("DescriptorChain.markWritten", () => {
  test("test_finds_the_buffer_in_any_order_and_refuses_readable_or_foreign_ranges", () => {
    const marks: [number, number][] = [];
    const { driver, queue } = pair(8, BOTH, { markDirty: (gpa, len) => marks.push([gpa, len]) });
    driver.add(
      [
        { addr: DATA, len: 16 },
        { addr: DATA + 0x1000, len: 16 },
        { addr: DATA + 0x2000, len: 16 },
      ],
      [
        { addr: DATA + 0x3000, len: 64 },
        { addr: DATA + 0x5000, len: 64 },
        { addr: DATA + 0x4000, len: 64 },
      ],
    );
    const c = queue.popChain();
    assert.ok(c);
    for (const gpa of [DATA + 0x5000, DATA + 0x3010, DATA + 0x4000, DATA + 0x3000, DATA + 0x5020])
      c.markWritten(gpa, 8);
    assert.deepEqual(
      marks.map(([g]) => g - DATA),
      [0x5000, 0x3010, 0x4000, 0x3000, 0x5020],
    );
    assert.throws(() => c.markWritten(DATA + 0x1000, 8), RangeError, "a readable buffer");
    assert.throws(() => c.markWritten(DATA + 0x3038, 16), RangeError, "past the end of a buffer");
    assert.throws(() => c.markWritten(DATA + 0x6000, 1), RangeError, "not the chain's");
  });
});

describe("hostile driver", () => {
  /** Makes `descs` available from the driver's position as one chain, head flags last. */
  function offerRaw(driver: PackedQueueDriver, descs: [addr: number | bigint, len: number, flags: number][]): void {
    const start = driver.position.availIdx;
    for (let k = descs.length - 1; k >= 0; k--) {
      const [addr, len, flags] = descs[k] as [number, number, number];
      driver.writeDescriptor((start + k) % driver.size, addr, len, 77, flags | driver.availFlagsAt(k));
    }
  }

  test("test_bad_chains_are_refused_with_their_id_and_slots_and_the_queue_goes_on", () => {
    const cases: [string, [number | bigint, number, number][], bigint][] = [
      ["ADDRESS_OUT_OF_RANGE", [[HOLE, 16, 0]], BOTH],
      ["ADDRESS_OUT_OF_RANGE", [[ROM, 16, VIRTQ_DESC_F_WRITE]], BOTH],
      ["ADDRESS_OVERFLOW", [[0xffff_ffff_ffff_fff0n, 32, 0]], BOTH],
      [
        "READABLE_AFTER_WRITABLE",
        [
          [DATA, 1, VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT],
          [DATA, 1, 0],
        ],
        BOTH,
      ],
      ["INDIRECT_NOT_NEGOTIATED", [[INDIRECT_BASE, 32, VIRTQ_DESC_F_INDIRECT]], 0n],
      ["BAD_INDIRECT_LENGTH", [[INDIRECT_BASE, 17, VIRTQ_DESC_F_INDIRECT]], BOTH],
      ["ADDRESS_OUT_OF_RANGE", [[HOLE, 32, VIRTQ_DESC_F_INDIRECT]], BOTH],
      [
        "INDIRECT_WITH_NEXT",
        [
          [INDIRECT_BASE, 16, VIRTQ_DESC_F_INDIRECT | VIRTQ_DESC_F_NEXT],
          [DATA, 1, 0],
        ],
        BOTH,
      ],
    ];
    for (const [want, descs, f] of cases) {
      const { driver, queue } = pair(8, f);
      mem.writeU64(INDIRECT_BASE, BigInt(HOLE));
      mem.writeU32(INDIRECT_BASE + 8, 16);
      offerRaw(driver, descs);
      let err: VirtqueueError | null = null;
      try {
        queue.popChain();
      } catch (e) {
        assert.ok(e instanceof VirtqueueError);
        err = e;
      }
      assert.equal(err?.code, want);
      assert.equal(err?.details.head, 77, "the buffer id of the chain's last descriptor");
      assert.equal(err?.details.slots, descs.length);
      assert.equal(queue.broken, null);
      assert.equal(queue.inFlightSlots, descs.length);
      queue.addUsed(77, 0, err?.details.slots);
      assert.equal(queue.inFlightSlots, 0);
      // The next (good) chain comes through after the refused one's slots.
      const slot = descs.length;
      driver.writeDescriptor(slot, DATA, 4, 5, availFlags(true));
      assert.equal(queue.popChain()?.head, 5, want);
    }
  });

  test("test_indirect_in_an_indirect_table_is_a_plain_buffer_never_followed", () => {
    const { driver, queue } = pair(8);
    // The table's one entry claims INDIRECT towards the hole: ignored, it is a buffer (read-only here).
    mem.writeU64(INDIRECT_BASE, BigInt(DATA));
    mem.writeU32(INDIRECT_BASE + 8, 4);
    mem.writeU16(INDIRECT_BASE + 14, VIRTQ_DESC_F_INDIRECT);
    offerRaw(driver, [[INDIRECT_BASE, 16, VIRTQ_DESC_F_INDIRECT]]);
    const c = queue.popChain();
    assert.equal(c?.count, 1);
    assert.equal(c?.addr(0), DATA);
  });

  test("test_chain_too_long_is_chain_level", () => {
    const { driver, queue } = pair(8, BOTH, { maxChainLength: 2 });
    offerRaw(driver, [
      [DATA, 1, VIRTQ_DESC_F_NEXT],
      [DATA, 1, VIRTQ_DESC_F_NEXT],
      [DATA, 1, 0],
    ]);
    assert.equal(
      code(() => queue.popChain()),
      "CHAIN_TOO_LONG",
    );
    assert.equal(queue.broken, null);
  });

  test("test_chain_without_end_breaks_the_queue", () => {
    const { driver, queue } = pair(4);
    offerRaw(
      driver,
      Array.from({ length: 4 }, () => [DATA, 1, VIRTQ_DESC_F_NEXT] as [number, number, number]),
    );
    assert.equal(
      code(() => queue.popChain()),
      "RING_OVERRUN",
    );
    assert.ok(queue.broken);
    assert.equal(
      code(() => queue.popChain()),
      "QUEUE_BROKEN",
    );
    assert.equal(
      code(() => queue.addUsed(0, 0)),
      "QUEUE_BROKEN",
    );
  });

  test("test_slots_in_flight_are_never_taken_again (flags flipped early)", () => {
    const { driver, queue } = pair(4);
    for (let i = 0; i < 4; i++) driver.add([{ addr: DATA, len: 1 }], []);
    const held = [queue.popChain(), queue.popChain(), queue.popChain(), queue.popChain()];
    assert.ok(held.every((c) => c));
    // The driver re-offers slot 0 under the next lap's wrap before the device returned it.
    driver.writeDescriptor(0, HOLE, 1, 9, availFlags(false));
    assert.equal(queue.availableCount(), 0);
    assert.equal(queue.popChain(), null, "every slot is still the device's");
    assert.equal(queue.enableNotification(), false);
    const c = held[0];
    assert.ok(c);
    queue.addUsed(c.head, 0, c.slots);
    assert.ok(driver.getUsed());
    // Now slot 0 is the driver's again, and what it holds is checked like anything else.
    driver.writeDescriptor(0, HOLE, 1, 9, availFlags(false));
    assert.equal(
      code(() => queue.popChain()),
      "ADDRESS_OUT_OF_RANGE",
    );
  });

  test("test_used_descriptor_flags_are_both_wrap_bits", () => {
    const { driver, queue, layout } = pair(2);
    for (let lap = 0; lap < 3; lap++) {
      for (let i = 0; i < 2; i++) {
        driver.add([{ addr: DATA, len: 1 }], []);
        const c = queue.popChain();
        assert.ok(c);
        queue.addUsed(c.head, 0, c.slots);
        const f = mem.readU16(layout.descRing + 16 * i + 14);
        const wrap = lap % 2 === 0;
        assert.equal(f & (VIRTQ_DESC_F_AVAIL | VIRTQ_DESC_F_USED), wrap ? VIRTQ_DESC_F_AVAIL | VIRTQ_DESC_F_USED : 0);
        assert.ok(driver.getUsed());
      }
    }
  });
});
