/**
 * Test peers that answer the way rust-vmm's `vhost` crate does (vhost/src/vhost_user/
 * backend_req_handler.rs and frontend.rs), byte for byte where it matters:
 *
 * - RustVmmBackend: SET_LOG_BASE is answered with the request's 16-byte VhostUserLog echoed
 *   (`send_reply_message(&hdr, &msg)`); a GET_CONFIG whose size the device cannot fill is
 *   answered with a 12-byte VhostUserConfig header of size 0 and no payload; acks go out only
 *   when REPLY_ACK is negotiated and the request carried NEED_REPLY (`send_ack_message`).
 * - RustVmmFrontend: reads replies as `recv_body::<T>()` does: exactly header + sizeof(T) bytes
 *   (recv_into_iovec_all keeps reading until both iovecs are full); for SET_LOG_BASE under
 *   LOG_SHMFD that is `recv_reply::<VhostUserLog>`, 28 bytes. Like Cloud Hypervisor, it sets
 *   NEED_REPLY on every request once REPLY_ACK is negotiated (set_hdr_flags).
 */
import type { Fd } from "../../../src/sys/fd.js";
import { UnixListener, UnixSocket } from "../../../src/sys/unix-socket.js";
import { Connection } from "../../../src/vhost-user/connection.js";
import {
  featureMask,
  HEADER_SIZE,
  hasFeature,
  ProtocolFeature,
  VHOST_USER_NEED_REPLY_MASK,
  VHOST_USER_REPLY_MASK,
  VHOST_USER_VERSION,
  VirtioFeature,
} from "../../../src/vhost-user/protocol/constants.js";
import { FRONTEND_INDEX, type FrontendRequests } from "../../../src/vhost-user/protocol/frontend-requests.js";
import { decodeHeader, encodeHeader, type RequestMessage } from "../../../src/vhost-user/protocol/message.js";
import { ConfigCodec, LogCodec, U64 } from "../../../src/vhost-user/protocol/payloads.js";

function frame(request: number, flags: number, payload: Uint8Array): Uint8Array {
  const b = new Uint8Array(HEADER_SIZE + payload.length);
  encodeHeader({ request, flags, size: payload.length }, b);
  b.set(payload, HEADER_SIZE);
  return b;
}

const REPLY = VHOST_USER_VERSION | VHOST_USER_REPLY_MASK;

export interface RustVmmBackendOptions {
  features: bigint;
  protocolFeatures: bigint;
  /** The device's config space; GET_CONFIG past its end gets the size-0 header. */
  config: Uint8Array;
}

/** One connection at a time, like vhost-user-backend's daemon. */
export class RustVmmBackend {
  readonly #listener: UnixListener;
  readonly #o: RustVmmBackendOptions;
  readonly #conns = new Set<Connection<FrontendRequests>>();
  readonly seen: string[] = [];
  #closed = false;

  constructor(path: string, o: RustVmmBackendOptions) {
    this.#o = o;
    this.#listener = UnixListener.listen(path);
    void this.#acceptLoop();
  }

  async #acceptLoop(): Promise<void> {
    while (!this.#closed) {
      let s: UnixSocket;
      try {
        s = await this.#listener.accept();
      } catch {
        return;
      }
      this.#serve(s);
    }
  }

  #serve(s: UnixSocket): void {
    const conn = Connection.frontend(s, { label: "rust-vmm back-end" });
    this.#conns.add(conn);
    let virtio = 0n;
    let offeredProtocol = 0n;
    let ackedProtocol = 0n;
    const replyAck = () =>
      (virtio & featureMask(VirtioFeature.VHOST_USER_F_PROTOCOL_FEATURES)) !== 0n &&
      hasFeature(offeredProtocol, ProtocolFeature.REPLY_ACK) &&
      hasFeature(ackedProtocol, ProtocolFeature.REPLY_ACK);
    const send = (b: Uint8Array) => void s.send(b).catch(() => undefined);
    const ack = (m: RequestMessage<FrontendRequests>) => {
      if (replyAck() && m.needReply) send(frame(m.code, REPLY, U64.encode(0n)));
    };
    conn.on("protocolError", () => conn.close()); // Err(InvalidMessage): the connection ends
    conn.on("close", () => this.#conns.delete(conn));
    conn.on("request", (m) => {
      this.seen.push(m.name);
      for (const f of m.fds as Fd[]) f.close();
      switch (m.name) {
        case "GET_FEATURES":
          virtio = this.#o.features;
          return send(frame(m.code, REPLY, U64.encode(virtio)));
        case "GET_PROTOCOL_FEATURES":
          offeredProtocol = this.#o.protocolFeatures;
          return send(frame(m.code, REPLY, U64.encode(offeredProtocol)));
        case "SET_PROTOCOL_FEATURES":
          ackedProtocol = m.payload;
          return ack(m);
        case "GET_QUEUE_NUM":
          return send(frame(m.code, REPLY, U64.encode(1n)));
        case "GET_CONFIG": {
          const { offset, flags, data } = m.payload;
          const bytes = this.#o.config.slice(offset, offset + data.length);
          // Ok(buf) with buf.len() != size: VhostUserConfig::new(offset, 0, flags), no payload.
          return send(
            frame(
              m.code,
              REPLY,
              ConfigCodec.encode({ offset, flags, data: bytes.length === data.length ? bytes : new Uint8Array(0) }),
            ),
          );
        }
        case "SET_LOG_BASE": {
          if (!hasFeature(ackedProtocol, ProtocolFeature.LOG_SHMFD) || "address" in m.payload) return conn.close();
          // self.send_reply_message(&hdr, &msg): the VhostUserLog it was sent.
          return send(frame(m.code, REPLY, LogCodec.encode(m.payload)));
        }
        default:
          return ack(m);
      }
    });
  }

  async close(): Promise<void> {
    this.#closed = true;
    for (const c of this.#conns) c.close();
    this.#listener.close();
  }
}

