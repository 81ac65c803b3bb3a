/**
 * A deliberately low-level front-end for the malformed-message suite: raw bytes and fds on a
 * real socket, replies cut by a MessageFramer and returned undecoded, so a test can send what
 * no Connection would and see exactly what the daemon answers (or that it hung up).
 */
import assert from "node:assert/strict";
import { GuestMemory } from "../../src/memory/guest-memory.js";
import { GuestMemoryRegion } from "../../src/memory/region.js";
import { EventFd } from "../../src/sys/eventfd.js";
import type { Fd } from "../../src/sys/fd.js";
import { UnixSocket } from "../../src/sys/unix-socket.js";
import { MessageFramer, type RawMessage } from "../../src/vhost-user/connection.js";
import { featureMask, ProtocolFeature, VirtioFeature } from "../../src/vhost-user/protocol/constants.js";
import { FRONTEND_INDEX, type FrontendRequests } from "../../src/vhost-user/protocol/frontend-requests.js";
import {
  encodeRequest,
  isReply,
  type RequestName,
  type RequestPayload,
} from "../../src/vhost-user/protocol/message.js";
import { type MemoryRegion, U64 } from "../../src/vhost-user/protocol/payloads.js";
import { SplitQueueDriver } from "../../src/virtio/driver.js";
import { features, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX } from "../../src/virtio/features.js";

const MiB = 1 << 20;
/** How long the daemon gets to answer (or hang up on) one message. It answers in microseconds. */
export const ANSWER_MS = 3000;

export const PROTOCOL = featureMask(
  ProtocolFeature.LOG_SHMFD,
  ProtocolFeature.REPLY_ACK,
  ProtocolFeature.MQ,
  ProtocolFeature.CONFIG,
  ProtocolFeature.CONFIGURE_MEM_SLOTS,
  ProtocolFeature.STATUS,
  ProtocolFeature.RESET_DEVICE,
);
export const FEATURES =
  features(VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX) | featureMask(VirtioFeature.VHOST_USER_F_PROTOCOL_FEATURES);

type Name = RequestName<FrontendRequests>;

export class Peer {
  readonly socket: UnixSocket;
  readonly mem: GuestMemory;
  readonly driver: SplitQueueDriver;
  readonly kick = new EventFd();
  readonly call = new EventFd();
  readonly #framer = new MessageFramer(1 << 16);
  readonly #inbox: RawMessage[] = [];
  #ended = false;
  #wake: (() => void) | null = null;

  constructor(path: string) {
    this.socket = UnixSocket.connect(path);
    this.mem = new GuestMemory([GuestMemoryRegion.memfd(0, 4 * MiB)]);
    this.driver = SplitQueueDriver.at(this.mem, 0x10000, 64, { features: features(VIRTIO_RING_F_EVENT_IDX) });
    this.socket.startReceiving(
      (c) => {
        try {
          this.#inbox.push(...this.#framer.push(c.data, c.fds, c.fdsTruncated));
        } catch {
          this.#ended = true;
        }
        this.#wake?.();
      },
      () => {
        this.#ended = true;
        this.#wake?.();
      },
    );
  }

  get region(): GuestMemoryRegion {
    return this.mem.regions[0] as GuestMemoryRegion;
  }

  /** The memory table entry of our one region. */
  get table(): MemoryRegion {
    return { guestAddress: 0n, size: BigInt(this.region.size), userAddress: this.region.hostAddress, mmapOffset: 0n };
  }

  uva(gpa: number): bigint {
    return this.region.hostAddress + BigInt(gpa);
  }

