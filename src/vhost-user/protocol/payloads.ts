/**
 * Payload layouts of vhost-user (QEMU docs/interop/vhost-user.rst, "Payload"), one codec each.
 * A codec checks the size exactly and every field the spec constrains; 64-bit quantities
 * (addresses, sizes, offsets, feature masks) stay bigint so nothing above 2^53 is rounded.
 */
import { endianness } from "node:os";
import {
  VHOST_MEMORY_BASELINE_NREGIONS,
  VHOST_USER_MAX_CONFIG_SIZE,
  VHOST_USER_VRING_IDX_MASK,
  VHOST_USER_VRING_NOFD_MASK,
  VIRTIO_MAX_SHMEM_REGIONS,
} from "./constants.js";
import { VhostUserError } from "./errors.js";

/** "All numbers are in the machine native byte order." */
const LE = endianness() === "LE";
const U64_MAX = (1n << 64n) - 1n;

export interface PayloadCodec<T> {
  /** The spec's name of the layout, used in tables and errors. */
  readonly name: string;
  /** Bytes → typed value; throws VhostUserError. `request` names the message for errors. */
  decode(bytes: Uint8Array, request: string): T;
  /** Typed value → bytes; throws VhostUserError("OUT_OF_RANGE") for values that do not fit. */
  encode(value: T, request?: string): Uint8Array;
}

export type PayloadOf<C> = C extends PayloadCodec<infer T> ? T : never;

// ---- typed payloads ----------------------------------------------------------------------

/** "A vring state description": also the split/packed vring descriptor index(es) of SET/GET_VRING_BASE. */
export interface VringState {
  index: number;
  num: number;
}

/** "A vring address description" (struct vhost_vring_addr). Addresses are user addresses, or IOVAs with ACCESS_PLATFORM. */
export interface VringAddr {
  index: number;
  /** VHOST_VRING_F_LOG (bit 0): log writes to the used ring at `log`. */
  flags: number;
  descriptor: bigint;
  used: bigint;
  available: bigint;
  /** Guest physical address used to log used-ring writes. */
  log: bigint;
}

/** "Memory region description". */
export interface MemoryRegion {
  guestAddress: bigint;
  size: bigint;
  userAddress: bigint;
  /** Where the region starts in the fd that comes with it. */
  mmapOffset: bigint;
}

/** "Multiple memory regions description" of SET_MEM_TABLE; the i-th fd belongs to the i-th region. */
export interface MemoryTable {
  regions: MemoryRegion[];
}

/** "Log description" of SET_LOG_BASE. */
export interface LogDescription {
  mmapSize: bigint;
  mmapOffset: bigint;
}

/**
 * SET_LOG_BASE payload: the log description (with the log fd under LOG_SHMFD), or the bare u64
 * log address a front-end without LOG_SHMFD may send (kernel vhost's form; no fd).
 */
export type LogBase = LogDescription | { address: bigint };

/**
 * SET_LOG_BASE reply (LOG_SHMFD), whose payload the spec leaves undefined: a u64
 * (libvhost-user) or the log description echoed back (rust-vmm's back-ends; rust-vmm's
 * front-end reads exactly that).
 */
export type LogBaseReply = { kind: "u64"; value: bigint } | { kind: "log"; log: LogDescription };

/** "An IOTLB message" (struct vhost_iotlb_msg). */
export interface IotlbMessage {
  iova: bigint;
  size: bigint;
  userAddress: bigint;
  /** IotlbPermission: 0 none, 1 read, 2 write, 3 read/write. */
  permissions: number;
  /** IotlbType: 1 miss, 2 update, 3 invalidate, 4 access fail. */
  type: number;
}

/** "Virtio device config space". `data.length` is the size field. */
export interface ConfigSpace {
  offset: number;
  /** ConfigFlags: 0 front-end write of writable fields, 1 live migration. */
  flags: number;
  data: Uint8Array;
}

/** "Vring area description" of VRING_HOST_NOTIFIER_MSG; the u64 holds the index and the no-fd flag. */
export interface VringArea {
  index: number;
  /** Bit 8: no fd comes with the message (de-register the notifier). */
  noFd: boolean;
  size: bigint;
  offset: bigint;
}

