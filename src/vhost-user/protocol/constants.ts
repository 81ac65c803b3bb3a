/**
 * Numbers of the vhost-user protocol (QEMU docs/interop/vhost-user.rst): header flags,
 * the virtio/vhost feature bits vhost-user relies on, protocol feature bits, request codes.
 * All multi-byte fields are in the machine's native byte order.
 */

/** request u32, flags u32, size u32. */
export const HEADER_SIZE = 12;

/** Header flags. "Lower 2 bits are the version (currently 0x01)". */
export const VHOST_USER_VERSION = 0x1;
export const VHOST_USER_VERSION_MASK = 0x3;
/** Bit 2: set on every reply. */
export const VHOST_USER_REPLY_MASK = 0x4;
/** Bit 3: REPLY_ACK, the sender wants a u64 status back. */
export const VHOST_USER_NEED_REPLY_MASK = 0x8;
/** Bits the spec defines; anything else is reserved. */
export const VHOST_USER_KNOWN_FLAGS = VHOST_USER_VERSION_MASK | VHOST_USER_REPLY_MASK | VHOST_USER_NEED_REPLY_MASK;

/** SET_MEM_TABLE carries at most this many regions (VHOST_MEMORY_BASELINE_NREGIONS). */
export const VHOST_MEMORY_BASELINE_NREGIONS = 8;
/** Config space payload limit (VHOST_USER_MAX_CONFIG_SIZE in QEMU). */
export const VHOST_USER_MAX_CONFIG_SIZE = 256;
/** GET_SHMEM_CONFIG carries a fixed array of this many sizes (VIRTIO_MAX_SHMEM_REGIONS; shmid is 8-bit). */
export const VIRTIO_MAX_SHMEM_REGIONS = 256;
/** At most 8 fds ride on one message (SCM_RIGHTS limit used by QEMU and libvhost-user). */
export const VHOST_USER_MAX_FDS = 8;
/** Dirty log granularity: one bit per 4 KiB page (the shared log's layout lives in src/memory). */
export { VHOST_LOG_PAGE } from "../../memory/shared-dirty-log.js";

/** SET_VRING_KICK/CALL/ERR and VRING_HOST_NOTIFIER_MSG u64: bits 0-7 vring index, bit 8 "no fd". */
export const VHOST_USER_VRING_IDX_MASK = 0xffn;
export const VHOST_USER_VRING_NOFD_MASK = 0x100n;

/** vring address flags: log writes to the used ring. */
export const VHOST_VRING_F_LOG = 0x1;

import * as V from "../../virtio/features.js";

/**
 * Virtio and vhost feature bits (bit numbers) that matter on a vhost-user connection: the virtio
 * ones are src/virtio/features.ts's (one copy), plus vhost's own two.
 * Feature masks are u64 on the wire and bigint here: bits above 31 are common (VERSION_1 = 32).
 */
export const VirtioFeature = {
  VIRTIO_F_NOTIFY_ON_EMPTY: V.VIRTIO_F_NOTIFY_ON_EMPTY,
  /** vhost: the front-end logs; the back-end must mark what it writes. */
  VHOST_F_LOG_ALL: 26,
  VIRTIO_F_ANY_LAYOUT: V.VIRTIO_F_ANY_LAYOUT,
  VIRTIO_RING_F_INDIRECT_DESC: V.VIRTIO_RING_F_INDIRECT_DESC,
  VIRTIO_RING_F_EVENT_IDX: V.VIRTIO_RING_F_EVENT_IDX,
  /** The reserved virtio bit 30, reused to announce GET/SET_PROTOCOL_FEATURES. */
  VHOST_USER_F_PROTOCOL_FEATURES: 30,
  VIRTIO_F_VERSION_1: V.VIRTIO_F_VERSION_1,
  /** a.k.a. VIRTIO_F_IOMMU_PLATFORM: ring addresses are IOVAs, IOTLB messages in play. */
  VIRTIO_F_ACCESS_PLATFORM: V.VIRTIO_F_ACCESS_PLATFORM,
  VIRTIO_F_RING_PACKED: V.VIRTIO_F_RING_PACKED,
  VIRTIO_F_IN_ORDER: V.VIRTIO_F_IN_ORDER,
  VIRTIO_F_ORDER_PLATFORM: V.VIRTIO_F_ORDER_PLATFORM,
  VIRTIO_F_SR_IOV: V.VIRTIO_F_SR_IOV,
  VIRTIO_F_NOTIFICATION_DATA: V.VIRTIO_F_NOTIFICATION_DATA,
  VIRTIO_F_NOTIF_CONFIG_DATA: V.VIRTIO_F_NOTIF_CONFIG_DATA,
  VIRTIO_F_RING_RESET: V.VIRTIO_F_RING_RESET,
  VIRTIO_F_ADMIN_VQ: V.VIRTIO_F_ADMIN_VQ,
} as const;
export type VirtioFeatureName = keyof typeof VirtioFeature;
/** Spec alias. */
export const VIRTIO_F_IOMMU_PLATFORM = VirtioFeature.VIRTIO_F_ACCESS_PLATFORM;

