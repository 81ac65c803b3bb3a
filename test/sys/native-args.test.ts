/**
 * The addon's argument checks, each attack performed for real: JS arrays that grow while the addon
 * walks them (the old V8 addon re-read their length and wrote past iov[1024] / fds[8]), ioctl
 * views shorter than the struct the request encodes, fcntl commands outside the allow-list, and
 * malformed strings and integers. Each must end in a TypeError (or the bounded result), with the
 * process still serving. Tests of src/sys may reach the addon directly (see biome.json).
 */
import assert from "node:assert/strict";
import { test } from "node:test";
import { ZERO_PAGE_HASH } from "../../src/migration/digest.js";
import { IOWR } from "../../src/sys/ioctl.js";
import { createMemfd, F_ADD_SEALS, F_GET_SEALS, F_SEAL_GROW } from "../../src/sys/memfd.js";
import { addonCandidates, native, nativeAddonPath } from "../../src/sys/native.js";
import { UnixSocket } from "../../src/sys/unix-socket.js";

const F_DUPFD = 0;
const F_GETFD = 1;
const F_SETFD = 2;
const F_GETFL = 3;
const F_SETFL = 4;
const F_SETLK = 6;
const O_NONBLOCK = 0o4000;
const FD_CLOEXEC = 1;

test("preadv: an array whose element getter grows it past 1024 is walked only to its length at entry", () => {
  const fd = createMemfd("vmshift-preadv-grow", 4096);
  try {
    const views: Uint8Array[] = [new Uint8Array(16), new Uint8Array(16)];
    let grown = false;
    Object.defineProperty(views, 1, {
      get() {
        if (!grown) {
          grown = true;
          for (let i = 2; i < 5000; i++) views[i] = new Uint8Array(16);
        }
        return new Uint8Array(16);
      },
    });
    const n = native.preadv(fd.fd, views, 0);
    assert.equal(grown, true, "the getter ran");
    assert.equal(views.length, 5000);
    assert.equal(n, 32, "two views of 16 bytes: the length read at entry");
  } finally {
    fd.close();
  }
});

test("preadv: a getter that shrinks an earlier view's buffer is seen before any pointer is taken", () => {
  const fd = createMemfd("vmshift-preadv-shrink", 4096);
  try {
    const ab = Reflect.construct(ArrayBuffer, [64, { maxByteLength: 4096 }]) as ArrayBuffer & {
      resize(n: number): void;
    };
    const views: Uint8Array[] = [new Uint8Array(ab), new Uint8Array(16)];
    Object.defineProperty(views, 1, {
      get() {
        ab.resize(0); // the first view (length-tracking) is now empty
        return new Uint8Array(16);
      },
    });
    assert.equal(native.preadv(fd.fd, views, 0), 16, "the shrunk view counts as 0 bytes, not 64");
  } finally {
    fd.close();
  }
});

test("preadv / pwritev: more than 1024 views is a TypeError; non-views are a TypeError", () => {
  const fd = createMemfd("vmshift-preadv-many", 4096);
  try {
    const many = Array.from({ length: 1025 }, () => new Uint8Array(1));
    assert.throws(() => native.preadv(fd.fd, many, 0), TypeError);
    assert.throws(() => native.pwritev(fd.fd, many, 0), TypeError);
    assert.throws(() => native.preadv(fd.fd, [new Uint8Array(1), 5 as never], 0), TypeError);
    assert.throws(() => native.preadv(fd.fd, "x" as never, 0), TypeError);
    // A getter that throws: its own exception comes through, nothing is read.
    const throwing = [new Uint8Array(1)];
    Object.defineProperty(throwing, 0, {
      get() {
        throw new RangeError("getter says no");
      },
    });
    assert.throws(() => native.preadv(fd.fd, throwing, 0), /getter says no/);
    assert.equal(native.pwritev(fd.fd, [new Uint8Array([1, 2]), new Uint8Array([3])], 0), 3, "still serving");
  } finally {
    fd.close();
  }
});

test("sendmsg: an fd list whose getter grows it past 8 sends only the fds it had at entry", () => {
  const [a, b] = UnixSocket.pair();
  const memfd = createMemfd("vmshift-sendmsg-grow", 4096);
  const received: number[] = [];
  try {
    const fds: number[] = [memfd.fd, memfd.fd];
    Object.defineProperty(fds, 1, {
      get() {
        for (let i = 2; i < 100; i++) fds[i] = memfd.fd;
        return memfd.fd;
      },
    });
    assert.equal(native.sendmsg(a.fd.fd, new Uint8Array([42]), fds), 1);
    assert.equal(fds.length, 100);
    const r = native.recvmsg(b.fd.fd, new Uint8Array(8));
    assert.ok(Array.isArray(r));
    const [bytes, truncated, ...got] = r as number[];
    received.push(...got);
    assert.equal(bytes, 1);
    assert.equal(truncated, 0);
    assert.equal(got.length, 2, "exactly the two fds the list held at entry");
    assert.throws(() => native.sendmsg(a.fd.fd, new Uint8Array(1), Array(9).fill(memfd.fd)), TypeError);
    assert.throws(() => native.sendmsg(a.fd.fd, new Uint8Array(1), [-1]), TypeError);
    assert.throws(() => native.sendmsg(a.fd.fd, new Uint8Array(1), [1.5]), TypeError);
    assert.throws(() => native.sendmsg(a.fd.fd, new Uint8Array(1), ["3" as never]), TypeError);
  } finally {
    for (const fd of received) native.close(fd);
    memfd.close();
    a.close();
    b.close();
  }
});

