import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";
import type { GuestMemory } from "../../src/memory/guest-memory.js";
import type { SplitQueueDriver } from "../../src/virtio/driver.js";
import { VirtqueueError, type VirtqueueErrorCode } from "../../src/virtio/errors.js";
import { features, VIRTIO_RING_F_INDIRECT_DESC } from "../../src/virtio/features.js";
import type { SplitQueue } from "../../src/virtio/queue.js";
import { VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE } from "../../src/virtio/ring.js";
import { DATA, HOLE, MEMORY_END, makeMemory, makePair, ROM } from "./helpers.js";

const NEXT = VIRTQ_DESC_F_NEXT;
const WRITE = VIRTQ_DESC_F_WRITE;
const INDIRECT = VIRTQ_DESC_F_INDIRECT;
const TABLE = 0x28000;

let mem: GuestMemory;
before(() => {
  mem = makeMemory();
});
after(() => mem.close());

interface Hostile {
  driver: SplitQueueDriver;
  queue: SplitQueue;
  /** Writes descriptors into the main table (or `table`) as a hostile driver would. */
  desc(index: number, addr: number | bigint, len: number, flags: number, next?: number, table?: number): void;
  /** Makes `head` available and publishes it. */
  offer(head: number): void;
}

function hostile(size = 16, feat = features(VIRTIO_RING_F_INDIRECT_DESC), device = {}): Hostile {
  const { driver, queue } = makePair(mem, size, feat, device);
  return {
    driver,
    queue,
    desc: (index, addr, len, flags, next = 0, table = driver.descTable) =>
      driver.writeDescriptor(index, addr, len, flags, next, table),
    offer: (head) => {
      driver.offerHead(head);
      driver.publish();
    },
  };
}

/**
 * The chain must fail with `code` and the details given; then the queue must still work: a good
 * chain offered after it pops normally.
 */
function expectChainError(
  h: Hostile,
  code: VirtqueueErrorCode,
  details: Partial<VirtqueueError["details"]> = {},
): VirtqueueError {
  const before = h.queue.nextAvail;
  let err: unknown;
  try {
    h.queue.popChain();
  } catch (e) {
    err = e;
  }
  assert.ok(err instanceof VirtqueueError, `expected VirtqueueError ${code}, got ${String(err)}`);
  assert.equal(err.code, code, err.message);
  for (const [k, v] of Object.entries(details)) {
    assert.deepEqual(err.details[k as keyof VirtqueueError["details"]], v, `details.${k}`);
  }
  assert.equal(err.breaksQueue, false);
  assert.equal(h.queue.broken, null);
  assert.equal(h.queue.nextAvail, (before + 1) & 0xffff, "the bad chain is consumed");
  // The queue goes on.
  h.desc(15, DATA, 4, 0);
  h.offer(15);
  const c = h.queue.popChain();
  assert.equal(c?.head, 15);
  assert.equal(c?.count, 1);
  return err;
}

