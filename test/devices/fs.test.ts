/**
 * The virtio-fs session in process: the FUSE decoder on byte-level fixtures, and the session over
 * a real directory, driven request by request as the guest's kernel would — plus every escape a
 * hostile guest can try (`..`, '/', absolute names, NUL, over-long names, symlinks planted towards
 * the outside, FIFOs and device nodes, bogus node ids, handles and offsets), the inode and handle
 * lifetimes (fd counts back to where they were), and the migration state: saved on one session,
 * loaded into another over the same directory, the open handles usable there.
 */
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { randomBytes } from "node:crypto";
import {
  existsSync,
  lstatSync,
  mkdirSync,
  mkdtempSync,
  readFileSync,
  renameSync,
  rmSync,
  symlinkSync,
  writeFileSync,
} from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, describe, test } from "node:test";
import { decodeRequest, FuseError, MAX_READ } from "../../src/devices/fs/decode.js";
import { PassthroughFs } from "../../src/devices/fs/passthrough.js";
import { FuseServer } from "../../src/devices/fs/server.js";
import { decodeState, encodeState, FsStateError, STATE_MAGIC } from "../../src/devices/fs/state.js";
import { cstr, FuseTestClient, Op, request, struct } from "../helpers/fuse-client.js";
import { countFds } from "../helpers/proc.js";

const EPERM = 1;
const ENOENT = 2;
const EIO = 5;
const EBADF = 9;
const EEXIST = 17;
const ENOTDIR = 20;
const EINVAL = 22;
const ENOSYS = 38;
const ELOOP = 40;
const ESTALE = 116;

const top = mkdtempSync(join(tmpdir(), "vmshift-fs-test-"));
after(() => rmSync(top, { recursive: true, force: true }));
let dirSeq = 0;

/** A fresh shared directory with a secret file next to it (outside) and a client on an INITed session. */
function setup(o: { init?: boolean; readonly?: boolean } = {}) {
  const base = join(top, `t${++dirSeq}`);
  const share = join(base, "share");
  mkdirSync(share, { recursive: true });
  const secret = randomBytes(12).toString("hex");
  writeFileSync(join(base, "secret.txt"), secret);
  const fs = new PassthroughFs(share, { readonly: !!o.readonly });
  const warnings: string[] = [];
  const server = new FuseServer(fs, { warn: (m) => warnings.push(m) });
  const c = new FuseTestClient(server);
  if (o.init !== false) c.init();
  return { base, share, secret, fs, server, c, warnings };
}

describe("FUSE decoder", () => {
  const dec = (b: Uint8Array) => decodeRequest(b, b.length);
  const fails = (b: Uint8Array, code: string, total = b.length) =>
    assert.throws(
      () => decodeRequest(b, total),
      (e: unknown) => e instanceof FuseError && e.code === code,
    );

  test("a LOOKUP decodes to its name; a header shorter than 40 bytes or a len that lies is refused", () => {
    const r = dec(request(Op.LOOKUP, 1, cstr("file.txt")));
    assert.equal(r.request.op, Op.LOOKUP);
    assert.equal(new TextDecoder().decode((r.request as { name: Uint8Array }).name), "file.txt");
    fails(new Uint8Array(39), "SHORT_REQUEST");
    const lying = request(Op.LOOKUP, 1, cstr("x"));
    new DataView(lying.buffer).setUint32(0, 4096, true);
    fails(lying, "LENGTH_MISMATCH");
  });

  test("names: '', '.', '..', 'a/b', '/etc', no NUL, 256 bytes, trailing bytes are typed errors", () => {
    for (const bad of ["", ".", "..", "a/b", "/etc", "../../etc"]) fails(request(Op.LOOKUP, 1, cstr(bad)), "BAD_NAME");
    fails(request(Op.LOOKUP, 1, new TextEncoder().encode("no-nul")), "BAD_NAME");
    fails(request(Op.LOOKUP, 1, cstr("x".repeat(256))), "NAME_TOO_LONG");
    assert.doesNotThrow(() => dec(request(Op.LOOKUP, 1, cstr("x".repeat(255)))));
    fails(request(Op.LOOKUP, 1, cstr("a"), new Uint8Array([1, 2])), "TRAILING_BYTES");
    fails(
      request(
        Op.RENAME,
        1,
        struct(8, () => {}),
        cstr("a"),
        cstr(".."),
      ),
      "BAD_NAME",
    );
    fails(request(Op.SYMLINK, 1, cstr("l"), cstr("")), "BAD_NAME");
  });

  test("offsets past 2^53, oversized reads and writes, lying write sizes, huge BATCH_FORGET are refused", () => {
    const rw = (op: number, offset: bigint, size: number, data = new Uint8Array(0)) =>
      request(
        op,
        2,
        struct(40, (v) => {
          v.setBigUint64(8, offset, true);
          v.setUint32(16, size, true);
        }),
        data,
      );
    fails(rw(Op.READ, 1n << 63n, 10), "BAD_OFFSET");
    fails(rw(Op.READ, 0n, MAX_READ + 1), "TOO_LARGE");
    fails(rw(Op.WRITE, 0n, 100, new Uint8Array(10)), "LENGTH_MISMATCH");
    fails(rw(Op.WRITE, 2n ** 53n - 5n, 10, new Uint8Array(10)), "BAD_OFFSET");
    fails(request(Op.READ, 2, new Uint8Array(20)), "SHORT_ARGUMENT");
    fails(
      request(
        Op.BATCH_FORGET,
        0,
        struct(8, (v) => v.setUint32(0, 0xffffffff, true)),
      ),
      "TOO_LARGE",
    );
    fails(
      request(
        Op.BATCH_FORGET,
        0,
        struct(8, (v) => v.setUint32(0, 3, true)),
        new Uint8Array(32),
      ),
      "SHORT_ARGUMENT",
    );
    assert.equal(dec(request(999, 1)).request.op, "UNSUPPORTED");
  });
});

