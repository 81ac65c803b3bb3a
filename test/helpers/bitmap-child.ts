/**
 * Child process for the cross-process bitmap test. fd 3 is the shared memfd:
 * [bitmap of `pages` bits][barrier: Int32 counter]. Marks the odd pages 2*i+1 for i in
 * [0, pages/2) in a seeded random order, after a spin barrier with the parent.
 * argv: pages barrierOffset mapLength seed
 */
import { AtomicBitmap } from "../../src/memory/atomic-bitmap.js";
import { Fd } from "../../src/sys/fd.js";
import { Mapping } from "../../src/sys/mapping.js";
import { shuffle, xorshift32 } from "./random.js";
import { spinBarrier } from "./spin.js";

const [pages, barrierOffset, mapLength, seed] = process.argv.slice(2).map(Number) as [number, number, number, number];
const mapping = Mapping.map(new Fd(3), mapLength);
const sab = mapping.windows[0] as SharedArrayBuffer;
const bitmap = new AtomicBitmap(pages * 4096, 4096, sab);
const order = shuffle(
  Uint32Array.from({ length: pages / 2 }, (_, i) => i),
  xorshift32(seed),
);
spinBarrier(new Int32Array(sab, barrierOffset, 1), 2);
for (let i = 0; i < order.length; i++) bitmap.markPage(2 * (order[i] as number) + 1);
process.stdout.write(`marked ${order.length}\n`);
mapping.close();
