import { Worker } from "node:worker_threads";
import { DirtyRing, KVM_DIRTY_GFN_SIZE } from "../memory/dirty-ring.js";
import type { Fd } from "../sys/fd.js";
import { Mapping } from "../sys/mapping.js";
import {
  decodeRegs,
  decodeSregs,
  encodeRegs,
  encodeSregs,
  KVM_DIRTY_LOG_PAGE_OFFSET,
  KVM_GET_REGS,
  KVM_GET_SREGS,
  KVM_REGS_SIZE,
  KVM_SET_REGS,
  KVM_SET_SREGS,
  KVM_SREGS_SIZE,
  KvmRun,
  type Regs,
  type Sregs,
} from "./abi.js";
import { KvmError, kvmIoctl } from "./errors.js";
import { Cmd, CTL_WORDS, Ctl, type PauseReason, VcpuRunState, type WorkerEvent, type WorkerInit } from "./protocol.js";

/** Everything the guest program's execution depends on besides memory (see guest.ts). */
export interface VcpuState {
  regs: Regs;
  sregs: Sregs;
}

export interface PauseInfo {
  reason: PauseReason;
  /** kvm_run.exit_reason of the exit that led to the pause (-1 when none). */
  exitReason: number;
  /** For reason "error": the failing exit as a typed error. */
  error?: KvmError;
}

export type VcpuIoEvent = Extract<WorkerEvent, { type: "io" | "mmio" }>;

export interface VcpuOptions {
  /** Port whose 4-byte OUTs are progress reports, handled in the worker (default 0x10). */
  progressPort?: number;
  /**
   * Called on the main thread when the vCPU stops with KVM_EXIT_DIRTY_RING_FULL; it must
   * harvest and reset the rings. The vCPU resumes afterwards unless a pause was asked for.
   */
  onDirtyRingFull?: () => void;
}

interface Waiter {
  minAck: number;
  resolve: (p: PauseInfo) => void;
  reject: (e: Error) => void;
}

/**
 * How long close() waits for the thread to leave KVM_RUN on its own (the guest's next exit)
 * before the Vm forces it out by removing the memslots.
 */
const DEFAULT_CLOSE_TIMEOUT_MS = 500;

/**
 * One vCPU: its fd, kvm_run mapping, dirty ring (when the VM has rings), register access and
 * the worker thread that runs it. Register access is only allowed while the thread is parked
 * (a vCPU ioctl from main would otherwise block until the guest's next exit).
 */
export class Vcpu implements AsyncDisposable {
  readonly id: number;
  readonly fd: Fd;
  readonly runMapping: Mapping;
  readonly ring: DirtyRing | null;
  readonly #ringMapping: Mapping | null;
  readonly #control = new SharedArrayBuffer(CTL_WORDS * 4);
  readonly #ctl = new Int32Array(this.#control);
  readonly #runU8: Uint8Array;
  #worker: Worker | null = null;
  #exited: Promise<void> | null = null;
  #options: VcpuOptions = {};
  /** CMD_SEQ of the last run(); a pause with a smaller ack is from before it. */
  #runSeq = 0;
  #pauseAsked = false;
  #parked = true;
  #lastPause: PauseInfo | null = null;
  #waiters: Waiter[] = [];
  #failure: Error | null = null;
  #closed = false;
  #ioListeners: ((e: VcpuIoEvent) => void)[] = [];

  /** Made by Vm.createVcpu(). Takes ownership of `fd`. */
  constructor(id: number, fd: Fd, mmapSize: number, ringEntries: number) {
    this.id = id;
    this.fd = fd;
    let ringMapping: Mapping | null = null;
    try {
      this.runMapping = Mapping.map(fd, mmapSize);
      if (ringEntries > 0) {
        ringMapping = Mapping.map(fd, ringEntries * KVM_DIRTY_GFN_SIZE, { offset: KVM_DIRTY_LOG_PAGE_OFFSET * 4096 });
      }
    } catch (e) {
      fd.close();
      throw e;
    }
    this.#ringMapping = ringMapping;
    this.ring = ringMapping ? new DirtyRing(ringMapping.windows[0] as SharedArrayBuffer, ringEntries) : null;
    this.#runU8 = new Uint8Array(this.runMapping.windows[0] as SharedArrayBuffer);
  }

  // ---------------------------------------------------------------------------------------------
  // Registers and state (parked only)

  getRegs(): Regs {
    this.#assertParked("KVM_GET_REGS");
    const b = new Uint8Array(KVM_REGS_SIZE);
    kvmIoctl(this.fd, KVM_GET_REGS, b, "KVM_GET_REGS");
    return decodeRegs(b);
  }

  setRegs(regs: Regs): void {
    this.#assertParked("KVM_SET_REGS");
    kvmIoctl(this.fd, KVM_SET_REGS, encodeRegs(regs), "KVM_SET_REGS");
  }

