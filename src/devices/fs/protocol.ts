/**
 * FUSE wire protocol as virtio-fs carries it (Linux include/uapi/linux/fuse.h, protocol 7.x):
 * opcodes, flags, the fixed layouts' sizes and offsets, and the reply encoders. One place for
 * every constant; the decoder (decode.ts) and the file system never touch raw offsets.
 *
 * Every field is little-endian (virtio-fs is VERSION_1 only, so the guest's FUSE structs arrive
 * in little-endian on every architecture we serve).
 */

export const FUSE_KERNEL_VERSION = 7;
/** The minor version we speak; a guest asking for less gets its own (INIT). */
export const FUSE_KERNEL_MINOR_VERSION = 31;
/** The root directory's node id (fixed by the protocol). */
export const FUSE_ROOT_ID = 1;

export enum Opcode {
  LOOKUP = 1,
  FORGET = 2,
  GETATTR = 3,
  SETATTR = 4,
  READLINK = 5,
  SYMLINK = 6,
  MKNOD = 8,
  MKDIR = 9,
  UNLINK = 10,
  RMDIR = 11,
  RENAME = 12,
  LINK = 13,
  OPEN = 14,
  READ = 15,
  WRITE = 16,
  STATFS = 17,
  RELEASE = 18,
  FSYNC = 20,
  SETXATTR = 21,
  GETXATTR = 22,
  LISTXATTR = 23,
  REMOVEXATTR = 24,
  FLUSH = 25,
  INIT = 26,
  OPENDIR = 27,
  READDIR = 28,
  RELEASEDIR = 29,
  FSYNCDIR = 30,
  GETLK = 31,
  SETLK = 32,
  SETLKW = 33,
  ACCESS = 34,
  CREATE = 35,
  INTERRUPT = 36,
  BMAP = 37,
  DESTROY = 38,
  IOCTL = 39,
  POLL = 40,
  NOTIFY_REPLY = 41,
  BATCH_FORGET = 42,
  FALLOCATE = 43,
  READDIRPLUS = 44,
  RENAME2 = 45,
  LSEEK = 46,
  COPY_FILE_RANGE = 47,
  SETUPMAPPING = 48,
  REMOVEMAPPING = 49,
  SYNCFS = 50,
  TMPFILE = 51,
}

const OPCODE_NAMES: Record<number, string> = {
  1: "LOOKUP",
  2: "FORGET",
  3: "GETATTR",
  4: "SETATTR",
  5: "READLINK",
  6: "SYMLINK",
  8: "MKNOD",
  9: "MKDIR",
  10: "UNLINK",
  11: "RMDIR",
  12: "RENAME",
  13: "LINK",
  14: "OPEN",
  15: "READ",
  16: "WRITE",
  17: "STATFS",
  18: "RELEASE",
  20: "FSYNC",
  21: "SETXATTR",
  22: "GETXATTR",
  23: "LISTXATTR",
  24: "REMOVEXATTR",
  25: "FLUSH",
  26: "INIT",
  27: "OPENDIR",
  28: "READDIR",
  29: "RELEASEDIR",
  30: "FSYNCDIR",
  31: "GETLK",
  32: "SETLK",
  33: "SETLKW",
  34: "ACCESS",
  35: "CREATE",
  36: "INTERRUPT",
  37: "BMAP",
  38: "DESTROY",
  39: "IOCTL",
  40: "POLL",
  41: "NOTIFY_REPLY",
  42: "BATCH_FORGET",
  43: "FALLOCATE",
  44: "READDIRPLUS",
  45: "RENAME2",
  46: "LSEEK",
  47: "COPY_FILE_RANGE",
  48: "SETUPMAPPING",
  49: "REMOVEMAPPING",
  50: "SYNCFS",
  51: "TMPFILE",
};

export function opcodeName(op: number): string {
  return OPCODE_NAMES[op] ?? `OPCODE_${op}`;
}

// INIT flags (fuse_init_in.flags / fuse_init_out.flags).
export const FUSE_ASYNC_READ = 1 << 0;
export const FUSE_POSIX_LOCKS = 1 << 1;
export const FUSE_ATOMIC_O_TRUNC = 1 << 3;
export const FUSE_EXPORT_SUPPORT = 1 << 4;
export const FUSE_BIG_WRITES = 1 << 5;
export const FUSE_DONT_MASK = 1 << 6;
export const FUSE_AUTO_INVAL_DATA = 1 << 12;
export const FUSE_DO_READDIRPLUS = 1 << 13;
export const FUSE_READDIRPLUS_AUTO = 1 << 14;
export const FUSE_ASYNC_DIO = 1 << 15;
export const FUSE_WRITEBACK_CACHE = 1 << 16;
export const FUSE_PARALLEL_DIROPS = 1 << 18;
export const FUSE_MAX_PAGES = 1 << 22;

