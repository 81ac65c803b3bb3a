/**
 * The FUSE session of one virtio-fs device: takes a request (one descriptor chain: the in
 * header and arguments readable, the out header and reply writable), decodes it, runs it on
 * the passthrough file system and writes the reply. Pure protocol and policy: the chain is an
 * interface, so the queue handler gives it guest memory and the tests give it buffers.
 *
 * READ and WRITE data never pass through a copy when the guest's buffers are plain views of
 * guest memory: preadv/pwritev go straight between the file and the guest's pages, and the
 * bytes read are reported to the dirty log (FuseChain.writableViews' `written`).
 */
import {
  type DecodedRequest,
  decodeHeader,
  decodeRequest,
  EINVAL,
  EIO,
  ENOSYS,
  FuseError,
  type FuseRequest,
  MAX_BATCH_FORGET,
} from "./decode.js";
import { errnoOf, FsError, type Owner, type PassthroughFs } from "./passthrough.js";
import {
  encodeAttrOut,
  encodeEntryOut,
  encodeInitOut,
  encodeOpenOut,
  encodeOutHeader,
  encodeStatfsOut,
  encodeWriteOut,
  FUSE_ASYNC_READ,
  FUSE_AUTO_INVAL_DATA,
  FUSE_BIG_WRITES,
  FUSE_DO_READDIRPLUS,
  FUSE_GETATTR_FH,
  FUSE_KERNEL_MINOR_VERSION,
  FUSE_KERNEL_VERSION,
  FUSE_MAX_PAGES,
  FUSE_PARALLEL_DIROPS,
  FUSE_READDIRPLUS_AUTO,
  IN_ARG_SIZE,
  IN_HEADER_SIZE,
  INIT_OUT_COMPAT_22_SIZE,
  INIT_OUT_SIZE,
  Opcode,
  OUT_HEADER_SIZE,
  opcodeName,
} from "./protocol.js";

/** What the session needs from a request's descriptor chain. */
export interface FuseChain {
  readonly readableLength: number;
  readonly writableLength: number;
  /** Copies readable bytes from `offset` into `into`; returns how many. */
  readReadableInto(into: Uint8Array, offset: number): number;
  /** Copies `data` into the writable part at `offset` (and logs it dirty); returns how many fit. */
  writeWritable(data: Uint8Array, offset: number): number;
  /** Views of readable bytes [offset, offset+len), or null (then the data is copied). */
  readableViews(offset: number, len: number): Uint8Array[] | null;
  /**
   * Views of writable bytes [offset, offset+len) and `written(n)`, which reports the first n of
   * them as written (dirty log), or null (then the data is copied).
   */
  writableViews(offset: number, len: number): { views: Uint8Array[]; written(n: number): void } | null;
}

/** Largest non-WRITE request we read (a BATCH_FORGET of MAX_BATCH_FORGET entries is the biggest). */
export const MAX_REQUEST = IN_HEADER_SIZE + 8 + 16 * MAX_BATCH_FORGET;

export interface FuseServerOptions {
  /** Pages per request the guest may use (INIT max_pages); max_write is this many 4 KiB pages. */
  maxPages?: number;
  /** Offer READDIRPLUS (default true). */
  readdirplus?: boolean;
  /** Called for requests the guest got wrong (rate-limited by the caller). */
  warn?(message: string): void;
}

/** Counters for tests and the log. */
export interface FuseStats {
  requests: number;
  errors: number;
  malformed: number;
}

export class FuseServer {
  readonly fs: PassthroughFs;
  readonly stats: FuseStats = { requests: 0, errors: 0, malformed: 0 };
  readonly #maxPages: number;
  readonly #readdirplus: boolean;
  readonly #warn: (m: string) => void;
  readonly #head = new Uint8Array(IN_HEADER_SIZE + IN_ARG_SIZE.WRITE);

  constructor(fs: PassthroughFs, o: FuseServerOptions = {}) {
    this.fs = fs;
    this.#maxPages = Math.max(1, Math.min(256, o.maxPages ?? 32));
    this.#readdirplus = o.readdirplus ?? true;
    this.#warn = o.warn ?? (() => undefined);
  }

  /** Serves one request; returns the used length (bytes written into the chain). */
  handle(chain: FuseChain): number {
    this.stats.requests++;
    let decoded: DecodedRequest;
    let unique = 0n;
    try {
      decoded = this.#decode(chain);
      unique = decoded.header.unique;
    } catch (e) {
      this.stats.malformed++;
      if (!(e instanceof FuseError)) throw e;
      this.#warn(e.message);
      unique = e.details.unique ?? 0n;
      // FORGETs get no reply; anything else malformed gets its errno when there is room.
      if (e.details.opcode === Opcode.FORGET || e.details.opcode === Opcode.BATCH_FORGET) return 0;
      return this.#replyError(chain, unique, e.errno);
    }
    const { header, request } = decoded;
    if (request.op === Opcode.FORGET) {
      this.fs.forget(header.nodeid, request.nlookup);
      return 0;
    }
    if (request.op === Opcode.BATCH_FORGET) {
      for (const f of request.forgets) this.fs.forget(f.nodeid, f.nlookup);
      return 0;
    }
    if (!this.fs.initialized && request.op !== Opcode.INIT) return this.#replyError(chain, unique, EIO);
    try {
      return this.#dispatch(chain, header.nodeid, unique, request, { uid: header.uid, gid: header.gid });
    } catch (e) {
      this.stats.errors++;
      const errno = errnoOf(e);
      if (!(e instanceof FsError) && typeof (e as { errno?: unknown }).errno !== "number")
        this.#warn(`${opcodeName(header.opcode)}: ${(e as Error).message}`);
      return this.#replyError(chain, unique, errno);
    }
  }