/** "Inflight description". */
export interface InflightDescription {
  mmapSize: bigint;
  mmapOffset: bigint;
  numQueues: number;
  queueSize: number;
}

/** "VhostUserShared": a 16-byte UUID, bytes in RFC 4122 (string) order. */
export interface SharedObject {
  uuid: Uint8Array;
}

/** "Device state transfer parameters" of SET_DEVICE_STATE_FD. */
export interface DeviceStateTransfer {
  /** DeviceStateDirection: 0 save (back-end → front-end), 1 load. */
  direction: number;
  /** DeviceStatePhase: 0 stopped (the only phase defined). */
  phase: number;
}

/** "MMAP request" (VhostUserMMap) of SHMEM_MAP / SHMEM_UNMAP. */
export interface ShmemMap {
  shmid: number;
  fdOffset: bigint;
  shmOffset: bigint;
  len: bigint;
  /** Bit 0 (VHOST_USER_FLAG_MAP_RW): read-write, else read-only. */
  flags: bigint;
}

/** "VIRTIO Shared Memory Region configuration" reply of GET_SHMEM_CONFIG. */
export interface ShmemConfig {
  nregions: number;
  /** Always VIRTIO_MAX_SHMEM_REGIONS entries; entry i is the size of shmid i (0 = none). */
  memorySizes: bigint[];
}

/** The u64 of SET_VRING_KICK / SET_VRING_CALL / SET_VRING_ERR. */
export interface VringFd {
  index: number;
  /** Bit 8, "invalid FD flag": no fd in the ancillary data; poll instead. */
  noFd: boolean;
}

/** ADD_MEM_REG / REM_MEM_REG payload: a region, or (postcopy, fd-less) a bare u64 acknowledgement. */
export type MemRegionOrAck = { kind: "region"; region: MemoryRegion } | { kind: "ack"; value: bigint };

/** SET_MEM_TABLE reply: the back-end's mapped bases (postcopy), or a REPLY_ACK u64. */
export type MemoryTableOrAck = { kind: "table"; table: MemoryTable } | { kind: "ack"; value: bigint };

// ---- helpers -------------------------------------------------------------------------------

function view(bytes: Uint8Array): DataView {
  return new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
}

function expectSize(bytes: Uint8Array, size: number, request: string, layout: string): DataView {
  if (bytes.byteLength !== size)
    throw new VhostUserError("BAD_SIZE", `${layout} payload`, { request, value: bytes.byteLength, expected: size });
  return view(bytes);
}

function u64(dv: DataView, off: number): bigint {
  return dv.getBigUint64(off, LE);
}

function putU64(dv: DataView, off: number, v: bigint, request: string | undefined, field: string): void {
  if (typeof v !== "bigint" || v < 0n || v > U64_MAX)
    throw new VhostUserError("OUT_OF_RANGE", `${field} is not a u64`, { request, value: String(v) });
  dv.setBigUint64(off, v, LE);
}

function putUint(dv: DataView, off: number, bits: 8 | 16 | 32, v: number, request: string | undefined, field: string) {
  if (!Number.isInteger(v) || v < 0 || v >= 2 ** bits)
    throw new VhostUserError("OUT_OF_RANGE", `${field} is not a u${bits}`, { request, value: String(v) });
  if (bits === 8) dv.setUint8(off, v);
  else if (bits === 16) dv.setUint16(off, v, LE);
  else dv.setUint32(off, v, LE);
}

function alloc(size: number): [Uint8Array, DataView] {
  const b = new Uint8Array(size);
  return [b, view(b)];
}

// ---- codecs --------------------------------------------------------------------------------

/** No payload (size 0). */
export const Empty: PayloadCodec<undefined> = {
  name: "empty",
  decode(bytes, request) {
    expectSize(bytes, 0, request, "empty");
    return undefined;
  },
  encode() {
    return new Uint8Array(0);
  },
};

/** "A single 64-bit integer". */
export const U64: PayloadCodec<bigint> = {
  name: "u64",
  decode(bytes, request) {
    return u64(expectSize(bytes, 8, request, "u64"), 0);
  },
  encode(value, request) {
    const [b, dv] = alloc(8);
    putU64(dv, 0, value, request, "u64");
    return b;
  },
};

