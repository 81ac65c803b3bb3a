/**
 * The virtio-fs back-end's migration state on the wire (what SET_DEVICE_STATE_FD carries, and
 * QEMU stores opaque in its migration stream): a magic line, then JSON. The decoder checks
 * every field's type and range before anything is reopened: a state we cannot read fails the
 * load (CHECK_DEVICE_STATE reports it, QEMU fails the migration and the source goes on).
 */
import { isComponent } from "./decode.js";
import type { FsState } from "./passthrough.js";

export const STATE_MAGIC = "vmshift-fs-state 1\n";
/** Bound on what we accept (a guest holding a million files open is not a guest we migrate). */
export const MAX_STATE_BYTES = 256 << 20;
const MAX_ENTRIES = 1 << 20;
const MAX_DEPTH = 4096;

export class FsStateError extends Error {
  override readonly name = "FsStateError";
}

export function encodeState(s: FsState): Uint8Array {
  return new TextEncoder().encode(STATE_MAGIC + JSON.stringify(s));
}

const isUint = (v: unknown, max = Number.MAX_SAFE_INTEGER): v is number =>
  typeof v === "number" && Number.isInteger(v) && v >= 0 && v <= max;

function checkPath(p: unknown, what: string): string[] | null {
  if (p === null) return null;
  if (!Array.isArray(p) || p.length > MAX_DEPTH) throw new FsStateError(`${what}: path is not a list`);
  for (const c of p) {
    if (typeof c !== "string" || !/^[A-Za-z0-9+/]*={0,2}$/.test(c))
      throw new FsStateError(`${what}: path component is not base64`);
    if (!isComponent(Buffer.from(c, "base64"))) throw new FsStateError(`${what}: path component is not a plain name`);
  }
  return p as string[];
}

export function decodeState(bytes: Uint8Array): FsState {
  if (bytes.length > MAX_STATE_BYTES) throw new FsStateError(`state of ${bytes.length} bytes`);
  const text = new TextDecoder("utf-8", { fatal: false }).decode(bytes);
  if (!text.startsWith(STATE_MAGIC)) throw new FsStateError("not a vmshift fs state (bad magic)");
  let raw: unknown;
  try {
    raw = JSON.parse(text.slice(STATE_MAGIC.length));
  } catch (e) {
    throw new FsStateError(`state is not JSON: ${(e as Error).message}`);
  }
  const o = raw as Record<string, unknown>;
  if (typeof o !== "object" || o === null || o.version !== 1) throw new FsStateError("unsupported state version");
  if (typeof o.initialized !== "boolean") throw new FsStateError("initialized");
  if (!isUint(o.minor, 0xffffffff) || !isUint(o.flags, 0xffffffff)) throw new FsStateError("minor/flags");
  if (!isUint(o.nextNodeid) || !isUint(o.nextFh)) throw new FsStateError("nextNodeid/nextFh");
  if (!Array.isArray(o.inodes) || o.inodes.length > MAX_ENTRIES) throw new FsStateError("inodes");
  if (!Array.isArray(o.handles) || o.handles.length > MAX_ENTRIES) throw new FsStateError("handles");
  const seenNodes = new Set<number>();
  const inodes = (o.inodes as Record<string, unknown>[]).map((i, k) => {
    const what = `inode #${k}`;
    if (typeof i !== "object" || i === null) throw new FsStateError(what);
    if (!isUint(i.nodeid) || (i.nodeid as number) < 2 || (i.nodeid as number) >= (o.nextNodeid as number))
      throw new FsStateError(`${what}: node id`);
    if (seenNodes.has(i.nodeid as number)) throw new FsStateError(`${what}: duplicate node id`);
    seenNodes.add(i.nodeid as number);
    if (!isUint(i.nlookup) || i.nlookup === 0) throw new FsStateError(`${what}: lookup count`);
    if (!isUint(i.type, 0o170000) || ((i.type as number) & ~0o170000) !== 0) throw new FsStateError(`${what}: type`);
    return {
      nodeid: i.nodeid as number,
      nlookup: i.nlookup as number,
      type: i.type as number,
      path: checkPath(i.path, what),
    };
  });
  const seenFh = new Set<number>();
  const handles = (o.handles as Record<string, unknown>[]).map((h, k) => {
    const what = `handle #${k}`;
    if (typeof h !== "object" || h === null) throw new FsStateError(what);
    if (!isUint(h.fh) || h.fh === 0 || (h.fh as number) >= (o.nextFh as number)) throw new FsStateError(`${what}: fh`);
    if (seenFh.has(h.fh as number)) throw new FsStateError(`${what}: duplicate fh`);
    seenFh.add(h.fh as number);
    if (!isUint(h.nodeid)) throw new FsStateError(`${what}: node id`);
    if (h.kind !== "file" && h.kind !== "dir") throw new FsStateError(`${what}: kind`);
    if (!isUint(h.flags, 0xffffffff)) throw new FsStateError(`${what}: flags`);
    return {
      fh: h.fh as number,
      nodeid: h.nodeid as number,
      kind: h.kind as "file" | "dir",
      flags: h.flags as number,
      path: checkPath(h.path, what),
    };
  });
  return {
    version: 1,
    initialized: o.initialized,
    minor: o.minor as number,
    flags: o.flags as number,
    nextNodeid: o.nextNodeid as number,
    nextFh: o.nextFh as number,
    inodes,
    handles,
  };
}
