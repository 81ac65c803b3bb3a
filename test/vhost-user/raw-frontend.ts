/**
 * A hand-rolled vhost-user front-end for framework tests: raw requests through Connection, real
 * memfd guest memory, a SplitQueueDriver (or a PackedQueueDriver) for queue 0, real kick/call eventfds.
 */
import assert from "node:assert/strict";
import { GuestMemory } from "../../src/memory/guest-memory.js";
import { GuestMemoryRegion } from "../../src/memory/region.js";
import { EventFd } from "../../src/sys/eventfd.js";
import type { Fd } from "../../src/sys/fd.js";
import { UnixSocket } from "../../src/sys/unix-socket.js";
import { Connection } from "../../src/vhost-user/connection.js";
import { featureMask, ProtocolFeature, VirtioFeature } from "../../src/vhost-user/protocol/constants.js";
import type { FrontendRequests } from "../../src/vhost-user/protocol/frontend-requests.js";
import { SplitQueueDriver } from "../../src/virtio/driver.js";
import {
  features,
  VIRTIO_F_RING_PACKED,
  VIRTIO_F_VERSION_1,
  VIRTIO_RING_F_EVENT_IDX,
} from "../../src/virtio/features.js";
import { PackedQueueDriver } from "../../src/virtio/packed-driver.js";
import { encodePackedVringBase } from "../../src/virtio/packed-ring.js";

const MiB = 1024 * 1024;

export interface RawFrontend<D extends SplitQueueDriver | PackedQueueDriver = SplitQueueDriver> {
  conn: Connection<FrontendRequests>;
  mem: GuestMemory;
  driver: D;
  kick: EventFd;
  call: EventFd;
  uva(gpa: number): bigint;
  close(): void;
}

/** Connects with fresh guest memory, or reuses `reuse`'s memory and driver (a reconnect). */
export function connectRaw(path: string, reuse?: RawFrontend): RawFrontend {
  return connectWith(path, reuse, (mem) =>
    SplitQueueDriver.at(mem, 0x10000, 64, { features: features(VIRTIO_RING_F_EVENT_IDX) }),
  );
}

/** The same with a packed ring (setUpRaw then acks VIRTIO_F_RING_PACKED). */
export function connectRawPacked(path: string, reuse?: RawFrontend<PackedQueueDriver>): RawFrontend<PackedQueueDriver> {
  return connectWith(path, reuse, (mem) =>
    PackedQueueDriver.at(mem, 0x10000, 64, { features: features(VIRTIO_RING_F_EVENT_IDX) }),
  );
}

/** The same with a driver of the caller's (e.g. without EVENT_IDX: then setUpRaw's `eventIdx: false`). */
export function connectWith<D extends SplitQueueDriver | PackedQueueDriver>(
  path: string,
  reuse: RawFrontend<D> | undefined,
  make: (mem: GuestMemory) => D,
): RawFrontend<D> {
  const conn = Connection.frontend(UnixSocket.connect(path), { timeoutMs: 5000 });
  const mem = reuse?.mem ?? new GuestMemory([GuestMemoryRegion.memfd(0, 4 * MiB)]);
  const region = mem.regions[0] as GuestMemoryRegion;
  const driver = reuse?.driver ?? make(mem);
  const kick = reuse?.kick ?? new EventFd();
  const call = reuse?.call ?? new EventFd();
  return {
    conn,
    mem,
    driver,
    kick,
    call,
    uva: (gpa) => region.hostAddress + BigInt(gpa),
    close() {
      conn.close();
      kick.close();
      call.close();
      mem.close();
    },
  };
}

export interface SetUpOptions {
  protocolFeatures?: bigint;
  extraFeatures?: bigint;
  /** Inflight fd to hand over (SET_INFLIGHT_FD) before the ring starts. */
  inflight?: { fd: Fd; size: bigint; numQueues: number; queueSize: number };
  /** SET_VRING_BASE value (a reconnecting front-end sends the used idx). */
  base?: number;
  /** Negotiate VIRTIO_RING_F_EVENT_IDX (default true; the driver must match). */
  eventIdx?: boolean;
}

