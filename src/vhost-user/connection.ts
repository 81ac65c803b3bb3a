/**
 * A vhost-user channel over a UnixSocket: framing (12-byte header + payload, fds), request/reply
 * matching with deadlines, REPLY_ACK, and typed messages out. One class for both channels:
 * `Connection.frontend(socket)` speaks the front-end request table (main socket, either end),
 * `Connection.backendChannel(socket)` the back-end request table (SET_BACKEND_REQ_FD socket).
 * The side that sends requests calls request(); the side that serves them listens to "request"
 * and answers with reply()/ack().
 */
import { EventEmitter } from "node:events";
import type { Fd } from "../sys/fd.js";
import type { Chunk, UnixSocket } from "../sys/unix-socket.js";
import { BACKEND_INDEX, type BackendRequests } from "./protocol/backend-requests.js";
import {
  HEADER_SIZE,
  hasFeature,
  ProtocolFeature,
  VHOST_USER_MAX_FDS,
  VHOST_USER_REPLY_MASK,
  VHOST_USER_VERSION,
} from "./protocol/constants.js";
import { VhostUserError } from "./protocol/errors.js";
import { FRONTEND_INDEX, type FrontendRequests } from "./protocol/frontend-requests.js";
import {
  checkFlags,
  decodeHeader,
  decodeReply,
  decodeRequest,
  encodeHeader,
  encodeReply,
  encodeRequest,
  type Header,
  isReply,
  type ReplyMessage,
  type ReplyPayload,
  type RequestIndex,
  type RequestMessage,
  type RequestName,
  type RequestPayload,
  type RequestTable,
} from "./protocol/message.js";
import { U64 } from "./protocol/payloads.js";

/**
 * Largest payload we accept. The biggest fixed layout is GET_SHMEM_CONFIG's reply (2056 bytes);
 * 4 KiB leaves room for crypto sessions, as rust-vmm's MAX_MSG_SIZE does.
 */
export const DEFAULT_MAX_PAYLOAD_SIZE = 0x1000;
export const DEFAULT_REPLY_TIMEOUT_MS = 10_000;
const NOT_ACKED: Promise<boolean> = Promise.resolve(false);
const acked = (): boolean => true;

/** One framed message, before decoding: the fds are owned by whoever takes it. */
export interface RawMessage {
  header: Header;
  payload: Uint8Array;
  fds: Fd[];
  /** The kernel dropped some of the fds sent with this message. */
  fdsTruncated: boolean;
}

interface Partial {
  msg: RawMessage;
  headerBytes: Uint8Array;
  headerFilled: number;
  payloadFilled: number;
  headerDone: boolean;
}

/**
 * Cuts a byte stream into messages and hands each its fds.
 *
 * Which message do fds belong to? The kernel delivers SCM_RIGHTS fds with the recvmsg that
 * returns the first byte of the sendmsg that carried them, and ends that recvmsg right after
 * that sendmsg's bytes (it never glues data *after* an fd-carrying send). Senders put the fds on
 * the sendmsg that starts the message, so: the fds of a chunk belong to the last message whose
 * header starts in that chunk, or, when no header starts in it, to the message being assembled.
 * In the usual case (one message per chunk) that is the message starting the chunk. Fds on a
 * chunk in which no message starts, or more than VHOST_USER_MAX_FDS on one message, are a
 * framing error: the fds are closed and the framer refuses further input.
 */
export class MessageFramer {
  readonly maxPayloadSize: number;
  #partial: Partial | null = null;
  #dead = false;

  constructor(maxPayloadSize = DEFAULT_MAX_PAYLOAD_SIZE) {
    this.maxPayloadSize = maxPayloadSize;
  }

  /** Bytes of an incomplete message held back. */
  get pendingBytes(): number {
    const p = this.#partial;
    return p ? p.headerFilled + p.payloadFilled : 0;
  }

