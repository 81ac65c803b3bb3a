/**
 * userfaultfd(2): structs packed here, the addon only makes the syscall and the ioctls.
 * Layouts follow include/uapi/linux/userfaultfd.h (kernel 6.18; Debian's headers predate
 * WP_ASYNC and MOVE, so those bits are written out here).
 */
import { check, EAGAIN, SysError, sys } from "./errors.js";
import { Fd, fdKind } from "./fd.js";
import { IOR, IOWR } from "./ioctl.js";
import { native } from "./native.js";
import { READABLE, Watch } from "./poller.js";

const UFFDIO = 0xaa;
export const UFFD_API = 0xaan;
export const UFFD_USER_MODE_ONLY = 1;
const O_NONBLOCK = 0o4000;

export const UFFDIO_API = IOWR(UFFDIO, 0x3f, 24);
export const UFFDIO_REGISTER = IOWR(UFFDIO, 0x00, 32);
export const UFFDIO_UNREGISTER = IOR(UFFDIO, 0x01, 16);
export const UFFDIO_WAKE = IOR(UFFDIO, 0x02, 16);
export const UFFDIO_COPY = IOWR(UFFDIO, 0x03, 40);
export const UFFDIO_ZEROPAGE = IOWR(UFFDIO, 0x04, 32);
export const UFFDIO_WRITEPROTECT = IOWR(UFFDIO, 0x06, 24);
export const UFFDIO_CONTINUE = IOWR(UFFDIO, 0x07, 32);

export const UffdFeature = {
  PAGEFAULT_FLAG_WP: 1n << 0n,
  EVENT_FORK: 1n << 1n,
  EVENT_REMAP: 1n << 2n,
  EVENT_REMOVE: 1n << 3n,
  MISSING_HUGETLBFS: 1n << 4n,
  MISSING_SHMEM: 1n << 5n,
  EVENT_UNMAP: 1n << 6n,
  SIGBUS: 1n << 7n,
  THREAD_ID: 1n << 8n,
  MINOR_HUGETLBFS: 1n << 9n,
  MINOR_SHMEM: 1n << 10n,
  EXACT_ADDRESS: 1n << 11n,
  WP_HUGETLBFS_SHMEM: 1n << 12n,
  WP_UNPOPULATED: 1n << 13n,
  POISON: 1n << 14n,
  WP_ASYNC: 1n << 15n,
  MOVE: 1n << 16n,
} as const;

export const UFFDIO_REGISTER_MODE_MISSING = 1n;
export const UFFDIO_REGISTER_MODE_WP = 2n;
export const UFFDIO_REGISTER_MODE_MINOR = 4n;
export const UFFDIO_COPY_MODE_DONTWAKE = 1n;
export const UFFDIO_COPY_MODE_WP = 2n;
export const UFFDIO_ZEROPAGE_MODE_DONTWAKE = 1n;
export const UFFDIO_WRITEPROTECT_MODE_WP = 1n;
export const UFFDIO_WRITEPROTECT_MODE_DONTWAKE = 2n;

export const UFFD_EVENT_PAGEFAULT = 0x12;
export const UFFD_EVENT_FORK = 0x13;
export const UFFD_EVENT_REMAP = 0x14;
export const UFFD_EVENT_REMOVE = 0x15;
export const UFFD_EVENT_UNMAP = 0x16;
export const UFFD_PAGEFAULT_FLAG_WRITE = 1n;
export const UFFD_PAGEFAULT_FLAG_WP = 2n;
export const UFFD_PAGEFAULT_FLAG_MINOR = 4n;

const UFFD_MSG_SIZE = 32;
const EINVAL = 22;
/** What /proc/self/fd/N links to for a userfaultfd (fs/userfaultfd.c: anon_inode_getfd). */
export const USERFAULTFD_LINK = "anon_inode:[userfaultfd]";
const EEXIST = 17;

export interface UffdMessage {
  event: number;
  /** PAGEFAULT: flags and faulting address; REMOVE/UNMAP: start/end in a/b; REMAP: from/to/len. */
  flags: bigint;
  address: bigint;
  a: bigint;
  b: bigint;
  c: bigint;
}

