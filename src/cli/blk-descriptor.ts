/**
 * The vhost-user spec's "Backend program conventions" for `vmshift blk`: the capabilities
 * object (`--print-capabilities`) and the JSON descriptor management software (libvirt) looks
 * for in /usr/share/qemu/vhost-user, /etc/qemu/vhost-user or $XDG_CONFIG_HOME/qemu/vhost-user
 * (`--write-descriptor DIR`). Both follow QEMU's docs/interop/vhost-user.json: the backend type
 * is VHostUserBackendType `block`, its features VHostUserBackendBlockFeature.
 */
import { accessSync, constants, mkdirSync, realpathSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { fileURLToPath } from "node:url";

/** VHostUserBackendCapabilities of a "block" back-end: --read-only and --blk-file are understood. */
export const BLK_CAPABILITIES = { type: "block", features: ["read-only", "blk-file"] } as const;

/** The descriptor's file name: a two-digit prefix so management software sorts it predictably. */
export const BLK_DESCRIPTOR_NAME = "50-vmshift-blk.json";

/**
 * The stand-alone program (`vmshift-blk`, dist/src/cli/blk-main.js): serves with --socket-path,
 * --fd, --blk-file, --read-only and answers --print-capabilities.
 */
export function blkBinary(): string {
  return realpathSync(fileURLToPath(new URL("./blk-main.js", import.meta.url)));
}

/** VhostUserBackend: the descriptor object. */
export function blkDescriptor(binary = blkBinary()): { description: string; type: "block"; binary: string } {
  return { description: "vmshift vhost-user-blk back-end (raw image or block device)", type: "block", binary };
}

/** Writes DIR/50-vmshift-blk.json; the binary must be executable (management software runs it). */
export function writeBlkDescriptor(dir: string, binary = blkBinary()): string {
  accessSync(binary, constants.X_OK);
  mkdirSync(dir, { recursive: true });
  const path = join(dir, BLK_DESCRIPTOR_NAME);
  writeFileSync(path, `${JSON.stringify(blkDescriptor(binary), null, 2)}\n`, { mode: 0o644 });
  return path;
}