/** Protocol feature bits (bit numbers), negotiated with GET/SET_PROTOCOL_FEATURES. */
export const ProtocolFeature = {
  MQ: 0,
  LOG_SHMFD: 1,
  RARP: 2,
  REPLY_ACK: 3,
  /** Spec text also calls it NET_MTU. */
  MTU: 4,
  /** Formerly SLAVE_REQ. */
  BACKEND_REQ: 5,
  CROSS_ENDIAN: 6,
  CRYPTO_SESSION: 7,
  PAGEFAULT: 8,
  CONFIG: 9,
  /** Formerly SLAVE_SEND_FD. */
  BACKEND_SEND_FD: 10,
  HOST_NOTIFIER: 11,
  INFLIGHT_SHMFD: 12,
  RESET_DEVICE: 13,
  INBAND_NOTIFICATIONS: 14,
  CONFIGURE_MEM_SLOTS: 15,
  STATUS: 16,
  XEN_MMAP: 17,
  SHARED_OBJECT: 18,
  DEVICE_STATE: 19,
  SHMEM: 20,
} as const;
export type ProtocolFeatureName = keyof typeof ProtocolFeature;

/** 1n << bit, for building and testing u64 feature masks. */
export function featureMask(...bits: number[]): bigint {
  let m = 0n;
  for (const b of bits) {
    if (!Number.isInteger(b) || b < 0 || b > 63) throw new RangeError(`feature bit ${b} outside 0..63`);
    m |= 1n << BigInt(b);
  }
  return m;
}

export function hasFeature(mask: bigint, bit: number): boolean {
  return ((mask >> BigInt(bit)) & 1n) === 1n;
}

/** Front-end → back-end requests on the main socket. */
export const FrontendRequest = {
  GET_FEATURES: 1,
  SET_FEATURES: 2,
  SET_OWNER: 3,
  RESET_OWNER: 4,
  SET_MEM_TABLE: 5,
  SET_LOG_BASE: 6,
  SET_LOG_FD: 7,
  SET_VRING_NUM: 8,
  SET_VRING_ADDR: 9,
  SET_VRING_BASE: 10,
  GET_VRING_BASE: 11,
  SET_VRING_KICK: 12,
  SET_VRING_CALL: 13,
  SET_VRING_ERR: 14,
  GET_PROTOCOL_FEATURES: 15,
  SET_PROTOCOL_FEATURES: 16,
  GET_QUEUE_NUM: 17,
  SET_VRING_ENABLE: 18,
  SEND_RARP: 19,
  NET_SET_MTU: 20,
  /** Formerly SET_SLAVE_REQ_FD. */
  SET_BACKEND_REQ_FD: 21,
  IOTLB_MSG: 22,
  SET_VRING_ENDIAN: 23,
  GET_CONFIG: 24,
  SET_CONFIG: 25,
  CREATE_CRYPTO_SESSION: 26,
  CLOSE_CRYPTO_SESSION: 27,
  POSTCOPY_ADVISE: 28,
  POSTCOPY_LISTEN: 29,
  POSTCOPY_END: 30,
  GET_INFLIGHT_FD: 31,
  SET_INFLIGHT_FD: 32,
  GPU_SET_SOCKET: 33,
  RESET_DEVICE: 34,
  VRING_KICK: 35,
  GET_MAX_MEM_SLOTS: 36,
  ADD_MEM_REG: 37,
  REM_MEM_REG: 38,
  SET_STATUS: 39,
  GET_STATUS: 40,
  GET_SHARED_OBJECT: 41,
  SET_DEVICE_STATE_FD: 42,
  CHECK_DEVICE_STATE: 43,
  GET_SHMEM_CONFIG: 44,
} as const;
export type FrontendRequestName = keyof typeof FrontendRequest;

/** Back-end → front-end requests on the back-end channel (the socket of SET_BACKEND_REQ_FD). */
export const BackendRequest = {
  /** Formerly SLAVE_IOTLB_MSG. */
  IOTLB_MSG: 1,
  CONFIG_CHANGE_MSG: 2,
  VRING_HOST_NOTIFIER_MSG: 3,
  VRING_CALL: 4,
  VRING_ERR: 5,
  SHARED_OBJECT_ADD: 6,
  SHARED_OBJECT_REMOVE: 7,
  SHARED_OBJECT_LOOKUP: 8,
  SHMEM_MAP: 9,
  SHMEM_UNMAP: 10,
} as const;
export type BackendRequestName = keyof typeof BackendRequest;

/** IOTLB message types (struct vhost_iotlb_msg.type). */
export const IotlbType = { MISS: 1, UPDATE: 2, INVALIDATE: 3, ACCESS_FAIL: 4 } as const;
/** IOTLB permissions (struct vhost_iotlb_msg.perm). */
export const IotlbPermission = { NONE: 0, READ: 1, WRITE: 2, READ_WRITE: 3 } as const;
/** SET_CONFIG/GET_CONFIG flags: an enum value, not a bit mask (QEMU: VHOST_SET_CONFIG_TYPE_*). */
export const ConfigFlags = { FRONTEND: 0, MIGRATION: 1 } as const;
/** SET_DEVICE_STATE_FD transfer direction. */
export const DeviceStateDirection = { SAVE: 0, LOAD: 1 } as const;
/** SET_DEVICE_STATE_FD migration phase. */
export const DeviceStatePhase = { STOPPED: 0 } as const;
/** SHMEM_MAP flags. */
export const VHOST_USER_FLAG_MAP_RW = 0x1n;
/** SET_VRING_ENDIAN state.num. */
export const VringEndian = { LITTLE: 0, BIG: 1 } as const;
