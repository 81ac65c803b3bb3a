/**
 * `vmshift blk --socket-path PATH | --fd N  --image FILE [options]`: a vhost-user-blk back-end
 * over a raw image file or a block device.
 *
 * Follows the vhost-user spec's "Backend program conventions": `--socket-path`/`--fd`,
 * `--print-capabilities` (type "block", whatever else is on the command line), and the vhost-user-blk options `--blk-file`
 * (alias of --image) and `--read-only` (alias of --readonly). Logs go to stderr through the
 * CLI's logger; `--log-level trace` (or VMSHIFT_BLK_TRACE=1) also logs every vhost-user request
 * received; VMSHIFT_BLK_DELAY_MS=N (tests) holds every request N ms in its worker. SIGINT and
 * SIGTERM stop it cleanly; SIGHUP re-reads the image size.
 */
import { blkDevice } from "../devices/blk/device.js";
import { parseSocketMode, resolveGroup, type SocketPathOptions } from "../sys/unix-path.js";
import { VhostUserDaemon } from "../vhost-user/backend/daemon.js";
import { queueGroups } from "../vhost-user/backend/queue-thread.js";
import type { BackendSession } from "../vhost-user/backend/session.js";
import { BLK_CAPABILITIES, writeBlkDescriptor } from "./blk-descriptor.js";
import { parseTcpSpec } from "./http.js";
import { addBlkMetrics, Metrics } from "./metrics.js";
import { exactlyOne, required, UsageError } from "./options.js";
import { defineCommand, EXIT_FAILED, EXIT_OK } from "./runtime.js";

export const BLK_USAGE = `usage: vmshift blk (--socket-path PATH | --fd N) --image FILE [options]
  --socket-path PATH     listen on this unix socket (the front-end connects)
  --socket-mode MODE     the socket's mode, octal (default 0600: only our user may connect)
  --socket-group GROUP   the socket's group (a name or gid we belong to), e.g. QEMU's, with 0660
  --fd N                 use this inherited socket (listening or connected)
  --image FILE           raw image: a file or a block device (also --blk-file)
  --readonly             read-only disk (VIRTIO_BLK_F_RO; also --read-only)
  --queues N             virtqueues, 1..64 (default 1)
  --queue-workers N      threads serving the queues, queue i on thread i mod N (default: half
                         the host's CPUs, at least 1, at most one per queue); the queues of a
                         thread are polled together, as in one QEMU iothread
  --direct               open the image with O_DIRECT
  --io auto|sync|async|adaptive
                         async: reads and writes on the queue's own I/O threads
                         (VMSHIFT_BLK_IO_THREADS; 8 with --direct, else 2), several requests of a queue in
                         flight; sync: one at a time in the queue's thread; adaptive: inline,
                         except a request with others of its queue there that waits for the
                         device (--direct, writethrough) or misses the page cache (reads are
                         tried inline first); auto (default): adaptive
  --serial ID            GET_ID answer, printable ASCII (default: the image file name)
  --queue-size N         the queue size the front-end uses (QEMU queue-size=N, default 128):
                         seg_max is N - 2
  --metrics tcp:HOST:PORT
                         Prometheus metrics at /metrics: per-queue requests, bytes, errors and
                         requests in flight (label queue), reconnects, dirty-log state
  --print-capabilities   print the back-end capabilities JSON and exit (other arguments ignored)
  --write-descriptor DIR write DIR/50-vmshift-blk.json, the vhost-user descriptor libvirt finds
                         (DIR: /etc/qemu/vhost-user, or $XDG_CONFIG_HOME/qemu/vhost-user), and exit
signals: SIGINT/SIGTERM stop it cleanly; SIGHUP reads the image's size again (online resize)
  and tells the front-end (CONFIG_CHANGE_MSG: QEMU passes the new capacity to the guest).
environment: VMSHIFT_BLK_TRACE=1 is --log-level trace (every vhost-user request logged);
  VMSHIFT_BLK_DELAY_MS=N holds every request N ms and writes "holding head H" / "released head H"
                         to stderr (tests: keeps requests in flight, so a kill can catch one)
exit status: 0 stopped by a signal or the front-end's end, 1 could not serve, 2 bad usage`;

export { BLK_CAPABILITIES } from "./blk-descriptor.js";

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

