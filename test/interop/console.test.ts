/**
 * The serial console's line handling, without QEMU: a kernel message printed into the middle of
 * a line a guest program writes becomes a line of its own, and the program's line is whole again
 * (a background loop's records are parsed from these lines; a cut record read as a missing one).
 */
import assert from "node:assert/strict";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { PassThrough } from "node:stream";
import { test } from "node:test";
import { linesAcrossMigration, SerialConsole } from "./console.js";

test("a kernel message in the middle of a program's line: both come out whole", async () => {
  const dir = mkdtempSync(join(tmpdir(), "vmshift-console-"));
  const out = new PassThrough();
  const con = new SerialConsole(out, new PassThrough(), join(dir, "console.log"), () => "closed");
  try {
    out.write("RIG-FLOOP n=4 file=/mnt/loop/floop-0 sha256=ab");
    out.write("[   14.484847] clocksource: Long readout interval, skipping watchdog check\r\n");
    out.write("cdef io=ok uptime=15.02\r\n[   15.100000] virtio_blk virtio1: a whole kernel line\r\n");
    out.write("RIG-DIRTY pass=30 [ not a timestamp ] uptime=15.68\n");
    const i = await con.waitFor(/RIG-DIRTY/);
    assert.deepEqual(con.lines.slice(0, i + 1), [
      "[   14.484847] clocksource: Long readout interval, skipping watchdog check",
      "RIG-FLOOP n=4 file=/mnt/loop/floop-0 sha256=abcdef io=ok uptime=15.02",
      "[   15.100000] virtio_blk virtio1: a whole kernel line",
      "RIG-DIRTY pass=30 [ not a timestamp ] uptime=15.68",
    ]);
  } finally {
    out.end();
    rmSync(dir, { recursive: true, force: true });
  }
});

test("a line the guest began on the source and ended on the destination comes out whole", async () => {
  const dir = mkdtempSync(join(tmpdir(), "vmshift-console-"));
  const srcOut = new PassThrough();
  const dstOut = new PassThrough();
  const src = new SerialConsole(srcOut, new PassThrough(), join(dir, "src.log"), () => "closed");
  const dst = new SerialConsole(dstOut, new PassThrough(), join(dir, "dst.log"), () => "closed");
  try {
    srcOut.write("RIG-FLOOP n=7 file=/mnt/loop/floop-3 sha256=a3 io=ok uptime=6.61\r\nRIG-");
    await src.waitFor(/n=7/);
    dstOut.write("FLOOP n=8 file=/mnt/loop/floop-0 sha256=45 io=ok uptime=6.89\r\nRIG-FLOOP n=9 x\r\n");
    await dst.waitFor(/n=9/);
    assert.deepEqual(linesAcrossMigration(src, dst), [
      "RIG-FLOOP n=7 file=/mnt/loop/floop-3 sha256=a3 io=ok uptime=6.61",
      "RIG-FLOOP n=8 file=/mnt/loop/floop-0 sha256=45 io=ok uptime=6.89",
      "RIG-FLOOP n=9 x",
    ]);
  } finally {
    src.close();
    dst.close();
    rmSync(dir, { recursive: true, force: true });
  }
});
