/** fast-check arbitraries for a hostile driver's descriptors, shared by the ring fuzzers. */
import fc from "fast-check";
import { DATA, HOLE, INDIRECT_BASE, MEMORY_END, ROM } from "./helpers.js";

const TABLES = INDIRECT_BASE;

export const address: fc.Arbitrary<bigint> = fc.oneof(
  { weight: 4, arbitrary: fc.bigInt({ min: 0n, max: BigInt(MEMORY_END) }) },
  {
    weight: 3,
    arbitrary: fc
      .constantFrom(0, DATA, MEMORY_END, 0x40000, HOLE, ROM, ROM + 0x10000, TABLES, 2 ** 53, 2 ** 32)
      .chain((b) => fc.integer({ min: -64, max: 64 }).map((d) => BigInt(Math.max(0, b + d)))),
  },
  { weight: 1, arbitrary: fc.bigInt({ min: 0n, max: (1n << 64n) - 1n }) },
  { weight: 1, arbitrary: fc.constantFrom((1n << 64n) - 1n, (1n << 64n) - 16n, 1n << 53n, (1n << 53n) - 1n) },
);

export const length: fc.Arbitrary<number> = fc.oneof(
  { weight: 4, arbitrary: fc.nat({ max: 0x2000 }) },
  { weight: 2, arbitrary: fc.constantFrom(0, 1, 16, 32, 48, 0x1000, 0x40000, 0x80000, 0xffff_fff0, 0xffff_ffff) },
  { weight: 1, arbitrary: fc.nat({ max: 0xffff_ffff }) },
);

export const flags: fc.Arbitrary<number> = fc.oneof(
  { weight: 6, arbitrary: fc.nat({ max: 7 }) },
  { weight: 1, arbitrary: fc.nat({ max: 0xffff }) },
);