export interface UffdOptions {
  /** Features to ask for in UFFDIO_API; creation fails if the kernel lacks any. */
  features?: bigint;
  /** Only user-mode faults (works without privilege; kernel-mode accesses get EFAULT). Default true. */
  userModeOnly?: boolean;
}

/** An owned userfaultfd after the UFFDIO_API handshake. */
export class Userfaultfd implements Disposable {
  readonly fd: Fd;
  /** Features the kernel granted (all it supports when none were asked for). */
  readonly features: bigint;
  readonly ioctls: bigint;
  readonly #msgBuf = new BigUint64Array((UFFD_MSG_SIZE / 8) * 16);
  readonly #msgBytes = new Uint8Array(this.#msgBuf.buffer);
  readonly #args = new BigUint64Array(5);

  private constructor(fd: Fd, features: bigint, ioctls: bigint) {
    this.fd = fd;
    this.features = features;
    this.ioctls = ioctls;
  }

  static create(options: UffdOptions = {}): Userfaultfd {
    const flags = O_NONBLOCK | (options.userModeOnly === false ? 0 : UFFD_USER_MODE_ONLY);
    const fd = new Fd(sys(() => native.userfaultfd(flags)));
    try {
      const api = new BigUint64Array([UFFD_API, options.features ?? 0n, 0n]);
      check(native.ioctl(fd.fd, UFFDIO_API, api), "ioctl", "UFFDIO_API");
      // The kernel reports every feature it supports in api.features but enables only the
      // requested ones (UFFDIO_API fails if one is missing), so what was asked for is what we have.
      return new Userfaultfd(fd, options.features ? options.features : (api[1] as bigint), api[2] as bigint);
    } catch (e) {
      fd.close();
      throw e;
    }
  }

  /** Every feature this kernel offers (a throwaway fd: UFFDIO_API can be called once per fd). */
  static supportedFeatures(): bigint {
    const u = Userfaultfd.create();
    const f = u.features;
    u.close();
    return f;
  }

  /**
   * Wraps a userfaultfd another party created (e.g. received over vhost-user); no handshake.
   * Takes ownership of `fd`, also on error. Anything but a userfaultfd (its /proc/self/fd link
   * reads `anon_inode:[userfaultfd]`) is refused with EINVAL: a pipe with made-up fault records
   * would otherwise pass for one until a postcopy depends on it.
   */
  static adopt(fd: Fd): Userfaultfd {
    let kind: string;
    try {
      kind = fdKind(fd);
    } catch (e) {
      fd.close();
      throw e;
    }
    if (kind !== USERFAULTFD_LINK) {
      const n = fd.fd;
      fd.close();
      throw new SysError("userfaultfd", EINVAL, `fd ${n} is ${kind}, not ${USERFAULTFD_LINK}`);
    }
    return new Userfaultfd(fd, 0n, 0n);
  }

  /** Registers [start, start+len); returns the ioctls allowed on the range. */
  register(start: bigint, len: number, mode: bigint): bigint {
    const r = new BigUint64Array([start, BigInt(len), mode, 0n]);
    check(native.ioctl(this.fd.fd, UFFDIO_REGISTER, r), "ioctl", "UFFDIO_REGISTER");
    return r[3] as bigint;
  }

  unregister(start: bigint, len: number): void {
    check(
      native.ioctl(this.fd.fd, UFFDIO_UNREGISTER, new BigUint64Array([start, BigInt(len)])),
      "ioctl",
      "UFFDIO_UNREGISTER",
    );
  }

  /**
   * Places `src` at `dst` atomically and wakes the faulting threads. Returns false when a
   * page is already there (EEXIST): pages already placed are never overwritten.
   */
  copy(dst: bigint, src: ArrayBufferView, mode = 0n): boolean {
    const a = this.#args;
    a[0] = dst;
    a[1] = native.addressOf(src);
    a[2] = BigInt(src.byteLength);
    a[3] = mode;
    a[4] = 0n;
    const r = native.ioctl(this.fd.fd, UFFDIO_COPY, a);
    if (r === -EEXIST) return false;
    check(r, "ioctl", "UFFDIO_COPY");
    return true;
  }

