/**
 * The FUSE request decoder: the guest's bytes in, a typed request out, or a FuseError that says
 * what was wrong (with the errno the guest gets back). Every length is checked against the
 * request's own header and the bytes really there, every name is one path component (no '/',
 * not "." or "..", no NUL inside, at most NAME_MAX bytes), every offset and size fits the
 * limits before anything acts on it. Nothing here touches the file system.
 */
import { IN_ARG_SIZE, IN_HEADER_SIZE, NAME_MAX, Opcode, opcodeName, PATH_MAX } from "./protocol.js";

export const EPERM = 1;
export const ENOENT = 2;
export const EIO = 5;
export const EBADF = 9;
export const EACCES = 13;
export const EEXIST = 17;
export const EXDEV = 18;
export const ENOTDIR = 20;
export const EISDIR = 21;
export const EINVAL = 22;
export const ENFILE = 23;
export const EMFILE = 24;
export const EFBIG = 27;
export const ENOSPC = 28;
export const ERANGE = 34;
export const ENAMETOOLONG = 36;
export const ENOSYS = 38;
export const ENOTEMPTY = 39;
export const ELOOP = 40;
export const ENODATA = 61;
export const EOVERFLOW = 75;
export const EOPNOTSUPP = 95;
export const ESTALE = 116;

export type FuseErrorCode =
  | "SHORT_REQUEST"
  | "LENGTH_MISMATCH"
  | "SHORT_ARGUMENT"
  | "TRAILING_BYTES"
  | "BAD_NAME"
  | "NAME_TOO_LONG"
  | "BAD_OFFSET"
  | "TOO_LARGE"
  | "UNSUPPORTED";

/** A request the decoder refused: `errno` is what the guest is answered (when it can be). */
export class FuseError extends Error {
  override readonly name = "FuseError";
  constructor(
    readonly code: FuseErrorCode,
    message: string,
    readonly errno: number,
    readonly details: { opcode?: number; unique?: bigint; value?: unknown } = {},
  ) {
    super(message);
  }
}

export interface InHeader {
  len: number;
  opcode: number;
  unique: bigint;
  nodeid: bigint;
  uid: number;
  gid: number;
  pid: number;
}

/** Largest payload a WRITE may carry (what INIT tells the guest, plus nothing). */
export const MAX_WRITE = 1 << 20;
/** Largest READ / READDIR reply we build. */
export const MAX_READ = 1 << 20;
/** FUSE offsets are u64; ours must stay exact as JS numbers. */
export const MAX_OFFSET = Number.MAX_SAFE_INTEGER;
/** Forgets in one BATCH_FORGET (the kernel sends at most a page's worth). */
export const MAX_BATCH_FORGET = 4096;

/** fuse_setattr_in, as decoded: `valid` says which of the other fields apply. */
export interface SetattrIn {
  valid: number;
  fh: bigint;
  size: bigint;
  atime: bigint;
  mtime: bigint;
  atimensec: number;
  mtimensec: number;
  mode: number;
  uid: number;
  gid: number;
}

export type FuseRequest =
  | { op: Opcode.INIT; major: number; minor: number; maxReadahead: number; flags: number }
  | { op: Opcode.DESTROY }
  | { op: Opcode.LOOKUP; name: Uint8Array }
  | { op: Opcode.FORGET; nlookup: bigint }
  | { op: Opcode.BATCH_FORGET; forgets: { nodeid: bigint; nlookup: bigint }[] }
  | { op: Opcode.GETATTR; flags: number; fh: bigint }
  | ({ op: Opcode.SETATTR } & SetattrIn)
  | { op: Opcode.READLINK }
  | { op: Opcode.SYMLINK; name: Uint8Array; target: Uint8Array }
  | { op: Opcode.MKNOD; mode: number; rdev: number; umask: number; name: Uint8Array }
  | { op: Opcode.MKDIR; mode: number; umask: number; name: Uint8Array }
  | { op: Opcode.UNLINK; name: Uint8Array }
  | { op: Opcode.RMDIR; name: Uint8Array }
  | { op: Opcode.RENAME; newdir: bigint; flags: number; name: Uint8Array; newname: Uint8Array }
  | { op: Opcode.LINK; oldnodeid: bigint; name: Uint8Array }
  | { op: Opcode.OPEN; flags: number }
  | { op: Opcode.OPENDIR; flags: number }
  | { op: Opcode.CREATE; flags: number; mode: number; umask: number; name: Uint8Array }
  | { op: Opcode.READ; fh: bigint; offset: number; size: number }
  | { op: Opcode.WRITE; fh: bigint; offset: number; size: number; dataOffset: number }
  | { op: Opcode.READDIR; fh: bigint; offset: number; size: number; plus: boolean }
  | { op: Opcode.RELEASE; fh: bigint; dir: boolean }
  | { op: Opcode.FLUSH; fh: bigint }
  | { op: Opcode.FSYNC; fh: bigint; datasync: boolean; dir: boolean }
  | { op: Opcode.STATFS }
  | { op: Opcode.ACCESS; mask: number }
  | { op: Opcode.FALLOCATE; fh: bigint; offset: number; length: number; mode: number }
  | { op: Opcode.LSEEK; fh: bigint; offset: number; whence: number }
  | { op: Opcode.SYNCFS }
  /** An opcode we know but do not implement (ENOSYS), or one we do not know. */
  | { op: "UNSUPPORTED"; opcode: number };

