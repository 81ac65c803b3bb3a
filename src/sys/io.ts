/**
 * File and socket calls that need no owner object: thin typed wrappers over the addon, so no
 * module outside src/sys calls it directly. Two kinds, as in ioctl.ts:
 *  - `name(...)` throws a SysError on failure (setup and cold paths);
 *  - `nameRaw(...)` returns bytes or -errno (hot paths, where EAGAIN/EINTR are expected and
 *    must cost no exception).
 */
import { check, EINTR, sys } from "./errors.js";
import { Fd } from "./fd.js";
import { native } from "./native.js";

type FdLike = Fd | number;
const num = (fd: FdLike) => (typeof fd === "number" ? fd : fd.fd);

/** open(2), always O_CLOEXEC; the path goes into the error's detail. */
export function openFd(path: string, flags: number, mode = 0): Fd {
  return new Fd(sys(() => native.open(path, flags, mode), path));
}

/** fstat(2): [size, mode, blksize]. */
export function fstat(fd: FdLike): [size: number, mode: number, blksize: number] {
  return sys(() => native.fstat(num(fd)));
}

export function fallocate(fd: FdLike, mode: number, offset: number | bigint, length: number | bigint): void {
  sys(() => native.fallocate(num(fd), mode, offset, length));
}

/** fdatasync(2), retried on EINTR; any other failure (EIO, ENOSPC...) throws: data may be lost. */
export function fdatasync(fd: FdLike, detail?: string): void {
  for (;;) {
    const r = native.fdatasync(num(fd));
    if (r === -EINTR) continue;
    check(r, "fdatasync", detail);
    return;
  }
}

/** setsockopt(2) for an integer option (SO_SNDBUF, TCP_NODELAY...). */
export function setsockopt(fd: FdLike, level: number, name: number, value: number): void {
  sys(() => native.setsockopt(num(fd), level, name, value));
}

/** accept4(2), non-blocking and close-on-exec: the new fd, or -errno. */
export function acceptRaw(fd: FdLike): number {
  return native.accept(num(fd));
}

export function readRaw(fd: FdLike, view: ArrayBufferView | ArrayBuffer | SharedArrayBuffer): number {
  return native.read(num(fd), view);
}

export function writeRaw(fd: FdLike, view: ArrayBufferView | ArrayBuffer | SharedArrayBuffer): number {
  return native.write(num(fd), view);
}

export function preadRaw(fd: FdLike, view: ArrayBufferView, position: number | bigint): number {
  return native.pread(num(fd), view, position);
}

export function pwriteRaw(fd: FdLike, view: ArrayBufferView, position: number | bigint): number {
  return native.pwrite(num(fd), view, position);
}

/** preadv(2) over up to 1024 views: bytes or -errno. */
export function preadvRaw(fd: FdLike, views: readonly ArrayBufferView[], position: number | bigint): number {
  return native.preadv(num(fd), views, position);
}

/** pwritev(2) over up to 1024 views: bytes or -errno. */
export function pwritevRaw(fd: FdLike, views: readonly ArrayBufferView[], position: number | bigint): number {
  return native.pwritev(num(fd), views, position);
}

/** fdatasync(2) once: 0 or -errno (for callers with their own retry and error policy). */
export function fdatasyncRaw(fd: FdLike): number {
  return native.fdatasync(num(fd));
}