  /** The next message from the daemon, or "closed" once it hung up. Throws after ANSWER_MS. */
  async next(timeoutMs = ANSWER_MS): Promise<RawMessage | "closed"> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const m = this.#inbox.shift();
      if (m) return m;
      if (this.#ended) return "closed";
      const left = deadline - Date.now();
      if (left <= 0) throw new Error(`the daemon neither answered nor hung up within ${timeoutMs} ms`);
      await new Promise<void>((resolve) => {
        const t = setTimeout(resolve, left);
        this.#wake = () => {
          clearTimeout(t);
          resolve();
        };
      });
      this.#wake = null;
    }
  }

  send(bytes: Uint8Array, fds: readonly (Fd | number)[] = []): Promise<void> {
    return this.socket.send(bytes, fds);
  }

  /** A well-formed request with NEED_REPLY where it applies; checks that it succeeded, returns the reply. */
  async request<K extends Name>(
    name: K,
    payload: RequestPayload<FrontendRequests, K>,
    fds: readonly (Fd | number)[] = [],
  ): Promise<RawMessage> {
    const spec = FRONTEND_INDEX.byName(name);
    const ack = spec.replies !== "always";
    const e = encodeRequest(FRONTEND_INDEX, name, payload, { needReply: ack, fds });
    await this.send(e.bytes, e.fds);
    const r = await this.next();
    assert.notEqual(r, "closed", `${name}: the daemon hung up on a well-formed request`);
    const m = r as RawMessage;
    assert.equal(m.header.request, spec.code, `${name}: reply to another request`);
    assert.ok(isReply(m.header.flags), `${name}: reply without REPLY flag`);
    if (ack && name !== "SET_LOG_BASE") assert.equal(U64.decode(m.payload, name), 0n, `${name} was refused`);
    return m;
  }

  /** SET_OWNER, features, protocol features (REPLY_ACK), the memory table; with `ring`, queue 0 running. */
  async handshake(ring: boolean): Promise<void> {
    await this.request("SET_OWNER", undefined);
    await this.request("GET_FEATURES", undefined);
    await this.request("SET_PROTOCOL_FEATURES", PROTOCOL);
    await this.request("SET_FEATURES", FEATURES);
    await this.request("SET_MEM_TABLE", { regions: [this.table] }, [this.region.backing.fd as Fd]);
    if (ring) await this.startRing();
  }

  async startRing(): Promise<void> {
    const d = this.driver;
    await this.request("SET_VRING_NUM", { index: 0, num: d.size });
    await this.request("SET_VRING_BASE", { index: 0, num: 0 });
    await this.request("SET_VRING_ADDR", {
      index: 0,
      flags: 0,
      descriptor: this.uva(d.descTable),
      used: this.uva(d.usedRing),
      available: this.uva(d.availRing),
      log: 0n,
    });
    await this.request("SET_VRING_CALL", { index: 0, noFd: false }, [this.call.fd]);
    await this.request("SET_VRING_KICK", { index: 0, noFd: false }, [this.kick.fd]);
    await this.request("SET_VRING_ENABLE", { index: 0, num: 1 });
  }

  /** One echo request through queue 0; checks the bytes that come back. */
  async echo(tag: number): Promise<void> {
    const data = Uint8Array.from({ length: 64 }, (_, i) => (i * 13 + tag) & 0xff);
    this.mem.write(0x100000, data);
    this.mem.fill(0x200000, data.length, 0);
    this.driver.add([{ addr: 0x100000, len: data.length }], [{ addr: 0x200000, len: data.length }]);
    const called = new Promise<void>((resolve, reject) => {
      const t = setTimeout(() => {
        w.close();
        reject(new Error("no call notification: the echo request was not served"));
      }, ANSWER_MS);
      const w = this.call.onSignal(() => {
        clearTimeout(t);
        w.close();
        resolve();
      });
    });
    if (this.driver.publish()) this.kick.signal();
    await called;
    // A ring that (re)starts with used entries interrupts once on its own, so the call may come
    // before this request's completion: give the completion a moment.
    let used = this.driver.getUsed();
    for (let i = 0; i < 200 && !used; i++) {
      await new Promise((r) => setTimeout(r, 5));
      used = this.driver.getUsed();
    }
    assert.ok(used, "a used element came back");
    assert.equal(used.len, data.length);
    assert.deepEqual(this.mem.read(0x200000, data.length), data);
  }

  close(): void {
    this.socket.close();
    for (const m of this.#inbox.splice(0)) for (const f of m.fds) f.close();
    this.kick.close();
    this.call.close();
    this.mem.close();
  }
}