export interface DecodedRequest {
  header: InHeader;
  request: FuseRequest;
}

/**
 * Decodes the in header alone (the hiprio queue and error replies need the unique id even when
 * the rest is bad). `total` is the number of readable bytes the chain really has.
 */
export function decodeHeader(b: Uint8Array, total: number): InHeader {
  if (b.length < IN_HEADER_SIZE || total < IN_HEADER_SIZE)
    throw new FuseError("SHORT_REQUEST", `request of ${total} bytes (header needs ${IN_HEADER_SIZE})`, EINVAL, {
      value: total,
    });
  const v = new DataView(b.buffer, b.byteOffset, b.byteLength);
  const h: InHeader = {
    len: v.getUint32(0, true),
    opcode: v.getUint32(4, true),
    unique: v.getBigUint64(8, true),
    nodeid: v.getBigUint64(16, true),
    uid: v.getUint32(24, true),
    gid: v.getUint32(28, true),
    pid: v.getUint32(32, true),
  };
  if (h.len !== total)
    throw new FuseError("LENGTH_MISMATCH", `header says ${h.len} bytes, the request has ${total}`, EINVAL, {
      opcode: h.opcode,
      unique: h.unique,
      value: h.len,
    });
  return h;
}

class Cursor {
  readonly v: DataView;
  pos = IN_HEADER_SIZE;
  constructor(
    readonly b: Uint8Array,
    /** Bytes of the request that are in `b` (the rest, WRITE data, is read elsewhere). */
    readonly end: number,
    readonly h: InHeader,
  ) {
    this.v = new DataView(b.buffer, b.byteOffset, b.byteLength);
  }

  fail(code: FuseErrorCode, message: string, errno = EINVAL, value?: unknown): never {
    throw new FuseError(code, `${opcodeName(this.h.opcode)}: ${message}`, errno, {
      opcode: this.h.opcode,
      unique: this.h.unique,
      value,
    });
  }

  /** The fixed argument struct: `size` bytes must be there. */
  arg(size: number): number {
    if (this.end - this.pos < size)
      this.fail("SHORT_ARGUMENT", `argument of ${this.end - this.pos} bytes (needs ${size})`, EINVAL, this.end);
    const at = this.pos;
    this.pos += size;
    return at;
  }

  u32(at: number): number {
    return this.v.getUint32(at, true);
  }

  u64(at: number): bigint {
    return this.v.getBigUint64(at, true);
  }

  offset(at: number): number {
    const o = this.v.getBigUint64(at, true);
    if (o > BigInt(MAX_OFFSET)) this.fail("BAD_OFFSET", `offset ${o} beyond 2^53-1`, EINVAL, o);
    return Number(o);
  }

  /** A NUL-terminated string; `component` requires one path component. */
  string(component: boolean, max: number): Uint8Array {
    const nul = this.b.subarray(this.pos, this.end).indexOf(0);
    if (nul < 0) this.fail("BAD_NAME", "name without a terminating NUL", EINVAL);
    const s = this.b.slice(this.pos, this.pos + nul);
    this.pos += nul + 1;
    if (s.length > max) this.fail("NAME_TOO_LONG", `name of ${s.length} bytes (max ${max})`, ENAMETOOLONG, s.length);
    if (component) checkComponent(s, (m) => this.fail("BAD_NAME", m, EINVAL));
    else if (s.length === 0) this.fail("BAD_NAME", "empty string", EINVAL);
    return s;
  }

  /** Nothing may follow the last argument (a guest that appends bytes is sending garbage). */
  done(): void {
    if (this.pos !== this.end)
      this.fail("TRAILING_BYTES", `${this.end - this.pos} unexpected byte(s) after the arguments`, EINVAL);
  }
}

const SLASH = 0x2f;
const DOT = 0x2e;

