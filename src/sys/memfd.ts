import { fchmodSync } from "node:fs";
import { SysError, sys } from "./errors.js";
import { Fd } from "./fd.js";
import { native } from "./native.js";

export const MFD_ALLOW_SEALING = 0x0002;
export const MFD_HUGETLB = 0x0004;
export const MFD_HUGE_SHIFT = 26;

export const F_ADD_SEALS = 1033;
export const F_GET_SEALS = 1034;
export const F_SEAL_SEAL = 0x0001;
export const F_SEAL_SHRINK = 0x0002;
export const F_SEAL_GROW = 0x0004;
export const F_SEAL_WRITE = 0x0008;

export const O_RDONLY = 0;
export const O_RDWR = 2;
export const O_CREAT = 0o100;
export const O_EXCL = 0o200;
export const O_TRUNC = 0o1000;
export const O_DIRECT = 0o40000;

export const FALLOC_FL_KEEP_SIZE = 0x01;
export const FALLOC_FL_PUNCH_HOLE = 0x02;

/** The seals that fix a memfd's size: what a process we share it with can no longer change. */
export const SIZE_SEALS = F_SEAL_SHRINK | F_SEAL_GROW;

export interface MemfdOptions {
  /** Allow seals to be added later (F_ADD_SEALS). */
  sealable?: boolean;
  /**
   * Seal the size once it is set (F_SEAL_SHRINK | F_SEAL_GROW, then F_SEAL_SEAL): for a memfd
   * whose fd leaves the process. A peer that ftruncates it then gets EPERM instead of making
   * our next access to the pages a SIGBUS. Implies `sealable`.
   */
  sealSize?: boolean;
  /** Back with huge pages; `hugePageShift` 21 = 2 MiB, 30 = 1 GiB. */
  hugetlb?: boolean;
  hugePageShift?: number;
}

/** memfd_create + ftruncate: an anonymous, shareable file of `size` bytes. */
export function createMemfd(name: string, size: number | bigint, options: MemfdOptions = {}): Fd {
  let flags = options.sealable || options.sealSize ? MFD_ALLOW_SEALING : 0;
  if (options.hugetlb) flags |= MFD_HUGETLB | ((options.hugePageShift ?? 0) << MFD_HUGE_SHIFT);
  const fd = new Fd(sys(() => native.memfdCreate(name, flags), name));
  try {
    sys(() => native.ftruncate(fd.fd, size), `${name}: ${size} bytes`);
    if (options.sealSize) sealSize(fd);
  } catch (e) {
    fd.close();
    throw e;
  }
  return fd;
}

export function addSeals(fd: Fd, seals: number): void {
  sys(() => native.fcntl(fd.fd, F_ADD_SEALS, seals));
}

export function getSeals(fd: Fd): number {
  return sys(() => native.fcntl(fd.fd, F_GET_SEALS, 0));
}

/**
 * Fixes the size of a sealable memfd for good: F_SEAL_SHRINK | F_SEAL_GROW, then F_SEAL_SEAL
 * so nobody holding the fd can lift or change them (memfd_create(2)). Contents stay writable.
 */
export function sealSize(fd: Fd): void {
  addSeals(fd, SIZE_SEALS);
  addSeals(fd, F_SEAL_SEAL);
}

/**
 * True when nobody holding `fd` can change its size: F_SEAL_SHRINK and F_SEAL_GROW are set.
 * False for files that take no seals at all (regular files on most file systems: EINVAL).
 */
export function isSizeSealed(fd: Fd): boolean {
  try {
    return (getSeals(fd) & SIZE_SEALS) === SIZE_SEALS;
  } catch {
    return false;
  }
}

export const O_NOFOLLOW = 0o400000;
const EINVAL = 22;

/** open(2); files it creates get `mode` (before the umask): owner-only unless told. */
export function openFile(path: string, flags: number, mode = 0o600): Fd {
  return new Fd(sys(() => native.open(path, flags, mode), path));
}

const S_IFMT = 0o170000;
const S_IFREG = 0o100000;

/**
 * A file only its owner can read (0600) for data we write out (snapshots): never through a
 * symlink (O_NOFOLLOW: ELOOP), never onto an existing file unless `overwrite` (else EEXIST),
 * never onto anything but a regular file, and an overwritten file's old mode is not kept.
 */
export function createPrivateFile(path: string, options: { overwrite?: boolean } = {}): Fd {
  const flags = O_RDWR | O_CREAT | O_NOFOLLOW | (options.overwrite ? 0 : O_EXCL);
  const fd = openFile(path, flags, 0o600);
  try {
    const mode = sys(() => native.fstat(fd.fd), path)[1];
    if ((mode & S_IFMT) !== S_IFREG) throw new SysError("open", EINVAL, `${path} is not a regular file`);
    fchmodSync(fd.fd, 0o600);
    if (options.overwrite) truncate(fd, 0);
  } catch (e) {
    fd.close();
    throw e;
  }
  return fd;
}

export function fileSize(fd: Fd): number {
  return sys(() => native.fstat(fd.fd))[0];
}

export function truncate(fd: Fd, size: number | bigint): void {
  sys(() => native.ftruncate(fd.fd, size));
}

export function punchHole(fd: Fd, offset: number, length: number): void {
  sys(() => native.fallocate(fd.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length));
}
