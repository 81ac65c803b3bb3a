/**
 * Names for feature bits, for `vmshift probe` and logs. Bits 0-23 belong to the device type, so
 * they are named only when the caller says which device it is talking to.
 */
import { VirtioBlkFeature } from "../../virtio/blk-features.js";
import { ProtocolFeature, VirtioFeature } from "../protocol/constants.js";

export { VirtioBlkFeature };

/** Device types whose bits 0-23 we can name. */
export type DeviceKind = "blk";

const DEVICE_NAMES: Record<DeviceKind, Readonly<Record<string, number>>> = { blk: VirtioBlkFeature };

function bitsOf(mask: bigint): number[] {
  const out: number[] = [];
  for (let b = 0; b < 64; b++) if ((mask >> BigInt(b)) & 1n) out.push(b);
  return out;
}

function invert(table: Readonly<Record<string, number>>): Map<number, string> {
  const m = new Map<number, string>();
  for (const [name, bit] of Object.entries(table)) if (!m.has(bit)) m.set(bit, name);
  return m;
}

const VIRTIO_BY_BIT = invert(VirtioFeature);
const PROTOCOL_BY_BIT = invert(ProtocolFeature);

/**
 * Names of the bits of a GET_FEATURES mask: transport and vhost bits by name, device bits by
 * name for a known `device`, else "DEVICE_F_<bit>"; unknown bits as "BIT_<bit>".
 */
export function featureNames(mask: bigint, device?: DeviceKind): string[] {
  const dev = device ? invert(DEVICE_NAMES[device]) : null;
  return bitsOf(mask).map((b) => {
    if (b < 24) return dev?.get(b) ?? `DEVICE_F_${b}`;
    return VIRTIO_BY_BIT.get(b) ?? `BIT_${b}`;
  });
}

/** Names of the bits of a GET_PROTOCOL_FEATURES mask ("BIT_<n>" for bits the spec does not define). */
export function protocolFeatureNames(mask: bigint): string[] {
  return bitsOf(mask).map((b) => PROTOCOL_BY_BIT.get(b) ?? `BIT_${b}`);
}