export const VRING_STATE_SIZE = 8;
export const VringStateCodec: PayloadCodec<VringState> = {
  name: "vring state",
  decode(bytes, request) {
    const dv = expectSize(bytes, VRING_STATE_SIZE, request, "vring state");
    return { index: dv.getUint32(0, LE), num: dv.getUint32(4, LE) };
  },
  encode(v, request) {
    const [b, dv] = alloc(VRING_STATE_SIZE);
    putUint(dv, 0, 32, v.index, request, "index");
    putUint(dv, 4, 32, v.num, request, "num");
    return b;
  },
};

/** index u32, flags u32, then descriptor, used, available, log as u64 (the spec's table also lists a
 * "size" column that has no field in struct vhost_vring_addr nor on the wire). */
export const VRING_ADDR_SIZE = 40;
export const VringAddrCodec: PayloadCodec<VringAddr> = {
  name: "vring address",
  decode(bytes, request) {
    const dv = expectSize(bytes, VRING_ADDR_SIZE, request, "vring address");
    return {
      index: dv.getUint32(0, LE),
      flags: dv.getUint32(4, LE),
      descriptor: u64(dv, 8),
      used: u64(dv, 16),
      available: u64(dv, 24),
      log: u64(dv, 32),
    };
  },
  encode(v, request) {
    const [b, dv] = alloc(VRING_ADDR_SIZE);
    putUint(dv, 0, 32, v.index, request, "index");
    putUint(dv, 4, 32, v.flags, request, "flags");
    putU64(dv, 8, v.descriptor, request, "descriptor");
    putU64(dv, 16, v.used, request, "used");
    putU64(dv, 24, v.available, request, "available");
    putU64(dv, 32, v.log, request, "log");
    return b;
  },
};

export const MEMORY_REGION_SIZE = 32;
function readRegion(dv: DataView, off: number): MemoryRegion {
  return {
    guestAddress: u64(dv, off),
    size: u64(dv, off + 8),
    userAddress: u64(dv, off + 16),
    mmapOffset: u64(dv, off + 24),
  };
}
function writeRegion(dv: DataView, off: number, r: MemoryRegion, request: string | undefined): void {
  putU64(dv, off, r.guestAddress, request, "guest address");
  putU64(dv, off + 8, r.size, request, "size");
  putU64(dv, off + 16, r.userAddress, request, "user address");
  putU64(dv, off + 24, r.mmapOffset, request, "mmap offset");
}

/** num regions u32, padding u32, then num × 32-byte regions. QEMU sends only the regions in use
 * (size 8 + 32 × n), so that is the one size accepted. */
export const MEMORY_TABLE_HEADER_SIZE = 8;
export const MemoryTableCodec: PayloadCodec<MemoryTable> = {
  name: "multiple memory regions description",
  decode(bytes, request) {
    if (bytes.byteLength < MEMORY_TABLE_HEADER_SIZE)
      throw new VhostUserError("BAD_SIZE", "memory table shorter than its header", {
        request,
        value: bytes.byteLength,
        expected: `>= ${MEMORY_TABLE_HEADER_SIZE}`,
      });
    const dv = view(bytes);
    const n = dv.getUint32(0, LE);
    if (n > VHOST_MEMORY_BASELINE_NREGIONS)
      throw new VhostUserError("TOO_MANY_REGIONS", "num regions", {
        request,
        value: n,
        expected: `<= ${VHOST_MEMORY_BASELINE_NREGIONS}`,
      });
    expectSize(bytes, MEMORY_TABLE_HEADER_SIZE + n * MEMORY_REGION_SIZE, request, `memory table of ${n} regions`);
    const regions: MemoryRegion[] = [];
    for (let i = 0; i < n; i++) regions.push(readRegion(dv, MEMORY_TABLE_HEADER_SIZE + i * MEMORY_REGION_SIZE));
    return { regions };
  },
  encode(v, request) {
    const n = v.regions.length;
    if (n > VHOST_MEMORY_BASELINE_NREGIONS)
      throw new VhostUserError("TOO_MANY_REGIONS", "num regions", {
        request,
        value: n,
        expected: `<= ${VHOST_MEMORY_BASELINE_NREGIONS}`,
      });
    const [b, dv] = alloc(MEMORY_TABLE_HEADER_SIZE + n * MEMORY_REGION_SIZE);
    dv.setUint32(0, n, LE);
    for (const [i, r] of v.regions.entries())
      writeRegion(dv, MEMORY_TABLE_HEADER_SIZE + i * MEMORY_REGION_SIZE, r, request);
    return b;
  },
};

