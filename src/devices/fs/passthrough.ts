/**
 * A passthrough file system over one shared directory: what the FUSE requests act on.
 *
 * Confinement: every object the guest can name is reached from the shared directory one
 * validated component at a time. Each inode holds an O_PATH fd; a name is resolved relative
 * to its parent's fd through the /proc/self/fd magic link (`/proc/self/fd/<parent>/<name>`,
 * which the kernel resolves exactly as openat(parent, name) would), with O_NOFOLLOW on the
 * final component, and names never contain '/' and are never "." or ".." (decode.ts). So no
 * `..`, absolute name or symlink, whatever its target, leads out: symlinks are created and read
 * as text, never followed by us. Only regular files and directories are ever opened for I/O
 * (a FIFO or a device node would block or reach outside), and device nodes cannot be created.
 *
 * Lifetimes: an inode lives while the guest's lookup count on it is above zero (LOOKUP,
 * CREATE, MKDIR, SYMLINK, LINK, READDIRPLUS entries add one; FORGET takes them back); the root
 * is never forgotten. A handle (OPEN, OPENDIR, CREATE) owns its own fd and lives until
 * RELEASE/RELEASEDIR, independently of its inode. DESTROY, a new INIT or close() drop all.
 */
import {
  type BigIntStats,
  closeSync,
  type Dirent,
  fchmodSync,
  fchownSync,
  fdatasyncSync,
  fstatSync,
  fsyncSync,
  ftruncateSync,
  futimesSync,
  lchownSync,
  linkSync,
  lstatSync,
  lutimesSync,
  mkdirSync,
  openSync,
  readdirSync,
  readlinkSync,
  readvSync,
  renameSync,
  rmdirSync,
  statfsSync,
  symlinkSync,
  unlinkSync,
  writevSync,
} from "node:fs";
import {
  EBADF,
  EINVAL,
  EIO,
  EISDIR,
  EMFILE,
  ENFILE,
  ENOENT,
  ENOSYS,
  ENOTDIR,
  EPERM,
  ESTALE,
  isComponent,
  type SetattrIn,
} from "./decode.js";
import {
  direntPlusSize,
  direntSize,
  ENTRY_OUT_SIZE,
  type EntryOut,
  FATTR_ATIME,
  FATTR_ATIME_NOW,
  FATTR_FH,
  FATTR_GID,
  FATTR_MODE,
  FATTR_MTIME,
  FATTR_MTIME_NOW,
  FATTR_SIZE,
  FATTR_UID,
  FUSE_ROOT_ID,
  type FuseAttr,
  type StatfsOut,
  type Validity,
  writeDirent,
  writeEntryOut,
} from "./protocol.js";

// open(2) flags (x86-64 / generic Linux values).
export const O_ACCMODE = 0o3;
export const O_WRONLY = 0o1;
export const O_RDWR = 0o2;
export const O_CREAT = 0o100;
export const O_EXCL = 0o200;
export const O_TRUNC = 0o1000;
export const O_APPEND = 0o2000;
export const O_NONBLOCK = 0o4000;
export const O_DSYNC = 0o10000;
export const O_DIRECTORY = 0o200000;
export const O_NOFOLLOW = 0o400000;
export const O_CLOEXEC = 0o2000000;
export const O_SYNC = 0o4010000;
export const O_PATH = 0o10000000;

export const S_IFMT = 0o170000;
export const S_IFREG = 0o100000;
export const S_IFDIR = 0o40000;
export const S_IFLNK = 0o120000;

/** The guest's open flags we pass on (access mode, append, truncate, sync); the rest is dropped. */
const OPEN_FLAGS_KEPT = O_ACCMODE | O_APPEND | O_TRUNC | O_SYNC | O_DSYNC;

/** The guest process a request came from (fuse_in_header uid/gid). */
export interface Owner {
  uid: number;
  gid: number;
}

const RUNS_AS_ROOT = process.geteuid?.() === 0;

/** A failed file-system operation: the errno the guest gets. */
export class FsError extends Error {
  override readonly name = "FsError";
  constructor(
    readonly errno: number,
    message: string,
  ) {
    super(message);
  }
}

/** The errno of whatever an operation threw (Node's fs errors carry -errno; ours carry errno). */
export function errnoOf(e: unknown): number {
  if (e instanceof FsError) return e.errno;
  const n = (e as { errno?: unknown }).errno;
  if (typeof n === "number" && n !== 0) return Math.abs(n);
  return EIO;
}

export interface PassthroughOptions {
  /** Seconds the guest may cache names and attributes (entry_valid / attr_valid). Default 1. */
  cacheSeconds?: number;
  /** Most inodes the guest may hold at once (each is an fd). Default 65536. */
  maxInodes?: number;
  /** Most open handles at once. Default 16384. */
  maxHandles?: number;
  readonly?: boolean;
}

