import { GuestMemoryError } from "./errors.js";

/** Guest-physical addresses above this are rejected: JS numbers are exact only up to 2^53. */
export const MAX_GUEST_ADDRESS = Number.MAX_SAFE_INTEGER;

/**
 * A guest-physical address. Inside vmshift addresses are plain numbers (exact below 2^53,
 * more than any real guest-physical address space), and this class is the checked door for
 * 64-bit values that come from peers: `GuestAddress.from(0xffff_ffff_ffff_f000n)` is an error,
 * never a rounded number.
 */
export class GuestAddress {
  private constructor(readonly value: number) {}

  static from(v: number | bigint | GuestAddress): GuestAddress {
    return v instanceof GuestAddress ? v : new GuestAddress(toGpa(v));
  }

  add(n: number): GuestAddress {
    return GuestAddress.from(this.value + n);
  }

  toBigInt(): bigint {
    return BigInt(this.value);
  }

  toString(): string {
    return hex(this.value);
  }
}

export type GpaLike = number | bigint | GuestAddress;

export function hex(v: number | bigint): string {
  return `0x${v.toString(16)}`;
}

/** An exact, non-negative address as a number, or a GuestMemoryError. */
export function toGpa(v: GpaLike): number {
  if (typeof v === "number") {
    if (Number.isSafeInteger(v) && v >= 0) return v;
    throw new GuestMemoryError("NOT_REPRESENTABLE", `guest address ${v} is not an exact non-negative integer`);
  }
  if (typeof v === "bigint") {
    if (v >= 0n && v <= BigInt(MAX_GUEST_ADDRESS)) return Number(v);
    throw new GuestMemoryError("NOT_REPRESENTABLE", `guest address ${hex(v)} is outside the representable range`, v);
  }
  return v.value;
}

/** An exact length (bytes) as a number, or a GuestMemoryError naming the address it went with. */
export function toLength(v: number | bigint, address?: number | bigint): number {
  const n = typeof v === "bigint" ? (v <= BigInt(MAX_GUEST_ADDRESS) && v >= 0n ? Number(v) : -1) : v;
  if (Number.isSafeInteger(n) && n >= 0) return n;
  throw new GuestMemoryError(
    "NOT_REPRESENTABLE",
    `length ${v} is not an exact non-negative integer`,
    address === undefined ? undefined : BigInt(address),
    typeof v === "bigint" ? v : undefined,
  );
}
