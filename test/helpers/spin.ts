/**
 * A spin barrier in shared memory for `parties` processes. Atomics.wait does not wake across
 * processes (futexes on a MAP_SHARED page are keyed per mm for private futexes), so spin.
 * Throws after `timeoutMs` so a dead partner fails the test instead of hanging it.
 */
export function spinBarrier(counter: Int32Array, parties: number, timeoutMs = 30_000): void {
  Atomics.add(counter, 0, 1);
  const deadline = Date.now() + timeoutMs;
  let spins = 0;
  while (Atomics.load(counter, 0) < parties) {
    if ((++spins & 0xffff) === 0 && Date.now() > deadline) throw new Error("spin barrier timed out");
  }
}
