/**
 * One front-end connection to the back-end: the protocol endpoint. It keeps the order (each
 * message is handled after the one before it has been answered: a handler that waits — for
 * the dirty-log switch, for a worker to stop a ring — delays the next message, as the protocol
 * requires), the NACK policy (what a failed request costs) and the teardown. What each message
 * does is in handlers/: control (features, config, status, reset), rings, memory, log,
 * postcopy, inflight and device-state, one typed handler per request name.
 *
 * Back-pressure: while a request is being handled, no further bytes are read from the socket
 * (at most the messages of the chunk already read wait, with at most 8 fds), so a front-end
 * cannot pile up requests and their fds behind a slow one.
 */
import type { SharedDirtyLog } from "../../memory/shared-dirty-log.js";
import type { UnixSocket } from "../../sys/unix-socket.js";
import { Connection } from "../connection.js";
import { hasFeature, ProtocolFeature } from "../protocol/constants.js";
import { VhostUserError } from "../protocol/errors.js";
import type { FrontendRequests } from "../protocol/frontend-requests.js";
import { type Header, needsReply } from "../protocol/message.js";
import type { VhostUserDevice } from "./device.js";
import {
  controlHandlers,
  FRAMEWORK_PROTOCOL_FEATURES,
  offeredFeatures,
  offeredProtocolFeatures,
  UNSUPPORTED,
} from "./handlers/control.js";
import { abandonStateTransfer, deviceStateHandlers } from "./handlers/device-state.js";
import { closeInflight, inflightHandlers } from "./handlers/inflight.js";
import { logHandlers } from "./handlers/log.js";
import { MAX_MEM_SLOTS, memoryHandlers } from "./handlers/memory.js";
import { closePostcopy, postcopyHandlers } from "./handlers/postcopy.js";
import { ringHandlers, sendConfigChange, stopAllRings } from "./handlers/rings.js";
import {
  type Handler,
  type HandlerTable,
  type Msg,
  type MsgName,
  type SessionEvents,
  type SessionOptions,
  SessionState,
} from "./state.js";

export type { SessionEvents, SessionOptions };
export { FRAMEWORK_PROTOCOL_FEATURES, MAX_MEM_SLOTS };

/** Every request this back-end serves, by name. */
export const HANDLERS: HandlerTable = {
  ...controlHandlers,
  ...ringHandlers,
  ...memoryHandlers,
  ...logHandlers,
  ...postcopyHandlers,
  ...inflightHandlers,
  ...deviceStateHandlers,
};

const DONE: Promise<void> = Promise.resolve();

/** Requests waiting (not yet handled) before the socket stops being read. */
const MAX_WAITING = 1;

export class BackendSession {
  readonly conn: Connection<FrontendRequests>;
  readonly #s: SessionState;
  readonly #events: SessionEvents;
  #queue: Promise<void> = Promise.resolve();
  /** Requests received and not yet handled (the one in progress included). */
  #inFlight = 0;
  #paused = false;
  #closed: Promise<void>;

