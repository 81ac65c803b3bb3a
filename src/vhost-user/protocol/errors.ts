/** What went wrong, in one word a handler or a test can switch on. */
export type VhostUserErrorCode =
  /** Header flags carry a version other than 0x1. */
  | "BAD_VERSION"
  /** Header flags have reserved bits set, or REPLY where a request was expected (or the reverse). */
  | "BAD_FLAGS"
  /** The request code is not in the table of this channel. */
  | "UNKNOWN_REQUEST"
  /** The payload size does not match the layout the request carries. */
  | "BAD_SIZE"
  /** Header size field above the connection's limit: framing cannot be trusted any more. */
  | "PAYLOAD_TOO_LARGE"
  /** Wrong number of fds in the ancillary data for this message. */
  | "BAD_FD_COUNT"
  /** An fd of the wrong kind (e.g. not a userfaultfd where one is required). */
  | "BAD_FD"
  /** The kernel dropped fds the peer sent (more than fit in one receive). */
  | "FDS_TRUNCATED"
  /** A memory table with more regions than the spec allows. */
  | "TOO_MANY_REGIONS"
  /** A field holds a value the spec does not define (reserved bits, unknown enum, bad padding). */
  | "BAD_VALUE"
  /** Encoding was asked for a value that does not fit its field. */
  | "OUT_OF_RANGE"
  /** A reply arrived that no pending request waits for. */
  | "UNEXPECTED_REPLY"
  /** A request arrived on a connection that nobody serves requests on. */
  | "UNEXPECTED_REQUEST"
  /** REPLY_ACK: the peer answered with a non-zero u64. */
  | "NACK"
  /** No reply before the deadline. */
  | "TIMEOUT"
  /** The peer closed the socket (or it failed) while we were waiting. */
  | "DISCONNECTED"
  /** The connection was closed by us. */
  | "CLOSED";

export interface VhostUserErrorDetails {
  /** The spec's request name, e.g. "SET_MEM_TABLE", when known. */
  request?: string;
  /** The offending value (a size, a count, a code, flags...). */
  value?: number | bigint | string;
  /** What the spec expects, in words or as a number. */
  expected?: number | bigint | string;
  cause?: unknown;
}

/** Any protocol-level failure on a vhost-user channel. A peer's bad input becomes one of these, never a crash. */
export class VhostUserError extends Error {
  override readonly name = "VhostUserError";
  readonly code: VhostUserErrorCode;
  readonly request: string | undefined;
  readonly value: number | bigint | string | undefined;
  readonly expected: number | bigint | string | undefined;

  constructor(code: VhostUserErrorCode, message: string, details: VhostUserErrorDetails = {}) {
    const where = details.request ? `${details.request}: ` : "";
    const got = details.value !== undefined ? ` (got ${fmt(details.value)}` : "";
    const want =
      details.expected !== undefined ? `${got ? ", " : " ("}expected ${fmt(details.expected)})` : got ? ")" : "";
    super(`${code}: ${where}${message}${got}${want}`, details.cause !== undefined ? { cause: details.cause } : {});
    this.code = code;
    this.request = details.request;
    this.value = details.value;
    this.expected = details.expected;
  }
}

function fmt(v: number | bigint | string): string {
  if (typeof v === "string") return v;
  return typeof v === "bigint" ? `0x${v.toString(16)}` : String(v);
}