// SETATTR valid bits.
export const FATTR_MODE = 1 << 0;
export const FATTR_UID = 1 << 1;
export const FATTR_GID = 1 << 2;
export const FATTR_SIZE = 1 << 3;
export const FATTR_ATIME = 1 << 4;
export const FATTR_MTIME = 1 << 5;
export const FATTR_FH = 1 << 6;
export const FATTR_ATIME_NOW = 1 << 7;
export const FATTR_MTIME_NOW = 1 << 8;
export const FATTR_LOCKOWNER = 1 << 9;
export const FATTR_CTIME = 1 << 10;
export const FATTR_KILL_SUIDGID = 1 << 11;

/** fuse_getattr_in.getattr_flags: fh is valid. */
export const FUSE_GETATTR_FH = 1 << 0;
/** fuse_fsync_in.fsync_flags: data only (fdatasync). */
export const FUSE_FSYNC_FDATASYNC = 1 << 0;

// RENAME2 flags (renameat2).
export const RENAME_NOREPLACE = 1 << 0;
export const RENAME_EXCHANGE = 1 << 1;
export const RENAME_WHITEOUT = 1 << 2;

// Layout sizes.
export const IN_HEADER_SIZE = 40;
export const OUT_HEADER_SIZE = 16;
export const ATTR_SIZE = 88;
export const ENTRY_OUT_SIZE = 40 + ATTR_SIZE;
export const ATTR_OUT_SIZE = 16 + ATTR_SIZE;
export const OPEN_OUT_SIZE = 16;
export const WRITE_OUT_SIZE = 8;
export const STATFS_OUT_SIZE = 80;
export const INIT_OUT_SIZE = 64;
/** fuse_init_out as protocol 7.22 and older knew it. */
export const INIT_OUT_COMPAT_22_SIZE = 24;
export const DIRENT_NAME_OFFSET = 24;
export const FORGET_ONE_SIZE = 16;

/** Fixed argument sizes per opcode (the struct that follows the in header). */
export const IN_ARG_SIZE = {
  INIT_MIN: 16,
  GETATTR: 16,
  SETATTR: 88,
  FORGET: 8,
  BATCH_FORGET: 8,
  MKNOD: 16,
  MKDIR: 8,
  RENAME: 8,
  RENAME2: 16,
  LINK: 8,
  OPEN: 8,
  CREATE: 16,
  RELEASE: 24,
  FLUSH: 24,
  READ: 40,
  WRITE: 40,
  FSYNC: 16,
  ACCESS: 8,
  FALLOCATE: 32,
  LSEEK: 24,
} as const;

/** The longest name a component may have (NAME_MAX). */
export const NAME_MAX = 255;
/** The longest symlink target we accept (PATH_MAX). */
export const PATH_MAX = 4096;

/** File attributes as fuse_attr carries them. */
export interface FuseAttr {
  ino: bigint;
  size: bigint;
  blocks: bigint;
  atime: bigint;
  mtime: bigint;
  ctime: bigint;
  atimensec: number;
  mtimensec: number;
  ctimensec: number;
  mode: number;
  nlink: number;
  uid: number;
  gid: number;
  rdev: number;
  blksize: number;
}

export function writeAttr(v: DataView, off: number, a: FuseAttr): void {
  v.setBigUint64(off, a.ino, true);
  v.setBigUint64(off + 8, a.size, true);
  v.setBigUint64(off + 16, a.blocks, true);
  v.setBigUint64(off + 24, a.atime, true);
  v.setBigUint64(off + 32, a.mtime, true);
  v.setBigUint64(off + 40, a.ctime, true);
  v.setUint32(off + 48, a.atimensec, true);
  v.setUint32(off + 52, a.mtimensec, true);
  v.setUint32(off + 56, a.ctimensec, true);
  v.setUint32(off + 60, a.mode, true);
  v.setUint32(off + 64, a.nlink, true);
  v.setUint32(off + 68, a.uid, true);
  v.setUint32(off + 72, a.gid, true);
  v.setUint32(off + 76, a.rdev, true);
  v.setUint32(off + 80, a.blksize, true);
  v.setUint32(off + 84, 0, true);
}

/** Seconds and nanoseconds of a validity period (entry_valid, attr_valid). */
export interface Validity {
  sec: number;
  nsec: number;
}

export interface EntryOut {
  nodeid: number;
  generation: number;
  entryValid: Validity;
  attrValid: Validity;
  attr: FuseAttr;
}

