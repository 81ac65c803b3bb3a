/**
 * The versioned event stream of a migration, as `vmshift ... --json` prints it and the
 * dashboard and the metrics read it: one object per event, each with `event` and `version`
 * (docs/events.schema.json describes every one). A MigrationReport listens to a migration's
 * MigrationEvents and keeps what QEMU's query-migrate answers (status, RAM total / transferred /
 * remaining, dirty-sync-count, expected downtime, setup time, downtime, total time, postcopy
 * requests) as running totals, next to what only this engine measures: how long the writers
 * stalled, what a dirty sync costs per GiB, remote-fault latency. `info()` answers at any time.
 */
import type { FaultStats, MigrationEvents, MigrationResult, Phase, RoundStats } from "./events.js";

/** Bumped on any incompatible change to an event's fields. */
export const EVENT_VERSION = 1;

/** QEMU's MigrationStatus names, for what a `Phase` means to someone who knows QEMU. */
export type MigrationStatus =
  | "setup"
  | "active"
  | "device"
  | "postcopy-active"
  | "postcopy-paused"
  | "completed"
  | "failed"
  | "cancelled";

export function statusOf(phase: Phase | "cancelled"): MigrationStatus {
  switch (phase) {
    case "setup":
      return "setup";
    case "precopy":
    case "snapshot":
    case "restore":
      return "active";
    case "switchover":
    case "device-state":
    case "verify":
      return "device";
    case "postcopy":
      return "postcopy-active";
    case "postcopy-paused":
      return "postcopy-paused";
    case "complete":
      return "completed";
    case "failed":
      return "failed";
    case "cancelled":
      return "cancelled";
  }
}

/** What query-migrate would answer now, from this side's point of view. */
export interface MigrationInfo {
  role: "source" | "destination";
  mode: "precopy" | "postcopy";
  status: MigrationStatus;
  phase: Phase | "cancelled";
  /** ms from the migration's start (its setup phase) to the next phase (null until then). */
  setupTimeMs: number | null;
  /** ms since the migration's start (final once complete). */
  totalTimeMs: number;
  /** Source: the writers' stop until the destination ran; null until known. */
  downtimeMs: number | null;
  /** Remaining bytes over the last round's bandwidth (source; null before the first round). */
  expectedDowntimeMs: number | null;
  ram: {
    totalBytes: number;
    /** Bytes on the wire so far (source: sent; destination: received). */
    transferredBytes: number;
    /** Dirty bytes not yet sent, as of the last sync (source; null on the destination). */
    remainingBytes: number | null;
    /** Pages sent with data, and pages sent as zero flags. */
    normalPages: number;
    zeroPages: number;
    /** Dirty syncs so far (one per round, plus the final one). */
    dirtySyncCount: number;
    /** Pages/s the writers dirtied during the last round. */
    dirtyPagesRate: number;
    /** Megabits/s of the last round. */
    mbps: number;
    /** Pages the destination asked for (postcopy). */
    postcopyRequests: number;
  };
  /** Total ms the writers were blocked (throttle, write faults). */
  writerStallMs: number;
  /** Cost of the last dirty sync, ms per GiB of guest memory. */
  syncMsPerGiB: number | null;
  /** Remote-fault latency, µs (postcopy destination; null without faults). */
  remoteFaultLatencyUs: { median: number; p99: number } | null;
  throttle: number;
  rounds: number;
  /** Destination: memory verified equal to the source's (null until known). */
  verified: boolean | null;
}

export interface EventBase {
  event: string;
  version: typeof EVENT_VERSION;
  /** ms since the command started. */
  t: number;
}

export type MigrationEventBody =
  | { event: "phase"; role: MigrationInfo["role"]; phase: Phase; info: MigrationInfo }
  | { event: "round"; role: "source"; round: RoundReport; info: MigrationInfo }
  | { event: "throttle"; role: "source"; level: number; round: number }
  | { event: "faults"; role: "destination"; faults: FaultReport; info: MigrationInfo }
  | { event: "complete"; role: MigrationInfo["role"]; result: ResultReport; info: MigrationInfo }
  | {
      event: "failed";
      role: MigrationInfo["role"];
      code: string;
      message: string;
      offset: number | null;
      info: MigrationInfo;
    }
  | { event: "cancelled"; role: MigrationInfo["role"]; reason: string; info: MigrationInfo };

export type MigrationEvent = EventBase & MigrationEventBody;

export interface RoundReport {
  round: number;
  dirtyPages: number;
  pagesSent: number;
  zeroPages: number;
  bytes: number;
  durationMs: number;
  bandwidth: number;
  dirtyRate: number;
  remainingBytes: number;
  predictedDowntimeMs: number | null;
  syncMsPerGiB: number;
  writerStallMs: number;
  throttle: number;
  dirtyHeat: number[];
}

export interface FaultReport {
  faults: number;
  remoteFaults: number;
  discardFaults: number;
  latencyMedianUs: number;
  latencyP99Us: number;
  preemptPages: number;
  latencyHistogram: number[];
}

