/**
 * One front-end connection to the back-end: every control message of the vhost-user spec,
 * handled strictly in order (a handler that waits — for the dirty-log switch, for a worker
 * to stop a ring — delays the next message, as the protocol requires).
 *
 * Ring states (spec, "Ring states"): a ring is started by SET_VRING_KICK and stopped by
 * GET_VRING_BASE; it is enabled from the start unless VHOST_USER_F_PROTOCOL_FEATURES was
 * negotiated, in which case SET_VRING_ENABLE switches it. Only started, enabled rings are
 * processed.
 *
 * Dirty logging: the log the front-end sent (SET_LOG_BASE) is in force exactly while
 * VHOST_F_LOG_ALL is negotiated; every switch goes through SharedDirtyLog.replace(), so when
 * we answer SET_LOG_BASE (or ack SET_FEATURES), no queue worker can still mark the old log.
 * Clearing LOG_ALL (migration done or cancelled) stops all marking.
 */
import { toLength } from "../../memory/guest-address.js";
import { DirtyLogArea, SharedDirtyLog } from "../../memory/shared-dirty-log.js";
import type { Fd } from "../../sys/fd.js";
import { Mapping } from "../../sys/mapping.js";
import { createMemfd } from "../../sys/memfd.js";
import { UnixSocket } from "../../sys/unix-socket.js";
import { UFFDIO_REGISTER_MODE_MISSING, Userfaultfd } from "../../sys/userfaultfd.js";
import { Connection } from "../connection.js";
import { featureMask, hasFeature, ProtocolFeature, VHOST_VRING_F_LOG, VirtioFeature } from "../protocol/constants.js";
import { VhostUserError } from "../protocol/errors.js";
import type { FrontendRequests } from "../protocol/frontend-requests.js";
import { type Header, needsReply, type RequestMessage } from "../protocol/message.js";
import type { MemoryRegion, VringAddr } from "../protocol/payloads.js";
import type { VhostUserDevice } from "./device.js";
import { inflightQueueSize, type SharedInflightQueue } from "./inflight.js";
import { BackendMemoryTable, checkFdCovers, type MappedRegion, mapRegion } from "./memory-table.js";
import { QueueThread } from "./queue-thread.js";

type Msg = RequestMessage<FrontendRequests>;

/** Memory slots offered with CONFIGURE_MEM_SLOTS (QEMU's x86 maximum). */
export const MAX_MEM_SLOTS = 509;

const LOG_ALL = featureMask(VirtioFeature.VHOST_F_LOG_ALL);
const PROTOCOL_FEATURES = featureMask(VirtioFeature.VHOST_USER_F_PROTOCOL_FEATURES);

/** Protocol features the framework implements for every device. */
export const FRAMEWORK_PROTOCOL_FEATURES = featureMask(
  ProtocolFeature.LOG_SHMFD,
  ProtocolFeature.REPLY_ACK,
  ProtocolFeature.BACKEND_REQ,
  ProtocolFeature.CONFIGURE_MEM_SLOTS,
  ProtocolFeature.STATUS,
  ProtocolFeature.RESET_DEVICE,
  ProtocolFeature.PAGEFAULT,
  ProtocolFeature.DEVICE_STATE,
);

/** A region as described in our postcopy replies: its user address is where WE mapped it. */
function ourMapping(r: MappedRegion): MemoryRegion {
  return {
    guestAddress: BigInt(r.guestAddress),
    size: BigInt(r.size),
    userAddress: r.region.hostAddress,
    mmapOffset: r.mmapOffset,
  };
}

interface Vring {
  size: number;
  addr: VringAddr | null;
  base: number;
  kick: Fd | null;
  call: Fd | null;
  err: Fd | null;
  started: boolean;
  enabled: boolean;
  thread: QueueThread | null;
}

export interface SessionEvents {
  log(level: "info" | "warn" | "error", message: string): void;
}

export class BackendSession {
  readonly conn: Connection<FrontendRequests>;
  readonly #device: VhostUserDevice;
  readonly #events: SessionEvents;
  readonly #memory = new BackendMemoryTable();
  readonly #vrings: Vring[];
  readonly #log = new SharedDirtyLog();
  #logArea: DirtyLogArea | null = null;
  #features = 0n;
  #protocolFeatures = 0n;
  #status = 0;
  #backendChannel: Connection<never> | null = null;
  #uffd: Userfaultfd | null = null;
  #postcopyListening = false;
  /** Regions mapped while listening, waiting for the front-end's ack before uffd registration. */
  #awaitingPostcopyAck: MappedRegion[] | null = null;
  #queue: Promise<void> = Promise.resolve();
  #closed: Promise<void>;
  #closing = false;

