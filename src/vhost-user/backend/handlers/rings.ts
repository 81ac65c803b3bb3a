/**
 * The ring messages (SET_VRING_*, GET_VRING_BASE) and the ring state machine of the spec's
 * "Ring states": started/stopped and enabled/disabled are independent.
 *
 * - A ring is started by SET_VRING_KICK and stopped by GET_VRING_BASE (or a device reset).
 * - Every ring starts disabled; SET_VRING_ENABLE switches it, and SET_FEATURES without
 *   VHOST_USER_F_PROTOCOL_FEATURES enables all rings. Stopping a ring does not disable it:
 *   after GET_VRING_BASE -> SET_VRING_BASE -> SET_VRING_KICK an enabled ring serves again
 *   without a new SET_VRING_ENABLE (libvhost-user and rust-vmm behave the same).
 * - Only started, enabled rings are processed.
 */

import type { Fd } from "../../../sys/fd.js";
import { availRingSize, descTableSize, isPowerOfTwo, usedRingSize } from "../../../virtio/ring.js";
import { hasFeature, VHOST_VRING_F_LOG, VirtioFeature } from "../../protocol/constants.js";
import { VhostUserError } from "../../protocol/errors.js";
import { type QueueThread, QueueWorkers } from "../queue-thread.js";
import type { HandlerTable, SessionState, Vring } from "../state.js";
import { inflightFor } from "./inflight.js";

function thread(s: SessionState, index: number, v: Vring): QueueThread {
  s.workers ??= new QueueWorkers(s.device, s.log, {
    onEvent: (_q, level, message) => s.events.log(level, message),
  });
  v.thread ??= s.workers.thread(index);
  return v.thread;
}

