/**
 * Where a migration stream goes: `tcp:HOST:PORT`, `unix:PATH` or `fd:N` (an inherited,
 * already connected socket), in the clear or over TLS 1.3 with mutual authentication (x509
 * certificates in QEMU's credentials-directory layout, or a pre-shared key in QEMU's keys.psk
 * format). The migration stream needs no fd passing, so all of them are node:net sockets (or
 * node:tls sockets over one).
 *
 * The listening side never hands a connection to the migration before it has proved itself:
 * the TLS handshake is complete (the client's certificate chains to the CA and, with `authz`,
 * names the expected client), and its first record has arrived and says what the connection is
 * (the main stream: CAPABILITIES; the postcopy preempt channel: PREEMPT; a recovery connection:
 * RECOVER). Every candidate has a deadline for that, candidates are handled concurrently, and
 * only a bounded number may be pending at once (the oldest is dropped), so an idle, slow or
 * garbage connection cannot block, take the place of, or outlast the real one.
 *
 * The authenticated identity of the peer travels with the socket (`peerIdentity()`), so the
 * destination can tie the preempt and recovery connections to the main connection's peer.
 */
import { X509Certificate } from "node:crypto";
import { readFileSync } from "node:fs";
import { createServer, isIP, type Server, Socket } from "node:net";
import type { Duplex } from "node:stream";
import tls, { type TLSSocket } from "node:tls";
import { listenUnixPath, type OwnedSocketPath, removeOwnedSocket, type SocketPathOptions } from "../sys/unix-path.js";
import { asMigrationError, MigrationError } from "./errors.js";
import {
  checkRecordCrcParts,
  checkStreamHeader,
  decodeRecordHead,
  RECORD_HEADER_SIZE,
  RECORD_OVERHEAD,
  RecordType,
  recordName,
  STREAM_HEADER_SIZE,
} from "./format.js";

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

/** 127.0.0.0/8, ::1 (also IPv4-mapped) and "localhost": traffic that never leaves the host. */
export function isLoopbackHost(host: string): boolean {
  const h = host.toLowerCase().replace(/^\[|\]$/g, "");
  if (h === "localhost" || h === "::1") return true;
  const v4 = h.startsWith("::ffff:") ? h.slice(7) : h;
  return isIP(v4) === 4 && v4.startsWith("127.");
}

// ---------------------------------------------------------------- credentials

/** TLS 1.3 only; AES-128-GCM first (the cheapest with AES-NI), all three use SHA-256 or better. */
const CIPHERS = "TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256";
/** PSK in TLS 1.3 needs a suite whose hash matches the key's (OpenSSL: SHA-256 for callback PSKs). */
const PSK_CIPHERS = "TLS_AES_128_GCM_SHA256:TLS_CHACHA20_POLY1305_SHA256";

/** The listening side's credentials. */
export type ServerTls =
  | {
      kind: "x509";
      ca: Buffer;
      cert: Buffer;
      key: Buffer;
      /** Accept only a client whose certificate's subject CN is this (QEMU's tls-authz). */
      authz?: string;
    }
  | {
      kind: "psk";
      /** identity → key (every line of a keys.psk file). */
      keys: ReadonlyMap<string, Buffer>;
      /** Accept only this identity. */
      authz?: string;
    };

/** The connecting side's credentials. */
export type ClientTls =
  | {
      kind: "x509";
      ca: Buffer;
      cert: Buffer;
      key: Buffer;
      /** The name the server's certificate must carry (default: the endpoint's host). */
      hostname?: string;
    }
  | { kind: "psk"; identity: string; key: Buffer };

function credentialError(message: string, details: Record<string, unknown> = {}): MigrationError {
  return new MigrationError("AUTH_FAILED", message, undefined, details);
}

function readCredential(dir: string, name: string): Buffer {
  try {
    return readFileSync(`${dir}/${name}`);
  } catch (e) {
    throw credentialError(`TLS credentials: cannot read ${dir}/${name}: ${(e as Error).message}`, { file: name });
  }
}

