import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";
import { GuestMemory } from "../../src/memory/guest-memory.js";
import { GuestMemoryRegion } from "../../src/memory/region.js";
import type { DescriptorChain } from "../../src/virtio/chain.js";
import { SplitQueueDriver } from "../../src/virtio/driver.js";
import { VirtqueueError } from "../../src/virtio/errors.js";
import { features, VIRTIO_F_VERSION_1, VIRTIO_RING_F_INDIRECT_DESC } from "../../src/virtio/features.js";
import { SplitQueue, type SplitQueueConfig } from "../../src/virtio/queue.js";
import { splitQueueLayout, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE } from "../../src/virtio/ring.js";
import { DATA, HOLE, makeMemory, makePair, openFds, RING_BASE, ROM } from "./helpers.js";

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

function setupError(config: SplitQueueConfig): string {
  try {
    new SplitQueue(mem, config);
  } catch (e) {
    assert.ok(e instanceof VirtqueueError, String(e));
    return e.code;
  }
  return "OK";
}

describe("setup validation", () => {
  const good = splitQueueLayout(RING_BASE, 16);
  test("test_size_must_be_power_of_two_at_most_32768", () => {
    for (const size of [0, 3, 12, 65536, 1.5, -16])
      assert.equal(setupError({ ...good, size }), "BAD_QUEUE_SIZE", `${size}`);
    assert.equal(setupError({ ...good, size: 1 }), "OK");
    assert.equal(setupError({ ...splitQueueLayout(0, 8192) }), "OK");
    // 32768 is a valid size; its 832 KiB of rings just do not fit this guest.
    assert.equal(setupError({ ...splitQueueLayout(0, 32768) }), "RING_OUT_OF_MEMORY");
  });

  test("test_ring_alignment", () => {
    assert.equal(setupError({ ...good, descTable: good.descTable + 8 }), "MISALIGNED_RING");
    assert.equal(setupError({ ...good, availRing: good.availRing + 1 }), "MISALIGNED_RING");
    assert.equal(setupError({ ...good, usedRing: good.usedRing + 2 }), "MISALIGNED_RING");
  });

  test("test_rings_inside_guest_memory", () => {
    assert.equal(setupError({ ...good, descTable: HOLE }), "RING_OUT_OF_MEMORY");
    // The avail ring's last bytes (used_event) fall off the end of memory.
    assert.equal(setupError({ ...good, availRing: 0x80000 - 36 }), "RING_OUT_OF_MEMORY");
    assert.equal(setupError({ ...good, availRing: 0x80000 - 38 }), "OK");
    // The used ring is written by the device: a read-only region will not do.
    assert.equal(setupError({ ...good, usedRing: ROM }), "RING_OUT_OF_MEMORY");
    assert.equal(setupError({ ...good, descTable: ROM }), "OK");
    assert.equal(setupError({ ...good, usedRing: 0xffff_ffff_ffff_f000n }), "RING_OUT_OF_MEMORY");
  });

  test("test_rings_may_straddle_regions", () => {
    assert.equal(setupError({ ...splitQueueLayout(0x40000 - 0x80, 64) }), "OK");
    // And work: the descriptor table and the avail ring cross the A/B boundary.
    const driver = SplitQueueDriver.at(mem, 0x40000 - 0x80, 64);
    const queue = new SplitQueue(mem, driver.layout);
    mem.write(DATA, Uint8Array.of(1, 2, 3, 4));
    let added = 0;
    for (let round = 0; round < 3; round++) {
      while (driver.numFree >= 3) {
        driver.add(
          [
            { addr: DATA, len: 2 },
            { addr: DATA + 2, len: 2 },
          ],
          [{ addr: DATA + 0x100, len: 4 }],
        );
        added++;
      }
      driver.publish();
      for (let c = queue.popChain(); c; c = queue.popChain()) {
        assert.deepEqual(c.readReadable(), Uint8Array.of(1, 2, 3, 4));
        queue.addUsed(c.head, 0);
      }
      while (driver.getUsed());
    }
    assert.equal(queue.nextUsed, added);
  });

  test("test_indirect_table_straddling_regions", () => {
    const { driver, queue } = makePair(mem, 8, features(VIRTIO_RING_F_INDIRECT_DESC));
    const table = 0x40000 - 16;
    driver.writeDescriptor(0, DATA, 2, VIRTQ_DESC_F_NEXT, 1, table);
    driver.writeDescriptor(1, DATA + 0x100, 4, VIRTQ_DESC_F_WRITE, 0, table);
    driver.writeDescriptor(3, table, 32, 4 /* INDIRECT */, 0);
    driver.offerHead(3);
    driver.publish();
    const c = queue.popChain();
    assert.deepEqual(c && [...c].map((d) => [d.addr, d.len, d.writable]), [
      [DATA, 2, false],
      [DATA + 0x100, 4, true],
    ]);
  });
});

