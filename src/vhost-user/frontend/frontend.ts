/**
 * VhostUserFrontend: the VMM's side of vhost-user, driving any backend over its socket. One
 * thin method per message; what spans several messages lives in its own module: the memory
 * table (memory-sync.ts), dirty logging (logging.ts), postcopy (postcopy.ts) and the
 * device-state transfer (device-state.ts). `start()` runs the usual set-up in QEMU's order.
 *
 * Replies: a reply is awaited exactly when the spec says one comes — always for GET_* (and
 * GET_CONFIG), for SET_LOG_BASE when LOG_SHMFD is negotiated ("Here is a list of the ones that
 * do [require replies]: ... VHOST_USER_SET_LOG_BASE (if VHOST_USER_PROTOCOL_F_LOG_SHMFD)"), and
 * for everything else only when REPLY_ACK is negotiated (NEED_REPLY is then set). Every wait
 * has the connection's deadline and fails with a VhostUserError naming the request (TIMEOUT,
 * NACK, DISCONNECTED, CLOSED).
 */
import { EventEmitter } from "node:events";
import type { DirtySink } from "../../memory/dirty-source.js";
import type { GuestMemory } from "../../memory/guest-memory.js";
import type { SharedLogDirtySource } from "../../memory/shared-dirty-log.js";
import type { EventFd } from "../../sys/eventfd.js";
import type { Fd } from "../../sys/fd.js";
import { UnixSocket } from "../../sys/unix-socket.js";
import type { Userfaultfd } from "../../sys/userfaultfd.js";
import { availRingSize, descTableSize, isPowerOfTwo, MAX_QUEUE_SIZE, usedRingSize } from "../../virtio/ring.js";
import { Connection, type ConnectionOptions, DEFAULT_REPLY_TIMEOUT_MS } from "../connection.js";
import type { BackendRequests } from "../protocol/backend-requests.js";
import {
  featureMask,
  hasFeature,
  ProtocolFeature,
  VHOST_USER_MAX_CONFIG_SIZE,
  VHOST_VRING_F_LOG,
  VirtioFeature,
} from "../protocol/constants.js";
import { VhostUserError } from "../protocol/errors.js";
import type { FrontendRequests } from "../protocol/frontend-requests.js";
import type { RequestPayload } from "../protocol/message.js";
import type { InflightDescription } from "../protocol/payloads.js";
import { DEFAULT_MAX_DEVICE_STATE, type DeviceStateLimits, readState, writeState } from "./device-state.js";
import { FrontendError } from "./errors.js";
import { FrontendLogging, type LoggingHost } from "./logging.js";
import { type BackendRegionBase, MemoryTableSync, type MemTableOptions } from "./memory-sync.js";
import { FrontendPostcopy, postcopyRefusal } from "./postcopy.js";
import { FrontendVring, type VringLayout } from "./vring.js";

export type { DeviceStateLimits } from "./device-state.js";
export type { BackendRegionBase, MemTableOptions } from "./memory-sync.js";

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
  /** Largest device state accepted from the back-end (saveDeviceState; default 16 MiB). */
  maxDeviceStateBytes?: number;
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

/** One ring for start(): its layout, and where it resumes (SET_VRING_BASE; default 0, or the fresh-ring position for a packed ring). */
export interface StartRing {
  index?: number;
  layout: VringLayout;
  base?: number;
}

export interface StartOptions {
  /** Guest memory for the back-end (setMemTable). */
  memory: GuestMemory;
  /** Virtio features to acknowledge; a bit the back-end does not offer is refused. */
  features: bigint;
  /** Features acknowledged only when offered (e.g. VIRTIO_RING_F_EVENT_IDX). */
  optionalFeatures?: bigint;
  /** Rings to start, in order (index defaults to the position in the list). */
  rings?: readonly (VringLayout | StartRing)[];
}

export interface Started extends Negotiated {
  /** The features SET_FEATURES acknowledged. */
  acked: bigint;
  vrings: FrontendVring[];
}

