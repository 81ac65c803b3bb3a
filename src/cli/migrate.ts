/**
 * `vmshift migrate`: migrate a built-in worker-thread workload's memory between two processes
 * (or machines). One side listens (destination), the other connects (source).
 */
import { parseArgs } from "node:util";
import { GuestMemory } from "../memory/guest-memory.js";
import { GuestMemoryRegion } from "../memory/region.js";
import { MigrationDestination } from "../migration/destination.js";
import { MigrationError } from "../migration/errors.js";
import type { MigrationEvents } from "../migration/events.js";
import { MigrationSource } from "../migration/source.js";
import {
  acceptEndpoint,
  type ClientTls,
  connectEndpoint,
  formatEndpoint,
  loadPskFile,
  loadX509Credentials,
  MigrationListener,
  parseEndpoint,
  type ServerTls,
} from "../migration/transport.js";
import { Workload } from "../migration/workload.js";
import { printable, safeJson } from "./printable.js";

export const MIGRATE_USAGE = `usage:
  vmshift migrate --listen tcp:[HOST:]PORT|unix:PATH|fd:N [--size MiB] [--json]
        [--tls-creds DIR [--tls-authz NAME] | --tls-psk FILE [--tls-authz NAME] | --insecure]
        destination: receive guest memory, verify it, then run the guest (postcopy: at once)
  vmshift migrate --to tcp:HOST:PORT|unix:PATH|fd:N [--size MiB] [--mode precopy|postcopy]
        [--rate PAGES/s] [--pattern sequential|random|hotset] [--threads N]
        [--downtime MS] [--max-rounds N] [--bandwidth MB/s] [--postcopy-after N]
        [--no-preempt] [--recovery-timeout MS] [--json]
        [--tls-creds DIR [--tls-hostname NAME] | --tls-psk FILE | --insecure]
        source: run a workload writing guest memory, migrate it while it runs
        (postcopy over tcp: or unix: opens a second connection for the pages the destination
        faults on, the preempt channel, unless --no-preempt; and if a connection is lost once
        the destination runs, both sides pause and the source reconnects for up to
        --recovery-timeout ms, default 60000, 0 = fail at once)
  Security (every connection: main stream, preempt channel, recovery):
    --tls-creds DIR     mutual TLS 1.3 with x509 credentials in QEMU's layout: DIR/ca-cert.pem,
                        and server-cert.pem + server-key.pem (--listen) or client-cert.pem +
                        client-key.pem (--to); each side trusts only certificates of that CA
    --tls-authz NAME    --listen: accept only the client whose certificate's subject CN is NAME
                        (with --tls-psk: only the PSK identity NAME)
    --tls-hostname NAME --to: the name the destination's certificate must carry (default: the
                        host of --to; required for unix: and fd:)
    --tls-psk FILE      TLS 1.3 with a pre-shared key instead, QEMU's keys.psk format
                        (identity:hexkey per line; --to uses the first line)
    --insecure          allow a plain (unauthenticated, unencrypted) connection beyond loopback;
                        without TLS or this, such a --listen or --to exits with status 2
  Both sides must use the same --size. --json prints one JSON object per event on stdout.`;

interface Security {
  server?: ServerTls;
  client?: ClientTls;
  insecure: boolean;
}