describe("FUSE session over a shared directory", () => {
  test("nothing but INIT before INIT (EIO); INIT answers 7.31 with what we support", () => {
    const { c, fs } = setup({ init: false });
    assert.equal(c.lookup(1, "x").error, -EIO);
    const r = c.init();
    assert.equal(r.view.getUint32(0, true), 7);
    assert.equal(r.view.getUint32(4, true), 31);
    assert.equal(r.view.getUint32(20, true), 32 * 4096, "max_write");
    assert.equal(r.payload.length, 64);
    assert.ok(fs.initialized);
    fs.close();
  });

  test("create, write across buffer pieces, read back, stat, readdir, rename, unlink, rmdir", () => {
    const { c, share, fs } = setup();
    const dir = FuseTestClient.entry(c.mkdir(1, "d")).nodeid;
    const cr = c.create(dir, "f.bin");
    assert.equal(cr.error, 0);
    const node = FuseTestClient.entry(cr).nodeid;
    const fh = FuseTestClient.fh(cr, 128);
    const data = randomBytes(200_000);
    const w = c.write(node, fh, 0, data);
    assert.equal(w.view.getUint32(0, true), data.length);
    assert.deepEqual(readFileSync(join(share, "d", "f.bin")), data);
    const chunks: Buffer[] = [];
    for (let off = 0; off < data.length; off += 65536) chunks.push(Buffer.from(c.read(node, fh, off, 65536).payload));
    assert.deepEqual(Buffer.concat(chunks), data);
    assert.equal(c.read(node, fh, data.length, 4096).payload.length, 0, "read at EOF");
    assert.equal(FuseTestClient.entry(c.lookup(dir, "f.bin")).size, BigInt(data.length));
    c.ok(
      Op.RENAME,
      dir,
      struct(8, (v) => v.setBigUint64(0, 1n, true)),
      cstr("f.bin"),
      cstr("moved.bin"),
    );
    assert.ok(existsSync(join(share, "moved.bin")));
    const dh = c.ok(Op.OPENDIR, 1, new Uint8Array(8)).view.getBigUint64(0, true);
    const names = FuseTestClient.dirents(c.readdir(1, dh, 0)).map((e) => e.name);
    assert.deepEqual(names.sort(), [".", "..", "d", "moved.bin"]);
    c.ok(Op.UNLINK, 1, cstr("moved.bin"));
    c.ok(Op.RMDIR, 1, cstr("d"));
    assert.equal(c.lookup(1, "d").error, -ENOENT);
    assert.equal(c.mkdir(1, "e").error, 0);
    assert.equal(c.mkdir(1, "e").error, -EEXIST);
    c.release(node, fh);
    c.release(1, dh, true);
    fs.close();
  });

  test("escapes: '..', '/', absolute and NUL names never reach outside the shared directory", () => {
    const { c, fs, secret } = setup();
    const tries = [
      c.lookup(1, ".."),
      c.lookup(1, "../secret.txt"),
      c.lookup(1, "/etc/passwd"),
      c.lookup(1, new Uint8Array([0x2e, 0x2e, 0x2f])),
      c.create(1, "../evil"),
      c.mkdir(1, ".."),
      c.call(Op.SYMLINK, 1, cstr("a/b"), cstr("x")),
      c.call(
        Op.RENAME,
        1,
        struct(8, (v) => v.setBigUint64(0, 1n, true)),
        cstr("x"),
        cstr("../y"),
      ),
    ];
    for (const r of tries) {
      assert.equal(r.error, -EINVAL);
      assert.ok(!Buffer.from(r.payload).toString().includes(secret));
    }
    // A name with an embedded NUL ends at the NUL, and the rest is trailing garbage.
    assert.equal(c.call(Op.LOOKUP, 1, new Uint8Array([0x61, 0, 0x2f, 0])).error, -EINVAL);
    fs.close();
  });

  test("escapes: symlinks planted towards the outside are never followed", () => {
    const { c, fs, share, base, secret } = setup();
    symlinkSync(join(base, "secret.txt"), join(share, "abs"));
    symlinkSync("../secret.txt", join(share, "rel"));
    symlinkSync(base, join(share, "outdir"));
    // LOOKUP gives the link itself; OPEN of a link is refused; READLINK gives the text only.
    const abs = c.lookup(1, "abs");
    assert.equal(FuseTestClient.entry(abs).mode & 0o170000, 0o120000, "the symlink's own inode");
    const absNode = FuseTestClient.entry(abs).nodeid;
    assert.equal(c.open(absNode, 0).error, -EPERM);
    assert.equal(Buffer.from(c.ok(Op.READLINK, absNode).payload).toString(), join(base, "secret.txt"));
    // A link to a directory is not a directory: nothing can be looked up "through" it.
    const outdir = FuseTestClient.entry(c.lookup(1, "outdir")).nodeid;
    assert.equal(c.lookup(outdir, "secret.txt").error, -ENOTDIR);
    assert.equal(c.create(outdir, "dropped").error, -ENOTDIR);
    assert.equal(c.ok(Op.OPENDIR, 1, new Uint8Array(8)).error, 0);
    assert.notEqual(c.call(Op.OPENDIR, outdir, new Uint8Array(8)).error, 0);
    // CREATE over a link (O_CREAT without O_EXCL would follow it): ELOOP, the target untouched.
    assert.equal(c.create(1, "rel", 0o1102).error, -ELOOP);
    assert.equal(c.create(1, "abs", 0o1102).error, -ELOOP);
    assert.equal(readFileSync(join(base, "secret.txt"), "utf8"), secret);
    assert.ok(!existsSync(join(base, "dropped")));
    // SETATTR size on a link is refused; chmod of a link too.
    const setattr = (node: bigint, valid: number) =>
      c.call(
        Op.SETATTR,
        node,
        struct(88, (v) => {
          v.setUint32(0, valid, true);
          v.setUint32(68, 0o777, true);
        }),
      );
    assert.notEqual(setattr(absNode, 8).error, 0);
    assert.notEqual(setattr(absNode, 1).error, 0);
    assert.equal(readFileSync(join(base, "secret.txt"), "utf8"), secret);
    assert.equal(lstatSync(join(base, "secret.txt")).mode & 0o777, 0o644);
    fs.close();
  });

  test("FIFOs and device nodes: never opened (no blocking, no reaching a host device); mknod only files", () => {
    const { c, fs, share } = setup();
    execFileSync("mkfifo", [join(share, "fifo")]);
    const fifo = FuseTestClient.entry(c.lookup(1, "fifo")).nodeid;
    assert.equal(c.open(fifo, 0).error, -EPERM, "the FIFO is not opened (it would block the queue)");
    assert.equal(c.create(1, "fifo", 0o2).error, -EPERM, "nor by CREATE without O_EXCL (and nothing blocks)");
    const mknod = (mode: number, rdev: number) =>
      c.call(
        Op.MKNOD,
        1,
        struct(16, (v) => {
          v.setUint32(0, mode, true);
          v.setUint32(4, rdev, true);
        }),
        cstr(`n${mode}`),
      );
    assert.equal(mknod(0o20666, 0x0801).error, -EPERM, "char device");
    assert.equal(mknod(0o60666, 0x0801).error, -EPERM, "block device");
    assert.equal(mknod(0o100644, 0).error, 0, "regular file");
    assert.ok(lstatSync(join(share, `n${0o100644}`)).isFile());
    fs.close();
  });

  test("bogus node ids, handles and kinds get ESTALE / EBADF; the session goes on", () => {
    const { c, fs } = setup();
    assert.equal(c.lookup(12345, "x").error, -ESTALE);
    assert.equal(c.lookup(2n ** 64n - 1n, "x").error, -ESTALE);
    assert.equal(c.read(1, 77n, 0, 10).error, -EBADF);
    assert.equal(c.write(1, 2n ** 63n, 0, new Uint8Array(4)).error, -EBADF);
    const cr = c.create(1, "ro", 0o100); // O_CREAT | O_RDONLY
    const node = FuseTestClient.entry(cr).nodeid;
    const fh = FuseTestClient.fh(cr, 128);
    assert.equal(c.write(node, fh, 0, new Uint8Array(4)).error, -EBADF, "read-only handle");
    assert.equal(c.release(1, fh, true).error, -EBADF, "a file handle is not a directory handle");
    assert.equal(c.call(22 /* GETXATTR */, 1, new Uint8Array(8), cstr("user.x")).error, -ENOSYS);
    assert.equal(c.lookup(1, "ro").error, 0, "still serving");
    fs.close();
  });

  test("replies never overrun the writable part: too small for the reply gets the error alone", () => {
    const { c, fs } = setup();
    const r = c.send(request(Op.LOOKUP, 1, cstr("nothing")), 8);
    assert.equal(r.used, 0, "no room even for the out header: nothing written");
    c.create(1, "x");
    const small = c.send(request(Op.LOOKUP, 1, cstr("x")), 40);
    assert.equal(small.error, -EINVAL);
    assert.equal(small.used, 16);
    fs.close();
  });

  test("lifetimes: lookups counted, FORGET/BATCH_FORGET drop inodes, RELEASE/DESTROY close fds", () => {
    const base = countFds();
    const { c, fs, share } = setup();
    writeFileSync(join(share, "a"), "a");
    writeFileSync(join(share, "b"), "b");
    const a = FuseTestClient.entry(c.lookup(1, "a")).nodeid;
    c.lookup(1, "a");
    c.lookup(1, "a");
    assert.equal(fs.lookupCount(Number(a)), 3);
    const b = FuseTestClient.entry(c.lookup(1, "b")).nodeid;
    assert.equal(c.forget(a, 2).used, 0, "FORGET has no reply");
    assert.equal(fs.lookupCount(Number(a)), 1);
    const fh = FuseTestClient.fh(c.open(a, 0));
    c.forget(a, 1);
    assert.equal(fs.lookupCount(Number(a)), undefined, "inode gone at 0");
    assert.equal(Buffer.from(c.read(a, fh, 0, 10).payload).toString(), "a", "the handle outlives its inode");
    const batch = struct(8 + 32, (v) => {
      v.setUint32(0, 2, true);
      v.setBigUint64(8, b, true);
      v.setBigUint64(16, 1n, true);
      v.setBigUint64(24, 1n, true); // the root: never forgotten
      v.setBigUint64(32, 99n, true);
    });
    assert.equal(c.call(Op.BATCH_FORGET, 0, batch).used, 0);
    assert.equal(fs.lookupCount(Number(b)), undefined);
    assert.equal(fs.lookupCount(1), 1, "root stays");
    c.release(a, fh);
    assert.equal(fs.inodeCount, 1);
    assert.equal(fs.handleCount, 0);
    // DESTROY drops whatever the guest left.
    c.lookup(1, "a");
    c.open(FuseTestClient.entry(c.lookup(1, "b")).nodeid, 0);
    c.ok(Op.DESTROY, 0);
    assert.equal(fs.inodeCount, 1);
    assert.equal(fs.handleCount, 0);
    fs.close();
    assert.equal(countFds(), base, "every fd closed");
  });

  test("READDIR continues from its offset; READDIRPLUS looks up only the entries that fit", () => {
    const { c, fs, share } = setup();
    for (let i = 0; i < 40; i++) writeFileSync(join(share, `file-${String(i).padStart(2, "0")}`), "");
    const dh = c.ok(Op.OPENDIR, 1, new Uint8Array(8)).view.getBigUint64(0, true);
    const seen: string[] = [];
    let off = 0;
    for (let k = 0; k < 100; k++) {
      const ents = FuseTestClient.dirents(c.readdir(1, dh, off, 200));
      if (ents.length === 0) break;
      assert.ok(ents.length <= 200 / 32);
      seen.push(...ents.map((e) => e.name));
      off = Number(ents.at(-1)?.off);
    }
    assert.equal(seen.length, 42);
    assert.equal(new Set(seen).size, 42, "no entry twice");
    const plus = FuseTestClient.dirents(c.readdir(1, dh, 0, 1000, true), true);
    assert.equal(plus.length, 6, "1000 bytes hold 6 entries of 160 bytes");
    const looked = plus.filter((e) => e.nodeid !== 0n);
    assert.equal(looked.length, 4, '"." and ".." carry no node id');
    for (const e of looked) assert.equal(fs.lookupCount(Number(e.nodeid)), 1);
    assert.equal(fs.inodeCount, 5, "root + the 4 entries returned, not one more");
    fs.close();
  });

  test("new files, directories and links belong to the guest's caller (uid/gid); an existing file keeps its owner", {
    skip: process.geteuid?.() !== 0 ? "needs root (chown)" : false,
  }, () => {
    const { c, fs, share } = setup();
    const as = (b: Uint8Array, uid: number, gid: number) => {
      const v = new DataView(b.buffer);
      v.setUint32(24, uid, true);
      v.setUint32(28, gid, true);
      return b;
    };
    writeFileSync(join(share, "old"), "");
    const create = (name: string) =>
      as(
        request(
          Op.CREATE,
          1,
          struct(16, (v) => {
            v.setUint32(0, 0o102, true);
            v.setUint32(4, 0o644, true);
          }),
          cstr(name),
        ),
        1234,
        5678,
      );
    assert.equal(c.send(create("new")).error, 0);
    assert.equal(c.send(create("old")).error, 0);
    assert.equal(
      c.send(
        as(
          request(
            Op.MKDIR,
            1,
            struct(8, (v) => v.setUint32(0, 0o755, true)),
            cstr("d"),
          ),
          42,
          43,
        ),
      ).error,
      0,
    );
    assert.equal(c.send(as(request(Op.SYMLINK, 1, cstr("l"), cstr("new")), 7, 8)).error, 0);
    const owner = (n: string) => {
      const st = lstatSync(join(share, n));
      return [st.uid, st.gid];
    };
    assert.deepEqual(owner("new"), [1234, 5678]);
    assert.deepEqual(owner("old"), [0, 0], "opening an existing file does not change its owner");
    assert.deepEqual(owner("d"), [42, 43]);
    assert.deepEqual(owner("l"), [7, 8], "the link itself, not its target");
    assert.deepEqual(owner("new"), [1234, 5678]);
    fs.close();
  });

  test("read-only export: every change is EROFS, reads work", () => {
    const { c, fs, share } = setup({ readonly: true });
    writeFileSync(join(share, "r"), "data");
    assert.equal(c.create(1, "new").error, -30);
    assert.equal(c.mkdir(1, "d").error, -30);
    const r = FuseTestClient.entry(c.lookup(1, "r")).nodeid;
    assert.equal(c.open(r, 2).error, -30);
    assert.equal(Buffer.from(c.read(r, FuseTestClient.fh(c.open(r, 0)), 0, 10).payload).toString(), "data");
    fs.close();
  });
});