/**
 * Loads a credentials directory in QEMU's x509 layout: ca-cert.pem, and server-cert.pem +
 * server-key.pem for the listening side, client-cert.pem + client-key.pem for the connecting one.
 */
export function loadX509Credentials(dir: string, endpoint: "server"): Extract<ServerTls, { kind: "x509" }>;
export function loadX509Credentials(dir: string, endpoint: "client"): Extract<ClientTls, { kind: "x509" }>;
export function loadX509Credentials(
  dir: string,
  endpoint: "server" | "client",
): Extract<ServerTls, { kind: "x509" }> | Extract<ClientTls, { kind: "x509" }> {
  const ca = readCredential(dir, "ca-cert.pem");
  const cert = readCredential(dir, `${endpoint}-cert.pem`);
  const key = readCredential(dir, `${endpoint}-key.pem`);
  try {
    new X509Certificate(ca);
    new X509Certificate(cert);
    tls.createSecureContext({ ca, cert, key });
  } catch (e) {
    throw credentialError(`TLS credentials in ${dir}: ${(e as Error).message}`);
  }
  return { kind: "x509", ca, cert, key };
}

/** QEMU's keys.psk: one `identity:hexkey` per line. */
export function loadPskFile(file: string): Map<string, Buffer> {
  let text: string;
  try {
    text = readFileSync(file, "utf8");
  } catch (e) {
    throw credentialError(`TLS PSK file ${file}: ${(e as Error).message}`);
  }
  const keys = new Map<string, Buffer>();
  for (const [n, raw] of text.split("\n").entries()) {
    const line = raw.trim();
    if (line === "" || line.startsWith("#")) continue;
    const i = line.indexOf(":");
    const hex = line.slice(i + 1);
    if (i <= 0 || !/^([0-9a-fA-F]{2})+$/.test(hex) || hex.length < 32)
      throw credentialError(`TLS PSK file ${file}, line ${n + 1}: expected identity:hexkey (at least 16 bytes)`);
    keys.set(line.slice(0, i), Buffer.from(hex, "hex"));
  }
  if (keys.size === 0) throw credentialError(`TLS PSK file ${file}: no keys`);
  return keys;
}

// ---------------------------------------------------------------- peer identity

/** Who is at the other end, as TLS proved it. */
export type PeerIdentity =
  | { kind: "x509" /** subject CN */; name: string /** the leaf certificate's SHA-256 */; fingerprint: string }
  | { kind: "psk"; name: string };

const peers = new WeakMap<Duplex, PeerIdentity>();

/** The authenticated peer of a connection made here, or null for a plain one. */
export function peerIdentity(stream: Duplex): PeerIdentity | null {
  return peers.get(stream) ?? null;
}

/** Same peer: the same certificate (or PSK identity); two plain connections count as the same. */
export function samePeer(a: PeerIdentity | null, b: PeerIdentity | null): boolean {
  if (a === null || b === null) return a === b;
  if (a.kind === "x509" && b.kind === "x509") return a.fingerprint === b.fingerprint && a.name === b.name;
  return a.kind === b.kind && a.name === b.name;
}

export function describePeer(p: PeerIdentity | null): string {
  return p === null ? "an unauthenticated peer" : p.kind === "x509" ? `CN=${p.name}` : `PSK identity ${p.name}`;
}

function x509Identity(s: TLSSocket): PeerIdentity | null {
  const c = s.getPeerCertificate();
  if (!c?.fingerprint256) return null;
  const cn = c.subject?.CN;
  return { kind: "x509", name: Array.isArray(cn) ? cn.join(",") : (cn ?? ""), fingerprint: c.fingerprint256 };
}

// ---------------------------------------------------------------- connecting

function tune(s: Socket): Socket {
  s.setNoDelay(true);
  return s;
}

export interface ConnectOptions {
  /** Mutual TLS; without it the connection is plain (loopback, unix, or `insecure`). */
  tls?: ClientTls;
  /** Plain TCP to a host that is not loopback (the operator's explicit choice). */
  insecure?: boolean;
  /** Connect + TLS handshake deadline (default 10 s). */
  timeoutMs?: number;
}