const blkDef = defineCommand({
  name: "blk",
  usage: BLK_USAGE,
  options: {
    "socket-path": { type: "string" },
    "socket-mode": { type: "string" },
    "socket-group": { type: "string" },
    fd: { type: "integer", min: 0 },
    image: { type: "string" },
    "blk-file": { type: "string" },
    readonly: { type: "boolean" },
    "read-only": { type: "boolean" },
    queues: { type: "integer", default: 1, min: 1, max: 64 },
    "queue-workers": { type: "integer", min: 1, max: 64 },
    direct: { type: "boolean" },
    io: { type: "enum", values: ["auto", "sync", "async", "adaptive"], default: "auto" },
    serial: { type: "string" },
    "queue-size": { type: "integer", min: 4, max: 1024 },
    "write-descriptor": { type: "string" },
    metrics: { type: "string" },
  },
  async run(v, ctx) {
    if (v.writeDescriptor !== undefined) {
      try {
        ctx.out(writeBlkDescriptor(v.writeDescriptor));
        return EXIT_OK;
      } catch (e) {
        ctx.log.error(`--write-descriptor: ${(e as Error).message}`);
        return EXIT_FAILED;
      }
    }
    const image = required(v.image ?? v.blkFile, "image", "FILE");
    exactlyOne({ "socket-path": v.socketPath, fd: v.fd });
    const socket: SocketPathOptions = {};
    try {
      if (v.socketMode !== undefined) socket.mode = parseSocketMode(v.socketMode);
      if (v.socketGroup !== undefined) socket.group = resolveGroup(v.socketGroup);
    } catch (e) {
      throw new UsageError((e as Error).message);
    }
    if ((socket.mode !== undefined || socket.group !== undefined) && v.socketPath === undefined)
      throw new UsageError("--socket-mode and --socket-group need --socket-path");
    const metricsSpec = v.metrics === undefined ? null : parseTcpSpec(v.metrics, "metrics");
    if (v.serial !== undefined && !/^[\x20-\x7e]{0,20}$/.test(v.serial))
      throw new UsageError("--serial must be at most 20 printable ASCII characters (virtio-blk's GET_ID)");
    const log = ctx.log;
    let daemon: VhostUserDaemon;
    let device: ReturnType<typeof blkDevice>;
    try {
      device = blkDevice({
        path: image,
        readonly: v.readonly || v.readOnly,
        queues: v.queues,
        ...(v.queueWorkers !== undefined ? { queueWorkers: v.queueWorkers } : {}),
        direct: v.direct,
        io: v.io,
        ...(v.serial ? { serial: v.serial } : {}),
        ...(v.queueSize !== undefined ? { queueSize: v.queueSize } : {}),
        debugDelayMs: Number(process.env.VMSHIFT_BLK_DELAY_MS ?? 0) || 0,
      });
      daemon = v.socketPath
        ? VhostUserDaemon.listen(device, v.socketPath, socket)
        : VhostUserDaemon.fromFd(device, v.fd as number);
    } catch (e) {
      log.error(`cannot serve ${image}: ${(e as Error).message}`);
      return EXIT_FAILED;
    }
    log.info(
      `serving ${image} (${device.capacitySectors} sectors, ${v.queues} queue(s) on ` +
        `${queueGroups(v.queues, device.info.queueWorkers ?? v.queues).length} thread(s)` +
        `${device.options.readonly ? ", read-only" : ""}${device.options.direct ? ", O_DIRECT" : ""}) on ` +
        `${v.socketPath ?? `fd ${v.fd}`}`,
    );
    let sessions = 0;
    let connected = false;
    let metricsServer: Awaited<ReturnType<Metrics["serve"]>> | null = null;
    const stopping = () => ctx.signal.aborted;
    daemon.on("log", (level, msg) => {
      // Closing the listener fails the pending accept: expected when we are the ones stopping.
      if (stopping() && msg.startsWith("accept failed")) return;
      if (level === "error") log.error(msg);
      else if (level === "warn") log.warn(msg);
      else log.info(msg);
    });
    const trace = process.env.VMSHIFT_BLK_TRACE === "1" || log.isLevelEnabled("trace");
    daemon.on("session", (s: BackendSession) => {
      sessions++;
      connected = true;
      s.closed.then(
        () => {
          connected = false;
        },
        () => {
          connected = false;
        },
      );
      if (trace)
        s.conn.on("request", (m) => {
          const line = describe(m as never);
          if (log.isLevelEnabled("trace")) log.trace(line);
          else log.info(`trace: ${line}`);
        });
    });
    try {
      if (metricsSpec) {
        const m = new Metrics();
        addBlkMetrics(m, {
          queues: () => device.stats(),
          reconnects: () => Math.max(0, sessions - 1),
          connected: () => connected,
          dirtyLogActive: () => daemon.session?.dirtyLog.area != null,
        });
        metricsServer = await m.serve(metricsSpec);
        log.info(`metrics at ${metricsServer.url}/metrics`);
      }
    } catch (e) {
      log.error(`--metrics: ${(e as Error).message}`);
      await daemon.close();
      return EXIT_FAILED;
    }
    const onAbort = () => {
      log.info(`${(ctx.signal.reason as Error)?.message ?? "stopping"}: shutting down`);
      void daemon.close();
    };
    ctx.signal.addEventListener("abort", onAbort, { once: true });
    // SIGHUP: the image may have grown (or shrunk): read its size again and tell the front-end.
    const onHup = () => {
      try {
        const { from, to } = device.resize();
        if (from === to) return log.info(`SIGHUP: capacity unchanged (${to} sectors)`);
        log.info(`SIGHUP: capacity ${from} -> ${to} sectors`);
        const s = daemon.session;
        if (!s) return;
        s.notifyConfigChange().then(
          (r) =>
            log.info(r === "sent" ? "front-end told (CONFIG_CHANGE_MSG)" : "front-end told once a ring runs again"),
          (e: Error) => log.warn(`could not tell the front-end of the new capacity: ${e.message}`),
        );
      } catch (e) {
        log.warn(`SIGHUP: resize failed: ${(e as Error).message}`);
      }
    };
    process.on("SIGHUP", onHup);
    try {
      await daemon.serve();
    } finally {
      process.off("SIGHUP", onHup);
      ctx.signal.removeEventListener("abort", onAbort);
      await daemon.close();
      await metricsServer?.close();
    }
    log.info("stopped");
    // A daemon is stopped by a signal: that is its normal end, not a cancelled job.
    return EXIT_OK;
  },
});

/** `vmshift blk ARGS`. */
export function blkCommand(argv: string[]): Promise<number> {
  // "--print-capabilities": print and exit 0, whatever else is on the command line (the spec's
  // backend program conventions), before any option is parsed or checked.
  if (argv.includes("--print-capabilities")) {
    process.stdout.write(`${JSON.stringify(BLK_CAPABILITIES)}\n`);
    return Promise.resolve(EXIT_OK);
  }
  return blkDef(argv);
}