  /**
   * Feeds one chunk (kept: payloads may be views of it); returns the messages it completed. Throws VhostUserError("PAYLOAD_TOO_LARGE")
   * when a header announces more than maxPayloadSize: the stream cannot be trusted after that, every
   * fd of the chunk and of the partial message is closed, and the framer refuses further input.
   */
  push(data: Uint8Array, fds: Fd[] = [], fdsTruncated = false): RawMessage[] {
    if (this.#dead) {
      for (const f of fds) f.close();
      throw new VhostUserError("CLOSED", "framer already failed or closed");
    }
    // The usual chunk: exactly one whole message (a sendmsg per message, read at once). Its
    // payload is a view of `data` (which the caller hands over), nothing is copied.
    if (this.#partial === null && data.length >= HEADER_SIZE && fds.length <= VHOST_USER_MAX_FDS) {
      const header = decodeHeader(data);
      if (header.size <= this.maxPayloadSize && data.length === HEADER_SIZE + header.size)
        return [{ header, payload: data.subarray(HEADER_SIZE), fds, fdsTruncated }];
    }
    const done: RawMessage[] = [];
    let lastStarted: RawMessage | null = null;
    const continued = this.#partial?.msg ?? null;
    let pos = 0;
    try {
      while (pos < data.length) {
        let p = this.#partial;
        if (!p) {
          p = {
            msg: {
              header: { request: 0, flags: 0, size: 0 },
              payload: new Uint8Array(0),
              fds: [],
              fdsTruncated: false,
            },
            headerBytes: new Uint8Array(HEADER_SIZE),
            headerFilled: 0,
            payloadFilled: 0,
            headerDone: false,
          };
          this.#partial = p;
          lastStarted = p.msg;
        }
        if (!p.headerDone) {
          const n = Math.min(HEADER_SIZE - p.headerFilled, data.length - pos);
          p.headerBytes.set(data.subarray(pos, pos + n), p.headerFilled);
          p.headerFilled += n;
          pos += n;
          if (p.headerFilled < HEADER_SIZE) break;
          const header = decodeHeader(p.headerBytes);
          if (header.size > this.maxPayloadSize)
            throw new VhostUserError("PAYLOAD_TOO_LARGE", "header size field", {
              request: `request ${header.request}`,
              value: header.size,
              expected: `<= ${this.maxPayloadSize}`,
            });
          p.msg.header = header;
          p.msg.payload = new Uint8Array(header.size);
          p.headerDone = true;
        }
        const want = p.msg.header.size - p.payloadFilled;
        const n = Math.min(want, data.length - pos);
        p.msg.payload.set(data.subarray(pos, pos + n), p.payloadFilled);
        p.payloadFilled += n;
        pos += n;
        if (p.payloadFilled === p.msg.header.size) {
          done.push(p.msg);
          this.#partial = null;
        }
      }
    } catch (e) {
      for (const f of fds) f.close();
      for (const m of done) for (const f of m.fds) f.close();
      this.close();
      this.#dead = true;
      throw e;
    }
    if (fds.length > 0 || fdsTruncated) {
      // Fds ride only on the bytes that start a message: fds arriving with the middle of one
      // (a peer feeding a message byte by byte, each byte with fds) would be held for as long
      // as it cares to leave the message incomplete. That and more than 8 fds on one message
      // end the stream.
      const owner = lastStarted;
      const why =
        owner === null
          ? "fds sent with the middle of a message (only its first bytes may carry fds)"
          : owner.fds.length + fds.length > VHOST_USER_MAX_FDS
            ? `more than ${VHOST_USER_MAX_FDS} fds on one message`
            : null;
      if (why !== null) {
        const err = new VhostUserError("BAD_FD_COUNT", why, {
          request: `request ${(owner ?? continued)?.header.request ?? "?"}`,
          value: (owner?.fds.length ?? 0) + fds.length,
          expected: `<= ${VHOST_USER_MAX_FDS}, with the message's first bytes`,
        });
        for (const f of fds) f.close();
        for (const m of done) for (const f of m.fds) f.close();
        this.close();
        throw err;
      }
      (owner as RawMessage).fds.push(...fds);
      (owner as RawMessage).fdsTruncated ||= fdsTruncated;
    }
    return done;
  }

  /** Drops the partial message and closes its fds. */
  close(): void {
    const p = this.#partial;
    this.#partial = null;
    if (p) for (const f of p.msg.fds) f.close();
    this.#dead = true;
  }
}

export interface ConnectionOptions {
  maxPayloadSize?: number;
  /** Default deadline for a reply. */
  timeoutMs?: number;
  /** Shown in errors, e.g. "vu.sock". */
  label?: string;
}

