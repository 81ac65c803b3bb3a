/**
 * The vCPU worker protocol: what the main thread and a vCPU's worker thread share.
 *
 * Main → worker: commands through a shared Int32Array (the worker is blocked in KVM_RUN or in
 * Atomics.wait, so it cannot read messages; it reads the command word after every exit and
 * sleeps on CMD_SEQ while parked). To get a running vCPU out of KVM_RUN the main thread also
 * sets kvm_run.immediate_exit, which makes the next KVM_RUN return EINTR at once; the current
 * one ends at the guest's next exit (our guest program exits through an I/O port every N
 * writes, see guest.ts and docs/kvm.md for why there is no signal-based kick).
 *
 * Worker → main: postMessage events (a pause with its reason and exit details, an I/O or MMIO
 * access no built-in device handles, the worker's end). The progress port is handled inside the
 * worker with no message at all: the counter goes to a shared word main can read or wait on.
 * I/O and MMIO reports are bounded (MAX_PENDING_IO in flight, the rest counted as dropped).
 */

/** Int32 indices of the control block. */
export const Ctl = {
  /** Bumped by main with every command; the parked worker waits on it. */
  CMD_SEQ: 0,
  /** The command: see Cmd. */
  CMD: 1,
  /** The worker's state: see VcpuRunState. */
  STATE: 2,
  /** Last value the guest wrote to the progress port (u32, stored as int32). */
  PROGRESS: 3,
  /** Number of progress reports seen by this thread; waiters sleep on it. */
  PROGRESS_SEQ: 4,
  /** Pause as soon as PROGRESS reaches this value (0: never). Compared as u32. */
  STOP_AT: 5,
  /** Microseconds the worker sleeps after every progress report (throttling), 0: none. */
  THROTTLE_US: 6,
  /** KVM_RUN calls that returned (exits of any kind). */
  EXITS: 7,
  /** Exits handled inside the worker without a pause (I/O, MMIO). */
  IO_EXITS: 8,
  /** The progress port number. */
  PROGRESS_PORT: 9,
  /** I/O and MMIO reports posted to main and not yet handled there (at most MAX_PENDING_IO). */
  IO_PENDING: 10,
  /** Reports not posted because MAX_PENDING_IO were pending (the exit itself is still completed). */
  IO_DROPPED: 11,
} as const;

/**
 * Bound on the I/O and MMIO reports queued from a vCPU thread to the main thread. A guest
 * exits on port I/O as fast as it likes, and each report is a message: with the main thread
 * busy, an unbounded queue is memory the guest allocates at will. Past the bound the exit is
 * completed as usual (reads float high) and only counted (Vcpu.droppedIoReports).
 */
export const MAX_PENDING_IO = 256;
export const CTL_WORDS = 16;

export const Cmd = { NONE: 0, RUN: 1, PAUSE: 2, QUIT: 3 } as const;
export const VcpuRunState = { STARTING: 0, PAUSED: 1, RUNNING: 2, EXITED: 3 } as const;

/** Why a vCPU thread parked. */
export type PauseReason =
  | "command" // main asked (pause(), kick)
  | "hlt" // KVM_EXIT_HLT
  | "stop-at" // the progress counter reached STOP_AT
  | "dirty-ring-full" // KVM_EXIT_DIRTY_RING_FULL: harvest + reset before resuming
  | "error"; // shutdown, failed entry, internal error, unknown exit, KVM_RUN failure

/** Details of a failing exit, turned into a KvmError on the main side. */
export interface ExitError {
  code: "FAIL_ENTRY" | "INTERNAL_ERROR" | "SHUTDOWN" | "UNKNOWN_EXIT" | "RUN_FAILED";
  message: string;
  values: Record<string, number | string>;
}

export interface WorkerInit {
  id: number;
  fd: number;
  /** kvm_run and the pages after it (the PIO data page), mapped by main. */
  run: SharedArrayBuffer;
  control: SharedArrayBuffer;
}

export type WorkerEvent =
  | { type: "ready" }
  | { type: "paused"; reason: PauseReason; ack: number; exitReason: number; error?: ExitError }
  | { type: "io"; direction: "in" | "out"; port: number; size: number; count: number; data: number[] }
  | { type: "mmio"; isWrite: boolean; address: number; length: number; data: number[] }
  | { type: "exited" };
