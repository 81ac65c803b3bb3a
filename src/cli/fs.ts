/**
 * `vmshift fs --socket-path PATH | --fd N  --shared-dir DIR [--readonly] [--cache auto|always|never]
 *  [--print-capabilities]`: a vhost-user-fs (virtio-fs) back-end over one directory, with
 * virtiofsd's option names. Logs go to stderr; VMSHIFT_FS_TRACE=1 also logs every vhost-user
 * request received. SIGINT/SIGTERM stop it cleanly.
 */
import { parseArgs } from "node:util";
import { fsDevice } from "../devices/fs/device.js";
import { VhostUserDaemon } from "../vhost-user/backend/daemon.js";
import type { BackendSession } from "../vhost-user/backend/session.js";

export const FS_USAGE = `usage: vmshift fs (--socket-path PATH | --fd N) --shared-dir DIR [options]
  --socket-path PATH     listen on this unix socket (the front-end connects)
  --fd N                 use this inherited socket (listening or connected)
  --shared-dir DIR       the directory the guest mounts (nothing outside it is reachable)
  --readonly             refuse every change (EROFS)
  --cache auto|always|never
                         how long the guest may cache names and attributes: 1 s (default),
                         1 day, or not at all
  --max-pages N          pages per request (max_write = N × 4 KiB; default 32); the queue must
                         hold N + a few descriptors (QEMU's queue-size, default 128)
  --print-capabilities   print the back-end capabilities JSON and exit (other arguments ignored)
QEMU: -chardev socket,id=fs0,path=PATH -device vhost-user-fs-pci,chardev=fs0,tag=TAG
  with guest RAM shared (memory-backend-memfd,share=on); guest: mount -t virtiofs TAG /mnt
signals: SIGINT/SIGTERM stop it cleanly.
environment: VMSHIFT_FS_TRACE=1 logs every vhost-user request
`;

/** The spec's capabilities object (type fs); migrate-precopy as virtiofsd says it. */
export const FS_CAPABILITIES = { type: "fs", features: ["migrate-precopy"] } as const;

export interface FsCommandIo {
  out(line: string): void;
  err(line: string): void;
}

const defaultIo: FsCommandIo = {
  out: (l) => process.stdout.write(`${l}\n`),
  err: (l) => process.stderr.write(`${l}\n`),
};

const CACHE_SECONDS: Record<string, number> = { auto: 1, always: 86400, never: 0 };

export async function fsCommand(argv: string[], io: FsCommandIo = defaultIo): Promise<number> {
  // The spec's backend program conventions: print and exit 0 whatever else is on the command
  // line, before any option is parsed or checked (as `vmshift blk` does).
  if (argv.includes("--print-capabilities")) {
    io.out(JSON.stringify(FS_CAPABILITIES));
    return 0;
  }
  let values: Record<string, string | boolean | undefined>;
  try {
    values = parseArgs({
      args: argv,
      options: {
        "socket-path": { type: "string" },
        fd: { type: "string" },
        "shared-dir": { type: "string" },
        readonly: { type: "boolean", default: false },
        cache: { type: "string", default: "auto" },
        "max-pages": { type: "string", default: "32" },
        "print-capabilities": { type: "boolean", default: false },
        help: { type: "boolean", default: false },
      },
    }).values;
  } catch (e) {
    io.err(`vmshift fs: ${(e as Error).message}\n${FS_USAGE}`);
    return 2;
  }
  if (values.help) {
    io.out(FS_USAGE);
    return 0;
  }
  const usage = (msg: string) => {
    io.err(`vmshift fs: ${msg}\n${FS_USAGE}`);
    return 2;
  };
  const dir = values["shared-dir"] as string | undefined;
  const socketPath = values["socket-path"] as string | undefined;
  const fdArg = values.fd as string | undefined;
  if (!dir) return usage("--shared-dir DIR is required");
  if ((socketPath === undefined) === (fdArg === undefined)) return usage("give exactly one of --socket-path and --fd");
  const cacheSeconds = CACHE_SECONDS[values.cache as string];
  if (cacheSeconds === undefined) return usage("--cache must be auto, always or never");
  const maxPages = Number(values["max-pages"]);
  if (!Number.isInteger(maxPages) || maxPages < 1 || maxPages > 256) return usage("--max-pages must be 1..256");
  const fd = fdArg === undefined ? -1 : Number(fdArg);
  if (fdArg !== undefined && !(Number.isInteger(fd) && fd >= 0)) return usage("--fd must be a file descriptor number");

  const log = (level: string, msg: string) => io.err(`vmshift fs: ${level}: ${msg}`);
  let daemon: VhostUserDaemon;
  let device: ReturnType<typeof fsDevice>;
  try {
    device = fsDevice({ sharedDir: dir, readonly: !!values.readonly, cacheSeconds, maxPages });
    daemon = socketPath ? VhostUserDaemon.listen(device, socketPath) : VhostUserDaemon.fromFd(device, fd);
    log("info", `sharing ${dir}${values.readonly ? " (read-only)" : ""} on ${socketPath ?? `fd ${fd}`}`);
  } catch (e) {
    io.err(`vmshift fs: ${(e as Error).message}`);
    return 1;
  }
  let signalled: string | null = null;
  daemon.on("log", (level, msg) => {
    if (signalled && msg.startsWith("accept failed")) return;
    log(level, msg);
  });
  if (process.env.VMSHIFT_FS_TRACE === "1") {
    daemon.on("session", (s: BackendSession) => {
      s.conn.on("request", (m) => {
        const r = m as { name: string; payload: unknown; fds: readonly unknown[] };
        const p = typeof r.payload === "bigint" ? ` 0x${r.payload.toString(16)}` : "";
        log("trace", `${r.name}${p}${r.fds.length ? ` fds=${r.fds.length}` : ""}`);
      });
    });
  }
  const stop = (sig: string) => {
    if (signalled) return;
    signalled = sig;
    log("info", `${sig}: shutting down`);
    void daemon.close();
  };
  const onInt = () => stop("SIGINT");
  const onTerm = () => stop("SIGTERM");
  process.on("SIGINT", onInt);
  process.on("SIGTERM", onTerm);
  try {
    await daemon.serve();
  } finally {
    process.off("SIGINT", onInt);
    process.off("SIGTERM", onTerm);
    await daemon.close();
    device.close();
  }
  log("info", "stopped");
  return 0;
}
