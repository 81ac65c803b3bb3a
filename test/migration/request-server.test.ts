/**
 * The source's native request server (native/src/postcopy.cc, src/sys/postcopy-thread.ts) on
 * its own, over a real TCP connection: a requested page that is in memory nowhere (a memfd page
 * never written, no swap) goes out as a zero page without being read, so it stays unpopulated;
 * a written page goes out whole.
 */
import assert from "node:assert/strict";
import type { Socket } from "node:net";
import { test } from "node:test";
import { crc32 } from "node:zlib";
import { GuestMemoryRegion } from "../../src/memory/region.js";
import { residencyImpliesZero } from "../../src/migration/digest.js";
import { encodePageRequest, RecordType } from "../../src/migration/format.js";
import { RequestServer } from "../../src/sys/postcopy-thread.js";
import { countFds, settle, socketPair } from "./helpers.js";

const PAGE = 4096;

/** One PAGES record of one page from `s`: its page number, flag and data (CRC checked). */
async function readPageRecord(s: Socket): Promise<{ page: number; zero: boolean; data: Buffer }> {
  let buf = Buffer.alloc(0);
  for (;;) {
    if (buf.length >= 8) {
      const len = buf.readUInt32LE(4);
      if (buf.length >= 8 + len + 4) {
        assert.equal(buf[0], RecordType.Pages);
        assert.equal(buf.readUInt32LE(8 + len), crc32(buf.subarray(0, 8 + len)), "record CRC");
        assert.equal(buf.length, 8 + len + 4, "one record at a time");
        const p = buf.subarray(8, 8 + len);
        assert.equal(p.readUInt32LE(4), 1, "one page");
        const zero = p[12] === 1;
        return { page: p.readUInt32LE(8), zero, data: zero ? Buffer.alloc(0) : Buffer.from(p.subarray(16)) };
      }
    }
    const chunk: Buffer = await new Promise((res, rej) => {
      s.once("data", res);
      s.once("error", rej);
    });
    buf = Buffer.concat([buf, chunk]);
  }
}

test("a requested page in memory nowhere is sent as a zero page without faulting it in; a written page whole", async (t) => {
  const region = GuestMemoryRegion.memfd(0, 1024 * 1024, { name: "request-server" });
  try {
    if (!residencyImpliesZero(region)) {
      const msg = "!!! SKIPPED: swap is configured: a page not resident may be in swap, so it is always read !!!";
      console.warn(msg);
      t.skip(msg);
      return;
    }
    const fds = countFds();
    const written = (region.bytes(PAGE, PAGE) as Uint8Array).fill(0x5a);
    const [ours, theirs] = await socketPair();
    ours.pause();
    const sent = new Uint8Array(new SharedArrayBuffer(region.size / PAGE / 8));
    const fd = (ours as unknown as { _handle: { fd: number } })._handle.fd;
    const server = new RequestServer(
      fd,
      [{ memory: region.bytes(0, region.size) as Uint8Array, sent, discard: null, blockSize: 0, absentIsZero: true }],
      0,
      () => undefined,
    );
    ours.destroy(); // the server holds its own fd
    try {
      const mapping = region.mapping;
      assert.ok(mapping);
      assert.equal((mapping.residency(7 * PAGE, PAGE)[0] as number) & 1, 0, "page 7 starts unpopulated");

      theirs.write(encodePageRequest(0, 7));
      const hole = await readPageRecord(theirs);
      assert.deepEqual([hole.page, hole.zero], [7, true]);
      assert.equal((mapping.residency(7 * PAGE, PAGE)[0] as number) & 1, 0, "page 7 still unpopulated");

      theirs.write(encodePageRequest(0, 1));
      const full = await readPageRecord(theirs);
      assert.deepEqual([full.page, full.zero], [1, false]);
      assert.deepEqual(full.data, Buffer.from(written));

      const st = server.stats();
      assert.equal(st.requests, 2);
      assert.equal(st.absentZeros, 1);
      assert.equal(sent[0], (1 << 7) | (1 << 1), "both pages marked sent");
    } finally {
      server.stop();
      theirs.destroy();
    }
    await settle();
    assert.ok(countFds() <= fds, "fds leaked");
  } finally {
    region.close();
  }
});