  constructor(socket: UnixSocket, device: VhostUserDevice, events: SessionEvents) {
    this.#device = device;
    this.#events = events;
    this.#vrings = Array.from({ length: device.info.numQueues }, () => ({
      size: 0,
      addr: null,
      base: 0,
      kick: null,
      call: null,
      err: null,
      started: false,
      enabled: false,
      thread: null,
    }));
    // Memory tables with 8 regions and config spaces fit; nothing legitimate is bigger.
    this.conn = Connection.frontend(socket, { label: "front-end", maxPayloadSize: 4096 });
    let done: () => void = () => undefined;
    this.#closed = new Promise((r) => {
      done = r;
    });
    this.conn.on("request", (m) => {
      this.#queue = this.#queue.then(() => this.#serve(m));
    });
    this.conn.on("protocolError", (e, header) => {
      events.log("warn", `malformed message: ${e.message}`);
      // In order behind the messages before it, like any request.
      this.#queue = this.#queue.then(() => this.#refuseMalformed(e, header));
    });
    this.conn.on("close", (e) => {
      if (e && e.code !== "CLOSED") events.log("info", `front-end gone: ${e.message}`);
      this.#queue = this.#queue.then(() => this.#teardown()).then(done);
    });
  }

  /** Resolves when the connection is gone and everything it held is released. */
  get closed(): Promise<void> {
    return this.#closed;
  }

  get features(): bigint {
    return this.#features;
  }

  get protocolFeatures(): bigint {
    return this.#protocolFeatures;
  }

  /** The shared dirty log (tests and devices may create writers on it). */
  get dirtyLog(): SharedDirtyLog {
    return this.#log;
  }

  /** Tells the front-end the config space changed (needs BACKEND_REQ and CONFIG). */
  async notifyConfigChange(): Promise<void> {
    const ch = this.#backendChannel as Connection<import("../protocol/backend-requests.js").BackendRequests> | null;
    if (!ch) throw new VhostUserError("CLOSED", "no back-end request channel (SET_BACKEND_REQ_FD not received)");
    await ch.request("CONFIG_CHANGE_MSG", undefined as never);
  }

  close(): void {
    this.conn.close();
  }

  offeredFeatures(): bigint {
    const packed = this.#device.info.packedRing ? featureMask(VirtioFeature.VIRTIO_F_RING_PACKED) : 0n;
    return this.#device.info.features | packed | PROTOCOL_FEATURES | LOG_ALL;
  }

  offeredProtocolFeatures(): bigint {
    let f = FRAMEWORK_PROTOCOL_FEATURES | this.#device.info.protocolFeatures;
    if (this.#device.info.numQueues > 1) f |= featureMask(ProtocolFeature.MQ);
    if (this.#device.getConfig) f |= featureMask(ProtocolFeature.CONFIG);
    return f & ~(this.#device.info.withoutProtocolFeatures ?? 0n);
  }

  async #serve(m: Msg): Promise<void> {
    if (this.#closing) {
      for (const f of m.fds) f.close();
      return;
    }
    try {
      await this.#handle(m);
    } catch (e) {
      for (const f of m.fds) if (!f.closed) f.close();
      const err = e as Error;
      this.#events.log("warn", `${m.name} failed: ${err.message}`);
      // NEED_REPLY on a request with an explicit reply changes nothing ("no behavioural change"):
      // there is no NACK for it, only the hang-up below.
      if (this.#hasExplicitReply(m.name) || this.#replyExpected(m)) {
        // The front-end waits for a reply we cannot give: drop the connection rather than
        // leave it hanging; it can reconnect.
        this.conn.close();
      } else if (m.needReply) {
        await this.conn.ack(m, 1n).catch(() => undefined);
      }
    }
  }

  /**
   * A message that could not be decoded must not vanish: the front-end would wait for its
   * REPLY_ACK forever, or believe a change happened that did not. A request that asked for
   * REPLY_ACK and whose header is sound gets a NACK; anything else (bad version or flags, an
   * unknown code, a request whose reply we cannot give) costs the connection.
   */
  async #refuseMalformed(e: VhostUserError, header: Header | undefined): Promise<void> {
    if (this.#closing) return;
    const spec = header ? this.conn.index.byCode(header.request) : undefined;
    const payloadLevel =
      e.code === "BAD_SIZE" || e.code === "BAD_FD_COUNT" || e.code === "BAD_VALUE" || e.code === "TOO_MANY_REGIONS";
    if (header && spec && payloadLevel && needsReply(header.flags) && spec.replies !== "always") {
      await this.conn.ack({ code: spec.code, needReply: true, name: spec.name }, 1n).catch(() => undefined);
      return;
    }
    this.conn.close();
  }

  /** The front-end waits for a reply the spec gives only in this state (SET_LOG_BASE with LOG_SHMFD, postcopy mappings). */
  #replyExpected(m: Msg): boolean {
    if (m.name === "SET_LOG_BASE") return hasFeature(this.#protocolFeatures, ProtocolFeature.LOG_SHMFD);
    if (m.name === "SET_MEM_TABLE" || m.name === "ADD_MEM_REG") return this.#postcopyListening;
    return false;
  }

  #hasExplicitReply(name: string): boolean {
    const spec = this.conn.index.byName(name as never) as { replies?: string } | undefined;
    return spec?.replies === "always";
  }

  #ring(index: number, request: string): Vring {
    const v = this.#vrings[index];
    if (!v)
      throw new VhostUserError("BAD_VALUE", "vring index out of range", {
        request,
        value: index,
        expected: `< ${this.#vrings.length}`,
      });
    return v;
  }

  async #handle(m: Msg): Promise<void> {
    switch (m.name) {
      case "GET_FEATURES":
        return this.conn.reply(m, this.offeredFeatures());
      case "SET_FEATURES": {
        const f = m.payload;
        const extra = f & ~this.offeredFeatures();
        if (extra !== 0n)
          throw new VhostUserError("BAD_VALUE", "features not offered", { request: m.name, value: extra });
        this.#features = f;
        this.#device.setFeatures?.(f);
        await this.#applyLog();
        return void (await this.conn.ack(m));
      }
      case "GET_PROTOCOL_FEATURES":
        return this.conn.reply(m, this.offeredProtocolFeatures());
      case "SET_PROTOCOL_FEATURES": {
        const extra = m.payload & ~this.offeredProtocolFeatures();
        if (extra !== 0n)
          throw new VhostUserError("BAD_VALUE", "protocol features not offered", { request: m.name, value: extra });
        this.#protocolFeatures = m.payload;
        this.conn.setProtocolFeatures(m.payload);
        return void (await this.conn.ack(m));
      }
      case "SET_OWNER":
        return void (await this.conn.ack(m));
      case "RESET_OWNER":
        // Deprecated; the spec recommends ignoring it or disabling the rings: disable them.
        for (const v of this.#vrings) await this.#setEnabled(v, false);
        return void (await this.conn.ack(m));
      case "GET_QUEUE_NUM":
        return this.conn.reply(m, BigInt(this.#device.info.numQueues));
      case "GET_MAX_MEM_SLOTS":
        return this.conn.reply(m, BigInt(MAX_MEM_SLOTS));
      case "SET_MEM_TABLE":
        return this.#setMemTable(m as Extract<Msg, { name: "SET_MEM_TABLE" }>);
      case "ADD_MEM_REG":
        return this.#addMemReg(m as Extract<Msg, { name: "ADD_MEM_REG" }>);
      case "REM_MEM_REG": {
        for (const f of m.fds) f.close();
        const removed = this.#memory.remove(m.payload, m.name);
        await this.#pushMemory();
        if (removed.registered) this.#uffd?.unregister(removed.region.hostAddress, removed.size);
        removed.region.close();
        return void (await this.conn.ack(m));
      }
      case "SET_LOG_BASE": {
        const fd = m.fds[0];
        if (!fd)
          throw new VhostUserError("BAD_FD_COUNT", "SET_LOG_BASE without an fd (LOG_SHMFD)", { request: m.name });
        checkFdCovers(fd, m.payload.mmapOffset, m.payload.mmapSize, "dirty log", m.name);
        const area = DirtyLogArea.map(fd, m.payload.mmapSize, m.payload.mmapOffset);
        const old = this.#logArea;
        this.#logArea = area;
        await this.#applyLog();
        // Nobody marks the old log any more: it can go, and the front-end may read it now.
        if (old && old !== area) old.close();
        if (hasFeature(this.#protocolFeatures, ProtocolFeature.LOG_SHMFD)) return this.conn.reply(m, 0n);
        return void (await this.conn.ack(m));
      }
      case "SET_LOG_FD":
        for (const f of m.fds) f.close();
        return void (await this.conn.ack(m));
      case "SET_VRING_NUM": {
        const v = this.#ring(m.payload.index, m.name);
        const n = m.payload.num;
        if (n === 0 || (n & (n - 1)) !== 0 || n > this.#device.info.maxQueueSize) {
          throw new VhostUserError("BAD_VALUE", "queue size must be a power of two within the device maximum", {
            request: m.name,
            value: n,
            expected: `≤ ${this.#device.info.maxQueueSize}`,
          });
        }
        v.size = n;
        return void (await this.conn.ack(m));
      }
      case "SET_VRING_ADDR": {
        const v = this.#ring(m.payload.index, m.name);
        const oldAddr = v.addr;
        v.addr = m.payload;
        // A started ring picks up the new addresses (e.g. the log flag switched during migration).
        // Refused addresses must not stay behind for the next SET_VRING_KICK.
        if (v.started) {
          try {
            await this.#startRing(m.payload.index, v, m.name);
          } catch (e) {
            v.addr = oldAddr;
            throw e;
          }
        }
        return void (await this.conn.ack(m));
      }
      case "SET_VRING_BASE": {
        const v = this.#ring(m.payload.index, m.name);
        // Packed rings: the whole u32 (avail index and wrap counter low, used ones high).
        v.base = hasFeature(this.#features, VirtioFeature.VIRTIO_F_RING_PACKED)
          ? m.payload.num >>> 0
          : m.payload.num & 0xffff;
        return void (await this.conn.ack(m));
      }
      case "GET_VRING_BASE": {
        const v = this.#ring(m.payload.index, m.name);
        let next = v.base;
        if (v.started && v.thread) {
          const r = await v.thread.request({ type: "stop" });
          next = r.nextAvail ?? next;
        }
        v.started = false;
        v.base = next;
        // "stops the ring": the kick fd is no longer used.
        v.kick?.close();
        v.kick = null;
        if (hasFeature(this.#features, VirtioFeature.VHOST_USER_F_PROTOCOL_FEATURES)) v.enabled = false;
        return this.conn.reply(m, { index: m.payload.index, num: next });
      }
      case "SET_VRING_KICK":
      case "SET_VRING_CALL":
      case "SET_VRING_ERR": {
        const v = this.#ring(m.payload.index, m.name);
        const fd = m.payload.noFd ? null : (m.fds[0] ?? null);
        if (m.name === "SET_VRING_KICK") {
          if (!fd)
            throw new VhostUserError("BAD_VALUE", "polling rings (no kick fd) are not supported", { request: m.name });
          const old = v.kick;
          v.kick = fd;
          try {
            await this.#startRing(m.payload.index, v, m.name);
          } catch (e) {
            // The ring (if it runs) still polls the old fd: keep it; the new one is closed by #serve.
            v.kick = old;
            throw e;
          }
          old?.close();
        } else {
          const which = m.name === "SET_VRING_CALL" ? "call" : "err";
          const old = v[which];
          v[which] = fd;
          if (v.started && v.thread) {
            await v.thread.request({ type: "fds", callFd: v.call?.fd ?? -1, errFd: v.err?.fd ?? -1 });
          }
          old?.close();
        }
        return void (await this.conn.ack(m));
      }
      case "SET_VRING_ENABLE": {
        if (!hasFeature(this.#features, VirtioFeature.VHOST_USER_F_PROTOCOL_FEATURES)) {
          throw new VhostUserError("UNEXPECTED_REQUEST", "SET_VRING_ENABLE needs VHOST_USER_F_PROTOCOL_FEATURES", {
            request: m.name,
          });
        }
        const v = this.#ring(m.payload.index, m.name);
        await this.#setEnabled(v, m.payload.num !== 0);
        return void (await this.conn.ack(m));
      }
      case "GET_CONFIG": {
        const { offset, flags, data } = m.payload;
        if (!this.#device.getConfig)
          throw new VhostUserError("UNEXPECTED_REQUEST", "device has no config space", { request: m.name });
        const bytes = this.#device.getConfig(offset, data.length);
        return this.conn.reply(m, { offset, flags, data: bytes });
      }
      case "SET_CONFIG": {
        if (!this.#device.setConfig)
          throw new VhostUserError("UNEXPECTED_REQUEST", "config space is read-only", { request: m.name });
        this.#device.setConfig(m.payload.offset, m.payload.data);
        return void (await this.conn.ack(m));
      }
      case "SET_BACKEND_REQ_FD": {
        const fd = m.fds[0];
        if (!fd) throw new VhostUserError("BAD_FD_COUNT", "no socket fd", { request: m.name });
        this.#backendChannel?.close();
        const ch = Connection.backendChannel(new UnixSocket(fd), { label: "back-end channel" });
        ch.on("close", () => {
          if (this.#backendChannel === (ch as unknown)) this.#backendChannel = null;
        });
        this.#backendChannel = ch as unknown as Connection<never>;
        return void (await this.conn.ack(m));
      }
      case "SET_STATUS": {
        const s = Number(m.payload & 0xffn);
        this.#status = s;
        if (s === 0) await this.#resetDevice();
        return void (await this.conn.ack(m));
      }
      case "GET_STATUS":
        return this.conn.reply(m, BigInt(this.#status));
      case "RESET_DEVICE":
        await this.#resetDevice();
        return void (await this.conn.ack(m));
      case "SET_DEVICE_STATE_FD":
        return this.#deviceStateFd(m as Extract<Msg, { name: "SET_DEVICE_STATE_FD" }>);
      case "CHECK_DEVICE_STATE": {
        const r = this.#stateTransfer;
        this.#stateTransfer = null;
        const ok = r
          ? await r.then(
              () => true,
              (e: Error) => {
                this.#events.log("warn", `device state: ${e.message}`);
                return false;
              },
            )
          : true;
        return this.conn.reply(m, ok ? 0n : 1n);
      }
      case "POSTCOPY_ADVISE": {
        if (!hasFeature(this.#protocolFeatures, ProtocolFeature.PAGEFAULT)) {
          // A reply without a userfaultfd is the spec's way to say no.
          this.#events.log("warn", "POSTCOPY_ADVISE without VHOST_USER_PROTOCOL_F_PAGEFAULT negotiated: refused");
          return this.conn.reply(m, undefined as never, []);
        }
        // Kernel-mode faults must be delivered too (a pread into guest memory), so no
        // UFFD_USER_MODE_ONLY: this needs the privilege QEMU's own postcopy needs.
        this.#uffd?.close();
        const uffd = Userfaultfd.create({ userModeOnly: false });
        this.#uffd = uffd;
        return this.conn.reply(m, undefined as never, [uffd.fd]);
      }
      case "POSTCOPY_LISTEN": {
        if (!this.#uffd)
          throw new VhostUserError("UNEXPECTED_REQUEST", "POSTCOPY_LISTEN before POSTCOPY_ADVISE", { request: m.name });
        this.#postcopyListening = true;
        for (const r of this.#memory.regions) this.#register(r);
        return void (await this.conn.ack(m));
      }
      case "POSTCOPY_END": {
        this.#postcopyListening = false;
        for (const r of this.#memory.regions) r.registered = false;
        this.#uffd?.close();
        this.#uffd = null;
        return this.conn.reply(m, 0n);
      }
      case "GET_INFLIGHT_FD": {
        this.#requireInflight(m.name);
        const { numQueues, queueSize } = m.payload;
        if (numQueues < 1 || numQueues > this.#device.info.numQueues || queueSize < 1 || queueSize > 32768) {
          throw new VhostUserError("BAD_VALUE", "inflight queue count or size out of range", {
            request: m.name,
            value: `${numQueues}x${queueSize}`,
          });
        }
        const size = numQueues * inflightQueueSize(queueSize);
        const fd = createMemfd("vmshift-inflight", size, { sealSize: true });
        const map = Mapping.map(fd, size);
        this.#setInflight({ fd, map, numQueues, queueSize });
        return this.conn.reply(m, { mmapSize: BigInt(size), mmapOffset: 0n, numQueues, queueSize }, [fd]);
      }
      case "SET_INFLIGHT_FD": {
        this.#requireInflight(m.name);
        const fd = m.fds[0];
        if (!fd) throw new VhostUserError("BAD_FD_COUNT", "SET_INFLIGHT_FD without an fd", { request: m.name });
        const { numQueues, queueSize, mmapSize, mmapOffset } = m.payload;
        try {
          const size = toLength(mmapSize);
          if (
            numQueues < 1 ||
            queueSize < 1 ||
            queueSize > 32768 ||
            size < numQueues * inflightQueueSize(queueSize) ||
            size > 1 << 30
          ) {
            throw new VhostUserError("BAD_VALUE", "inflight region too small for its queues", {
              request: m.name,
              value: mmapSize,
            });
          }
          checkFdCovers(fd, mmapOffset, mmapSize, "inflight region", m.name);
          const map = Mapping.map(fd, size, { offset: toLength(mmapOffset) });
          this.#setInflight({ fd, map, numQueues, queueSize });
        } catch (e) {
          fd.close();
          throw e;
        }
        return void (await this.conn.ack(m));
      }
      case "IOTLB_MSG":
      case "SEND_RARP":
      case "NET_SET_MTU":
      case "CREATE_CRYPTO_SESSION":
      case "CLOSE_CRYPTO_SESSION":
      case "SET_VRING_ENDIAN":
      case "VRING_KICK":
      case "GET_SHARED_OBJECT":
      case "GET_SHMEM_CONFIG":
        for (const f of m.fds) f.close();
        throw new VhostUserError("UNEXPECTED_REQUEST", "not supported by this back-end (feature not offered)", {
          request: m.name,
        });
      default:
        for (const f of (m as Msg).fds) f.close();
        throw new VhostUserError("UNEXPECTED_REQUEST", "not handled", { request: (m as Msg).name });
    }
  }

  // ---- memory ------------------------------------------------------------------------------

  async #setMemTable(m: Extract<Msg, { name: "SET_MEM_TABLE" }>): Promise<void> {
    const regions = m.payload.regions;
    // QEMU acknowledges our postcopy reply with an empty SET_MEM_TABLE (spec: "an empty
    // VHOST_USER_SET_MEM_TABLE as an acknowledgement"), byte-identical to a u64 0.
    if (this.#awaitingPostcopyAck && regions.length === 0) return this.#postcopyAck(m.name, 0n);
    if (m.fds.length !== regions.length) {
      throw new VhostUserError("BAD_FD_COUNT", "one fd per region", {
        request: m.name,
        value: m.fds.length,
        expected: regions.length,
      });
    }
    const mapped: MappedRegion[] = [];
    try {
      for (const [i, r] of regions.entries()) mapped.push(mapRegion(r, m.fds[i] as Fd, m.name));
    } catch (e) {
      for (const r of mapped) r.region.close();
      for (const f of m.fds) if (!f.closed) f.close();
      throw e;
    }
    let old: MappedRegion[];
    try {
      old = this.#memory.replace(mapped, m.name);
    } catch (e) {
      for (const r of mapped) r.region.close();
      throw e;
    }
    await this.#pushMemory();
    for (const r of old) r.region.close();
    if (this.#postcopyListening) {
      // Postcopy: answer with where we mapped each region; register only after the ack.
      this.#awaitingPostcopyAck = mapped;
      return this.conn.reply(m, {
        kind: "table",
        table: {
          regions: mapped.map(ourMapping),
        },
      } as never);
    }
    return void (await this.conn.ack(m));
  }

  async #addMemReg(m: Extract<Msg, { name: "ADD_MEM_REG" }>): Promise<void> {
    const p = m.payload;
    if (p.kind === "ack") return this.#postcopyAck(m.name, p.value);
    const fd = m.fds[0];
    if (!fd) throw new VhostUserError("BAD_FD_COUNT", "ADD_MEM_REG without an fd", { request: m.name });
    if (this.#memory.regions.length >= MAX_MEM_SLOTS) {
      fd.close();
      throw new VhostUserError("BAD_VALUE", "all memory slots in use", { request: m.name, value: MAX_MEM_SLOTS });
    }
    const r = mapRegion(p.region, fd, m.name);
    try {
      this.#memory.add(r, m.name);
    } catch (e) {
      r.region.close();
      throw e;
    }
    await this.#pushMemory();
    if (this.#postcopyListening) {
      this.#awaitingPostcopyAck ??= [];
      this.#awaitingPostcopyAck.push(r);
      return this.conn.reply(m, {
        kind: "region",
        region: ourMapping(r),
      } as never);
    }
    return void (await this.conn.ack(m));
  }

  /** QEMU's acknowledgement of our postcopy mapping reply: a bare u64 0 on the same request. */
  #postcopyAck(request: string, value: bigint): void {
    const pending = this.#awaitingPostcopyAck;
    if (!pending) {
      // QEMU acknowledges its memory-table update in postcopy even when no region was added:
      // a harmless no-op, unless it reports a failure.
      if (value === 0n) return;
      throw new VhostUserError("NACK", "front-end reported a failed memory-table update", { request, value });
    }
    if (value !== 0n) throw new VhostUserError("NACK", "front-end refused our postcopy mappings", { request, value });
    this.#awaitingPostcopyAck = null;
    // Only now may the guest fault on these mappings: register them.
    for (const r of pending) this.#register(r);
  }

  #register(r: MappedRegion): void {
    if (!this.#uffd || r.registered || r.region.closed) return;
    this.#uffd.register(r.region.hostAddress, r.size, UFFDIO_REGISTER_MODE_MISSING);
    r.registered = true;
  }

  /** Hands the current memory table to every queue worker and waits until all use it. */
  async #pushMemory(): Promise<void> {
    const shared = this.#memory.memory.toShared();
    await Promise.all(this.#vrings.map((v) => v.thread?.request({ type: "memory", memory: shared })));
  }

  // ---- rings ---------------------------------------------------------------------------------

  #thread(index: number, v: Vring): QueueThread {
    v.thread ??= new QueueThread(index, this.#device.queueWorker, this.#device.workerData?.(index), this.#log, {
      onEvent: (_q, level, message) => this.#events.log(level, message),
    });
    return v.thread;
  }

  async #startRing(index: number, v: Vring, request: string): Promise<void> {
    if (!v.addr || v.size === 0)
      throw new VhostUserError("UNEXPECTED_REQUEST", "ring started before SET_VRING_NUM/ADDR", {
        request,
        value: index,
      });
    const a = v.addr;
    // Packed rings: "available" and "used" are the driver and device event suppression areas.
    const packed = hasFeature(this.#features, VirtioFeature.VIRTIO_F_RING_PACKED);
    const descLen = 16 * v.size;
    const availLen = packed ? 4 : 6 + 2 * v.size;
    const usedLen = packed ? 4 : 6 + 8 * v.size;
    const ring = {
      packed,
      size: v.size,
      descTable: this.#memory.uvaToGpa(a.descriptor, descLen, "descriptor table", request),
      availRing: this.#memory.uvaToGpa(a.available, availLen, "avail ring", request),
      usedRing: this.#memory.uvaToGpa(a.used, usedLen, "used ring", request),
      logAddress: (a.flags & VHOST_VRING_F_LOG) !== 0 ? Number(a.log) : null,
      features: this.#features,
      nextAvail: v.base,
      inflight: this.#inflightFor(index),
    };
    if (ring.logAddress !== null && !Number.isSafeInteger(ring.logAddress)) {
      throw new VhostUserError("BAD_VALUE", "used-ring log address not representable", { request, value: a.log });
    }
    if (!hasFeature(this.#features, VirtioFeature.VHOST_USER_F_PROTOCOL_FEATURES)) v.enabled = true;
    const t = this.#thread(index, v);
    if (v.started) {
      const r = await t.request({ type: "stop" });
      ring.nextAvail = r.nextAvail ?? ring.nextAvail;
    }
    await t.request({ type: "memory", memory: this.#memory.memory.toShared() });
    await t.request({
      type: "start",
      ring,
      kickFd: v.kick?.fd ?? -1,
      callFd: v.call?.fd ?? -1,
      errFd: v.err?.fd ?? -1,
      enabled: v.enabled,
    });
    v.started = true;
  }

  async #setEnabled(v: Vring, enabled: boolean): Promise<void> {
    v.enabled = enabled;
    if (v.started && v.thread) await v.thread.request({ type: "enable", enabled });
  }

  /**
   * Stops every ring. A worker stuck in a request (a device that hangs, a postcopy fault the
   * front-end will never resolve) gets `timeoutMs` and is then terminated by teardown.
   */
  async #stopAll(timeoutMs = 0): Promise<void> {
    for (const v of this.#vrings) {
      if (v.started && v.thread) {
        const r = await v.thread.request({ type: "stop" }, timeoutMs).catch(() => null);
        if (r?.nextAvail !== undefined) v.base = r.nextAvail;
      }
      v.started = false;
    }
  }

  async #resetDevice(): Promise<void> {
    await this.#stopAll();
    for (const v of this.#vrings) {
      v.kick?.close();
      v.call?.close();
      v.err?.close();
      Object.assign(v, { size: 0, addr: null, base: 0, kick: null, call: null, err: null, enabled: false });
    }
    this.#device.reset?.();
  }

  // ---- inflight ------------------------------------------------------------------------------

  #inflight: { fd: Fd; map: Mapping; numQueues: number; queueSize: number } | null = null;

  #requireInflight(request: string): void {
    if (!hasFeature(this.#device.info.protocolFeatures, ProtocolFeature.INFLIGHT_SHMFD)) {
      throw new VhostUserError("UNEXPECTED_REQUEST", "this device does not track inflight I/O", { request });
    }
  }

  #setInflight(next: { fd: Fd; map: Mapping; numQueues: number; queueSize: number }): void {
    const old = this.#inflight;
    this.#inflight = next;
    // Workers pick the region up when a ring starts, which is after SET_INFLIGHT_FD.
    if (old && old.map !== next.map) {
      old.map.close();
      if (old.fd !== next.fd) old.fd.close();
    }
  }

  #inflightFor(queue: number): SharedInflightQueue | null {
    const f = this.#inflight;
    if (!f || queue >= f.numQueues) return null;
    return {
      buffer: f.map.windows[0] as SharedArrayBuffer,
      offset: queue * inflightQueueSize(f.queueSize),
      queueSize: f.queueSize,
    };
  }

  // ---- dirty log -----------------------------------------------------------------------------

  /** Installs the log exactly while LOG_ALL is negotiated; resolves once no worker marks the old one. */
  async #applyLog(): Promise<void> {
    const want = (this.#features & LOG_ALL) !== 0n ? this.#logArea : null;
    if (this.#log.area === want) return;
    await this.#log.replace(want);
  }

  // ---- device state ----------------------------------------------------------------------------

  #stateTransfer: Promise<void> | null = null;

  async #deviceStateFd(m: Extract<Msg, { name: "SET_DEVICE_STATE_FD" }>): Promise<void> {
    const fd = m.fds[0];
    if (!fd) throw new VhostUserError("BAD_FD_COUNT", "no pipe fd", { request: m.name });
    // A net.Socket, not an fs stream: the fd may be a pipe (QEMU's) or a socket, blocking or
    // not (a non-blocking one gives fs streams EAGAIN); libuv handles both.
    const { Socket } = await import("node:net");
    const raw = fd.release();
    if (m.payload.direction === 0) {
      // Save: write our state into the fd, then close it (EOF ends the transfer).
      const state = (await this.#device.saveState?.()) ?? new Uint8Array(0);
      const out = new Socket({ fd: raw, readable: false, writable: true });
      this.#stateTransfer = new Promise((resolve, reject) => {
        out.on("error", reject);
        out.end(state, () => resolve());
      });
    } else {
      const input = new Socket({ fd: raw, readable: true, writable: false });
      const parts: Buffer[] = [];
      this.#stateTransfer = new Promise<void>((resolve, reject) => {
        input.on("data", (b) => parts.push(b as Buffer));
        input.on("error", reject);
        input.on("end", () => {
          input.destroy();
          resolve();
        });
      }).then(() => this.#device.loadState?.(new Uint8Array(Buffer.concat(parts))));
    }
    // Its outcome is CHECK_DEVICE_STATE's answer; until that comes, a failure is not unhandled.
    this.#stateTransfer.catch(() => undefined);
    // Bit 8: we use the fd we were given, none comes back.
    return this.conn.reply(m, 0x100n);
  }

  // ---- teardown --------------------------------------------------------------------------------

  async #teardown(): Promise<void> {
    if (this.#closing) return;
    this.#closing = true;
    // Closing the userfaultfd first releases any worker blocked on a postcopy fault.
    this.#uffd?.close();
    this.#uffd = null;
    await this.#stopAll(1000);
    await Promise.all(this.#vrings.map((v) => v.thread?.close()));
    for (const v of this.#vrings) {
      v.thread = null;
      v.kick?.close();
      v.call?.close();
      v.err?.close();
    }
    await this.#log.close();
    this.#logArea?.close();
    this.#logArea = null;
    this.#backendChannel?.close();
    this.#memory.closeAll();
    // The inflight region stays the front-end's: it hands it to the next back-end.
    this.#inflight?.map.close();
    this.#inflight?.fd.close();
    this.#inflight = null;
    this.#device.reset?.();
  }
}
