/**
 * Dirty logging from the front-end's side: a shared log handed over with SET_LOG_BASE, then
 * VHOST_F_LOG_ALL and VHOST_VRING_F_LOG switched on; the log read back as a DirtySource; a log
 * replaced while the device runs without losing a page.
 *
 * SET_LOG_BASE goes out without NEED_REPLY: under LOG_SHMFD it already solicits a reply ("the
 * presence of REPLY_ACK or need_reply bit being set brings no behavioural change"). That reply's
 * payload is undefined by the spec: libvhost-user sends a u64, rust-vmm back-ends echo the
 * 16-byte log description. Both are taken; neither is a status.
 */
import type { DirtySink } from "../../memory/dirty-source.js";
import { DirtyLogArea, SharedLogDirtySource } from "../../memory/shared-dirty-log.js";
import { isSizeSealed } from "../../sys/memfd.js";
import type { Connection } from "../connection.js";
import type { FrontendRequests } from "../protocol/frontend-requests.js";
import { FrontendError } from "./errors.js";

/** What logging needs from the front-end around it. */
export interface LoggingHost {
  readonly connection: Connection<FrontendRequests>;
  readonly closed: boolean;
  /** The log's coverage: `guestBytes`, or the end of the memory table. */
  logBytes(guestBytes: number | undefined, request: string): number;
  /** SET_FEATURES with the acked features, plus VHOST_F_LOG_ALL when `logAll`. */
  sendFeatures(logAll: boolean): Promise<void>;
  /** SET_VRING_ADDR again for every ring with addresses (the log flag follows `logging`). */
  resendRingAddresses(): Promise<void>;
}

export async function setLogBase(conn: Connection<FrontendRequests>, area: DirtyLogArea): Promise<void> {
  if (!area.fd) throw new FrontendError("BAD_ARGUMENT", "a log without an fd cannot be shared", "SET_LOG_BASE");
  if (!isSizeSealed(area.fd))
    throw new FrontendError("UNSEALED", "the dirty log's memfd is not size-sealed", "SET_LOG_BASE");
  await conn.request(
    "SET_LOG_BASE",
    { mmapSize: BigInt(area.size), mmapOffset: BigInt(area.offset) },
    { fds: [area.fd], needReply: false, expectReply: true },
  );
}

export class FrontendLogging {
  #log: SharedLogDirtySource | null = null;

  get source(): SharedLogDirtySource | null {
    return this.#log;
  }

  async start(host: LoggingHost, guestBytes?: number): Promise<SharedLogDirtySource> {
    if (this.#log) throw new FrontendError("BAD_STATE", "logging is already on", "SET_LOG_BASE");
    const area = DirtyLogArea.create(host.logBytes(guestBytes, "SET_LOG_BASE"));
    try {
      await setLogBase(host.connection, area);
      this.#log = new SharedLogDirtySource(area);
      await host.sendFeatures(true);
      await host.resendRingAddresses();
    } catch (e) {
      this.#log = null;
      area.close();
      throw e;
    }
    return this.#log;
  }

  async replace(host: LoggingHost, guestBytes: number, sink: DirtySink): Promise<SharedLogDirtySource> {
    const log = this.#log;
    if (!log) throw new FrontendError("BAD_STATE", "logging is off", "SET_LOG_BASE");
    const next = DirtyLogArea.create(host.logBytes(guestBytes, "SET_LOG_BASE"));
    try {
      await setLogBase(host.connection, next);
    } catch (e) {
      next.close();
      throw e;
    }
    log.swap(next, sink);
    return log;
  }

  async stop(host: LoggingHost, sink?: DirtySink): Promise<void> {
    const log = this.#log;
    if (!log) return;
    try {
      this.#log = null;
      if (!host.closed) {
        await host.sendFeatures(false);
        await host.resendRingAddresses();
      }
    } finally {
      if (sink) log.sync(sink);
      log.area.close();
    }
  }

  close(): void {
    this.#log?.area.close();
    this.#log = null;
  }
}
