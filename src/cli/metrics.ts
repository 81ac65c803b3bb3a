/**
 * Prometheus metrics (prom-client), served by `--metrics tcp:HOST:PORT` at /metrics. Every
 * name starts with `vmshift_`. Values are read when Prometheus scrapes: the migration's from
 * its MigrationReport (what query-migrate would say), a blk back-end's from the counters its
 * queue threads keep in shared memory.
 */
import { Counter, collectDefaultMetrics, Gauge, Registry } from "prom-client";
import type { MigrationInfo } from "../migration/report.js";
import { type HttpService, serveHttp, type TcpSpec } from "./http.js";

export class Metrics {
  readonly registry = new Registry();

  constructor(opts: { process?: boolean } = {}) {
    if (opts.process ?? true) collectDefaultMetrics({ register: this.registry, prefix: "vmshift_" });
  }

  /** Serves /metrics (and nothing else) until closed. */
  serve(spec: TcpSpec): Promise<HttpService> {
    return serveHttp(spec, (req, res) => {
      if (req.method !== "GET" || (req.url ?? "").split("?")[0] !== "/metrics") {
        res.writeHead(404, { "content-type": "text/plain" }).end("try /metrics\n");
        return;
      }
      this.registry.metrics().then(
        (text) => res.writeHead(200, { "content-type": this.registry.contentType }).end(text),
        (e: Error) => res.writeHead(500, { "content-type": "text/plain" }).end(`${e.message}\n`),
      );
    });
  }

  /** The gauges of a migration, read from `info()` at each scrape. */
  addMigration(info: () => MigrationInfo | null): void {
    const r = this.registry;
    const gauge = (name: string, help: string, value: (i: MigrationInfo) => number | null) =>
      new Gauge({
        name: `vmshift_migration_${name}`,
        help,
        registers: [r],
        collect() {
          const i = info();
          const v = i ? value(i) : null;
          if (v === null) this.reset();
          else this.set(v);
        },
      });
    gauge("ram_total_bytes", "Guest memory size", (i) => i.ram.totalBytes);
    gauge(
      "ram_transferred_bytes",
      "Bytes on the wire so far (source: sent, destination: received)",
      (i) => i.ram.transferredBytes,
    );
    gauge("ram_remaining_bytes", "Dirty bytes not yet sent, as of the last sync", (i) => i.ram.remainingBytes);
    gauge("ram_normal_pages", "Pages sent with data", (i) => i.ram.normalPages);
    gauge("ram_zero_pages", "Pages sent as zero flags", (i) => i.ram.zeroPages);
    gauge("dirty_sync_count", "Dirty syncs so far", (i) => i.ram.dirtySyncCount);
    gauge("dirty_pages_rate", "Pages per second the writers dirtied in the last round", (i) => i.ram.dirtyPagesRate);
    gauge("bandwidth_bits_per_second", "Bandwidth of the last round", (i) => i.ram.mbps * 1e6);
    gauge("postcopy_requests", "Pages the destination asked for", (i) => i.ram.postcopyRequests);
    gauge("rounds", "Precopy rounds so far", (i) => i.rounds);
    gauge("expected_downtime_seconds", "Remaining bytes over the last round's bandwidth", (i) =>
      i.expectedDowntimeMs === null ? null : i.expectedDowntimeMs / 1000,
    );
    gauge("setup_time_seconds", "Start to the first round", (i) =>
      i.setupTimeMs === null ? null : i.setupTimeMs / 1000,
    );
    gauge("downtime_seconds", "Writers stopped until the destination ran", (i) =>
      i.downtimeMs === null ? null : i.downtimeMs / 1000,
    );
    gauge("total_time_seconds", "Since the start", (i) => i.totalTimeMs / 1000);
    gauge("writer_stall_seconds", "Writers blocked by throttling or write faults", (i) => i.writerStallMs / 1000);
    gauge("sync_seconds_per_gib", "Cost of the last dirty sync per GiB of guest memory", (i) =>
      i.syncMsPerGiB === null ? null : i.syncMsPerGiB / 1000,
    );
    gauge("throttle_level", "Auto-converge throttle level", (i) => i.throttle);
    gauge("remote_fault_latency_median_seconds", "Postcopy remote-fault latency, median", (i) =>
      i.remoteFaultLatencyUs ? i.remoteFaultLatencyUs.median / 1e6 : null,
    );
    gauge("remote_fault_latency_p99_seconds", "Postcopy remote-fault latency, 99th percentile", (i) =>
      i.remoteFaultLatencyUs ? i.remoteFaultLatencyUs.p99 / 1e6 : null,
    );
    const statuses = [
      "setup",
      "active",
      "device",
      "postcopy-active",
      "postcopy-paused",
      "completed",
      "failed",
      "cancelled",
    ];
    new Gauge({
      name: "vmshift_migration_status",
      help: "1 for the migration's current status (QEMU's names), 0 for the others",
      labelNames: ["status"],
      registers: [r],
      collect() {
        const s = info()?.status;
        for (const st of statuses) this.set({ status: st }, s === st ? 1 : 0);
      },
    });
  }
}