export function writeEntryOut(v: DataView, off: number, e: EntryOut): void {
  v.setBigUint64(off, BigInt(e.nodeid), true);
  v.setBigUint64(off + 8, BigInt(e.generation), true);
  v.setBigUint64(off + 16, BigInt(e.entryValid.sec), true);
  v.setBigUint64(off + 24, BigInt(e.attrValid.sec), true);
  v.setUint32(off + 32, e.entryValid.nsec, true);
  v.setUint32(off + 36, e.attrValid.nsec, true);
  writeAttr(v, off + 40, e.attr);
}

export function encodeEntryOut(e: EntryOut): Uint8Array {
  const b = new Uint8Array(ENTRY_OUT_SIZE);
  writeEntryOut(new DataView(b.buffer), 0, e);
  return b;
}

export function encodeAttrOut(valid: Validity, attr: FuseAttr): Uint8Array {
  const b = new Uint8Array(ATTR_OUT_SIZE);
  const v = new DataView(b.buffer);
  v.setBigUint64(0, BigInt(valid.sec), true);
  v.setUint32(8, valid.nsec, true);
  writeAttr(v, 16, attr);
  return b;
}

export function encodeOpenOut(fh: number, openFlags: number): Uint8Array {
  const b = new Uint8Array(OPEN_OUT_SIZE);
  const v = new DataView(b.buffer);
  v.setBigUint64(0, BigInt(fh), true);
  v.setUint32(8, openFlags, true);
  return b;
}

export function encodeWriteOut(size: number): Uint8Array {
  const b = new Uint8Array(WRITE_OUT_SIZE);
  new DataView(b.buffer).setUint32(0, size, true);
  return b;
}

export interface StatfsOut {
  blocks: bigint;
  bfree: bigint;
  bavail: bigint;
  files: bigint;
  ffree: bigint;
  bsize: number;
  namelen: number;
  frsize: number;
}

export function encodeStatfsOut(s: StatfsOut): Uint8Array {
  const b = new Uint8Array(STATFS_OUT_SIZE);
  const v = new DataView(b.buffer);
  v.setBigUint64(0, s.blocks, true);
  v.setBigUint64(8, s.bfree, true);
  v.setBigUint64(16, s.bavail, true);
  v.setBigUint64(24, s.files, true);
  v.setBigUint64(32, s.ffree, true);
  v.setUint32(40, s.bsize, true);
  v.setUint32(44, s.namelen, true);
  v.setUint32(48, s.frsize, true);
  return b;
}

export interface InitOut {
  major: number;
  minor: number;
  maxReadahead: number;
  flags: number;
  maxBackground: number;
  congestionThreshold: number;
  maxWrite: number;
  timeGran: number;
  maxPages: number;
}

/** fuse_init_out; `size` is what the guest's minor version expects (24 before 7.23, else 64). */
export function encodeInitOut(o: InitOut, size: number): Uint8Array {
  const b = new Uint8Array(INIT_OUT_SIZE);
  const v = new DataView(b.buffer);
  v.setUint32(0, o.major, true);
  v.setUint32(4, o.minor, true);
  v.setUint32(8, o.maxReadahead, true);
  v.setUint32(12, o.flags, true);
  v.setUint16(16, o.maxBackground, true);
  v.setUint16(18, o.congestionThreshold, true);
  v.setUint32(20, o.maxWrite, true);
  v.setUint32(24, o.timeGran, true);
  v.setUint16(28, o.maxPages, true);
  return b.subarray(0, size);
}

/** fuse_out_header. `error` is 0 or a negative errno. */
export function encodeOutHeader(len: number, error: number, unique: bigint): Uint8Array {
  const b = new Uint8Array(OUT_HEADER_SIZE);
  const v = new DataView(b.buffer);
  v.setUint32(0, len, true);
  v.setInt32(4, error, true);
  v.setBigUint64(8, unique, true);
  return b;
}

/** Bytes one fuse_dirent takes with its name, padded to 8. */
export function direntSize(nameLen: number): number {
  return (DIRENT_NAME_OFFSET + nameLen + 7) & ~7;
}

/** Bytes one fuse_direntplus takes. */
export function direntPlusSize(nameLen: number): number {
  return ENTRY_OUT_SIZE + direntSize(nameLen);
}

/** Writes a fuse_dirent (ino, off, namelen, type, name, zero padding) at `off`; returns its size. */
export function writeDirent(
  b: Uint8Array,
  off: number,
  d: { ino: bigint; off: number; type: number; name: Uint8Array },
): number {
  const size = direntSize(d.name.length);
  const v = new DataView(b.buffer, b.byteOffset, b.byteLength);
  v.setBigUint64(off, d.ino, true);
  v.setBigUint64(off + 8, BigInt(d.off), true);
  v.setUint32(off + 16, d.name.length, true);
  v.setUint32(off + 20, d.type, true);
  b.set(d.name, off + DIRENT_NAME_OFFSET);
  b.fill(0, off + DIRENT_NAME_OFFSET + d.name.length, off + size);
  return size;
}
