/**
 * What one front-end connection holds on the back-end, shared by the handler modules
 * (handlers/*.ts). The session (session.ts) owns it: it orders the messages, applies the NACK
 * policy and tears it down; the handlers change it, one message at a time.
 */
import type { DirtyLogArea } from "../../memory/shared-dirty-log.js";
import { SharedDirtyLog } from "../../memory/shared-dirty-log.js";
import type { Fd } from "../../sys/fd.js";
import type { Mapping } from "../../sys/mapping.js";
import type { Userfaultfd } from "../../sys/userfaultfd.js";
import type { Connection } from "../connection.js";
import type { BackendRequests } from "../protocol/backend-requests.js";
import { hasFeature, VirtioFeature } from "../protocol/constants.js";
import { VhostUserError } from "../protocol/errors.js";
import type { FrontendRequests } from "../protocol/frontend-requests.js";
import type { RequestMessage, RequestName } from "../protocol/message.js";
import type { VringAddr } from "../protocol/payloads.js";
import type { VhostUserDevice } from "./device.js";
import { BackendMemoryTable, type MappedRegion } from "./memory-table.js";
import type { QueueThread, QueueWorkers } from "./queue-thread.js";

export type Msg = RequestMessage<FrontendRequests>;
export type MsgName = RequestName<FrontendRequests>;
export type MsgOf<K extends MsgName> = Extract<Msg, { name: K }>;

/** One handler per request name; it answers (reply/ack) itself or throws a VhostUserError. */
export type Handler<K extends MsgName> = (s: SessionState, m: MsgOf<K>) => Promise<void> | void;
export type HandlerTable = { readonly [K in MsgName]?: Handler<K> };

export interface SessionEvents {
  log(level: "info" | "warn" | "error", message: string): void;
}

/**
 * SET_LOG_BASE's reply payload, which the spec leaves undefined: "log" echoes the 16-byte log
 * description (rust-vmm's back-ends send it and its front-end reads exactly that; QEMU reads a
 * reply of any size), "u64" is libvhost-user's 8-byte form.
 */
export type LogBaseReply = "log" | "u64";

export interface SessionOptions {
  /** Default "log" (see LogBaseReply). */
  logBaseReply?: LogBaseReply;
  /** Largest device state accepted in a load transfer (default 16 MiB). */
  maxDeviceStateBytes?: number;
  /** A device-state transfer (and CHECK_DEVICE_STATE's wait for it) ends by then (default 10 s). */
  deviceStateTimeoutMs?: number;
}

export interface Vring {
  size: number;
  addr: VringAddr | null;
  base: number;
  kick: Fd | null;
  call: Fd | null;
  err: Fd | null;
  /** Started by SET_VRING_KICK, stopped by GET_VRING_BASE (or a reset). */
  started: boolean;
  /** SET_VRING_ENABLE, or every ring at SET_FEATURES without VHOST_USER_F_PROTOCOL_FEATURES. */
  enabled: boolean;
  thread: QueueThread | null;
}

export interface InflightRegion {
  fd: Fd;
  map: Mapping;
  numQueues: number;
  queueSize: number;
}

export class SessionState {
  readonly conn: Connection<FrontendRequests>;
  readonly device: VhostUserDevice;
  readonly events: SessionEvents;
  readonly options: Required<SessionOptions>;
  readonly memory = new BackendMemoryTable();
  readonly vrings: Vring[];
  readonly log = new SharedDirtyLog();
  logArea: DirtyLogArea | null = null;
  features = 0n;
  protocolFeatures = 0n;
  status = 0;
  backendChannel: Connection<BackendRequests> | null = null;
  /** A CONFIG_CHANGE_MSG asked for while suspended: sent when a ring starts again. */
  configChangePending = false;
  uffd: Userfaultfd | null = null;
  postcopyListening = false;
  /** Regions mapped while listening, waiting for the front-end's ack before uffd registration. */
  awaitingPostcopyAck: MappedRegion[] | null = null;
  inflight: InflightRegion | null = null;
  /** The queue worker threads, started with the first ring. */
  workers: QueueWorkers | null = null;
  /** The running device-state transfer (SET_DEVICE_STATE_FD), CHECK_DEVICE_STATE's answer. */
  stateTransfer: Promise<void> | null = null;
  /** Ends the running transfer early (teardown). */
  abortStateTransfer: (() => void) | null = null;
  closing = false;

  constructor(conn: Connection<FrontendRequests>, device: VhostUserDevice, events: SessionEvents, o: SessionOptions) {
    this.conn = conn;
    this.device = device;
    this.events = events;
    this.options = {
      logBaseReply: o.logBaseReply ?? "log",
      maxDeviceStateBytes: o.maxDeviceStateBytes ?? 16 << 20,
      deviceStateTimeoutMs: o.deviceStateTimeoutMs ?? 10_000,
    };
    this.vrings = Array.from({ length: device.info.numQueues }, () => ({
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
  }

  ring(index: number, request: string): Vring {
    const v = this.vrings[index];
    if (!v)
      throw new VhostUserError("BAD_VALUE", "vring index out of range", {
        request,
        value: index,
        expected: `< ${this.vrings.length}`,
      });
    return v;
  }

  /** VHOST_USER_F_PROTOCOL_FEATURES was acked by SET_FEATURES. */
  get protocolFeaturesAcked(): boolean {
    return hasFeature(this.features, VirtioFeature.VHOST_USER_F_PROTOCOL_FEATURES);
  }

  /** "While all vrings are stopped, the device is suspended" (spec, "Suspended device state"). */
  get suspended(): boolean {
    return this.vrings.every((v) => !v.started);
  }
}
