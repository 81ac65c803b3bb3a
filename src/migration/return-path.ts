/**
 * The source's end of the return path (see ReturnPath below). Kept apart from source.ts: the
 * postcopy fault path on this side is page requests in, requested pages out.
 */
import type { Duplex } from "node:stream";
import type { DiscardMap } from "../memory/discard-map.js";
import type { GuestMemoryRegion } from "../memory/region.js";
import { isZero } from "../sys/bulk.js";
import { RequestServer } from "../sys/postcopy-thread.js";
import { type Record, RecordReader, type RecordWriter, type StreamReader } from "./channel.js";
import { residencyImpliesZero } from "./digest.js";
import { asMigrationError, MigrationError } from "./errors.js";
import type { RequestStats } from "./events.js";
import { FaultServer } from "./fault-server.js";
import { decodeComplete, decodeFail, decodePageRequest, encodePages, RecordType, recordName } from "./format.js";
import { PAGE, PageSet, SharedPageSet } from "./page-set.js";

/** A page request for more pages than this (one 2 MiB huge page) is refused whole. */
export const MAX_REQUEST_PAGES = 512;
/** Requested pages are only written while the serving socket holds less than this. */
export const REQUEST_QUEUE_BYTES = 1024 * 1024;

/** What the return path needs to know of a region. */
export interface ReturnPathRegion {
  region: GuestMemoryRegion;
  pages: number;
  discard: DiscardMap | undefined;
}

/**
 * The source's end of the return path: page requests (postcopy), the final COMPLETE, or the
 * destination's FAIL. Any failure here fails the migration at the next check().
 *
 * Page requests are bounded: a request for more than MAX_REQUEST_PAGES is refused whole; a page
 * asked for before on this connection is not queued again, nor is one already sent on the same
 * stream the answer would take (with a preempt channel, a page the background stream sent may
 * still be megabytes behind it, so a fault gets it once on the preempt channel); so whatever the
 * destination asks, each page is queued at most once per connection (recovery starts a new
 * ReturnPath from what the destination holds); and queued pages are written only while the serving socket holds less than
 * REQUEST_QUEUE_BYTES, the rest wait as page numbers. So a flood of requests costs at most one
 * entry per page of guest memory, never copies of pages.
 */
export class ReturnPath {
  failure: MigrationError | null = null;
  readonly complete: Promise<{ ok: boolean; digests: Uint8Array[] }>;
  readonly resumed: Promise<void>;
  #resolveComplete!: (v: { ok: boolean; digests: Uint8Array[] }) => void;
  #rejectComplete!: (e: MigrationError) => void;
  #resolveResumed!: () => void;
  #rejectResumed!: (e: MigrationError) => void;
  #serveWriter: RecordWriter | null = null;
  #view: ((region: number, page: number) => Uint8Array) | null = null;
  readonly #sent: PageSet[];
  /** Pages queued because they were asked for (each at most once per connection). */
  readonly #requested: PageSet[];
  /** The serving socket is a channel of its own (preempt), not the main stream. */
  #preempt = false;
  #set: PageSet[] = [];
  /** Requested pages not written yet: region * 2^32 + page, each at most once. */
  #queue: number[] = [];
  #queueHead = 0;
  #waitingDrain = false;
  #closed = false;

  constructor(
    readonly reader: StreamReader,
    readonly regions: readonly ReturnPathRegion[],
    readonly stats: RequestStats,
    readonly onRefused: (e: MigrationError) => void,
  ) {
    this.complete = new Promise((res, rej) => {
      this.#resolveComplete = res;
      this.#rejectComplete = rej;
    });
    this.resumed = new Promise((res, rej) => {
      this.#resolveResumed = res;
      this.#rejectResumed = rej;
    });
    // Either may never be awaited (a failure before switchover).
    this.complete.catch(() => undefined);
    this.resumed.catch(() => undefined);
    // Shared: the native request server marks the pages it sends here too.
    this.#sent = regions.map((r) => new SharedPageSet(r.pages));
    this.#requested = regions.map((r) => new PageSet(r.pages));
  }

  #writer: RecordWriter | null = null;

  #done: Promise<void> = Promise.resolve();

  start(writer: RecordWriter): void {
    this.#writer = writer;
    this.#done = this.#loop();
  }

