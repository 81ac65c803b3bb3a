/** GET_INFLIGHT_FD / SET_INFLIGHT_FD (INFLIGHT_SHMFD): the region a device resubmits from after a restart. */
import { toLength } from "../../../memory/guest-address.js";
import { Mapping } from "../../../sys/mapping.js";
import { createMemfd } from "../../../sys/memfd.js";
import { featureMask, hasFeature, ProtocolFeature } from "../../protocol/constants.js";
import { VhostUserError } from "../../protocol/errors.js";
import { inflightQueueSize, type SharedInflightQueue } from "../inflight.js";
import { checkFdCovers } from "../memory-table.js";
import type { HandlerTable, InflightRegion, SessionState } from "../state.js";

export const INFLIGHT = featureMask(ProtocolFeature.INFLIGHT_SHMFD);

function requireInflight(s: SessionState, request: string): void {
  if (!hasFeature(s.device.info.protocolFeatures, ProtocolFeature.INFLIGHT_SHMFD)) {
    throw new VhostUserError("UNEXPECTED_REQUEST", "this device does not track inflight I/O", { request });
  }
}

function setInflight(s: SessionState, next: InflightRegion): void {
  const old = s.inflight;
  s.inflight = next;
  // Workers pick the region up when a ring starts, which is after SET_INFLIGHT_FD.
  if (old && old.map !== next.map) {
    old.map.close();
    if (old.fd !== next.fd) old.fd.close();
  }
}

export function inflightFor(s: SessionState, queue: number): SharedInflightQueue | null {
  const f = s.inflight;
  if (!f || queue >= f.numQueues) return null;
  return {
    buffer: f.map.windows[0] as SharedArrayBuffer,
    offset: queue * inflightQueueSize(f.queueSize),
    queueSize: f.queueSize,
  };
}

export function closeInflight(s: SessionState): void {
  // The region stays the front-end's (it hands it to the next back-end): we only drop our copy.
  s.inflight?.map.close();
  s.inflight?.fd.close();
  s.inflight = null;
}

export const inflightHandlers: HandlerTable = {
  async GET_INFLIGHT_FD(s, m) {
    requireInflight(s, m.name);
    const { numQueues, queueSize } = m.payload;
    if (numQueues < 1 || numQueues > s.device.info.numQueues || queueSize < 1 || queueSize > 32768) {
      throw new VhostUserError("BAD_VALUE", "inflight queue count or size out of range", {
        request: m.name,
        value: `${numQueues}x${queueSize}`,
      });
    }
    const size = numQueues * inflightQueueSize(queueSize);
    const fd = createMemfd("vmshift-inflight", size, { sealSize: true });
    let map: Mapping;
    try {
      map = Mapping.map(fd, size);
    } catch (e) {
      fd.close();
      throw e;
    }
    setInflight(s, { fd, map, numQueues, queueSize });
    await s.conn.reply(m, { mmapSize: BigInt(size), mmapOffset: 0n, numQueues, queueSize }, [fd]);
  },

  async SET_INFLIGHT_FD(s, m) {
    requireInflight(s, m.name);
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
      setInflight(s, { fd, map, numQueues, queueSize });
    } catch (e) {
      fd.close();
      throw e;
    }
    await s.conn.ack(m);
  },
};
