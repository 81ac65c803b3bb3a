/** Device status field bits (virtio 1.x, "Device Status Field"). */
export const VIRTIO_CONFIG_S_ACKNOWLEDGE = 1;
export const VIRTIO_CONFIG_S_DRIVER = 2;
export const VIRTIO_CONFIG_S_DRIVER_OK = 4;
export const VIRTIO_CONFIG_S_FEATURES_OK = 8;
/**
 * "The device has experienced an error from which it can't recover." A device sets it when a
 * queue is broken (see SplitQueue.broken); the driver must reset the device to use it again.
 */
export const VIRTIO_CONFIG_S_NEEDS_RESET = 64;
export const VIRTIO_CONFIG_S_FAILED = 128;
