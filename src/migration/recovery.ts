/**
 * Postcopy recovery, one module for both sides. Once the destination runs, a lost connection
 * pauses the migration: the source reconnects, the destination accepts, until a connection
 * gets through or the limit passes. Both halves follow the same loop:
 *
 *   until the deadline: take a candidate connection (source: `reconnect()`, destination:
 *   `accept()`), check it reached / came from the main connection's peer, run the recovery
 *   handshake on it; on success the side's MigrationChannel is replaced in one step
 *   (`MigrationChannel.replace`); a candidate that fails is closed (the destination reports it
 *   as `refused` and waits for the next, the source tries again after a pause), except for
 *   the failures that end the migration (`fatal`).
 *
 * The handshake (docs/migration-stream.md): the source sends the stream header and
 * RECOVER(nonce); the destination checks the nonce and answers RECEIVED (the pages it holds)
 * per region, then asks again for every page a thread waits on (PAGE_REQUEST).
 */
import type { Duplex } from "node:stream";
import {
  boundSocketBuffers,
  type ChannelParts,
  POSTCOPY_READ_AHEAD,
  POSTCOPY_SOCKET_BUFFER,
  RecordReader,
  RecordWriter,
} from "./channel.js";
import { asMigrationError, MigrationError, withDeadline } from "./errors.js";
import {
  decodeFail,
  decodeNonce,
  decodeReceived,
  encodeNonce,
  encodePageRequest,
  encodeReceived,
  encodeStreamHeader,
  RecordType,
  recordName,
} from "./format.js";
import { PageSet } from "./page-set.js";
import { describePeer, type PeerIdentity, peerIdentity, samePeer } from "./transport.js";

export interface RecoveryLoop<T> {
  /** The longest pause, ms. */
  limitMs: number;
  /** Why the migration paused (named in the final CONNECTION_LOST). */
  cause: MigrationError;
  /** The next candidate connection; `deadline` is performance.now()-based (waited for until then). */
  candidate(deadline: number): Promise<Duplex>;
  /** The peer the main connection proved (TLS), or null for plain connections. */
  peer: PeerIdentity | null;
  /** "reached" (source) or "came from" (destination), for the AUTH_FAILED message. */
  role: "source" | "destination";
  /** The handshake on a candidate that passed the peer check; its result ends the loop. */
  handshake(stream: Duplex, deadline: number): Promise<T>;
  /** A candidate that failed: true ends the migration with `e`, false tries the next one. */
  fatal(e: MigrationError): boolean;
  /** A candidate that was turned away (not fatal). */
  refused?(e: MigrationError): void;
  /** Pause between attempts, ms (the source's reconnect; 0 for a listener). */
  retryMs?: number;
  /** Checked before each attempt (the source's abort signal). */
  check?(): void;
}

/** Runs the recovery loop of either side; resolves with the first handshake that succeeds. */
export async function recoverConnection<T>(o: RecoveryLoop<T>): Promise<T> {
  const deadline = performance.now() + o.limitMs;
  let last: Error = o.cause;
  while (performance.now() < deadline) {
    o.check?.();
    let s: Duplex | null = null;
    try {
      const got = o.candidate(deadline);
      let taken = false;
      try {
        s = await withDeadline(got, deadline, "timed out waiting for a recovery connection");
        taken = true;
      } finally {
        // One that comes after the deadline is closed, not left open with nobody owning it.
        if (!taken)
          got.then(
            (late) => late.destroy(),
            () => undefined,
          );
      }
      const theirs = peerIdentity(s);
      if (!samePeer(o.peer, theirs))
        throw new MigrationError(
          "AUTH_FAILED",
          o.role === "source"
            ? `a recovery connection reached ${describePeer(theirs)}, not ${describePeer(o.peer)}`
            : `a recovery connection from ${describePeer(theirs)}, the migration's source is ${describePeer(o.peer)}`,
        );
      return await o.handshake(s, deadline);
    } catch (e) {
      s?.destroy();
      const err = asMigrationError(e);
      last = err;
      if (o.fatal(err)) throw err;
      o.refused?.(err);
      if (o.retryMs) await new Promise((r) => setTimeout(r, o.retryMs));
    }
  }
  throw new MigrationError(
    "CONNECTION_LOST",
    `postcopy paused and not recovered within ${o.limitMs} ms (last: ${last.message})`,
    undefined,
    { cause: o.cause.message },
  );
}

/**
 * The source's half of the handshake on `stream`: RECOVER(nonce), then the destination's
 * RECEIVED for each region (`pages[i]` pages). Returns the new channel's parts and what the
 * destination holds.
 */
export async function offerRecovery(
  stream: Duplex,
  nonce: bigint,
  pages: readonly number[],
  deadline: number,
): Promise<{ parts: ChannelParts; held: PageSet[] }> {
  const writer = new RecordWriter(stream, { highWater: 256 * 1024 });
  const reader = new RecordReader(stream);
  try {
    await writer.write(encodeStreamHeader());
    await writer.write(encodeNonce(RecordType.Recover, nonce));
    const held: PageSet[] = [];
    for (const [i, n] of pages.entries()) {
      const rec = await withDeadline(
        reader.next(),
        deadline,
        "timed out waiting for the destination's RECEIVED records",
      );
      if (rec.type === RecordType.Fail) {
        const f = decodeFail(rec.payload);
        throw new MigrationError("PEER_FAILED", `destination failed: ${f.code}: ${f.message}`, undefined, {
          peerCode: f.code,
        });
      }
      if (rec.type !== RecordType.Received) throw rec.payload.error(`expected RECEIVED, got ${recordName(rec.type)}`);
      const d = decodeReceived(rec.payload);
      if (d.region !== i || d.pages !== n)
        throw rec.payload.error(`RECEIVED for region ${d.region} of ${d.pages} pages`);
      held.push(PageSet.wrap(d.bitmap, d.pages));
    }
    boundSocketBuffers(stream, POSTCOPY_SOCKET_BUFFER);
    return { parts: { stream, reader, writer }, held };
  } catch (e) {
    reader.detach();
    throw e;
  }
}

/**
 * The destination's half on `stream`: the first record must be RECOVER with this migration's
 * nonce; then RECEIVED (`present[i]`, the pages held per region) and a PAGE_REQUEST for each
 * page a thread waits on (`waiting`: [region, page]). Returns the new channel's parts.
 */
export async function answerRecovery(
  stream: Duplex,
  nonce: bigint,
  present: readonly PageSet[],
  waiting: Iterable<[region: number, page: number]>,
  within: <U>(p: Promise<U>) => Promise<U>,
): Promise<ChannelParts> {
  const reader = new RecordReader(stream, { reuseBuffer: true });
  try {
    await within(reader.readStreamHeader());
    const first = await within(reader.next());
    if (first.type !== RecordType.Recover || decodeNonce(first.payload) !== nonce)
      throw first.payload.error("not a recovery connection of this migration");
    const writer = new RecordWriter(stream);
    // What is here is not sent again; what threads wait on is asked for again.
    for (const [i, set] of present.entries()) writer.writeNow(encodeReceived(i, set.pages, set.bytes));
    for (const [region, page] of waiting) writer.writeNow(encodePageRequest(region, page));
    boundSocketBuffers(stream, POSTCOPY_SOCKET_BUFFER);
    reader.setReadAhead(POSTCOPY_READ_AHEAD);
    return { stream, reader, writer };
  } catch (e) {
    reader.detach();
    throw e;
  }
}
