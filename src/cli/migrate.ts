/**
 * `vmshift migrate`: migrate a built-in worker-thread workload's memory between two processes
 * (or machines). One side listens (destination), the other connects (source).
 */
import type { Socket } from "node:net";
import { GuestMemory } from "../memory/guest-memory.js";
import { GuestMemoryRegion } from "../memory/region.js";
import { MigrationDestination } from "../migration/destination.js";
import { MigrationError } from "../migration/errors.js";
import type { MigrationEvents } from "../migration/events.js";
import { EVENT_VERSION, type MigrationEvent, type MigrationInfo, MigrationReport } from "../migration/report.js";
import { MigrationSource } from "../migration/source.js";
import {
  acceptEndpoint,
  type ClientTls,
  type ConnectOptions,
  connectEndpoint,
  type Endpoint,
  formatEndpoint,
  type ListenOptions,
  loadPskFile,
  loadX509Credentials,
  MigrationListener,
  parseEndpoint,
  type ServerTls,
} from "../migration/transport.js";
import { Workload } from "../migration/workload.js";
import { Dashboard } from "./dashboard.js";
import { parseTcpSpec } from "./http.js";
import { Metrics } from "./metrics.js";
import { exactlyOne, UsageError } from "./options.js";
import { counted, printable } from "./printable.js";
import { type CommandContext, defineCommand, EXIT_CANCELLED, EXIT_FAILED, EXIT_OK, EXIT_USAGE } from "./runtime.js";

export const MIGRATE_USAGE = `usage:
  vmshift migrate --listen tcp:[HOST]:PORT|unix:PATH|fd:N [--size MiB] [--json]
        destination: receive guest memory, verify it, then run the guest (postcopy: at once).
        tcp::PORT listens on every interface, tcp:HOST:0 on a port the kernel picks; the
        address actually bound is printed (and is the \`listening\` event with --json)
  vmshift migrate --to tcp:HOST:PORT|unix:PATH|fd:N [--size MiB] [--mode precopy|postcopy] [options]
        source: run a workload writing guest memory, migrate it while it runs
  --size MiB                guest memory, 1..65536 (default 64); both sides must use the same
  --mode precopy|postcopy   (default precopy)
  --rate PAGES/s            how fast the workload writes, 0 = as fast as it can (default 20000)
  --pattern sequential|random|hotset
                            where it writes (default random)
  --threads N               writer threads, 1..64 (default 1)
  --downtime MS             precopy: switch over once the predicted downtime is below this
                            (default 300)
  --max-rounds N            precopy rounds before giving up, 1..10000 (default 30)
  --bandwidth MB/s          limit, 0 = none (default 0)
  --postcopy-after N        postcopy: precopy rounds first (default 1)
  --no-preempt              postcopy: no second connection for the pages the destination
                            faults on (the preempt channel)
  --recovery-timeout MS     postcopy: if a connection is lost once the destination runs, both
                            sides pause and the source reconnects for up to this long
                            (default 60000, 0 = fail at once)
  --json                    one versioned JSON event per line on stdout (docs/events.schema.json)
  --metrics tcp:HOST:PORT   Prometheus metrics of the migration at /metrics
  --dashboard tcp:HOST:PORT a live dashboard of the migration (stays up until SIGINT)
security (every connection: main stream, preempt channel, recovery):
  --tls-creds DIR           mutual TLS 1.3 with x509 credentials in QEMU's layout: DIR/ca-cert.pem,
                            and server-cert.pem + server-key.pem (--listen) or client-cert.pem +
                            client-key.pem (--to); each side trusts only certificates of that CA
  --tls-authz NAME          --listen: accept only the client whose certificate's subject CN is NAME
                            (with --tls-psk: only the PSK identity NAME)
  --tls-hostname NAME       --to: the name the destination's certificate must carry (default: the
                            host of --to; required for unix: and fd:)
  --tls-psk FILE            TLS 1.3 with a pre-shared key instead, QEMU's keys.psk format
                            (identity:hexkey per line; --to uses the first line)
  --insecure                allow a plain (unauthenticated, unencrypted) connection beyond
                            loopback; without TLS or this, such a --listen or --to exits 2
exit status: 0 migrated and verified, 1 failed, 2 bad usage, 130 cancelled (SIGINT)`;

const MiB = 1024 * 1024;

interface Security {
  server?: ServerTls;
  client?: ClientTls;
  insecure: boolean;
}

