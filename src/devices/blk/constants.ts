/**
 * virtio-blk constants and layouts (virtio 1.2, 5.2 "Block Device"): feature bits, request
 * types, status values, the request header and the config space. One place, next to the codec.
 */

import { VirtioBlkFeature } from "../../virtio/blk-features.js";

/** Device id of a block device (virtio 1.2, 5 "Device Types"). */
export const VIRTIO_ID_BLOCK = 2;

// Feature bits (5.2.3): the one table is src/virtio/blk-features.ts.
const B = VirtioBlkFeature;
export const VIRTIO_BLK_F_SIZE_MAX = B.VIRTIO_BLK_F_SIZE_MAX;
export const VIRTIO_BLK_F_SEG_MAX = B.VIRTIO_BLK_F_SEG_MAX;
export const VIRTIO_BLK_F_GEOMETRY = B.VIRTIO_BLK_F_GEOMETRY;
export const VIRTIO_BLK_F_RO = B.VIRTIO_BLK_F_RO;
export const VIRTIO_BLK_F_BLK_SIZE = B.VIRTIO_BLK_F_BLK_SIZE;
export const VIRTIO_BLK_F_FLUSH = B.VIRTIO_BLK_F_FLUSH;
export const VIRTIO_BLK_F_TOPOLOGY = B.VIRTIO_BLK_F_TOPOLOGY;
export const VIRTIO_BLK_F_CONFIG_WCE = B.VIRTIO_BLK_F_CONFIG_WCE;
export const VIRTIO_BLK_F_MQ = B.VIRTIO_BLK_F_MQ;
export const VIRTIO_BLK_F_DISCARD = B.VIRTIO_BLK_F_DISCARD;
export const VIRTIO_BLK_F_WRITE_ZEROES = B.VIRTIO_BLK_F_WRITE_ZEROES;

// Request types (5.2.6).
export const VIRTIO_BLK_T_IN = 0;
export const VIRTIO_BLK_T_OUT = 1;
export const VIRTIO_BLK_T_FLUSH = 4;
export const VIRTIO_BLK_T_GET_ID = 8;
export const VIRTIO_BLK_T_GET_LIFETIME = 10;
export const VIRTIO_BLK_T_DISCARD = 11;
export const VIRTIO_BLK_T_WRITE_ZEROES = 13;
export const VIRTIO_BLK_T_SECURE_ERASE = 14;

// Status byte values.
export const VIRTIO_BLK_S_OK = 0;
export const VIRTIO_BLK_S_IOERR = 1;
export const VIRTIO_BLK_S_UNSUPP = 2;

/** Sectors are always 512 bytes, whatever blk_size says. */
export const SECTOR_SIZE = 512;
export const SECTOR_SHIFT = 9;
/** struct virtio_blk_req header: le32 type, le32 reserved, le64 sector. */
export const REQUEST_HEADER_SIZE = 16;
/** struct virtio_blk_discard_write_zeroes: le64 sector, le32 num_sectors, le32 flags. */
export const DISCARD_SEGMENT_SIZE = 16;
export const VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP = 1;
/** GET_ID answers with at most this many bytes (no NUL when the id is this long). */
export const VIRTIO_BLK_ID_BYTES = 20;

/** Offsets in struct virtio_blk_config (all little-endian). */
export const Config = {
  capacity: 0, // le64, in 512-byte sectors
  sizeMax: 8, // le32
  segMax: 12, // le32
  geometry: 16, // le16 cylinders, u8 heads, u8 sectors
  blkSize: 20, // le32
  topology: 24, // u8 physical_block_exp, u8 alignment_offset, le16 min_io_size, le32 opt_io_size
  writeback: 32, // u8
  numQueues: 34, // le16
  maxDiscardSectors: 36, // le32
  maxDiscardSeg: 40, // le32
  discardSectorAlignment: 44, // le32
  maxWriteZeroesSectors: 48, // le32
  maxWriteZeroesSeg: 52, // le32
  writeZeroesMayUnmap: 56, // u8
  /** Up to and including write_zeroes_may_unmap and its padding (secure erase and zoned follow). */
  size: 60,
} as const;