/** The TLS options of both roles, from the command line (throws AUTH_FAILED on unusable files). */
function security(values: {
  listen?: string;
  "tls-creds"?: string;
  "tls-psk"?: string;
  "tls-authz"?: string;
  "tls-hostname"?: string;
  insecure?: boolean;
}): Security {
  const insecure = values.insecure ?? false;
  const dir = values["tls-creds"];
  const psk = values["tls-psk"];
  if (dir !== undefined && psk !== undefined) throw new RangeError("--tls-creds and --tls-psk: choose one");
  if ((dir !== undefined || psk !== undefined) && insecure) throw new RangeError("--insecure with TLS credentials");
  const authz = values["tls-authz"];
  const hostname = values["tls-hostname"];
  if (values.listen !== undefined) {
    if (hostname !== undefined) throw new RangeError("--tls-hostname is for --to (the source)");
    if (dir !== undefined)
      return { insecure, server: { ...loadX509Credentials(dir, "server"), ...(authz ? { authz } : {}) } };
    if (psk !== undefined)
      return { insecure, server: { kind: "psk", keys: loadPskFile(psk), ...(authz ? { authz } : {}) } };
  } else {
    if (authz !== undefined) throw new RangeError("--tls-authz is for --listen (the destination)");
    if (dir !== undefined)
      return { insecure, client: { ...loadX509Credentials(dir, "client"), ...(hostname ? { hostname } : {}) } };
    if (psk !== undefined) {
      const [identity, key] = [...loadPskFile(psk)][0] as [string, Buffer];
      return { insecure, client: { kind: "psk", identity, key } };
    }
  }
  if (authz !== undefined || hostname !== undefined)
    throw new RangeError("--tls-authz/--tls-hostname need --tls-creds");
  return { insecure };
}

function memoryOf(sizeMiB: number): GuestMemory {
  return new GuestMemory([GuestMemoryRegion.memfd(0, sizeMiB * 1024 * 1024, { name: "vmshift-migrate" })]);
}

function report(events: MigrationEvents, json: boolean, role: string): void {
  const t0 = performance.now();
  const line = (o: Record<string, unknown>) => {
    if (json) process.stdout.write(`${safeJson({ role, t: +(performance.now() - t0).toFixed(1), ...o })}\n`);
  };
  events.on("phase", (p) => {
    line({ event: "phase", ...p });
    if (!json) process.stderr.write(`\n${role}: ${p.phase}`);
  });
  events.on("round", (r) => {
    line({ event: "round", ...r });
    if (!json)
      process.stderr.write(
        `\r${role}: round ${r.round}: sent ${(r.bytesSent / 2 ** 20).toFixed(1)} MiB at ${(r.bandwidth / 1e6).toFixed(0)} MB/s, ` +
          `remaining ${(r.remainingBytes / 2 ** 20).toFixed(1)} MiB, predicted downtime ${r.predictedDowntimeMs.toFixed(1)} ms   `,
      );
  });
  events.on("throttle", (t) => line({ event: "throttle", ...t }));
  events.on("faults", (f) => line({ event: "faults", ...f }));
  events.on("complete", (r) => {
    const { roundStats: _r, ...rest } = r;
    line({ event: "complete", ...rest });
    if (!json)
      process.stderr.write(
        `\n${role}: done in ${r.totalMs.toFixed(0)} ms, ${r.rounds} rounds, downtime ${r.downtimeMs.toFixed(1)} ms, ` +
          `digests ${r.digests.every((d) => d.match) ? "match" : "DIFFER"}\n`,
      );
  });
  events.on("failed", (e) => line({ event: "failed", error: e.message, code: (e as { code?: string }).code }));
}

