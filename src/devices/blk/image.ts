/**
 * A raw image (a regular file or a block device), opened by each queue worker on its own fd (one owner per fd; fdatasync on
 * any of them flushes the file). Whole-range pread/pwrite with EINTR and short transfers
 * handled; with O_DIRECT, callers pass aligned buffers (see DIRECT_ALIGNMENT and
 * AlignedBuffer) — the device switches a request to a bounce buffer when the guest's are not.
 */
import { EINTR, SysError } from "../../sys/errors.js";
import type { Fd } from "../../sys/fd.js";
import { fallocate, fdatasyncRaw, fstat, openFd, preadRaw, preadvRaw, pwriteRaw, pwritevRaw } from "../../sys/io.js";
import { IOR, ioctlRaw } from "../../sys/ioctl.js";
import { addressOf } from "../../sys/mapping.js";
import { FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, O_DIRECT, O_RDONLY, O_RDWR } from "../../sys/memfd.js";

/** Buffer address, length and file offset alignment we require for O_DIRECT. */
export const DIRECT_ALIGNMENT = 512;
const FALLOC_FL_ZERO_RANGE = 0x10;
const EIO = 5;
const EOPNOTSUPP = 95;
const S_IFMT = 0o170000;
const S_IFBLK = 0o060000;
/** _IOR(0x12, 114, size_t): a block device's size in bytes. */
const BLKGETSIZE64 = IOR(0x12, 114, 8);

export interface ImageOptions {
  readonly?: boolean;
  direct?: boolean;
}

export class BlockImage implements Disposable {
  readonly fd: Fd;
  readonly readonly: boolean;
  readonly direct: boolean;

  private constructor(fd: Fd, readonly: boolean, direct: boolean) {
    this.fd = fd;
    this.readonly = readonly;
    this.direct = direct;
  }

  static open(path: string, o: ImageOptions = {}): BlockImage {
    const flags = (o.readonly ? O_RDONLY : O_RDWR) | (o.direct ? O_DIRECT : 0);
    const fd = openFd(path, flags, 0);
    return new BlockImage(fd, !!o.readonly, !!o.direct);
  }

  /** Size of the image in bytes: the file's, or the block device's (BLKGETSIZE64). */
  size(): number {
    const [size, mode] = fstat(this.fd);
    if ((mode & S_IFMT) !== S_IFBLK) return size;
    const out = new BigUint64Array(1);
    const r = ioctlRaw(this.fd, BLKGETSIZE64, out);
    if (r < 0) throw new SysError("ioctl", -r, "BLKGETSIZE64");
    const bytes = out[0] as bigint;
    if (bytes > BigInt(Number.MAX_SAFE_INTEGER)) throw new RangeError(`block device of ${bytes} bytes`);
    return Number(bytes);
  }

  /** Fills `view` from `pos`; bytes past the end of the file read as zero. */
  readAt(view: Uint8Array, pos: number): void {
    let done = 0;
    while (done < view.length) {
      const n = preadRaw(this.fd, view.subarray(done), pos + done);
      if (n === -EINTR) continue;
      if (n < 0) throw new SysError("pread", -n);
      if (n === 0) {
        view.fill(0, done);
        return;
      }
      done += n;
    }
  }

  writeAt(view: Uint8Array, pos: number): void {
    let done = 0;
    while (done < view.length) {
      const n = pwriteRaw(this.fd, view.subarray(done), pos + done);
      if (n === -EINTR) continue;
      if (n < 0) throw new SysError("pwrite", -n);
      if (n === 0) throw new SysError("pwrite", EIO, "wrote nothing");
      done += n;
    }
  }

  /**
   * Reads the image at `pos` into `views` in order, with as few system calls as the kernel
   * allows (preadv, up to 1024 views per call); past the end of the file reads as zeros.
   */
  readvAt(views: Uint8Array[], pos: number): void {
    this.#vectored(views, pos, true);
  }

  /** Writes `views` in order to the image at `pos` (pwritev). */
  writevAt(views: Uint8Array[], pos: number): void {
    this.#vectored(views, pos, false);
  }

