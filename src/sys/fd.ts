import { readlinkSync } from "node:fs";
import { check, SysError, sys } from "./errors.js";
import { native } from "./native.js";

const F_GETFD = 1;

/**
 * An owned file descriptor. Closes exactly once; after close() the number is never used
 * again by this object (a stale use throws instead of hitting whatever fd reuses the number).
 */
export class Fd implements Disposable {
  #fd: number;

  constructor(fd: number) {
    if (!Number.isInteger(fd) || fd < 0) throw new TypeError(`invalid fd ${fd}`);
    this.#fd = fd;
  }

  get closed(): boolean {
    return this.#fd < 0;
  }

  /** The raw number, for a syscall. Throws once closed. */
  get fd(): number {
    if (this.#fd < 0) throw new Error("fd used after close");
    return this.#fd;
  }

  /** Gives the number away: this owner no longer closes it. */
  release(): number {
    const n = this.fd;
    this.#fd = -1;
    return n;
  }

  dup(): Fd {
    return new Fd(sys(() => native.dup(this.fd)));
  }

  close(): void {
    if (this.#fd < 0) return;
    const n = this.#fd;
    this.#fd = -1;
    native.close(n);
  }

  [Symbol.dispose](): void {
    this.close();
  }

  toString(): string {
    return this.#fd < 0 ? "Fd(closed)" : `Fd(${this.#fd})`;
  }
}

/** True when `fd` is an open descriptor of this process (for leak checks in tests). */
export function isOpenFd(fd: number): boolean {
  try {
    native.fcntl(fd, F_GETFD, 0);
    return true;
  } catch {
    return false;
  }
}

/**
 * What an fd is, as the kernel names it in /proc/self/fd: a path, `pipe:[ino]`,
 * `socket:[ino]`, `anon_inode:[userfaultfd]`, `/memfd:name (deleted)`...
 */
export function fdKind(fd: Fd): string {
  try {
    return readlinkSync(`/proc/self/fd/${fd.fd}`);
  } catch (e) {
    const err = e as NodeJS.ErrnoException;
    throw new SysError("readlink", err.errno !== undefined ? Math.abs(err.errno) : 9, `/proc/self/fd/${fd.fd}`);
  }
}

export function readFd(fd: Fd, view: ArrayBufferView): number {
  return check(native.read(fd.fd, view), "read");
}

export function writeFd(fd: Fd, view: ArrayBufferView): number {
  return check(native.write(fd.fd, view), "write");
}

export function pread(fd: Fd, view: ArrayBufferView, position: number | bigint): number {
  return check(native.pread(fd.fd, view, position), "pread");
}

export function pwrite(fd: Fd, view: ArrayBufferView, position: number | bigint): number {
  return check(native.pwrite(fd.fd, view, position), "pwrite");
}

/**
 * shutdown(2) of a socket: 0 reads, 1 writes, 2 both. It acts on the connection, so it reaches
 * every duplicate of the fd (another thread's too), unlike close.
 */
export function shutdownSocket(fd: Fd, how: 0 | 1 | 2 = 2): void {
  sys(() => native.shutdown(fd.fd, how));
}
