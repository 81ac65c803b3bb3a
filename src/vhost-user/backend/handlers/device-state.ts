/**
 * Device-state transfer (DEVICE_STATE): SET_DEVICE_STATE_FD starts moving the device's state
 * through a pipe or socket the front-end hands us; CHECK_DEVICE_STATE reports how it went.
 *
 * The fd is the front-end's choice, so it is checked and bounded: only a pipe or a socket is
 * taken (anything else is refused with the spec's error reply); a load takes at most
 * `maxDeviceStateBytes`; a transfer ends within `deviceStateTimeoutMs` (so CHECK_DEVICE_STATE,
 * which waits for it, cannot hold the control queue for ever); the fd is closed on every path.
 */
import { Socket } from "node:net";
import { Fd } from "../../../sys/fd.js";
import { fileKind } from "../../../sys/stat.js";
import { DeviceStateDirection, DeviceStatePhase, VHOST_USER_VRING_NOFD_MASK } from "../../protocol/constants.js";
import { VhostUserError } from "../../protocol/errors.js";
import type { HandlerTable, SessionState } from "../state.js";

/** Bit 8 (no fd comes back) with status 1: the spec's refusal. */
const REFUSED = VHOST_USER_VRING_NOFD_MASK | 1n;

function transfer(s: SessionState, fd: Fd, direction: number): void {
  const { maxDeviceStateBytes: max, deviceStateTimeoutMs: timeoutMs } = s.options;
  const raw = fd.release();
  let sock: Socket;
  try {
    // A net.Socket, not an fs stream: the fd may be a pipe (QEMU's) or a socket, blocking or
    // not (a non-blocking one gives fs streams EAGAIN); libuv handles both.
    sock =
      direction === DeviceStateDirection.SAVE
        ? new Socket({ fd: raw, readable: false, writable: true })
        : new Socket({ fd: raw, readable: true, writable: false });
  } catch (e) {
    new Fd(raw).close();
    throw new VhostUserError("BAD_VALUE", `device-state fd unusable: ${(e as Error).message}`, {
      request: "SET_DEVICE_STATE_FD",
      cause: e,
    });
  }
  let abort: (why: Error) => void = () => undefined;
  const done = new Promise<Uint8Array | null>((resolve, reject) => {
    const timer = setTimeout(
      () =>
        abort(
          new VhostUserError("TIMEOUT", `device-state transfer not finished within ${timeoutMs} ms`, {
            request: "SET_DEVICE_STATE_FD",
            value: timeoutMs,
          }),
        ),
      timeoutMs,
    );
    const finish = (e: Error | null, state: Uint8Array | null = null) => {
      clearTimeout(timer);
      sock.destroy();
      if (e) reject(e);
      else resolve(state);
    };
    abort = (why) => finish(why);
    sock.on("error", (e) => finish(e));
    if (direction === DeviceStateDirection.SAVE) {
      Promise.resolve(s.device.saveState?.() ?? new Uint8Array(0)).then(
        (state) => sock.end(state, () => finish(null)),
        (e: Error) => finish(e),
      );
    } else {
      const parts: Buffer[] = [];
      let total = 0;
      sock.on("data", (b: Buffer) => {
        total += b.length;
        if (total > max) {
          finish(
            new VhostUserError("PAYLOAD_TOO_LARGE", "device state larger than this back-end accepts", {
              request: "SET_DEVICE_STATE_FD",
              value: total,
              expected: `<= ${max}`,
            }),
          );
          return;
        }
        parts.push(b);
      });
      sock.on("end", () => finish(null, new Uint8Array(Buffer.concat(parts))));
    }
  });
  s.abortStateTransfer = () => abort(new VhostUserError("CLOSED", "device-state transfer abandoned"));
  s.stateTransfer = done.then(async (state) => {
    if (state !== null) await s.device.loadState?.(state);
  });
  // Its outcome is CHECK_DEVICE_STATE's answer; until that comes, a failure is not unhandled.
  s.stateTransfer.catch(() => undefined);
}

export function abandonStateTransfer(s: SessionState): void {
  s.abortStateTransfer?.();
  s.abortStateTransfer = null;
  s.stateTransfer = null;
}

export const deviceStateHandlers: HandlerTable = {
  async SET_DEVICE_STATE_FD(s, m) {
    const fd = m.fds[0];
    if (!fd) throw new VhostUserError("BAD_FD_COUNT", "no pipe fd", { request: m.name });
    // A new transfer replaces one the front-end never checked.
    abandonStateTransfer(s);
    const { direction, phase } = m.payload;
    const kind = fileKind(fd);
    if ((kind !== "fifo" && kind !== "socket") || phase !== DeviceStatePhase.STOPPED || direction > 1) {
      fd.close();
      s.events.log(
        "warn",
        `SET_DEVICE_STATE_FD refused: ${kind !== "fifo" && kind !== "socket" ? `a ${kind} fd (a pipe or socket is needed)` : `direction ${direction} phase ${phase}`}`,
      );
      await s.conn.reply(m, REFUSED);
      return;
    }
    transfer(s, fd, direction);
    // Bit 8: we use the fd we were given, none comes back.
    await s.conn.reply(m, VHOST_USER_VRING_NOFD_MASK);
  },

  async CHECK_DEVICE_STATE(s, m) {
    const r = s.stateTransfer;
    s.stateTransfer = null;
    s.abortStateTransfer = null;
    const ok = r
      ? await r.then(
          () => true,
          (e: Error) => {
            s.events.log("warn", `device state: ${e.message}`);
            return false;
          },
        )
      : true;
    await s.conn.reply(m, ok ? 0n : 1n);
  },
};
