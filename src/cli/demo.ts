/**
 * `vmshift demo`: its options, and what the command adds around runVmDemo / runMemoryDemo:
 * the live dashboard, metrics, cancel on SIGINT.
 */
import type { MigrationInfo } from "../migration/report.js";
import { Dashboard } from "./dashboard.js";
import { runMemoryDemo } from "./demo-memory.js";
import { runVmDemo } from "./demo-vm.js";
import { parseTcpSpec } from "./http.js";
import { Metrics } from "./metrics.js";
import { defineCommand, EXIT_CANCELLED, EXIT_FAILED, EXIT_OK } from "./runtime.js";

export const DEMO_USAGE = `usage: vmshift demo [options]
  boot a micro-VM (KVM, 2 vCPUs by default) and live-migrate it while it runs to a second
  process; checks memory digests and that each vCPU's counter continues there (no KVM: a
  worker-thread workload's memory, and it says so)
  --size MiB               guest memory, 16..4096 (default 256)
  --vcpus N                vCPUs, 1..8 (default 2)
  --dirty-rate MiB/s       how fast the guest dirties memory, 0 = as fast as it can (default 64)
  --mode precopy|postcopy  (default precopy)
  --dirty-tracking bitmap|ring
                           KVM's dirty bitmap or dirty rings (default bitmap)
  --json                   one versioned JSON event per line on stdout (docs/events.schema.json)
  --dashboard tcp:HOST:PORT
                           serve a live dashboard of the migration there (port 0: any free port;
                           tcp::PORT: every interface); it stays up after the migration until
                           SIGINT
  --dashboard-wait         start migrating only once a browser has the dashboard open
  --metrics tcp:HOST:PORT  serve Prometheus metrics of the migration at /metrics
  --bandwidth MB/s         limit the migration's bandwidth (default 0: unlimited)
  --timeout MS             give up after this long (default 60000)
usage: vmshift demo --memory-only [--size MiB] [--rounds N] [--json]
  the memory layer alone: every dirty-tracking source the machine offers, in-process
exit status: 0 verified, 1 failed or not verified, 2 bad usage, 130 cancelled (SIGINT)`;

export const demoCommand = defineCommand({
  name: "demo",
  usage: DEMO_USAGE,
  options: {
    size: { type: "integer", default: 256, min: 16, max: 4096, unit: "MiB" },
    "dirty-rate": { type: "number", default: 64, min: 0, unit: "MiB/s" },
    mode: { type: "enum", values: ["precopy", "postcopy"], default: "precopy" },
    "dirty-tracking": { type: "enum", values: ["bitmap", "ring"], default: "bitmap" },
    vcpus: { type: "integer", default: 2, min: 1, max: 8 },
    "memory-only": { type: "boolean" },
    rounds: { type: "integer", default: 10, min: 1, max: 1000 },
    json: { type: "boolean" },
    dashboard: { type: "string" },
    "dashboard-wait": { type: "boolean" },
    metrics: { type: "string" },
    bandwidth: { type: "number", default: 0, min: 0, unit: "MB/s" },
    timeout: { type: "integer", default: 60_000, min: 1000, unit: "ms" },
  },
  async run(v, ctx) {
    const dashboardSpec = v.dashboard === undefined ? null : parseTcpSpec(v.dashboard, "dashboard");
    const metricsSpec = v.metrics === undefined ? null : parseTcpSpec(v.metrics, "metrics");
    if (v.memoryOnly) {
      const r = await runMemoryDemo({
        sizeMiB: v.size,
        maxRounds: v.rounds,
        json: v.json,
        convergePages: 64,
        out: ctx.out,
      });
      return r.verified ? EXIT_OK : EXIT_FAILED;
    }
    let dashboard: Dashboard | null = null;
    let metricsServer: Awaited<ReturnType<Metrics["serve"]>> | null = null;
    let info: MigrationInfo | null = null;
    try {
      if (dashboardSpec) {
        dashboard = await Dashboard.serve(dashboardSpec);
        ctx.log.info({ url: dashboard.url }, `dashboard at ${dashboard.url}`);
        if (v.json) ctx.json({ event: "dashboard", version: 1, t: 0, url: dashboard.url });
      }
      if (metricsSpec) {
        const m = new Metrics();
        m.addMigration(() => info);
        metricsServer = await m.serve(metricsSpec);
        ctx.log.info({ url: `${metricsServer.url}/metrics` }, `metrics at ${metricsServer.url}/metrics`);
        if (v.json) ctx.json({ event: "metrics", version: 1, t: 0, url: `${metricsServer.url}/metrics` });
      }
      if (dashboard && v.dashboardWait) {
        ctx.log.info("waiting for a browser to open the dashboard");
        await dashboard.waitForClient(ctx.signal).catch(() => undefined);
        if (ctx.signal.aborted) {
          const e = { event: "cancelled", version: 1, t: 0, reason: String((ctx.signal.reason as Error).message) };
          if (v.json) ctx.json(e);
          dashboard.publish(e);
          return EXIT_CANCELLED;
        }
      }
      const d = dashboard;
      let code: number;
      try {
        const r = await runVmDemo({
          sizeMiB: v.size,
          vcpus: v.vcpus,
          dirtyRateMiB: v.dirtyRate,
          mode: v.mode,
          dirtyTracking: v.dirtyTracking,
          json: v.json,
          timeoutMs: v.timeout,
          bandwidthLimit: v.bandwidth * 1e6,
          out: ctx.out,
          status: !v.json && ctx.progress.enabled ? (l) => ctx.progress.update(l.replace(/\n$/, "")) : null,
          signal: ctx.signal,
          onEvent: (e) => {
            if (e.role === "source" && e.info) info = e.info as MigrationInfo;
            d?.publish(e as { event: string });
          },
        });
        ctx.progress.done();
        code = r.verified ? EXIT_OK : EXIT_FAILED;
      } catch (e) {
        ctx.progress.done();
        if (ctx.signal.aborted) return EXIT_CANCELLED;
        ctx.log.error({ code: (e as { code?: string }).code }, `migration failed: ${(e as Error).message}`);
        code = EXIT_FAILED;
      }
      if (dashboard && !ctx.signal.aborted) {
        ctx.log.info(`migration over; dashboard still at ${dashboard.url} until SIGINT`);
        await new Promise((r) => ctx.signal.addEventListener("abort", r, { once: true }));
      }
      return code;
    } finally {
      await dashboard?.close();
      await metricsServer?.close();
    }
  },
});