export const DEFAULT_CONNECT_TIMEOUT_MS = 10_000;

function plainRefused(what: string): MigrationError {
  return new MigrationError(
    "INSECURE",
    `${what} beyond loopback without TLS: give TLS credentials (--tls-creds DIR or --tls-psk FILE), or accept a plain connection with --insecure`,
  );
}

/** Plain TCP beyond loopback is refused unless `insecure`; an fd is checked by its peer's address. */
function checkPlain(e: Endpoint, s: Socket | null, insecure: boolean | undefined, what: string): void {
  if (insecure) return;
  const host = e.kind === "tcp" ? e.host : e.kind === "fd" ? s?.remoteAddress : undefined;
  if (host !== undefined && !isLoopbackHost(host)) throw plainRefused(what);
}

/**
 * Connects (or adopts an inherited fd) and, with `tls`, completes the handshake: the server's
 * certificate must chain to the CA and carry `hostname` (default: the endpoint's host; required
 * for unix: and fd: endpoints). Resolves with the socket to write the stream to.
 */
export async function connectEndpoint(e: Endpoint, o: ConnectOptions = {}): Promise<Socket> {
  const timeoutMs = o.timeoutMs ?? DEFAULT_CONNECT_TIMEOUT_MS;
  // Refused before a byte goes out (an fd is checked below, by its peer's address).
  if (!o.tls && e.kind === "tcp") checkPlain(e, null, o.insecure, "a plain migration connection");
  let raw: Socket;
  if (e.kind === "fd") raw = new Socket({ fd: e.fd, readable: true, writable: true });
  else
    raw = await new Promise<Socket>((resolve, reject) => {
      const s = e.kind === "tcp" ? new Socket().connect(e.port, e.host) : new Socket().connect(e.path);
      const t = setTimeout(() => fail(new Error(`no connection within ${timeoutMs} ms`)), timeoutMs);
      const fail = (err: Error) => {
        clearTimeout(t);
        s.destroy();
        reject(new MigrationError("CONNECTION_LOST", `connect to ${formatEndpoint(e)}: ${err.message}`));
      };
      s.once("error", fail);
      s.once("connect", () => {
        clearTimeout(t);
        s.off("error", fail);
        resolve(s);
      });
    });
  if (e.kind !== "unix") tune(raw);
  if (!o.tls) {
    try {
      checkPlain(e, raw, o.insecure, "a plain migration connection");
    } catch (err) {
      raw.destroy();
      throw err;
    }
    return raw;
  }
  return secureClient(raw, e, o.tls, timeoutMs);
}

function secureClient(raw: Socket, e: Endpoint, t: ClientTls, timeoutMs: number): Promise<TLSSocket> {
  return new Promise((resolve, reject) => {
    let s: TLSSocket;
    const common = { socket: raw, minVersion: "TLSv1.3" as const, maxVersion: "TLSv1.3" as const };
    let hostname = "";
    if (t.kind === "x509") {
      hostname = t.hostname ?? (e.kind === "tcp" ? e.host : "");
      if (hostname === "") {
        raw.destroy();
        reject(credentialError(`TLS to ${formatEndpoint(e)}: give the server's name (--tls-hostname)`));
        return;
      }
      s = tls.connect({
        ...common,
        ca: t.ca,
        cert: t.cert,
        key: t.key,
        ciphers: CIPHERS,
        // SNI carries names only, never addresses.
        ...(isIP(hostname) ? {} : { servername: hostname }),
        checkServerIdentity: (_h, cert) => tls.checkServerIdentity(hostname, cert),
      });
    } else {
      s = tls.connect({
        ...common,
        ciphers: PSK_CIPHERS,
        pskCallback: () => ({ identity: t.identity, psk: t.key }),
        // A PSK session has no certificate; one that does is not the peer holding our key.
        checkServerIdentity: () => undefined,
      });
    }
    const timer = setTimeout(() => fail(new Error(`TLS handshake not done within ${timeoutMs} ms`)), timeoutMs);
    const fail = (err: Error) => {
      clearTimeout(timer);
      s.destroy();
      raw.destroy();
      reject(tlsError(`TLS to ${formatEndpoint(e)}`, err));
    };
    s.once("error", fail);
    s.once("secureConnect", () => {
      clearTimeout(timer);
      s.off("error", fail);
      let peer: PeerIdentity | null;
      if (t.kind === "psk") {
        if (s.getPeerCertificate()?.fingerprint256)
          return fail(new Error("the server presented a certificate in PSK mode"));
        peer = { kind: "psk", name: t.identity };
      } else {
        if (!s.authorized) return fail(new Error(String(s.authorizationError ?? "server certificate not trusted")));
        peer = x509Identity(s);
      }
      if (peer) peers.set(s, peer);
      resolve(s);
    });
  });
}

