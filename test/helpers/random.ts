/** xorshift32, the same stream as native/bench-ref.cc markRandom (seed must be non-zero). */
export function xorshift32(seed: number): () => number {
  let x = seed >>> 0 || 1;
  return () => {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    x >>>= 0;
    return x;
  };
}

/** Fisher-Yates shuffle in place with a seeded PRNG. */
export function shuffle(a: Uint32Array, next: () => number): Uint32Array {
  for (let i = a.length - 1; i > 0; i--) {
    const j = next() % (i + 1);
    const t = a[i] as number;
    a[i] = a[j] as number;
    a[j] = t;
  }
  return a;
}
