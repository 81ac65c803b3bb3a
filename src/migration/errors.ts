export type MigrationErrorCode =
  | "BAD_HEADER" // the stream does not start with our magic, or an unknown version
  | "TRUNCATED" // the stream ended in the middle of a record or before END
  | "CORRUPT" // a record's checksum does not match its bytes
  | "BAD_RECORD" // an unknown record type, a record out of order, or a malformed payload
  | "REGION_MISMATCH" // the source's memory layout is not the destination's
  | "BAD_PAGE" // a page outside its region, inside a discarded block, or a bad flag
  | "DIGEST_MISMATCH" // both sides finished but the memory differs
  | "CONNECTION_LOST" // the peer closed or reset the connection
  | "CONNECTION_REFUSED" // nobody listens at the endpoint (connect refused, no such socket)
  | "PEER_FAILED" // the peer reported a failure on its side
  | "NOT_CONVERGED" // precopy hit its round limit with the predicted downtime still over the limit
  | "UNSUPPORTED" // a capability this side or this kernel lacks
  | "ABORTED" // cancelled by the caller
  | "AUTH_FAILED" // TLS: the peer's certificate, identity or key was rejected, or credentials are unusable
  | "INSECURE" // plain TCP beyond loopback without the operator's explicit --insecure
  | "REQUEST_REFUSED" // a page request over the source's bounds (served never, or later)
  | "ILLEGAL_TRANSITION"; // a phase change the side's state diagram does not have (phases.ts)

/**
 * A migration that failed. `offset` is the byte offset in the incoming stream where the bad
 * input starts (the first byte of the offending record, or where the stream ended); nothing
 * at or past it was applied. `details` carries the values that were wrong.
 */
export class MigrationError extends Error {
  override readonly name = "MigrationError";
  constructor(
    readonly code: MigrationErrorCode,
    message: string,
    readonly offset?: number,
    readonly details: Record<string, unknown> = {},
  ) {
    super(offset === undefined ? message : `${message} (at stream offset ${offset})`);
  }
}

export function asMigrationError(e: unknown, fallback: MigrationErrorCode = "CONNECTION_LOST"): MigrationError {
  if (e instanceof MigrationError) return e;
  const err = e as { message?: unknown; code?: unknown };
  return new MigrationError(fallback, String(err?.message ?? e), undefined, {
    cause: typeof err?.code === "string" ? err.code : undefined,
  });
}

/**
 * `p`, or a CONNECTION_LOST with `message` when `deadline` (a performance.now() time) comes
 * first. `dispose` gets what `p` yields if it comes after that (a connection nobody waits for).
 */
export async function withDeadline<T>(
  p: Promise<T>,
  deadline: number,
  message: string,
  dispose?: (late: T) => void,
): Promise<T> {
  let t: NodeJS.Timeout | undefined;
  let late = false;
  const timeout = new Promise<never>((_, rej) => {
    t = setTimeout(
      () => {
        late = true;
        rej(new MigrationError("CONNECTION_LOST", message));
      },
      Math.max(0, deadline - performance.now()),
    );
  });
  try {
    return await Promise.race([p, timeout]);
  } catch (e) {
    if (dispose)
      p.then(
        (v) => {
          if (late) dispose(v);
        },
        () => undefined,
      );
    throw e;
  } finally {
    clearTimeout(t);
  }
}