/** A TLS failure as a typed error: AUTH_FAILED for a rejected peer, CONNECTION_LOST for the rest. */
function tlsError(what: string, err: Error): MigrationError {
  if (err instanceof MigrationError) return err;
  const code = String((err as NodeJS.ErrnoException).code ?? "");
  const auth =
    /CERT|VERIFY|ALERT|SSL|ERR_TLS|HOSTNAME|IP_ADDRESS|SELF_SIGNED|UNABLE_TO|PSK/.test(code) ||
    /certificate|verify|alert/i.test(err.message);
  return new MigrationError(auth ? "AUTH_FAILED" : "CONNECTION_LOST", `${what}: ${err.message}`, undefined, {
    cause: code || undefined,
  });
}

// ---------------------------------------------------------------- accepting

/** What a connection says it is by its first record. */
export type ChannelKind = "main" | "preempt" | "recover";

const KIND_OF: Partial<Record<number, ChannelKind>> = {
  [RecordType.Capabilities]: "main",
  [RecordType.Preempt]: "preempt",
  [RecordType.Recover]: "recover",
};

/** No first record is anywhere near this big (CAPABILITIES is 20 bytes). */
const MAX_FIRST_RECORD = 4096;

export interface ListenOptions {
  /** Mutual TLS on every connection; without it plain (loopback and unix only, or `insecure`). */
  tls?: ServerTls;
  /** Plain TCP on an address that is not loopback (the operator's explicit choice). */
  insecure?: boolean;
  /** A connection must finish TLS and deliver its first record within this (default 5 s). */
  handshakeTimeoutMs?: number;
  /** Connections still proving themselves at once; beyond it the oldest is dropped (default 32). */
  maxPending?: number;
  /** Proved connections of one kind waiting for accept(); beyond it new ones are dropped (default 4). */
  maxQueued?: number;
  /**
   * `unix:` endpoints: the socket file's mode and group (default 0600). A socket nobody answers
   * on is replaced; a live socket or anything else at the path is refused and left alone.
   */
  socket?: SocketPathOptions;
}

export interface ListenerStats {
  /** Connections handed to accept(). */
  accepted: number;
  /** Dropped: handshake or authorization failed (no certificate, another CA, wrong identity, PSK). */
  unauthenticated: number;
  /** Dropped: nothing (or not enough) within the deadline. */
  timedOut: number;
  /** Dropped: the first bytes are not a migration stream's first record. */
  garbage: number;
  /** Dropped: too many pending (the oldest goes) or queued (the newest goes). */
  overflow: number;
  /** Proving themselves right now. */
  pending: number;
}

interface Candidate {
  raw: Socket;
  tls: TLSSocket | null;
  timer: NodeJS.Timeout;
  done: boolean;
  onClose: () => void;
}

/**
 * A listening endpoint. accept(kind) hands out the next connection that proved itself to be a
 * `kind` connection (see the module comment); it has its first bytes pushed back, so the
 * reader sees the stream from its start.
 */
