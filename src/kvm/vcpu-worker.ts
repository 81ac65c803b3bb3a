/**
 * A vCPU's thread: calls KVM_RUN in a loop and handles exits (see protocol.ts). KVM_RUN blocks
 * for as long as the guest runs, so it never runs on the main thread. This module loads its
 * own instance of the addon (it is context-aware); the vCPU fd number is valid here because
 * fds belong to the process, and the fd stays owned by the main thread's Vcpu, which closes
 * it only after this worker has exited.
 */
import { parentPort, workerData } from "node:worker_threads";
import { ioctlRaw } from "../sys/ioctl.js";
import {
  exitName,
  KVM_EXIT_DIRTY_RING_FULL,
  KVM_EXIT_FAIL_ENTRY,
  KVM_EXIT_HLT,
  KVM_EXIT_INTERNAL_ERROR,
  KVM_EXIT_IO,
  KVM_EXIT_IO_OUT,
  KVM_EXIT_MMIO,
  KVM_EXIT_SHUTDOWN,
  KVM_RUN,
  KvmRun,
} from "./abi.js";
import {
  Cmd,
  Ctl,
  type ExitError,
  MAX_PENDING_IO,
  type PauseReason,
  VcpuRunState,
  type WorkerEvent,
  type WorkerInit,
} from "./protocol.js";

const port = parentPort;
if (!port) throw new Error("vcpu-worker.ts must run in a worker thread");
const init = workerData as WorkerInit;
const post = (e: WorkerEvent) => port.postMessage(e);

/** Posts an I/O or MMIO report unless MAX_PENDING_IO are still unhandled on the main thread. */
function report(e: WorkerEvent): void {
  if (Atomics.load(ctl, Ctl.IO_PENDING) >= MAX_PENDING_IO) {
    Atomics.add(ctl, Ctl.IO_DROPPED, 1);
    return;
  }
  Atomics.add(ctl, Ctl.IO_PENDING, 1);
  post(e);
}

const ctl = new Int32Array(init.control);
const run = new DataView(init.run);
const runU8 = new Uint8Array(init.run);
const EINTR = 4;
const EAGAIN = 11;

/** An I/O or MMIO exit completes only on the next KVM_RUN (api.rst, "KVM_EXIT_IO"). */
let pendingCompletion = false;
let lastExit = -1;

function kvmRun(): number {
  const r = ioctlRaw(init.fd, KVM_RUN, 0);
  Atomics.add(ctl, Ctl.EXITS, 1);
  pendingCompletion = false;
  return r;
}

/** Finishes a pending I/O or MMIO without running any guest instruction, so state is consistent. */
function completePending(): void {
  if (!pendingCompletion) return;
  Atomics.store(runU8, KvmRun.immediate_exit, 1);
  const r = kvmRun();
  Atomics.store(runU8, KvmRun.immediate_exit, 0);
  if (r < 0 && r !== -EINTR) throw new Error(`KVM_RUN (completion) failed: errno ${-r}`);
}

/** Parks until main sends a command other than PAUSE; returns it. */
function park(reason: PauseReason, error?: ExitError): number {
  completePending();
  // A self-pause must not override a command main gave meanwhile (a QUIT, or a PAUSE it waits on).
  Atomics.compareExchange(ctl, Ctl.CMD, Cmd.RUN, Cmd.PAUSE);
  let seq = Atomics.load(ctl, Ctl.CMD_SEQ);
  let cmd = Atomics.load(ctl, Ctl.CMD);
  Atomics.store(ctl, Ctl.STATE, VcpuRunState.PAUSED);
  post({ type: "paused", reason, ack: seq, exitReason: lastExit, ...(error ? { error } : {}) });
  while (cmd === Cmd.PAUSE || cmd === Cmd.NONE) {
    Atomics.wait(ctl, Ctl.CMD_SEQ, seq);
    const s = Atomics.load(ctl, Ctl.CMD_SEQ);
    cmd = Atomics.load(ctl, Ctl.CMD);
    if (s !== seq && cmd === Cmd.PAUSE) post({ type: "paused", reason: "command", ack: s, exitReason: lastExit });
    seq = s;
  }
  if (cmd === Cmd.RUN) {
    // Cleared before the command word is read again: a pause main sets from here on either is
    // seen in CMD or makes the next KVM_RUN return EINTR.
    Atomics.store(runU8, KvmRun.immediate_exit, 0);
    Atomics.store(ctl, Ctl.STATE, VcpuRunState.RUNNING);
  }
  return cmd;
}

function ioData(offset: number, bytes: number): Uint8Array {
  return runU8.subarray(offset, offset + bytes);
}

