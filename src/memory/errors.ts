export type GuestMemoryErrorCode =
  | "OUT_OF_RANGE" // the range is not (entirely) backed by guest memory
  | "NOT_REPRESENTABLE" // a 64-bit value from a peer that no region could ever hold
  | "OVERLAP" // two regions share guest-physical addresses
  | "BAD_REGION" // a region's size, offset or alignment is invalid
  | "CLOSED";

/** A guest-memory access or layout that is not allowed; carries the exact values that were wrong. */
export class GuestMemoryError extends Error {
  override readonly name = "GuestMemoryError";
  constructor(
    readonly code: GuestMemoryErrorCode,
    message: string,
    /** The address (exact, as received) and length involved, when there is one. */
    readonly address?: bigint,
    readonly length?: bigint,
  ) {
    super(message);
  }
}
