/**
 * Dirty logging (SET_LOG_BASE, SET_LOG_FD, VHOST_F_LOG_ALL): the log the front-end sent is in
 * force exactly while VHOST_F_LOG_ALL is negotiated; every switch goes through
 * SharedDirtyLog.replace(), so when we answer SET_LOG_BASE (or ack SET_FEATURES), no queue worker
 * can still mark the old log. Clearing LOG_ALL (migration done or cancelled) stops all marking.
 *
 * SET_LOG_BASE's reply (under LOG_SHMFD) has no payload defined by the spec. We echo the 16-byte
 * log description by default: QEMU reads a reply of any size and checks only its request code,
 * rust-vmm's front-end reads exactly header + 16 bytes. SessionOptions.logBaseReply "u64" sends
 * libvhost-user's 8-byte form instead, for a front-end that reads exactly 8.
 */
import { DirtyLogArea } from "../../../memory/shared-dirty-log.js";
import { featureMask, hasFeature, ProtocolFeature, VirtioFeature } from "../../protocol/constants.js";
import { checkFdCovers } from "../memory-table.js";
import type { HandlerTable, MsgOf, SessionState } from "../state.js";

export const LOG_ALL = featureMask(VirtioFeature.VHOST_F_LOG_ALL);

/** Installs the log exactly while LOG_ALL is negotiated; resolves once no worker marks the old one. */
export async function applyLog(s: SessionState): Promise<void> {
  const want = (s.features & LOG_ALL) !== 0n ? s.logArea : null;
  if (s.log.area === want) return;
  await s.log.replace(want);
}

/** Under LOG_SHMFD the front-end waits for a reply; otherwise only for its REPLY_ACK, if it asked. */
async function answer(
  s: SessionState,
  m: MsgOf<"SET_LOG_BASE">,
  shm: boolean,
  desc: { mmapSize: bigint; mmapOffset: bigint },
): Promise<void> {
  if (!shm) {
    await s.conn.ack(m);
    return;
  }
  await s.conn.reply(
    m,
    s.options.logBaseReply === "u64" ? { kind: "u64", value: desc.mmapSize } : { kind: "log", log: desc },
  );
}

export const logHandlers: HandlerTable = {
  async SET_LOG_BASE(s, m) {
    const fd = m.fds[0];
    const shm = hasFeature(s.protocolFeatures, ProtocolFeature.LOG_SHMFD);
    if (!fd || "address" in m.payload) {
      // No fd: the log lives in the front-end's address space (kernel vhost's form), which we
      // cannot reach. The message is legal; nothing is installed and marking stops.
      for (const f of m.fds) f.close();
      const old = s.logArea;
      s.logArea = null;
      await applyLog(s);
      old?.close();
      s.events.log("warn", "SET_LOG_BASE without a log fd: no dirty log to mark (that needs LOG_SHMFD and its fd)");
      return answer(s, m, shm, { mmapSize: 0n, mmapOffset: 0n });
    }
    const desc = m.payload;
    checkFdCovers(fd, desc.mmapOffset, desc.mmapSize, "dirty log", m.name);
    const area = DirtyLogArea.map(fd, desc.mmapSize, desc.mmapOffset);
    const old = s.logArea;
    s.logArea = area;
    await applyLog(s);
    // Nobody marks the old log any more: it can go, and the front-end may read it now.
    if (old && old !== area) old.close();
    return answer(s, m, shm, desc);
  },

  async SET_LOG_FD(s, m) {
    for (const f of m.fds) f.close();
    await s.conn.ack(m);
  },
};
