/**
 * Two processes on the same memory: concurrent atomic marking of one bitmap, and fds
 * (memfd + eventfd) passed over a unix socket from a child to the parent.
 */
import assert from "node:assert/strict";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { test } from "node:test";
import { AtomicBitmap } from "../../src/memory/atomic-bitmap.js";
import { EventFd } from "../../src/sys/eventfd.js";
import { Mapping } from "../../src/sys/mapping.js";
import { createMemfd } from "../../src/sys/memfd.js";
import { type Chunk, UnixListener } from "../../src/sys/unix-socket.js";
import { spawnNode } from "../helpers/proc.js";
import { shuffle, xorshift32 } from "../helpers/random.js";
import { spinBarrier } from "../helpers/spin.js";

test("parent and child mark 10^7 disjoint bits each of the same words: none lost", async () => {
  const perSide = 10_000_000;
  const pages = 2 * perSide; // parent marks even pages, child odd: every word is shared
  const bitmapBytes = pages / 8;
  const barrierOffset = bitmapBytes + 4096 - (bitmapBytes % 4096);
  const mapLength = barrierOffset + 4096;
  const fd = createMemfd("vmshift-bitmap-xproc", mapLength);
  const mapping = Mapping.map(fd, mapLength);
  const sab = mapping.windows[0] as SharedArrayBuffer;
  const bitmap = new AtomicBitmap(pages * 4096, 4096, sab);
  const order = shuffle(
    Uint32Array.from({ length: perSide }, (_, i) => i),
    xorshift32(0x1234567),
  );

  const { done } = spawnNode(
    new URL("../helpers/bitmap-child.js", import.meta.url),
    [String(pages), String(barrierOffset), String(mapLength), "0x89abcdef"],
    [fd.fd],
  );
  fd.close();
  // Both sides start marking together (the child prepares its own order first).
  spinBarrier(new Int32Array(sab, barrierOffset, 1), 2);
  for (let i = 0; i < order.length; i++) bitmap.markPage(2 * (order[i] as number));
  const child = await done;
  assert.equal(child.code, 0, `child failed: ${child.stderr}`);
  assert.match(child.stdout, new RegExp(`marked ${perSide}`));

  assert.equal(bitmap.count(), pages, "exact popcount");
  const words = bitmap.words;
  let bad = -1;
  for (let i = 0; i < words.length; i++) {
    if (words[i] !== 0xffffffff) {
      bad = i;
      break;
    }
  }
  assert.equal(bad, -1, `word ${bad} is 0x${words[bad]?.toString(16)}, expected 0xffffffff`);
  assert.equal(new Uint32Array(sab, bitmapBytes, 1)[0], 0, "nothing marked past the bitmap");
  mapping.close();
});

const CHILD_BYTES = "bytes written by the child process";

test("a child passes a memfd and an eventfd over a UnixListener; parent maps and signals", async () => {
  const path = join(tmpdir(), `vmshift-fdpass-${process.pid}.sock`);
  const listener = UnixListener.listen(path);
  const { done } = spawnNode(new URL("../helpers/fdpass-child.js", import.meta.url), [path]);
  const sock = await listener.accept();
  const chunk = await new Promise<Chunk>((resolve, reject) => {
    sock.startReceiving(
      (c) => {
        sock.stopReceiving();
        resolve(c);
      },
      (e) => reject(e ?? new Error("child closed before sending")),
    );
  });
  assert.equal(new TextDecoder().decode(chunk.data), "memfd+eventfd");
  assert.equal(chunk.fds.length, 2);
  assert.equal(chunk.fdsTruncated, false);
  const [memfd, efdFd] = chunk.fds as [(typeof chunk.fds)[0], (typeof chunk.fds)[0]];
  const m = Mapping.map(memfd, 4096);
  memfd.close();
  const got = new Uint8Array(CHILD_BYTES.length);
  m.read(0, got);
  assert.equal(new TextDecoder().decode(got), CHILD_BYTES, "the parent reads the child's bytes");
  const efd = new EventFd(efdFd);
  efd.signal(5n);
  efd.close();
  const child = await done;
  assert.equal(child.code, 0, child.stderr);
  assert.equal(child.stdout.trim(), "signalled 5", "the child saw the parent's signal");
  m.close();
  sock.close();
  listener.close();
});