/** What the back-end tells us on its request channel. */
export type BackendChannelEvents = {
  /** CONFIG_CHANGE_MSG: the device's config space changed (GET_CONFIG again). */
  "config-change": [];
  /** Any back-end request, by name (also the ones this front-end refuses). */
  request: [name: string];
};

type U64Request = "GET_FEATURES" | "GET_PROTOCOL_FEATURES" | "GET_QUEUE_NUM" | "GET_MAX_MEM_SLOTS" | "GET_STATUS";

export class VhostUserFrontend implements Disposable {
  readonly connection: Connection<FrontendRequests>;
  /** Events of the back-end request channel (see FrontendOptions.backendChannel). */
  readonly backendEvents = new EventEmitter<BackendChannelEvents>();
  readonly timeoutMs: number;
  readonly #maxDeviceState: number;
  #backendChannel: Connection<BackendRequests> | null = null;
  #wantedProtocol: bigint;
  #backendFeatures: bigint | null = null;
  #offeredProtocol: bigint | null = null;
  #protocol = 0n;
  /** The last SET_FEATURES value, without VHOST_F_LOG_ALL (added while logging). */
  #acked: bigint | null = null;
  #maxMemSlots: number | null = null;
  readonly #table: MemoryTableSync;
  readonly #logging = new FrontendLogging();
  readonly #postcopy = new FrontendPostcopy();
  #vrings = new Map<number, FrontendVring>();
  #closed = false;

  constructor(socket: UnixSocket, options: FrontendOptions = {}) {
    this.timeoutMs = options.timeoutMs ?? DEFAULT_REPLY_TIMEOUT_MS;
    this.#maxDeviceState = options.maxDeviceStateBytes ?? DEFAULT_MAX_DEVICE_STATE;
    this.#wantedProtocol = (options.protocolFeatures ?? FRONTEND_PROTOCOL_FEATURES) & FRONTEND_PROTOCOL_FEATURES;
    if (!options.backendChannel) this.#wantedProtocol &= ~featureMask(ProtocolFeature.BACKEND_REQ);
    const co: ConnectionOptions = { timeoutMs: this.timeoutMs, label: options.label ?? "vhost-user backend" };
    if (options.maxPayloadSize !== undefined) co.maxPayloadSize = options.maxPayloadSize;
    this.connection = Connection.frontend(socket, co);
    this.#table = new MemoryTableSync(this.connection, options.allowUnsealedMemory ?? false);
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
    return this.#table.memory;
  }

  get logging(): boolean {
    return this.#logging.source !== null;
  }

  /** The current dirty log read back as a DirtySource (null while logging is off). */
  get log(): SharedLogDirtySource | null {
    return this.#logging.source;
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

  get #protocolAcked(): boolean {
    return this.#acked !== null && (this.#acked & F_PROTOCOL_FEATURES) !== 0n;
  }

  async #u64(name: U64Request): Promise<bigint> {
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

  // ---- the usual set-up --------------------------------------------------------------------------