export class MigrationListener {
  readonly #server: Server | null;
  readonly #o: ListenOptions;
  readonly #pending = new Set<Candidate>();
  readonly #queues: Record<ChannelKind, Socket[]> = { main: [], preempt: [], recover: [] };
  readonly #waiters: Record<ChannelKind, ((s: Socket | Error) => void)[]> = { main: [], preempt: [], recover: [] };
  readonly #stats = { accepted: 0, unauthenticated: 0, timedOut: 0, garbage: 0, overflow: 0 };
  #closed = false;
  readonly endpoint: Endpoint;
  /** unix: the socket file we created, removed on close while the path still names it. */
  #owned: OwnedSocketPath | null = null;
  /** Called for every connection turned away, with why (for logs and tests). */
  onReject: ((reason: MigrationError) => void) | null = null;

  private constructor(server: Server | null, endpoint: Endpoint, o: ListenOptions) {
    this.#server = server;
    this.endpoint = endpoint;
    this.#o = o;
    server?.on("connection", (s: Socket) => this.#candidate(s));
  }

  /** One connection that is already there (an inherited fd) put through the same checks. */
  static async adopt(raw: Socket, o: ListenOptions): Promise<Socket> {
    const l = new MigrationListener(null, { kind: "fd", fd: -1 }, { ...o, maxPending: 1, maxQueued: 1 });
    let why: MigrationError | null = null;
    l.onReject = (r) => {
      why = r;
    };
    const got = l.accept("main");
    const gone = new Promise<never>((_, reject) => {
      l.#rejected = () => reject(why ?? new MigrationError("CONNECTION_LOST", "the connection closed"));
    });
    l.#candidate(raw);
    try {
      return await Promise.race([got, gone]);
    } finally {
      await l.close();
    }
  }

  #rejected: (() => void) | null = null;

  static listen(e: Endpoint, o: ListenOptions = {}): Promise<MigrationListener> {
    if (e.kind === "fd") return Promise.reject(new RangeError("listen on fd: use acceptEndpoint for an fd"));
    if (!o.tls) {
      try {
        checkPlain(e, null, o.insecure, "listening for a plain migration");
      } catch (err) {
        return Promise.reject(err);
      }
    }
    let owned: OwnedSocketPath | null = null;
    let fd = -1;
    if (e.kind === "unix") {
      try {
        const b = listenUnixPath(e.path, o.socket);
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
        const l = new MigrationListener(server, ep, o);
        l.#owned = owned;
        resolve(l);
      };
      if (e.kind === "tcp") server.listen(e.port, e.host, ready);
      // The server owns the fd from here (closed by server.close()).
      else server.listen({ fd }, ready);
    });
  }

