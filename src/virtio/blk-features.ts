/**
 * virtio-blk device feature bits (virtio 1.2, 5.2.3 "Block Device: Feature bits"), the one copy:
 * the blk device (src/devices/blk) builds its offer from them, `vmshift probe` names them.
 */
export const VirtioBlkFeature = {
  VIRTIO_BLK_F_BARRIER: 0,
  VIRTIO_BLK_F_SIZE_MAX: 1,
  VIRTIO_BLK_F_SEG_MAX: 2,
  VIRTIO_BLK_F_GEOMETRY: 4,
  VIRTIO_BLK_F_RO: 5,
  VIRTIO_BLK_F_BLK_SIZE: 6,
  VIRTIO_BLK_F_SCSI: 7,
  VIRTIO_BLK_F_FLUSH: 9,
  VIRTIO_BLK_F_TOPOLOGY: 10,
  VIRTIO_BLK_F_CONFIG_WCE: 11,
  VIRTIO_BLK_F_MQ: 12,
  VIRTIO_BLK_F_DISCARD: 13,
  VIRTIO_BLK_F_WRITE_ZEROES: 14,
  VIRTIO_BLK_F_LIFETIME: 15,
  VIRTIO_BLK_F_SECURE_ERASE: 16,
  VIRTIO_BLK_F_ZONED: 17,
} as const;