interface Inode {
  nodeid: number;
  /** O_PATH fd (O_NOFOLLOW: a symlink's own inode). -1 for a stale inode (migrated, not found). */
  fd: number;
  dev: bigint;
  ino: bigint;
  /** S_IFMT bits: fixed for the life of the inode. */
  type: number;
  nlookup: number;
}

interface DirEntry {
  name: Buffer;
  type: number;
}

interface Handle {
  fh: number;
  kind: "file" | "dir";
  /** file: an fd opened for I/O; dir: an O_PATH fd of the directory. -1 when stale. */
  fd: number;
  nodeid: number;
  /** The open flags as we used them (migration reopens with them). */
  flags: number;
  /** dir: the listing taken at offset 0 ("." and ".." first). */
  entries: DirEntry[] | null;
}

const procPath = (fd: number, name?: Uint8Array): Buffer =>
  name ? Buffer.concat([Buffer.from(`/proc/self/fd/${fd}/`), name]) : Buffer.from(`/proc/self/fd/${fd}`);

const DOT = Buffer.from(".");
const DOTDOT = Buffer.from("..");

function direntType(d: Dirent<Buffer>): number {
  if (d.isFile()) return 8;
  if (d.isDirectory()) return 4;
  if (d.isSymbolicLink()) return 10;
  if (d.isFIFO()) return 1;
  if (d.isSocket()) return 12;
  if (d.isCharacterDevice()) return 2;
  if (d.isBlockDevice()) return 6;
  return 0;
}

export function attrOf(st: BigIntStats): FuseAttr {
  const NS = 1_000_000_000n;
  return {
    ino: st.ino,
    size: st.size,
    blocks: st.blocks,
    atime: st.atimeNs / NS,
    mtime: st.mtimeNs / NS,
    ctime: st.ctimeNs / NS,
    atimensec: Number(st.atimeNs % NS),
    mtimensec: Number(st.mtimeNs % NS),
    ctimensec: Number(st.ctimeNs % NS),
    mode: Number(st.mode),
    nlink: Number(st.nlink & 0xffffffffn),
    uid: Number(st.uid),
    gid: Number(st.gid),
    rdev: Number(st.rdev & 0xffffffffn),
    blksize: Number(st.blksize),
  };
}

/** What a migration carries: enough to reopen every inode and handle in a directory with the same contents. */
export interface FsState {
  version: 1;
  initialized: boolean;
  /** The negotiated protocol minor version and INIT flags. */
  minor: number;
  flags: number;
  nextNodeid: number;
  nextFh: number;
  /** Paths are relative to the shared directory, as arrays of base64 components; null: not reachable (deleted). */
  inodes: { nodeid: number; nlookup: number; type: number; path: string[] | null }[];
  handles: { fh: number; nodeid: number; kind: "file" | "dir"; flags: number; path: string[] | null }[];
}

export class PassthroughFs {
  readonly root: string;
  readonly #rootFd: number;
  /** The shared directory's real path as the kernel prints it (readlink of /proc/self/fd). */
  readonly #rootPath: string;
  readonly #inodes = new Map<number, Inode>();
  readonly #byIdentity = new Map<string, Inode>();
  readonly #handles = new Map<number, Handle>();
  #nextNodeid = FUSE_ROOT_ID + 1;
  #nextFh = 1;
  readonly #valid: Validity;
  readonly #maxInodes: number;
  readonly #maxHandles: number;
  readonly readonly: boolean;
  #closed = false;
  /** Protocol state, kept here so it migrates with the tables. */
  initialized = false;
  minor = 0;
  flags = 0;

