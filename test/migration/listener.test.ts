/**
 * issue 12, item 5: `migrate --listen unix:P` binds P like `vmshift blk` does (listenUnixPath):
 * a regular file or a live listener at P is refused and left alone, the socket is 0600, and
 * close() removes only its own socket.
 */
import assert from "node:assert/strict";
import { lstatSync, mkdtempSync, readFileSync, rmSync, statSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, test } from "node:test";
import { connectEndpoint, MigrationListener } from "../../src/migration/transport.js";

const dir = mkdtempSync(join(tmpdir(), "vmshift-mlisten-"));
after(() => rmSync(dir, { recursive: true, force: true }));

test("unix: a regular file at the path is refused (EEXIST) and kept", async () => {
  const path = join(dir, "file.sock");
  writeFileSync(path, "precious");
  await assert.rejects(MigrationListener.listen({ kind: "unix", path }), { code: "EEXIST" });
  assert.equal(readFileSync(path, "utf8"), "precious");
});

test("unix: a live listener keeps its path (EADDRINUSE for the second); mode 0600; close removes only ours", async () => {
  const path = join(dir, "live.sock");
  const first = await MigrationListener.listen({ kind: "unix", path });
  try {
    assert.equal(statSync(path).mode & 0o777, 0o600);
    const ino = lstatSync(path).ino;
    await assert.rejects(MigrationListener.listen({ kind: "unix", path }), { code: "EADDRINUSE" });
    assert.equal(lstatSync(path).ino, ino);
    // The path answers (accept() would wait for a connection that proves itself with a
    // migration stream's first record; a bare connect is enough here).
    const c = await connectEndpoint({ kind: "unix", path });
    c.destroy();
  } finally {
    await first.close();
  }
  assert.throws(() => lstatSync(path), /ENOENT/);
});