/** The TLS options of one role from the command line; a bad combination or unusable file is a usage error. */
function security(
  role: "source" | "destination",
  v: { tlsCreds?: string; tlsPsk?: string; tlsAuthz?: string; tlsHostname?: string; insecure?: boolean },
): Security {
  const insecure = v.insecure === true;
  const dir = v.tlsCreds;
  const psk = v.tlsPsk;
  const authz = v.tlsAuthz;
  const hostname = v.tlsHostname;
  if (dir !== undefined && psk !== undefined) throw new UsageError("--tls-creds and --tls-psk: choose one");
  if ((dir !== undefined || psk !== undefined) && insecure) throw new UsageError("--insecure with TLS credentials");
  try {
    if (role === "destination") {
      if (hostname !== undefined) throw new UsageError("--tls-hostname is for --to (the source)");
      if (dir !== undefined)
        return { insecure, server: { ...loadX509Credentials(dir, "server"), ...(authz ? { authz } : {}) } };
      if (psk !== undefined)
        return { insecure, server: { kind: "psk", keys: loadPskFile(psk), ...(authz ? { authz } : {}) } };
    } else {
      if (authz !== undefined) throw new UsageError("--tls-authz is for --listen (the destination)");
      if (dir !== undefined)
        return { insecure, client: { ...loadX509Credentials(dir, "client"), ...(hostname ? { hostname } : {}) } };
      if (psk !== undefined) {
        const [identity, key] = [...loadPskFile(psk)][0] as [string, Buffer];
        return { insecure, client: { kind: "psk", identity, key } };
      }
    }
  } catch (e) {
    if (e instanceof UsageError) throw e;
    throw new UsageError(`TLS credentials: ${(e as Error).message}`);
  }
  if (authz !== undefined || hostname !== undefined)
    throw new UsageError("--tls-authz/--tls-hostname need --tls-creds (or --tls-psk for --tls-authz)");
  return { insecure };
}

function endpointOption(name: string, s: string): Endpoint {
  try {
    const ep = parseEndpoint(s);
    // QEMU's tcp::PORT: every interface (parseEndpoint defaults an empty host to loopback).
    if (ep.kind === "tcp" && /^tcp::\d+$/.test(s)) return { ...ep, host: name === "listen" ? "::" : "127.0.0.1" };
    return ep;
  } catch (e) {
    throw new UsageError(`--${name}: ${(e as Error).message}`);
  }
}

/** Listens; `::` (every interface, both families) falls back to 0.0.0.0 where IPv6 is off. */
async function listenAll(ep: Endpoint, o: ListenOptions): Promise<MigrationListener> {
  try {
    return await MigrationListener.listen(ep, o);
  } catch (e) {
    const code = (e as NodeJS.ErrnoException).code;
    if (ep.kind === "tcp" && ep.host === "::" && (code === "EAFNOSUPPORT" || code === "EADDRNOTAVAIL"))
      return MigrationListener.listen({ ...ep, host: "0.0.0.0" }, o);
    throw e;
  }
}

/** `tcp:ADDRESS:PORT` of what a listener actually bound. */
function boundEndpoint(l: MigrationListener): string {
  const ep = l.endpoint;
  if (ep.kind !== "tcp") return formatEndpoint(ep);
  const host = ep.host.includes(":") ? `[${ep.host}]` : ep.host;
  return `tcp:${host}:${ep.port}`;
}

/** A connect that says CONNECTION_REFUSED when nobody listens (not "connection lost"). */
async function connect(ep: Endpoint, o: ConnectOptions): Promise<Socket> {
  try {
    return await connectEndpoint(ep, o);
  } catch (e) {
    if (e instanceof MigrationError && /ECONNREFUSED|ENOENT/.test(e.message))
      throw new MigrationError("CONNECTION_REFUSED", e.message, undefined, e.details);
    throw e;
  }
}

/** Human lines on stderr (progress on a terminal only), versioned JSON lines on stdout. */
function reporter(
  ctx: CommandContext,
  json: boolean,
  role: "source" | "destination",
  publish: (e: MigrationEvent) => void,
): (e: MigrationEvent) => void {
  return (e) => {
    publish(e);
    if (json) {
      ctx.json(e);
      return;
    }
    const i = "info" in e ? (e.info as MigrationInfo) : null;
    switch (e.event) {
      case "phase":
        ctx.progress.done();
        ctx.log.info(`${role}: ${e.phase}`);
        break;
      case "round": {
        const r = e.round;
        const line =
          `${role}: round ${r.round}: ${(r.bytes / MiB).toFixed(1)} MiB at ${(r.bandwidth / 1e6).toFixed(0)} MB/s, ` +
          `dirty ${(r.dirtyRate / MiB).toFixed(0)} MiB/s, remaining ${(r.remainingBytes / MiB).toFixed(1)} MiB, ` +
          `predicted downtime ${r.predictedDowntimeMs === null ? "-" : `${r.predictedDowntimeMs} ms`}`;
        if (ctx.progress.enabled) ctx.progress.update(line);
        else ctx.log.debug(line);
        break;
      }
      case "complete": {
        ctx.progress.done();
        const rounds = counted(e.result.rounds, "round");
        const bytes = `${((i?.ram.transferredBytes ?? 0) / MiB).toFixed(1)} MiB ${role === "source" ? "sent" : "received"}`;
        const dt = i?.downtimeMs !== null && i?.downtimeMs !== undefined ? `, downtime ${i.downtimeMs} ms` : "";
        ctx.log.info(
          `${role}: done in ${i?.totalTimeMs ?? 0} ms, ${rounds}, ${bytes}${dt}, digests ${e.result.verified ? "match" : "DIFFER"}`,
        );
        break;
      }
      case "failed":
        ctx.progress.done();
        // The message may quote the peer (PEER_FAILED carries its FAIL text): escaped, bounded.
        ctx.log.error(
          { code: printable(e.code), offset: e.offset },
          `${role}: migration failed: ${printable(e.code)}: ${printable(e.message)}`,
        );
        break;
      case "cancelled":
        ctx.progress.done();
        ctx.log.warn(`${role}: cancelled (${e.reason})`);
        break;
    }
  };
}

