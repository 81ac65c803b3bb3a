/**
 * The back-end daemon: listens on a socket path (or uses an inherited fd), serves one
 * front-end at a time, and takes the next connection after a disconnect. A front-end that
 * misbehaves loses its connection, never the daemon.
 */
import { EventEmitter } from "node:events";
import { EAGAIN } from "../../sys/errors.js";
import { Fd } from "../../sys/fd.js";
import { acceptRaw } from "../../sys/io.js";
import type { SocketPathOptions } from "../../sys/unix-path.js";
import { UnixListener, UnixSocket } from "../../sys/unix-socket.js";
import type { VhostUserDevice } from "./device.js";
import { BackendSession, type SessionOptions } from "./session.js";

const EINVAL = 22;
/** accept(2) failures that pass: fd or memory exhaustion, a connection reset before it was taken. */
const TRANSIENT_ACCEPT = new Set(["EMFILE", "ENFILE", "ENOBUFS", "ENOMEM", "ECONNABORTED", "EPROTO"]);
const ACCEPT_RETRY_MS = 100;

export type DaemonEvents = {
  log: [level: "info" | "warn" | "error", message: string];
  session: [BackendSession];
};

export interface DaemonOptions {
  /** Serve this many connections, then stop (0 = until close()). */
  maxSessions?: number;
  /** Per-connection choices (SET_LOG_BASE reply form, device-state bounds). */
  session?: SessionOptions;
}

export class VhostUserDaemon extends EventEmitter<DaemonEvents> {
  readonly device: VhostUserDevice;
  #listener: UnixListener | null = null;
  #connected: UnixSocket | null = null;
  #session: BackendSession | null = null;
  #closed = false;
  #wake: (() => void) | null = null;

  private constructor(device: VhostUserDevice) {
    super();
    this.device = device;
  }

  /**
   * Listens on `path` (UnixListener.listen: a socket nobody answers on is replaced; a live one
   * or a non-socket is refused and left alone), mode 0600 unless `options` say otherwise.
   */
  static listen(device: VhostUserDevice, path: string, options: SocketPathOptions = {}): VhostUserDaemon {
    const d = new VhostUserDaemon(device);
    d.#listener = UnixListener.listen(path, options);
    return d;
  }

  /**
   * Uses an inherited fd: a listening socket (accept connections on it) or an already
   * connected socket (serve that one front-end) — the spec's `--fd` convention.
   */
  static fromFd(device: VhostUserDevice, fdNumber: number): VhostUserDaemon {
    const d = new VhostUserDaemon(device);
    const fd = new Fd(fdNumber);
    const r = acceptRaw(fd);
    if (r >= 0) {
      // It was listening and a connection was already waiting: serve it first.
      d.#listener = UnixListener.fromFd(fd);
      d.#connected = new UnixSocket(new Fd(r));
    } else if (r === -EAGAIN) {
      d.#listener = UnixListener.fromFd(fd);
    } else if (r === -EINVAL) {
      d.#connected = new UnixSocket(fd);
    } else {
      fd.close();
      throw new Error(`--fd ${fdNumber} is not a unix socket (accept: errno ${-r})`);
    }
    return d;
  }

  get session(): BackendSession | null {
    return this.#session;
  }

  /** Serves front-ends until close() (or maxSessions); resolves when the daemon has stopped. */
  async serve(options: DaemonOptions = {}): Promise<void> {
    let served = 0;
    while (!this.#closed) {
      let socket = this.#connected;
      this.#connected = null;
      if (!socket) {
        if (!this.#listener) break; // a single inherited connection, now gone
        socket = await this.#accept();
        if (!socket) break;
      }
      const s = new BackendSession(
        socket,
        this.device,
        { log: (level, msg) => this.emit("log", level, msg) },
        options.session,
      );
      this.#session = s;
      this.emit("log", "info", "front-end connected");
      this.emit("session", s);
      await s.closed;
      this.#session = null;
      this.emit("log", "info", "front-end disconnected; waiting for the next one");
      served++;
      if (options.maxSessions && served >= options.maxSessions) break;
    }
  }

  #accept(): Promise<UnixSocket | null> {
    const l = this.#listener as UnixListener;
    return new Promise((resolve) => {
      this.#wake = () => resolve(null);
      let next: Promise<UnixSocket>;
      try {
        next = l.accept();
      } catch (e) {
        next = Promise.reject(e); // accept(2) failed at once (EMFILE with a connection waiting)
      }
      next.then(
        (s) => {
          this.#wake = null;
          if (this.#closed) {
            s.close();
            resolve(null);
          } else resolve(s);
        },
        (e: Error) => {
          this.#wake = null;
          // Out of fds or memory is a moment, not the end: keep serving once some are free.
          const code = (e as { code?: string }).code ?? "";
          if (!this.#closed && TRANSIENT_ACCEPT.has(code)) {
            this.emit("log", "warn", `accept failed (${code}); retrying in ${ACCEPT_RETRY_MS} ms`);
            const t = setTimeout(() => resolve(this.#accept()), ACCEPT_RETRY_MS);
            this.#wake = () => {
              clearTimeout(t);
              resolve(null);
            };
            return;
          }
          this.emit("log", "error", `accept failed: ${e.message}`);
          resolve(null);
        },
      );
    });
  }

  /** Stops accepting, drops the current front-end, releases everything. */
  async close(): Promise<void> {
    if (this.#closed) return;
    this.#closed = true;
    const s = this.#session;
    s?.close();
    await s?.closed;
    this.#connected?.close();
    this.#listener?.close();
    this.#wake?.();
  }
}
