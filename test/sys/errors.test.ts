/** SysError carries the kernel's errno, its symbolic code and the syscall name. */
import assert from "node:assert/strict";
import { rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { test } from "node:test";
import { SysError } from "../../src/sys/errors.js";
import { Fd, isOpenFd } from "../../src/sys/fd.js";
import { Mapping } from "../../src/sys/mapping.js";
import { createMemfd, O_RDONLY, openFile } from "../../src/sys/memfd.js";
import { UnixListener, UnixSocket } from "../../src/sys/unix-socket.js";

test("connect to a missing path: SysError ENOENT from connect", () => {
  const path = join(tmpdir(), `vmshift-missing-${process.pid}`, "sock");
  assert.throws(
    () => UnixSocket.connect(path),
    (e: unknown) => {
      assert.ok(e instanceof SysError);
      assert.equal(e.errno, 2);
      assert.equal(e.code, "ENOENT");
      assert.equal(e.syscall, "connect");
      assert.match(e.message, /connect.*ENOENT/);
      return true;
    },
  );
});

test("connect to a socket nobody listens on: ECONNREFUSED", () => {
  const path = join(tmpdir(), `vmshift-refused-${process.pid}.sock`);
  const l = UnixListener.listen(path);
  const fd = l.fd.release(); // close the listening socket but keep the path
  new Fd(fd).close();
  assert.throws(() => UnixSocket.connect(path), { name: "SysError", code: "ECONNREFUSED", syscall: "connect" });
  rmSync(path, { force: true }); // l no longer owns an fd, so its close() would not unlink
});

test("open of a missing file: SysError ENOENT from open; mmap of a bad fd: EBADF", () => {
  assert.throws(() => openFile("/nonexistent/vmshift", O_RDONLY), {
    name: "SysError",
    code: "ENOENT",
    syscall: "open",
  });
  const fd = createMemfd("x", 4096);
  const n = fd.fd;
  fd.close();
  assert.equal(isOpenFd(n), false);
  assert.throws(() => Mapping.map(new Fd(n), 4096), { name: "SysError", code: "EBADF", syscall: "mmap" });
});

test("Fd: closes once, refuses use after close", () => {
  const fd = createMemfd("x", 4096);
  const n = fd.fd;
  assert.ok(isOpenFd(n));
  fd.close();
  fd.close();
  assert.equal(fd.closed, true);
  assert.throws(() => fd.fd, /after close/);
  assert.equal(isOpenFd(n), false);
  assert.throws(() => new Fd(-1), TypeError);
});