  #vectored(views: Uint8Array[], pos: number, read: boolean): void {
    for (const c = new VectoredTransfer(views, pos, read); !c.done; ) {
      const batch = c.batch();
      c.step(read ? preadvRaw(this.fd, batch, c.at) : pwritevRaw(this.fd, batch, c.at), batch);
    }
  }

  flush(): void {
    for (;;) {
      const r = fdatasyncRaw(this.fd);
      if (r === -EINTR) continue;
      if (r < 0) throw new SysError("fdatasync", -r);
      return;
    }
  }

  /** Deallocates the range (reads then return zeroes); a file system without holes is fine too. */
  discard(pos: number, len: number): void {
    try {
      fallocate(this.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, pos, len);
    } catch (e) {
      // Discard is advisory (virtio: the device MAY deallocate).
      if (!(e instanceof SysError && e.errno === EOPNOTSUPP)) throw e;
    }
  }

  /** Makes the range read as zeroes: a hole when allowed, else ZERO_RANGE, else written zeroes. */
  writeZeroes(pos: number, len: number, unmap: boolean, scratch: () => Uint8Array): void {
    const mode = unmap ? FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE : FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE;
    try {
      fallocate(this.fd, mode, pos, len);
      return;
    } catch (e) {
      if (!(e instanceof SysError && e.errno === EOPNOTSUPP)) throw e;
    }
    const zeros = scratch();
    zeros.fill(0);
    for (let done = 0; done < len; ) {
      const n = Math.min(zeros.length, len - done);
      this.writeAt(zeros.subarray(0, n), pos + done);
      done += n;
    }
  }

  close(): void {
    this.fd.close();
  }

  [Symbol.dispose](): void {
    this.close();
  }
}

/** What an AlignedBuffer keeps between requests; anything larger is given back by shrink(). */
const ALIGNED_KEEP = 64 * 1024;

/**
 * A reusable buffer whose start is page-aligned in host memory (O_DIRECT bounce buffer), of at
 * most `max` bytes: a caller moves more data through it in chunks, never one buffer per request.
 */
export class AlignedBuffer {
  #buf = new Uint8Array(0);

  constructor(readonly max = 1 << 20) {}

  /** Bytes held now (for tests and stats). */
  get capacity(): number {
    return this.#buf.length;
  }

  /** A view of `len` (≤ max) bytes at a 4 KiB-aligned address (contents undefined). */
  get(len: number): Uint8Array {
    if (len > this.max) throw new RangeError(`bounce buffer of ${len} bytes asked for (at most ${this.max})`);
    if (this.#buf.length < len) {
      const cap = Math.min(this.max, Math.max(len, ALIGNED_KEEP));
      const raw = new ArrayBuffer(cap + 4096);
      // V8 never moves an ArrayBuffer's backing store, so the address stays aligned.
      const addr = Number(addressOf(raw) % 4096n);
      this.#buf = new Uint8Array(raw, (4096 - addr) % 4096, cap);
    }
    return this.#buf.subarray(0, len);
  }

  /** Gives a buffer grown past ALIGNED_KEEP back to the allocator (after a large request). */
  shrink(): void {
    if (this.#buf.length > ALIGNED_KEEP) this.#buf = new Uint8Array(0);
  }
}

/** True when a buffer can go to O_DIRECT as is. */
export function isDirectAligned(view: Uint8Array, pos: number): boolean {
  return (
    view.length % DIRECT_ALIGNMENT === 0 &&
    pos % DIRECT_ALIGNMENT === 0 &&
    Number(addressOf(view) % BigInt(DIRECT_ALIGNMENT)) === 0
  );
}

/**
 * Where a vectored transfer over `views` from file offset `at` stands: the next batch to hand
 * the kernel (≤ 1024 views, the first one cut past what is done), and the step past what a call
 * transferred (a short transfer may end inside a view). A read past the end of the file fills
 * the rest with zeros; a write that moves nothing is EIO.
 */
class VectoredTransfer {
  #i = 0;
  /** Bytes of views[#i] already done. */
  #skip = 0;
  done: boolean;

  constructor(
    readonly views: Uint8Array[],
    public at: number,
    readonly read: boolean,
  ) {
    this.done = views.length === 0;
  }

  batch(): Uint8Array[] {
    // The usual case, a request's views in one call from the start: no copy of the list.
    if (this.#i === 0 && this.#skip === 0 && this.views.length <= 1024) return this.views;
    const out: Uint8Array[] = [];
    for (let k = this.#i; k < this.views.length && out.length < 1024; k++) {
      const v = this.views[k] as Uint8Array;
      out.push(k === this.#i && this.#skip > 0 ? v.subarray(this.#skip) : v);
    }
    return out;
  }

  /** Takes the result of one preadv/pwritev of `batch` (bytes, or -errno). */
  step(n: number, batch: Uint8Array[]): void {
    if (n === -EINTR) return;
    if (n < 0) throw new SysError(this.read ? "preadv" : "pwritev", -n);
    if (n === 0) {
      if (!this.read) throw new SysError("pwritev", EIO, "wrote nothing");
      for (const v of batch) v.fill(0); // end of file
      for (let k = this.#i + batch.length; k < this.views.length; k++) (this.views[k] as Uint8Array).fill(0);
      this.done = true;
      return;
    }
    this.at += n;
    let left = n;
    while (left > 0 && this.#i < this.views.length) {
      const rest = (this.views[this.#i] as Uint8Array).length - this.#skip;
      if (left >= rest) {
        left -= rest;
        this.#i++;
        this.#skip = 0;
      } else {
        this.#skip += left;
        left = 0;
      }
    }
    this.done = this.#i >= this.views.length;
  }
}
