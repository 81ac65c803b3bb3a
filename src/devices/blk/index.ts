/**
 * src/devices/blk: vhost-user-blk over a raw image file (virtio 1.2, 5.2 "Block Device"), on
 * the backend framework: device.ts is the control plane (features, config space), handler.ts
 * the per-queue request loop in each queue's worker thread, image.ts the file I/O.
 */
export {
  type BlkGeometry,
  configSlice,
  encodeConfig,
} from "./config.js";
export {
  Config,
  DISCARD_SEGMENT_SIZE,
  REQUEST_HEADER_SIZE,
  SECTOR_SHIFT,
  SECTOR_SIZE,
  VIRTIO_BLK_F_BLK_SIZE,
  VIRTIO_BLK_F_CONFIG_WCE,
  VIRTIO_BLK_F_DISCARD,
  VIRTIO_BLK_F_FLUSH,
  VIRTIO_BLK_F_GEOMETRY,
  VIRTIO_BLK_F_MQ,
  VIRTIO_BLK_F_RO,
  VIRTIO_BLK_F_SEG_MAX,
  VIRTIO_BLK_F_SIZE_MAX,
  VIRTIO_BLK_F_TOPOLOGY,
  VIRTIO_BLK_F_WRITE_ZEROES,
  VIRTIO_BLK_ID_BYTES,
  VIRTIO_BLK_S_IOERR,
  VIRTIO_BLK_S_OK,
  VIRTIO_BLK_S_UNSUPP,
  VIRTIO_BLK_T_DISCARD,
  VIRTIO_BLK_T_FLUSH,
  VIRTIO_BLK_T_GET_ID,
  VIRTIO_BLK_T_GET_LIFETIME,
  VIRTIO_BLK_T_IN,
  VIRTIO_BLK_T_OUT,
  VIRTIO_BLK_T_SECURE_ERASE,
  VIRTIO_BLK_T_WRITE_ZEROES,
  VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
  VIRTIO_ID_BLOCK,
} from "./constants.js";
export {
  type BlkDevice,
  type BlkOptions,
  blkDevice,
  MAX_DISCARD_SECTORS,
  MAX_DISCARD_SEG,
  SEG_MAX,
  SIZE_MAX,
} from "./device.js";
export { BlkQueueHandler, type BlkWorkerData } from "./handler.js";
export {
  AlignedBuffer,
  BlockImage,
  DIRECT_ALIGNMENT,
  type ImageOptions,
  isDirectAligned,
} from "./image.js";