  /**
   * UFFDIO_COPY of a run of pages: returns the bytes placed from the start of the run. Less than
   * the whole run when a page of it is already there: the kernel stops before it (0 when it is
   * the first page; the caller wakes that one and goes on after it). Placed pages are woken.
   */
  copyRun(dst: bigint, src: ArrayBufferView): number {
    const a = this.#args;
    a[0] = dst;
    a[1] = native.addressOf(src);
    a[2] = BigInt(src.byteLength);
    a[3] = 0n;
    a[4] = 0n;
    const r = native.ioctl(this.fd.fd, UFFDIO_COPY, a);
    if (r === 0) return src.byteLength;
    if (r === -EEXIST) return 0;
    // A partial copy: EAGAIN, with the bytes placed in `copy`.
    if (r === -EAGAIN && (a[4] as bigint) > 0n) return Number(a[4] as bigint);
    check(r, "ioctl", "UFFDIO_COPY");
    return 0;
  }

  /** UFFDIO_ZEROPAGE of a run: the bytes mapped from its start, as copyRun. */
  zeropageRun(start: bigint, len: number): number {
    const a = this.#args;
    a[0] = start;
    a[1] = BigInt(len);
    a[2] = 0n;
    a[3] = 0n;
    const r = native.ioctl(this.fd.fd, UFFDIO_ZEROPAGE, a.subarray(0, 4));
    if (r === 0) return len;
    if (r === -EEXIST) return 0;
    if (r === -EAGAIN && (a[3] as bigint) > 0n) return Number(a[3] as bigint);
    check(r, "ioctl", "UFFDIO_ZEROPAGE");
    return 0;
  }

  /** Maps zero pages at [start, start+len); false when already populated. */
  zeropage(start: bigint, len: number, mode = 0n): boolean {
    const a = this.#args;
    a[0] = start;
    a[1] = BigInt(len);
    a[2] = mode;
    a[3] = 0n;
    const r = native.ioctl(this.fd.fd, UFFDIO_ZEROPAGE, a.subarray(0, 4));
    if (r === -EEXIST) return false;
    check(r, "ioctl", "UFFDIO_ZEROPAGE");
    return true;
  }

  /** Sets or clears write protection on [start, start+len) (clearing also wakes, unless dontWake). */
  writeProtect(start: bigint, len: number, protect: boolean, dontWake = false): void {
    const a = this.#args;
    a[0] = start;
    a[1] = BigInt(len);
    a[2] = (protect ? UFFDIO_WRITEPROTECT_MODE_WP : 0n) | (dontWake ? UFFDIO_WRITEPROTECT_MODE_DONTWAKE : 0n);
    check(native.ioctl(this.fd.fd, UFFDIO_WRITEPROTECT, a.subarray(0, 3)), "ioctl", "UFFDIO_WRITEPROTECT");
  }

  wake(start: bigint, len: number): void {
    check(native.ioctl(this.fd.fd, UFFDIO_WAKE, new BigUint64Array([start, BigInt(len)])), "ioctl", "UFFDIO_WAKE");
  }

  /** Reads the pending messages (empty when none). */
  readMessages(): UffdMessage[] {
    const n = native.read(this.fd.fd, this.#msgBytes);
    if (n === -EAGAIN) return [];
    check(n, "read", "userfaultfd");
    const out: UffdMessage[] = [];
    const b = this.#msgBuf;
    for (let i = 0; i < n / UFFD_MSG_SIZE; i++) {
      const base = i * 4;
      const event = Number((b[base] as bigint) & 0xffn);
      const a = b[base + 1] as bigint;
      const bb = b[base + 2] as bigint;
      const c = b[base + 3] as bigint;
      out.push({ event, flags: a, address: bb, a, b: bb, c });
    }
    return out;
  }

  /** Calls `cb` with the messages each time the fd becomes readable, from the event loop. */
  onMessages(cb: (messages: UffdMessage[]) => void): Watch {
    return new Watch(this.fd.fd, READABLE, () => {
      for (;;) {
        const m = this.readMessages();
        if (m.length === 0) return;
        cb(m);
      }
    });
  }

  close(): void {
    this.fd.close();
  }

  [Symbol.dispose](): void {
    this.close();
  }
}