test("ioctl: a view shorter than the request's _IOC_SIZE is refused before the kernel sees it", () => {
  const fd = createMemfd("vmshift-ioctl-size", 4096);
  try {
    const req = IOWR(0xaa, 0x3f, 64); // no such ioctl on a memfd; the size is what matters
    assert.throws(() => native.ioctl(fd.fd, req, new Uint8Array(63)), /shorter than the request's struct size/);
    assert.throws(() => native.ioctl(fd.fd, req, new DataView(new ArrayBuffer(8))), TypeError);
    // Long enough: the kernel answers (not a tty, not ours: ENOTTY), as -errno.
    assert.ok(native.ioctl(fd.fd, req, new Uint8Array(64)) < 0);
    assert.ok(native.ioctl(fd.fd, req, new BigUint64Array(8)) < 0);
    assert.throws(() => native.ioctl(fd.fd, 2 ** 32, 0), TypeError);
  } finally {
    fd.close();
  }
});

test("fcntl: only the allow-listed commands reach the kernel", () => {
  const fd = createMemfd("vmshift-fcntl", 4096, { sealable: true });
  try {
    assert.throws(() => native.fcntl(fd.fd, F_DUPFD, 0), /not allowed/, "F_DUPFD would make a non-CLOEXEC fd");
    assert.throws(() => native.fcntl(fd.fd, F_SETLK, 0), /not allowed/, "F_SETLK takes a struct pointer");
    assert.throws(() => native.fcntl(fd.fd, 1030 /* F_DUPFD_CLOEXEC */, 0), /not allowed/);
    assert.equal(native.fcntl(fd.fd, F_GETFD, 0) & FD_CLOEXEC, FD_CLOEXEC);
    native.fcntl(fd.fd, F_SETFD, FD_CLOEXEC);
    const fl = native.fcntl(fd.fd, F_GETFL, 0);
    native.fcntl(fd.fd, F_SETFL, fl | O_NONBLOCK);
    assert.equal(native.fcntl(fd.fd, F_GETFL, 0) & O_NONBLOCK, O_NONBLOCK);
    native.fcntl(fd.fd, F_ADD_SEALS, F_SEAL_GROW);
    assert.equal(native.fcntl(fd.fd, F_GET_SEALS, 0) & F_SEAL_GROW, F_SEAL_GROW);
    assert.throws(() => native.fcntl(fd.fd, F_SETFL, 2 ** 40), TypeError);
  } finally {
    fd.close();
  }
});

test("strings and integers: NUL bytes, over-long names and unsafe numbers are TypeErrors", () => {
  assert.throws(() => native.open("/tmp/a\0b", 0, 0), /NUL/);
  assert.throws(() => native.memfdCreate("x".repeat(300), 0), /too long/);
  assert.throws(() => native.memfdCreate(42 as never, 0), TypeError);
  assert.throws(() => native.unixConnect("/tmp/".padEnd(200, "x")), /longer than 107/);
  assert.throws(() => native.close(-1), TypeError);
  assert.throws(() => native.close(1.5), TypeError);
  assert.throws(() => native.ftruncate(0, -1), TypeError);
  assert.throws(() => native.ftruncate(0, (2 ** 64) as never), TypeError);
  assert.throws(() => native.pread(0, new Uint8Array(1), -1n), TypeError);
  assert.throws(() => native.pread(0, new Uint8Array(1), 2n ** 64n), /u64 range/);
  assert.throws(() => native.read(0, {} as never), TypeError);
});

test("bulk: index lists are checked, the zero-page hash constant is hashPages' own", () => {
  const out = new Uint32Array(2);
  native.hashPages(new Uint8Array(4096), null, 1, 4096, out);
  assert.deepEqual([out[0], out[1]], [...ZERO_PAGE_HASH]);
  const src = new Uint8Array(8192);
  assert.throws(() => native.copyPages(src, new Uint32Array([2]), src, null, 1, 4096), /out of range/);
  assert.throws(() => native.copyPages(src, new Uint16Array([0]) as never, src, null, 1, 4096), TypeError);
  assert.throws(() => native.hashPages(src, null, 3, 4096, new Uint32Array(6)), /out of range/);
  assert.throws(() => native.hashPages(src, null, 2, 4096, new Uint32Array(3)), TypeError);
});

test("the addon loaded is a Node-API binary from this package", () => {
  native.liveMappings();
  const path = nativeAddonPath();
  assert.ok(path !== null && addonCandidates().includes(path), `${path}`);
});