/** "Single memory region description": u64 padding, then one region (ADD_MEM_REG, REM_MEM_REG). */
export const SINGLE_MEMORY_REGION_SIZE = 40;
export const SingleMemoryRegionCodec: PayloadCodec<MemoryRegion> = {
  name: "single memory region description",
  decode(bytes, request) {
    return readRegion(expectSize(bytes, SINGLE_MEMORY_REGION_SIZE, request, "single memory region"), 8);
  },
  encode(r, request) {
    const [b, dv] = alloc(SINGLE_MEMORY_REGION_SIZE);
    writeRegion(dv, 8, r, request);
    return b;
  },
};

export const LOG_SIZE = 16;
export const LogCodec: PayloadCodec<LogDescription> = {
  name: "log description",
  decode(bytes, request) {
    const dv = expectSize(bytes, LOG_SIZE, request, "log description");
    return { mmapSize: u64(dv, 0), mmapOffset: u64(dv, 8) };
  },
  encode(v, request) {
    const [b, dv] = alloc(LOG_SIZE);
    putU64(dv, 0, v.mmapSize, request, "log size");
    putU64(dv, 8, v.mmapOffset, request, "log offset");
    return b;
  },
};

export const LogBaseCodec: PayloadCodec<LogBase> = {
  name: "log description (or u64 log address)",
  decode(bytes, request) {
    if (bytes.byteLength === 8) return { address: U64.decode(bytes, request) };
    return LogCodec.decode(bytes, request);
  },
  encode(v, request) {
    return "address" in v ? U64.encode(v.address, request) : LogCodec.encode(v, request);
  },
};

export const LogBaseReplyCodec: PayloadCodec<LogBaseReply> = {
  name: "u64 (or the log description echoed)",
  decode(bytes, request) {
    if (bytes.byteLength === 8) return { kind: "u64", value: U64.decode(bytes, request) };
    if (bytes.byteLength === LOG_SIZE) return { kind: "log", log: LogCodec.decode(bytes, request) };
    throw new VhostUserError("BAD_SIZE", "SET_LOG_BASE reply", {
      request,
      value: bytes.byteLength,
      expected: `8 or ${LOG_SIZE}`,
    });
  },
  encode(v, request) {
    return v.kind === "u64" ? U64.encode(v.value, request) : LogCodec.encode(v.log, request);
  },
};

/** struct vhost_iotlb_msg: 3 × u64, perm u8, type u8, and 6 bytes of C tail padding (sizeof = 32). */
export const IOTLB_SIZE = 32;
export const IotlbCodec: PayloadCodec<IotlbMessage> = {
  name: "IOTLB message",
  decode(bytes, request) {
    const dv = expectSize(bytes, IOTLB_SIZE, request, "IOTLB message");
    const permissions = dv.getUint8(24);
    const type = dv.getUint8(25);
    if (permissions > 3) throw new VhostUserError("BAD_VALUE", "IOTLB permissions", { request, value: permissions });
    if (type < 1 || type > 4) throw new VhostUserError("BAD_VALUE", "IOTLB type", { request, value: type });
    return { iova: u64(dv, 0), size: u64(dv, 8), userAddress: u64(dv, 16), permissions, type };
  },
  encode(v, request) {
    const [b, dv] = alloc(IOTLB_SIZE);
    putU64(dv, 0, v.iova, request, "iova");
    putU64(dv, 8, v.size, request, "size");
    putU64(dv, 16, v.userAddress, request, "user address");
    putUint(dv, 24, 8, v.permissions, request, "permissions");
    putUint(dv, 25, 8, v.type, request, "type");
    return b;
  },
};

