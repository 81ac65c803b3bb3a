/**
 * `vmshift blk --socket-path PATH | --fd N  --image FILE [--readonly] [--queues N] [--direct]
 *  [--serial ID] [--print-capabilities]`: a vhost-user-blk back-end over a raw image file.
 *
 * Follows the vhost-user spec's "Backend program conventions": `--socket-path`/`--fd`,
 * `--print-capabilities` (type "block"), `--write-descriptor DIR` (the JSON descriptor), and the vhost-user-blk options `--blk-file`
 * (alias of --image) and `--read-only` (alias of --readonly). Logs go to stderr;
 * VMSHIFT_BLK_TRACE=1 also logs every vhost-user request received; VMSHIFT_BLK_DELAY_MS=N (tests)
 * holds every request N ms in its worker. SIGINT/SIGTERM stop it cleanly.
 */
import { parseArgs } from "node:util";
import { blkDevice } from "../devices/blk/device.js";
import { parseSocketMode, resolveGroup, type SocketPathOptions } from "../sys/unix-path.js";
import { VhostUserDaemon } from "../vhost-user/backend/daemon.js";
import type { BackendSession } from "../vhost-user/backend/session.js";
import { BLK_CAPABILITIES, writeBlkDescriptor } from "./blk-descriptor.js";

export const BLK_USAGE = `usage: vmshift blk (--socket-path PATH | --fd N) --image FILE [options]
  --socket-path PATH     listen on this unix socket (the front-end connects)
  --socket-mode MODE     file mode of the socket, octal (default 0600: only this user)
  --socket-group GROUP   group owning the socket (name or gid), e.g. QEMU's; with
                         --socket-mode 0660 its members may connect
                         (a socket already at PATH is replaced only if nobody answers
                         on it; anything else there is refused and left alone)
  --fd N                 use this inherited socket (listening or connected)
  --image FILE           raw image: a file or a block device (also --blk-file)
  --readonly             read-only disk (VIRTIO_BLK_F_RO; also --read-only)
  --queues N             virtqueues, each served by its own thread (default 1)
  --direct               open the image with O_DIRECT
  --io auto|sync|async|adaptive
                         async: reads and writes on libuv's thread pool (UV_THREADPOOL_SIZE
                         threads), several requests of a queue in flight; sync: one at a time
                         in the queue's thread; adaptive: inline, except a request that has
                         others waiting behind it and is worth the hop (any with --direct,
                         64 KiB and more on the page cache); auto (default): adaptive
  --serial ID            GET_ID answer, printable ASCII (default: the image file name)
  --queue-size N         the queue size the front-end uses (QEMU queue-size=N, default 128):
                         seg_max is N - 2
  --print-capabilities   print the back-end capabilities JSON and exit (other arguments ignored)
  --write-descriptor DIR write DIR/50-vmshift-blk.json, the vhost-user descriptor libvirt finds
                         (DIR: /etc/qemu/vhost-user, or $XDG_CONFIG_HOME/qemu/vhost-user), and exit
signals: SIGINT/SIGTERM stop it cleanly; SIGHUP reads the image's size again (online resize)
  and tells the front-end (CONFIG_CHANGE_MSG: QEMU passes the new capacity to the guest).
environment: VMSHIFT_BLK_TRACE=1 logs every vhost-user request;
  VMSHIFT_BLK_DELAY_MS=N holds every request N ms and logs "holding head H" / "released head H"
                         (tests: keeps requests in flight, so a kill can catch one)
`;

export { BLK_CAPABILITIES } from "./blk-descriptor.js";

export interface BlkCommandIo {
  out(line: string): void;
  err(line: string): void;
}

const defaultIo: BlkCommandIo = {
  out: (l) => process.stdout.write(`${l}\n`),
  err: (l) => process.stderr.write(`${l}\n`),
};

function describe(m: { name: string; payload: unknown; fds: readonly unknown[] }): string {
  const p = m.payload;
  let s: string;
  if (typeof p === "bigint") s = `0x${p.toString(16)}`;
  else if (p === undefined) s = "";
  else {
    try {
      s = JSON.stringify(p, (_k, v: unknown) =>
        typeof v === "bigint" ? `0x${v.toString(16)}` : v instanceof Uint8Array ? `[${v.length} bytes]` : v,
      );
    } catch {
      s = "?";
    }
    if (s.length > 300) s = `${s.slice(0, 300)}…`;
  }
  return `${m.name} ${s}${m.fds.length ? ` fds=${m.fds.length}` : ""}`;
}