/** (Re)starts ring `index` in its worker with the current addresses, fds and memory. */
export async function startRing(s: SessionState, index: number, v: Vring, request: string): Promise<void> {
  if (!v.addr || v.size === 0)
    throw new VhostUserError("UNEXPECTED_REQUEST", "ring started before SET_VRING_NUM/ADDR", {
      request,
      value: index,
    });
  const a = v.addr;
  // Packed rings: "available" and "used" are the driver and device event suppression areas.
  const packed = hasFeature(s.features, VirtioFeature.VIRTIO_F_RING_PACKED);
  const ring = {
    packed,
    size: v.size,
    descTable: s.memory.uvaToGpa(a.descriptor, descTableSize(v.size), "descriptor table", request),
    availRing: s.memory.uvaToGpa(a.available, packed ? 4 : availRingSize(v.size), "avail ring", request),
    usedRing: s.memory.uvaToGpa(a.used, packed ? 4 : usedRingSize(v.size), "used ring", request),
    logAddress: (a.flags & VHOST_VRING_F_LOG) !== 0 ? Number(a.log) : null,
    features: s.features,
    nextAvail: v.base,
    inflight: inflightFor(s, index),
  };
  if (ring.logAddress !== null && !Number.isSafeInteger(ring.logAddress)) {
    throw new VhostUserError("BAD_VALUE", "used-ring log address not representable", { request, value: a.log });
  }
  const t = thread(s, index, v);
  if (v.started) {
    const r = await t.request({ type: "stop" });
    ring.nextAvail = r.nextAvail ?? ring.nextAvail;
  }
  await t.request({ type: "memory", memory: s.memory.memory.toShared() });
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

export async function setEnabled(v: Vring, enabled: boolean): Promise<void> {
  v.enabled = enabled;
  if (v.started && v.thread) await v.thread.request({ type: "enable", enabled });
}

/** Stops ring `v` and keeps its next avail index as the base (what GET_VRING_BASE reports). */
async function stopRing(v: Vring, timeoutMs = 0): Promise<void> {
  if (v.started && v.thread) {
    const r = await v.thread.request({ type: "stop" }, timeoutMs).catch(() => null);
    if (r?.nextAvail !== undefined) v.base = r.nextAvail;
  }
  v.started = false;
}

/**
 * Stops every ring. A worker stuck in a request (a device that hangs, a postcopy fault the
 * front-end will never resolve) gets `timeoutMs` and is then terminated by teardown.
 */
export async function stopAllRings(s: SessionState, timeoutMs = 0): Promise<void> {
  for (const v of s.vrings) await stopRing(v, timeoutMs);
}

/**
 * RESET_DEVICE: every ring stopped, disabled and forgotten (size, addresses, position). The
 * call and error eventfds stay: QEMU sends SET_VRING_ERR once per connection, and a front-end
 * that wants others sends new ones.
 */
export async function resetRings(s: SessionState): Promise<void> {
  await stopAllRings(s);
  for (const v of s.vrings) {
    v.kick?.close();
    Object.assign(v, { size: 0, addr: null, base: 0, kick: null, enabled: false });
  }
}

/** SET_FEATURES without VHOST_USER_F_PROTOCOL_FEATURES: "the ring starts directly in the enabled state". */
export async function enableAllRings(s: SessionState): Promise<void> {
  for (const v of s.vrings) if (!v.enabled) await setEnabled(v, true);
}

export const ringHandlers: HandlerTable = {
  async SET_VRING_NUM(s, m) {
    const v = s.ring(m.payload.index, m.name);
    const n = m.payload.num;
    if (n === 0 || !isPowerOfTwo(n) || n > s.device.info.maxQueueSize) {
      throw new VhostUserError("BAD_VALUE", "queue size must be a power of two within the device maximum", {
        request: m.name,
        value: n,
        expected: `≤ ${s.device.info.maxQueueSize}`,
      });
    }
    v.size = n;
    await s.conn.ack(m);
  },

  async SET_VRING_ADDR(s, m) {
    const v = s.ring(m.payload.index, m.name);
    const oldAddr = v.addr;
    v.addr = m.payload;
    // A started ring picks up the new addresses (e.g. the log flag switched during migration).
    // Refused addresses must not stay behind for the next SET_VRING_KICK.
    if (v.started) {
      try {
        await startRing(s, m.payload.index, v, m.name);
      } catch (e) {
        v.addr = oldAddr;
        throw e;
      }
    }
    await s.conn.ack(m);
  },

  async SET_VRING_BASE(s, m) {
    const v = s.ring(m.payload.index, m.name);
    // Packed rings: the whole u32 (avail index and wrap counter low, used ones high).
    v.base = hasFeature(s.features, VirtioFeature.VIRTIO_F_RING_PACKED) ? m.payload.num >>> 0 : m.payload.num & 0xffff;
    await s.conn.ack(m);
  },

  async GET_VRING_BASE(s, m) {
    const v = s.ring(m.payload.index, m.name);
    await stopRing(v);
    // "stops the ring": the kick fd is no longer used. Enabled or not stays as it was.
    v.kick?.close();
    v.kick = null;
    await s.conn.reply(m, { index: m.payload.index, num: v.base });
  },

  async SET_VRING_KICK(s, m) {
    const v = s.ring(m.payload.index, m.name);
    const fd = m.payload.noFd ? null : (m.fds[0] ?? null);
    if (!fd) throw new VhostUserError("BAD_VALUE", "polling rings (no kick fd) are not supported", { request: m.name });
    const old = v.kick;
    const wasSuspended = s.suspended;
    v.kick = fd;
    try {
      await startRing(s, m.payload.index, v, m.name);
    } catch (e) {
      // The ring (if it runs) still polls the old fd: keep it; the new one is closed by the session.
      v.kick = old;
      throw e;
    }
    old?.close();
    await s.conn.ack(m);
    if (wasSuspended && s.configChangePending) {
      s.configChangePending = false;
      sendConfigChange(s).catch((e: Error) => s.events.log("warn", `CONFIG_CHANGE_MSG: ${e.message}`));
    }
  },

  SET_VRING_CALL: (s, m) => setNotifier(s, m.payload.index, m.payload.noFd ? null : (m.fds[0] ?? null), "call", m),
  SET_VRING_ERR: (s, m) => setNotifier(s, m.payload.index, m.payload.noFd ? null : (m.fds[0] ?? null), "err", m),

  async SET_VRING_ENABLE(s, m) {
    if (!s.protocolFeaturesAcked) {
      throw new VhostUserError("UNEXPECTED_REQUEST", "SET_VRING_ENABLE needs VHOST_USER_F_PROTOCOL_FEATURES", {
        request: m.name,
      });
    }
    const v = s.ring(m.payload.index, m.name);
    if (m.payload.num > 1)
      throw new VhostUserError("BAD_VALUE", "SET_VRING_ENABLE num must be 0 or 1", {
        request: m.name,
        value: m.payload.num,
      });
    await setEnabled(v, m.payload.num === 1);
    await s.conn.ack(m);
  },
};

async function setNotifier(
  s: SessionState,
  index: number,
  fd: Fd | null,
  which: "call" | "err",
  m: { readonly code: number; readonly needReply: boolean; readonly name: string },
): Promise<void> {
  const v = s.ring(index, m.name);
  const old = v[which];
  v[which] = fd;
  if (v.started && v.thread) await v.thread.request({ type: "fds", callFd: v.call?.fd ?? -1, errFd: v.err?.fd ?? -1 });
  old?.close();
  await s.conn.ack(m);
}

/** CONFIG_CHANGE_MSG on the back-end channel (acked when REPLY_ACK is negotiated). */
export async function sendConfigChange(s: SessionState): Promise<void> {
  const ch = s.backendChannel;
  if (!ch) throw new VhostUserError("CLOSED", "no back-end request channel (SET_BACKEND_REQ_FD not received)");
  await ch.request("CONFIG_CHANGE_MSG", undefined);
}