/** offset u32, size u32, flags u32, then `size` bytes (at most 256). */
export const CONFIG_HEADER_SIZE = 12;
export const ConfigCodec: PayloadCodec<ConfigSpace> = {
  name: "virtio device config space",
  decode(bytes, request) {
    if (bytes.byteLength < CONFIG_HEADER_SIZE)
      throw new VhostUserError("BAD_SIZE", "config space shorter than its header", {
        request,
        value: bytes.byteLength,
        expected: `>= ${CONFIG_HEADER_SIZE}`,
      });
    const dv = view(bytes);
    const size = dv.getUint32(4, LE);
    if (size > VHOST_USER_MAX_CONFIG_SIZE)
      throw new VhostUserError("BAD_SIZE", "config size field", {
        request,
        value: size,
        expected: `<= ${VHOST_USER_MAX_CONFIG_SIZE}`,
      });
    expectSize(bytes, CONFIG_HEADER_SIZE + size, request, `config space of ${size} bytes`);
    return { offset: dv.getUint32(0, LE), flags: dv.getUint32(8, LE), data: bytes.slice(CONFIG_HEADER_SIZE) };
  },
  encode(v, request) {
    if (v.data.byteLength > VHOST_USER_MAX_CONFIG_SIZE)
      throw new VhostUserError("OUT_OF_RANGE", "config data", {
        request,
        value: v.data.byteLength,
        expected: `<= ${VHOST_USER_MAX_CONFIG_SIZE}`,
      });
    const [b, dv] = alloc(CONFIG_HEADER_SIZE + v.data.byteLength);
    putUint(dv, 0, 32, v.offset, request, "offset");
    dv.setUint32(4, v.data.byteLength, LE);
    putUint(dv, 8, 32, v.flags, request, "flags");
    b.set(v.data, CONFIG_HEADER_SIZE);
    return b;
  },
};

/** GET_CONFIG reply: "zero length of payload to indicate an error" → null. */
export const ConfigReplyCodec: PayloadCodec<ConfigSpace | null> = {
  name: "virtio device config space (or empty on error)",
  decode(bytes, request) {
    return bytes.byteLength === 0 ? null : ConfigCodec.decode(bytes, request);
  },
  encode(v, request) {
    return v === null ? new Uint8Array(0) : ConfigCodec.encode(v, request);
  },
};

function decodeIndexU64(raw: bigint, request: string, field: string): { index: number; noFd: boolean } {
  if ((raw & ~(VHOST_USER_VRING_IDX_MASK | VHOST_USER_VRING_NOFD_MASK)) !== 0n)
    throw new VhostUserError("BAD_VALUE", `${field}: reserved bits set`, { request, value: raw });
  return { index: Number(raw & VHOST_USER_VRING_IDX_MASK), noFd: (raw & VHOST_USER_VRING_NOFD_MASK) !== 0n };
}
function encodeIndexU64(v: { index: number; noFd: boolean }, request: string | undefined): bigint {
  if (!Number.isInteger(v.index) || v.index < 0 || v.index > 0xff)
    throw new VhostUserError("OUT_OF_RANGE", "vring index is 8 bits here", { request, value: String(v.index) });
  return BigInt(v.index) | (v.noFd ? VHOST_USER_VRING_NOFD_MASK : 0n);
}

/** u64 of SET_VRING_KICK/CALL/ERR: bits 0-7 index, bit 8 no-fd; other bits must be 0. */
export const VringFdCodec: PayloadCodec<VringFd> = {
  name: "u64 (vring index + invalid FD flag)",
  decode(bytes, request) {
    return decodeIndexU64(U64.decode(bytes, request), request, "vring u64");
  },
  encode(v, request) {
    return U64.encode(encodeIndexU64(v, request), request);
  },
};

export const VRING_AREA_SIZE = 24;
export const VringAreaCodec: PayloadCodec<VringArea> = {
  name: "vring area description",
  decode(bytes, request) {
    const dv = expectSize(bytes, VRING_AREA_SIZE, request, "vring area");
    return { ...decodeIndexU64(u64(dv, 0), request, "vring area u64"), size: u64(dv, 8), offset: u64(dv, 16) };
  },
  encode(v, request) {
    const [b, dv] = alloc(VRING_AREA_SIZE);
    dv.setBigUint64(0, encodeIndexU64(v, request), LE);
    putU64(dv, 8, v.size, request, "size");
    putU64(dv, 16, v.offset, request, "offset");
    return b;
  },
};

