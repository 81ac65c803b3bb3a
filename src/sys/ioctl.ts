/** Linux ioctl request encoding (asm-generic/ioctl.h), so request numbers are derived, not pasted. */
import { check } from "./errors.js";
import type { Fd } from "./fd.js";
import { native, type View } from "./native.js";

const NRBITS = 8;
const TYPEBITS = 8;
const SIZEBITS = 14;
const NRSHIFT = 0;
const TYPESHIFT = NRSHIFT + NRBITS;
const SIZESHIFT = TYPESHIFT + TYPEBITS;
const DIRSHIFT = SIZESHIFT + SIZEBITS;
const NONE = 0;
const WRITE = 1;
const READ = 2;

function ioc(dir: number, type: number, nr: number, size: number): number {
  // >>> 0 keeps the result an unsigned 32-bit number (READ|WRITE sets bit 31).
  return ((dir << DIRSHIFT) | (type << TYPESHIFT) | (nr << NRSHIFT) | (size << SIZESHIFT)) >>> 0;
}

const t = (type: number | string) => (typeof type === "string" ? type.charCodeAt(0) : type);
export const IO = (type: number | string, nr: number) => ioc(NONE, t(type), nr, 0);
export const IOR = (type: number | string, nr: number, size: number) => ioc(READ, t(type), nr, size);
export const IOW = (type: number | string, nr: number, size: number) => ioc(WRITE, t(type), nr, size);
export const IOWR = (type: number | string, nr: number, size: number) => ioc(READ | WRITE, t(type), nr, size);

/** ioctl with a caller-packed struct (or an integer argument); throws SysError naming `name`. */
export function ioctl(fd: Fd | number, request: number, arg: View | number | bigint | undefined, name: string): number {
  const n = typeof fd === "number" ? fd : fd.fd;
  return check(native.ioctl(n, request, arg), "ioctl", name);
}

/** Like ioctl() but returns -errno instead of throwing, for calls where some errnos are expected. */
export function ioctlRaw(fd: Fd | number, request: number, arg?: View | number | bigint): number {
  return native.ioctl(typeof fd === "number" ? fd : fd.fd, request, arg);
}