describe("driver and device round trips", () => {
  test("test_popping_a_chain_allocates_no_array_buffer", () => {
    // A chain's descriptors used to be a Float64Array slice: 72 bytes for a three-buffer
    // request, each with a backing store outside V8's heap (malloc, a free on another thread and
    // a sweep per request). Thousands of chains held at once must not grow ArrayBuffer memory.
    const { driver, queue } = makePair(mem, 64, features(VIRTIO_F_VERSION_1));
    const held: DescriptorChain[] = [];
    const N = 4096;
    const before = process.memoryUsage().arrayBuffers;
    for (let i = 0; i < N; i++) {
      driver.add(
        [{ addr: DATA + 16 * (i % 64), len: 16 }],
        [
          { addr: DATA + 0x1000 + 512 * (i % 64), len: 512 },
          { addr: DATA + 0x9000 + (i % 64), len: 1 },
        ],
      );
      driver.publish();
      const c = queue.popChain();
      assert.ok(c);
      held.push(c);
      queue.addUsed(c.head, 0);
      assert.ok(driver.getUsed());
    }
    const grown = process.memoryUsage().arrayBuffers - before;
    assert.ok(grown < (N * 72) / 8, `ArrayBuffer memory grew by ${grown} bytes for ${N} chains`);
    // Each chain kept its own copy of the descriptors.
    for (let i = 0; i < N; i += 511) {
      const c = held[i] as DescriptorChain;
      assert.deepEqual(
        [...c].map((d) => [d.addr, d.len, d.writable]),
        [
          [DATA + 16 * (i % 64), 16, false],
          [DATA + 0x1000 + 512 * (i % 64), 512, true],
          [DATA + 0x9000 + (i % 64), 1, true],
        ],
      );
    }
  });

  test("test_chain_of_readable_and_writable_buffers", () => {
    const { driver, queue } = makePair(mem, 16, features(VIRTIO_F_VERSION_1));
    mem.write(DATA, new TextEncoder().encode("hello, "));
    mem.write(DATA + 0x100, new TextEncoder().encode("virtio"));
    mem.fill(DATA + 0x200, 64, 0xee);
    const head = driver.add(
      [
        { addr: DATA, len: 7 },
        { addr: DATA + 0x100, len: 6 },
      ],
      [
        { addr: DATA + 0x200, len: 4 },
        { addr: DATA + 0x300, len: 20 },
      ],
    );
    assert.equal(queue.popChain(), null, "nothing is visible before publish");
    assert.equal(driver.publish(), true);
    assert.equal(queue.availableCount(), 1);

    const c = queue.popChain();
    assert.ok(c);
    assert.equal(c.head, head);
    assert.equal(c.count, 4);
    assert.equal(c.readableCount, 2);
    assert.equal(c.writableCount, 2);
    assert.equal(c.readableLength, 13);
    assert.equal(c.writableLength, 24);
    assert.equal(c.indirect, false);
    assert.deepEqual(
      [...c].map((d) => [d.addr, d.len, d.writable]),
      [
        [DATA, 7, false],
        [DATA + 0x100, 6, false],
        [DATA + 0x200, 4, true],
        [DATA + 0x300, 20, true],
      ],
    );
    assert.equal(c.flags(0) & VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_NEXT);
    assert.equal(c.flags(3), VIRTQ_DESC_F_WRITE);
    assert.equal([...c.readable()].length, 2);
    assert.equal([...c.writable()].length, 2);
    assert.equal(new TextDecoder().decode(c.readReadable()), "hello, virtio");
    const part = new Uint8Array(5);
    assert.equal(c.readReadableInto(part, 5), 5);
    assert.equal(new TextDecoder().decode(part), ", vir");
    assert.equal(c.readReadableInto(new Uint8Array(10), 10), 3, "short at the end of the readable part");

    // "HELLO, VIRTIO" spans both writable buffers.
    assert.equal(c.writeWritable(new TextEncoder().encode("HELLO, VIRTIO")), 13);
    assert.equal(c.written, 13);
    assert.equal(new TextDecoder().decode(mem.read(DATA + 0x200, 4)), "HELL");
    assert.equal(new TextDecoder().decode(mem.read(DATA + 0x300, 9)), "O, VIRTIO");
    assert.equal(mem.readU8(DATA + 0x204), 0xee, "nothing past the buffer");
    assert.equal(c.writeWritable(new Uint8Array(30), 10), 14, "truncated at the end of the writable part");
    assert.equal(c.written, 24);

    assert.equal(queue.popChain(), null);
    queue.addUsed(c.head, 13);
    assert.equal(queue.readUsedIdx(), 1);
    assert.deepEqual(driver.getUsed(), { head, len: 13 });
    assert.equal(driver.getUsed(), null);
    assert.equal(driver.numFree, 16);
  });

  test("test_buffer_straddling_two_regions", () => {
    const { driver, queue } = makePair(mem, 8);
    const data = Uint8Array.from({ length: 64 }, (_, i) => i);
    mem.write(0x40000 - 32, data);
    driver.add([{ addr: 0x40000 - 32, len: 64 }], [{ addr: 0x40000 - 16, len: 32 }]);
    driver.publish();
    const c = queue.popChain();
    assert.ok(c);
    assert.deepEqual(c.readReadable(), data);
    c.writeWritable(new Uint8Array(32).fill(7));
    assert.deepEqual(mem.read(0x40000 - 16, 32), new Uint8Array(32).fill(7));
  });

  test("test_readable_buffer_in_read_only_memory", () => {
    const { driver, queue } = makePair(mem, 8);
    driver.add([{ addr: ROM, len: 4096 }], [{ addr: DATA, len: 1 }]);
    driver.publish();
    const c = queue.popChain();
    assert.ok(c);
    assert.equal(c.readReadable().length, 4096);
  });

  test("test_indirect_chain", () => {
    const f = features(VIRTIO_F_VERSION_1, VIRTIO_RING_F_INDIRECT_DESC);
    const { driver, queue } = makePair(mem, 4, f);
    mem.write(DATA, bytes3(1, 2, 3));
    const readable = [
      { addr: DATA, len: 1 },
      { addr: DATA + 1, len: 1 },
      { addr: DATA + 2, len: 1 },
    ];
    const writable = [{ addr: DATA + 0x100, len: 8 }];
    const heads: number[] = [];
    // More chains of 4 buffers than a queue of 4 descriptors could hold directly.
    for (let i = 0; i < 4; i++) heads.push(driver.add(readable, writable, { indirect: true }));
    assert.equal(driver.numFree, 0);
    driver.publish();
    for (const head of heads) {
      const c = queue.popChain();
      assert.ok(c);
      assert.equal(c.head, head);
      assert.equal(c.indirect, true);
      assert.equal(c.count, 4);
      assert.deepEqual(c.readReadable(), bytes3(1, 2, 3));
      queue.addUsed(c.head, c.writeWritable(bytes3(9, 9, 9)));
    }
    for (const head of heads) assert.deepEqual(driver.getUsed(), { head, len: 3 });
    assert.equal(driver.numFree, 4);
  });

  test("test_direct_buffers_then_an_indirect_table", () => {
    const f = features(VIRTIO_RING_F_INDIRECT_DESC);
    const { driver, queue } = makePair(mem, 8, f);
    const table = 0x28000;
    driver.writeDescriptor(0, DATA + 0x10, 2, VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT, 1, table);
    driver.writeDescriptor(1, DATA + 0x20, 3, VIRTQ_DESC_F_WRITE, 0, table);
    driver.writeDescriptor(5, DATA, 4, VIRTQ_DESC_F_NEXT, 6);
    driver.writeDescriptor(6, table, 32, 4 /* INDIRECT */, 0);
    driver.offerHead(5);
    driver.publish();
    const c = queue.popChain();
    assert.ok(c);
    assert.deepEqual(
      [...c].map((d) => [d.addr, d.len, d.writable]),
      [
        [DATA, 4, false],
        [DATA + 0x10, 2, true],
        [DATA + 0x20, 3, true],
      ],
    );
  });

  test("test_wraparound_of_16_bit_indices", () => {
    for (const eventIdx of [false, true]) {
      const f = eventIdx ? features(29) : 0n;
      const { driver } = makePair(mem, 16, f);
      driver.startAt(0xfff0);
      const queue = new SplitQueue(mem, { ...driver.layout, features: f, nextAvail: 0xfff0, nextUsed: 0xfff0 });
      queue.enableNotification();
      let done = 0;
      let kicks = 0;
      for (let round = 0; round < 8; round++) {
        // 5 chains a round: ring slots and indices both wrap several times over 40 chains.
        for (let i = 0; i < 5; i++) {
          mem.writeU32(DATA + 8 * i, done + i);
          driver.add([{ addr: DATA + 8 * i, len: 4 }], [{ addr: DATA + 0x1000 + 8 * i, len: 4 }]);
        }
        if (driver.publish()) kicks++;
        queue.disableNotification();
        for (let c = queue.popChain(); c; c = queue.popChain()) {
          const v = new DataView(c.readReadable().buffer).getUint32(0, true);
          const out = new Uint8Array(4);
          new DataView(out.buffer).setUint32(0, v * 2, true);
          queue.addUsed(c.head, c.writeWritable(out));
        }
        assert.equal(queue.enableNotification(), false);
        for (let i = 0; i < 5; i++) {
          const u = driver.getUsed();
          assert.ok(u);
          assert.equal(u.len, 4);
          assert.equal(mem.readU32(DATA + 0x1000 + 8 * i), 2 * (done + i));
        }
        done += 5;
      }
      assert.equal(kicks, 8, "one kick per round, also across the wrap");
      assert.equal(queue.nextAvail, (0xfff0 + 40) & 0xffff);
      assert.equal(queue.nextUsed, (0xfff0 + 40) & 0xffff);
      assert.equal(queue.readUsedIdx(), 0x18);
      assert.equal(driver.numFree, 16);
    }
  });
});

