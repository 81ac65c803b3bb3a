/**
 * The destination's precopy stream read on a native thread (src/sys/record-receiver.ts): the
 * same records, offsets and errors as RecordReader, without the JS thread doing the socket
 * reads, the chunk joins, the CRCs or the per-page hashes.
 *
 * Why: profiled on loopback (1 GiB, 640 MiB of data), the destination's main thread spent its
 * busy time on exactly those: node:net hands the socket over in fresh 64 KiB chunks (an
 * allocation and first-touch page faults each), a 1 MiB PAGES record was joined from ~16 of
 * them (one more copy of every byte), then CRC-32 and XXH64 read every byte again, all on the
 * thread that also copies the pages into guest memory. Here the thread reads each record once,
 * straight into a slot of a ring, and checks and hashes it there; the main thread only applies.
 *
 * It takes over a plain socket (TCP or unix, not TLS: node:tls owns the decryption) from a
 * RecordReader between two records: node:net stops reading the socket (its read is stopped and
 * the bytes it already holds are handed over), the thread reads a dup of the fd from there on.
 * Writes stay node:net's. A record that fails the thread's header or CRC check is handed over
 * marked; the error is then raised here by the same format.ts checks the JS reader uses, so it
 * is the same error at the same offset, and the thread reads nothing past it.
 */
import { Socket } from "node:net";
import type { Duplex } from "node:stream";
import { TLSSocket } from "node:tls";
import { errnoName } from "../sys/errors.js";
import { ReceivedStatus, RecordReceiverThread } from "../sys/record-receiver.js";
import type { Record, RecordReader, StreamReader } from "./channel.js";
import { MigrationError } from "./errors.js";
import { checkRecordCrc, decodeRecordHead, PayloadReader, RECORD_OVERHEAD } from "./format.js";
import { RECORD_BUFFER_SIZE } from "./page-sender.js";

/** A PAGES record of PAGES_PER_RECORD full pages fits a slot, rounded up to whole pages. */
const SLOT_SIZE = Math.ceil(RECORD_BUFFER_SIZE / 4096) * 4096;
/** Read-ahead in records (8 MiB, as RecordReader's read-ahead). */
const SLOTS = 8;

interface SocketHandle {
  fd?: unknown;
  reading?: boolean;
  readStop?: () => number;
}

function handleOf(stream: Duplex): SocketHandle | null {
  return (stream as unknown as { _handle?: SocketHandle })._handle ?? null;
}

export class NativeRecordReader implements StreamReader {
  readonly #stream: Socket;
  readonly #thread: RecordReceiverThread;
  #offset: number;
  #held = false;
  #wake: (() => void) | null = null;
  #detached = false;

  /**
   * Whether `stream` can be read natively: a plain node:net socket with an fd (not TLS), and
   * VMSHIFT_NATIVE_RECEIVE is not "0" (to compare the two readers).
   */
  static canRead(stream: Duplex): boolean {
    if (process.env.VMSHIFT_NATIVE_RECEIVE === "0" || stream instanceof TLSSocket) return false;
    const h = handleOf(stream);
    return typeof h?.fd === "number" && h.fd >= 0 && typeof h.readStop === "function";
  }

  /**
   * Takes reading over from `from` (between two records, no next() pending). `hashPages`: hash
   * every full page of PAGES records on the thread (the records carry pageHashes).
   */
  static takeOver(stream: Duplex, from: RecordReader, o: { hashPages: boolean }): NativeRecordReader {
    const h = handleOf(stream) as SocketHandle;
    const offset = from.offset;
    const held = [from.handOff()];
    // node:net stops reading the socket; `reading` stays set, so a later resume() does not
    // restart it behind the thread's back (detach() clears it again).
    stream.pause();
    h.readStop?.();
    h.reading = true;
    for (let c = stream.read(); c !== null; c = stream.read()) held.push(c as Buffer);
    const reader = new NativeRecordReader(stream as Socket, h.fd as number, offset, Buffer.concat(held), o.hashPages);
    // socket.bytesRead (what progress reports and `vmshift migrate` count as received) goes on
    // counting: node:net's own count plus what the thread read.
    const own = Object.getOwnPropertyDescriptor(Socket.prototype, "bytesRead")?.get;
    if (own)
      Object.defineProperty(stream, "bytesRead", {
        configurable: true,
        get: () => (own.call(stream) as number) + reader.#thread.bytesRead,
      });
    return reader;
  }

  private constructor(stream: Socket, fd: number, offset: number, prefix: Buffer, hashPages: boolean) {
    this.#stream = stream;
    this.#offset = offset;
    this.#thread = new RecordReceiverThread(
      fd,
      { slotSize: SLOT_SIZE, slots: SLOTS, streamOffset: offset, hashPages, prefix },
      () => {
        const w = this.#wake;
        this.#wake = null;
        w?.();
      },
    );
  }

  get offset(): number {
    return this.#offset;
  }

  /** No-op: the ring's size is the read-ahead (precopy streams only). */
  setReadAhead(_bytes: number): void {}

  async next(): Promise<Record> {
    // The previous record's payload is valid until this call (as RecordReader's reuseBuffer).
    if (this.#held) {
      this.#held = false;
      this.#thread.release();
    }
    for (;;) {
      if (this.#detached) throw new MigrationError("ABORTED", "the reader was detached");
      const r = this.#thread.take();
      if (r) {
        this.#held = true;
        if (r.status === ReceivedStatus.BadHeader) {
          decodeRecordHead(r.bytes, r.offset);
          throw new MigrationError("CORRUPT", "bad record header", r.offset);
        }
        if (r.status === ReceivedStatus.BadCrc) {
          checkRecordCrc(r.bytes, r.offset);
          throw new MigrationError("CORRUPT", "record checksum mismatch", r.offset);
        }
        this.#offset = r.offset + RECORD_OVERHEAD + r.length;
        const payload = new PayloadReader(r.bytes.subarray(8, 8 + r.length), r.type, r.offset);
        return { type: r.type, flags: r.flags, offset: r.offset, payload, pageHashes: r.pageHashes };
      }
      const end = this.#thread.end();
      // Records handed over before the end are still taken first (take() above).
      if (end.kind === "eof" || end.kind === "error") {
        if (this.#thread.ready > 0) continue;
        const cause = end.kind === "error" ? `: read: ${errnoName(end.errno)}` : "";
        const received = end.at + (end.what === "a record" ? 8 : 0) + end.had;
        throw new MigrationError("TRUNCATED", `stream ended inside ${end.what}${cause}`, received, {
          recordOffset: end.at,
          needed: end.needed,
          had: end.had,
          connectionLost: true,
        });
      }
      if (end.kind === "bad-record" && this.#thread.ready <= 0)
        throw new MigrationError("CORRUPT", "the stream stopped at a bad record", this.#offset);
      await new Promise<void>((r) => {
        this.#wake = r;
      });
    }
  }

  /**
   * Stops the thread and gives the socket back to node:net, flowing, as RecordReader.detach()
   * leaves it: what still arrives is dropped and the end of the stream is seen (so the socket
   * closes when the peer hangs up).
   */
  detach(): void {
    if (this.#detached) return;
    this.#detached = true;
    this.#thread.close();
    const h = handleOf(this.#stream);
    if (h) h.reading = false;
    if (!this.#stream.destroyed) this.#stream.resume();
  }
}
