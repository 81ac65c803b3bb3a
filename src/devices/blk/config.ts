/** The virtio-blk config space (virtio 1.2, 5.2.4) of one image, as GET_CONFIG returns it. */
import { Config } from "./constants.js";

export interface BlkGeometry {
  /** Image size in 512-byte sectors. */
  capacitySectors: number;
  /** Logical block size the driver should use (≥ 512, a power of two). */
  blkSize: number;
  sizeMax: number;
  segMax: number;
  numQueues: number;
  maxDiscardSectors: number;
  maxDiscardSeg: number;
  discardSectorAlignment: number;
  maxWriteZeroesSectors: number;
  maxWriteZeroesSeg: number;
  writeZeroesMayUnmap: boolean;
  /** The cache mode (VIRTIO_BLK_F_CONFIG_WCE): true writeback, false writethrough. */
  writeback: boolean;
}

export function encodeConfig(g: BlkGeometry): Uint8Array {
  const b = new Uint8Array(Config.size);
  const v = new DataView(b.buffer);
  v.setBigUint64(Config.capacity, BigInt(g.capacitySectors), true);
  v.setUint32(Config.sizeMax, g.sizeMax, true);
  v.setUint32(Config.segMax, g.segMax, true);
  v.setUint32(Config.blkSize, g.blkSize, true);
  // physical_block_exp: log2(physical block / logical block); we have no better knowledge.
  v.setUint8(Config.topology, 0);
  // min_io_size is in logical blocks (blk_size units): one block.
  v.setUint16(Config.topology + 2, 1, true);
  v.setUint8(Config.writeback, g.writeback ? 1 : 0);
  v.setUint16(Config.numQueues, g.numQueues, true);
  v.setUint32(Config.maxDiscardSectors, g.maxDiscardSectors, true);
  v.setUint32(Config.maxDiscardSeg, g.maxDiscardSeg, true);
  v.setUint32(Config.discardSectorAlignment, g.discardSectorAlignment, true);
  v.setUint32(Config.maxWriteZeroesSectors, g.maxWriteZeroesSectors, true);
  v.setUint32(Config.maxWriteZeroesSeg, g.maxWriteZeroesSeg, true);
  v.setUint8(Config.writeZeroesMayUnmap, g.writeZeroesMayUnmap ? 1 : 0);
  return b;
}

/** Bytes [offset, offset+size) of the config space; reads past its end are zero. */
export function configSlice(config: Uint8Array, offset: number, size: number): Uint8Array {
  const out = new Uint8Array(size);
  if (offset < config.length) out.set(config.subarray(offset, Math.min(offset + size, config.length)));
  return out;
}
