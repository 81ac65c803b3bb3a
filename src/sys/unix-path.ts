/**
 * Listening on a unix socket path without harming what is already there, with the mode and
 * group the operator asked for (virtiofsd's --socket-group, QEMU's vhost-user conventions).
 *
 * - Something at the path that is not a socket (a regular file, a directory, a symlink) is
 *   never removed: EEXIST.
 * - A socket someone answers on belongs to a live process: EADDRINUSE, and it keeps it.
 * - Only a socket nobody answers on (ECONNREFUSED: its process is gone) is replaced.
 * - The socket is bound in a private directory next to the path (0700: nobody else can
 *   connect before its mode and group are set), chmod/chown'ed there, then hard-linked to the
 *   path, which fails if anything appeared there meanwhile (link(2) never replaces).
 * - On close it is removed only if the path still names our socket (same device and inode):
 *   a path taken over by someone else is left to them.
 */
import { chmodSync, chownSync, linkSync, lstatSync, mkdtempSync, readFileSync, rmdirSync, unlinkSync } from "node:fs";
import { constants } from "node:os";
import { basename, dirname, join } from "node:path";
import { SysError, sys } from "./errors.js";
import { Fd } from "./fd.js";
import { native } from "./native.js";

const { EEXIST, EADDRINUSE, ECONNREFUSED, ENOENT, EINVAL } = constants.errno;
/** sockaddr_un.sun_path holds 108 bytes, the terminating NUL included. */
const SUN_PATH_MAX = 107;

export interface SocketPathOptions {
  /** File mode of the socket (default 0o600: only our user may connect). */
  mode?: number;
  /** Group that owns the socket: a gid or a group name from /etc/group (we must be a member). */
  group?: number | string;
  backlog?: number;
}

/** The identity of a socket file we created: unlinked on close only while the path still names it. */
export interface OwnedSocketPath {
  readonly path: string;
  readonly dev: number;
  readonly ino: number;
}

/** A listening socket bound at a path by listenUnixPath(). */
export interface BoundUnixPath extends OwnedSocketPath {
  readonly fd: Fd;
}

/** "0660" / "660" / "0o660" → 0o660; anything else is a RangeError. */
export function parseSocketMode(s: string): number {
  const m = /^(?:0o?)?([0-7]{3,4})$/.exec(s.trim());
  if (!m) throw new RangeError(`socket mode ${JSON.stringify(s)}: expected octal, e.g. 0660`);
  const mode = Number.parseInt(m[1] as string, 8);
  if (mode & ~0o777) throw new RangeError(`socket mode ${s}: only permission bits (0..0777)`);
  return mode;
}

/** A gid from a number or a group name (/etc/group). */
export function resolveGroup(group: number | string): number {
  if (typeof group === "number" || /^\d+$/.test(group)) {
    const gid = Number(group);
    if (!Number.isSafeInteger(gid) || gid < 0) throw new RangeError(`bad gid ${group}`);
    return gid;
  }
  let text = "";
  try {
    text = readFileSync("/etc/group", "utf8");
  } catch {
    // no group database: only numeric groups then
  }
  for (const line of text.split("\n")) {
    const [name, , gid] = line.split(":");
    if (name === group && gid !== undefined && /^\d+$/.test(gid)) return Number(gid);
  }
  throw new RangeError(`unknown group ${JSON.stringify(group)}`);
}

function lstatOrNull(path: string) {
  try {
    return lstatSync(path);
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === "ENOENT") return null;
    throw e;
  }
}

/**
 * Makes room at `path` for a new socket: nothing there, or a socket nobody answers on (removed).
 * Anything else is refused and left as it is.
 */
export function clearStaleSocket(path: string): void {
  const st = lstatOrNull(path);
  if (!st) return;
  if (!st.isSocket())
    throw new SysError("bind", EEXIST, `${path} exists and is not a socket: left alone, not replaced`);
  let fd: number;
  try {
    fd = sys(() => native.unixConnect(path), path);
  } catch (e) {
    if (e instanceof SysError && e.errno === ECONNREFUSED) {
      // Nobody listens: a socket file its process left behind.
      try {
        unlinkSync(path);
      } catch (u) {
        if ((u as NodeJS.ErrnoException).code !== "ENOENT") throw u;
      }
      return;
    }
    if (e instanceof SysError && e.errno === ENOENT) return;
    throw new SysError(
      "bind",
      EADDRINUSE,
      `${path}: cannot tell whether the socket there is in use (${(e as Error).message})`,
    );
  }
  native.close(fd);
  throw new SysError("bind", EADDRINUSE, `a live socket answers at ${path}: it belongs to a running process`);
}

/**
 * Binds and listens on `path` (see the module doc): mode `options.mode` (default 0600), group
 * `options.group`. Throws SysError EEXIST for a non-socket at the path, EADDRINUSE for a live
 * socket; neither is touched.
 */
export function listenUnixPath(path: string, options: SocketPathOptions = {}): BoundUnixPath {
  const mode = options.mode ?? 0o600;
  if (!Number.isInteger(mode) || mode < 0 || mode > 0o777) throw new RangeError(`bad socket mode ${mode}`);
  const gid = options.group === undefined ? undefined : resolveGroup(options.group);
  const backlog = options.backlog ?? 16;
  clearStaleSocket(path);
  const dir = dirname(path);
  const privateDir = mkdtempSync(join(dir, ".vmshift-"));
  const tmp = join(privateDir, "s");
  if (Buffer.byteLength(tmp) > SUN_PATH_MAX) {
    rmdirSync(privateDir);
    if (Buffer.byteLength(path) > SUN_PATH_MAX) throw new SysError("bind", EINVAL, `${path}: longer than sun_path`);
    throw new SysError(
      "bind",
      EINVAL,
      `${path}: too long to bind through a private directory beside it (${basename(path)} in a shorter directory)`,
    );
  }
  let fd: Fd | null = null;
  try {
    fd = new Fd(sys(() => native.unixListen(tmp, backlog), tmp));
    chmodSync(tmp, mode);
    if (gid !== undefined) chownSync(tmp, process.getuid?.() ?? -1, gid);
    try {
      linkSync(tmp, path);
    } catch (e) {
      const err = e as NodeJS.ErrnoException;
      if (err.code === "EEXIST")
        throw new SysError("bind", EEXIST, `${path} appeared while binding: left alone, not replaced`);
      throw e;
    }
    const st = lstatSync(path);
    return { fd, path, dev: st.dev, ino: st.ino };
  } catch (e) {
    fd?.close();
    throw e;
  } finally {
    try {
      unlinkSync(tmp);
    } catch {
      // not created
    }
    rmdirSync(privateDir);
  }
}

/** Removes the socket file at `owned.path` if it is still the one we created (same inode). */
export function removeOwnedSocket(owned: OwnedSocketPath): void {
  const st = lstatOrNull(owned.path);
  if (!st?.isSocket() || st.dev !== owned.dev || st.ino !== owned.ino) return;
  try {
    unlinkSync(owned.path);
  } catch {
    // gone meanwhile
  }
}