/** 2 × u64, 2 × u16, and 4 bytes of C tail padding: QEMU and libvhost-user use sizeof = 24. */
export const INFLIGHT_SIZE = 24;
export const InflightCodec: PayloadCodec<InflightDescription> = {
  name: "inflight description",
  decode(bytes, request) {
    const dv = expectSize(bytes, INFLIGHT_SIZE, request, "inflight description");
    return {
      mmapSize: u64(dv, 0),
      mmapOffset: u64(dv, 8),
      numQueues: dv.getUint16(16, LE),
      queueSize: dv.getUint16(18, LE),
    };
  },
  encode(v, request) {
    const [b, dv] = alloc(INFLIGHT_SIZE);
    putU64(dv, 0, v.mmapSize, request, "mmap size");
    putU64(dv, 8, v.mmapOffset, request, "mmap offset");
    putUint(dv, 16, 16, v.numQueues, request, "num queues");
    putUint(dv, 18, 16, v.queueSize, request, "queue size");
    return b;
  },
};

export const SHARED_OBJECT_SIZE = 16;
export const SharedObjectCodec: PayloadCodec<SharedObject> = {
  name: "VhostUserShared",
  decode(bytes, request) {
    expectSize(bytes, SHARED_OBJECT_SIZE, request, "VhostUserShared");
    return { uuid: bytes.slice() };
  },
  encode(v, request) {
    if (v.uuid.byteLength !== SHARED_OBJECT_SIZE)
      throw new VhostUserError("OUT_OF_RANGE", "UUID must be 16 bytes", { request, value: v.uuid.byteLength });
    return v.uuid.slice();
  },
};

/** "8-4-4-4-12" text form; the wire holds the bytes in this order (first fields big endian). */
export function uuidToString(uuid: Uint8Array): string {
  const h = Array.from(uuid, (x) => x.toString(16).padStart(2, "0")).join("");
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
}

export function uuidFromString(s: string): Uint8Array {
  const h = s.replace(/-/g, "");
  if (!/^[0-9a-fA-F]{32}$/.test(h)) throw new VhostUserError("OUT_OF_RANGE", "not a UUID", { value: s });
  return Uint8Array.from({ length: 16 }, (_, i) => Number.parseInt(h.slice(i * 2, i * 2 + 2), 16));
}

export const DEVICE_STATE_TRANSFER_SIZE = 8;
export const DeviceStateTransferCodec: PayloadCodec<DeviceStateTransfer> = {
  name: "device state transfer parameters",
  decode(bytes, request) {
    const dv = expectSize(bytes, DEVICE_STATE_TRANSFER_SIZE, request, "device state transfer parameters");
    const direction = dv.getUint32(0, LE);
    const phase = dv.getUint32(4, LE);
    if (direction > 1) throw new VhostUserError("BAD_VALUE", "transfer direction", { request, value: direction });
    if (phase !== 0) throw new VhostUserError("BAD_VALUE", "migration phase", { request, value: phase, expected: 0 });
    return { direction, phase };
  },
  encode(v, request) {
    const [b, dv] = alloc(DEVICE_STATE_TRANSFER_SIZE);
    putUint(dv, 0, 32, v.direction, request, "direction");
    putUint(dv, 4, 32, v.phase, request, "phase");
    return b;
  },
};

