import { check, EAGAIN, SysError, sys } from "./errors.js";
import { Fd } from "./fd.js";
import { native } from "./native.js";
import { READABLE, Watch, WRITABLE } from "./poller.js";
import { listenUnixPath, type OwnedSocketPath, removeOwnedSocket, type SocketPathOptions } from "./unix-path.js";

export const MAX_FDS_PER_MESSAGE = 8;
/** What send() returns when the bytes went out at once. */
const SENT: Promise<void> = Promise.resolve();
const RECV_BUFFER = 64 * 1024;

/** What one recvmsg() got: bytes, the fds that rode on them, and whether fds were dropped. */
export interface Chunk {
  data: Uint8Array;
  fds: Fd[];
  /** The kernel dropped fds (more than we had room for): a protocol error for the caller. */
  fdsTruncated: boolean;
}

export type ChunkHandler = (chunk: Chunk) => void;
export type EndHandler = (error?: Error) => void;

interface PendingSend {
  data: Uint8Array;
  fds: number[] | null;
  resolve: () => void;
  reject: (e: Error) => void;
}

/**
 * A connected AF_UNIX stream socket carrying bytes and fds (SCM_RIGHTS, at most 8 per send).
 * Non-blocking; sends are queued in order and survive partial writes; receiving is driven by
 * the thread's event loop. Received fds are owned by the receiver (close-on-exec).
 */
export class UnixSocket implements Disposable {
  readonly fd: Fd;
  #queue: PendingSend[] = [];
  // One watch for both directions: libuv allows a single poll handle per fd (a second
  // uv_poll_init on the same fd fails with EEXIST), so reading and waiting for writability
  // share it and its event mask follows what is wanted.
  #watch: Watch | null = null;
  #onChunk: ChunkHandler | null = null;
  #wantWrite = false;
  #recvBuf = new Uint8Array(RECV_BUFFER);
  #onEnd: EndHandler | null = null;
  #ended = false;

  constructor(fd: Fd) {
    this.fd = fd;
  }

  static connect(path: string): UnixSocket {
    return new UnixSocket(new Fd(sys(() => native.unixConnect(path), path)));
  }

  static pair(): [UnixSocket, UnixSocket] {
    const [a, b] = sys(() => native.socketpair());
    return [new UnixSocket(new Fd(a)), new UnixSocket(new Fd(b))];
  }

  get closed(): boolean {
    return this.fd.closed;
  }

  /**
   * One sendmsg attempt: bytes sent (the fds go with the first byte), or null when the
   * socket buffer is full. Throws SysError on any other failure (EPIPE when the peer is gone).
   */
  trySend(data: Uint8Array, fds: readonly (Fd | number)[] = []): number | null {
    if (fds.length > MAX_FDS_PER_MESSAGE) throw new RangeError(`at most ${MAX_FDS_PER_MESSAGE} fds per message`);
    const n = native.sendmsg(this.fd.fd, data, fds.length ? fds.map(toNum) : null);
    if (n === -EAGAIN) return null;
    return check(n, "sendmsg");
  }