  constructor(root: string, o: PassthroughOptions = {}) {
    this.root = root;
    const secs = o.cacheSeconds ?? 1;
    this.#valid = { sec: Math.floor(secs), nsec: Math.round((secs % 1) * 1e9) };
    this.#maxInodes = o.maxInodes ?? 65536;
    this.#maxHandles = o.maxHandles ?? 16384;
    this.readonly = !!o.readonly;
    this.#rootFd = openSync(root, O_PATH | O_DIRECTORY | O_CLOEXEC);
    try {
      const st = fstatSync(this.#rootFd, { bigint: true });
      this.#rootPath = readlinkSync(procPath(this.#rootFd), "utf8");
      const rootInode: Inode = {
        nodeid: FUSE_ROOT_ID,
        fd: this.#rootFd,
        dev: st.dev,
        ino: st.ino,
        type: S_IFDIR,
        nlookup: 1,
      };
      this.#inodes.set(FUSE_ROOT_ID, rootInode);
      this.#byIdentity.set(`${st.dev}:${st.ino}`, rootInode);
    } catch (e) {
      closeSync(this.#rootFd);
      throw e;
    }
  }

  get inodeCount(): number {
    return this.#inodes.size;
  }

  get handleCount(): number {
    return this.#handles.size;
  }

  /** Lookup count of an inode (tests), or undefined when it is not in the table. */
  lookupCount(nodeid: number): number | undefined {
    return this.#inodes.get(nodeid)?.nlookup;
  }

  // ---- tables ------------------------------------------------------------------------------

  #inode(nodeid: bigint | number): Inode {
    const n = typeof nodeid === "bigint" ? (nodeid > BigInt(Number.MAX_SAFE_INTEGER) ? -1 : Number(nodeid)) : nodeid;
    const i = this.#inodes.get(n);
    if (!i) throw new FsError(ESTALE, `no inode ${nodeid}`);
    if (i.fd < 0) throw new FsError(ESTALE, `inode ${nodeid} did not survive the migration`);
    return i;
  }

  #dir(nodeid: bigint | number): Inode {
    const i = this.#inode(nodeid);
    if (i.type !== S_IFDIR) throw new FsError(ENOTDIR, `inode ${nodeid} is not a directory`);
    return i;
  }