describe("migration state", () => {
  test("inodes and open handles saved on one session are usable on another over the same directory", () => {
    const { c, fs, share } = setup();
    const dir = FuseTestClient.entry(c.mkdir(1, "sub")).nodeid;
    const cr = c.create(dir, "held.txt");
    const node = FuseTestClient.entry(cr).nodeid;
    const fh = FuseTestClient.fh(cr, 128);
    c.write(node, fh, 0, new TextEncoder().encode("before\n"));
    const dh = c.ok(Op.OPENDIR, dir, new Uint8Array(8)).view.getBigUint64(0, true);
    const bytes = encodeState(fs.saveState());
    assert.ok(new TextDecoder().decode(bytes).startsWith(STATE_MAGIC));

    // The destination: a fresh session over the same directory, no INIT.
    const fs2 = new PassthroughFs(share);
    const stale = fs2.loadState(decodeState(bytes));
    assert.deepEqual(stale, { staleInodes: 0, staleHandles: 0 });
    const c2 = new FuseTestClient(new FuseServer(fs2));
    assert.equal(c2.write(node, fh, 7, new TextEncoder().encode("after\n")).error, 0, "the write handle works");
    assert.equal(Buffer.from(c2.read(node, fh, 0, 100).payload).toString(), "before\nafter\n");
    assert.deepEqual(
      FuseTestClient.dirents(c2.readdir(dir, dh, 0))
        .map((e) => e.name)
        .sort(),
      [".", "..", "held.txt"],
    );
    assert.equal(FuseTestClient.entry(c2.lookup(dir, "held.txt")).nodeid, node, "same node id for the same file");
    assert.equal(c2.create(1, "new").error, 0, "new node ids do not collide");
    assert.ok(FuseTestClient.entry(c2.lookup(1, "new")).nodeid > node);
    fs.close();
    fs2.close();
  });

  test("what is gone on the destination becomes stale (ESTALE / EBADF), the rest goes on", () => {
    const { c, fs, share } = setup();
    const a = c.create(1, "a");
    const b = c.create(1, "b");
    const state = encodeState(fs.saveState());
    renameSync(join(share, "a"), join(share, "a-renamed"));
    const fs2 = new PassthroughFs(share);
    assert.deepEqual(fs2.loadState(decodeState(state)), { staleInodes: 1, staleHandles: 1 });
    const c2 = new FuseTestClient(new FuseServer(fs2));
    assert.equal(c2.read(FuseTestClient.entry(a).nodeid, FuseTestClient.fh(a, 128), 0, 1).error, -EBADF);
    assert.equal(c2.call(Op.GETATTR, FuseTestClient.entry(a).nodeid, new Uint8Array(16)).error, -ESTALE);
    assert.equal(c2.write(FuseTestClient.entry(b).nodeid, FuseTestClient.fh(b, 128), 0, new Uint8Array([1])).error, 0);
    fs.close();
    fs2.close();
  });

  test("malformed states are refused before anything is opened", () => {
    const { fs } = setup();
    const good = JSON.parse(new TextDecoder().decode(encodeState(fs.saveState())).slice(STATE_MAGIC.length));
    fs.close();
    const enc = (o: unknown) => new TextEncoder().encode(STATE_MAGIC + JSON.stringify(o));
    const bad = [
      new TextEncoder().encode("not a state"),
      new TextEncoder().encode(`${STATE_MAGIC}{`),
      enc({ ...good, version: 2 }),
      enc({ ...good, nextNodeid: 10, inodes: [{ nodeid: 5, nlookup: 1, type: 0o100000, path: ["Li4="] }] }), // ".."
      enc({ ...good, nextNodeid: 10, inodes: [{ nodeid: 5, nlookup: 1, type: 0o100000, path: ["YS9i"] }] }), // "a/b"
      enc({ ...good, nextNodeid: 10, inodes: [{ nodeid: 1, nlookup: 1, type: 0o100000, path: [] }] }), // the root
      enc({ ...good, nextNodeid: 10, inodes: [{ nodeid: 5, nlookup: 0, type: 0o100000, path: null }] }),
      enc({ ...good, nextFh: 3, handles: [{ fh: 9, nodeid: 2, kind: "file", flags: 0, path: null }] }),
      enc({ ...good, nextFh: 3, handles: [{ fh: 1, nodeid: 2, kind: "pipe", flags: 0, path: null }] }),
    ];
    for (const b of bad) assert.throws(() => decodeState(b), FsStateError);
  });
});