export const migrateCommand = defineCommand({
  name: "migrate",
  usage: MIGRATE_USAGE,
  options: {
    listen: { type: "string" },
    to: { type: "string" },
    size: { type: "integer", default: 64, min: 1, max: 65536, unit: "MiB" },
    mode: { type: "enum", values: ["precopy", "postcopy"], default: "precopy" },
    rate: { type: "integer", default: 20_000, min: 0, unit: "pages/s" },
    pattern: { type: "enum", values: ["sequential", "random", "hotset"], default: "random" },
    threads: { type: "integer", default: 1, min: 1, max: 64 },
    downtime: { type: "number", default: 300, min: 0, unit: "ms" },
    "max-rounds": { type: "integer", default: 30, min: 1, max: 10_000 },
    bandwidth: { type: "number", default: 0, min: 0, unit: "MB/s" },
    "postcopy-after": { type: "integer", default: 1, min: 0, max: 10_000 },
    "no-preempt": { type: "boolean" },
    "recovery-timeout": { type: "integer", default: 60_000, min: 0, unit: "ms" },
    json: { type: "boolean" },
    metrics: { type: "string" },
    dashboard: { type: "string" },
    "tls-creds": { type: "string" },
    "tls-psk": { type: "string" },
    "tls-authz": { type: "string" },
    "tls-hostname": { type: "string" },
    insecure: { type: "boolean" },
  },
  async run(v, ctx) {
    const role = exactlyOne({ listen: v.listen, to: v.to }) === "listen" ? "destination" : "source";
    const ep =
      role === "destination" ? endpointOption("listen", v.listen as string) : endpointOption("to", v.to as string);
    const metricsSpec = v.metrics === undefined ? null : parseTcpSpec(v.metrics, "metrics");
    const dashboardSpec = v.dashboard === undefined ? null : parseTcpSpec(v.dashboard, "dashboard");
    const sec = security(role, v);
    const tlsListen: ListenOptions = { ...(sec.server ? { tls: sec.server } : {}), insecure: sec.insecure };
    const conn: ConnectOptions = { ...(sec.client ? { tls: sec.client } : {}), insecure: sec.insecure };
    const t0 = performance.now();
    const event = (e: Record<string, unknown>) => {
      if (v.json)
        ctx.json({ event: e.event, version: EVENT_VERSION, t: Math.round((performance.now() - t0) * 10) / 10, ...e });
    };
    let report: MigrationReport | null = null;
    let dashboard: Dashboard | null = null;
    let metricsServer: Awaited<ReturnType<Metrics["serve"]>> | null = null;
    const memory = new GuestMemory([GuestMemoryRegion.memfd(0, v.size * MiB, { name: "vmshift-migrate" })]);
    let workload: Workload | null = null;
    let listener: MigrationListener | null = null;
    const streams: Socket[] = [];
    /** Ends a run that never got a report (cancelled or failed before the migration began). */
    const endEarly = (e: unknown): number => {
      if (ctx.signal.aborted) {
        event({ event: "cancelled", role, reason: String((ctx.signal.reason as Error).message) });
        ctx.log.warn(`${role}: cancelled`);
        return EXIT_CANCELLED;
      }
      const err = e as { code?: unknown; message?: unknown; offset?: unknown };
      const code = typeof err?.code === "string" ? err.code : "ERROR";
      event({ event: "failed", role, code, message: String(err?.message ?? e), offset: null });
      ctx.log.error(
        { code: printable(code) },
        `${role}: migration failed: ${printable(code)}: ${printable(err?.message ?? e)}`,
      );
      // Refused by policy before anything was sent (plain TCP beyond loopback): the command line must change.
      return e instanceof MigrationError && e.code === "INSECURE" ? EXIT_USAGE : EXIT_FAILED;
    };
    const cancelled = new Promise<never>((_, rej) => {
      if (ctx.signal.aborted) rej(ctx.signal.reason);
      ctx.signal.addEventListener("abort", () => rej(ctx.signal.reason), { once: true });
    });
    cancelled.catch(() => undefined);
    const watch = (events: MigrationEvents) => {
      report = new MigrationReport({
        role,
        mode: v.mode,
        events,
        totalBytes: memory.size,
        transferred: () => streams.reduce((n, s) => n + (role === "source" ? s.bytesWritten : s.bytesRead), 0),
        emit: reporter(ctx, v.json, role, (e) => dashboard?.publish(e)),
        t0,
        signal: ctx.signal,
      });
    };
    try {
      if (metricsSpec) {
        const m = new Metrics();
        m.addMigration(() => (report as MigrationReport | null)?.info() ?? null);
        metricsServer = await m.serve(metricsSpec);
        ctx.log.info(`metrics at ${metricsServer.url}/metrics`);
        event({ event: "metrics", url: `${metricsServer.url}/metrics` });
      }
      if (dashboardSpec) {
        dashboard = await Dashboard.serve(dashboardSpec);
        ctx.log.info(`dashboard at ${dashboard.url}`);
        event({ event: "dashboard", url: dashboard.url });
      }
      let ok: boolean;
      if (role === "destination") {
        let stream: Socket;
        if (ep.kind === "fd") stream = await acceptEndpoint(ep, tlsListen);
        else {
          listener = await listenAll(ep, tlsListen);
          const bound = boundEndpoint(listener);
          ctx.log.info(`listening on ${bound}`);
          event({ event: "listening", role, endpoint: bound });
          stream = await Promise.race([listener.accept("main"), cancelled]);
        }
        streams.push(stream);
        const l = listener;
        const dest = new MigrationDestination({
          memory,
          // A postcopy source may open a second connection (the preempt channel), and after a
          // lost connection, a new one (recovery).
          ...(l
            ? {
                acceptPreempt: async () => {
                  const s = await l.accept("preempt");
                  streams.push(s);
                  return s;
                },
                postcopyRecovery: {
                  accept: async () => {
                    const s = await l.accept("recover");
                    streams.push(s);
                    return s;
                  },
                  timeoutMs: v.recoveryTimeout || 60_000,
                },
              }
            : {}),
          signal: ctx.signal,
          hooks: {
            // The guest runs here now: a reader that touches its memory (postcopy: faults it in).
            resume: async () => {
              workload = await Workload.start({ memory, mode: "touch", pattern: v.pattern, threads: 1 });
            },
          },
        });
        watch(dest.events);
        const r = await dest.run(stream);
        ok = r.digests.every((d) => d.match);
      } else {
        workload = await Workload.start({ memory, pattern: v.pattern, pagesPerSecond: v.rate, threads: v.threads });
        const canReconnect = v.mode === "postcopy" && ep.kind !== "fd" && v.recoveryTimeout > 0;
        const stream = await Promise.race([connect(ep, conn), cancelled]);
        streams.push(stream);
        const preempt = v.mode === "postcopy" && ep.kind !== "fd" && !v.noPreempt ? await connect(ep, conn) : undefined;
        if (preempt) streams.push(preempt);
        const source = new MigrationSource({
          memory,
          mode: v.mode,
          hooks: workload.sourceHooks(),
          downtimeLimitMs: v.downtime,
          maxRounds: v.maxRounds,
          bandwidthLimit: v.bandwidth * 1e6,
          postcopyAfterRounds: v.postcopyAfter,
          signal: ctx.signal,
          ...(canReconnect
            ? {
                postcopyRecovery: {
                  reconnect: async () => {
                    const s = await connect(ep, conn);
                    streams.push(s);
                    return s;
                  },
                  timeoutMs: v.recoveryTimeout,
                },
              }
            : {}),
        });
        watch(source.events);
        const r = await source.run(stream, { preempt });
        ok = r.digests.every((d) => d.match);
      }
      if (dashboard && !ctx.signal.aborted) {
        ctx.log.info(`migration over; dashboard still at ${dashboard.url} until SIGINT`);
        await new Promise((r) => ctx.signal.addEventListener("abort", r, { once: true }));
      }
      return ok ? EXIT_OK : EXIT_FAILED;
    } catch (e) {
      const rep = report as MigrationReport | null;
      if (!rep) return endEarly(e);
      // The report already said it (failed, or cancelled when the abort caused the failure).
      if (!rep.ended) rep.failed(e);
      return ctx.signal.aborted ? EXIT_CANCELLED : EXIT_FAILED;
    } finally {
      for (const s of streams) s.destroy();
      await listener?.close();
      await (workload as Workload | null)?.close();
      memory.close();
      await dashboard?.close();
      await metricsServer?.close();
    }
  },
});