  #handle(fh: bigint, kind: "file" | "dir"): Handle {
    const h = fh > BigInt(Number.MAX_SAFE_INTEGER) ? undefined : this.#handles.get(Number(fh));
    if (!h || h.kind !== kind) throw new FsError(EBADF, `no ${kind} handle ${fh}`);
    if (h.fd < 0) throw new FsError(EBADF, `handle ${fh} did not survive the migration`);
    return h;
  }

  #writable(): void {
    if (this.readonly) throw new FsError(30 /* EROFS */, "read-only export");
  }

  /**
   * Adds one lookup to the inode behind `fd` (an O_PATH fd we opened), creating it if new;
   * takes ownership of `fd` (closed when the inode already existed).
   */
  #adopt(fd: number): { inode: Inode; st: BigIntStats } {
    let st: BigIntStats;
    try {
      st = fstatSync(fd, { bigint: true });
    } catch (e) {
      closeSync(fd);
      throw e;
    }
    const key = `${st.dev}:${st.ino}`;
    const known = this.#byIdentity.get(key);
    if (known && known.fd >= 0) {
      closeSync(fd);
      known.nlookup++;
      return { inode: known, st };
    }
    if (this.#inodes.size >= this.#maxInodes) {
      closeSync(fd);
      throw new FsError(ENFILE, `inode table full (${this.#maxInodes})`);
    }
    const inode: Inode = {
      nodeid: this.#nextNodeid++,
      fd,
      dev: st.dev,
      ino: st.ino,
      type: Number(st.mode) & S_IFMT,
      nlookup: 1,
    };
    this.#inodes.set(inode.nodeid, inode);
    this.#byIdentity.set(key, inode);
    return { inode, st };
  }

  #entry(inode: Inode, st: BigIntStats): EntryOut {
    return {
      nodeid: inode.nodeid,
      generation: 0,
      entryValid: this.#valid,
      attrValid: this.#valid,
      attr: attrOf(st),
    };
  }

  #drop(inode: Inode): void {
    this.#inodes.delete(inode.nodeid);
    const key = `${inode.dev}:${inode.ino}`;
    if (this.#byIdentity.get(key) === inode) this.#byIdentity.delete(key);
    if (inode.fd >= 0) closeSync(inode.fd);
  }

  /** The host path of an fd if it is inside the shared directory (for readlink, link, migration). */
  #hostPath(fd: number): string | null {
    let p: string;
    try {
      p = readlinkSync(procPath(fd), "utf8");
    } catch {
      return null;
    }
    if (p.endsWith(" (deleted)")) return null;
    if (p === this.#rootPath) return p;
    const prefix = this.#rootPath.endsWith("/") ? this.#rootPath : `${this.#rootPath}/`;
    return p.startsWith(prefix) ? p : null;
  }

  // ---- operations --------------------------------------------------------------------------

  validity(): Validity {
    return this.#valid;
  }

  lookup(parent: bigint, name: Uint8Array): EntryOut {
    const p = this.#dir(parent);
    const path = procPath(p.fd, name);
    // lstat first: a miss costs no exception, and a file we already hold needs no open. Our
    // O_PATH fd keeps a known file's inode number from being reused, so (dev, ino) is the file.
    const st = lstatSync(path, { bigint: true, throwIfNoEntry: false });
    if (!st) throw new FsError(ENOENT, "no such entry");
    const known = this.#byIdentity.get(`${st.dev}:${st.ino}`);
    if (known && known.fd >= 0 && (Number(st.mode) & S_IFMT) === known.type) {
      known.nlookup++;
      return this.#entry(known, st);
    }
    const { inode, st: now } = this.#adopt(openSync(path, O_PATH | O_NOFOLLOW | O_CLOEXEC));
    return this.#entry(inode, now);
  }

  forget(nodeid: bigint, nlookup: bigint): void {
    if (nodeid === BigInt(FUSE_ROOT_ID) || nodeid > BigInt(Number.MAX_SAFE_INTEGER)) return;
    const i = this.#inodes.get(Number(nodeid));
    if (!i) return;
    const n = nlookup > BigInt(i.nlookup) ? i.nlookup : Number(nlookup);
    i.nlookup -= n;
    if (i.nlookup <= 0) this.#drop(i);
  }

  getattr(nodeid: bigint, fh: bigint | null): FuseAttr {
    if (fh !== null) {
      const h = this.#handles.get(Number(fh));
      if (h && h.fd >= 0) return attrOf(fstatSync(h.fd, { bigint: true }));
    }
    return attrOf(fstatSync(this.#inode(nodeid).fd, { bigint: true }));
  }

  setattr(nodeid: bigint, s: SetattrIn): FuseAttr {
    this.#writable();
    const inode = this.#inode(nodeid);
    const h = s.valid & FATTR_FH ? this.#handles.get(Number(s.fh)) : undefined;
    const handleFd = h && h.kind === "file" && h.fd >= 0 ? h.fd : -1;
    const isLink = inode.type === S_IFLNK;
    const path = procPath(inode.fd);
    if (s.valid & FATTR_MODE) {
      if (isLink) throw new FsError(95 /* EOPNOTSUPP */, "chmod of a symlink");
      if (handleFd >= 0) fchmodSync(handleFd, s.mode & 0o7777);
      else this.#withFd(inode, (fd) => fchmodSync(fd, s.mode & 0o7777));
    }
    if (s.valid & (FATTR_UID | FATTR_GID)) {
      const st = fstatSync(inode.fd, { bigint: true });
      const uid = s.valid & FATTR_UID ? s.uid : Number(st.uid);
      const gid = s.valid & FATTR_GID ? s.gid : Number(st.gid);
      if (isLink) {
        const hp = this.#hostPath(inode.fd);
        if (!hp) throw new FsError(ESTALE, "symlink no longer reachable");
        lchownSync(hp, uid, gid);
      } else this.#withFd(inode, (fd) => fchownSync(fd, uid, gid));
    }
    if (s.valid & FATTR_SIZE) {
      if (inode.type !== S_IFREG) throw new FsError(inode.type === S_IFDIR ? EISDIR : EINVAL, "truncate of a non-file");
      if (s.size > BigInt(Number.MAX_SAFE_INTEGER)) throw new FsError(27 /* EFBIG */, `size ${s.size}`);
      if (handleFd >= 0) ftruncateSync(handleFd, Number(s.size));
      else {
        const fd = openSync(path, O_WRONLY | O_CLOEXEC);
        try {
          ftruncateSync(fd, Number(s.size));
        } finally {
          closeSync(fd);
        }
      }
    }
    if (s.valid & (FATTR_ATIME | FATTR_MTIME | FATTR_ATIME_NOW | FATTR_MTIME_NOW)) {
      const st = fstatSync(inode.fd, { bigint: true });
      const now = Date.now() / 1000;
      const at =
        s.valid & FATTR_ATIME_NOW
          ? now
          : s.valid & FATTR_ATIME
            ? Number(s.atime) + s.atimensec / 1e9
            : Number(st.atimeNs) / 1e9;
      const mt =
        s.valid & FATTR_MTIME_NOW
          ? now
          : s.valid & FATTR_MTIME
            ? Number(s.mtime) + s.mtimensec / 1e9
            : Number(st.mtimeNs) / 1e9;
      if (isLink) {
        const hp = this.#hostPath(inode.fd);
        if (!hp) throw new FsError(ESTALE, "symlink no longer reachable");
        lutimesSync(hp, at, mt);
      } else if (handleFd >= 0) futimesSync(handleFd, at, mt);
      else this.#withFd(inode, (fd) => futimesSync(fd, at, mt));
    }
    return attrOf(fstatSync(inode.fd, { bigint: true }));
  }

  /** Runs `fn` on a real (not O_PATH) fd of a file or directory inode, opened for it alone. */
  #withFd<T>(inode: Inode, fn: (fd: number) => T): T {
    if (inode.type !== S_IFREG && inode.type !== S_IFDIR) throw new FsError(EPERM, "not a file or directory");
    const fd = openSync(procPath(inode.fd), (inode.type === S_IFDIR ? O_DIRECTORY : 0) | O_CLOEXEC);
    try {
      return fn(fd);
    } finally {
      closeSync(fd);
    }
  }

  readlink(nodeid: bigint): Buffer {
    const inode = this.#inode(nodeid);
    if (inode.type !== S_IFLNK) throw new FsError(EINVAL, "not a symlink");
    // readlink of /proc/self/fd/N names the link itself: read its target through its real path.
    const hp = this.#hostPath(inode.fd);
    if (!hp) throw new FsError(ESTALE, "symlink no longer reachable");
    const target = readlinkSync(hp, { encoding: "buffer" });
    // The path may have been replaced by something else since: only answer for the same inode.
    const st = fstatSync(inode.fd, { bigint: true });
    if (st.ino !== inode.ino) throw new FsError(ESTALE, "symlink moved");
    return target;
  }

  /**
   * Gives a new file to the guest process that created it (the request's uid/gid), as virtiofsd
   * does by switching its fsuid: only when we run as root and the caller is someone else.
   * `path` names the new object in its parent; lchown never follows it.
   */
  #own(path: Buffer | number, owner: Owner | undefined): void {
    if (!owner || !RUNS_AS_ROOT || (owner.uid === 0 && owner.gid === 0)) return;
    if (typeof path === "number") fchownSync(path, owner.uid, owner.gid);
    else lchownSync(path, owner.uid, owner.gid);
  }

  mkdir(parent: bigint, name: Uint8Array, mode: number, umask: number, owner?: Owner): EntryOut {
    this.#writable();
    const p = this.#dir(parent);
    const path = procPath(p.fd, name);
    mkdirSync(path, { mode: mode & ~umask & 0o7777 });
    this.#own(path, owner);
    return this.lookup(parent, name);
  }

  /** Regular files only: FIFOs and sockets need mknodat, device nodes would reach outside. */
  mknod(parent: bigint, name: Uint8Array, mode: number, umask: number, owner?: Owner): EntryOut {
    this.#writable();
    if ((mode & S_IFMT) !== S_IFREG && (mode & S_IFMT) !== 0) throw new FsError(EPERM, "only regular files");
    const p = this.#dir(parent);
    const fd = openSync(
      procPath(p.fd, name),
      O_CREAT | O_EXCL | O_WRONLY | O_NOFOLLOW | O_CLOEXEC,
      mode & ~umask & 0o7777,
    );
    try {
      this.#own(fd, owner);
    } finally {
      closeSync(fd);
    }
    return this.lookup(parent, name);
  }

  symlink(parent: bigint, name: Uint8Array, target: Uint8Array, owner?: Owner): EntryOut {
    this.#writable();
    const p = this.#dir(parent);
    const path = procPath(p.fd, name);
    symlinkSync(Buffer.from(target), path);
    this.#own(path, owner);
    return this.lookup(parent, name);
  }

  link(oldnodeid: bigint, parent: bigint, name: Uint8Array): EntryOut {
    this.#writable();
    const old = this.#inode(oldnodeid);
    if (old.type === S_IFDIR) throw new FsError(EPERM, "hard link to a directory");
    const p = this.#dir(parent);
    const hp = this.#hostPath(old.fd);
    if (!hp) throw new FsError(ESTALE, "source no longer reachable");
    linkSync(hp, procPath(p.fd, name));
    return this.lookup(parent, name);
  }

  unlink(parent: bigint, name: Uint8Array): void {
    this.#writable();
    unlinkSync(procPath(this.#dir(parent).fd, name));
  }

  rmdir(parent: bigint, name: Uint8Array): void {
    this.#writable();
    rmdirSync(procPath(this.#dir(parent).fd, name));
  }

  rename(parent: bigint, name: Uint8Array, newdir: bigint, newname: Uint8Array, flags: number): void {
    this.#writable();
    // renameat2's NOREPLACE/EXCHANGE have no atomic equivalent here: the guest's kernel then
    // stops sending RENAME2 and tells its caller EINVAL.
    if (flags !== 0) throw new FsError(ENOSYS, `rename flags 0x${flags.toString(16)}`);
    renameSync(procPath(this.#dir(parent).fd, name), procPath(this.#dir(newdir).fd, newname));
  }

  #newHandle(h: Omit<Handle, "fh">): number {
    if (this.#handles.size >= this.#maxHandles) {
      if (h.fd >= 0) closeSync(h.fd);
      throw new FsError(EMFILE, `handle table full (${this.#maxHandles})`);
    }
    const fh = this.#nextFh++;
    this.#handles.set(fh, { ...h, fh });
    return fh;
  }

  static sanitizeOpenFlags(flags: number): number {
    const f = flags & OPEN_FLAGS_KEPT;
    if ((f & O_ACCMODE) === O_ACCMODE) throw new FsError(EINVAL, "bad access mode");
    return f;
  }

  open(nodeid: bigint, flags: number): number {
    const inode = this.#inode(nodeid);
    if (inode.type === S_IFDIR) throw new FsError(EISDIR, "open of a directory");
    if (inode.type !== S_IFREG) throw new FsError(EPERM, "only regular files can be opened");
    const f = PassthroughFs.sanitizeOpenFlags(flags);
    if ((f & O_ACCMODE) !== 0 || f & O_TRUNC) this.#writable();
    const fd = openSync(procPath(inode.fd), f | O_CLOEXEC);
    return this.#newHandle({ kind: "file", fd, nodeid: inode.nodeid, flags: f, entries: null });
  }

  create(
    parent: bigint,
    name: Uint8Array,
    flags: number,
    mode: number,
    umask: number,
    owner?: Owner,
  ): { entry: EntryOut; fh: number } {
    this.#writable();
    const p = this.#dir(parent);
    const f = PassthroughFs.sanitizeOpenFlags(flags);
    const path = procPath(p.fd, name);
    // O_NOFOLLOW: an existing symlink under this name is never followed (it could point anywhere).
    // O_EXCL first, so we know whether the file is new (only a new one is given to the caller).
    // O_NONBLOCK: an existing FIFO under this name must not block the queue (it is refused
    // below); on a regular file the flag changes nothing.
    let fd: number;
    let isNew = true;
    try {
      fd = openSync(path, f | O_CREAT | O_EXCL | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC, mode & ~umask & 0o7777);
    } catch (e) {
      if ((e as { code?: string }).code !== "EEXIST" || flags & O_EXCL) throw e;
      fd = openSync(path, f | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC);
      isNew = false;
    }
    let inode: Inode;
    let created: BigIntStats;
    try {
      const st = fstatSync(fd, { bigint: true });
      if ((Number(st.mode) & S_IFMT) !== S_IFREG) throw new FsError(EPERM, "not a regular file");
      if (isNew) this.#own(fd, owner);
      ({ inode, st: created } = this.#adopt(openSync(procPath(fd), O_PATH | O_CLOEXEC)));
    } catch (e) {
      closeSync(fd);
      throw e;
    }
    let fh: number;
    try {
      fh = this.#newHandle({ kind: "file", fd, nodeid: inode.nodeid, flags: f & ~O_TRUNC, entries: null });
    } catch (e) {
      this.forget(BigInt(inode.nodeid), 1n);
      throw e;
    }
    return { entry: this.#entry(inode, created), fh };
  }

  opendir(nodeid: bigint): number {
    const inode = this.#dir(nodeid);
    const fd = openSync(procPath(inode.fd), O_PATH | O_DIRECTORY | O_CLOEXEC);
    return this.#newHandle({ kind: "dir", fd, nodeid: inode.nodeid, flags: 0, entries: null });
  }

  release(fh: bigint, dir: boolean): void {
    const h = fh > BigInt(Number.MAX_SAFE_INTEGER) ? undefined : this.#handles.get(Number(fh));
    if (!h || h.kind !== (dir ? "dir" : "file")) throw new FsError(EBADF, `no handle ${fh}`);
    this.#handles.delete(h.fh);
    if (h.fd >= 0) closeSync(h.fd);
  }

  /** Reads into `views` (guest memory) from `offset`; returns the bytes read. */
  read(fh: bigint, views: Uint8Array[], offset: number): number {
    const h = this.#handle(fh, "file");
    if ((h.flags & O_ACCMODE) === O_WRONLY) throw new FsError(EBADF, "handle is write-only");
    if (views.length === 0) return 0;
    return readvSync(h.fd, views, offset);
  }

  /** Writes `views` (guest memory) at `offset`; returns the bytes written. */
  write(fh: bigint, views: Uint8Array[], offset: number): number {
    const h = this.#handle(fh, "file");
    if ((h.flags & O_ACCMODE) === 0) throw new FsError(EBADF, "handle is read-only");
    let total = 0;
    for (const v of views) total += v.byteLength;
    let done = 0;
    let pending = views;
    while (done < total) {
      const n = writevSync(h.fd, pending, offset + done);
      if (n <= 0) break;
      done += n;
      pending = skipBytes(pending, n);
    }
    return done;
  }

  flush(fh: bigint): void {
    this.#handle(fh, "file");
  }

  fsync(fh: bigint, datasync: boolean, dir: boolean): void {
    const h = this.#handle(fh, dir ? "dir" : "file");
    if (dir) {
      const fd = openSync(procPath(h.fd), O_DIRECTORY | O_CLOEXEC);
      try {
        fsyncSync(fd);
      } finally {
        closeSync(fd);
      }
    } else if (datasync) fdatasyncSync(h.fd);
    else fsyncSync(h.fd);
  }

  statfs(nodeid: bigint): StatfsOut {
    const i = this.#inode(nodeid);
    const s = statfsSync(procPath(i.type === S_IFDIR ? i.fd : this.#rootFd), { bigint: true });
    return {
      blocks: s.blocks,
      bfree: s.bfree,
      bavail: s.bavail,
      files: s.files,
      ffree: s.ffree,
      bsize: Number(s.bsize),
      namelen: 255,
      frsize: Number(s.bsize),
    };
  }

  /**
   * READDIR / READDIRPLUS: entries from index `offset` of the listing (taken afresh at offset
   * 0) that fit in `size` bytes. With `plus`, each entry but "." and ".." is looked up (one
   * lookup the guest will forget), and only once it is known to fit.
   */
  readdir(fh: bigint, offset: number, size: number, plus: boolean): Uint8Array {
    const h = this.#handle(fh, "dir");
    if (offset === 0 || !h.entries) {
      const list = readdirSync(procPath(h.fd), { withFileTypes: true, encoding: "buffer" }) as Dirent<Buffer>[];
      h.entries = [
        { name: DOT, type: 4 },
        { name: DOTDOT, type: 4 },
        ...list.map((d) => ({ name: d.name, type: direntType(d) })),
      ];
    }
    const entries = h.entries;
    const out = new Uint8Array(size);
    const view = new DataView(out.buffer);
    let pos = 0;
    const dirInode = this.#inodes.get(h.nodeid);
    for (let i = offset; i < entries.length; i++) {
      const e = entries[i] as DirEntry;
      const need = plus ? direntPlusSize(e.name.length) : direntSize(e.name.length);
      if (pos + need > size) break;
      const special = e.name === DOT || e.name === DOTDOT;
      let ino = special ? this.#specialIno(h, e.name === DOT) : 0n;
      let type = e.type;
      if (plus) {
        let entry: EntryOut | null = null;
        if (!special && dirInode && dirInode.fd >= 0 && isComponent(e.name)) {
          try {
            entry = this.lookup(BigInt(h.nodeid), e.name);
          } catch {
            entry = null; // gone since the listing: skip it
          }
        }
        if (!special && !entry) continue;
        if (entry) {
          writeEntryOut(view, pos, entry);
          ino = entry.attr.ino;
          type = (entry.attr.mode & S_IFMT) >> 12;
        } else {
          // "." and "..": no node id (the kernel does nothing with a 0 entry).
          out.fill(0, pos, pos + ENTRY_OUT_SIZE);
        }
        pos += ENTRY_OUT_SIZE;
      } else if (!special) {
        const st = statName(procPath(h.fd, e.name));
        if (!st) continue; // gone since the listing
        ino = st.ino;
      }
      pos += writeDirent(out, pos, { ino, off: i + 1, type, name: e.name });
    }
    return out.subarray(0, pos);
  }

  /** d_ino of "." and "..": the directory's own, its parent's (the root's own at the top: nothing above it shows). */
  #specialIno(h: Handle, dot: boolean): bigint {
    try {
      if (dot || h.nodeid === FUSE_ROOT_ID) return fstatSync(h.fd, { bigint: true }).ino;
      return statName(procPath(h.fd, DOTDOT))?.ino ?? 0n;
    } catch {
      return 0n;
    }
  }

  /** DESTROY or a second INIT: every handle and inode but the root goes. */
  reset(): void {
    for (const h of this.#handles.values()) if (h.fd >= 0) closeSync(h.fd);
    this.#handles.clear();
    for (const i of [...this.#inodes.values()]) if (i.nodeid !== FUSE_ROOT_ID) this.#drop(i);
    this.initialized = false;
  }

  close(): void {
    if (this.#closed) return;
    this.reset();
    this.#closed = true;
    closeSync(this.#rootFd);
  }

  // ---- migration ---------------------------------------------------------------------------

  #relative(fd: number): string[] | null {
    const p = this.#hostPath(fd);
    if (p === null) return null;
    if (p === this.#rootPath) return [];
    return p
      .slice(this.#rootPath.length + (this.#rootPath.endsWith("/") ? 0 : 1))
      .split("/")
      .map((c) => Buffer.from(c).toString("base64"));
  }

  saveState(): FsState {
    return {
      version: 1,
      initialized: this.initialized,
      minor: this.minor,
      flags: this.flags,
      nextNodeid: this.#nextNodeid,
      nextFh: this.#nextFh,
      inodes: [...this.#inodes.values()]
        .filter((i) => i.nodeid !== FUSE_ROOT_ID)
        .map((i) => ({
          nodeid: i.nodeid,
          nlookup: i.nlookup,
          type: i.type,
          path: i.fd >= 0 ? this.#relative(i.fd) : null,
        })),
      handles: [...this.#handles.values()].map((h) => ({
        fh: h.fh,
        nodeid: h.nodeid,
        kind: h.kind,
        flags: h.flags,
        path: h.fd >= 0 ? this.#relative(h.fd) : null,
      })),
    };
  }

  /** Opens a saved path component by component from the root, never following a symlink. */
  #walk(path: string[], flags: number): number {
    let dir = -1;
    try {
      for (let k = 0; k < path.length; k++) {
        const name = Buffer.from(path[k] as string, "base64");
        if (!isComponent(name)) throw new FsError(EINVAL, "bad path component in the state");
        const last = k === path.length - 1;
        const fd = openSync(
          procPath(dir < 0 ? this.#rootFd : dir, name),
          (last ? flags : O_PATH | O_DIRECTORY) | O_NOFOLLOW | O_CLOEXEC,
        );
        if (dir >= 0) closeSync(dir);
        dir = fd;
      }
      if (dir < 0) return openSync(procPath(this.#rootFd), flags | O_CLOEXEC);
      return dir;
    } catch (e) {
      if (dir >= 0) closeSync(dir);
      throw e;
    }
  }

  /**
   * Replaces the tables with a migrated state. Inodes and handles whose path is gone (or is
   * now something else) become stale: the guest gets ESTALE / EBADF for them, everything else
   * goes on. Returns how many were stale.
   */
  loadState(s: FsState): { staleInodes: number; staleHandles: number } {
    this.reset();
    let staleInodes = 0;
    let staleHandles = 0;
    for (const si of s.inodes) {
      let fd = -1;
      let st: BigIntStats | null = null;
      if (si.path && si.path.length > 0) {
        try {
          fd = this.#walk(si.path, O_PATH);
          st = fstatSync(fd, { bigint: true });
          if ((Number(st.mode) & S_IFMT) !== si.type) {
            closeSync(fd);
            fd = -1;
          }
        } catch {
          if (fd >= 0) closeSync(fd);
          fd = -1;
        }
      }
      if (fd < 0) staleInodes++;
      const inode: Inode = {
        nodeid: si.nodeid,
        fd,
        dev: st?.dev ?? 0n,
        ino: st?.ino ?? 0n,
        type: si.type,
        nlookup: si.nlookup,
      };
      this.#inodes.set(si.nodeid, inode);
      if (fd >= 0) {
        const key = `${inode.dev}:${inode.ino}`;
        if (!this.#byIdentity.has(key)) this.#byIdentity.set(key, inode);
      }
    }
    for (const sh of s.handles) {
      let fd = -1;
      if (sh.path) {
        try {
          fd =
            sh.kind === "dir"
              ? this.#walk(sh.path, O_PATH | O_DIRECTORY)
              : // O_NONBLOCK: whatever the path names now, opening it must not block (a FIFO is refused below).
                this.#walk(sh.path, (PassthroughFs.sanitizeOpenFlags(sh.flags) & ~O_TRUNC) | O_NONBLOCK);
          if (sh.kind === "file" && (Number(fstatSync(fd, { bigint: true }).mode) & S_IFMT) !== S_IFREG) {
            closeSync(fd);
            fd = -1;
          }
        } catch {
          if (fd >= 0) closeSync(fd);
          fd = -1;
        }
      }
      if (fd < 0) staleHandles++;
      this.#handles.set(sh.fh, { fh: sh.fh, kind: sh.kind, fd, nodeid: sh.nodeid, flags: sh.flags, entries: null });
    }
    this.#nextNodeid = Math.max(s.nextNodeid, this.#nextNodeid);
    this.#nextFh = Math.max(s.nextFh, this.#nextFh);
    this.initialized = s.initialized;
    this.minor = s.minor;
    this.flags = s.flags;
    return { staleInodes, staleHandles };
  }
}

/** The stat of a name itself (never what a symlink points to), or null when it is gone. */
function statName(path: Buffer): BigIntStats | null {
  try {
    return lstatSync(path, { bigint: true, throwIfNoEntry: false }) ?? null;
  } catch {
    return null;
  }
}

function skipBytes(views: Uint8Array[], n: number): Uint8Array[] {
  const out: Uint8Array[] = [];
  for (const v of views) {
    if (n >= v.byteLength) {
      n -= v.byteLength;
      continue;
    }
    out.push(n > 0 ? new Uint8Array(v.buffer, v.byteOffset + n, v.byteLength - n) : v);
    n = 0;
  }
  return out;
}
