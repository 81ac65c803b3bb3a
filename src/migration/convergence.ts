/**
 * When precopy stops: a pure function of the last round's figures and the limits, so every
 * branch is testable without sockets or writers. The source calls it once per round, after
 * the dirty sync that tells how many bytes remain, and acts on the decision:
 *
 *   continue      send the dirty pages (another round)
 *   throttle      auto-converge: slow the writers to `level`, then another round
 *   switchover    stop the writers and send what remains (`converged` false: the limit was
 *                 not met but `whenNotConverged: "switchover"` says stop anyway)
 *   postcopy      start the destination now and send the rest in postcopy
 *   not-converged give up (NOT_CONVERGED): the limit was not met in `maxRounds` rounds
 *
 * The order of the checks is the order below: postcopy first (its round count is a plan, not a
 * prediction), then the downtime prediction, then the round limit, then auto-converge.
 */

export interface AutoConvergeSettings {
  /** First round that may throttle. */
  startRound: number;
  /** Throttle when the bytes still dirty exceed this fraction of the bytes the last round sent. */
  threshold: number;
  /** The highest throttle level (each decision raises it by one). */
  maxLevel: number;
}

export interface ConvergenceLimits {
  /** The longest acceptable switchover pause, predicted as remaining bytes / last round's bandwidth. */
  downtimeLimitMs: number;
  /** Precopy rounds before giving up (or stopping anyway, see whenNotConverged). */
  maxRounds: number;
  whenNotConverged: "fail" | "switchover";
  /** Postcopy: precopy rounds before the destination starts (0 = at once). */
  postcopyAfterRounds: number;
  /** null: never throttle. */
  autoConverge: AutoConvergeSettings | null;
}

/**
 * The defaults, in one place (SourceOptions documents each option and refers here):
 * downtime limit 300 ms, 30 rounds, fail when not converged, postcopy after 1 round,
 * auto-converge from round 2 when more than half of what a round sent is dirty again, up to
 * level 8.
 */
export const CONVERGENCE_DEFAULTS: Readonly<ConvergenceLimits> = Object.freeze({
  downtimeLimitMs: 300,
  maxRounds: 30,
  whenNotConverged: "fail",
  postcopyAfterRounds: 1,
  autoConverge: Object.freeze({ startRound: 2, threshold: 0.5, maxLevel: 8 }),
});

/** The limits from a source's options: each one given, or its default. */
export function convergenceLimits(o: {
  downtimeLimitMs?: number;
  maxRounds?: number;
  whenNotConverged?: "fail" | "switchover";
  postcopyAfterRounds?: number;
  autoConverge?: Partial<AutoConvergeSettings> | false;
}): ConvergenceLimits {
  const d = CONVERGENCE_DEFAULTS;
  return {
    downtimeLimitMs: o.downtimeLimitMs ?? d.downtimeLimitMs,
    maxRounds: o.maxRounds ?? d.maxRounds,
    whenNotConverged: o.whenNotConverged ?? d.whenNotConverged,
    postcopyAfterRounds: o.postcopyAfterRounds ?? d.postcopyAfterRounds,
    autoConverge: o.autoConverge === false ? null : { ...(d.autoConverge as AutoConvergeSettings), ...o.autoConverge },
  };
}

/** The switchover pause `remainingBytes` would take at `bandwidth` bytes/s (infinite at 0). */
export function predictDowntimeMs(remainingBytes: number, bandwidth: number): number {
  return bandwidth > 0 ? (remainingBytes / bandwidth) * 1000 : Number.POSITIVE_INFINITY;
}

export interface ConvergenceInput {
  /** Rounds completed so far (0 before the first). */
  round: number;
  /** The last round's figures; null before the first round. */
  last: { bytesSent: number; bandwidth: number } | null;
  /** Bytes dirty now (after this sync). */
  remainingBytes: number;
  /** The current throttle level (0 = none). */
  throttle: number;
  /** The migration is meant to end in postcopy. */
  postcopy: boolean;
}

export type ConvergenceDecision =
  | { kind: "continue" }
  | { kind: "throttle"; level: number }
  | { kind: "switchover"; converged: boolean }
  | { kind: "postcopy" }
  | { kind: "not-converged"; predictedDowntimeMs: number; limitMs: number };

export function convergence(i: ConvergenceInput, l: ConvergenceLimits): ConvergenceDecision {
  if (i.postcopy && i.round >= l.postcopyAfterRounds) return { kind: "postcopy" };
  const last = i.last;
  if (!last) return { kind: "continue" };
  const predicted = predictDowntimeMs(i.remainingBytes, last.bandwidth);
  if (!i.postcopy && predicted <= l.downtimeLimitMs) return { kind: "switchover", converged: true };
  if (i.round >= l.maxRounds) {
    if (i.postcopy) return { kind: "postcopy" };
    if (l.whenNotConverged === "switchover") return { kind: "switchover", converged: false };
    return { kind: "not-converged", predictedDowntimeMs: predicted, limitMs: l.downtimeLimitMs };
  }
  const ac = l.autoConverge;
  if (ac && i.round >= ac.startRound && i.remainingBytes > ac.threshold * last.bytesSent && i.throttle < ac.maxLevel)
    return { kind: "throttle", level: i.throttle + 1 };
  return { kind: "continue" };
}
