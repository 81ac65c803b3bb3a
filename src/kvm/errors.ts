import { errnoName } from "../sys/errors.js";
import type { Fd } from "../sys/fd.js";
import { ioctlRaw } from "../sys/ioctl.js";

export type KvmErrorCode =
  | "NO_KVM" // /dev/kvm missing or not openable
  | "API_VERSION" // KVM_GET_API_VERSION is not 12
  | "IOCTL" // an ioctl failed; `values.errno` and `values.ioctl` say which
  | "BAD_MEMSLOT" // a memslot that is not page aligned, overlaps, or exceeds the slot count
  | "BAD_VCPU_ID" // a vCPU id out of range or already taken
  | "BAD_STATE" // an operation not allowed in the current state (vCPU running, VM closed ...)
  | "CAP_UNSUPPORTED" // a capability the kernel does not offer
  | "FAIL_ENTRY" // KVM_EXIT_FAIL_ENTRY: the hardware refused to enter the guest
  | "INTERNAL_ERROR" // KVM_EXIT_INTERNAL_ERROR (emulation failure, ...)
  | "SHUTDOWN" // KVM_EXIT_SHUTDOWN: triple fault
  | "UNKNOWN_EXIT" // an exit reason this VMM does not handle
  | "RUN_FAILED" // KVM_RUN returned an error other than EINTR
  | "TIMEOUT"; // a vCPU thread did not answer in time

/** A KVM failure, with the exact values involved (errno, exit reason, slot, id ...). */
export class KvmError extends Error {
  override readonly name = "KvmError";
  constructor(
    readonly code: KvmErrorCode,
    message: string,
    readonly values: Readonly<Record<string, number | bigint | string>> = {},
  ) {
    super(message);
  }
}

/** An ioctl on a KVM fd: the result, or a KvmError("IOCTL") naming the request and errno. */
export function kvmIoctl(
  fd: Fd | number,
  request: number,
  arg: ArrayBufferView | number | bigint | undefined,
  name: string,
): number {
  const r = ioctlRaw(fd, request, arg);
  if (r < 0) throw new KvmError("IOCTL", `${name}: ${errnoName(-r)}`, { ioctl: name, errno: -r, code: errnoName(-r) });
  return r;
}
