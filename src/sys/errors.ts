import { constants } from "node:os";

const errnoNames = new Map<number, string>();
for (const [name, value] of Object.entries(constants.errno)) errnoNames.set(value, name);

export function errnoName(errno: number): string {
  return errnoNames.get(errno) ?? `E${errno}`;
}

/** A failed system call: the call's name and the kernel's errno, nothing lost on the way. */
export class SysError extends Error {
  override readonly name = "SysError";
  /** Symbolic errno, e.g. "EAGAIN". */
  readonly code: string;
  constructor(
    readonly syscall: string,
    readonly errno: number,
    detail?: string,
  ) {
    super(`${syscall}${detail ? ` (${detail})` : ""}: ${errnoName(errno)}`);
    this.code = errnoName(errno);
  }
}

export const EAGAIN = constants.errno.EAGAIN;
export const EINTR = constants.errno.EINTR;

/** Turns a native call's thrown `{errno, syscall}` into a SysError. */
export function sys<T>(fn: () => T, detail?: string): T {
  try {
    return fn();
  } catch (e) {
    const err = e as { errno?: unknown; syscall?: unknown };
    if (typeof err.errno === "number" && typeof err.syscall === "string") {
      throw new SysError(err.syscall, err.errno, detail);
    }
    throw e;
  }
}

/** For the hot calls that return -errno: a value >= 0 passes, anything else throws. */
export function check(result: number, syscall: string, detail?: string): number {
  if (result < 0) throw new SysError(syscall, -result, detail);
  return result;
}
