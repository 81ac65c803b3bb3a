/**
 * Negotiation and device-level messages: features, protocol features, ownership, queue count,
 * config space, the back-end request channel, status and reset.
 */
import { UnixSocket } from "../../../sys/unix-socket.js";
import { Connection } from "../../connection.js";
import { featureMask, ProtocolFeature, VirtioFeature } from "../../protocol/constants.js";
import { VhostUserError } from "../../protocol/errors.js";
import type { HandlerTable, SessionState } from "../state.js";
import { applyLog, LOG_ALL } from "./log.js";
import { postcopyAvailable } from "./postcopy.js";
import { enableAllRings, resetRings, setEnabled, stopAllRings } from "./rings.js";

const PROTOCOL_FEATURES = featureMask(VirtioFeature.VHOST_USER_F_PROTOCOL_FEATURES);

/** Protocol features the framework implements for every device. */
export const FRAMEWORK_PROTOCOL_FEATURES = featureMask(
  // "Back-ends should always implement the VHOST_USER_PROTOCOL_F_MQ protocol feature, even
  // for devices with a fixed number of virtqueues".
  ProtocolFeature.MQ,
  ProtocolFeature.LOG_SHMFD,
  ProtocolFeature.REPLY_ACK,
  ProtocolFeature.BACKEND_REQ,
  ProtocolFeature.CONFIGURE_MEM_SLOTS,
  ProtocolFeature.STATUS,
  ProtocolFeature.RESET_DEVICE,
  ProtocolFeature.PAGEFAULT,
  ProtocolFeature.DEVICE_STATE,
);

export function offeredFeatures(s: SessionState): bigint {
  const packed = s.device.info.packedRing ? featureMask(VirtioFeature.VIRTIO_F_RING_PACKED) : 0n;
  return s.device.info.features | packed | PROTOCOL_FEATURES | LOG_ALL;
}

export function offeredProtocolFeatures(s: SessionState): bigint {
  let f = FRAMEWORK_PROTOCOL_FEATURES | s.device.info.protocolFeatures;
  if (s.device.getConfig) f |= featureMask(ProtocolFeature.CONFIG);
  // Offering PAGEFAULT without a userfaultfd would let QEMU start a postcopy we cannot serve.
  if (!postcopyAvailable()) f &= ~featureMask(ProtocolFeature.PAGEFAULT);
  return f & ~(s.device.info.withoutProtocolFeatures ?? 0n);
}

/**
 * RESET_DEVICE: "reset all internal device state to the initial state": rings stopped,
 * disabled and forgotten, status and acked features back to 0 (so the dirty log stops too).
 * Ownership, protocol features, memory table and back-end channel stay.
 */
async function resetDevice(s: SessionState): Promise<void> {
  await resetRings(s);
  s.status = 0;
  s.features = 0n;
  s.device.setFeatures?.(0n);
  await applyLog(s);
  s.device.reset?.();
}

export const controlHandlers: HandlerTable = {
  // The plain answers are not async: no wrapper promise per message (see session.ts #enqueueRequest).
  GET_FEATURES(s, m) {
    return s.conn.reply(m, offeredFeatures(s));
  },

  async SET_FEATURES(s, m) {
    const f = m.payload;
    const extra = f & ~offeredFeatures(s);
    if (extra !== 0n) throw new VhostUserError("BAD_VALUE", "features not offered", { request: m.name, value: extra });
    s.features = f;
    s.device.setFeatures?.(f);
    await applyLog(s);
    // Without VHOST_USER_F_PROTOCOL_FEATURES there is no SET_VRING_ENABLE: every ring is enabled now.
    if ((f & PROTOCOL_FEATURES) === 0n) await enableAllRings(s);
    await s.conn.ack(m);
  },

  GET_PROTOCOL_FEATURES(s, m) {
    return s.conn.reply(m, offeredProtocolFeatures(s));
  },

  async SET_PROTOCOL_FEATURES(s, m) {
    const extra = m.payload & ~offeredProtocolFeatures(s);
    if (extra !== 0n)
      throw new VhostUserError("BAD_VALUE", "protocol features not offered", { request: m.name, value: extra });
    s.protocolFeatures = m.payload;
    s.conn.setProtocolFeatures(m.payload);
    await s.conn.ack(m);
  },

  async SET_OWNER(s, m) {
    await s.conn.ack(m);
  },

  async RESET_OWNER(s, m) {
    // Deprecated; the spec recommends ignoring it or disabling the rings: disable them.
    for (const v of s.vrings) await setEnabled(v, false);
    await s.conn.ack(m);
  },

  GET_QUEUE_NUM(s, m) {
    return s.conn.reply(m, BigInt(s.device.info.numQueues));
  },

  async GET_CONFIG(s, m) {
    const { offset, flags, data } = m.payload;
    let bytes: Uint8Array | null = null;
    try {
      if (s.device.getConfig) bytes = s.device.getConfig(offset, data.length, flags);
      if (bytes && bytes.length !== data.length) bytes = null;
    } catch (e) {
      s.events.log("warn", `GET_CONFIG of ${data.length} bytes at ${offset}: ${(e as Error).message}`);
    }
    // "the back-end ... can use zero length of payload to indicate an error".
    await s.conn.reply(m, bytes === null ? null : { offset, flags, data: bytes });
  },

  async SET_CONFIG(s, m) {
    if (!s.device.setConfig)
      throw new VhostUserError("UNEXPECTED_REQUEST", "config space is read-only", { request: m.name });
    s.device.setConfig(m.payload.offset, m.payload.data, m.payload.flags);
    await s.conn.ack(m);
  },

  async SET_BACKEND_REQ_FD(s, m) {
    const fd = m.fds[0];
    if (!fd) throw new VhostUserError("BAD_FD_COUNT", "no socket fd", { request: m.name });
    s.backendChannel?.close();
    const ch = Connection.backendChannel(new UnixSocket(fd), { label: "back-end channel" });
    ch.setProtocolFeatures(s.protocolFeatures);
    ch.on("protocolError", () => undefined);
    ch.on("close", () => {
      if (s.backendChannel === ch) s.backendChannel = null;
    });
    s.backendChannel = ch;
    await s.conn.ack(m);
  },

  async SET_STATUS(s, m) {
    const status = Number(m.payload & 0xffn);
    s.status = status;
    if (status === 0) {
      // QEMU sends SET_STATUS(0) at every stop, before GET_VRING_BASE: the rings stop and keep
      // their position (GET_VRING_BASE still reports it) and their eventfds (SET_VRING_ERR is
      // sent once per connection).
      await stopAllRings(s);
      s.device.reset?.();
    }
    await s.conn.ack(m);
  },

  GET_STATUS(s, m) {
    return s.conn.reply(m, BigInt(s.status));
  },

  async RESET_DEVICE(s, m) {
    await resetDevice(s);
    await s.conn.ack(m);
  },
};

/** Requests whose feature we never offer: refused (a NACK, or the hang-up for an explicit reply). */
export const UNSUPPORTED = [
  "IOTLB_MSG",
  "SEND_RARP",
  "NET_SET_MTU",
  "CREATE_CRYPTO_SESSION",
  "CLOSE_CRYPTO_SESSION",
  "SET_VRING_ENDIAN",
  "VRING_KICK",
  "GET_SHARED_OBJECT",
  "GET_SHMEM_CONFIG",
  "GPU_SET_SOCKET",
] as const;
