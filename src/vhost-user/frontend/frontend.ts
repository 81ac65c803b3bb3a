/**
 * VhostUserFrontend: the VMM's side of vhost-user, driving any backend over its socket.
 *
 * Replies: a reply is awaited exactly when the spec says one comes — always for GET_* (and
 * GET_CONFIG), for SET_LOG_BASE when LOG_SHMFD is negotiated ("Here is a list of the ones that
 * do [require replies]: ... VHOST_USER_SET_LOG_BASE (if VHOST_USER_PROTOCOL_F_LOG_SHMFD)"), and
 * for everything else only when REPLY_ACK is negotiated (NEED_REPLY is then set). SET_LOG_BASE
 * goes out without NEED_REPLY: it already solicits a reply, and "the presence of REPLY_ACK or
 * need_reply bit being set brings no behavioural change" — so its u64 is not a status (libvhost-user
 * echoes the log size there). Every wait has the connection's deadline and fails with a
 * VhostUserError naming the request (TIMEOUT, NACK, DISCONNECTED, CLOSED).
 *
 * Addresses: SET_MEM_TABLE / ADD_MEM_REG carry each region's host address in this process as the
 * "user address", and SET_VRING_ADDR translates ring guest addresses into that same space.
 *
 * Postcopy (PAGEFAULT): postcopyAdvise → postcopyListen → setMemTable (its postcopy form, which
 * keeps the back-end's own region addresses) → postcopyEnd, in QEMU's order; serving the
 * back-end's faults is the caller's (src/vm/vhost-postcopy.ts). Without PAGEFAULT it is refused
 * before anything is sent (postcopyRefusal says why).
 */
import { EventEmitter } from "node:events";
import type { DirtySink } from "../../memory/dirty-source.js";
import type { GuestMemory } from "../../memory/guest-memory.js";
import type { GuestMemoryRegion } from "../../memory/region.js";
import { DirtyLogArea, SharedLogDirtySource } from "../../memory/shared-dirty-log.js";
import type { EventFd } from "../../sys/eventfd.js";
import type { Fd } from "../../sys/fd.js";
import { isSizeSealed } from "../../sys/memfd.js";
import { UnixSocket } from "../../sys/unix-socket.js";
import { Userfaultfd } from "../../sys/userfaultfd.js";
import { Connection, type ConnectionOptions, DEFAULT_REPLY_TIMEOUT_MS } from "../connection.js";
import type { BackendRequests } from "../protocol/backend-requests.js";
import {
  featureMask,
  hasFeature,
  ProtocolFeature,
  VHOST_MEMORY_BASELINE_NREGIONS,
  VHOST_USER_MAX_CONFIG_SIZE,
  VHOST_VRING_F_LOG,
  VirtioFeature,
} from "../protocol/constants.js";
import { VhostUserError } from "../protocol/errors.js";
import type { FrontendRequests } from "../protocol/frontend-requests.js";
import type { RequestPayload } from "../protocol/message.js";
import type { InflightDescription, MemoryRegion } from "../protocol/payloads.js";
import { FrontendError } from "./errors.js";
import { FrontendVring, type VringLayout } from "./vring.js";

/** Protocol features this frontend knows how to use. */
export const FRONTEND_PROTOCOL_FEATURES = featureMask(
  ProtocolFeature.BACKEND_REQ,
  ProtocolFeature.MQ,
  ProtocolFeature.LOG_SHMFD,
  ProtocolFeature.REPLY_ACK,
  ProtocolFeature.CONFIG,
  ProtocolFeature.RESET_DEVICE,
  ProtocolFeature.CONFIGURE_MEM_SLOTS,
  ProtocolFeature.STATUS,
  ProtocolFeature.PAGEFAULT,
  ProtocolFeature.DEVICE_STATE,
  ProtocolFeature.INFLIGHT_SHMFD,
);

const F_PROTOCOL_FEATURES = featureMask(VirtioFeature.VHOST_USER_F_PROTOCOL_FEATURES);
const F_LOG_ALL = featureMask(VirtioFeature.VHOST_F_LOG_ALL);
/** A fresh packed ring's vring base: both positions at slot 0 with their wrap counters at 1. */
const PACKED_RING_START = 0x8000_8000;
const MAX_VRINGS = 256; // the vring index is 8 bits in SET_VRING_KICK/CALL/ERR

export interface FrontendOptions {
  /** Deadline for every reply (default 10 s). */
  timeoutMs?: number;
  /** Shown in errors (default: the socket path). */
  label?: string;
  /** Protocol features we are willing to negotiate (ANDed with FRONTEND_PROTOCOL_FEATURES and the offer). */
  protocolFeatures?: bigint;
  /**
   * Negotiate BACKEND_REQ and open the back-end request channel (SET_BACKEND_REQ_FD) in
   * negotiate(), as QEMU does: the back-end can then send CONFIG_CHANGE_MSG ("config-change"
   * event, acked). Off by default (BACKEND_REQ is then left out of the negotiation).
   */
  backendChannel?: boolean;
  maxPayloadSize?: number;
  /**
   * Share memory whose fd is not size-sealed (a file or hugetlbfs region). Off by default: a
   * back-end that ftruncates such a file makes our next access to guest memory a SIGBUS, so
   * only a caller that trusts its back-end turns this on. GuestMemoryRegion.memfd() is sealed.
   */
  allowUnsealedMemory?: boolean;
}

export interface Negotiated {
  /** GET_FEATURES. */
  features: bigint;
  /** GET_PROTOCOL_FEATURES, or null when the backend does not offer VHOST_USER_F_PROTOCOL_FEATURES. */
  offeredProtocolFeatures: bigint | null;
  /** What SET_PROTOCOL_FEATURES enabled (0n without protocol features). */
  protocolFeatures: bigint;
}

/** One entry of the memory table as sent to the backend. */
interface SentRegion {
  desc: MemoryRegion;
  region: GuestMemoryRegion;
  /** Postcopy: where the back-end mapped this region (from its SET_MEM_TABLE / ADD_MEM_REG reply). */
  backendAddress?: bigint;
}

