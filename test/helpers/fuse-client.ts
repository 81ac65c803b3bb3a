/**
 * A FUSE client for in-process tests of the virtio-fs session: requests encoded byte by byte as
 * the guest's kernel lays them out, carried in a chain over plain buffers (readable part, then
 * writable part split into pieces so replies straddle buffers as guest buffers do).
 */
import { type FuseChain, FuseServer } from "../../src/devices/fs/server.js";

export const Op = {
  LOOKUP: 1,
  FORGET: 2,
  GETATTR: 3,
  SETATTR: 4,
  READLINK: 5,
  SYMLINK: 6,
  MKNOD: 8,
  MKDIR: 9,
  UNLINK: 10,
  RMDIR: 11,
  RENAME: 12,
  LINK: 13,
  OPEN: 14,
  READ: 15,
  WRITE: 16,
  STATFS: 17,
  RELEASE: 18,
  FSYNC: 20,
  FLUSH: 25,
  INIT: 26,
  OPENDIR: 27,
  READDIR: 28,
  RELEASEDIR: 29,
  CREATE: 35,
  DESTROY: 38,
  BATCH_FORGET: 42,
  READDIRPLUS: 44,
  RENAME2: 45,
} as const;

/** A chain over buffers: `readable` in pieces of `piece` bytes, `writable` likewise. */
export class BufferChain implements FuseChain {
  readonly readableLength: number;
  readonly writableLength: number;
  readonly out: Uint8Array;
  written = 0;

  constructor(
    readonly req: Uint8Array,
    writable: number,
    readonly piece = 4096,
  ) {
    this.readableLength = req.length;
    this.writableLength = writable;
    this.out = new Uint8Array(writable);
  }

  readReadableInto(into: Uint8Array, offset: number): number {
    const n = Math.max(0, Math.min(into.length, this.req.length - offset));
    into.set(this.req.subarray(offset, offset + n));
    return n;
  }

  writeWritable(data: Uint8Array, offset: number): number {
    const n = Math.max(0, Math.min(data.length, this.out.length - offset));
    this.out.set(data.subarray(0, n), offset);
    this.written = Math.max(this.written, offset + n);
    return n;
  }

  #split(b: Uint8Array, offset: number, len: number): Uint8Array[] | null {
    if (offset + len > b.length) return null;
    const views: Uint8Array[] = [];
    let pos = offset;
    while (pos < offset + len) {
      const end = Math.min(offset + len, (Math.floor(pos / this.piece) + 1) * this.piece);
      views.push(b.subarray(pos, end));
      pos = end;
    }
    return views;
  }

  readableViews(offset: number, len: number): Uint8Array[] | null {
    return this.#split(this.req, offset, len);
  }

  writableViews(offset: number, len: number): { views: Uint8Array[]; written(n: number): void } | null {
    const views = this.#split(this.out, offset, len);
    if (!views) return null;
    return { views, written: (n) => (this.written = Math.max(this.written, offset + n)) };
  }
}

const enc = new TextEncoder();
export const cstr = (s: string | Uint8Array): Uint8Array => {
  const b = typeof s === "string" ? enc.encode(s) : s;
  const out = new Uint8Array(b.length + 1);
  out.set(b);
  return out;
};

export function struct(size: number, fill: (v: DataView) => void): Uint8Array {
  const b = new Uint8Array(size);
  fill(new DataView(b.buffer));
  return b;
}

let uniqueSeq = 1n;

/** A request: the 40-byte in header (len = everything) and the argument parts. */
export function request(opcode: number, nodeid: bigint | number, ...parts: Uint8Array[]): Uint8Array {
  let len = 40;
  for (const p of parts) len += p.length;
  const b = new Uint8Array(len);
  const v = new DataView(b.buffer);
  v.setUint32(0, len, true);
  v.setUint32(4, opcode, true);
  v.setBigUint64(8, uniqueSeq++, true);
  v.setBigUint64(16, BigInt(nodeid), true);
  let off = 40;
  for (const p of parts) {
    b.set(p, off);
    off += p.length;
  }
  return b;
}

export interface Reply {
  error: number;
  len: number;
  payload: Uint8Array;
  view: DataView;
  used: number;
}

export class FuseTestClient {
  constructor(readonly server: FuseServer) {}

  /** Sends raw request bytes; `out` writable bytes. */
  send(req: Uint8Array, out = 1 << 17, piece = 4096): Reply {
    const chain = new BufferChain(req, out, piece);
    const used = this.server.handle(chain);
    const v = new DataView(chain.out.buffer);
    const len = used >= 16 ? v.getUint32(0, true) : 0;
    const payload = chain.out.slice(16, Math.max(16, used));
    return { error: used >= 16 ? v.getInt32(4, true) : 0, len, payload, view: new DataView(payload.buffer), used };
  }

