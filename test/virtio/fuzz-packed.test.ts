/**
 * Property-based fuzzing of the packed-virtqueue walker (fast-check), as fuzz-queue does for
 * split rings: a hostile driver fills the descriptor ring and indirect tables with random values
 * (addresses biased to the edges of guest memory, the hole, the read-only region, 2^53, 2^64;
 * AVAIL/USED/NEXT flags in every combination), the device starts at a random position with a
 * random number of slots already in flight, then pops until the ring is empty or broken,
 * returning every chain (refused ones with length 0 and the slots the error names) in a random
 * order. PackedQueue may throw nothing but a VirtqueueError; every buffer it hands out lies in
 * guest memory (writable ones outside the read-only region, readable ones first); it never has
 * more than `size` slots in flight.
 *
 * Fixed seed and bounded runs here; `npm run fuzz` runs longer (VMSHIFT_FUZZ_RUNS, _SEED).
 */
import assert from "node:assert/strict";
import { after, before, test } from "node:test";
import fc from "fast-check";
import type { GuestMemory } from "../../src/memory/guest-memory.js";
import type { DescriptorChain } from "../../src/virtio/chain.js";
import { VirtqueueError } from "../../src/virtio/errors.js";
import { features, VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC } from "../../src/virtio/features.js";
import { PackedQueue } from "../../src/virtio/packed.js";
import { availFlags, packedQueueLayout, VIRTQ_DESC_F_AVAIL, VIRTQ_DESC_F_USED } from "../../src/virtio/packed-ring.js";
import { VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT } from "../../src/virtio/ring.js";
import { address, length } from "./fuzz-arbitraries.js";
import { INDIRECT_BASE, makeMemory, RING_BASE } from "./helpers.js";

const RUNS = Number(process.env.VMSHIFT_FUZZ_RUNS ?? 2000);
const SEED = Number(process.env.VMSHIFT_FUZZ_SEED ?? 0x9ac4ed);
if (process.env.VMSHIFT_FUZZ_RUNS) process.stderr.write(`fuzz-packed: ${RUNS} runs, seed ${SEED}\n`);

let mem: GuestMemory;
before(() => {
  mem = makeMemory();
});
after(() => mem.close());

const TABLES = INDIRECT_BASE;
const TABLE_SPAN = 0x800;

interface RawDesc {
  addr: bigint;
  len: number;
  id: number;
  flags: number;
}

/** Low 3 bits (NEXT, WRITE, INDIRECT) in any combination, AVAIL/USED in any, sometimes anything. */
const ringFlags: fc.Arbitrary<number> = fc.oneof(
  {
    weight: 8,
    arbitrary: fc
      .record({ low: fc.nat({ max: 7 }), a: fc.boolean(), u: fc.boolean(), next: fc.boolean() })
      .map(
        ({ low, a, u, next }) =>
          (low & ~VIRTQ_DESC_F_NEXT) |
          (next ? VIRTQ_DESC_F_NEXT : 0) |
          (a ? VIRTQ_DESC_F_AVAIL : 0) |
          (u ? VIRTQ_DESC_F_USED : 0),
      ),
  },
  { weight: 1, arbitrary: fc.nat({ max: 0xffff }) },
);

function descriptor(): fc.Arbitrary<RawDesc> {
  const indirectAddr = fc.nat({ max: 7 }).map((i) => BigInt(TABLES + i * TABLE_SPAN));
  return fc.record({
    addr: fc.oneof({ weight: 5, arbitrary: address }, { weight: 1, arbitrary: indirectAddr }),
    len: fc.oneof({ weight: 5, arbitrary: length }, { weight: 1, arbitrary: fc.nat({ max: 40 }).map((n) => n * 16) }),
    id: fc.oneof({ weight: 4, arbitrary: fc.nat({ max: 64 }) }, { weight: 1, arbitrary: fc.nat({ max: 0xffff }) }),
    flags: ringFlags,
  });
}

interface Scenario {
  size: number;
  features: bigint;
  ring: RawDesc[];
  indirect: RawDesc[];
  nextAvail: number;
  availWrap: boolean;
  inFlight: number;
  maxChainLength: number | undefined;
  order: number[];
}

const scenario: fc.Arbitrary<Scenario> = fc
  .record({
    size: fc.integer({ min: 1, max: 48 }),
    indirectDesc: fc.boolean(),
    eventIdx: fc.boolean(),
    availWrap: fc.boolean(),
    maxChainLength: fc.option(fc.integer({ min: 1, max: 80 }), { nil: undefined }),
  })
  .chain(({ size, indirectDesc, eventIdx, availWrap, maxChainLength }) =>
    fc.record({
      size: fc.constant(size),
      features: fc.constant(
        (indirectDesc ? features(VIRTIO_RING_F_INDIRECT_DESC) : 0n) |
          (eventIdx ? features(VIRTIO_RING_F_EVENT_IDX) : 0n),
      ),
      ring: fc.array(descriptor(), { minLength: size, maxLength: size }),
      indirect: fc.array(descriptor(), { minLength: 0, maxLength: 8 * 32 }),
      nextAvail: fc.nat({ max: size - 1 }),
      availWrap: fc.constant(availWrap),
      inFlight: fc.oneof({ weight: 4, arbitrary: fc.constant(0) }, { weight: 1, arbitrary: fc.nat({ max: size }) }),
      maxChainLength: fc.constant(maxChainLength),
      order: fc.array(fc.nat(), { minLength: 4, maxLength: 4 }),
    }),
  );