export interface ResultReport {
  verified: boolean;
  rounds: number;
  converged: boolean;
  digests: { region: number; source: string; destination: string; match: boolean }[];
  /** Postcopy: requested pages went on the preempt channel (null in precopy). */
  preempt: boolean | null;
  /** Postcopy destination: its fault statistics (null otherwise). */
  faults: FaultReport | null;
}

/** ms and other measures to 0.1; counts and bytes are whole already. */
export const r1 = (v: number): number => Math.round(v * 10) / 10;
const int = (v: number): number => (Number.isFinite(v) ? Math.round(v) : 0);

export interface MigrationReportOptions {
  role: MigrationInfo["role"];
  mode: MigrationInfo["mode"];
  events: MigrationEvents;
  /** Guest memory size, bytes. */
  totalBytes: number;
  /** Bytes on the wire so far, live (the socket's counter); default: the sum of the rounds. */
  transferred?: () => number;
  /** Where each event goes (a JSON line writer, the dashboard, the metrics). */
  emit: (e: MigrationEvent) => void;
  /** The command's start (performance.now()); default: now. */
  t0?: number;
  /**
   * The migration's own cancel signal: when it fires, `cancelled` is reported (with the
   * reason's message) instead of the ABORTED failure that follows. Listen before the run starts.
   */
  signal?: AbortSignal;
}

/**
 * Turns one migration's events into versioned events with running totals. Emits exactly one
 * terminal event: `complete`, `failed` or `cancelled`.
 */
export class MigrationReport {
  readonly #o: MigrationReportOptions;
  readonly #t0: number;
  #phase: Phase | "cancelled" = "setup";
  /** performance.now() of the migration's first event (its setup phase). */
  #start: number | null = null;
  #setupTimeMs: number | null = null;
  #rounds = 0;
  #syncs = 0;
  #sentBytes = 0;
  #normal = 0;
  #zero = 0;
  #last: RoundStats | null = null;
  #stall = 0;
  #throttle = 0;
  #faults: FaultStats | null = null;
  #downtimeMs: number | null = null;
  #totalMs: number | null = null;
  #verified: boolean | null = null;
  #ended = false;
  readonly #unsubscribe: (() => void)[] = [];

  constructor(o: MigrationReportOptions) {
    this.#o = o;
    this.#t0 = o.t0 ?? performance.now();
    const on = <K extends "phase" | "round" | "faults" | "throttle" | "complete" | "failed">(
      name: K,
      // biome-ignore lint/suspicious/noExplicitAny: the listener's argument is the event map's
      fn: (...a: any[]) => void,
    ) => {
      o.events.on(name, fn as never);
      this.#unsubscribe.push(() => o.events.off(name, fn as never));
    };
    on("phase", (p: { phase: Phase; atMs: number }) => this.#onPhase(p.phase));
    on("round", (r: RoundStats) => this.#onRound(r));
    on("throttle", (t: { level: number; round: number }) => {
      this.#throttle = t.level;
      this.#emit({ event: "throttle", role: "source", level: t.level, round: t.round });
    });
    on("faults", (f: FaultStats) => {
      this.#faults = f;
      this.#emit({ event: "faults", role: "destination", faults: faultReport(f), info: this.info() });
    });
    on("complete", (r: MigrationResult) => this.#onComplete(r));
    on("failed", (e: Error) => this.failed(e));
    const sig = o.signal;
    if (sig) {
      const onAbort = () => this.cancelled(String((sig.reason as Error | undefined)?.message ?? sig.reason));
      if (sig.aborted) queueMicrotask(onAbort);
      else {
        sig.addEventListener("abort", onAbort, { once: true });
        this.#unsubscribe.push(() => sig.removeEventListener("abort", onAbort));
      }
    }
  }

  get ended(): boolean {
    return this.#ended;
  }

  #t(): number {
    return r1(performance.now() - this.#t0);
  }

  #emit(e: MigrationEventBody): void {
    const { event, ...rest } = e;
    this.#o.emit({ event, version: EVENT_VERSION, t: this.#t(), ...rest } as MigrationEvent);
  }

  #onPhase(phase: Phase): void {
    if (this.#ended) return;
    // "failed" is reported once, by the failed event with its code.
    if (phase === "failed") return;
    this.#phase = phase;
    this.#start ??= performance.now();
    if (this.#setupTimeMs === null && phase !== "setup") this.#setupTimeMs = r1(performance.now() - this.#start);
    if (phase === "complete") return; // the complete event carries it, with the result
    this.#emit({ event: "phase", role: this.#o.role, phase, info: this.info() });
  }

  #onRound(r: RoundStats): void {
    this.#rounds = r.round;
    this.#syncs = r.round + 1;
    this.#sentBytes += r.bytesSent;
    this.#normal += r.pagesSent - r.zeroPages;
    this.#zero += r.zeroPages;
    this.#stall += r.writerStallMs;
    this.#last = r;
    this.#emit({
      event: "round",
      role: "source",
      round: {
        round: r.round,
        dirtyPages: r.dirtyPages,
        pagesSent: r.pagesSent,
        zeroPages: r.zeroPages,
        bytes: r.bytesSent,
        durationMs: r1(r.durationMs),
        bandwidth: int(r.bandwidth),
        dirtyRate: int(r.dirtyRate),
        remainingBytes: r.remainingBytes,
        predictedDowntimeMs: Number.isFinite(r.predictedDowntimeMs) ? r1(r.predictedDowntimeMs) : null,
        syncMsPerGiB: r1(r.syncMsPerGiB),
        writerStallMs: r1(r.writerStallMs),
        throttle: r.throttle,
        dirtyHeat: r.dirtyHeat ?? [],
      },
      info: this.info(),
    });
  }