export async function setUpRaw(
  f: RawFrontend<SplitQueueDriver | PackedQueueDriver>,
  o: SetUpOptions = {},
): Promise<void> {
  const { conn } = f;
  const packed = f.driver instanceof PackedQueueDriver;
  await conn.request("SET_OWNER", undefined as never);
  await conn.request("GET_FEATURES", undefined as never);
  const proto = o.protocolFeatures ?? featureMask(ProtocolFeature.LOG_SHMFD, ProtocolFeature.REPLY_ACK);
  await conn.request("SET_PROTOCOL_FEATURES", proto);
  conn.setProtocolFeatures(proto);
  await conn.request(
    "SET_FEATURES",
    features(VIRTIO_F_VERSION_1) |
      (o.eventIdx === false ? 0n : features(VIRTIO_RING_F_EVENT_IDX)) |
      featureMask(VirtioFeature.VHOST_USER_F_PROTOCOL_FEATURES) |
      (packed ? features(VIRTIO_F_RING_PACKED) : 0n) |
      (o.extraFeatures ?? 0n),
  );
  const r = f.mem.regions[0] as GuestMemoryRegion;
  await conn.request(
    "SET_MEM_TABLE",
    { regions: [{ guestAddress: 0n, size: BigInt(r.size), userAddress: r.hostAddress, mmapOffset: 0n }] },
    { fds: [r.backing.fd!] },
  );
  if (o.inflight) {
    const i = o.inflight;
    await conn.request(
      "SET_INFLIGHT_FD",
      { mmapSize: i.size, mmapOffset: 0n, numQueues: i.numQueues, queueSize: i.queueSize },
      { fds: [i.fd] },
    );
  }
  const d = f.driver;
  const l = d.layout;
  const base = o.base ?? (d instanceof PackedQueueDriver ? encodePackedVringBase(d.position) : 0);
  await conn.request("SET_VRING_NUM", { index: 0, num: d.size });
  await conn.request("SET_VRING_BASE", { index: 0, num: base });
  await conn.request("SET_VRING_ADDR", {
    index: 0,
    flags: 0,
    descriptor: f.uva(l.descTable),
    used: f.uva(l.usedRing),
    available: f.uva(l.availRing),
    log: 0n,
  });
  await conn.request("SET_VRING_CALL", { index: 0, noFd: false }, { fds: [f.call.fd] });
  await conn.request("SET_VRING_KICK", { index: 0, noFd: false }, { fds: [f.kick.fd] });
  await conn.request("SET_VRING_ENABLE", { index: 0, num: 1 });
}

/** Resolves at the next call notification. */
export function nextCall(f: RawFrontend<SplitQueueDriver | PackedQueueDriver>): Promise<void> {
  return new Promise((resolve) => {
    const w = f.call.onSignal(() => {
      w.close();
      resolve();
    });
  });
}

/** One echo request: `data` in a readable buffer at `src`, a writable buffer at `dst`. */
export async function echoRaw(f: RawFrontend, data: Uint8Array, src: number, dst: number): Promise<Uint8Array> {
  f.mem.write(src, data);
  f.mem.fill(dst, data.length, 0);
  f.driver.add([{ addr: src, len: data.length }], [{ addr: dst, len: data.length }]);
  const called = nextCall(f);
  if (f.driver.publish()) f.kick.signal();
  await called;
  // A ring that (re)starts with used entries interrupts once on its own, so the call may come
  // before this request's completion: give the completion a moment.
  let used = f.driver.getUsed();
  for (let i = 0; i < 200 && !used; i++) {
    await new Promise((r) => setTimeout(r, 5));
    used = f.driver.getUsed();
  }
  assert.ok(used, "a used element came back");
  assert.equal(used.len, data.length);
  return f.mem.read(dst, data.length);
}