  get stats(): ListenerStats {
    return { ...this.#stats, pending: this.#pending.size };
  }

  /**
   * The next connection of this kind that completed TLS (when configured) and whose first
   * record arrived. `signal` withdraws the request (the promise then rejects ABORTED).
   */
  accept(kind: ChannelKind = "main", signal?: AbortSignal): Promise<Socket> {
    if (this.#closed) return Promise.reject(new MigrationError("ABORTED", "the listener is closed"));
    const s = this.#queues[kind].shift();
    if (s) return Promise.resolve(s);
    return new Promise((resolve, reject) => {
      const w = (r: Socket | Error) => {
        signal?.removeEventListener("abort", onAbort);
        if (r instanceof Error) reject(r);
        else resolve(r);
      };
      const onAbort = () => {
        const q = this.#waiters[kind];
        const i = q.indexOf(w);
        if (i >= 0) q.splice(i, 1);
        reject(new MigrationError("ABORTED", `accept(${kind}) withdrawn`));
      };
      if (signal?.aborted) return onAbort();
      signal?.addEventListener("abort", onAbort, { once: true });
      this.#waiters[kind].push(w);
    });
  }

  #reject(
    c: Candidate,
    why: Exclude<keyof ListenerStats, "pending" | "accepted"> | null,
    reason: MigrationError,
  ): void {
    if (c.done) return;
    c.done = true;
    clearTimeout(c.timer);
    this.#pending.delete(c);
    if (why) this.#stats[why]++;
    c.tls?.destroy();
    c.raw.destroy();
    this.onReject?.(reason);
    this.#rejected?.();
  }

  #candidate(raw: Socket): void {
    if (this.#closed) {
      raw.destroy();
      return;
    }
    if (this.endpoint.kind !== "unix") tune(raw);
    raw.on("error", () => undefined);
    const limit = this.#o.handshakeTimeoutMs ?? 5000;
    const c: Candidate = {
      raw,
      tls: null,
      done: false,
      timer: setTimeout(() => {
        const what = c.tls || !this.#o.tls ? "send its first record" : "complete TLS and send its first record";
        this.#reject(
          c,
          "timedOut",
          new MigrationError("CONNECTION_LOST", `a connection did not ${what} within ${limit} ms`),
        );
      }, limit),
      onClose: () =>
        this.#reject(c, "garbage", new MigrationError("TRUNCATED", "a connection closed before its first record")),
    };
    this.#pending.add(c);
    const max = this.#o.maxPending ?? 32;
    if (this.#pending.size > max) {
      const oldest = this.#pending.values().next().value as Candidate;
      this.#reject(oldest, "overflow", new MigrationError("CONNECTION_LOST", `more than ${max} pending connections`));
    }
    raw.once("close", c.onClose);
    if (!this.#o.tls) this.#classify(c, raw);
    else this.#handshake(c);
  }