describe("malformed chains: typed error, chain dropped, queue continues", () => {
  test("test_head_index_outside_the_queue", () => {
    const h = hostile();
    h.offer(16);
    expectChainError(h, "HEAD_OUT_OF_RANGE", { head: 16, value: 16, limit: 16 });
    h.offer(0xffff);
    expectChainError(h, "HEAD_OUT_OF_RANGE", { value: 0xffff });
  });

  test("test_next_index_outside_the_queue", () => {
    const h = hostile();
    h.desc(0, DATA, 4, NEXT, 16);
    h.offer(0);
    expectChainError(h, "NEXT_OUT_OF_RANGE", { head: 0, index: 16, value: 16, limit: 16 });
  });

  test("test_descriptor_loop", () => {
    const h = hostile();
    h.desc(0, DATA, 4, NEXT, 1);
    h.desc(1, DATA, 4, NEXT, 2);
    h.desc(2, DATA, 4, NEXT, 0);
    h.offer(0);
    expectChainError(h, "DESCRIPTOR_LOOP", { head: 0, index: 0, indirect: false });
    h.desc(3, DATA, 4, NEXT, 3);
    h.offer(3);
    expectChainError(h, "DESCRIPTOR_LOOP", { head: 3, index: 3 });
  });

  test("test_loop_that_does_not_return_to_the_head", () => {
    const h = hostile();
    h.desc(4, DATA, 4, NEXT, 5);
    h.desc(5, DATA, 4, NEXT, 6);
    h.desc(6, DATA, 4, NEXT, 5);
    h.offer(4);
    expectChainError(h, "DESCRIPTOR_LOOP", { head: 4, index: 5 });
  });

  test("test_chain_longer_than_the_queue_size", () => {
    // Two direct buffers and a 15-entry indirect table: 17 buffers for a queue of 16.
    const h = hostile();
    h.desc(0, DATA, 4, NEXT, 1);
    h.desc(1, DATA, 4, NEXT, 2);
    h.desc(2, TABLE, 15 * 16, INDIRECT);
    for (let i = 0; i < 15; i++) h.desc(i, DATA, 1, i < 14 ? NEXT : 0, i + 1, TABLE);
    h.offer(0);
    expectChainError(h, "CHAIN_TOO_LONG", { head: 0, value: 17, limit: 16, indirect: true });
  });

  test("test_chain_longer_than_a_configured_limit", () => {
    const h = hostile(16, 0n, { maxChainLength: 4 });
    for (let i = 0; i < 5; i++) h.desc(i, DATA, 1, i < 4 ? NEXT : 0, i + 1);
    h.offer(0);
    expectChainError(h, "CHAIN_TOO_LONG", { limit: 4 });
  });

  test("test_indirect_without_the_feature", () => {
    const h = hostile(16, 0n);
    h.desc(0, TABLE, 16, INDIRECT);
    h.offer(0);
    expectChainError(h, "INDIRECT_NOT_NEGOTIATED", { head: 0, flags: INDIRECT });
  });

  test("test_nested_indirect_table", () => {
    const h = hostile();
    h.desc(0, TABLE, 32, INDIRECT);
    h.desc(0, DATA, 4, NEXT, 1, TABLE);
    h.desc(1, TABLE + 0x100, 16, INDIRECT, 0, TABLE);
    h.desc(0, DATA, 4, 0, 0, TABLE + 0x100);
    h.offer(0);
    expectChainError(h, "NESTED_INDIRECT", { head: 0, index: 1, indirect: true });
  });

  test("test_indirect_together_with_next", () => {
    const h = hostile();
    h.desc(0, TABLE, 16, INDIRECT | NEXT, 1);
    h.desc(1, DATA, 4, 0);
    h.desc(0, DATA, 4, 0, 0, TABLE);
    h.offer(0);
    expectChainError(h, "INDIRECT_WITH_NEXT", { flags: INDIRECT | NEXT });
  });

  test("test_indirect_table_with_a_bad_length", () => {
    const h = hostile();
    for (const len of [0, 8, 17, 16 * 16 + 8, 17 * 16, 0xffff_fff0]) {
      h.desc(0, TABLE, len, INDIRECT);
      h.offer(0);
      expectChainError(h, "BAD_INDIRECT_LENGTH", { length: len, address: BigInt(TABLE), limit: 16 * 16 });
    }
  });

  test("test_indirect_table_outside_guest_memory", () => {
    const h = hostile();
    h.desc(0, HOLE, 64, INDIRECT);
    h.offer(0);
    expectChainError(h, "ADDRESS_OUT_OF_RANGE", { address: BigInt(HOLE), length: 64 });
    h.desc(0, MEMORY_END - 32, 64, INDIRECT);
    h.offer(0);
    expectChainError(h, "ADDRESS_OUT_OF_RANGE", { address: BigInt(MEMORY_END - 32) });
  });

  test("test_loop_and_bad_next_inside_an_indirect_table", () => {
    const h = hostile();
    h.desc(0, TABLE, 48, INDIRECT);
    h.desc(0, DATA, 4, NEXT, 1, TABLE);
    h.desc(1, DATA, 4, NEXT, 0, TABLE);
    h.offer(0);
    expectChainError(h, "DESCRIPTOR_LOOP", { indirect: true, index: 0 });
    h.desc(1, DATA, 4, NEXT, 3, TABLE);
    h.offer(0);
    expectChainError(h, "NEXT_OUT_OF_RANGE", { indirect: true, value: 3, limit: 3 });
  });

  test("test_buffer_outside_guest_memory", () => {
    const h = hostile();
    const cases: [number | bigint, number, number][] = [
      [HOLE, 16, 0],
      [MEMORY_END - 8, 16, 0], // straddles the end of memory
      [MEMORY_END - 8, 16, WRITE],
      [0x7fff_ffff_0000n, 16, 0], // far above memory
      [0xffff_ffff_0000_0000n, 16, 0], // above 2^53: not even a JS-exact address
      [ROM, 16, WRITE], // the device must not write into read-only memory
    ];
    for (const [addr, len, flags] of cases) {
      h.desc(0, addr, len, flags);
      h.offer(0);
      expectChainError(h, "ADDRESS_OUT_OF_RANGE", { address: BigInt(addr), length: len, flags });
    }
  });

  test("test_addr_plus_len_overflows_64_bits", () => {
    const h = hostile();
    h.desc(0, 0xffff_ffff_ffff_f000n, 0x2000, 0);
    h.offer(0);
    expectChainError(h, "ADDRESS_OVERFLOW", { address: 0xffff_ffff_ffff_f000n, length: 0x2000 });
    h.desc(0, DATA, 4, NEXT, 1);
    h.desc(1, 0xffff_ffff_ffff_ffffn, 1, WRITE);
    h.offer(0);
    expectChainError(h, "ADDRESS_OVERFLOW", { index: 1 });
  });

  test("test_readable_after_writable", () => {
    const h = hostile();
    h.desc(0, DATA, 4, WRITE | NEXT, 1);
    h.desc(1, DATA, 4, 0);
    h.offer(0);
    expectChainError(h, "READABLE_AFTER_WRITABLE", { index: 1 });
  });

  test("test_zero_length_buffer_with_a_wild_address_is_harmless", () => {
    const h = hostile();
    h.desc(0, DATA, 4, NEXT, 1);
    h.desc(1, 0xffff_ffff_ffff_fff0n, 0, WRITE);
    h.offer(0);
    const c = h.queue.popChain();
    assert.equal(c?.count, 2);
    assert.equal(c?.writableLength, 0);
    assert.equal(c?.writeWritable(Uint8Array.of(1)), 0);
  });

  test("test_descriptors_rewritten_after_pop_change_nothing", () => {
    const h = hostile();
    h.desc(0, DATA, 4, WRITE);
    h.offer(0);
    const c = h.queue.popChain();
    assert.ok(c);
    h.desc(0, HOLE, 4096, WRITE); // too late: the chain is a validated copy
    assert.equal(c.writeWritable(Uint8Array.of(1, 2, 3, 4)), 4);
    assert.deepEqual(mem.read(DATA, 4), Uint8Array.of(1, 2, 3, 4));
  });
});