  call(opcode: number, nodeid: bigint | number, ...parts: Uint8Array[]): Reply {
    return this.send(request(opcode, nodeid, ...parts));
  }

  ok(opcode: number, nodeid: bigint | number, ...parts: Uint8Array[]): Reply {
    const r = this.call(opcode, nodeid, ...parts);
    if (r.error !== 0) throw new Error(`opcode ${opcode} failed: errno ${-r.error}`);
    return r;
  }

  init(flags = 0xffffffff): Reply {
    return this.ok(
      Op.INIT,
      0,
      struct(64, (v) => {
        v.setUint32(0, 7, true);
        v.setUint32(4, 38, true);
        v.setUint32(8, 131072, true);
        v.setUint32(12, flags, true);
      }),
    );
  }

  /** LOOKUP-like replies (entry_out): the node id and the attributes' ino/size/mode. */
  static entry(r: Reply): { nodeid: bigint; ino: bigint; size: bigint; mode: number } {
    return {
      nodeid: r.view.getBigUint64(0, true),
      ino: r.view.getBigUint64(40, true),
      size: r.view.getBigUint64(48, true),
      mode: r.view.getUint32(40 + 60, true),
    };
  }

  lookup(parent: bigint | number, name: string | Uint8Array): Reply {
    return this.call(Op.LOOKUP, parent, cstr(name));
  }

  mkdir(parent: bigint | number, name: string, mode = 0o755): Reply {
    return this.call(
      Op.MKDIR,
      parent,
      struct(8, (v) => v.setUint32(0, mode, true)),
      cstr(name),
    );
  }

  create(parent: bigint | number, name: string | Uint8Array, flags = 0o102, mode = 0o644): Reply {
    return this.call(
      Op.CREATE,
      parent,
      struct(16, (v) => {
        v.setUint32(0, flags, true);
        v.setUint32(4, mode, true);
      }),
      cstr(name),
    );
  }

  open(nodeid: bigint | number, flags = 2): Reply {
    return this.call(
      Op.OPEN,
      nodeid,
      struct(8, (v) => v.setUint32(0, flags, true)),
    );
  }

  static fh(r: Reply, at = 0): bigint {
    return r.view.getBigUint64(at, true);
  }

  write(nodeid: bigint | number, fh: bigint, offset: number, data: Uint8Array): Reply {
    return this.call(
      Op.WRITE,
      nodeid,
      struct(40, (v) => {
        v.setBigUint64(0, fh, true);
        v.setBigUint64(8, BigInt(offset), true);
        v.setUint32(16, data.length, true);
      }),
      data,
    );
  }

  read(nodeid: bigint | number, fh: bigint, offset: number, size: number): Reply {
    return this.call(
      Op.READ,
      nodeid,
      struct(40, (v) => {
        v.setBigUint64(0, fh, true);
        v.setBigUint64(8, BigInt(offset), true);
        v.setUint32(16, size, true);
      }),
    );
  }

  release(nodeid: bigint | number, fh: bigint, dir = false): Reply {
    return this.call(
      dir ? Op.RELEASEDIR : Op.RELEASE,
      nodeid,
      struct(24, (v) => v.setBigUint64(0, fh, true)),
    );
  }

  forget(nodeid: bigint | number, n: number): Reply {
    return this.call(
      Op.FORGET,
      nodeid,
      struct(8, (v) => v.setBigUint64(0, BigInt(n), true)),
    );
  }

  readdir(nodeid: bigint | number, fh: bigint, offset: number, size = 4096, plus = false): Reply {
    return this.call(
      plus ? Op.READDIRPLUS : Op.READDIR,
      nodeid,
      struct(40, (v) => {
        v.setBigUint64(0, fh, true);
        v.setBigUint64(8, BigInt(offset), true);
        v.setUint32(16, size, true);
      }),
    );
  }

  /** Names in a READDIR(PLUS) reply, with their offsets and node ids (0 without plus). */
  static dirents(r: Reply, plus = false): { name: string; off: bigint; nodeid: bigint }[] {
    const out: { name: string; off: bigint; nodeid: bigint }[] = [];
    let pos = 0;
    const dec = new TextDecoder();
    while (pos < r.payload.length) {
      let nodeid = 0n;
      if (plus) {
        nodeid = r.view.getBigUint64(pos, true);
        pos += 128;
      }
      const off = r.view.getBigUint64(pos + 8, true);
      const namelen = r.view.getUint32(pos + 16, true);
      out.push({ name: dec.decode(r.payload.subarray(pos + 24, pos + 24 + namelen)), off, nodeid });
      pos += (24 + namelen + 7) & ~7;
    }
    return out;
  }
}

export { FuseServer };
