/**
 * issue 12, item 5: listening on a unix path never harms what is there. A regular file, a
 * directory or a symlink at the path is refused (EEXIST) and left as it is; a live socket is
 * refused (EADDRINUSE) and keeps serving; only a socket nobody answers on is replaced. The
 * socket gets mode 0600 unless told otherwise, and our close() never removes a path someone
 * else has taken over since.
 */
import assert from "node:assert/strict";
import {
  lstatSync,
  mkdirSync,
  mkdtempSync,
  readdirSync,
  readFileSync,
  readlinkSync,
  rmSync,
  statSync,
  symlinkSync,
  unlinkSync,
  writeFileSync,
} from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, test } from "node:test";
import { SysError } from "../../src/sys/errors.js";
import { native } from "../../src/sys/native.js";
import { parseSocketMode, resolveGroup } from "../../src/sys/unix-path.js";
import { UnixListener, UnixSocket } from "../../src/sys/unix-socket.js";

const dir = mkdtempSync(join(tmpdir(), "vmshift-upath-"));
after(() => rmSync(dir, { recursive: true, force: true }));

const code = (fn: () => unknown): string => {
  try {
    fn();
    return "ok";
  } catch (e) {
    return e instanceof SysError ? e.code : String(e);
  }
};

test("a regular file, a directory and a symlink at the path are refused (EEXIST) and left intact", () => {
  const file = join(dir, "file.sock");
  writeFileSync(file, "precious");
  assert.equal(
    code(() => UnixListener.listen(file)),
    "EEXIST",
  );
  assert.equal(readFileSync(file, "utf8"), "precious");

  const d = join(dir, "dir.sock");
  mkdirSync(d);
  assert.equal(
    code(() => UnixListener.listen(d)),
    "EEXIST",
  );
  assert.ok(statSync(d).isDirectory());

  const target = join(dir, "target");
  writeFileSync(target, "also precious");
  const link = join(dir, "link.sock");
  symlinkSync(target, link);
  assert.equal(
    code(() => UnixListener.listen(link)),
    "EEXIST",
  );
  assert.equal(readlinkSync(link), target);
  assert.equal(readFileSync(target, "utf8"), "also precious");
  assert.deepEqual(
    readdirSync(dir).filter((n) => n.startsWith(".vmshift-")),
    [],
    "no private bind directory left behind",
  );
});

test("a live socket is refused (EADDRINUSE) and keeps serving; a stale one is replaced", async () => {
  const path = join(dir, "live.sock");
  const first = UnixListener.listen(path);
  try {
    const { ino } = lstatSync(path);
    assert.equal(
      code(() => UnixListener.listen(path)),
      "EADDRINUSE",
    );
    assert.equal(lstatSync(path).ino, ino, "the first listener's socket file is still the one at the path");
    const c = UnixSocket.connect(path);
    const s = await first.accept(); // the first listener still serves
    c.close();
    s.close();
  } finally {
    first.close();
  }
  assert.throws(() => lstatSync(path), /ENOENT/, "close() removed its own socket");

  // A socket file whose process is gone: nobody answers (ECONNREFUSED), so it is replaced.
  const stale = native.unixListen(path, 1);
  native.close(stale);
  assert.ok(lstatSync(path).isSocket());
  const l = UnixListener.listen(path);
  const c = UnixSocket.connect(path);
  (await l.accept()).close();
  c.close();
  l.close();
});

test("mode 0600 by default, or the mode and group asked for", () => {
  const a = join(dir, "default.sock");
  const l1 = UnixListener.listen(a);
  assert.equal(statSync(a).mode & 0o777, 0o600);
  l1.close();
  const b = join(dir, "group.sock");
  const gid = process.getgid?.() ?? 0;
  const l2 = UnixListener.listen(b, { mode: parseSocketMode("0660"), group: gid });
  assert.equal(statSync(b).mode & 0o777, 0o660);
  assert.equal(statSync(b).gid, gid);
  l2.close();
  assert.equal(parseSocketMode("660"), 0o660);
  assert.throws(() => parseSocketMode("rw-"), RangeError);
  assert.throws(() => parseSocketMode("01777"), RangeError);
  assert.equal(resolveGroup(String(gid)), gid);
  assert.throws(() => resolveGroup("no-such-group-vmshift"), RangeError);
});

test("close() leaves alone a path someone else took over meanwhile", () => {
  const path = join(dir, "taken.sock");
  const mine = UnixListener.listen(path);
  unlinkSync(path);
  const theirs = UnixListener.listen(path);
  const { ino } = lstatSync(path);
  mine.close();
  assert.equal(lstatSync(path).ino, ino, "their socket is still there");
  theirs.close();
});
