/** The typed event stream of a migration (also what the CLI prints as JSON lines). */
import { EventEmitter } from "node:events";

export type Phase =
  | "setup"
  | "precopy"
  | "switchover"
  | "postcopy"
  /** Postcopy recovery: a connection was lost; both sides wait for a new one. */
  | "postcopy-paused"
  | "device-state"
  | "verify"
  | "complete"
  | "failed"
  | "snapshot"
  | "restore";

export interface PhaseEvent {
  phase: Phase;
  /** ms since the migration started */
  atMs: number;
}

export interface RoundStats {
  round: number;
  /** Pages found dirty by the sync that started this round. */
  dirtyPages: number;
  pagesSent: number;
  zeroPages: number;
  bytesSent: number;
  durationMs: number;
  /** Bytes/s this round achieved on the wire. */
  bandwidth: number;
  /** Bytes/s the writers dirtied during this round (measured by the next sync). */
  dirtyRate: number;
  /** Dirty bytes left after this round (the next sync). */
  remainingBytes: number;
  /** remainingBytes / bandwidth, ms. */
  predictedDowntimeMs: number;
  /** ms per GiB of guest memory of the sync that ended this round, total and per DirtySource. */
  syncMsPerGiB: number;
  syncMsPerGiBBySource: Record<string, number>;
  /** ms the writers were blocked (throttling, write faults) during this round. */
  writerStallMs: number;
  /** Auto-converge throttle level in force during the round (0 = none). */
  throttle: number;
  /**
   * Where the pages sent this round lie: guest memory cut into DIRTY_HEAT_CELLS equal cells
   * (in region order), the number of pages sent from each.
   */
  dirtyHeat?: number[];
}

/** Cells of RoundStats.dirtyHeat. */
export const DIRTY_HEAT_CELLS = 128;

export interface FaultStats {
  faults: number;
  /** Remote faults: page requested from the source. */
  remoteFaults: number;
  /** Faults on discarded blocks, resolved with a zero page at once. */
  discardFaults: number;
  latencyMedianUs: number;
  latencyP99Us: number;
  /** Pages that arrived on the postcopy preempt channel (0 without one). */
  preemptPages?: number;
  /** Remote-fault latencies counted in FAULT_LATENCY_BOUNDS_US buckets (the last: above them all). */
  latencyHistogram?: number[];
  /** Faults were served by the native fault thread (preempt channel over a plain socket). */
  faultThread?: boolean;
}

/** Upper bounds, µs, of FaultStats.latencyHistogram's buckets (one more bucket holds the rest). */
export const FAULT_LATENCY_BOUNDS_US = [50, 100, 200, 500, 1000, 2000, 5000, 10_000, 20_000, 50_000, 100_000] as const;

/** `values` counted in FAULT_LATENCY_BOUNDS_US buckets. */
export function latencyHistogram(values: readonly number[]): number[] {
  const counts = new Array<number>(FAULT_LATENCY_BOUNDS_US.length + 1).fill(0);
  for (const v of values) {
    let i = 0;
    while (i < FAULT_LATENCY_BOUNDS_US.length && v > (FAULT_LATENCY_BOUNDS_US[i] as number)) i++;
    counts[i] = (counts[i] as number) + 1;
  }
  return counts;
}

export interface RegionDigest {
  region: number;
  source: string;
  destination: string;
  match: boolean;
}

export interface MigrationResult {
  role: "source" | "destination";
  mode: "precopy" | "postcopy";
  rounds: number;
  totalMs: number;
  /** Writers stopped on the source until the destination was running (RESUMED received). */
  downtimeMs: number;
  /**
   * Digest verification after the destination resumed, ms (not part of the downtime): the
   * source hashing its frozen memory and the destination's COMPLETE coming back (source), or
   * the wait for the source's digests (destination).
   */
  verifyMs?: number;
  bytesSent: number;
  pagesSent: number;
  zeroPages: number;
  converged: boolean;
  digests: RegionDigest[];
  roundStats: RoundStats[];
  postcopy?: FaultStats;
  /** Postcopy: requested pages travelled on a separate preempt connection. */
  preempt?: boolean;
  deviceStates: string[];
  /** Source, postcopy: how the destination's page requests were handled (see RequestStats). */
  requests?: RequestStats;
}

/**
 * The source's page-request bounds at work: a page is queued at most once per connection (one
 * already sent on the stream the answer would take is not queued at all), a request over the
 * page cap is refused, and requested pages wait in a queue of page numbers (at most one entry
 * per page) while the serving socket holds more than its bound.
 */
export interface RequestStats {
  /** PAGE_REQUEST records read. */
  requests: number;
  /** Pages queued for sending (each page at most once per connection). */
  pagesQueued: number;
  /** Of those, pages outside the postcopy set (sent in precopy, e.g. zero pages never populated). */
  outsideSet: number;
  /** Of those, pages the background stream had sent, sent once more ahead of it on the preempt channel. */
  resentAhead: number;
  /** Pages asked for again after they were sent or queued: not queued again. */
  duplicates: number;
  /**
   * Of the pages queued, those sent as zero pages without reading them: in memory nowhere (a
   * memfd or anonymous page never written, and no swap), where reading would have faulted a
   * fresh zeroed page in on the source (the preempt channel's native server only).
   */
  absentZeros: number;
  /** Requests refused whole (over the page cap, or before postcopy). */
  refused: number;
  /** The most bytes the serving socket held in user space after a requested page was queued. */
  maxQueuedBytes: number;
}

export interface MigrationEventMap {
  phase: [PhaseEvent];
  round: [RoundStats];
  /** Postcopy fault statistics so far (destination, at most every 250 ms). */
  faults: [FaultStats];
  /** A throttle level change from auto-converge. */
  throttle: [{ level: number; round: number }];
  complete: [MigrationResult];
  failed: [Error];
  /** Something the peer did was refused without failing the migration (REQUEST_REFUSED ...). */
  refused: [Error];
}

export class MigrationEvents extends EventEmitter<MigrationEventMap> {}

export function percentile(sorted: readonly number[], p: number): number {
  if (sorted.length === 0) return 0;
  const i = Math.min(sorted.length - 1, Math.max(0, Math.ceil((p / 100) * sorted.length) - 1));
  return sorted[i] as number;
}