function handleIo(): PauseReason | null {
  const direction = run.getUint8(KvmRun.io_direction);
  const size = run.getUint8(KvmRun.io_size);
  const ioPort = run.getUint16(KvmRun.io_port, true);
  const count = run.getUint32(KvmRun.io_count, true);
  const dataOffset = Number(run.getBigUint64(KvmRun.io_data_offset, true));
  pendingCompletion = true;
  const data = ioData(dataOffset, size * count);
  if (direction === KVM_EXIT_IO_OUT) {
    if (ioPort === Atomics.load(ctl, Ctl.PROGRESS_PORT) && size === 4 && count === 1) {
      const v = run.getUint32(dataOffset, true);
      Atomics.store(ctl, Ctl.PROGRESS, v | 0);
      Atomics.add(ctl, Ctl.PROGRESS_SEQ, 1);
      Atomics.notify(ctl, Ctl.PROGRESS_SEQ);
      const stopAt = Atomics.load(ctl, Ctl.STOP_AT) >>> 0;
      if (stopAt !== 0 && v >>> 0 >= stopAt) return "stop-at";
      const us = Atomics.load(ctl, Ctl.THROTTLE_US);
      // Wakes early on any command, so a throttled vCPU still pauses at once.
      if (us > 0) Atomics.wait(ctl, Ctl.CMD_SEQ, Atomics.load(ctl, Ctl.CMD_SEQ), us / 1000);
      return null;
    }
    report({ type: "io", direction: "out", port: ioPort, size, count, data: Array.from(data) });
  } else {
    // No device model behind other ports: reads float high, as on an empty ISA bus.
    data.fill(0xff);
    report({ type: "io", direction: "in", port: ioPort, size, count, data: Array.from(data) });
  }
  return null;
}

function handleMmio(): void {
  const address = Number(run.getBigUint64(KvmRun.mmio_phys_addr, true));
  const length = run.getUint32(KvmRun.mmio_len, true);
  const isWrite = run.getUint8(KvmRun.mmio_is_write) !== 0;
  const data = ioData(KvmRun.mmio_data, Math.min(length, 8));
  pendingCompletion = true;
  if (!isWrite) data.fill(0);
  report({ type: "mmio", isWrite, address, length, data: Array.from(data) });
}

function exitError(reason: number): ExitError {
  switch (reason) {
    case KVM_EXIT_FAIL_ENTRY:
      return {
        code: "FAIL_ENTRY",
        message: "KVM_EXIT_FAIL_ENTRY: the guest state was refused at entry",
        values: {
          hardwareEntryFailureReason: `0x${run.getBigUint64(KvmRun.fail_entry_reason, true).toString(16)}`,
          cpu: run.getUint32(KvmRun.fail_entry_cpu, true),
        },
      };
    case KVM_EXIT_INTERNAL_ERROR: {
      const ndata = Math.min(run.getUint32(KvmRun.internal_ndata, true), 16);
      const values: Record<string, number | string> = {
        suberror: run.getUint32(KvmRun.internal_suberror, true),
        ndata,
      };
      for (let i = 0; i < ndata; i++)
        values[`data${i}`] = `0x${run.getBigUint64(KvmRun.internal_data + i * 8, true).toString(16)}`;
      return { code: "INTERNAL_ERROR", message: "KVM_EXIT_INTERNAL_ERROR", values };
    }
    case KVM_EXIT_SHUTDOWN:
      return { code: "SHUTDOWN", message: "KVM_EXIT_SHUTDOWN (triple fault)", values: {} };
    default:
      return {
        code: "UNKNOWN_EXIT",
        message: `unhandled exit ${exitName(reason)}`,
        values: {
          exitReason: reason,
          hardwareExitReason: `0x${run.getBigUint64(KvmRun.hw_hardware_exit_reason, true).toString(16)}`,
        },
      };
  }
}

function loop(): void {
  Atomics.store(ctl, Ctl.STATE, VcpuRunState.PAUSED);
  post({ type: "ready" });
  // Not park(): a run() that main sends right after "ready" must not be turned into a pause.
  while (Atomics.load(ctl, Ctl.CMD) === Cmd.NONE) Atomics.wait(ctl, Ctl.CMD_SEQ, 0);
  let cmd = Atomics.load(ctl, Ctl.CMD);
  if (cmd === Cmd.RUN) Atomics.store(ctl, Ctl.STATE, VcpuRunState.RUNNING);
  while (cmd !== Cmd.QUIT) {
    cmd = Atomics.load(ctl, Ctl.CMD);
    if (cmd === Cmd.QUIT) break;
    if (cmd !== Cmd.RUN) {
      cmd = park("command");
      continue;
    }
    const r = kvmRun();
    if (r < 0) {
      if (r === -EINTR || r === -EAGAIN) {
        // immediate_exit (or a stray signal): clear it and look at the command again.
        Atomics.store(runU8, KvmRun.immediate_exit, 0);
        continue;
      }
      lastExit = -1;
      cmd = park("error", { code: "RUN_FAILED", message: `KVM_RUN failed: errno ${-r}`, values: { errno: -r } });
      continue;
    }
    const reason = run.getUint32(KvmRun.exit_reason, true);
    lastExit = reason;
    switch (reason) {
      case KVM_EXIT_IO: {
        Atomics.add(ctl, Ctl.IO_EXITS, 1);
        const why = handleIo();
        if (why) cmd = park(why);
        break;
      }
      case KVM_EXIT_MMIO:
        Atomics.add(ctl, Ctl.IO_EXITS, 1);
        handleMmio();
        break;
      case KVM_EXIT_HLT:
        cmd = park("hlt");
        break;
      case KVM_EXIT_DIRTY_RING_FULL:
        cmd = park("dirty-ring-full");
        break;
      default:
        cmd = park("error", exitError(reason));
    }
  }
  completePending();
  Atomics.store(ctl, Ctl.STATE, VcpuRunState.EXITED);
  post({ type: "exited" });
}

loop();
port.close();
