/**
 * The memory table: SET_MEM_TABLE, ADD_MEM_REG / REM_MEM_REG (CONFIGURE_MEM_SLOTS) and
 * GET_MAX_MEM_SLOTS. A new table is handed to every queue worker before the old mappings are
 * closed, so no worker touches a mapping after it is gone.
 */
import type { Fd } from "../../../sys/fd.js";
import { VhostUserError } from "../../protocol/errors.js";
import { type MappedRegion, mapRegion } from "../memory-table.js";
import type { HandlerTable, SessionState } from "../state.js";
import { ourMapping, postcopyAck, uffdRange } from "./postcopy.js";

/** Memory slots offered with CONFIGURE_MEM_SLOTS (QEMU's x86 maximum). */
export const MAX_MEM_SLOTS = 509;

/** Hands the current memory table to every queue worker and waits until all use it. */
export async function pushMemory(s: SessionState): Promise<void> {
  const shared = s.memory.memory.toShared();
  await Promise.all(s.vrings.map((v) => v.thread?.request({ type: "memory", memory: shared })));
}

export const memoryHandlers: HandlerTable = {
  async GET_MAX_MEM_SLOTS(s, m) {
    await s.conn.reply(m, BigInt(MAX_MEM_SLOTS));
  },

  async SET_MEM_TABLE(s, m) {
    const regions = m.payload.regions;
    // QEMU acknowledges our postcopy reply with an empty SET_MEM_TABLE (spec: "an empty
    // VHOST_USER_SET_MEM_TABLE as an acknowledgement"), byte-identical to a u64 0.
    if (s.awaitingPostcopyAck && regions.length === 0) return postcopyAck(s, m.name, 0n);
    if (m.fds.length !== regions.length) {
      throw new VhostUserError("BAD_FD_COUNT", "one fd per region", {
        request: m.name,
        value: m.fds.length,
        expected: regions.length,
      });
    }
    const mapped: MappedRegion[] = [];
    try {
      for (const [i, r] of regions.entries()) mapped.push(mapRegion(r, m.fds[i] as Fd, m.name));
    } catch (e) {
      for (const r of mapped) r.region.close();
      for (const f of m.fds) if (!f.closed) f.close();
      throw e;
    }
    let old: MappedRegion[];
    try {
      old = s.memory.replace(mapped, m.name);
    } catch (e) {
      for (const r of mapped) r.region.close();
      throw e;
    }
    await pushMemory(s);
    for (const r of old) r.region.close();
    if (s.postcopyListening) {
      // Postcopy: answer with where we mapped each region; register only after the ack.
      s.awaitingPostcopyAck = mapped;
      await s.conn.reply(m, { kind: "table", table: { regions: mapped.map(ourMapping) } });
      return;
    }
    await s.conn.ack(m);
  },

  async ADD_MEM_REG(s, m) {
    const p = m.payload;
    if (p.kind === "ack") return postcopyAck(s, m.name, p.value);
    const fd = m.fds[0];
    if (!fd) throw new VhostUserError("BAD_FD_COUNT", "ADD_MEM_REG without an fd", { request: m.name });
    if (s.memory.regions.length >= MAX_MEM_SLOTS) {
      fd.close();
      throw new VhostUserError("BAD_VALUE", "all memory slots in use", { request: m.name, value: MAX_MEM_SLOTS });
    }
    const r = mapRegion(p.region, fd, m.name);
    try {
      s.memory.add(r, m.name);
    } catch (e) {
      r.region.close();
      throw e;
    }
    await pushMemory(s);
    if (s.postcopyListening) {
      s.awaitingPostcopyAck ??= [];
      s.awaitingPostcopyAck.push(r);
      await s.conn.reply(m, { kind: "region", region: ourMapping(r) });
      return;
    }
    await s.conn.ack(m);
  },

  async REM_MEM_REG(s, m) {
    for (const f of m.fds) f.close();
    const removed = s.memory.remove(m.payload, m.name);
    await pushMemory(s);
    if (removed.registered) s.uffd?.unregister(...uffdRange(removed));
    removed.region.close();
    await s.conn.ack(m);
  },
};
