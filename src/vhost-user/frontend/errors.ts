/**
 * What a caller of the frontend did that the negotiated protocol does not allow, or that the
 * frontend cannot express on the wire. Failures of the peer (timeouts, NACKs, disconnects,
 * malformed replies) stay VhostUserError from the protocol layer, always naming the request.
 */
export type FrontendErrorCode =
  /** The request needs a feature or protocol feature that was not negotiated (or not offered). */
  | "NOT_NEGOTIATED"
  /** A guest memory region has no fd (anonymous memory cannot be shared with a backend). */
  | "NO_FD"
  /**
   * A region's fd is not size-sealed (F_SEAL_SHRINK | F_SEAL_GROW): the back-end could truncate
   * it and make our next access to guest memory a SIGBUS. FrontendOptions.allowUnsealedMemory
   * lets a caller that trusts its back-end share such memory anyway.
   */
  | "UNSEALED"
  /** More memory regions than the backend accepts. */
  | "TOO_MANY_REGIONS"
  /** A ring address is not inside one region of the memory table. */
  | "BAD_ADDRESS"
  /** An argument out of range (ring index, queue size, log size). */
  | "BAD_ARGUMENT"
  /** The call does not fit the current state (no memory table, logging already on/off, ring not set up). */
  | "BAD_STATE";

export class FrontendError extends Error {
  override readonly name = "FrontendError";
  constructor(
    readonly code: FrontendErrorCode,
    message: string,
    /** The vhost-user request the call would have sent, when there is one. */
    readonly request?: string,
  ) {
    super(`${code}: ${request ? `${request}: ` : ""}${message}`);
  }
}
