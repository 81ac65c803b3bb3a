/**
 * Property-based fuzzing of the split-virtqueue walker (fast-check): a hostile driver fills the
 * descriptor table, indirect tables and the avail ring with random values (biased towards the
 * edges of guest memory, the hole, the read-only region, 2^53 and 2^64), and the device pops
 * until the queue is empty or broken. SplitQueue.popChain may throw nothing but a
 * VirtqueueError, and every buffer of every chain it returns lies in guest memory
 * (GuestMemory.checkRange), writable ones outside the read-only region, readable ones first.
 *
 * A fixed seed and a bounded number of runs here; `npm run fuzz -- RUNS` runs longer with a
 * fresh seed (VMSHIFT_FUZZ_RUNS, VMSHIFT_FUZZ_SEED).
 */
import assert from "node:assert/strict";
import { after, before, test } from "node:test";
import fc from "fast-check";
import type { GuestMemory } from "../../src/memory/guest-memory.js";
import { VirtqueueError } from "../../src/virtio/errors.js";
import { features, VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC } from "../../src/virtio/features.js";
import { SplitQueue } from "../../src/virtio/queue.js";
import { splitQueueLayout, VIRTQ_DESC_F_INDIRECT } from "../../src/virtio/ring.js";
import { address, flags, length } from "./fuzz-arbitraries.js";
import { INDIRECT_BASE, makeMemory, RING_BASE } from "./helpers.js";

const RUNS = Number(process.env.VMSHIFT_FUZZ_RUNS ?? 3000);
const SEED = Number(process.env.VMSHIFT_FUZZ_SEED ?? 0x5eed);
if (process.env.VMSHIFT_FUZZ_RUNS) process.stderr.write(`fuzz-queue: ${RUNS} runs, seed ${SEED}\n`);

let mem: GuestMemory;
before(() => {
  mem = makeMemory();
});
after(() => mem.close());

/** Where indirect tables of the fuzzed driver live (inside region A, writable). */
const TABLES = INDIRECT_BASE;
const TABLE_SPAN = 0x800;

interface RawDesc {
  addr: bigint;
  len: number;
  flags: number;
  next: number;
}

function descriptor(size: number): fc.Arbitrary<RawDesc> {
  // Indirect descriptors mostly point at one of the indirect tables.
  const indirectAddr = fc.nat({ max: 7 }).map((i) => BigInt(TABLES + i * TABLE_SPAN));
  return fc.record({
    addr: fc.oneof({ weight: 5, arbitrary: address }, { weight: 1, arbitrary: indirectAddr }),
    len: fc.oneof({ weight: 5, arbitrary: length }, { weight: 1, arbitrary: fc.nat({ max: 40 }).map((n) => n * 16) }),
    flags,
    next: fc.oneof(
      { weight: 6, arbitrary: fc.nat({ max: size + 1 }) },
      { weight: 1, arbitrary: fc.nat({ max: 0xffff }) },
    ),
  });
}

interface Scenario {
  size: number;
  features: bigint;
  table: RawDesc[];
  /** 8 indirect tables of 32 entries at TABLES + i * TABLE_SPAN. */
  indirect: RawDesc[];
  avail: number[];
  nextAvail: number;
  /** avail idx relative to nextAvail (may jump past the queue size). */
  pending: number;
  maxChainLength: number | undefined;
}