describe("malformed rings: the queue is broken (device needs reset)", () => {
  test("test_avail_idx_jumps_past_the_queue_size", () => {
    const h = hostile();
    h.driver.setAvailIdx(17);
    h.driver.publish();
    let err: unknown;
    try {
      h.queue.popChain();
    } catch (e) {
      err = e;
    }
    assert.ok(err instanceof VirtqueueError);
    assert.equal(err.code, "AVAIL_IDX_JUMP");
    assert.equal(err.details.value, 17);
    assert.equal(err.details.limit, 16);
    assert.equal(err.breaksQueue, true);
    assert.equal(h.queue.broken, err);
    // Every later use says so, with the cause, whatever the driver does now.
    h.driver.setAvailIdx(1);
    h.driver.publish();
    for (const f of [() => h.queue.popChain(), () => h.queue.addUsed(0, 0), () => h.queue.enableNotification()]) {
      assert.throws(f, (e: unknown) => e instanceof VirtqueueError && e.code === "QUEUE_BROKEN" && e.cause === err);
    }
  });

  test("test_avail_idx_exactly_a_queue_ahead_is_fine", () => {
    const h = hostile(4, 0n);
    for (let i = 0; i < 4; i++) h.driver.add([{ addr: DATA, len: 1 }], []);
    h.driver.publish();
    assert.equal(h.queue.availableCount(), 4);
  });
});

test("test_random_garbage_never_escapes_guest_memory", () => {
  // A fixed-seed xorshift: garbage descriptors, avail entries and avail idx; every pop either
  // yields a chain whose buffers are all guest memory, or a VirtqueueError.
  let s = 0x9e3779b9;
  const rnd = (): number => {
    s ^= s << 13;
    s ^= s >>> 17;
    s ^= s << 5;
    return s >>> 0;
  };
  const h = hostile(16);
  const addrs = [DATA, TABLE, HOLE, MEMORY_END - 8, ROM, 0];
  let chains = 0;
  let errors = 0;
  for (let round = 0; round < 300; round++) {
    for (let i = 0; i < 16; i++) {
      const addr = rnd() % 7 === 0 ? BigInt(rnd()) << 32n : (addrs[rnd() % addrs.length] as number) + (rnd() % 64);
      h.desc(i, addr, rnd() % 5 === 0 ? rnd() : rnd() % 256, rnd() & 7, rnd() % 20);
      h.desc(i, addr, rnd() % 300, rnd() & 7, rnd() % 20, TABLE);
    }
    h.driver.offerHead(rnd() % 18);
    h.driver.publish();
    try {
      const c = h.queue.popChain();
      assert.ok(c);
      chains++;
      for (const d of c) if (d.len) assert.ok(mem.isValidRange(d.addr, d.len));
      h.queue.addUsed(c.head, c.writeWritable(new Uint8Array(c.writableLength).fill(0xab)));
    } catch (e) {
      assert.ok(e instanceof VirtqueueError, String(e));
      assert.equal(e.breaksQueue, false);
      errors++;
    }
  }
  assert.equal(chains + errors, 300);
  assert.ok(chains > 0 && errors > 0, `${chains} chains, ${errors} errors`);
});
