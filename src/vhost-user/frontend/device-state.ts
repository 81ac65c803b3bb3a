/**
 * The front-end's half of a device-state transfer (DEVICE_STATE): the bytes through the pipe
 * or socket of SET_DEVICE_STATE_FD. A back-end is untrusted here too: what we read is capped
 * and every transfer has a deadline; the fd is closed on every path.
 */
import { Socket } from "node:net";
import { Fd } from "../../sys/fd.js";
import { VhostUserError } from "../protocol/errors.js";

export interface DeviceStateLimits {
  /** Largest state accepted from a back-end (default 16 MiB). */
  maxBytes?: number;
  /** The transfer ends by then (default: the front-end's reply deadline). */
  timeoutMs?: number;
}

export const DEFAULT_MAX_DEVICE_STATE = 16 << 20;

function socketOn(raw: number, readable: boolean): Socket {
  try {
    return new Socket({ fd: raw, readable, writable: !readable });
  } catch (e) {
    new Fd(raw).close();
    throw new VhostUserError("BAD_VALUE", `device-state fd unusable: ${(e as Error).message}`, {
      request: "SET_DEVICE_STATE_FD",
      cause: e,
    });
  }
}

function deadline(timeoutMs: number, fail: (e: Error) => void): NodeJS.Timeout {
  return setTimeout(
    () =>
      fail(
        new VhostUserError("TIMEOUT", `device-state transfer not finished within ${timeoutMs} ms`, {
          request: "SET_DEVICE_STATE_FD",
          value: timeoutMs,
        }),
      ),
    timeoutMs,
  );
}

/** Reads the state to EOF from `raw` (owned: closed whatever happens). */
export function readState(raw: number, maxBytes: number, timeoutMs: number): Promise<Uint8Array> {
  const input = socketOn(raw, true);
  return new Promise((resolve, reject) => {
    const parts: Buffer[] = [];
    let total = 0;
    const finish = (e: Error | null) => {
      clearTimeout(timer);
      input.destroy();
      if (e) reject(e);
      else resolve(new Uint8Array(Buffer.concat(parts)));
    };
    const timer = deadline(timeoutMs, finish);
    input.on("data", (b: Buffer) => {
      total += b.length;
      if (total > maxBytes) {
        finish(
          new VhostUserError("PAYLOAD_TOO_LARGE", "the back-end's device state is larger than the limit", {
            request: "SET_DEVICE_STATE_FD",
            value: total,
            expected: `<= ${maxBytes}`,
          }),
        );
        return;
      }
      parts.push(b);
    });
    input.on("error", finish);
    input.on("end", () => finish(null));
  });
}

/** Writes `state` into `raw` and closes it (EOF ends the transfer). */
export function writeState(raw: number, state: Uint8Array, timeoutMs: number): Promise<void> {
  const out = socketOn(raw, false);
  return new Promise((resolve, reject) => {
    const finish = (e: Error | null) => {
      clearTimeout(timer);
      out.destroy();
      if (e) reject(e);
      else resolve();
    };
    const timer = deadline(timeoutMs, finish);
    out.on("error", finish);
    out.end(state, () => finish(null));
  });
}