/** shmid u8, 7 bytes padding, fd_offset, shm_offset, len, flags (u64 each). */
export const SHMEM_MAP_SIZE = 40;
export const ShmemMapCodec: PayloadCodec<ShmemMap> = {
  name: "MMAP request",
  decode(bytes, request) {
    const dv = expectSize(bytes, SHMEM_MAP_SIZE, request, "MMAP request");
    const flags = u64(dv, 32);
    if ((flags & ~1n) !== 0n) throw new VhostUserError("BAD_VALUE", "MMAP flags", { request, value: flags });
    return { shmid: dv.getUint8(0), fdOffset: u64(dv, 8), shmOffset: u64(dv, 16), len: u64(dv, 24), flags };
  },
  encode(v, request) {
    const [b, dv] = alloc(SHMEM_MAP_SIZE);
    putUint(dv, 0, 8, v.shmid, request, "shmid");
    putU64(dv, 8, v.fdOffset, request, "fd_offset");
    putU64(dv, 16, v.shmOffset, request, "shm_offset");
    putU64(dv, 24, v.len, request, "len");
    putU64(dv, 32, v.flags, request, "flags");
    return b;
  },
};

/** num regions u32, padding u32, then a fixed array of 256 u64 sizes (QEMU and rust-vmm send all of it). */
export const SHMEM_CONFIG_SIZE = 8 + 8 * VIRTIO_MAX_SHMEM_REGIONS;
export const ShmemConfigCodec: PayloadCodec<ShmemConfig> = {
  name: "VIRTIO Shared Memory Region configuration",
  decode(bytes, request) {
    const dv = expectSize(bytes, SHMEM_CONFIG_SIZE, request, "shared memory configuration");
    const nregions = dv.getUint32(0, LE);
    if (nregions > VIRTIO_MAX_SHMEM_REGIONS)
      throw new VhostUserError("TOO_MANY_REGIONS", "num regions", {
        request,
        value: nregions,
        expected: `<= ${VIRTIO_MAX_SHMEM_REGIONS}`,
      });
    const memorySizes: bigint[] = [];
    for (let i = 0; i < VIRTIO_MAX_SHMEM_REGIONS; i++) memorySizes.push(u64(dv, 8 + 8 * i));
    return { nregions, memorySizes };
  },
  encode(v, request) {
    if (v.memorySizes.length > VIRTIO_MAX_SHMEM_REGIONS || v.nregions > VIRTIO_MAX_SHMEM_REGIONS)
      throw new VhostUserError("OUT_OF_RANGE", "too many shared memory regions", {
        request,
        value: Math.max(v.memorySizes.length, v.nregions),
      });
    const [b, dv] = alloc(SHMEM_CONFIG_SIZE);
    putUint(dv, 0, 32, v.nregions, request, "num regions");
    for (const [i, s] of v.memorySizes.entries()) putU64(dv, 8 + 8 * i, s, request, `mem size ${i}`);
    return b;
  },
};

/** Bytes we carry without interpreting (crypto session descriptions, whose layout the spec leaves to QEMU). */
export const Opaque: PayloadCodec<Uint8Array> = {
  name: "opaque bytes",
  decode(bytes) {
    return bytes.slice();
  },
  encode(v) {
    return v.slice();
  },
};

export const MemRegionOrAckCodec: PayloadCodec<MemRegionOrAck> = {
  name: "single memory region description (or u64 postcopy ack)",
  decode(bytes, request) {
    if (bytes.byteLength === 8) return { kind: "ack", value: U64.decode(bytes, request) };
    if (bytes.byteLength !== SINGLE_MEMORY_REGION_SIZE)
      throw new VhostUserError("BAD_SIZE", "single memory region or u64", {
        request,
        value: bytes.byteLength,
        expected: `${SINGLE_MEMORY_REGION_SIZE} or 8`,
      });
    return { kind: "region", region: SingleMemoryRegionCodec.decode(bytes, request) };
  },
  encode(v, request) {
    return v.kind === "ack" ? U64.encode(v.value, request) : SingleMemoryRegionCodec.encode(v.region, request);
  },
};

export const MemoryTableOrAckCodec: PayloadCodec<MemoryTableOrAck> = {
  name: "multiple memory regions description (or u64 ack)",
  decode(bytes, request) {
    // A u64 status and a table of 0 regions are both 8 bytes; 8 bytes is read as the status.
    if (bytes.byteLength === 8) return { kind: "ack", value: U64.decode(bytes, request) };
    return { kind: "table", table: MemoryTableCodec.decode(bytes, request) };
  },
  encode(v, request) {
    return v.kind === "ack" ? U64.encode(v.value, request) : MemoryTableCodec.encode(v.table, request);
  },
};