/**
 * A name the guest may use in a directory: non-empty, no '/', not "." or "..". (NUL cannot be
 * inside: the string ends at the first one.)
 */
export function checkComponent(s: Uint8Array, fail: (message: string) => never): void {
  if (s.length === 0) fail("empty name");
  if (s.includes(SLASH)) fail("name with '/'");
  if (s.includes(0)) fail("name with NUL");
  if ((s.length === 1 && s[0] === DOT) || (s.length === 2 && s[0] === DOT && s[1] === DOT))
    fail(`name '${s.length === 1 ? "." : ".."}'`);
}

export function isComponent(s: Uint8Array): boolean {
  try {
    checkComponent(s, (m) => {
      throw new Error(m);
    });
    return true;
  } catch {
    return false;
  }
}

/**
 * Decodes a whole request. `b` holds the request's first bytes (all of it, except for WRITE,
 * where it must hold at least the header and fuse_write_in: the data stays in guest memory and
 * `dataOffset` says where it starts); `total` is the chain's readable length.
 */
export function decodeRequest(b: Uint8Array, total: number): DecodedRequest {
  const header = decodeHeader(b, total);
  const c = new Cursor(b, Math.min(total, b.length), header);
  const request = decodeBody(c, header, total);
  return { header, request };
}

function decodeBody(c: Cursor, h: InHeader, total: number): FuseRequest {
  const op = h.opcode;
  switch (op) {
    case Opcode.INIT: {
      const a = c.arg(IN_ARG_SIZE.INIT_MIN);
      // Newer guests append flags2 and reserved words: read what we know, ignore the rest.
      c.pos = c.end;
      return { op, major: c.u32(a), minor: c.u32(a + 4), maxReadahead: c.u32(a + 8), flags: c.u32(a + 12) };
    }
    case Opcode.DESTROY:
    case Opcode.READLINK:
    case Opcode.STATFS:
    case Opcode.SYNCFS: {
      // SYNCFS carries a u64 padding word; the others nothing.
      if (op === Opcode.SYNCFS) c.pos = c.end;
      c.done();
      return { op } as FuseRequest;
    }
    case Opcode.LOOKUP:
    case Opcode.UNLINK:
    case Opcode.RMDIR: {
      const name = c.string(true, NAME_MAX);
      c.done();
      return { op, name };
    }
    case Opcode.FORGET: {
      const a = c.arg(IN_ARG_SIZE.FORGET);
      c.done();
      return { op, nlookup: c.u64(a) };
    }
    case Opcode.BATCH_FORGET: {
      const a = c.arg(IN_ARG_SIZE.BATCH_FORGET);
      const count = c.u32(a);
      if (count > MAX_BATCH_FORGET) c.fail("TOO_LARGE", `${count} forgets (max ${MAX_BATCH_FORGET})`, EINVAL, count);
      const forgets: { nodeid: bigint; nlookup: bigint }[] = [];
      for (let i = 0; i < count; i++) {
        const f = c.arg(16);
        forgets.push({ nodeid: c.u64(f), nlookup: c.u64(f + 8) });
      }
      c.done();
      return { op, forgets };
    }
    case Opcode.GETATTR: {
      const a = c.arg(IN_ARG_SIZE.GETATTR);
      c.done();
      return { op, flags: c.u32(a), fh: c.u64(a + 8) };
    }
    case Opcode.SETATTR: {
      const a = c.arg(IN_ARG_SIZE.SETATTR);
      c.done();
      return {
        op,
        valid: c.u32(a),
        fh: c.u64(a + 8),
        size: c.u64(a + 16),
        atime: c.u64(a + 32),
        mtime: c.u64(a + 40),
        atimensec: c.u32(a + 56),
        mtimensec: c.u32(a + 60),
        mode: c.u32(a + 68),
        uid: c.u32(a + 76),
        gid: c.u32(a + 80),
      };
    }
    case Opcode.SYMLINK: {
      const name = c.string(true, NAME_MAX);
      const target = c.string(false, PATH_MAX - 1);
      c.done();
      return { op, name, target };
    }
    case Opcode.MKNOD: {
      const a = c.arg(IN_ARG_SIZE.MKNOD);
      const name = c.string(true, NAME_MAX);
      c.done();
      return { op, mode: c.u32(a), rdev: c.u32(a + 4), umask: c.u32(a + 8), name };
    }
    case Opcode.MKDIR: {
      const a = c.arg(IN_ARG_SIZE.MKDIR);
      const name = c.string(true, NAME_MAX);
      c.done();
      return { op, mode: c.u32(a), umask: c.u32(a + 4), name };
    }
    case Opcode.RENAME:
    case Opcode.RENAME2: {
      const a = c.arg(op === Opcode.RENAME ? IN_ARG_SIZE.RENAME : IN_ARG_SIZE.RENAME2);
      const name = c.string(true, NAME_MAX);
      const newname = c.string(true, NAME_MAX);
      c.done();
      return { op: Opcode.RENAME, newdir: c.u64(a), flags: op === Opcode.RENAME2 ? c.u32(a + 8) : 0, name, newname };
    }
    case Opcode.LINK: {
      const a = c.arg(IN_ARG_SIZE.LINK);
      const name = c.string(true, NAME_MAX);
      c.done();
      return { op, oldnodeid: c.u64(a), name };
    }
    case Opcode.OPEN:
    case Opcode.OPENDIR: {
      const a = c.arg(IN_ARG_SIZE.OPEN);
      c.done();
      return { op, flags: c.u32(a) };
    }
    case Opcode.CREATE: {
      const a = c.arg(IN_ARG_SIZE.CREATE);
      const name = c.string(true, NAME_MAX);
      c.done();
      return { op, flags: c.u32(a), mode: c.u32(a + 4), umask: c.u32(a + 8), name };
    }
    case Opcode.READ:
    case Opcode.READDIR:
    case Opcode.READDIRPLUS: {
      const a = c.arg(IN_ARG_SIZE.READ);
      c.done();
      const fh = c.u64(a);
      const offset = c.offset(a + 8);
      const size = c.u32(a + 16);
      if (size > MAX_READ) c.fail("TOO_LARGE", `read of ${size} bytes (max ${MAX_READ})`, EINVAL, size);
      if (op === Opcode.READ) {
        if (offset + size > MAX_OFFSET) c.fail("BAD_OFFSET", `read past 2^53-1`, EINVAL, offset);
        return { op, fh, offset, size };
      }
      return { op: Opcode.READDIR, fh, offset, size, plus: op === Opcode.READDIRPLUS };
    }
    case Opcode.WRITE: {
      const a = c.arg(IN_ARG_SIZE.WRITE);
      const fh = c.u64(a);
      const offset = c.offset(a + 8);
      const size = c.u32(a + 16);
      if (size > MAX_WRITE) c.fail("TOO_LARGE", `write of ${size} bytes (max ${MAX_WRITE})`, EINVAL, size);
      // The data follows fuse_write_in and is exactly `size` bytes: the header's len covers it.
      if (total - c.pos !== size)
        c.fail("LENGTH_MISMATCH", `write of ${size} bytes carries ${total - c.pos}`, EINVAL, size);
      if (offset + size > MAX_OFFSET) c.fail("BAD_OFFSET", `write past 2^53-1`, EFBIG, offset);
      return { op, fh, offset, size, dataOffset: c.pos };
    }
    case Opcode.RELEASE:
    case Opcode.RELEASEDIR: {
      const a = c.arg(IN_ARG_SIZE.RELEASE);
      c.done();
      return { op: Opcode.RELEASE, fh: c.u64(a), dir: op === Opcode.RELEASEDIR };
    }
    case Opcode.FLUSH: {
      const a = c.arg(IN_ARG_SIZE.FLUSH);
      c.done();
      return { op, fh: c.u64(a) };
    }
    case Opcode.FSYNC:
    case Opcode.FSYNCDIR: {
      const a = c.arg(IN_ARG_SIZE.FSYNC);
      c.done();
      return { op: Opcode.FSYNC, fh: c.u64(a), datasync: (c.u32(a + 8) & 1) !== 0, dir: op === Opcode.FSYNCDIR };
    }
    case Opcode.ACCESS: {
      const a = c.arg(IN_ARG_SIZE.ACCESS);
      c.done();
      return { op, mask: c.u32(a) };
    }
    case Opcode.FALLOCATE: {
      const a = c.arg(IN_ARG_SIZE.FALLOCATE);
      c.done();
      const offset = c.offset(a + 8);
      const length = c.offset(a + 16);
      if (offset + length > MAX_OFFSET) c.fail("BAD_OFFSET", "range past 2^53-1", EFBIG, offset);
      return { op, fh: c.u64(a), offset, length, mode: c.u32(a + 24) };
    }
    case Opcode.LSEEK: {
      const a = c.arg(IN_ARG_SIZE.LSEEK);
      c.done();
      return { op, fh: c.u64(a), offset: c.offset(a + 8), whence: c.u32(a + 16) };
    }
    default:
      return { op: "UNSUPPORTED", opcode: op };
  }
}