/**
 * One region of the back-end's address table (postcopy): the back-end registered
 * [backendAddress, +size) with its userfaultfd, and it holds guest-physical [guestAddress, +size).
 */
export interface BackendRegionBase {
  guestAddress: number;
  size: number;
  /** The region's address in the back-end's process (its reply's user address). */
  backendAddress: bigint;
  /** The same region in this process. */
  frontendAddress: bigint;
}

export interface MemTableOptions {
  /**
   * Postcopy (after POSTCOPY_LISTEN): called with the back-end's address table once its replies
   * are in and before the acknowledgement that lets it register its mappings, so whoever
   * serves its faults is ready before the first one can happen (QEMU registers the client
   * bases with its postcopy code at the same point).
   */
  beforePostcopyAck?(bases: readonly BackendRegionBase[]): void | Promise<void>;
}

type PostcopyState = "none" | "advised" | "listening" | "ended";

/** What the back-end tells us on its request channel. */
export type BackendChannelEvents = {
  /** CONFIG_CHANGE_MSG: the device's config space changed (GET_CONFIG again). */
  "config-change": [];
  /** Any back-end request, by name (also the ones this front-end refuses). */
  request: [name: string];
};

export class VhostUserFrontend implements Disposable {
  readonly connection: Connection<FrontendRequests>;
  /** Events of the back-end request channel (see FrontendOptions.backendChannel). */
  readonly backendEvents = new EventEmitter<BackendChannelEvents>();
  #backendChannel: Connection<BackendRequests> | null = null;
  readonly timeoutMs: number;
  #wantedProtocol: bigint;
  #backendFeatures: bigint | null = null;
  #offeredProtocol: bigint | null = null;
  #protocol = 0n;
  /** The last SET_FEATURES value, without VHOST_F_LOG_ALL (added while logging). */
  #acked: bigint | null = null;
  #maxMemSlots: number | null = null;
  #memory: GuestMemory | null = null;
  #table: SentRegion[] = [];
  #vrings = new Map<number, FrontendVring>();
  #log: SharedLogDirtySource | null = null;
  #closed = false;
  #postcopy: PostcopyState = "none";
  /** The back-end's userfaultfd (POSTCOPY_ADVISE), owned here until POSTCOPY_END or close(). */
  #uffd: Userfaultfd | null = null;
  readonly #allowUnsealed: boolean;

  constructor(socket: UnixSocket, options: FrontendOptions = {}) {
    this.timeoutMs = options.timeoutMs ?? DEFAULT_REPLY_TIMEOUT_MS;
    this.#allowUnsealed = options.allowUnsealedMemory ?? false;
    this.#wantedProtocol = (options.protocolFeatures ?? FRONTEND_PROTOCOL_FEATURES) & FRONTEND_PROTOCOL_FEATURES;
    if (!options.backendChannel) this.#wantedProtocol &= ~featureMask(ProtocolFeature.BACKEND_REQ);
    const co: ConnectionOptions = { timeoutMs: this.timeoutMs, label: options.label ?? "vhost-user backend" };
    if (options.maxPayloadSize !== undefined) co.maxPayloadSize = options.maxPayloadSize;
    this.connection = Connection.frontend(socket, co);
    // The backend never sends requests on the main socket; a stray one is dropped by the connection.
    this.connection.on("protocolError", () => {});
    this.connection.on("close", (error) => {
      const e = new VhostUserError(
        error?.code === "CLOSED" ? "CLOSED" : "DISCONNECTED",
        `connection to ${this.connection.label} ended`,
        { cause: error },
      );
      for (const v of this.#vrings.values()) v.fail(e);
    });
  }

  /** Connects to a backend listening on `path`. */
  static connect(path: string, options: FrontendOptions = {}): VhostUserFrontend {
    return new VhostUserFrontend(UnixSocket.connect(path), { label: path, ...options });
  }

  get closed(): boolean {
    return this.#closed || this.connection.closed;
  }

  /** GET_FEATURES as last read (null before). */
  get backendFeatures(): bigint | null {
    return this.#backendFeatures;
  }

  /** GET_PROTOCOL_FEATURES as last read (null before, or when not offered). */
  get offeredProtocolFeatures(): bigint | null {
    return this.#offeredProtocol;
  }

  /** Protocol features enabled by SET_PROTOCOL_FEATURES. */
  get protocolFeatures(): bigint {
    return this.#protocol;
  }

  /** The last SET_FEATURES value (without VHOST_F_LOG_ALL), or null. */
  get ackedFeatures(): bigint | null {
    return this.#acked;
  }

  /** The memory last handed to the backend (null before setMemTable). */
  get memory(): GuestMemory | null {
    return this.#memory;
  }

  get logging(): boolean {
    return this.#log !== null;
  }

  /** The current dirty log read back as a DirtySource (null while logging is off). */
  get log(): SharedLogDirtySource | null {
    return this.#log;
  }

  hasProtocolFeature(bit: number): boolean {
    return hasFeature(this.#protocol, bit);
  }

  #need(bit: number, request: string): void {
    if (!this.hasProtocolFeature(bit)) {
      const name = Object.entries(ProtocolFeature).find(([, b]) => b === bit)?.[0] ?? `bit ${bit}`;
      throw new FrontendError("NOT_NEGOTIATED", `protocol feature ${name} is not negotiated`, request);
    }
  }

  async #u64(name: "GET_FEATURES" | "GET_PROTOCOL_FEATURES" | "GET_QUEUE_NUM" | "GET_MAX_MEM_SLOTS" | "GET_STATUS") {
    const r = await this.connection.request(name, undefined);
    if (!r) throw new VhostUserError("UNEXPECTED_REPLY", "no reply", { request: name });
    return r.payload as bigint;
  }