  getSregs(): Sregs {
    this.#assertParked("KVM_GET_SREGS");
    const b = new Uint8Array(KVM_SREGS_SIZE);
    kvmIoctl(this.fd, KVM_GET_SREGS, b, "KVM_GET_SREGS");
    return decodeSregs(b);
  }

  setSregs(sregs: Sregs): void {
    this.#assertParked("KVM_SET_SREGS");
    kvmIoctl(this.fd, KVM_SET_SREGS, encodeSregs(sregs), "KVM_SET_SREGS");
  }

  /**
   * The vCPU state a migration carries: sregs and regs. Taken while parked, and the worker
   * completes any pending I/O before it parks, so RIP is past the last `out`.
   */
  getState(): VcpuState {
    return { sregs: this.getSregs(), regs: this.getRegs() };
  }

  /** Sregs first: they set the mode the general registers are interpreted in. */
  setState(state: VcpuState): void {
    this.setSregs(state.sregs);
    this.setRegs(state.regs);
  }

  // ---------------------------------------------------------------------------------------------
  // The thread

  /** Starts the worker thread (parked). */
  async start(options: VcpuOptions = {}): Promise<void> {
    if (this.#closed) throw new KvmError("BAD_STATE", `vCPU ${this.id} is closed`, { vcpu: this.id });
    if (this.#worker) throw new KvmError("BAD_STATE", `vCPU ${this.id} already has a thread`, { vcpu: this.id });
    this.#options = options;
    Atomics.store(this.#ctl, Ctl.PROGRESS_PORT, options.progressPort ?? 0x10);
    const init: WorkerInit = {
      id: this.id,
      fd: this.fd.fd,
      run: this.runMapping.windows[0] as SharedArrayBuffer,
      control: this.#control,
    };
    const worker = new Worker(new URL("./vcpu-worker.js", import.meta.url), { workerData: init });
    this.#worker = worker;
    let ready!: () => void;
    let failed!: (e: Error) => void;
    const readyP = new Promise<void>((res, rej) => {
      ready = res;
      failed = rej;
    });
    this.#exited = new Promise<void>((res) => {
      worker.once("exit", () => {
        Atomics.store(this.#ctl, Ctl.STATE, VcpuRunState.EXITED);
        this.#parked = true;
        const err = this.#failure ?? new KvmError("BAD_STATE", `vCPU ${this.id} thread exited`, { vcpu: this.id });
        for (const w of this.#waiters.splice(0)) w.reject(err);
        failed(err);
        res();
      });
    });
    worker.on("error", (e: Error) => {
      this.#failure = e;
    });
    worker.on("message", (e: WorkerEvent) => this.#onEvent(e, ready));
    await readyP;
  }

  #onEvent(e: WorkerEvent, ready: () => void): void {
    switch (e.type) {
      case "ready":
        ready();
        return;
      case "io":
      case "mmio":
        Atomics.sub(this.#ctl, Ctl.IO_PENDING, 1);
        for (const l of this.#ioListeners) l(e);
        return;
      case "exited":
        return;
      case "paused": {
        if (e.ack < this.#runSeq) return; // from before the latest run(): stale
        if (e.reason === "dirty-ring-full") {
          this.#options.onDirtyRingFull?.();
          if (this.#options.onDirtyRingFull && !this.#pauseAsked) {
            this.#resume();
            return;
          }
        }
        const info: PauseInfo = { reason: e.reason, exitReason: e.exitReason };
        if (e.error) info.error = new KvmError(e.error.code, `vCPU ${this.id}: ${e.error.message}`, e.error.values);
        this.#parked = true;
        this.#lastPause = info;
        const still: Waiter[] = [];
        for (const w of this.#waiters) {
          if (e.ack >= w.minAck) w.resolve(info);
          else still.push(w);
        }
        this.#waiters = still;
        return;
      }
    }
  }

  #bump(cmd: number): number {
    Atomics.store(this.#ctl, Ctl.CMD, cmd);
    const seq = Atomics.add(this.#ctl, Ctl.CMD_SEQ, 1) + 1;
    Atomics.notify(this.#ctl, Ctl.CMD_SEQ);
    return seq;
  }

  #resume(): void {
    this.#parked = false;
    this.#lastPause = null;
    this.#runSeq = this.#bump(Cmd.RUN);
  }

  /** Lets the vCPU run (KVM_RUN in its thread) until paused or it stops by itself. */
  run(): void {
    this.#assertThread();
    this.#pauseAsked = false;
    this.#resume();
  }

  /**
   * Asks the vCPU to leave KVM_RUN and park; resolves once it has (pending I/O completed).
   * The running KVM_RUN ends at the guest's next exit; immediate_exit stops the one after it.
   */
  pause(): Promise<PauseInfo> {
    this.#assertThread();
    this.#pauseAsked = true;
    const seq = this.#bump(Cmd.PAUSE);
    Atomics.store(this.#runU8, KvmRun.immediate_exit, 1);
    return this.#wait(seq);
  }

  /** Resolves at the next pause after the latest run() (at once if already parked since). */
  waitForPause(): Promise<PauseInfo> {
    this.#assertThread();
    if (this.#parked && this.#lastPause) return Promise.resolve(this.#lastPause);
    return this.#wait(this.#runSeq);
  }

  /** run() then waitForPause(). */
  runUntilPause(): Promise<PauseInfo> {
    this.run();
    return this.waitForPause();
  }

  #wait(minAck: number): Promise<PauseInfo> {
    return new Promise<PauseInfo>((resolve, reject) => this.#waiters.push({ minAck, resolve, reject }));
  }

  /** True between run() and the pause that follows it. */
  get running(): boolean {
    return this.#worker !== null && !this.#parked;
  }

  /** The last value the guest wrote to the progress port (u32). */
  get progress(): number {
    return Atomics.load(this.#ctl, Ctl.PROGRESS) >>> 0;
  }

  /** Progress reports this vCPU thread has seen (from this thread's start, not the guest's). */
  get reports(): number {
    return Atomics.load(this.#ctl, Ctl.PROGRESS_SEQ);
  }

  /** KVM_RUN returns so far, and those handled in the worker without a pause (I/O, MMIO). */
  get exits(): { total: number; io: number } {
    return { total: Atomics.load(this.#ctl, Ctl.EXITS), io: Atomics.load(this.#ctl, Ctl.IO_EXITS) };
  }

  /** I/O and MMIO reports the vCPU thread did not post because MAX_PENDING_IO were pending. */
  get droppedIoReports(): number {
    return Atomics.load(this.#ctl, Ctl.IO_DROPPED);
  }

  /** Parks the vCPU as soon as the progress counter reaches `value` (0: never). */
  stopAtProgress(value: number): void {
    Atomics.store(this.#ctl, Ctl.STOP_AT, value | 0);
  }

  /** Sleeps `us` microseconds after every progress report (0: full speed). */
  throttle(us: number): void {
    Atomics.store(this.#ctl, Ctl.THROTTLE_US, Math.max(0, Math.round(us)));
  }

  onIo(listener: (e: VcpuIoEvent) => void): void {
    this.#ioListeners.push(listener);
  }

  /** Resolves when progress >= value; rejects after timeoutMs. */
  async waitForProgress(value: number, timeoutMs = 10_000): Promise<number> {
    const deadline = performance.now() + timeoutMs;
    for (;;) {
      const seq = Atomics.load(this.#ctl, Ctl.PROGRESS_SEQ);
      if (this.progress >= value) return this.progress;
      const left = deadline - performance.now();
      if (left <= 0) {
        throw new KvmError("TIMEOUT", `vCPU ${this.id}: progress ${this.progress} < ${value} after ${timeoutMs} ms`, {
          vcpu: this.id,
          progress: this.progress,
          wanted: value,
        });
      }
      await Atomics.waitAsync(this.#ctl, Ctl.PROGRESS_SEQ, seq, Math.min(left, 50)).value;
    }
  }

  /**
   * Stops the thread (QUIT), then releases the mappings and the fd. Returns false when the
   * thread did not leave KVM_RUN within the timeout (the guest never exits): the caller (Vm)
   * then forces it out by removing the memslots and calls close() again.
   */
  async close(timeoutMs = DEFAULT_CLOSE_TIMEOUT_MS): Promise<boolean> {
    if (this.#worker) {
      this.#bump(Cmd.QUIT);
      Atomics.store(this.#runU8, KvmRun.immediate_exit, 1);
      let timer: NodeJS.Timeout | undefined;
      const timedOut = await Promise.race([
        (this.#exited as Promise<void>).then(() => false),
        new Promise<boolean>((r) => {
          timer = setTimeout(() => r(true), timeoutMs);
        }),
      ]);
      clearTimeout(timer);
      if (timedOut) return false;
      this.#worker = null;
    }
    if (this.#closed) return true;
    this.#closed = true;
    this.#ringMapping?.close();
    this.runMapping.close();
    this.fd.close();
    return true;
  }

  async [Symbol.asyncDispose](): Promise<void> {
    await this.close();
  }

  get closed(): boolean {
    return this.#closed;
  }

  #assertThread(): void {
    if (!this.#worker || this.#closed) {
      throw new KvmError("BAD_STATE", `vCPU ${this.id} has no running thread: call start() first`, { vcpu: this.id });
    }
  }

  #assertParked(what: string): void {
    if (this.#closed) throw new KvmError("BAD_STATE", `${what} on closed vCPU ${this.id}`, { vcpu: this.id });
    if (this.#worker && !this.#parked) {
      throw new KvmError("BAD_STATE", `${what} while vCPU ${this.id} runs: pause() it first`, { vcpu: this.id });
    }
  }
}