  #onComplete(r: MigrationResult): void {
    if (this.#ended) return;
    this.#phase = "complete";
    this.#rounds = Math.max(this.#rounds, r.rounds);
    if (this.#o.role === "source") {
      this.#downtimeMs = r.downtimeMs;
      this.#sentBytes = r.bytesSent;
      this.#syncs = r.rounds + 1;
    }
    this.#normal = r.pagesSent;
    this.#zero = r.zeroPages;
    if (r.postcopy) this.#faults = r.postcopy;
    this.#totalMs = r.totalMs;
    this.#verified = r.digests.length > 0 && r.digests.every((d) => d.match);
    this.#ended = true;
    this.#emit({
      event: "complete",
      role: this.#o.role,
      result: {
        verified: this.#verified,
        rounds: r.rounds,
        converged: r.converged,
        digests: r.digests.map((d) => ({ ...d })),
        preempt: r.preempt ?? null,
        faults: r.postcopy ? faultReport(r.postcopy) : null,
      },
      info: this.info(),
    });
    this.close();
  }

  /** Reports a failure (once: a second report of the same migration is dropped). */
  failed(e: unknown): void {
    if (this.#ended) return;
    this.#ended = true;
    this.#phase = "failed";
    const err = e as { code?: unknown; message?: unknown; offset?: unknown };
    const message = String(err?.message ?? e).replace(/ \(at stream offset \d+\)$/, "");
    this.#emit({
      event: "failed",
      role: this.#o.role,
      code: typeof err?.code === "string" ? err.code : "ERROR",
      message,
      offset: typeof err?.offset === "number" ? err.offset : null,
      info: this.info(),
    });
    this.close();
  }

  /** The operator cancelled (SIGINT): reported instead of the failure the abort causes. */
  cancelled(reason: string): void {
    if (this.#ended) return;
    this.#ended = true;
    this.#phase = "cancelled";
    this.#emit({ event: "cancelled", role: this.#o.role, reason, info: this.info() });
    this.close();
  }

  info(): MigrationInfo {
    const last = this.#last;
    const src = this.#o.role === "source";
    const transferred = this.#o.transferred?.() ?? this.#sentBytes;
    const f = this.#faults;
    return {
      role: this.#o.role,
      mode: this.#o.mode,
      status: statusOf(this.#phase),
      phase: this.#phase,
      setupTimeMs: this.#setupTimeMs,
      totalTimeMs: r1(this.#totalMs ?? (this.#start === null ? 0 : performance.now() - this.#start)),
      downtimeMs: this.#downtimeMs === null ? null : r1(this.#downtimeMs),
      expectedDowntimeMs:
        src && last && Number.isFinite(last.predictedDowntimeMs) ? r1(last.predictedDowntimeMs) : null,
      ram: {
        totalBytes: this.#o.totalBytes,
        transferredBytes: transferred,
        remainingBytes: src ? (this.#phase === "complete" ? 0 : (last?.remainingBytes ?? this.#o.totalBytes)) : null,
        normalPages: this.#normal,
        zeroPages: this.#zero,
        dirtySyncCount: this.#syncs,
        dirtyPagesRate: last ? int(last.dirtyRate / 4096) : 0,
        mbps: last ? r1((last.bandwidth * 8) / 1e6) : 0,
        postcopyRequests: f?.remoteFaults ?? 0,
      },
      writerStallMs: r1(this.#stall),
      syncMsPerGiB: last ? r1(last.syncMsPerGiB) : null,
      remoteFaultLatencyUs: f && f.remoteFaults > 0 ? { median: r1(f.latencyMedianUs), p99: r1(f.latencyP99Us) } : null,
      throttle: this.#throttle,
      rounds: this.#rounds,
      verified: this.#verified,
    };
  }

  close(): void {
    for (const u of this.#unsubscribe.splice(0)) u();
  }
}

export function faultReport(f: FaultStats): FaultReport {
  return {
    faults: f.faults,
    remoteFaults: f.remoteFaults,
    discardFaults: f.discardFaults,
    latencyMedianUs: r1(f.latencyMedianUs),
    latencyP99Us: r1(f.latencyP99Us),
    preemptPages: f.preemptPages ?? 0,
    latencyHistogram: f.latencyHistogram ?? [],
  };
}