  /** Resolves when the return path has ended (or after `ms`). */
  settled(ms: number): Promise<void> {
    return Promise.race([this.#done, new Promise<void>((r) => setTimeout(r, ms))]);
  }

  /**
   * Requested pages go to `writer` from now on (queued ones too); `preempt`: it is a channel of
   * its own, ahead of the background stream.
   */
  servePages(writer: RecordWriter, view: (region: number, page: number) => Uint8Array, preempt = false): void {
    this.#preempt = preempt;
    this.#serveWriter = writer;
    this.#view = view;
    this.#waitingDrain = false;
    this.#pump();
  }

  /** The pages the source still had to send when postcopy started (bitmaps per region). */
  setPostcopySet(sets: PageSet[]): void {
    this.#set = sets;
  }

  /** Postcopy recovery: what the destination holds counts as sent. */
  setSent(sets: PageSet[]): void {
    for (const [i, b] of sets.entries()) (this.#sent[i] as PageSet).addAll(b);
  }

  markSent(i: number, p: number): void {
    (this.#sent[i] as PageSet).set(p);
  }

  wasSent(i: number, p: number): boolean {
    return (this.#sent[i] as PageSet).has(p);
  }

  fail(e: MigrationError): void {
    if (this.failure) return;
    this.failure = e;
    this.#writer?.abort(e);
    this.#rejectComplete(e);
    this.#rejectResumed(e);
  }

  check(): void {
    if (this.failure) throw this.failure;
  }

  /** Requests read on the preempt channel (JS), until the native server takes it. */
  #preemptReader: RecordReader | null = null;
  /** The native thread that answers requests on the preempt channel (see serveNatively). */
  #native: RequestServer | null = null;
  #nativeDone: (() => void) | null = null;

  /**
   * Reads PAGE_REQUESTs that the destination sends on the preempt channel (a destination whose
   * fault thread owns that channel asks there) and serves them like the return path's.
   */
  readPreemptRequests(stream: Duplex): void {
    const reader = new RecordReader(stream);
    this.#preemptReader = reader;
    (async () => {
      try {
        for (;;) {
          const r = await reader.next();
          if (this.#preemptReader !== reader) return;
          if (r.type !== RecordType.PageRequest)
            throw r.payload.error(`unexpected ${recordName(r.type)} on the preempt channel's return path`);
          this.#pageRequest(r);
        }
      } catch (e) {
        if (this.#closed || this.#preemptReader !== reader) return;
        const err = asMigrationError(e);
        // The channel's loss is reported by its close event (recovery may take over).
        if (err.code !== "TRUNCATED" && err.code !== "CONNECTION_LOST") this.fail(err);
      }
    })();
  }

  /**
   * Hands the preempt channel (a plain socket) to a native thread that reads the requests on it
   * and answers each straight from guest memory, never queued behind the background stream or
   * this thread's event loop. Requests read on the main return path are passed to it. Returns
   * false (nothing changed) when the channel cannot be served natively (TLS). `stream` is closed
   * here: the thread has its own fd; the caller must not count that as the channel's loss.
   */
  serveNatively(stream: Duplex): boolean {
    if (this.#native || !FaultServer.canServeNatively(stream)) return false;
    const fd = (stream as unknown as { _handle: { fd: number } })._handle.fd;
    const offset = this.#preemptReader?.offset ?? 0;
    this.#preemptReader?.detach();
    this.#preemptReader = null;
    stream.pause();
    this.#native = new RequestServer(
      fd,
      this.regions.map((r, i) => {
        const d = r.discard?.toShared();
        return {
          memory: r.region.bytes(0, r.region.size) as Uint8Array,
          sent: (this.#sent[i] as PageSet).bytes,
          discard: d ? new Uint8Array(d.buffer, 0, Math.ceil(d.size / d.blockSize)) : null,
          blockSize: d?.blockSize ?? 0,
          absentIsZero: residencyImpliesZero(r.region),
        };
      }),
      offset,
      () => this.#onNativeEvent(),
    );
    stream.destroy();
    return true;
  }

  #onNativeEvent(): void {
    const t = this.#native;
    if (!t) return;
    const st = t.status();
    if (st.state === 1) this.#nativeDone?.();
    if (st.state === 2) this.fail(new MigrationError(st.code as MigrationError["code"], st.message));
  }

  /**
   * The background stream is complete: the native server writes what it has queued, then
   * PREEMPT_END, and stops. Requests after this are served on the main stream (servePages).
   */
  async finishNative(): Promise<void> {
    const t = this.#native;
    if (!t) return;
    const done = new Promise<void>((resolve) => {
      this.#nativeDone = resolve;
    });
    t.finish();
    await Promise.race([done, this.complete.then(() => undefined)]);
    this.check();
    this.#stopNative();
  }

  #stopNative(): void {
    const t = this.#native;
    if (!t) return;
    this.#native = null;
    t.stop();
    const n = t.stats();
    const st = this.stats;
    st.requests += n.requests;
    st.pagesQueued += n.pagesQueued;
    st.duplicates += n.duplicates;
    st.resentAhead += n.resentAhead;
    st.refused += n.refused;
    st.absentZeros += n.absentZeros;
  }

  close(): void {
    this.#stopNative();
    this.#preemptReader?.detach();
    this.#preemptReader = null;
    this.#closed = true;
    this.#queue = [];
    this.#queueHead = 0;
    this.reader.detach();
  }

  #request(region: number, page: number, count: number): void {
    const st = this.stats;
    st.requests++;
    const ri = this.regions[region] as ReturnPathRegion;
    if (count > MAX_REQUEST_PAGES || !this.#serveWriter) {
      st.refused++;
      this.onRefused(
        new MigrationError(
          "REQUEST_REFUSED",
          this.#serveWriter
            ? `a page request for ${count} pages (at most ${MAX_REQUEST_PAGES})`
            : "a page request before postcopy",
          undefined,
          { region, page, count },
        ),
      );
      return;
    }
    const set = this.#set[region];
    for (let p = page; p < page + count; p++) {
      if (ri.discard?.isDiscarded(p * PAGE)) continue;
      // Asked for before on this connection: never queued twice. Sent by the background stream
      // only: it may still be megabytes away behind it, so a fault gets it once more ahead.
      if ((this.#requested[region] as PageSet).has(p) || (this.wasSent(region, p) && !this.#preempt)) {
        st.duplicates++;
        continue;
      }
      (this.#requested[region] as PageSet).set(p);
      if (this.wasSent(region, p)) st.resentAhead++;
      this.markSent(region, p);
      if (set && !set.has(p)) st.outsideSet++;
      st.pagesQueued++;
      // Checked and counted here; the native server (when it has the channel) only sends it.
      if (this.#native) this.#native.queue(region, p);
      else this.#queue.push(region * 2 ** 32 + p);
    }
    this.#pump();
  }

  /** Writes queued pages while the serving socket holds less than REQUEST_QUEUE_BYTES. */
  #pump(): void {
    const w = this.#serveWriter;
    const view = this.#view;
    if (!w || !view || this.#closed) return;
    while (this.#queueHead < this.#queue.length && w.pending < REQUEST_QUEUE_BYTES) {
      const key = this.#queue[this.#queueHead++] as number;
      const region = Math.floor(key / 2 ** 32);
      const page = key % 2 ** 32;
      const rec = encodePages(
        region,
        [page],
        PAGE,
        (p) => view(region, p),
        (p) => isZero(view(region, p)),
      );
      w.writeNow(rec.record);
      if (w.pending > this.stats.maxQueuedBytes) this.stats.maxQueuedBytes = w.pending;
    }
    if (this.#queueHead === this.#queue.length) {
      this.#queue = [];
      this.#queueHead = 0;
      return;
    }
    if (this.#waitingDrain) return;
    this.#waitingDrain = true;
    w.drain().then(
      () => {
        if (this.#serveWriter !== w) return;
        this.#waitingDrain = false;
        this.#pump();
      },
      () => undefined,
    );
  }

  #pageRequest(r: Record): void {
    const q = decodePageRequest(r.payload);
    const ri = this.regions[q.region];
    if (!ri || q.count === 0 || q.page + q.count > ri.pages)
      throw r.payload.error(`request for pages [${q.page}, +${q.count}) of region ${q.region}`, q);
    this.#request(q.region, q.page, q.count);
  }

  async #loop(): Promise<void> {
    try {
      for (;;) {
        const r = await this.reader.next();
        switch (r.type) {
          case RecordType.PageRequest:
            this.#pageRequest(r);
            break;
          case RecordType.Resumed:
            r.payload.end();
            this.#resolveResumed();
            break;
          case RecordType.Complete:
            this.#resolveComplete(decodeComplete(r.payload));
            return;
          case RecordType.Fail: {
            const f = decodeFail(r.payload);
            throw new MigrationError("PEER_FAILED", `destination failed: ${f.code}: ${f.message}`, undefined, {
              peerCode: f.code,
              peerMessage: f.message,
            });
          }
          default:
            throw r.payload.error(`unexpected ${recordName(r.type)} on the return path`);
        }
      }
    } catch (e) {
      if (this.#closed) return;
      const err = asMigrationError(e);
      this.fail(
        err.code === "TRUNCATED"
          ? new MigrationError("CONNECTION_LOST", `destination connection lost: ${err.message}`, undefined, err.details)
          : err,
      );
    }
  }
}