/** One queue's counters, as a blk back-end's queue thread keeps them. */
export interface QueueCounters {
  queue: number;
  reads: number;
  writes: number;
  flushes: number;
  others: number;
  readBytes: number;
  writeBytes: number;
  errors: number;
  inFlight: number;
  /** Requests whose transfer ran on the queue's I/O threads rather than inline (absent: not counted). */
  pooled?: number;
}

export interface BlkState {
  queues(): QueueCounters[];
  /** Front-end connections after the first. */
  reconnects(): number;
  /** Sessions so far (connected front-ends, including the current one). */
  connected(): boolean;
  /** A dirty log is set (VHOST_F_LOG_ALL: the front-end is migrating). */
  dirtyLogActive(): boolean;
}

/** Per-queue request, byte, error and in-flight counters of a blk back-end, labelled `queue`. */
export function addBlkMetrics(m: Metrics, state: BlkState): void {
  const r = m.registry;
  const counter = (name: string, help: string, labelNames: string[], fill: (c: Counter, q: QueueCounters) => void) =>
    new Counter({
      name: `vmshift_blk_${name}`,
      help,
      labelNames,
      registers: [r],
      collect() {
        this.reset();
        for (const q of state.queues()) fill(this, q);
      },
    });
  counter("requests_total", "Requests completed, by queue and type", ["queue", "type"], (c, q) => {
    const queue = String(q.queue);
    c.inc({ queue, type: "read" }, q.reads);
    c.inc({ queue, type: "write" }, q.writes);
    c.inc({ queue, type: "flush" }, q.flushes);
    c.inc({ queue, type: "other" }, q.others);
  });
  counter("bytes_total", "Bytes read from and written to the image, by queue", ["queue", "direction"], (c, q) => {
    c.inc({ queue: String(q.queue), direction: "read" }, q.readBytes);
    c.inc({ queue: String(q.queue), direction: "write" }, q.writeBytes);
  });
  counter("errors_total", "Requests completed with an error status, by queue", ["queue"], (c, q) =>
    c.inc({ queue: String(q.queue) }, q.errors),
  );
  counter(
    "pooled_total",
    "Requests whose read or write ran on the queue's I/O threads instead of inline, by queue",
    ["queue"],
    (c, q) => c.inc({ queue: String(q.queue) }, q.pooled ?? 0),
  );
  new Gauge({
    name: "vmshift_blk_in_flight",
    help: "Requests taken from the queue and not yet completed",
    labelNames: ["queue"],
    registers: [r],
    collect() {
      this.reset();
      for (const q of state.queues()) this.set({ queue: String(q.queue) }, q.inFlight);
    },
  });
  new Counter({
    name: "vmshift_vhost_user_reconnects_total",
    help: "Front-end connections after the first",
    registers: [r],
    collect() {
      this.reset();
      this.inc(state.reconnects());
    },
  });
  new Gauge({
    name: "vmshift_vhost_user_connected",
    help: "1 while a front-end is connected",
    registers: [r],
    collect() {
      this.set(state.connected() ? 1 : 0);
    },
  });
  new Gauge({
    name: "vmshift_vhost_user_dirty_log_active",
    help: "1 while the front-end has a dirty log set (it is migrating)",
    registers: [r],
    collect() {
      this.set(state.dirtyLogActive() ? 1 : 0);
    },
  });
}