  /**
   * negotiate -> SET_OWNER -> SET_FEATURES -> memory table -> every ring started (and enabled),
   * the sequence QEMU sends at vhost_dev_start.
   */
  async start(o: StartOptions): Promise<Started> {
    const n = await this.negotiate();
    await this.setOwner();
    const acked = o.features | ((o.optionalFeatures ?? 0n) & n.features);
    await this.setFeatures(acked);
    await this.setMemTable(o.memory);
    const vrings: FrontendVring[] = [];
    for (const [i, r] of (o.rings ?? []).entries()) {
      const ring: StartRing = "layout" in r ? r : { layout: r };
      vrings.push(await this.startVring(ring.index ?? i, ring.layout, ring.base));
    }
    return { ...n, acked: this.#acked as bigint, vrings };
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
    await this.#send("SET_FEATURES", this.logging ? f | F_LOG_ALL : f);
    this.#acked = f;
    // Without protocol features the back-end enabled every ring at SET_FEATURES.
    if ((f & F_PROTOCOL_FEATURES) === 0n) for (const v of this.#vrings.values()) v.enabled = true;
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

  /**
   * GET_CONFIG of `size` bytes at `offset`. The back-end's error — an empty reply (the spec), or
   * a config header of size 0 (rust-vmm back-ends) — is a NACK.
   */
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
    if (cfg === null || cfg.data.length === 0)
      throw new VhostUserError("NACK", "the backend refused the config read (empty reply)", {
        request: "GET_CONFIG",
        value: size,
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
   * entries, or null when it answers with mmap size 0 ("no inflight", as QEMU reads it). The
   * caller owns `fd` and keeps it across back-end restarts: handing it to the next back-end
   * life with setInflight() before its rings start lets it resubmit what was in flight.
   */
  async getInflight(numQueues: number, queueSize: number): Promise<(InflightDescription & { fd: Fd }) | null> {
    this.#need(ProtocolFeature.INFLIGHT_SHMFD, "GET_INFLIGHT_FD");
    const r = await this.connection.request("GET_INFLIGHT_FD", { mmapSize: 0n, mmapOffset: 0n, numQueues, queueSize });
    if (!r) throw new VhostUserError("UNEXPECTED_REPLY", "no reply", { request: "GET_INFLIGHT_FD" });
    const d = r.payload as InflightDescription;
    if (d.mmapSize === 0n) {
      for (const f of r.fds) f.close();
      return null;
    }
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
   * CHECK_DEVICE_STATE. A failure on the back-end's side is a VhostUserError NACK; more than
   * `maxBytes` (default FrontendOptions.maxDeviceStateBytes) is PAYLOAD_TOO_LARGE, a transfer
   * longer than `timeoutMs` (default the reply deadline) TIMEOUT.
   */
  async saveDeviceState(limits: DeviceStateLimits = {}): Promise<Uint8Array> {
    const fd = await this.#deviceStateFd(0);
    const state = await readState(fd, limits.maxBytes ?? this.#maxDeviceState, limits.timeoutMs ?? this.timeoutMs);
    await this.#checkDeviceState("save");
    return state;
  }

  /** Hands the back-end a state saved by saveDeviceState() on another one (SET_DEVICE_STATE_FD, load). */
  async loadDeviceState(state: Uint8Array, limits: DeviceStateLimits = {}): Promise<void> {
    const fd = await this.#deviceStateFd(1);
    await writeState(fd, state, limits.timeoutMs ?? this.timeoutMs);
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

  /** RESET_DEVICE: the back-end disables every ring and resets its device state. */
  async resetDevice(): Promise<void> {
    this.#need(ProtocolFeature.RESET_DEVICE, "RESET_DEVICE");
    await this.#send("RESET_DEVICE", undefined);
    for (const v of this.#vrings.values()) {
      v.started = false;
      v.enabled = false;
    }
  }

  /** RESET_OWNER, deprecated by the spec ("should not be used"); here only to test back-ends. */
  async resetOwner(): Promise<void> {
    await this.#send("RESET_OWNER", undefined);
  }

  /**
   * Resets the device: RESET_DEVICE when negotiated. Without it (as QEMU, which never falls
   * back to the deprecated RESET_OWNER) every started ring is stopped (SET_VRING_ENABLE(0) when
   * it applies, GET_VRING_BASE) and the status cleared when STATUS is negotiated.
   */
  async reset(): Promise<void> {
    if (this.hasProtocolFeature(ProtocolFeature.RESET_DEVICE)) return this.resetDevice();
    if (this.hasProtocolFeature(ProtocolFeature.STATUS)) await this.setStatus(0);
    for (const v of this.#vrings.values()) if (v.started) await this.stopVring(v.index);
  }

  // ---- memory ----------------------------------------------------------------------------------

  /**
   * Hands the backend `memory` (see memory-sync.ts): ADD_MEM_REG / REM_MEM_REG for what changed
   * when CONFIGURE_MEM_SLOTS is negotiated, else one SET_MEM_TABLE; the postcopy form after
   * POSTCOPY_LISTEN. Every region needs an fd. The memory stays owned by the caller and must
   * outlive the frontend's use of it.
   */
  async setMemTable(memory: GuestMemory, options: MemTableOptions = {}): Promise<void> {
    await this.#table.sync(
      memory,
      {
        slots: this.hasProtocolFeature(ProtocolFeature.CONFIGURE_MEM_SLOTS),
        maxSlots: async () => this.#maxMemSlots ?? (await this.getMaxMemSlots()),
        postcopy: this.#postcopy.listening,
      },
      options,
    );
  }

  /** Postcopy: the back-end's address for each region of the table, as its replies gave them. */
  get backendRegionBases(): BackendRegionBase[] {
    return this.#table.backendRegionBases;
  }

  /** The host (user) address of `[gpa, gpa+len)`, which must lie in one region of the table. */
  userAddress(gpa: number, len: number, request = "SET_VRING_ADDR"): bigint {
    return this.#table.userAddress(gpa, len, request);
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
      flags: this.logging ? VHOST_VRING_F_LOG : 0,
      descriptor: this.userAddress(layout.descTable, descTableSize(s)),
      used: this.userAddress(layout.usedRing, packed ? 4 : usedRingSize(s)),
      available: this.userAddress(layout.availRing, packed ? 4 : availRingSize(s)),
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
    if (!this.#protocolAcked)
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
    this.vring(index).started = false;
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
    if (!Number.isInteger(s) || s < 1 || s > MAX_QUEUE_SIZE || !isPowerOfTwo(s))
      throw new FrontendError("BAD_ARGUMENT", `queue size ${s} is not a power of two in 1..32768`, "SET_VRING_NUM");
    await this.setVringNum(index, s);
    await this.setVringBase(index, base);
    await this.setVringAddr(index, layout);
    await this.setVringCall(index);
    await this.setVringErr(index);
    await this.setVringKick(index);
    const v = this.vring(index);
    if (this.#protocolAcked) await this.setVringEnable(index, true);
    else v.enabled = true;
    return v;
  }

  /** SET_VRING_ENABLE(0) (when it applies), then GET_VRING_BASE; returns the base. */
  async stopVring(index: number): Promise<number> {
    if (this.#protocolAcked) await this.setVringEnable(index, false);
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

  #loggingHost(request: string): LoggingHost {
    const f = this.#backendFeatures ?? 0n;
    if ((f & F_LOG_ALL) === 0n)
      throw new FrontendError("NOT_NEGOTIATED", "the backend does not offer VHOST_F_LOG_ALL", request);
    this.#need(ProtocolFeature.LOG_SHMFD, request);
    if (this.#acked === null) throw new FrontendError("BAD_STATE", "SET_FEATURES was not sent yet", request);
    return {
      connection: this.connection,
      closed: this.closed,
      logBytes: (guestBytes, req) => {
        if (guestBytes === undefined) return this.#table.end(req);
        if (!Number.isSafeInteger(guestBytes) || guestBytes <= 0)
          throw new FrontendError("BAD_ARGUMENT", `log coverage ${guestBytes} bytes`, req);
        return guestBytes;
      },
      sendFeatures: (logAll) => this.#send("SET_FEATURES", (this.#acked as bigint) | (logAll ? F_LOG_ALL : 0n)),
      resendRingAddresses: async () => {
        for (const v of this.#vrings.values()) if (v.layout) await this.setVringAddr(v.index, v.layout);
      },
    };
  }

  /**
   * Starts dirty logging: a log covering `guestBytes` (default: up to the end of the memory
   * table) → SET_LOG_BASE (reply awaited) → SET_FEATURES with VHOST_F_LOG_ALL → SET_VRING_ADDR
   * with VHOST_VRING_F_LOG for every ring with addresses. Returns the log as a DirtySource.
   */
  async startLogging(guestBytes?: number): Promise<SharedLogDirtySource> {
    if (this.logging) throw new FrontendError("BAD_STATE", "logging is already on", "SET_LOG_BASE");
    return this.#logging.start(this.#loggingHost("SET_LOG_BASE"), guestBytes);
  }

  /**
   * Hands the backend a new log covering `guestBytes` (guest memory grew). Once the backend's
   * SET_LOG_BASE reply is in, it no longer writes the old log: the old one is drained into `sink`
   * and closed, so no dirty page is lost across the switch. If the request fails the log state on
   * the backend is unknown: treat all memory as dirty.
   */
  async replaceLog(guestBytes: number, sink: DirtySink): Promise<SharedLogDirtySource> {
    if (!this.logging) throw new FrontendError("BAD_STATE", "logging is off", "SET_LOG_BASE");
    return this.#logging.replace(this.#loggingHost("SET_LOG_BASE"), guestBytes, sink);
  }

  /**
   * Stops logging: SET_FEATURES without VHOST_F_LOG_ALL, SET_VRING_ADDR without VHOST_VRING_F_LOG;
   * then what is still in the log goes to `sink` (if given) and the log is closed.
   */
  async stopLogging(sink?: DirtySink): Promise<void> {
    if (!this.logging) return;
    await this.#logging.stop(
      {
        connection: this.connection,
        closed: this.closed,
        logBytes: () => 0,
        sendFeatures: (logAll) => this.#send("SET_FEATURES", (this.#acked as bigint) | (logAll ? F_LOG_ALL : 0n)),
        resendRingAddresses: async () => {
          for (const v of this.#vrings.values()) if (v.layout) await this.setVringAddr(v.index, v.layout);
        },
      },
      sink,
    );
  }

  // ---- postcopy ------------------------------------------------------------------------------------

  /**
   * Why this back-end cannot take part in a postcopy migration, or null when it can. A back-end
   * without PAGEFAULT would read guest pages that have not arrived yet (zeros) and never tell
   * anyone: postcopy must be refused before it starts, precopy still works.
   */
  postcopyRefusal(): string | null {
    return postcopyRefusal(this.#backendFeatures, this.#offeredProtocol, this.#protocol);
  }

  /** The back-end's userfaultfd while postcopy is advised (owned by the frontend). */
  get postcopyUserfaultfd(): Userfaultfd | null {
    return this.#postcopy.uffd;
  }

  /**
   * POSTCOPY_ADVISE ; <- reply with the back-end's userfaultfd. Throws FrontendError
   * NOT_NEGOTIATED with the reason (postcopyRefusal) before anything is sent when the back-end
   * cannot do postcopy. The userfaultfd stays owned by the frontend (closed at POSTCOPY_END or
   * close()); use it to serve and wake the back-end's faults.
   */
  async postcopyAdvise(): Promise<Userfaultfd> {
    return this.#postcopy.advise(this.connection, this.postcopyRefusal());
  }

  /**
   * POSTCOPY_LISTEN (with NEED_REPLY under REPLY_ACK, as QEMU sends it). From here on the memory
   * table goes out in its postcopy form (setMemTable).
   */
  async postcopyListen(): Promise<void> {
    await this.#postcopy.listen(this.connection);
  }

  /**
   * POSTCOPY_END ; <- u64 status. The back-end disables its userfaultfd; ours is closed too
   * (the kernel drops the registrations only when the last fd of it is gone). A non-zero status
   * is a NACK.
   */
  async postcopyEnd(): Promise<void> {
    try {
      await this.#postcopy.end(this.connection);
    } finally {
      if (this.#postcopy.phase === "ended") this.#table.forgetBackendAddresses();
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
    this.#logging.close();
    this.#postcopy.close();
    this.#table.clear();
  }

  [Symbol.dispose](): void {
    this.close();
  }
}