  /** Sends all of `data` with `fds`, after everything queued before it. */
  send(data: Uint8Array, fds: readonly (Fd | number)[] = []): Promise<void> {
    if (this.fd.closed) return Promise.reject(new SysError("sendmsg", 9 /* EBADF */, "socket closed"));
    if (fds.length > MAX_FDS_PER_MESSAGE)
      return Promise.reject(new RangeError(`at most ${MAX_FDS_PER_MESSAGE} fds per message`));
    if (this.#queue.length === 0) {
      // Nothing queued: one sendmsg now. Whole (the usual case for a control message) means
      // done, with no promise, closure or queue entry made for it.
      let n: number;
      try {
        n = native.sendmsg(this.fd.fd, data, fds.length ? fds.map(toNum) : null);
      } catch {
        n = -9; // EBADF, as #flush reports it
      }
      if (n === data.length) return SENT;
      if (n < 0 && n !== -EAGAIN) return Promise.reject(new SysError("sendmsg", -n));
      if (n > 0) {
        data = data.subarray(n);
        fds = []; // delivered with the first byte
      }
    }
    return new Promise((resolve, reject) => {
      this.#queue.push({ data, fds: fds.length ? fds.map(toNum) : null, resolve, reject });
      if (this.#queue.length === 1) this.#flush();
    });
  }

  #flush(): void {
    while (this.#queue.length > 0) {
      const head = this.#queue[0] as PendingSend;
      let n: number;
      try {
        n = native.sendmsg(this.fd.fd, head.data, head.fds);
      } catch (e) {
        n = -9;
        void e;
      }
      if (n === -EAGAIN) {
        if (!this.#wantWrite) {
          this.#wantWrite = true;
          this.#updateWatch();
        }
        return;
      }
      if (n < 0) {
        const err = new SysError("sendmsg", -n);
        for (const p of this.#queue.splice(0)) p.reject(err);
        break;
      }
      if (n < head.data.length) {
        head.data = head.data.subarray(n);
        head.fds = null; // already delivered with the first byte
        continue;
      }
      this.#queue.shift();
      head.resolve();
    }
    if (this.#wantWrite) {
      this.#wantWrite = false;
      this.#updateWatch();
    }
  }

  #updateWatch(): void {
    const events = (this.#onChunk ? READABLE : 0) | (this.#wantWrite ? WRITABLE : 0);
    if (events === 0 || this.fd.closed) {
      this.#watch?.close();
      this.#watch = null;
    } else if (this.#watch) {
      this.#watch.update(events);
    } else {
      this.#watch = new Watch(this.fd.fd, events, (ev, error) => this.#onReady(ev, error));
    }
  }

  #onReady(events: number, error: number): void {
    if (error) {
      if (this.#onChunk) this.#end(new SysError("poll", error));
      if (this.#wantWrite) this.#flush(); // sendmsg reports the real error to the senders
      return;
    }
    if (events & WRITABLE && this.#wantWrite) this.#flush();
    if (events & READABLE && this.#onChunk) this.#readAll();
  }

  /**
   * One recvmsg attempt into an internal buffer. null = nothing to read now; a chunk with
   * zero bytes and no fds = the peer closed its end.
   */
  tryReceive(): Chunk | null {
    const r = native.recvmsg(this.fd.fd, this.#recvBuf);
    if (typeof r === "number") {
      if (r === -EAGAIN) return null;
      check(r, "recvmsg");
      throw new Error("unreachable");
    }
    // [bytes, truncated, ...fds]; read by index (a rest pattern would copy the array once more).
    const a = r as number[];
    const fds: Fd[] = [];
    for (let i = 2; i < a.length; i++) fds.push(new Fd(a[i] as number));
    return { data: this.#recvBuf.slice(0, a[0] as number), fds, fdsTruncated: a[1] === 1 };
  }

  /**
   * Delivers every chunk to `onChunk` from the event loop until the peer closes or an error;
   * then `onEnd` runs once (with the error, if any). Zero-length end-of-stream is not a chunk.
   */
  startReceiving(onChunk: ChunkHandler, onEnd: EndHandler): void {
    if (this.#onChunk) throw new Error("already receiving");
    this.#onEnd = onEnd;
    this.#onChunk = onChunk;
    this.#updateWatch();
  }

  #readAll(): void {
    for (;;) {
      const onChunk = this.#onChunk;
      if (onChunk === null) return; // handler closed or paused us
      let chunk: Chunk | null;
      try {
        chunk = this.tryReceive();
      } catch (e) {
        this.#end(e as Error);
        return;
      }
      if (chunk === null) return;
      if (chunk.data.length === 0 && chunk.fds.length === 0) {
        this.#end();
        return;
      }
      onChunk(chunk);
      // A short read drained what was there: skip the recvmsg that would only say EAGAIN (one
      // syscall per control message). libuv's poll is level-triggered: bytes that arrive
      // meanwhile wake us again.
      if (chunk.data.length < this.#recvBuf.length) return;
    }
  }

  stopReceiving(): void {
    if (!this.#onChunk) return;
    this.#onChunk = null;
    this.#updateWatch();
  }

  #end(error?: Error): void {
    this.stopReceiving();
    if (this.#ended) return;
    this.#ended = true;
    const cb = this.#onEnd;
    this.#onEnd = null;
    cb?.(error);
  }

  /** Half-close: the peer sees end of stream, we can still receive. */
  shutdownWrite(): void {
    if (!this.fd.closed) sys(() => native.shutdown(this.fd.fd, 1));
  }

  close(): void {
    if (this.fd.closed) return;
    this.#onChunk = null;
    this.#wantWrite = false;
    this.#watch?.close();
    this.#watch = null;
    const err = new SysError("sendmsg", 9, "socket closed");
    for (const p of this.#queue.splice(0)) p.reject(err);
    this.fd.close();
    this.#ended = true;
    this.#onEnd = null;
  }

  [Symbol.dispose](): void {
    this.close();
  }
}

function toNum(f: Fd | number): number {
  return typeof f === "number" ? f : f.fd;
}

/** A listening AF_UNIX stream socket bound to a path (the path is removed on close). */
export class UnixListener implements Disposable {
  readonly fd: Fd;
  readonly path: string;
  /** The socket file we created (removed on close while it is still ours); null for fromFd(). */
  readonly #owned: OwnedSocketPath | null;
  #watch: Watch | null = null;
  readonly #waiters = new Set<{ watch: Watch; reject: (e: Error) => void }>();

  private constructor(fd: Fd, path: string, owned: OwnedSocketPath | null) {
    this.fd = fd;
    this.path = path;
    this.#owned = owned;
  }

  /**
   * Binds `path` with listenUnixPath(): a socket file nobody answers on is replaced; a live
   * socket or anything that is not a socket is refused (SysError EADDRINUSE / EEXIST) and left
   * alone. Mode 0600 unless `options.mode`; `options.group` owns it.
   */
  static listen(path: string, backlogOrOptions: number | SocketPathOptions = {}): UnixListener {
    const o = typeof backlogOrOptions === "number" ? { backlog: backlogOrOptions } : backlogOrOptions;
    const b = listenUnixPath(path, o);
    return new UnixListener(b.fd, path, b);
  }

  /** Wraps an inherited listening fd (systemd-style socket activation, `--fd N`); no file is ever removed. */
  static fromFd(fd: Fd, path = ""): UnixListener {
    return new UnixListener(fd, path, null);
  }

  tryAccept(): UnixSocket | null {
    const r = native.accept(this.fd.fd);
    if (r === -EAGAIN) return null;
    return new UnixSocket(new Fd(check(r, "accept")));
  }

  /** Calls `cb` for each new connection until close(). */
  onConnection(cb: (socket: UnixSocket) => void, onError?: (e: Error) => void): void {
    if (this.#watch) throw new Error("already accepting");
    this.#watch = new Watch(this.fd.fd, READABLE, () => {
      for (;;) {
        let s: UnixSocket | null;
        try {
          s = this.tryAccept();
        } catch (e) {
          onError?.(e as Error);
          return;
        }
        if (!s) return;
        cb(s);
      }
    });
  }

  /** The next connection (rejects if the listener is closed first). */
  accept(): Promise<UnixSocket> {
    const now = this.tryAccept();
    if (now) return Promise.resolve(now);
    return new Promise((resolve, reject) => {
      const w = new Watch(this.fd.fd, READABLE, () => {
        try {
          const s = this.tryAccept();
          if (!s) return;
          this.#waiters.delete(entry);
          w.close();
          resolve(s);
        } catch (e) {
          this.#waiters.delete(entry);
          w.close();
          reject(e);
        }
      });
      const entry = { watch: w, reject };
      this.#waiters.add(entry);
    });
  }

  close(): void {
    if (this.fd.closed) return;
    this.#watch?.close();
    this.#watch = null;
    for (const w of this.#waiters) {
      w.watch.close();
      w.reject(new SysError("accept", 9, "listener closed"));
    }
    this.#waiters.clear();
    this.fd.close();
    if (this.#owned) removeOwnedSocket(this.#owned);
  }

  [Symbol.dispose](): void {
    this.close();
  }
}