describe("queue state", () => {
  test("test_next_avail_and_next_used_survive_a_handover", () => {
    const { driver, queue } = makePair(mem, 8);
    const heads = [0, 1, 2, 3].map((i) => driver.add([{ addr: DATA + i, len: 1 }], []));
    driver.publish();
    const first = queue.popChain();
    const second = queue.popChain();
    assert.ok(first && second);
    queue.addUsed(first.head, 0);
    assert.equal(queue.nextAvail, 2);
    assert.equal(queue.nextUsed, 1);

    // GET_VRING_BASE on one side, SET_VRING_BASE on the other (as a migration does).
    const resumed = new SplitQueue(mem, { ...driver.layout, nextAvail: queue.nextAvail, nextUsed: queue.nextUsed });
    resumed.addUsed(second.head, 0);
    const third = resumed.popChain();
    assert.equal(third?.head, heads[2]);
    resumed.undoPop();
    assert.equal(resumed.nextAvail, 2);
    assert.equal(resumed.popChain()?.head, heads[2]);
    assert.deepEqual(driver.getUsed(), { head: heads[0], len: 0 });
    assert.deepEqual(driver.getUsed(), { head: heads[1], len: 0 });
    resumed.nextAvail = 0x1_0003;
    assert.equal(resumed.nextAvail, 3, "kept mod 2^16");
  });

  test("test_add_used_rejects_a_head_outside_the_queue", () => {
    const { queue } = makePair(mem, 8);
    assert.throws(() => queue.addUsed(8, 0), { code: "BAD_USED_HEAD" });
    assert.throws(() => queue.addUsed(1, -1), { code: "BAD_ARGUMENT" });
    assert.equal(queue.nextUsed, 0);
  });

  test("test_set_memory_rechecks_the_rings", () => {
    const { queue } = makePair(mem, 8);
    const small = makeMemoryWithout();
    try {
      assert.throws(() => queue.setMemory(small), { code: "RING_OUT_OF_MEMORY" });
      assert.equal(queue.memory, mem, "the old memory stays");
    } finally {
      small.close();
    }
  });
});

function bytes3(a: number, b: number, c: number): Uint8Array {
  return Uint8Array.of(a, b, c);
}

function makeMemoryWithout(): GuestMemory {
  // Memory that starts above the rings.
  return new GuestMemory([GuestMemoryRegion.memfd(0x40000, 0x40000)]);
}