/** rust-vmm's front-end endpoint: blocking-style exact reads over our non-blocking socket. */
export class RustVmmFrontend {
  readonly socket: UnixSocket;
  #buf = new Uint8Array(0);
  #wake: (() => void) | null = null;
  #ended = false;
  #hdrFlags = 0;

  constructor(path: string) {
    this.socket = UnixSocket.connect(path);
    this.socket.startReceiving(
      (c) => {
        for (const f of c.fds) f.close();
        const b = new Uint8Array(this.#buf.length + c.data.length);
        b.set(this.#buf);
        b.set(c.data, this.#buf.length);
        this.#buf = b;
        this.#wake?.();
      },
      () => {
        this.#ended = true;
        this.#wake?.();
      },
    );
  }

  /** set_hdr_flags(NEED_REPLY), as Cloud Hypervisor does once REPLY_ACK is negotiated. */
  needReplyOnEveryRequest(): void {
    this.#hdrFlags = VHOST_USER_NEED_REPLY_MASK;
  }

  /** recv_into_iovec_all: exactly `n` bytes, or an error after `failAfterMs` (the test then fails). */
  async readExactly(n: number, failAfterMs = 3000): Promise<Uint8Array> {
    const deadline = Date.now() + failAfterMs;
    while (this.#buf.length < n) {
      if (this.#ended) throw new Error(`peer hung up with ${this.#buf.length} of ${n} bytes`);
      const left = deadline - Date.now();
      if (left <= 0) throw new Error(`blocked: ${this.#buf.length} of the ${n} bytes recv_body waits for`);
      await new Promise<void>((resolve) => {
        const t = setTimeout(resolve, left);
        this.#wake = () => {
          clearTimeout(t);
          resolve();
        };
      });
      this.#wake = null;
    }
    const out = this.#buf.slice(0, n);
    this.#buf = this.#buf.slice(n);
    return out;
  }

  get buffered(): number {
    return this.#buf.length;
  }

  async send(name: keyof FrontendRequests & string, payload: Uint8Array, fds: readonly Fd[] = []): Promise<number> {
    const code = FRONTEND_INDEX.byName(name).code;
    await this.socket.send(frame(code, VHOST_USER_VERSION | this.#hdrFlags, payload), fds);
    return code;
  }

  /** recv_reply::<T>: header + exactly `size` bytes, checked to answer `code`. */
  async recvReply(code: number, size: number): Promise<Uint8Array> {
    const b = await this.readExactly(HEADER_SIZE + size);
    const h = decodeHeader(b);
    if (h.request !== code || (h.flags & VHOST_USER_REPLY_MASK) === 0)
      throw new Error(`not a reply to ${code}: request ${h.request} flags ${h.flags}`);
    return b.subarray(HEADER_SIZE);
  }

  /** wait_for_ack: only with REPLY_ACK and NEED_REPLY; a u64 that must be 0. */
  async waitForAck(code: number): Promise<void> {
    if (this.#hdrFlags === 0) return;
    const v = U64.decode(await this.recvReply(code, 8), "ack");
    if (v !== 0n) throw new Error(`BackendInternalError: ack ${v}`);
  }

  async u64(name: "GET_FEATURES" | "GET_PROTOCOL_FEATURES" | "GET_QUEUE_NUM"): Promise<bigint> {
    const code = await this.send(name, new Uint8Array(0));
    return U64.decode(await this.recvReply(code, 8), name);
  }

  close(): void {
    this.socket.close();
  }
}
