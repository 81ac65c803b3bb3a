/**
 * The phases of each side of a migration as explicit state machines: the state diagrams of
 * docs/migration.md ("State diagrams"), written as tables. A side moves only along an edge of
 * its table; any other move is a typed error (`MigrationError` `ILLEGAL_TRANSITION`), so a
 * record that arrives in the wrong phase, or a bug in the control flow, stops the migration
 * instead of running on in a state the diagram does not have. Each move is also the `phase`
 * event, with the same names.
 */
import { MigrationError } from "./errors.js";
import type { Phase } from "./events.js";

/** Before run(): no phase event has been emitted yet. */
export type Idle = "idle";

export type SourcePhase =
  | Idle
  | "setup"
  | "precopy"
  | "switchover"
  | "postcopy"
  | "postcopy-paused"
  | "verify"
  | "complete"
  | "failed";

export type DestinationPhase = Exclude<SourcePhase, "switchover">;

export type Transitions<P extends string> = Readonly<Record<P, readonly P[]>>;

/**
 * The source. `failed` is reachable from every phase that is not final; `postcopy-paused`
 * (recovery) from `postcopy` and from `verify` (the digests and END went out, COMPLETE did
 * not arrive); a recovered migration goes on in `postcopy` and sends its digests again.
 */
export const SOURCE_TRANSITIONS: Transitions<SourcePhase> = {
  idle: ["setup"],
  setup: ["precopy", "failed"],
  precopy: ["switchover", "postcopy", "failed"],
  switchover: ["verify", "failed"],
  postcopy: ["verify", "postcopy-paused", "failed"],
  "postcopy-paused": ["postcopy", "failed"],
  verify: ["complete", "postcopy-paused", "failed"],
  complete: [],
  failed: [],
};

/**
 * The destination. Precopy goes to `verify` at SWITCHOVER (the guest runs here from then on),
 * postcopy at END; `postcopy-paused` only from `postcopy` (once END is read, the fault domains
 * are released and nothing can pause any more).
 */
export const DESTINATION_TRANSITIONS: Transitions<DestinationPhase> = {
  idle: ["setup"],
  setup: ["precopy", "failed"],
  precopy: ["verify", "postcopy", "failed"],
  postcopy: ["verify", "postcopy-paused", "failed"],
  "postcopy-paused": ["postcopy", "failed"],
  verify: ["complete", "failed"],
  complete: [],
  failed: [],
};

export class PhaseMachine<P extends string> {
  readonly #side: string;
  readonly #table: Transitions<P>;
  readonly #onEnter: (phase: Exclude<P, Idle>) => void;
  #phase: P;

  constructor(side: string, table: Transitions<P>, initial: P, onEnter: (phase: Exclude<P, Idle>) => void = () => {}) {
    this.#side = side;
    this.#table = table;
    this.#phase = initial;
    this.#onEnter = onEnter;
  }

  get phase(): P {
    return this.#phase;
  }

  /** No edge leaves this phase (complete, failed). */
  get final(): boolean {
    return this.#table[this.#phase].length === 0;
  }

  can(next: P): boolean {
    return this.#table[this.#phase].includes(next);
  }

  /** Moves to `next`, or throws ILLEGAL_TRANSITION (and stays where it was). */
  to(next: P): void {
    if (!this.can(next))
      throw new MigrationError(
        "ILLEGAL_TRANSITION",
        `${this.#side}: no transition from ${this.#phase} to ${next}`,
        undefined,
        { side: this.#side, from: this.#phase, to: next },
      );
    this.#phase = next;
    this.#onEnter(next as Exclude<P, Idle>);
  }
}

/** The source's machine, emitting each phase through `emit`. */
export function sourcePhases(emit: (p: Phase) => void): PhaseMachine<SourcePhase> {
  return new PhaseMachine<SourcePhase>("source", SOURCE_TRANSITIONS, "idle", emit);
}

/** The destination's machine, emitting each phase through `emit`. */
export function destinationPhases(emit: (p: Phase) => void): PhaseMachine<DestinationPhase> {
  return new PhaseMachine<DestinationPhase>("destination", DESTINATION_TRANSITIONS, "idle", emit);
}