export async function migrateCommand(argv: string[]): Promise<number> {
  const { values } = parseArgs({
    args: argv,
    options: {
      listen: { type: "string" },
      to: { type: "string" },
      size: { type: "string", default: "64" },
      mode: { type: "string", default: "precopy" },
      rate: { type: "string", default: "20000" },
      pattern: { type: "string", default: "random" },
      threads: { type: "string", default: "1" },
      downtime: { type: "string", default: "300" },
      "max-rounds": { type: "string", default: "30" },
      bandwidth: { type: "string", default: "0" },
      "postcopy-after": { type: "string", default: "1" },
      "no-preempt": { type: "boolean", default: false },
      "recovery-timeout": { type: "string", default: "60000" },
      json: { type: "boolean", default: false },
      "tls-creds": { type: "string" },
      "tls-psk": { type: "string" },
      "tls-authz": { type: "string" },
      "tls-hostname": { type: "string" },
      insecure: { type: "boolean", default: false },
    },
  });
  const size = Number(values.size);
  if (!Number.isInteger(size) || size < 1) throw new RangeError("--size must be a positive integer (MiB)");
  if ((values.listen === undefined) === (values.to === undefined)) {
    process.stderr.write(`${MIGRATE_USAGE}\n`);
    return 2;
  }
  const mode = values.mode === "postcopy" ? "postcopy" : "precopy";
  const pattern = values.pattern as "sequential" | "random" | "hotset";
  if (!["sequential", "random", "hotset"].includes(pattern))
    throw new RangeError("--pattern: sequential|random|hotset");
  const recoveryMs = Number(values["recovery-timeout"]);
  if (!Number.isFinite(recoveryMs) || recoveryMs < 0) throw new RangeError("--recovery-timeout must be >= 0 (ms)");
  let sec: Security;
  try {
    sec = security(values);
  } catch (e) {
    process.stderr.write(`vmshift migrate: ${(e as Error).message}\n`);
    return 2;
  }
  const memory = memoryOf(size);
  let workload: Workload | null = null;
  try {
    if (values.listen !== undefined) {
      const ep = parseEndpoint(values.listen);
      let stream: import("node:net").Socket;
      let listener: MigrationListener | null = null;
      const tlsListen = { ...(sec.server ? { tls: sec.server } : {}), insecure: sec.insecure };
      if (ep.kind === "fd") stream = await acceptEndpoint(ep, tlsListen);
      else {
        listener = await MigrationListener.listen(ep, tlsListen);
        process.stderr.write(`listening on ${formatEndpoint(listener.endpoint)}\n`);
        stream = await listener.accept();
      }
      const l = listener;
      const dest = new MigrationDestination({
        memory,
        // A postcopy source may open a second connection (the preempt channel), and after a
        // lost connection, a new one (recovery).
        ...(l
          ? {
              acceptPreempt: () => l.accept("preempt"),
              postcopyRecovery: { accept: () => l.accept("recover"), timeoutMs: recoveryMs || 60_000 },
            }
          : {}),
        hooks: {
          // The guest runs here now: a reader that touches its memory (postcopy: faults it in).
          resume: async () => {
            workload = await Workload.start({ memory, mode: "touch", pattern, threads: 1 });
          },
        },
      });
      report(dest.events, values.json, "destination");
      try {
        await dest.run(stream);
      } finally {
        await l?.close();
      }
      return 0;
    }
    const to = parseEndpoint(values.to as string);
    const conn = { ...(sec.client ? { tls: sec.client } : {}), insecure: sec.insecure };
    // Refused before the workload starts: a plain connection beyond loopback, bad credentials.
    const stream = await connectEndpoint(to, conn);
    workload = await Workload.start({
      memory,
      pattern,
      pagesPerSecond: Number(values.rate),
      threads: Number(values.threads),
    });
    const canReconnect = mode === "postcopy" && to.kind !== "fd" && recoveryMs > 0;
    const preempt =
      mode === "postcopy" && to.kind !== "fd" && !values["no-preempt"] ? await connectEndpoint(to, conn) : undefined;
    const source = new MigrationSource({
      memory,
      mode,
      hooks: workload.sourceHooks(),
      downtimeLimitMs: Number(values.downtime),
      maxRounds: Number(values["max-rounds"]),
      bandwidthLimit: Number(values.bandwidth) * 1e6,
      postcopyAfterRounds: Number(values["postcopy-after"]),
      ...(canReconnect
        ? { postcopyRecovery: { reconnect: () => connectEndpoint(to, conn), timeoutMs: recoveryMs } }
        : {}),
    });
    report(source.events, values.json, "source");
    await source.run(stream, { preempt });
    return 0;
  } catch (e) {
    const err = e as { code?: string; message?: string };
    // The message may quote the peer (PEER_FAILED carries its FAIL text): escaped, bounded.
    if (values.json) process.stdout.write(`${safeJson({ event: "error", code: err.code, message: err.message })}\n`);
    else process.stderr.write(`\nmigration failed: ${printable(err.code ?? "")} ${printable(err.message)}\n`);
    // Refused by policy before anything was sent: the command line is what must change.
    return e instanceof MigrationError && e.code === "INSECURE" ? 2 : 1;
  } finally {
    await (workload as Workload | null)?.close();
    memory.close();
  }
}