  /**
   * The hiprio queue carries only FORGET and BATCH_FORGET (virtio 1.2, 5.11.6.1): returns the
   * forgets in it, for the queue that owns the inode table; anything else is dropped.
   */
  static forgetsOf(chain: FuseChain): { nodeid: bigint; nlookup: bigint }[] {
    const total = chain.readableLength;
    if (total > MAX_REQUEST || total < IN_HEADER_SIZE) return [];
    const b = new Uint8Array(total);
    chain.readReadableInto(b, 0);
    try {
      const { header, request } = decodeRequest(b, total);
      if (request.op === Opcode.FORGET) return [{ nodeid: header.nodeid, nlookup: request.nlookup }];
      if (request.op === Opcode.BATCH_FORGET) return request.forgets;
    } catch {
      // malformed: nothing to forget
    }
    return [];
  }

  #decode(chain: FuseChain): DecodedRequest {
    const total = chain.readableLength;
    const h = this.#head;
    const got = chain.readReadableInto(h.subarray(0, Math.min(total, IN_HEADER_SIZE)), 0);
    const header = decodeHeader(h.subarray(0, got), total);
    if (header.opcode === Opcode.WRITE) {
      const n = Math.min(total, h.length);
      chain.readReadableInto(h.subarray(0, n), 0);
      return decodeRequest(h.subarray(0, n), total);
    }
    if (total > MAX_REQUEST)
      throw new FuseError("TOO_LARGE", `${opcodeName(header.opcode)} of ${total} bytes`, EINVAL, {
        opcode: header.opcode,
        unique: header.unique,
      });
    const b = new Uint8Array(total);
    chain.readReadableInto(b, 0);
    return decodeRequest(b, total);
  }

  #replyError(chain: FuseChain, unique: bigint, errno: number): number {
    if (chain.writableLength < OUT_HEADER_SIZE) return 0;
    return chain.writeWritable(encodeOutHeader(OUT_HEADER_SIZE, -errno, unique), 0);
  }

  #reply(chain: FuseChain, unique: bigint, ...parts: Uint8Array[]): number {
    let len = OUT_HEADER_SIZE;
    for (const p of parts) len += p.length;
    if (chain.writableLength < len) {
      this.#warn(`reply of ${len} bytes does not fit ${chain.writableLength} writable bytes`);
      return this.#replyError(chain, unique, EINVAL);
    }
    let off = OUT_HEADER_SIZE;
    for (const p of parts) off += chain.writeWritable(p, off);
    chain.writeWritable(encodeOutHeader(len, 0, unique), 0);
    return len;
  }

  #dispatch(chain: FuseChain, nodeid: bigint, unique: bigint, r: FuseRequest, owner: Owner): number {
    const fs = this.fs;
    switch (r.op) {
      case Opcode.INIT:
        return this.#init(chain, unique, r);
      case Opcode.DESTROY:
        fs.reset();
        return this.#reply(chain, unique);
      case Opcode.LOOKUP:
        return this.#reply(chain, unique, encodeEntryOut(fs.lookup(nodeid, r.name)));
      case Opcode.GETATTR: {
        const attr = fs.getattr(nodeid, r.flags & FUSE_GETATTR_FH ? r.fh : null);
        return this.#reply(chain, unique, encodeAttrOut(fs.validity(), attr));
      }
      case Opcode.SETATTR:
        return this.#reply(chain, unique, encodeAttrOut(fs.validity(), fs.setattr(nodeid, r)));
      case Opcode.READLINK:
        return this.#reply(chain, unique, fs.readlink(nodeid));
      case Opcode.SYMLINK:
        return this.#reply(chain, unique, encodeEntryOut(fs.symlink(nodeid, r.name, r.target, owner)));
      case Opcode.MKNOD:
        return this.#reply(chain, unique, encodeEntryOut(fs.mknod(nodeid, r.name, r.mode, r.umask, owner)));
      case Opcode.MKDIR:
        return this.#reply(chain, unique, encodeEntryOut(fs.mkdir(nodeid, r.name, r.mode, r.umask, owner)));
      case Opcode.LINK:
        return this.#reply(chain, unique, encodeEntryOut(fs.link(r.oldnodeid, nodeid, r.name)));
      case Opcode.UNLINK:
        fs.unlink(nodeid, r.name);
        return this.#reply(chain, unique);
      case Opcode.RMDIR:
        fs.rmdir(nodeid, r.name);
        return this.#reply(chain, unique);
      case Opcode.RENAME:
        fs.rename(nodeid, r.name, r.newdir, r.newname, r.flags);
        return this.#reply(chain, unique);
      case Opcode.OPEN:
        return this.#reply(chain, unique, encodeOpenOut(fs.open(nodeid, r.flags), 0));
      case Opcode.OPENDIR:
        return this.#reply(chain, unique, encodeOpenOut(fs.opendir(nodeid), 0));
      case Opcode.CREATE: {
        const { entry, fh } = fs.create(nodeid, r.name, r.flags, r.mode, r.umask, owner);
        return this.#reply(chain, unique, encodeEntryOut(entry), encodeOpenOut(fh, 0));
      }
      case Opcode.READ:
        return this.#read(chain, unique, r.fh, r.offset, r.size);
      case Opcode.WRITE:
        return this.#write(chain, unique, r.fh, r.offset, r.size, r.dataOffset);
      case Opcode.READDIR: {
        const room = Math.min(r.size, chain.writableLength - OUT_HEADER_SIZE);
        if (room < 0) return 0;
        return this.#reply(chain, unique, fs.readdir(r.fh, r.offset, room, r.plus));
      }
      case Opcode.RELEASE:
        fs.release(r.fh, r.dir);
        return this.#reply(chain, unique);
      case Opcode.FLUSH:
        fs.flush(r.fh);
        return this.#reply(chain, unique);
      case Opcode.FSYNC:
        fs.fsync(r.fh, r.datasync, r.dir);
        return this.#reply(chain, unique);
      case Opcode.STATFS:
        return this.#reply(chain, unique, encodeStatfsOut(fs.statfs(nodeid)));
      case Opcode.SYNCFS:
        return this.#reply(chain, unique);
      case Opcode.FORGET:
      case Opcode.BATCH_FORGET:
        return 0;
      default:
        // ACCESS (we run every request with our own credentials: the guest's kernel checks
        // permissions itself), xattrs, locks, FALLOCATE, LSEEK, ... : ENOSYS, which the guest's
        // kernel remembers and stops sending.
        return this.#replyError(chain, unique, ENOSYS);
    }
  }

  #init(chain: FuseChain, unique: bigint, r: Extract<FuseRequest, { op: Opcode.INIT }>): number {
    if (r.major !== FUSE_KERNEL_VERSION) {
      // A newer major: answer with ours and let the guest retry (or give up).
      if (r.major > FUSE_KERNEL_VERSION)
        return this.#reply(chain, unique, encodeInitOut({ ...this.#initOut(0, 0), minor: 0 }, INIT_OUT_COMPAT_22_SIZE));
      return this.#replyError(chain, unique, EINVAL);
    }
    if (this.fs.initialized) this.fs.reset();
    const minor = Math.min(r.minor, FUSE_KERNEL_MINOR_VERSION);
    let want = FUSE_ASYNC_READ | FUSE_BIG_WRITES | FUSE_AUTO_INVAL_DATA | FUSE_PARALLEL_DIROPS | FUSE_MAX_PAGES;
    if (this.#readdirplus) want |= FUSE_DO_READDIRPLUS | FUSE_READDIRPLUS_AUTO;
    const flags = r.flags & want;
    this.fs.initialized = true;
    this.fs.minor = minor;
    this.fs.flags = flags;
    return this.#reply(
      chain,
      unique,
      encodeInitOut(this.#initOut(minor, flags), minor < 23 ? INIT_OUT_COMPAT_22_SIZE : INIT_OUT_SIZE),
    );
  }

  #initOut(minor: number, flags: number) {
    return {
      major: FUSE_KERNEL_VERSION,
      minor,
      maxReadahead: this.#maxPages * 4096,
      flags,
      maxBackground: 64,
      congestionThreshold: 48,
      maxWrite: this.#maxPages * 4096,
      timeGran: 1,
      maxPages: this.#maxPages,
    };
  }

  #read(chain: FuseChain, unique: bigint, fh: bigint, offset: number, size: number): number {
    const room = chain.writableLength - OUT_HEADER_SIZE;
    if (room < 0) return 0;
    const want = Math.min(size, room);
    let n: number;
    const direct = want > 0 ? chain.writableViews(OUT_HEADER_SIZE, want) : { views: [], written: () => undefined };
    if (direct) {
      n = this.fs.read(fh, direct.views, offset);
      direct.written(n);
    } else {
      const buf = new Uint8Array(want);
      n = this.fs.read(fh, [buf], offset);
      chain.writeWritable(buf.subarray(0, n), OUT_HEADER_SIZE);
    }
    chain.writeWritable(encodeOutHeader(OUT_HEADER_SIZE + n, 0, unique), 0);
    return OUT_HEADER_SIZE + n;
  }

  #write(chain: FuseChain, unique: bigint, fh: bigint, offset: number, size: number, dataOffset: number): number {
    let views = size > 0 ? chain.readableViews(dataOffset, size) : [];
    if (!views) {
      const buf = new Uint8Array(size);
      chain.readReadableInto(buf, dataOffset);
      views = [buf];
    }
    const n = this.fs.write(fh, views, offset);
    return this.#reply(chain, unique, encodeWriteOut(n));
  }
}