export interface RequestOptions {
  /** Fds to send with the request (the caller keeps ownership of its copies). */
  fds?: readonly (Fd | number)[];
  /**
   * Set NEED_REPLY and wait for the u64 ack; a non-zero ack rejects with VhostUserError("NACK").
   * Default: on when REPLY_ACK is negotiated, for every request without an explicit reply.
   */
  needReply?: boolean;
  /** Wait for a reply the protocol state calls for (postcopy SET_MEM_TABLE/ADD_MEM_REG, SET_LOG_BASE with LOG_SHMFD). */
  expectReply?: boolean;
  timeoutMs?: number;
}

export type ConnectionEvents<T extends RequestTable> = {
  /** A well-formed request; its fds now belong to the listener. */
  request: [RequestMessage<T>];
  /**
   * A malformed or unexpected message (already dropped, its fds closed). The connection goes on unless a "close" follows.
   * `header` is there for a request that was framed but could not be decoded, so the server can still answer it.
   */
  protocolError: [VhostUserError, Header?];
  /** A "request" listener threw. */
  handlerError: [unknown, RequestMessage<T>];
  /** The connection is gone: peer hang-up (error undefined), fatal framing error, or close(). Once. */
  close: [VhostUserError | undefined];
};

interface Pending {
  name: string;
  code: number;
  /** The reply is the REPLY_ACK u64 (NEED_REPLY was set on a request without explicit reply). */
  ack: boolean;
  resolve: (m: ReplyMessage<unknown>) => void;
  reject: (e: Error) => void;
  timer: NodeJS.Timeout;
}

export class Connection<T extends RequestTable> extends EventEmitter<ConnectionEvents<T>> implements Disposable {
  readonly socket: UnixSocket;
  readonly index: RequestIndex<T>;
  readonly label: string;
  readonly timeoutMs: number;
  /** REPLY_ACK negotiated: requests without an explicit reply go out with NEED_REPLY by default. */
  replyAck = false;
  #framer: MessageFramer;
  #pending: Pending[] = [];
  /** Requests whose wait timed out, per code: their late replies are dropped quietly. */
  #abandoned = new Map<number, number>();
  #closed = false;
  #paused = false;

  constructor(socket: UnixSocket, index: RequestIndex<T>, options: ConnectionOptions = {}) {
    super();
    this.socket = socket;
    this.index = index;
    this.label = options.label ?? "vhost-user";
    this.timeoutMs = options.timeoutMs ?? DEFAULT_REPLY_TIMEOUT_MS;
    this.#framer = new MessageFramer(options.maxPayloadSize ?? DEFAULT_MAX_PAYLOAD_SIZE);
    this.#receive();
  }