function writeDesc(at: number, d: RawDesc): void {
  mem.writeU64(at, d.addr);
  mem.writeU32(at + 8, d.len);
  mem.writeU16(at + 12, d.id);
  mem.writeU16(at + 14, d.flags);
}

function layOut(s: Scenario): PackedQueue {
  const l = packedQueueLayout(RING_BASE, s.size);
  mem.fill(RING_BASE, 0x8000);
  mem.fill(TABLES, 8 * TABLE_SPAN);
  for (const [i, d] of s.ring.entries()) {
    // Most descriptors carry the flags of "available in the lap the device is in" (what a
    // driver writes), so chains get walked; the rest keep random AVAIL/USED bits.
    const wrap = i >= s.nextAvail ? s.availWrap : !s.availWrap;
    const flags = d.id % 4 === 0 ? d.flags : (d.flags & ~(VIRTQ_DESC_F_AVAIL | VIRTQ_DESC_F_USED)) | availFlags(wrap);
    writeDesc(l.descRing + 16 * i, { ...d, flags });
  }
  for (const [i, d] of s.indirect.entries()) writeDesc(TABLES + Math.floor(i / 32) * TABLE_SPAN + 16 * (i % 32), d);
  // The used position trails the avail one by `inFlight` slots (wrapping, with its own counter).
  let usedIdx = s.nextAvail - s.inFlight;
  let usedWrap = s.availWrap;
  if (usedIdx < 0) {
    usedIdx += s.size;
    usedWrap = !usedWrap;
  }
  return new PackedQueue(mem, {
    ...l,
    features: s.features,
    nextAvail: s.nextAvail,
    availWrap: s.availWrap,
    nextUsed: usedIdx,
    usedWrap,
    ...(s.maxChainLength === undefined ? {} : { maxChainLength: s.maxChainLength }),
  });
}

test("PackedQueue.popChain: random descriptor rings never escape guest memory", () => {
  let chains = 0;
  let errors = 0;
  fc.assert(
    fc.property(scenario, (s) => {
      const q = layOut(s);
      const held: [id: number, slots: number][] = [];
      let prefilled = s.inFlight;
      for (let i = 0; i < 3 * s.size + 2; i++) {
        assert.ok(q.inFlightSlots <= s.size, `${q.inFlightSlots} slots in flight on a ring of ${s.size}`);
        let chain: DescriptorChain | null;
        try {
          chain = q.popChain();
        } catch (e) {
          if (!(e instanceof VirtqueueError)) {
            assert.fail(`popChain threw ${e instanceof Error ? `${e.name}: ${e.message}` : String(e)}`);
          }
          errors++;
          if (e.breaksQueue) {
            assert.ok(q.broken, "a ring-level error must leave the queue broken");
            return;
          }
          const slots = e.details.slots;
          assert.ok(slots !== undefined && slots >= 1, "a refused chain names its slots");
          held.push([e.details.head ?? 0, slots]);
          continue;
        }
        if (!chain) {
          // Return something (the prefilled slots first), or stop when nothing is held.
          if (prefilled > 0) {
            q.addUsed(0, 0, prefilled);
            prefilled = 0;
            continue;
          }
          const k = held.length ? (s.order[i % 4] as number) % held.length : -1;
          if (k < 0) return;
          const [id, slots] = held.splice(k, 1)[0] as [number, number];
          q.addUsed(id, 0, slots);
          continue;
        }
        chains++;
        assert.ok(chain.count >= 1 && chain.count <= q.maxChainLength, `chain of ${chain.count} buffers`);
        assert.ok(chain.slots >= 1 && chain.slots <= s.size);
        let readable = 0;
        let writable = 0;
        for (let k = 0; k < chain.count; k++) {
          const d = chain.descriptor(k);
          if (d.len > 0) mem.checkRange(d.addr, d.len);
          if (d.writable) {
            writable += d.len;
            for (let pos = d.addr; pos < d.addr + d.len; ) {
              const r = mem.findRegion(pos);
              assert.ok(r && !r.readonly, `writable buffer [0x${d.addr.toString(16)}, +${d.len}) in read-only memory`);
              pos = r.end;
            }
          } else {
            assert.equal(k < chain.readableCount, true, "a readable buffer after a writable one");
            readable += d.len;
          }
          assert.equal((d.flags & VIRTQ_DESC_F_INDIRECT) !== 0, false, "an indirect descriptor returned as a buffer");
        }
        assert.equal(readable, chain.readableLength);
        assert.equal(writable, chain.writableLength);
        held.push([chain.head, chain.slots]);
      }
    }),
    { seed: SEED, numRuns: RUNS },
  );
  assert.ok(chains > RUNS / 10, `only ${chains} chains were returned`);
  assert.ok(errors > RUNS / 10, `only ${errors} chains were refused`);
});
