/**
 * One interface for every writer's dirty tracking, so a migration syncs any mix of sources
 * (in-process bitmaps, vhost-user shared logs, KVM bitmaps and rings, kernel write-protect)
 * into one bitmap per round.
 */

/** Where a source puts what it collected. Addresses are guest-physical. */
export interface DirtySink {
  /** Marks every page touched by [gpa, gpa+len). */
  markRange(gpa: number, len: number): void;
  /**
   * Marks pages given as frame numbers of `pageSize` bytes counted from `base`
   * (page i covers [base + f*pageSize, +pageSize)).
   */
  markFrames(frames: ArrayLike<number>, pageSize: number, base: number): void;
}

export interface DirtySyncOptions {
  /**
   * The last sync before switchover: every writer is stopped, so the source must collect
   * everything still pending (kick vCPUs, harvest rings, then the backup bitmap last).
   */
  final?: boolean;
}

export interface DirtySource {
  readonly name: string;
  /**
   * Starts tracking. Writes made before start() are not reported: the caller treats all
   * memory as dirty for its first pass.
   */
  start(): void | Promise<void>;
  /** Moves everything dirtied since the previous sync into `sink` (and clears it here). */
  sync(sink: DirtySink, options?: DirtySyncOptions): void | Promise<void>;
  /** Stops tracking and releases what start() took. Idempotent. */
  stop(): void | Promise<void>;
}
