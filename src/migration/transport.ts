/**
 * Where a migration stream goes: `tcp:HOST:PORT`, `unix:PATH` or `fd:N` (an inherited,
 * already connected socket). All three are node:net sockets; the migration stream needs no
 * fd passing.
 */
import { createServer, type Server, Socket } from "node:net";
import { listenUnixPath, type OwnedSocketPath, removeOwnedSocket, type SocketPathOptions } from "../sys/unix-path.js";
import { MigrationError } from "./errors.js";

export type Endpoint =
  | { kind: "tcp"; host: string; port: number }
  | { kind: "unix"; path: string }
  | { kind: "fd"; fd: number };

export function parseEndpoint(s: string): Endpoint {
  if (s.startsWith("unix:")) return { kind: "unix", path: s.slice(5) };
  if (s.startsWith("fd:")) {
    const fd = Number(s.slice(3));
    if (!Number.isInteger(fd) || fd < 0) throw new RangeError(`bad fd in ${s}`);
    return { kind: "fd", fd };
  }
  if (s.startsWith("tcp:")) {
    const rest = s.slice(4);
    const i = rest.lastIndexOf(":");
    const host = i <= 0 ? "" : rest.slice(0, i).replace(/^\[|\]$/g, "");
    const port = Number(i < 0 ? rest : rest.slice(i + 1));
    if (!Number.isInteger(port) || port < 0 || port > 65535) throw new RangeError(`bad port in ${s}`);
    return { kind: "tcp", host: host || "127.0.0.1", port };
  }
  throw new RangeError(`endpoint ${s}: expected tcp:HOST:PORT, unix:PATH or fd:N`);
}

export function formatEndpoint(e: Endpoint): string {
  return e.kind === "tcp" ? `tcp:${e.host}:${e.port}` : e.kind === "unix" ? `unix:${e.path}` : `fd:${e.fd}`;
}

function tune(s: Socket): Socket {
  s.setNoDelay(true);
  return s;
}

export function connectEndpoint(e: Endpoint): Promise<Socket> {
  if (e.kind === "fd") return Promise.resolve(tune(new Socket({ fd: e.fd, readable: true, writable: true })));
  return new Promise((resolve, reject) => {
    const s = e.kind === "tcp" ? new Socket().connect(e.port, e.host) : new Socket().connect(e.path);
    const fail = (err: Error) => {
      s.destroy();
      reject(new MigrationError("CONNECTION_LOST", `connect to ${formatEndpoint(e)}: ${err.message}`));
    };
    s.once("error", fail);
    s.once("connect", () => {
      s.off("error", fail);
      resolve(e.kind === "tcp" ? tune(s) : s);
    });
  });
}

/** A listening endpoint that hands out one connection per accept(). */
export class MigrationListener {
  readonly #server: Server;
  readonly #queue: Socket[] = [];
  #waiter: ((s: Socket) => void) | null = null;
  readonly endpoint: Endpoint;
  /** unix: the socket file we created, removed on close while the path still names it. */
  readonly #owned: OwnedSocketPath | null;

  private constructor(server: Server, endpoint: Endpoint, owned: OwnedSocketPath | null) {
    this.#server = server;
    this.endpoint = endpoint;
    this.#owned = owned;
    server.on("connection", (s: Socket) => {
      if (endpoint.kind === "tcp") tune(s);
      const w = this.#waiter;
      this.#waiter = null;
      if (w) w(s);
      else this.#queue.push(s);
    });
  }

  /**
   * Listens on `e`. A `unix:` path is bound with listenUnixPath(): a socket nobody answers on
   * is replaced, a live socket or anything else there is refused
   * (EADDRINUSE / EEXIST, a SysError) and left alone; mode 0600 unless `socket` says otherwise.
   */
  static listen(e: Endpoint, socket: SocketPathOptions = {}): Promise<MigrationListener> {
    if (e.kind === "fd") return Promise.reject(new RangeError("listen on fd: use connectEndpoint for an fd"));
    let owned: OwnedSocketPath | null = null;
    let fd = -1;
    if (e.kind === "unix") {
      try {
        const b = listenUnixPath(e.path, socket);
        owned = b;
        fd = b.fd.release();
      } catch (err) {
        return Promise.reject(err);
      }
    }
    return new Promise((resolve, reject) => {
      const server = createServer({ pauseOnConnect: false });
      const fail = (err: Error) => {
        if (owned) removeOwnedSocket(owned);
        reject(err);
      };
      server.once("error", fail);
      const ready = () => {
        server.off("error", fail);
        const addr = server.address();
        const ep: Endpoint =
          e.kind === "tcp" && addr && typeof addr === "object" ? { kind: "tcp", host: e.host, port: addr.port } : e;
        resolve(new MigrationListener(server, ep, owned));
      };
      if (e.kind === "tcp") server.listen(e.port, e.host, ready);
      // The server owns the fd from here (closed by server.close()).
      else server.listen({ fd }, ready);
    });
  }

  accept(): Promise<Socket> {
    const s = this.#queue.shift();
    if (s) return Promise.resolve(s);
    return new Promise((r) => {
      this.#waiter = r;
    });
  }

  /** Stops listening (connections already accepted stay open: their owners close them). */
  close(): Promise<void> {
    for (const s of this.#queue.splice(0)) s.destroy();
    this.#server.close();
    if (this.#owned) removeOwnedSocket(this.#owned);
    return new Promise((r) => setImmediate(r));
  }
}