  /** A request without an explicit reply: acked when REPLY_ACK is negotiated, else fire and forget. */
  async #send<K extends keyof FrontendRequests & string>(
    name: K,
    payload: RequestPayload<FrontendRequests, K>,
    fds: readonly (Fd | number)[] = [],
  ): Promise<void> {
    await this.connection.request(name, payload, { fds });
  }

  // ---- negotiation ---------------------------------------------------------------------------

  async getFeatures(): Promise<bigint> {
    this.#backendFeatures = await this.#u64("GET_FEATURES");
    return this.#backendFeatures;
  }

  /** Only legal when GET_FEATURES offered VHOST_USER_F_PROTOCOL_FEATURES. */
  async getProtocolFeatures(): Promise<bigint> {
    const f = this.#backendFeatures ?? (await this.getFeatures());
    if ((f & F_PROTOCOL_FEATURES) === 0n)
      throw new FrontendError(
        "NOT_NEGOTIATED",
        "the backend does not offer VHOST_USER_F_PROTOCOL_FEATURES",
        "GET_PROTOCOL_FEATURES",
      );
    this.#offeredProtocol = await this.#u64("GET_PROTOCOL_FEATURES");
    return this.#offeredProtocol;
  }

  /** Sends SET_PROTOCOL_FEATURES; REPLY_ACK takes effect for the requests after this one. */
  async setProtocolFeatures(mask: bigint): Promise<void> {
    const offered = this.#offeredProtocol ?? (await this.getProtocolFeatures());
    if ((mask & ~offered) !== 0n)
      throw new FrontendError(
        "NOT_NEGOTIATED",
        `protocol features 0x${(mask & ~offered).toString(16)} are not offered`,
        "SET_PROTOCOL_FEATURES",
      );
    await this.#send("SET_PROTOCOL_FEATURES", mask);
    this.#protocol = mask;
    this.connection.setProtocolFeatures(mask);
  }

  /**
   * GET_FEATURES, then (when offered) GET_PROTOCOL_FEATURES and SET_PROTOCOL_FEATURES with what
   * both sides support.
   */
  async negotiate(): Promise<Negotiated> {
    const features = await this.getFeatures();
    if ((features & F_PROTOCOL_FEATURES) === 0n) {
      this.#offeredProtocol = null;
      return { features, offeredProtocolFeatures: null, protocolFeatures: 0n };
    }
    const offered = await this.getProtocolFeatures();
    await this.setProtocolFeatures(offered & this.#wantedProtocol);
    if (this.hasProtocolFeature(ProtocolFeature.BACKEND_REQ)) await this.openBackendChannel();
    return { features, offeredProtocolFeatures: offered, protocolFeatures: this.#protocol };
  }

  /**
   * SET_BACKEND_REQ_FD: a socket pair, one end to the back-end. Its requests come in here:
   * CONFIG_CHANGE_MSG is emitted as "config-change" and acked; the others this front-end does
   * not serve (IOTLB, host notifiers, in-band notifications, shared objects, SHMEM) are answered
   * with a failure status when a reply is asked for, and emitted as "request" like every one.
   */
  async openBackendChannel(): Promise<void> {
    this.#need(ProtocolFeature.BACKEND_REQ, "SET_BACKEND_REQ_FD");
    const [mine, theirs] = UnixSocket.pair();
    let ch: Connection<BackendRequests> | null = null;
    try {
      ch = Connection.backendChannel(mine, { label: `${this.connection.label} (back-end channel)` });
      ch.setProtocolFeatures(this.#protocol);
      const chan = ch;
      chan.on("request", (m) => {
        for (const f of m.fds) f.close();
        this.backendEvents.emit("request", m.name);
        const ok = m.name === "CONFIG_CHANGE_MSG";
        if (ok) this.backendEvents.emit("config-change");
        chan.ack(m, ok ? 0n : 1n).catch(() => undefined);
      });
      chan.on("protocolError", () => {});
      await this.#send("SET_BACKEND_REQ_FD", undefined, [theirs.fd]);
      this.#backendChannel?.close();
      this.#backendChannel = chan;
    } catch (e) {
      ch?.close();
      throw e;
    } finally {
      theirs.close();
    }
  }

  async setOwner(): Promise<void> {
    await this.#send("SET_OWNER", undefined);
  }

  /**
   * SET_FEATURES. VHOST_USER_F_PROTOCOL_FEATURES is kept set when protocol features were
   * negotiated (so rings start disabled and SET_VRING_ENABLE applies); VHOST_F_LOG_ALL is added
   * while logging. Bits the backend did not offer are refused.
   */
  async setFeatures(features: bigint): Promise<void> {
    const offered = this.#backendFeatures ?? (await this.getFeatures());
    let f = features;
    if (this.#offeredProtocol !== null) f |= F_PROTOCOL_FEATURES;
    f &= ~F_LOG_ALL;
    if ((f & ~offered) !== 0n)
      throw new FrontendError(
        "NOT_NEGOTIATED",
        `features 0x${(f & ~offered).toString(16)} are not offered`,
        "SET_FEATURES",
      );
    await this.#send("SET_FEATURES", this.#log ? f | F_LOG_ALL : f);
    this.#acked = f;
  }

  async getQueueNum(): Promise<number> {
    this.#need(ProtocolFeature.MQ, "GET_QUEUE_NUM");
    return Number(await this.#u64("GET_QUEUE_NUM"));
  }

  async getMaxMemSlots(): Promise<number> {
    this.#need(ProtocolFeature.CONFIGURE_MEM_SLOTS, "GET_MAX_MEM_SLOTS");
    this.#maxMemSlots = Number(await this.#u64("GET_MAX_MEM_SLOTS"));
    return this.#maxMemSlots;
  }

  /** GET_CONFIG of `size` bytes at `offset`; an empty reply (the backend's error) is a NACK. */
  async getConfig(offset: number, size: number, flags = 0): Promise<Uint8Array> {
    this.#need(ProtocolFeature.CONFIG, "GET_CONFIG");
    if (!Number.isInteger(size) || size < 1 || size > VHOST_USER_MAX_CONFIG_SIZE)
      throw new FrontendError(
        "BAD_ARGUMENT",
        `config size ${size} outside 1..${VHOST_USER_MAX_CONFIG_SIZE}`,
        "GET_CONFIG",
      );
    const r = await this.connection.request("GET_CONFIG", { offset, flags, data: new Uint8Array(size) });
    const cfg = r?.payload ?? null;
    if (cfg === null)
      throw new VhostUserError("NACK", "the backend answered with an empty config (its error)", {
        request: "GET_CONFIG",
      });
    if (cfg.data.length !== size)
      throw new VhostUserError("BAD_SIZE", "config reply size differs from the request", {
        request: "GET_CONFIG",
        value: cfg.data.length,
        expected: size,
      });
    return cfg.data;
  }

  async setConfig(offset: number, data: Uint8Array, flags = 0): Promise<void> {
    this.#need(ProtocolFeature.CONFIG, "SET_CONFIG");
    await this.#send("SET_CONFIG", { offset, flags, data });
  }

  // ---- inflight I/O tracking (INFLIGHT_SHMFD) --------------------------------------------------

  /**
   * GET_INFLIGHT_FD: the back-end's inflight region for `numQueues` queues of `queueSize`
   * entries. The caller owns `fd` and keeps it across back-end restarts: handing it to the next
   * back-end life with setInflight() before its rings start lets it resubmit what was in flight.
   */
  async getInflight(numQueues: number, queueSize: number): Promise<InflightDescription & { fd: Fd }> {
    this.#need(ProtocolFeature.INFLIGHT_SHMFD, "GET_INFLIGHT_FD");
    const r = await this.connection.request("GET_INFLIGHT_FD", { mmapSize: 0n, mmapOffset: 0n, numQueues, queueSize });
    if (!r) throw new VhostUserError("UNEXPECTED_REPLY", "no reply", { request: "GET_INFLIGHT_FD" });
    const d = r.payload as InflightDescription;
    const fd = r.fds[0];
    for (const f of r.fds.slice(1)) f.close();
    if (!fd) throw new VhostUserError("BAD_FD_COUNT", "no inflight fd in the reply", { request: "GET_INFLIGHT_FD" });
    return { ...d, fd };
  }

  /** SET_INFLIGHT_FD: the region from getInflight() (of this or an earlier back-end life); the fd stays the caller's. */
  async setInflight(region: InflightDescription & { fd: Fd }): Promise<void> {
    this.#need(ProtocolFeature.INFLIGHT_SHMFD, "SET_INFLIGHT_FD");
    const { fd, ...d } = region;
    await this.#send("SET_INFLIGHT_FD", d, [fd]);
  }

  // ---- device state transfer (DEVICE_STATE) ---------------------------------------------------

  /**
   * The back-end's internal device state, for migration (SET_DEVICE_STATE_FD, save, phase
   * "stopped"; the rings should be stopped first), read to EOF and confirmed with
   * CHECK_DEVICE_STATE. A failure on the back-end's side is a VhostUserError NACK.
   */
  async saveDeviceState(): Promise<Uint8Array> {
    const fd = await this.#deviceStateFd(0);
    const { Socket } = await import("node:net");
    const parts: Buffer[] = [];
    await new Promise<void>((resolve, reject) => {
      const input = new Socket({ fd, readable: true, writable: false });
      input.on("data", (b) => parts.push(b as Buffer));
      input.on("error", reject);
      input.on("end", () => {
        input.destroy();
        resolve();
      });
    });
    await this.#checkDeviceState("save");
    return new Uint8Array(Buffer.concat(parts));
  }

  /** Hands the back-end a state saved by saveDeviceState() on another one (SET_DEVICE_STATE_FD, load). */
  async loadDeviceState(state: Uint8Array): Promise<void> {
    const fd = await this.#deviceStateFd(1);
    const { Socket } = await import("node:net");
    await new Promise<void>((resolve, reject) => {
      const out = new Socket({ fd, readable: false, writable: true });
      out.on("error", reject);
      out.end(state, () => {
        out.destroy();
        resolve();
      });
    });
    await this.#checkDeviceState("load");
  }

  /** SET_DEVICE_STATE_FD over a socket pair; returns the raw fd of our end (or the back-end's own). */
  async #deviceStateFd(direction: 0 | 1): Promise<number> {
    this.#need(ProtocolFeature.DEVICE_STATE, "SET_DEVICE_STATE_FD");
    const [mine, theirs] = UnixSocket.pair();
    try {
      const r = await this.connection.request("SET_DEVICE_STATE_FD", { direction, phase: 0 }, { fds: [theirs.fd] });
      if (!r) throw new VhostUserError("UNEXPECTED_REPLY", "no reply", { request: "SET_DEVICE_STATE_FD" });
      const status = r.payload as bigint;
      if ((status & 0xffn) !== 0n) {
        for (const f of r.fds) f.close();
        throw new VhostUserError("NACK", `the back-end refused the state transfer (status ${status & 0xffn})`, {
          request: "SET_DEVICE_STATE_FD",
        });
      }
      // Bit 8 clear: the back-end wants its own fd used instead of ours.
      const other = (status & 0x100n) === 0n ? r.fds[0] : undefined;
      for (const f of r.fds) if (f !== other) f.close();
      if (other) {
        mine.close();
        return other.release();
      }
      return mine.fd.release();
    } catch (e) {
      mine.close();
      throw e;
    } finally {
      theirs.close();
    }
  }

  async #checkDeviceState(what: string): Promise<void> {
    const r = await this.connection.request("CHECK_DEVICE_STATE", undefined);
    if (!r) throw new VhostUserError("UNEXPECTED_REPLY", "no reply", { request: "CHECK_DEVICE_STATE" });
    if ((r.payload as bigint) !== 0n)
      throw new VhostUserError("NACK", `the back-end reports the state ${what} failed (${r.payload})`, {
        request: "CHECK_DEVICE_STATE",
      });
  }

  async setStatus(status: number): Promise<void> {
    this.#need(ProtocolFeature.STATUS, "SET_STATUS");
    await this.#send("SET_STATUS", BigInt(status));
  }

  async getStatus(): Promise<number> {
    this.#need(ProtocolFeature.STATUS, "GET_STATUS");
    return Number(await this.#u64("GET_STATUS"));
  }

  /**
   * RESET_DEVICE when negotiated, else the deprecated RESET_OWNER. Local ring state is dropped
   * (the eventfds stay until close or the next setup).
   */
  async reset(): Promise<void> {
    if (this.hasProtocolFeature(ProtocolFeature.RESET_DEVICE)) await this.#send("RESET_DEVICE", undefined);
    else await this.#send("RESET_OWNER", undefined);
    for (const v of this.#vrings.values()) {
      v.started = false;
      v.enabled = false;
    }
  }

  // ---- memory ----------------------------------------------------------------------------------

  #describe(r: GuestMemoryRegion, request: string): MemoryRegion {
    if (!r.backing.fd || r.backing.fd.closed)
      throw new FrontendError(
        "NO_FD",
        `region at 0x${r.guestBase.toString(16)} (${r.backing.kind}) has no fd to share`,
        request,
      );
    if (!this.#allowUnsealed && !isSizeSealed(r.backing.fd))
      throw new FrontendError(
        "UNSEALED",
        `region at 0x${r.guestBase.toString(16)} (${r.backing.kind}) is not size-sealed: the back-end could truncate it under us (allowUnsealedMemory to share it anyway)`,
        request,
      );
    return {
      guestAddress: BigInt(r.guestBase),
      size: BigInt(r.size),
      userAddress: r.hostAddress,
      mmapOffset: BigInt(r.backing.offset),
    };
  }

  /**
   * Hands the backend `memory`: ADD_MEM_REG / REM_MEM_REG for what changed when
   * CONFIGURE_MEM_SLOTS is negotiated, else one SET_MEM_TABLE (at most 8 regions). Every region
   * needs an fd. The memory stays owned by the caller and must outlive the frontend's use of it.
   *
   * After POSTCOPY_LISTEN this is the postcopy variant QEMU sends: the back-end answers each
   * region with the address it mapped it at (kept: `backendRegionBases`), and only our
   * acknowledgement — an empty SET_MEM_TABLE, or one fd-less ADD_MEM_REG carrying u64 0 — lets
   * it register the mappings with its userfaultfd. Neither message carries NEED_REPLY.
   */
  async setMemTable(memory: GuestMemory, options: MemTableOptions = {}): Promise<void> {
    const slots = this.hasProtocolFeature(ProtocolFeature.CONFIGURE_MEM_SLOTS);
    const request = slots ? "ADD_MEM_REG" : "SET_MEM_TABLE";
    const postcopy = this.#postcopy === "listening";
    const next: SentRegion[] = memory.regions.map((region) => ({ region, desc: this.#describe(region, request) }));
    if (!slots) {
      if (next.length > VHOST_MEMORY_BASELINE_NREGIONS)
        throw new FrontendError(
          "TOO_MANY_REGIONS",
          `${next.length} regions, SET_MEM_TABLE carries at most ${VHOST_MEMORY_BASELINE_NREGIONS} (CONFIGURE_MEM_SLOTS not negotiated)`,
          request,
        );
      const fds = next.map((s) => s.region.backing.fd as Fd);
      if (!postcopy) {
        await this.connection.request("SET_MEM_TABLE", { regions: next.map((s) => s.desc) }, { fds });
        this.#table = next;
        this.#memory = memory;
        return;
      }
      const r = await this.connection.request(
        "SET_MEM_TABLE",
        { regions: next.map((s) => s.desc) },
        { fds, needReply: false, expectReply: true },
      );
      const reply = r?.payload;
      if (reply?.kind !== "table")
        throw new VhostUserError("BAD_VALUE", "postcopy: the back-end answered without its memory table", {
          request,
          value: reply?.kind === "ack" ? reply.value : "nothing",
        });
      if (reply.table.regions.length !== next.length)
        throw new VhostUserError("BAD_VALUE", "postcopy: the reply's table has another region count", {
          request,
          value: reply.table.regions.length,
          expected: next.length,
        });
      for (const [i, s] of next.entries())
        s.backendAddress = checkBase(s, reply.table.regions[i] as MemoryRegion, request);
      this.#table = next;
      this.#memory = memory;
      await options.beforePostcopyAck?.(this.backendRegionBases);
      // The acknowledgement: a table of 0 regions (byte-identical to a u64 0), no reply.
      await this.connection.request("SET_MEM_TABLE", { regions: [] }, { needReply: false });
      return;
    }
    const max = this.#maxMemSlots ?? (await this.getMaxMemSlots());
    if (next.length > max)
      throw new FrontendError("TOO_MANY_REGIONS", `${next.length} regions, the backend has ${max} slots`, request);
    const same = (a: MemoryRegion, b: MemoryRegion) =>
      a.guestAddress === b.guestAddress &&
      a.size === b.size &&
      a.userAddress === b.userAddress &&
      a.mmapOffset === b.mmapOffset;
    // In postcopy a region sent before LISTEN has no known back-end address: send it again.
    const keep = this.#table.filter(
      (o) =>
        next.some((n) => same(n.desc, o.desc) && n.region === o.region) &&
        (!postcopy || o.backendAddress !== undefined),
    );
    for (const old of this.#table) {
      if (keep.includes(old)) continue;
      await this.connection.request("REM_MEM_REG", old.desc);
      this.#table = this.#table.filter((x) => x !== old);
    }
    let added = 0;
    for (const n of next) {
      const kept = keep.find((k) => k.region === n.region);
      if (kept) {
        if (kept.backendAddress !== undefined) n.backendAddress = kept.backendAddress;
        continue;
      }
      const fds = [n.region.backing.fd as Fd];
      if (!postcopy) {
        await this.connection.request("ADD_MEM_REG", { kind: "region", region: n.desc }, { fds });
      } else {
        const r = await this.connection.request(
          "ADD_MEM_REG",
          { kind: "region", region: n.desc },
          { fds, needReply: false, expectReply: true },
        );
        const reply = r?.payload;
        if (reply?.kind !== "region")
          throw new VhostUserError("BAD_VALUE", "postcopy: the back-end answered without its mapping address", {
            request,
            value: reply?.kind === "ack" ? reply.value : "nothing",
          });
        n.backendAddress = checkBase(n, reply.region, request);
        added++;
      }
      this.#table.push(n);
    }
    this.#table = next.filter((n) => this.#table.some((t) => t.region === n.region));
    this.#memory = memory;
    if (!postcopy) return;
    await options.beforePostcopyAck?.(this.backendRegionBases);
    // QEMU acks even when nothing was added; a back-end with nothing to acknowledge may take
    // that as a protocol error (ours hangs up), so the ack goes only after new regions.
    if (added > 0) await this.connection.request("ADD_MEM_REG", { kind: "ack", value: 0n }, { needReply: false });
  }

  /** Postcopy: the back-end's address for each region of the table, as its replies gave them. */
  get backendRegionBases(): BackendRegionBase[] {
    const out: BackendRegionBase[] = [];
    for (const s of this.#table)
      if (s.backendAddress !== undefined)
        out.push({
          guestAddress: s.region.guestBase,
          size: s.region.size,
          backendAddress: s.backendAddress,
          frontendAddress: s.region.hostAddress,
        });
    return out;
  }

  /** The host (user) address of `[gpa, gpa+len)`, which must lie in one region of the table. */
  userAddress(gpa: number, len: number, request = "SET_VRING_ADDR"): bigint {
    for (const { region } of this.#table) {
      if (gpa >= region.guestBase && gpa + len <= region.end)
        return region.hostAddress + BigInt(gpa - region.guestBase);
    }
    throw new FrontendError(
      this.#table.length === 0 ? "BAD_STATE" : "BAD_ADDRESS",
      this.#table.length === 0
        ? "no memory table was sent"
        : `[0x${gpa.toString(16)}, +${len}) is not inside one region of the memory table`,
      request,
    );
  }

  // ---- vrings ------------------------------------------------------------------------------------

  vring(index: number): FrontendVring {
    if (!Number.isInteger(index) || index < 0 || index >= MAX_VRINGS)
      throw new FrontendError("BAD_ARGUMENT", `vring index ${index} outside 0..${MAX_VRINGS - 1}`);
    let v = this.#vrings.get(index);
    if (!v) {
      v = new FrontendVring(index);
      this.#vrings.set(index, v);
    }
    return v;
  }

  async setVringNum(index: number, num: number): Promise<void> {
    await this.#send("SET_VRING_NUM", { index, num });
  }

  async setVringBase(index: number, base: number): Promise<void> {
    await this.#send("SET_VRING_BASE", { index, num: base });
  }

  /** SET_VRING_ADDR from guest addresses; VHOST_VRING_F_LOG and the used ring's GPA while logging. */
  async setVringAddr(index: number, layout: VringLayout): Promise<void> {
    const v = this.vring(index);
    const s = layout.size;
    // Packed rings: "available" and "used" are the driver and device areas (4 bytes each).
    const packed = layout.packed === true;
    const payload = {
      index,
      flags: this.#log ? VHOST_VRING_F_LOG : 0,
      descriptor: this.userAddress(layout.descTable, 16 * s),
      used: this.userAddress(layout.usedRing, packed ? 4 : 6 + 8 * s),
      available: this.userAddress(layout.availRing, packed ? 4 : 6 + 2 * s),
      log: BigInt(layout.usedRing),
    };
    await this.#send("SET_VRING_ADDR", payload);
    v.layout = { ...layout };
  }

  /** SET_VRING_KICK with a new eventfd (kept to kick the ring); starts the ring on the backend. */
  async setVringKick(index: number): Promise<EventFd> {
    const v = this.vring(index);
    const fd = v.newKickFd();
    await this.#send("SET_VRING_KICK", { index, noFd: false }, [fd.fd]);
    v.started = true;
    return fd;
  }

  /** SET_VRING_CALL with a new eventfd, watched from now on (waitCall, onCall). */
  async setVringCall(index: number): Promise<EventFd> {
    const fd = this.vring(index).newCallFd();
    await this.#send("SET_VRING_CALL", { index, noFd: false }, [fd.fd]);
    return fd;
  }

  async setVringErr(index: number): Promise<EventFd> {
    const fd = this.vring(index).newErrFd();
    await this.#send("SET_VRING_ERR", { index, noFd: false }, [fd.fd]);
    return fd;
  }

  /**
   * SET_VRING_ENABLE. "This request should be sent only when VHOST_USER_F_PROTOCOL_FEATURES has
   * been negotiated"; without it the backend enabled every ring at SET_FEATURES.
   */
  async setVringEnable(index: number, enable: boolean): Promise<void> {
    if (this.#acked === null || (this.#acked & F_PROTOCOL_FEATURES) === 0n)
      throw new FrontendError(
        "NOT_NEGOTIATED",
        "VHOST_USER_F_PROTOCOL_FEATURES was not acked by SET_FEATURES (rings are enabled at SET_FEATURES)",
        "SET_VRING_ENABLE",
      );
    await this.#send("SET_VRING_ENABLE", { index, num: enable ? 1 : 0 });
    this.vring(index).enabled = enable;
  }

  /** GET_VRING_BASE: stops the ring and returns the next avail index the backend would process. */
  async getVringBase(index: number): Promise<number> {
    const r = await this.connection.request("GET_VRING_BASE", { index, num: 0 });
    if (!r) throw new VhostUserError("UNEXPECTED_REPLY", "no reply", { request: "GET_VRING_BASE" });
    const v = this.vring(index);
    v.started = false;
    return r.payload.num;
  }

  /**
   * The usual ring start: SET_VRING_NUM, SET_VRING_BASE, SET_VRING_ADDR, SET_VRING_CALL,
   * SET_VRING_ERR, SET_VRING_KICK, then SET_VRING_ENABLE(1) when protocol features were acked.
   */
  async startVring(
    index: number,
    layout: VringLayout,
    base = layout.packed ? PACKED_RING_START : 0,
  ): Promise<FrontendVring> {
    const s = layout.size;
    if (!Number.isInteger(s) || s < 1 || s > 32768 || (s & (s - 1)) !== 0)
      throw new FrontendError("BAD_ARGUMENT", `queue size ${s} is not a power of two in 1..32768`, "SET_VRING_NUM");
    await this.setVringNum(index, s);
    await this.setVringBase(index, base);
    await this.setVringAddr(index, layout);
    await this.setVringCall(index);
    await this.setVringErr(index);
    await this.setVringKick(index);
    const v = this.vring(index);
    if (this.#acked !== null && (this.#acked & F_PROTOCOL_FEATURES) !== 0n) await this.setVringEnable(index, true);
    else v.enabled = true;
    return v;
  }

  /** SET_VRING_ENABLE(0) (when it applies), then GET_VRING_BASE; returns the base. */
  async stopVring(index: number): Promise<number> {
    if (this.#acked !== null && (this.#acked & F_PROTOCOL_FEATURES) !== 0n) await this.setVringEnable(index, false);
    return this.getVringBase(index);
  }

  /** Signals the ring's kick eventfd. */
  kick(index: number): void {
    const v = this.#vrings.get(index);
    if (!v?.kickFd) throw new FrontendError("BAD_STATE", `vring ${index} has no kick eventfd`, "SET_VRING_KICK");
    v.kickFd.signal();
  }

  /** Resolves once the ring's call count passes `since` (default: now), with the new count. */
  waitCall(index: number, options: { since?: number; timeoutMs?: number } = {}): Promise<number> {
    const v = this.vring(index);
    if (this.closed) return Promise.reject(new VhostUserError("CLOSED", `frontend closed (${this.connection.label})`));
    return v.waitCall(options.since ?? v.calls, options.timeoutMs ?? this.timeoutMs, this.connection.label);
  }

  onCall(index: number, listener: (count: number) => void): () => void {
    return this.vring(index).onCall(listener);
  }

  // ---- dirty logging ---------------------------------------------------------------------------

  #logBytes(guestBytes: number | undefined, request: string): number {
    if (guestBytes !== undefined) {
      if (!Number.isSafeInteger(guestBytes) || guestBytes <= 0)
        throw new FrontendError("BAD_ARGUMENT", `log coverage ${guestBytes} bytes`, request);
      return guestBytes;
    }
    if (this.#table.length === 0) throw new FrontendError("BAD_STATE", "no memory table was sent", request);
    let end = 0;
    for (const { region } of this.#table) end = Math.max(end, region.end);
    return end;
  }

  /** SET_LOG_BASE with `area`'s fd; waits for the reply LOG_SHMFD promises. */
  async #setLogBase(area: DirtyLogArea): Promise<void> {
    if (!area.fd) throw new FrontendError("BAD_ARGUMENT", "a log without an fd cannot be shared", "SET_LOG_BASE");
    if (!isSizeSealed(area.fd))
      throw new FrontendError("UNSEALED", "the dirty log's memfd is not size-sealed", "SET_LOG_BASE");
    await this.connection.request(
      "SET_LOG_BASE",
      { mmapSize: BigInt(area.size), mmapOffset: BigInt(area.offset) },
      { fds: [area.fd], needReply: false, expectReply: true },
    );
  }

  #checkLogging(request: string): void {
    const f = this.#backendFeatures ?? 0n;
    if ((f & F_LOG_ALL) === 0n)
      throw new FrontendError("NOT_NEGOTIATED", "the backend does not offer VHOST_F_LOG_ALL", request);
    this.#need(ProtocolFeature.LOG_SHMFD, request);
    if (this.#acked === null) throw new FrontendError("BAD_STATE", "SET_FEATURES was not sent yet", request);
  }

  /**
   * Starts dirty logging: a log covering `guestBytes` (default: up to the end of the memory
   * table) → SET_LOG_BASE (reply awaited) → SET_FEATURES with VHOST_F_LOG_ALL → SET_VRING_ADDR
   * with VHOST_VRING_F_LOG for every ring with addresses. Returns the log as a DirtySource.
   */
  async startLogging(guestBytes?: number): Promise<SharedLogDirtySource> {
    if (this.#log) throw new FrontendError("BAD_STATE", "logging is already on", "SET_LOG_BASE");
    this.#checkLogging("SET_LOG_BASE");
    const area = DirtyLogArea.create(this.#logBytes(guestBytes, "SET_LOG_BASE"));
    try {
      await this.#setLogBase(area);
      this.#log = new SharedLogDirtySource(area);
      await this.#send("SET_FEATURES", (this.#acked as bigint) | F_LOG_ALL);
      for (const v of this.#vrings.values()) if (v.layout) await this.setVringAddr(v.index, v.layout);
    } catch (e) {
      this.#log = null;
      area.close();
      throw e;
    }
    return this.#log;
  }

  /**
   * Hands the backend a new log covering `guestBytes` (guest memory grew). Once the backend's
   * SET_LOG_BASE reply is in, it no longer writes the old log: the old one is drained into `sink`
   * and closed, so no dirty page is lost across the switch. If the request fails the log state on
   * the backend is unknown: treat all memory as dirty.
   */
  async replaceLog(guestBytes: number, sink: DirtySink): Promise<SharedLogDirtySource> {
    const log = this.#log;
    if (!log) throw new FrontendError("BAD_STATE", "logging is off", "SET_LOG_BASE");
    const next = DirtyLogArea.create(this.#logBytes(guestBytes, "SET_LOG_BASE"));
    try {
      await this.#setLogBase(next);
    } catch (e) {
      next.close();
      throw e;
    }
    log.swap(next, sink);
    return log;
  }

  /**
   * Stops logging: SET_FEATURES without VHOST_F_LOG_ALL, SET_VRING_ADDR without VHOST_VRING_F_LOG;
   * then what is still in the log goes to `sink` (if given) and the log is closed.
   */
  async stopLogging(sink?: DirtySink): Promise<void> {
    const log = this.#log;
    if (!log) return;
    try {
      this.#log = null;
      if (!this.closed) {
        await this.#send("SET_FEATURES", this.#acked as bigint);
        for (const v of this.#vrings.values()) if (v.layout) await this.setVringAddr(v.index, v.layout);
      }
    } finally {
      if (sink) log.sync(sink);
      log.area.close();
    }
  }

  // ---- postcopy ------------------------------------------------------------------------------------

  /**
   * Why this back-end cannot take part in a postcopy migration, or null when it can. A back-end
   * without PAGEFAULT would read guest pages that have not arrived yet (zeros) and never tell
   * anyone: postcopy must be refused before it starts, precopy still works.
   */
  postcopyRefusal(): string | null {
    const offered = this.#offeredProtocol;
    if (this.#backendFeatures === null) return "features were not negotiated yet";
    if (offered === null)
      return "the back-end does not offer VHOST_USER_F_PROTOCOL_FEATURES, hence no VHOST_USER_PROTOCOL_F_PAGEFAULT";
    if (!hasFeature(offered, ProtocolFeature.PAGEFAULT))
      return "the back-end does not offer VHOST_USER_PROTOCOL_F_PAGEFAULT: it cannot have its faults on guest pages that have not arrived served";
    if (!this.hasProtocolFeature(ProtocolFeature.PAGEFAULT))
      return "VHOST_USER_PROTOCOL_F_PAGEFAULT is offered but was not enabled by SET_PROTOCOL_FEATURES";
    return null;
  }

  /** The back-end's userfaultfd while postcopy is advised (owned by the frontend). */
  get postcopyUserfaultfd(): Userfaultfd | null {
    return this.#uffd;
  }

  /**
   * POSTCOPY_ADVISE ; <- reply with the back-end's userfaultfd. Throws FrontendError
   * NOT_NEGOTIATED with the reason (postcopyRefusal) before anything is sent when the back-end
   * cannot do postcopy. The userfaultfd stays owned by the frontend (closed at POSTCOPY_END or
   * close()); use it to serve and wake the back-end's faults.
   */
  async postcopyAdvise(): Promise<Userfaultfd> {
    const why = this.postcopyRefusal();
    if (why) throw new FrontendError("NOT_NEGOTIATED", `postcopy refused: ${why}`, "POSTCOPY_ADVISE");
    if (this.#postcopy === "advised" || this.#postcopy === "listening")
      throw new FrontendError("BAD_STATE", `postcopy is already ${this.#postcopy}`, "POSTCOPY_ADVISE");
    const r = await this.connection.request("POSTCOPY_ADVISE", undefined);
    const fd = r?.fds[0];
    for (const extra of r?.fds.slice(1) ?? []) extra.close();
    if (!fd)
      throw new VhostUserError("NACK", "the back-end sent no userfaultfd (it could not open one)", {
        request: "POSTCOPY_ADVISE",
      });
    // A back-end that sends something else (a pipe with made-up fault records) must not get
    // as far as a postcopy whose guest already runs here: check what the fd is first.
    try {
      this.#uffd = Userfaultfd.adopt(fd);
    } catch (e) {
      throw new VhostUserError(
        "BAD_FD",
        `the back-end's POSTCOPY_ADVISE fd is not a userfaultfd: ${(e as Error).message}`,
        {
          request: "POSTCOPY_ADVISE",
          cause: e,
        },
      );
    }
    this.#postcopy = "advised";
    return this.#uffd;
  }

  /**
   * POSTCOPY_LISTEN (with NEED_REPLY under REPLY_ACK, as QEMU sends it). From here on the memory
   * table goes out in its postcopy form (setMemTable).
   */
  async postcopyListen(): Promise<void> {
    if (this.#postcopy !== "advised")
      throw new FrontendError("BAD_STATE", `POSTCOPY_LISTEN needs POSTCOPY_ADVISE first (state ${this.#postcopy})`);
    await this.#send("POSTCOPY_LISTEN", undefined);
    this.#postcopy = "listening";
  }

  /**
   * POSTCOPY_END ; <- u64 status. The back-end disables its userfaultfd; ours is closed too
   * (the kernel drops the registrations only when the last fd of it is gone). A non-zero status
   * is a NACK.
   */
  async postcopyEnd(): Promise<void> {
    if (this.#postcopy !== "advised" && this.#postcopy !== "listening")
      throw new FrontendError("BAD_STATE", `POSTCOPY_END without postcopy (state ${this.#postcopy})`);
    try {
      const r = await this.connection.request("POSTCOPY_END", undefined);
      const status = r?.payload ?? 0n;
      if (status !== 0n)
        throw new VhostUserError("NACK", "the back-end reported a failure ending postcopy", {
          request: "POSTCOPY_END",
          value: status,
        });
    } finally {
      this.#postcopy = "ended";
      for (const s of this.#table) delete s.backendAddress;
      this.#uffd?.close();
      this.#uffd = null;
    }
  }

  // ---- lifetime ------------------------------------------------------------------------------------

  /** Closes the socket, every eventfd and watch, and the log. Guest memory is not ours to close. */
  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    this.connection.close();
    this.#backendChannel?.close();
    this.#backendChannel = null;
    const e = new VhostUserError("CLOSED", `frontend closed (${this.connection.label})`);
    for (const v of this.#vrings.values()) v.close(e);
    this.#vrings.clear();
    this.#log?.area.close();
    this.#log = null;
    this.#uffd?.close();
    this.#uffd = null;
    this.#table = [];
    this.#memory = null;
  }

  [Symbol.dispose](): void {
    this.close();
  }
}

/** The back-end's reply for one region must describe that region; its address is kept. */
function checkBase(sent: SentRegion, reply: MemoryRegion, request: string): bigint {
  if (reply.guestAddress !== sent.desc.guestAddress || reply.size !== sent.desc.size)
    throw new VhostUserError("BAD_VALUE", "postcopy: the reply describes another region", {
      request,
      value: `[0x${reply.guestAddress.toString(16)}, +0x${reply.size.toString(16)})`,
      expected: `[0x${sent.desc.guestAddress.toString(16)}, +0x${sent.desc.size.toString(16)})`,
    });
  if (reply.userAddress === 0n)
    throw new VhostUserError("BAD_VALUE", "postcopy: the back-end mapped the region at address 0", { request });
  return reply.userAddress;
}