const scenario: fc.Arbitrary<Scenario> = fc
  .record({
    log2: fc.nat({ max: 6 }),
    indirectDesc: fc.boolean(),
    eventIdx: fc.boolean(),
    nextAvail: fc.nat({ max: 0xffff }),
    maxChainLength: fc.option(fc.integer({ min: 1, max: 80 }), { nil: undefined }),
  })
  .chain(({ log2, indirectDesc, eventIdx, nextAvail, maxChainLength }) => {
    const size = 1 << log2;
    return fc.record({
      size: fc.constant(size),
      features: fc.constant(
        (indirectDesc ? features(VIRTIO_RING_F_INDIRECT_DESC) : 0n) |
          (eventIdx ? features(VIRTIO_RING_F_EVENT_IDX) : 0n),
      ),
      table: fc.array(descriptor(size), { minLength: size, maxLength: size }),
      indirect: fc.array(descriptor(32), { minLength: 0, maxLength: 8 * 32 }),
      avail: fc.array(
        fc.oneof(
          { weight: 8, arbitrary: fc.nat({ max: size - 1 }) },
          { weight: 1, arbitrary: fc.nat({ max: 0xffff }) },
        ),
        {
          minLength: size,
          maxLength: size,
        },
      ),
      nextAvail: fc.constant(nextAvail),
      pending: fc.oneof(
        { weight: 8, arbitrary: fc.nat({ max: size }) },
        { weight: 1, arbitrary: fc.nat({ max: 0xffff }) },
      ),
      maxChainLength: fc.constant(maxChainLength),
    });
  });

function writeDesc(at: number, d: RawDesc): void {
  mem.writeU64(at, d.addr);
  mem.writeU32(at + 8, d.len);
  mem.writeU16(at + 12, d.flags);
  mem.writeU16(at + 14, d.next);
}

/** Lays the scenario out in guest memory the way a (hostile) driver would; returns the queue. */
function layOut(s: Scenario): SplitQueue {
  const layout = splitQueueLayout(RING_BASE, s.size);
  mem.fill(RING_BASE, 0x8000);
  mem.fill(TABLES, 8 * TABLE_SPAN);
  for (const [i, d] of s.table.entries()) writeDesc(layout.descTable + 16 * i, d);
  for (const [i, d] of s.indirect.entries()) writeDesc(TABLES + Math.floor(i / 32) * TABLE_SPAN + 16 * (i % 32), d);
  for (const [i, head] of s.avail.entries()) mem.writeU16(layout.availRing + 4 + 2 * i, head);
  const config = {
    ...layout,
    features: s.features,
    nextAvail: s.nextAvail,
    ...(s.maxChainLength === undefined ? {} : { maxChainLength: s.maxChainLength }),
  };
  const q = new SplitQueue(mem, config);
  mem.writeU16(layout.availRing + 2, (s.nextAvail + s.pending) & 0xffff);
  return q;
}

function regionOf(gpa: number) {
  return mem.findRegion(gpa);
}

test("SplitQueue.popChain: random descriptor tables and avail rings never escape guest memory", () => {
  let chains = 0;
  let errors = 0;
  fc.assert(
    fc.property(scenario, (s) => {
      const q = layOut(s);
      for (let i = 0; i < s.size + 2; i++) {
        let chain: ReturnType<SplitQueue["popChain"]>;
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
          continue;
        }
        if (!chain) return;
        chains++;
        assert.ok(chain.head < s.size, `head ${chain.head} >= size ${s.size}`);
        assert.ok(chain.count >= 1 && chain.count <= q.maxChainLength, `chain of ${chain.count} buffers`);
        let readable = 0;
        let writable = 0;
        for (let k = 0; k < chain.count; k++) {
          const d = chain.descriptor(k);
          // Zero-length buffers touch nothing, so their address is not checked by the walker.
          if (d.len > 0) mem.checkRange(d.addr, d.len);
          if (d.writable) {
            writable += d.len;
            for (let pos = d.addr; pos < d.addr + d.len; ) {
              const r = regionOf(pos);
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
        // The device side completes it; the ring has room for it whatever the driver wrote.
        q.addUsed(chain.head, 0);
      }
    }),
    { seed: SEED, numRuns: RUNS },
  );
  // The biases above must actually produce both outcomes, or the property proves little.
  assert.ok(chains > RUNS / 10, `only ${chains} chains were returned`);
  assert.ok(errors > RUNS / 10, `only ${errors} chains were refused`);
});