  #receive(): void {
    this.socket.startReceiving(
      (chunk) => this.#onChunk(chunk),
      (error) => this.#shutdown(error ? this.#error("DISCONNECTED", "socket failed", error) : undefined),
    );
  }

  /**
   * Stops reading the socket (back-pressure: the server is busy with a request). Messages of a
   * chunk already read are still delivered; the peer's further bytes and fds stay in the
   * kernel, charged to it.
   */
  pause(): void {
    if (this.#paused || this.#closed) return;
    this.#paused = true;
    this.socket.stopReceiving();
  }

  resume(): void {
    if (!this.#paused || this.#closed) return;
    this.#paused = false;
    this.#receive();
  }

  /** The main socket: front-end requests, back-end replies. */
  static frontend(socket: UnixSocket, options?: ConnectionOptions): Connection<FrontendRequests> {
    return new Connection(socket, FRONTEND_INDEX, options);
  }

  /** The back-end channel: back-end requests, front-end replies. */
  static backendChannel(socket: UnixSocket, options?: ConnectionOptions): Connection<BackendRequests> {
    return new Connection(socket, BACKEND_INDEX, options);
  }

  get closed(): boolean {
    return this.#closed;
  }

  /** Requests waiting for a reply. */
  get pendingReplies(): number {
    return this.#pending.length;
  }

  /** Takes the negotiated protocol features (sets replyAck from REPLY_ACK). */
  setProtocolFeatures(features: bigint): void {
    this.replyAck = hasFeature(features, ProtocolFeature.REPLY_ACK);
  }

  /**
   * Sends a request. Resolves with the reply when one comes (explicit reply, REPLY_ACK, or
   * `expectReply`), else with null once the bytes are out. Rejects with VhostUserError: TIMEOUT,
   * NACK, DISCONNECTED, CLOSED, or a decode error of the reply.
   */
  request<K extends RequestName<T>>(
    name: K,
    payload: RequestPayload<T, K>,
    options: RequestOptions = {},
  ): Promise<ReplyMessage<ReplyPayload<T, K>> | null> {
    if (this.#closed) return Promise.reject(this.#error("CLOSED", "connection closed", undefined, name));
    let encoded: ReturnType<typeof encodeRequest>;
    const spec = this.index.byName(name);
    const explicit = spec.replies === "always";
    const ack = !explicit && (options.needReply ?? this.replyAck);
    try {
      encoded = encodeRequest(this.index, name, payload, { needReply: ack, fds: options.fds ?? [] });
    } catch (e) {
      return Promise.reject(e);
    }
    const wait = explicit || ack || options.expectReply === true;
    const sent = this.socket.send(encoded.bytes, encoded.fds);
    if (!wait)
      return sent.then(
        () => null,
        (e: unknown) => {
          throw this.#error("DISCONNECTED", "send failed", e, name);
        },
      );
    return new Promise<ReplyMessage<ReplyPayload<T, K>>>((resolve, reject) => {
      const timeoutMs = options.timeoutMs ?? this.timeoutMs;
      const p: Pending = {
        name,
        code: spec.code,
        ack,
        resolve: resolve as (m: ReplyMessage<unknown>) => void,
        reject,
        timer: setTimeout(() => {
          this.#removePending(p);
          this.#abandoned.set(p.code, (this.#abandoned.get(p.code) ?? 0) + 1);
          reject(
            new VhostUserError("TIMEOUT", `no reply within ${timeoutMs} ms on ${this.label}`, {
              request: name,
              value: timeoutMs,
            }),
          );
        }, timeoutMs),
      };
      this.#pending.push(p);
      sent.catch((e: unknown) => {
        if (this.#removePending(p)) reject(this.#error("DISCONNECTED", "send failed", e, name));
      });
    });
  }

  /** Sends the explicit reply to `msg` (GET_FEATURES → u64, GET_VRING_BASE → vring state, ...). */
  reply<K extends RequestName<T>>(
    msg: { readonly name: K },
    payload: ReplyPayload<T, K>,
    fds: readonly (Fd | number)[] = [],
  ): Promise<void> {
    // Not async: on the control path a reply that goes out at once costs no promise of its own.
    if (this.#closed) return Promise.reject(this.#error("CLOSED", "connection closed", undefined, msg.name));
    let encoded: ReturnType<typeof encodeReply>;
    try {
      encoded = encodeReply(this.index, msg.name, payload, fds);
    } catch (e) {
      return Promise.reject(e);
    }
    return this.socket.send(encoded.bytes, encoded.fds);
  }

  /**
   * REPLY_ACK: answers `msg` with a u64 status (0 = success) when it carried NEED_REPLY and has no
   * explicit reply of its own; does nothing otherwise. Resolves with whether an ack went out.
   */
  ack(
    msg: { readonly code: number; readonly needReply: boolean; readonly name: string },
    status = 0n,
  ): Promise<boolean> {
    const spec = this.index.byCode(msg.code);
    if (!msg.needReply || !spec || spec.replies === "always") return NOT_ACKED;
    if (this.#closed) return Promise.reject(this.#error("CLOSED", "connection closed", undefined, msg.name));
    const bytes = new Uint8Array(HEADER_SIZE + 8);
    encodeHeader({ request: msg.code, flags: VHOST_USER_VERSION | VHOST_USER_REPLY_MASK, size: 8 }, bytes);
    try {
      bytes.set(U64.encode(status, msg.name), HEADER_SIZE);
    } catch (e) {
      return Promise.reject(e);
    }
    return this.socket.send(bytes).then(acked);
  }

  close(): void {
    this.#shutdown(this.#error("CLOSED", "connection closed"));
  }

  [Symbol.dispose](): void {
    this.close();
  }

  #error(code: "DISCONNECTED" | "CLOSED", message: string, cause?: unknown, request?: string): VhostUserError {
    return new VhostUserError(code, `${message} (${this.label})`, { request, cause });
  }

  #removePending(p: Pending): boolean {
    const i = this.#pending.indexOf(p);
    if (i < 0) return false;
    this.#pending.splice(i, 1);
    clearTimeout(p.timer);
    return true;
  }

  #onChunk(chunk: Chunk): void {
    if (this.#closed) {
      for (const f of chunk.fds) f.close();
      return;
    }
    let messages: RawMessage[];
    try {
      messages = this.#framer.push(chunk.data, chunk.fds, chunk.fdsTruncated);
    } catch (e) {
      const err = e instanceof VhostUserError ? e : new VhostUserError("BAD_SIZE", "framing failed", { cause: e });
      this.emit("protocolError", err);
      this.#shutdown(err);
      return;
    }
    for (const m of messages) {
      if (this.#closed) {
        for (const f of m.fds) f.close();
        continue;
      }
      this.#dispatch(m);
    }
  }

  #dispatch(m: RawMessage): void {
    const name = this.index.byCode(m.header.request)?.name;
    if (m.fdsTruncated) {
      for (const f of m.fds) f.close();
      this.#fail(m, new VhostUserError("FDS_TRUNCATED", "the kernel dropped fds of this message", { request: name }));
      return;
    }
    if (isReply(m.header.flags)) this.#onReply(m);
    else this.#onRequest(m);
  }

  /** A bad message that a requester waits for fails that request; otherwise it is a protocol error. */
  #fail(m: RawMessage, err: VhostUserError): void {
    if (isReply(m.header.flags)) {
      const p = this.#pending.find((x) => x.code === m.header.request);
      if (p) {
        this.#removePending(p);
        p.reject(err);
        return;
      }
    }
    this.emit("protocolError", err);
  }

  #onReply(m: RawMessage): void {
    const p = this.#pending.find((x) => x.code === m.header.request);
    if (!p) {
      for (const f of m.fds) f.close();
      const late = this.#abandoned.get(m.header.request) ?? 0;
      if (late > 0) {
        this.#abandoned.set(m.header.request, late - 1);
        return;
      }
      this.emit(
        "protocolError",
        new VhostUserError("UNEXPECTED_REPLY", "no request waits for this reply", {
          request: this.index.byCode(m.header.request)?.name,
          value: m.header.request,
        }),
      );
      return;
    }
    this.#removePending(p);
    try {
      const reply = p.ack
        ? ackReply(p.name, m)
        : decodeReply(this.index, p.name as RequestName<T>, m.header, m.payload, m.fds);
      const status = p.ack ? (reply.payload as bigint) : null;
      if (status !== null && status !== 0n) {
        for (const f of reply.fds) f.close();
        p.reject(new VhostUserError("NACK", "peer reported failure", { request: p.name, value: status, expected: 0 }));
        return;
      }
      p.resolve(reply);
    } catch (e) {
      p.reject(e as Error);
    }
  }

  #onRequest(m: RawMessage): void {
    let msg: RequestMessage<T>;
    try {
      msg = decodeRequest(this.index, m.header, m.payload, m.fds);
    } catch (e) {
      this.emit("protocolError", e as VhostUserError, m.header);
      return;
    }
    if (this.listenerCount("request") === 0) {
      for (const f of msg.fds) f.close();
      this.emit(
        "protocolError",
        new VhostUserError("UNEXPECTED_REQUEST", "nobody serves requests here", { request: msg.name }),
      );
      return;
    }
    try {
      this.emit("request", msg);
    } catch (e) {
      if (this.listenerCount("handlerError") > 0) this.emit("handlerError", e, msg);
      else
        queueMicrotask(() => {
          throw e;
        });
    }
  }

  #shutdown(error: VhostUserError | undefined): void {
    if (this.#closed) return;
    this.#closed = true;
    this.#framer.close();
    this.socket.close();
    for (const p of this.#pending.splice(0)) {
      clearTimeout(p.timer);
      p.reject(
        error?.code === "CLOSED"
          ? new VhostUserError("CLOSED", `connection closed while waiting (${this.label})`, { request: p.name })
          : new VhostUserError("DISCONNECTED", `peer gone while waiting (${this.label})`, {
              request: p.name,
              cause: error,
            }),
      );
    }
    this.emit("close", error);
  }
}

/** A REPLY_ACK reply: exactly a u64, no fds. */
function ackReply(name: string, m: RawMessage): ReplyMessage<bigint> {
  try {
    checkFlags(m.header, true, name);
    const value = U64.decode(m.payload, name);
    if (m.fds.length !== 0)
      throw new VhostUserError("BAD_FD_COUNT", "REPLY_ACK carries no fds", {
        request: name,
        value: m.fds.length,
        expected: 0,
      });
    return { name, code: m.header.request, flags: m.header.flags, payload: value, fds: [] };
  } catch (e) {
    for (const f of m.fds) f.close();
    throw e;
  }
}