  constructor(socket: UnixSocket, device: VhostUserDevice, events: SessionEvents, options: SessionOptions = {}) {
    this.#events = events;
    // Memory tables with 8 regions and config spaces fit; nothing legitimate is bigger.
    this.conn = Connection.frontend(socket, { label: "front-end", maxPayloadSize: 4096 });
    this.#s = new SessionState(this.conn, device, events, options);
    let done: () => void = () => undefined;
    this.#closed = new Promise((r) => {
      done = r;
    });
    this.conn.on("request", (m) => this.#enqueueRequest(m));
    this.conn.on("protocolError", (e, header) => {
      events.log("warn", `malformed message: ${e.message}`);
      // In order behind the messages before it, like any request.
      this.#enqueue(() => this.#refuseMalformed(e, header));
    });
    this.conn.on("close", (e) => {
      if (e && e.code !== "CLOSED") events.log("info", `front-end gone: ${e.message}`);
      this.#queue = this.#queue.then(() => this.#teardown()).then(done);
    });
  }

  #enqueue(work: () => Promise<void>): void {
    this.#admit();
    // Nothing before it: start now (no hop through the chain; the common case).
    const started = this.#inFlight === 1 ? work() : this.#queue.then(work);
    this.#queue = started.then(this.#finished, this.#finished);
  }

  /**
   * A request, in order. The common case (nothing in flight) costs one promise of ours on top
   * of the handler's: no closure, no async wrapper. Every control message allocates, and each
   * scavenge it brings is a pause on the downtime path (GET_VRING_BASE at switchover).
   */
  #enqueueRequest(m: Msg): void {
    this.#admit();
    if (this.#inFlight === 1) this.#queue = this.#serve(m).then(this.#finished, this.#finished);
    else this.#queue = this.#queue.then(() => this.#serve(m)).then(this.#finished, this.#finished);
  }

  #admit(): void {
    this.#inFlight++;
    if (this.#inFlight > MAX_WAITING && !this.#paused) {
      this.#paused = true;
      this.conn.pause();
    }
  }

  readonly #finished = (): void => {
    this.#inFlight--;
    if (this.#inFlight === 0 && this.#paused) {
      this.#paused = false;
      this.conn.resume();
    }
  };

  /** Resolves when the connection is gone and everything it held is released. */
  get closed(): Promise<void> {
    return this.#closed;
  }

  get features(): bigint {
    return this.#s.features;
  }

  get protocolFeatures(): bigint {
    return this.#s.protocolFeatures;
  }

  /** The shared dirty log (tests and devices may create writers on it). */
  get dirtyLog(): SharedDirtyLog {
    return this.#s.log;
  }

  /**
   * Tells the front-end the config space changed (CONFIG_CHANGE_MSG; needs BACKEND_REQ and
   * CONFIG negotiated). While the device is suspended (every ring stopped) nothing may be sent
   * to the front-end: the message then goes when a ring starts again ("deferred").
   */
  async notifyConfigChange(): Promise<"sent" | "deferred"> {
    const s = this.#s;
    if (!hasFeature(s.protocolFeatures, ProtocolFeature.CONFIG))
      throw new VhostUserError("UNEXPECTED_REQUEST", "CONFIG_CHANGE_MSG needs VHOST_USER_PROTOCOL_F_CONFIG", {
        request: "CONFIG_CHANGE_MSG",
      });
    if (!s.backendChannel)
      throw new VhostUserError("CLOSED", "no back-end request channel (SET_BACKEND_REQ_FD not received)", {
        request: "CONFIG_CHANGE_MSG",
      });
    if (s.suspended) {
      s.configChangePending = true;
      return "deferred";
    }
    await sendConfigChange(s);
    return "sent";
  }

  close(): void {
    this.conn.close();
  }

  offeredFeatures(): bigint {
    return offeredFeatures(this.#s);
  }

  offeredProtocolFeatures(): bigint {
    return offeredProtocolFeatures(this.#s);
  }

  /** Runs the request's handler; never rejects (a failure costs what #failed says). */
  #serve(m: Msg): Promise<void> {
    const s = this.#s;
    if (s.closing) {
      for (const f of m.fds) f.close();
      return DONE;
    }
    let handled: Promise<void>;
    try {
      const handler = HANDLERS[m.name] as Handler<MsgName> | undefined;
      if (!handler) {
        for (const f of m.fds) f.close();
        throw new VhostUserError(
          "UNEXPECTED_REQUEST",
          (UNSUPPORTED as readonly string[]).includes(m.name)
            ? "not supported by this back-end (feature not offered)"
            : "not handled",
          { request: m.name },
        );
      }
      const r = handler(s, m as never);
      if (r === undefined) return DONE; // a synchronous handler, done
      handled = r;
    } catch (e) {
      return this.#failed(m, e);
    }
    return handled.then(undefined, (e: unknown) => this.#failed(m, e));
  }

  /** What a failed request costs: its fds, then a NACK or (when a reply is owed) the connection. */
  async #failed(m: Msg, e: unknown): Promise<void> {
    for (const f of m.fds) if (!f.closed) f.close();
    const err = e as Error;
    this.#events.log("warn", `${m.name} failed: ${err.message}`);
    // NEED_REPLY on a request with an explicit reply changes nothing ("no behavioural change"):
    // there is no NACK for it, only the hang-up below.
    if (this.conn.index.byName(m.name).replies === "always" || this.#replyExpected(m)) {
      // The front-end waits for a reply we cannot give: drop the connection rather than
      // leave it hanging; it can reconnect.
      this.conn.close();
    } else if (m.needReply) {
      await this.conn.ack(m, 1n).catch(() => undefined);
    }
  }

  /**
   * A message that could not be decoded must not vanish: the front-end would wait for its
   * REPLY_ACK forever, or believe a change happened that did not. A request that asked for
   * REPLY_ACK and whose header is sound gets a NACK; anything else (bad version or flags, an
   * unknown code, a request whose reply we cannot give) costs the connection.
   */
  async #refuseMalformed(e: VhostUserError, header: Header | undefined): Promise<void> {
    if (this.#s.closing) return;
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
    if (m.name === "SET_LOG_BASE") return hasFeature(this.#s.protocolFeatures, ProtocolFeature.LOG_SHMFD);
    if (m.name === "SET_MEM_TABLE" || m.name === "ADD_MEM_REG") return this.#s.postcopyListening;
    return false;
  }

  async #teardown(): Promise<void> {
    const s = this.#s;
    if (s.closing) return;
    s.closing = true;
    // Closing the userfaultfd first releases any worker blocked on a postcopy fault.
    closePostcopy(s);
    abandonStateTransfer(s);
    await stopAllRings(s, 1000);
    await s.workers?.close();
    s.workers = null;
    for (const v of s.vrings) {
      v.thread = null;
      v.kick?.close();
      v.call?.close();
      v.err?.close();
    }
    await s.log.close();
    s.logArea?.close();
    s.logArea = null;
    s.backendChannel?.close();
    s.memory.closeAll();
    closeInflight(s);
    s.device.reset?.();
  }
}