  /**
   * Runs the server side of the handshake through a tls.Server of its own (never listening), so
   * that the certificate checks are node:tls's own and the result is tied to this connection.
   */
  #handshake(c: Candidate): void {
    const t = this.#o.tls as ServerTls;
    const base = { minVersion: "TLSv1.3" as const, maxVersion: "TLSv1.3" as const, handshakeTimeout: 0 };
    const server =
      t.kind === "x509"
        ? tls.createServer({
            ...base,
            ca: t.ca,
            cert: t.cert,
            key: t.key,
            ciphers: CIPHERS,
            requestCert: true,
            // Checked below, before a byte is read: node:tls would otherwise drop a certificate
            // of another CA silently, and the listener could not say why.
            rejectUnauthorized: false,
          })
        : tls.createServer({
            ...base,
            ciphers: PSK_CIPHERS,
            pskCallback: (s, identity) => {
              if (t.authz !== undefined && identity !== t.authz) return null;
              const key = t.keys.get(identity);
              if (!key) return null;
              peers.set(s, { kind: "psk", name: identity });
              return key;
            },
          });
    server.once("tlsClientError", (err) => {
      this.#reject(c, "unauthenticated", tlsError("a connection's TLS handshake", err));
    });
    server.once("secureConnection", (s: TLSSocket) => {
      c.tls = s;
      s.on("error", () => undefined);
      let peer: PeerIdentity | null;
      if (t.kind === "x509") {
        peer = x509Identity(s);
        if (!s.authorized || !peer) {
          this.#reject(c, "unauthenticated", credentialError(`client certificate rejected: ${s.authorizationError}`));
          return;
        }
        if (t.authz !== undefined && peer.name !== t.authz.replace(/^CN=/, "")) {
          this.#reject(
            c,
            "unauthenticated",
            credentialError(`client ${describePeer(peer)} is not the authorized ${t.authz}`, { peer: peer.name }),
          );
          return;
        }
        peers.set(s, peer);
      } else {
        peer = peers.get(s) ?? null;
        if (!peer) {
          this.#reject(c, "unauthenticated", credentialError("a PSK connection without an identity"));
          return;
        }
      }
      this.#classify(c, s);
    });
    server.emit("connection", c.raw);
  }

  /** Reads the stream header and first record; queues the connection by what that record is. */
  #classify(c: Candidate, s: Socket): void {
    const chunks: Buffer[] = [];
    let have = 0;
    const onData = (chunk: Buffer) => {
      chunks.push(chunk);
      have += chunk.length;
      let kind: ChannelKind | null;
      try {
        kind = firstRecordKind(Buffer.concat(chunks, have));
      } catch (e) {
        s.off("data", onData);
        this.#reject(c, "garbage", asMigrationError(e, "BAD_RECORD"));
        return;
      }
      if (kind === null) return;
      s.off("data", onData);
      s.pause();
      s.unshift(Buffer.concat(chunks, have));
      this.#claim(c, s, kind);
    };
    s.on("data", onData);
  }

  #claim(c: Candidate, s: Socket, kind: ChannelKind): void {
    if (c.done) return;
    c.done = true;
    clearTimeout(c.timer);
    this.#pending.delete(c);
    c.raw.off("close", c.onClose);
    const w = this.#waiters[kind].shift();
    if (w) {
      this.#stats.accepted++;
      w(s);
      return;
    }
    const q = this.#queues[kind];
    if (q.length >= (this.#o.maxQueued ?? 4)) {
      this.#stats.overflow++;
      s.destroy();
      c.raw.destroy();
      this.onReject?.(new MigrationError("CONNECTION_LOST", `more than ${q.length} ${kind} connections waiting`));
      return;
    }
    this.#stats.accepted++;
    q.push(s);
    s.once("close", () => {
      const i = q.indexOf(s);
      if (i >= 0) q.splice(i, 1);
    });
  }

  /** Stops listening and drops every connection not handed out yet (handed-out ones are their owners'). */
  close(): Promise<void> {
    this.#closed = true;
    this.#rejected = null;
    for (const c of [...this.#pending]) this.#reject(c, null, new MigrationError("ABORTED", "the listener closed"));
    for (const q of Object.values(this.#queues)) for (const s of q.splice(0)) s.destroy();
    for (const ws of Object.values(this.#waiters))
      for (const w of ws.splice(0)) w(new MigrationError("ABORTED", "the listener closed"));
    this.#server?.close();
    if (this.#owned) removeOwnedSocket(this.#owned);
    this.#owned = null;
    return new Promise((r) => setImmediate(r));
  }
}

/** null: not enough bytes yet; throws when they are not a migration stream's first record. */
function firstRecordKind(b: Buffer): ChannelKind | null {
  if (b.length < STREAM_HEADER_SIZE) return null;
  checkStreamHeader(b.subarray(0, STREAM_HEADER_SIZE));
  if (b.length < STREAM_HEADER_SIZE + RECORD_HEADER_SIZE) return null;
  const head = b.subarray(STREAM_HEADER_SIZE, STREAM_HEADER_SIZE + RECORD_HEADER_SIZE);
  const h = decodeRecordHead(head, STREAM_HEADER_SIZE);
  const kind = KIND_OF[h.type];
  if (!kind || h.length > MAX_FIRST_RECORD)
    throw new MigrationError(
      "BAD_RECORD",
      `a connection opened with ${recordName(h.type)} (${h.length} bytes)`,
      STREAM_HEADER_SIZE,
    );
  const end = STREAM_HEADER_SIZE + h.length + RECORD_OVERHEAD;
  if (b.length < end) return null;
  checkRecordCrcParts(head, b.subarray(STREAM_HEADER_SIZE + RECORD_HEADER_SIZE, end), STREAM_HEADER_SIZE);
  return kind;
}

/**
 * The listening side of an inherited, connected fd (`--listen fd:N`): with TLS, the server side
 * of the handshake, the client's authorization and the first record, within the deadline.
 */
export function acceptEndpoint(
  e: Extract<Endpoint, { kind: "fd" }>,
  o: Omit<ListenOptions, "maxPending" | "maxQueued"> = {},
): Promise<Socket> {
  const raw = tune(new Socket({ fd: e.fd, readable: true, writable: true }));
  if (!o.tls) {
    try {
      checkPlain(e, raw, o.insecure, "a plain migration connection");
    } catch (err) {
      raw.destroy();
      return Promise.reject(err);
    }
    return Promise.resolve(raw);
  }
  return MigrationListener.adopt(raw, o);
}