export async function blkCommand(argv: string[], io: BlkCommandIo = defaultIo): Promise<number> {
  // "--print-capabilities": print and exit 0, whatever else is on the command line.
  if (argv.includes("--print-capabilities")) {
    io.out(JSON.stringify(BLK_CAPABILITIES));
    return 0;
  }
  let values: Record<string, string | boolean | undefined>;
  try {
    values = parseArgs({
      args: argv,
      options: {
        "socket-path": { type: "string" },
        "socket-mode": { type: "string" },
        "socket-group": { type: "string" },
        fd: { type: "string" },
        image: { type: "string" },
        "blk-file": { type: "string" },
        readonly: { type: "boolean", default: false },
        "read-only": { type: "boolean", default: false },
        queues: { type: "string", default: "1" },
        direct: { type: "boolean", default: false },
        io: { type: "string", default: "auto" },
        serial: { type: "string" },
        "queue-size": { type: "string" },
        "write-descriptor": { type: "string" },
        help: { type: "boolean", default: false },
      },
    }).values;
  } catch (e) {
    io.err(`vmshift blk: ${(e as Error).message}\n${BLK_USAGE}`);
    return 2;
  }
  if (values.help) {
    io.out(BLK_USAGE);
    return 0;
  }
  if (values["write-descriptor"] !== undefined) {
    try {
      io.out(writeBlkDescriptor(values["write-descriptor"] as string));
      return 0;
    } catch (e) {
      io.err(`vmshift blk: --write-descriptor: ${(e as Error).message}`);
      return 1;
    }
  }
  const image = (values.image ?? values["blk-file"]) as string | undefined;
  const socketPath = values["socket-path"] as string | undefined;
  const fdArg = values.fd as string | undefined;
  const queues = Number(values.queues);
  const usage = (msg: string) => {
    io.err(`vmshift blk: ${msg}\n${BLK_USAGE}`);
    return 2;
  };
  if (!image) return usage("--image FILE is required");
  if ((socketPath === undefined) === (fdArg === undefined)) return usage("give exactly one of --socket-path and --fd");
  if (!Number.isInteger(queues) || queues < 1 || queues > 64) return usage("--queues must be 1..64");
  if (!["auto", "sync", "async", "adaptive"].includes(values.io as string))
    return usage("--io must be auto, sync, async or adaptive");
  const socket: SocketPathOptions = {};
  try {
    if (values["socket-mode"] !== undefined) socket.mode = parseSocketMode(values["socket-mode"] as string);
    if (values["socket-group"] !== undefined) socket.group = resolveGroup(values["socket-group"] as string);
  } catch (e) {
    return usage((e as Error).message);
  }
  if ((socket.mode !== undefined || socket.group !== undefined) && socketPath === undefined)
    return usage("--socket-mode and --socket-group need --socket-path");
  const fd = fdArg === undefined ? -1 : Number(fdArg);
  if (fdArg !== undefined && !(Number.isInteger(fd) && fd >= 0)) return usage("--fd must be a file descriptor number");

  const log = (level: string, msg: string) => io.err(`vmshift blk: ${level}: ${msg}`);
  let daemon: VhostUserDaemon;
  let device: ReturnType<typeof blkDevice>;
  try {
    device = blkDevice({
      path: image,
      readonly: !!(values.readonly || values["read-only"]),
      queues,
      direct: !!values.direct,
      io: values.io as "auto" | "sync" | "async" | "adaptive",
      ...(values.serial ? { serial: values.serial as string } : {}),
      ...(values["queue-size"] ? { queueSize: Number(values["queue-size"]) } : {}),
      debugDelayMs: Number(process.env.VMSHIFT_BLK_DELAY_MS ?? 0) || 0,
    });
    daemon = socketPath ? VhostUserDaemon.listen(device, socketPath, socket) : VhostUserDaemon.fromFd(device, fd);
    log(
      "info",
      `serving ${image} (${device.capacitySectors} sectors, ${queues} queue(s)` +
        `${device.options.readonly ? ", read-only" : ""}${device.options.direct ? ", O_DIRECT" : ""}) on ` +
        `${socketPath ?? `fd ${fd}`}`,
    );
  } catch (e) {
    io.err(`vmshift blk: ${(e as Error).message}`);
    return 1;
  }
  let signalled: string | null = null;
  daemon.on("log", (level, msg) => {
    // Closing the listener fails the pending accept: expected when we are the ones stopping.
    if (signalled && msg.startsWith("accept failed")) return;
    log(level, msg);
  });
  if (process.env.VMSHIFT_BLK_TRACE === "1") {
    daemon.on("session", (s: BackendSession) => {
      s.conn.on("request", (m) => log("trace", describe(m as never)));
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
  // SIGHUP: the image may have grown (or shrunk): read its size again and tell the front-end.
  const onHup = () => {
    try {
      const { from, to } = device.resize();
      if (from === to) return log("info", `SIGHUP: capacity unchanged (${to} sectors)`);
      log("info", `SIGHUP: capacity ${from} -> ${to} sectors`);
      const s = daemon.session;
      if (!s) return;
      s.notifyConfigChange().then(
        () => log("info", "front-end told (CONFIG_CHANGE_MSG)"),
        (e: Error) => log("warn", `could not tell the front-end of the new capacity: ${e.message}`),
      );
    } catch (e) {
      log("warn", `SIGHUP: resize failed: ${(e as Error).message}`);
    }
  };
  process.on("SIGINT", onInt);
  process.on("SIGTERM", onTerm);
  process.on("SIGHUP", onHup);
  try {
    await daemon.serve();
  } finally {
    process.off("SIGINT", onInt);
    process.off("SIGTERM", onTerm);
    process.off("SIGHUP", onHup);
    await daemon.close();
  }
  log("info", "stopped");
  return 0;
}
