/**
 * The receiving side. Everything read is validated before it is applied: a record is applied
 * only after its CRC passed and every page index, flag and length in it was checked, so a
 * bad stream stops at the exact offset of the first bad record with nothing past it applied.
 *
 * Postcopy: after POSTCOPY_RUN the guest runs here while pages still arrive. The fault path
 * (fault-server.ts) watches the userfaultfds; a fault sends a PAGE_REQUEST on the return path;
 * the page comes back ahead of the background stream (on a second connection when the source
 * opened one: the preempt channel, accepted through `acceptPreempt`) and is placed once. More
 * userfaultfds (a vhost-user backend's, with its own address table) join through
 * addFaultDomain() and are served by the same request path.
 */
import type { Duplex } from "node:stream";
import type { DiscardMap } from "../memory/discard-map.js";
import type { GuestMemory } from "../memory/guest-memory.js";
import type { GuestMemoryRegion } from "../memory/region.js";
import { MADV_DONTNEED, MADV_REMOVE } from "../sys/mapping.js";
import type { Userfaultfd } from "../sys/userfaultfd.js";
import {
  boundSocketBuffers,
  type ChannelParts,
  MigrationChannel,
  POSTCOPY_READ_AHEAD,
  POSTCOPY_SOCKET_BUFFER,
  type Record,
  RecordReader,
  RecordWriter,
} from "./channel.js";
import { hex } from "./digest.js";
import { asMigrationError, MigrationError, withDeadline } from "./errors.js";
import { MigrationEvents, type MigrationResult } from "./events.js";
import { type FaultDomainStats, type FaultRange, FaultServer } from "./fault-server.js";
import {
  Capability,
  decodeCapabilities,
  decodeDeviceState,
  decodeDigest,
  decodeDiscard,
  decodeNonce,
  decodePages,
  decodePostcopyAdvise,
  decodePreempt,
  decodeRegion,
  decodeRound,
  encodeComplete,
  encodeFail,
  encodePageRequest,
  encodeRecord,
  type PagesRecord,
  type PayloadReader,
  RecordType,
  recordName,
} from "./format.js";
import { NativeRecordReader } from "./native-reader.js";
import { PAGE, PageSet } from "./page-set.js";
import { writeRegionPages } from "./pages.js";
import { destinationPhases } from "./phases.js";
import { ReceivedMemory, type ReceivedRegion } from "./received-memory.js";
import { answerRecovery, recoverConnection } from "./recovery.js";
import type { DeviceState } from "./source.js";
import { describePeer, type PeerIdentity, peerIdentity, samePeer } from "./transport.js";

export type { FaultDomainStats, FaultRange } from "./fault-server.js";

export interface DestinationHooks {
  /**
   * The guest may run here now (precopy: at SWITCHOVER, every page and device state received,
   * before the digests are compared; postcopy: at POSTCOPY_RUN, before pages arrive).
   */
  resume?(): void | Promise<void>;
  loadDeviceState?(state: DeviceState): void | Promise<void>;
  /**
   * Postcopy: every page has arrived (END read) and faults are still served; called before
   * the memory is hashed, so a guest that runs here can be parked at a known point first.
   */
  beforeVerify?(): void | Promise<void>;
}

export interface DestinationOptions {
  /** Fresh memory (all zero, nothing populated) with the source's layout. */
  memory: GuestMemory;
  /** Discard maps to update with the source's plug state (created internally when absent). */
  discard?: ReadonlyMap<GuestMemoryRegion, DiscardMap>;
  hooks?: DestinationHooks;
  /** Compare per-region digests at the end (default true). */
  verify?: boolean;
  signal?: AbortSignal;
  /**
   * Accepts the source's second connection when it opens a postcopy preempt channel (for a
   * listener: its next connection). Without it, such a source is refused with UNSUPPORTED.
   */
  acceptPreempt?: () => Promise<Duplex>;
  /**
   * Postcopy recovery (when the source offers it): a connection lost once the guest runs here
   * pauses the migration (faulting threads wait) until `accept` yields the source's new
   * connection, or `timeoutMs` (default 60 s) passes. This side then tells the source which
   * pages it holds and asks again for the ones its threads wait on.
   */
  postcopyRecovery?: { accept(): Promise<Duplex>; timeoutMs?: number };
}

/** How long the source's preempt connection may take to arrive once announced. */
const PREEMPT_ACCEPT_MS = 10_000;

/**
 * `accept()` within `deadline` (or until `aborted`); a connection that comes after that is
 * closed, not left open with nobody owning it.
 */
async function acceptWithin(
  accept: () => Promise<Duplex>,
  deadline: number,
  aborted: Promise<never>,
  message: string,
): Promise<Duplex> {
  const got = accept();
  let taken = false;
  try {
    const s = await withDeadline(Promise.race([got, aborted]), deadline, message);
    taken = true;
    return s;
  } finally {
    if (!taken)
      got.then(
        (s) => s.destroy(),
        () => undefined,
      );
  }
}

export class MigrationDestination {
  readonly events = new MigrationEvents();
  readonly #o: DestinationOptions;
  readonly #mem: ReceivedMemory;
  readonly #regions: readonly ReceivedRegion[];
  readonly #faults: FaultServer;
  #writer: RecordWriter | null = null;
  #postcopy = false;
  #t0 = 0;
  #pages = 0;
  #zero = 0;
  #rounds = 0;
  #preemptUsed = false;
  readonly #deviceStates: string[] = [];
  #used = false;
  /** Precopy: SWITCHOVER received, the guest runs here; this side's digests at that moment. */
  #resumedWith: Uint8Array[] | null = null;
  #resumedAt = 0;

  constructor(options: DestinationOptions) {
    this.#o = options;
    this.#mem = new ReceivedMemory(options.memory.regions, options.discard);
    this.#regions = this.#mem.regions;
    this.#faults = new FaultServer({
      memory: options.memory,
      received: this.#mem,
      request: (region, page) => this.#writer?.writeNow(encodePageRequest(region, page)),
      onStats: (stats) => this.events.emit("faults", stats),
    });
  }

  /**
   * Adds a userfaultfd that a device backend registered (MISSING) over its own mapping of the
   * same shared guest memory (`ranges`: its addresses → guest-physical): faults on it are
   * served by the same page-request path, and every page that arrives wakes its waiters there.
   * Call before the backend can fault (before it registers: for vhost-user, before the
   * acknowledgement of its postcopy memory table), at the latest in the `resume` hook. The
   * userfaultfd stays the caller's. Returns this domain's live counters.
   */
  addFaultDomain(uffd: Userfaultfd, ranges: FaultRange[]): FaultDomainStats {
    return this.#faults.addDomain(uffd, ranges);
  }

  /** The state diagram this side follows (phases.ts, docs/migration.md). */
  readonly #phases = destinationPhases((phase) =>
    this.events.emit("phase", { phase, atMs: performance.now() - this.#t0 }),
  );

  #phase(phase: Exclude<ReturnType<typeof destinationPhases>["phase"], "idle">): void {
    this.#phases.to(phase);
  }

  async run(stream: Duplex): Promise<MigrationResult> {
    if (this.#used) throw new Error("a MigrationDestination runs once");
    this.#used = true;
    this.#t0 = performance.now();
    // The preempt and recovery connections must come from the peer the main stream came from.
    const peer = peerIdentity(stream);
    // Every record is applied (or its payload copied) before the next one is read.
    // The main connection: stream, reader and writer, replaced together by postcopy recovery;
    // it also owns the preempt connection, whose records the fault side reads.
    const firstReader = new RecordReader(stream, { reuseBuffer: true });
    const channel = new MigrationChannel({
      stream,
      reader: firstReader,
      writer: new RecordWriter(stream),
    });
    this.#writer = channel.writer;
    let abortReject: ((e: Error) => void) | null = null;
    const aborted = new Promise<never>((_, rej) => {
      abortReject = rej;
    });
    aborted.catch(() => undefined);
    const onAbort = () => abortReject?.(new MigrationError("ABORTED", "migration cancelled"));
    this.#o.signal?.addEventListener("abort", onAbort, { once: true });
    let preempt: { reader: RecordReader; done: Promise<void> } | null = null;
    const digests = new Map<number, Uint8Array>();
    /** The record being applied: what fails meanwhile is its failure (recordFailure). */
    let applying: Record | null = null;
    /** Postcopy recovery: offered by the source, accepted here; and this migration's nonce. */
    let canRecover = false;
    let nonce = 0n;
    const isLoss = (e: unknown) => {
      const c = asMigrationError(e).code;
      return c === "TRUNCATED" || c === "CONNECTION_LOST";
    };
    const recover = async (cause: MigrationError) => {
      this.#phase("postcopy-paused");
      preempt?.reader.detach();
      preempt = null;
      channel.drop();
      const rec = this.#o.postcopyRecovery as NonNullable<DestinationOptions["postcopyRecovery"]>;
      channel.replace(await this.#acceptRecovery(rec, nonce, cause, aborted, peer));
      this.#writer = channel.writer;
      // The source sends its digests again after the rest of the pages.
      digests.clear();
      this.#phase("postcopy");
    };
    // The next record of the main stream; in a recoverable postcopy, across a lost connection.
    const next = async (): Promise<Record> => {
      for (;;) {
        try {
          return await Promise.race([channel.reader.next(), aborted]);
        } catch (e) {
          if (!(canRecover && this.#faults.running && isLoss(e))) throw e;
          await recover(asMigrationError(e));
        }
      }
    };
    try {
      this.#phase("setup");
      await Promise.race([firstReader.readStreamHeader(), aborted]);
      const caps = await this.#setup(next);
      if (caps & Capability.RECOVERY) {
        const r = await next();
        if (!(caps & Capability.POSTCOPY) || r.type !== RecordType.Session)
          throw r.payload.error(`expected SESSION (with the postcopy capability), got ${recordName(r.type)}`);
        nonce = decodeNonce(r.payload);
        canRecover = this.#o.postcopyRecovery !== undefined;
      }
      if (caps & Capability.PREEMPT) {
        const r = await next();
        if (!(caps & Capability.POSTCOPY) || r.type !== RecordType.Preempt)
          throw r.payload.error(`expected PREEMPT (with the postcopy capability), got ${recordName(r.type)}`);
        const pc = await this.#acceptPreempt(decodePreempt(r.payload), aborted, peer);
        channel.attachPreempt(pc.stream);
        // A failure on the preempt channel fails the migration: it wakes the main loop. In a
        // recoverable postcopy it pauses it instead, like a lost main connection.
        // Over a plain socket (and without recovery, which replaces connections) a native
        // thread serves every fault on this channel; otherwise this thread does (TLS).
        let done: Promise<void>;
        if (!canRecover && FaultServer.canServeNatively(pc.stream)) {
          pc.reader.detach();
          done = this.#faults.servePreempt(pc.stream, pc.reader.offset);
        } else done = this.#preemptLoop(pc.reader);
        done.catch((e) => {
          if (canRecover && this.#postcopy && isLoss(e)) channel.stream.destroy();
          else abortReject?.(asMigrationError(e));
        });
        preempt = { reader: pc.reader, done };
        this.#preemptUsed = true;
      }
      // Precopy keeps a hash of each page as it is written, so the digest of the memory the
      // guest resumes with is ready at SWITCHOVER. Postcopy hashes its memory after END.
      const hashing = (this.#o.verify ?? true) && !(caps & Capability.POSTCOPY);
      if (hashing) this.#mem.startHashing();
      // A precopy stream over a plain socket is read, checked and hashed on a native thread
      // from here on (native-reader.ts). Postcopy keeps the JS reader: its read-ahead is cut
      // at POSTCOPY_RUN and recovery replaces connections.
      if (!(caps & Capability.POSTCOPY) && channel.reader === firstReader && NativeRecordReader.canRead(stream))
        channel.takeOverReading(NativeRecordReader.takeOver(stream, firstReader, { hashPages: hashing }));
      let r = await next();
      this.#phase("precopy");
      // Discard maps first: the plug state must be known before any page.
      while (r.type === RecordType.Discard) {
        applying = r;
        this.#applyDiscard(r);
        applying = null;
        r = await next();
      }
      for (;;) {
        if (this.#faults.failure) throw this.#faults.failure;
        if (this.#resumedWith && r.type !== RecordType.Digest && r.type !== RecordType.End)
          throw r.payload.error(`${recordName(r.type)} after SWITCHOVER`);
        // END's work is the end of the migration (preempt channel, digests), not a record's.
        applying = r.type === RecordType.End ? null : r;
        switch (r.type) {
          case RecordType.Discard:
            // Blocks (un)plugged on the source while it runs (virtio-mem).
            this.#applyDiscard(r);
            break;
          case RecordType.Pages:
            this.#applyPages(r);
            // With a deep read-ahead, records are read without returning to the event loop:
            // let the preempt channel and the fault watches in between.
            if (preempt && this.#postcopy) await new Promise((res) => setImmediate(res));
            break;
          case RecordType.Round:
            this.#rounds = decodeRound(r.payload).round;
            break;
          case RecordType.Switchover: {
            r.payload.end();
            if (caps & Capability.POSTCOPY) throw r.payload.error("SWITCHOVER in a postcopy stream");
            this.#resumedWith = this.#mem.hashDigests();
            await this.#o.hooks?.resume?.();
            this.#resumedAt = performance.now();
            channel.writer.writeNow(encodeRecord(RecordType.Resumed));
            this.#phase("verify");
            break;
          }
          case RecordType.DeviceState: {
            const s = decodeDeviceState(r.payload);
            await this.#o.hooks?.loadDeviceState?.(s);
            this.#deviceStates.push(s.name);
            break;
          }
          case RecordType.PostcopyAdvise:
            if (!(caps & Capability.POSTCOPY) || this.#postcopy)
              throw r.payload.error("POSTCOPY_ADVISE without the postcopy capability or after POSTCOPY_RUN");
            this.#applyAdvise(r.payload);
            break;
          case RecordType.PostcopyRun:
            r.payload.end();
            if (!(caps & Capability.POSTCOPY) || this.#postcopy) throw r.payload.error("unexpected POSTCOPY_RUN");
            this.#phase("postcopy");
            // Without a preempt channel, a faulting page's answer queues behind whatever
            // background stream is already in the kernel's buffers and our read-ahead: keep
            // both small from now on.
            if (!preempt) {
              boundSocketBuffers(channel.stream, POSTCOPY_SOCKET_BUFFER);
              channel.reader.setReadAhead(POSTCOPY_READ_AHEAD);
            }
            this.#faults.start();
            this.#postcopy = true;
            await this.#o.hooks?.resume?.();
            channel.writer.writeNow(encodeRecord(RecordType.Resumed));
            break;
          case RecordType.Digest: {
            const d = decodeDigest(r.payload);
            if (d.region >= this.#regions.length || digests.has(d.region))
              throw r.payload.error(`digest for region ${d.region}`, { region: d.region });
            digests.set(d.region, d.sha256);
            break;
          }
          case RecordType.End:
            r.payload.end();
            // Pages the preempt channel carried may still be on their way: its end marker
            // comes after the last of them.
            if (preempt) {
              await Promise.race([preempt.done, aborted]);
              preempt.reader.detach();
              channel.detachPreempt()?.end();
            }
            channel.reader.detach();
            return await this.#finish(digests, channel.writer, channel.stream);
          default:
            throw r.payload.error(`unexpected ${recordName(r.type)} record`);
        }
        applying = null;
        r = await next();
      }
    } catch (e) {
      let err = applying ? recordFailure(e, applying) : asMigrationError(e);
      // The connection as it is now (recovery may have replaced the one run() was given).
      stream = channel.stream;
      if (err.code === "TRUNCATED" && (err.details.connectionLost || !(stream.readable && !stream.destroyed)))
        err = new MigrationError("TRUNCATED", err.message.replace(/ \(at stream offset \d+\)$/, ""), err.offset, {
          ...err.details,
          connectionLost: true,
        });
      channel.writer.writeNow(encodeFail(err.code, err.message));
      this.#faults.stop();
      channel.reader.detach();
      preempt?.reader.detach();
      channel.detachPreempt()?.destroy();
      // Let the FAIL record reach the source: closing with unread input would send a reset,
      // and a reset makes the peer's kernel drop data it has not read yet. So half-close,
      // discard what still arrives, and wait for the source to hang up (bounded).
      if (!stream.destroyed) {
        stream.on("data", () => undefined);
        stream.on("error", () => undefined);
        stream.resume();
        stream.end();
        await new Promise<void>((r) => {
          const t = setTimeout(r, 1000);
          stream.once("close", () => {
            clearTimeout(t);
            r();
          });
        });
      }
      stream.destroy();
      if (!this.#phases.final) this.#phase("failed");
      this.events.emit("failed", err);
      throw err;
    } finally {
      this.#o.signal?.removeEventListener("abort", onAbort);
    }
  }

  /** Postcopy paused: the source's recovery connection (recovery.ts), as the new channel's parts. */
  #acceptRecovery(
    rec: NonNullable<DestinationOptions["postcopyRecovery"]>,
    nonce: bigint,
    cause: MigrationError,
    aborted: Promise<never>,
    peer: PeerIdentity | null,
  ): Promise<ChannelParts> {
    return recoverConnection({
      limitMs: rec.timeoutMs ?? 60_000,
      cause,
      peer,
      role: "destination",
      candidate: (deadline) => acceptWithin(() => rec.accept(), deadline, aborted, "recovery timed out"),
      handshake: (s, deadline) =>
        answerRecovery(
          s,
          nonce,
          this.#regions.map((st) => st.present),
          this.#faults.pending(),
          (p) => withDeadline(Promise.race([p, aborted]), deadline, "recovery timed out"),
        ),
      fatal: (e) => e.code === "ABORTED",
      // A stray, foreign or broken connection: wait for the next one.
      refused: (e) => this.events.emit("refused", e),
    });
  }

  /**
   * The source's preempt connection: the next one that names this migration (nonce) and comes
   * from the main stream's peer; anything else is closed and the wait goes on, within
   * PREEMPT_ACCEPT_MS.
   */
  async #acceptPreempt(
    nonce: bigint,
    aborted: Promise<never>,
    peer: PeerIdentity | null,
  ): Promise<{ stream: Duplex; reader: RecordReader }> {
    const accept = this.#o.acceptPreempt;
    if (!accept)
      throw new MigrationError(
        "UNSUPPORTED",
        "the source opened a postcopy preempt channel and this destination cannot accept one (no acceptPreempt)",
      );
    const deadline = performance.now() + PREEMPT_ACCEPT_MS;
    const message = `the preempt channel did not connect within ${PREEMPT_ACCEPT_MS} ms`;
    for (;;) {
      const stream = await acceptWithin(accept, deadline, aborted, message);
      const reader = new RecordReader(stream, { reuseBuffer: true });
      try {
        const first = await withDeadline(
          Promise.race([reader.readStreamHeader().then(() => reader.next()), aborted]),
          deadline,
          message,
        );
        if (first.type !== RecordType.Preempt)
          throw first.payload.error(`preempt channel: expected PREEMPT, got ${recordName(first.type)}`);
        const theirs = decodePreempt(first.payload);
        if (theirs !== nonce)
          throw new MigrationError(
            "BAD_RECORD",
            "the preempt channel belongs to another migration (nonce)",
            first.offset,
            {
              channel: "preempt",
            },
          );
        const from = peerIdentity(stream);
        if (!samePeer(peer, from))
          throw new MigrationError(
            "AUTH_FAILED",
            `a preempt connection from ${describePeer(from)}, the migration's source is ${describePeer(peer)}`,
          );
        return { stream, reader };
      } catch (e) {
        reader.detach();
        stream.destroy();
        const err = asMigrationError(e);
        if (err.code === "ABORTED" || performance.now() >= deadline) throw err;
        // Not ours: it neither takes the channel nor fails the migration.
        this.events.emit("refused", err);
      }
    }
  }

  /** Applies the pages the preempt channel carries, until its end marker. */
  async #preemptLoop(reader: RecordReader): Promise<void> {
    for (;;) {
      const r = await reader.next();
      if (r.type === RecordType.PreemptEnd) {
        r.payload.end();
        return;
      }
      if (r.type !== RecordType.Pages || !this.#postcopy)
        throw r.payload.error(
          `preempt channel: unexpected ${recordName(r.type)}${this.#postcopy ? "" : " before POSTCOPY_RUN"}`,
        );
      try {
        this.#faults.countPreemptPages(this.#applyPages(r));
      } catch (e) {
        throw recordFailure(e, r);
      }
    }
  }

  async #setup(next: () => Promise<Record>): Promise<number> {
    const r = await next();
    if (r.type !== RecordType.Capabilities) throw r.payload.error(`expected CAPABILITIES, got ${recordName(r.type)}`);
    const c = decodeCapabilities(r.payload);
    if (c.pageSize !== PAGE)
      throw new MigrationError("UNSUPPORTED", `page size ${c.pageSize}`, r.offset, { pageSize: c.pageSize });
    if (c.regionCount !== this.#regions.length)
      throw new MigrationError(
        "REGION_MISMATCH",
        `source has ${c.regionCount} regions, destination ${this.#regions.length}`,
        r.offset,
        { source: c.regionCount, destination: this.#regions.length },
      );
    for (let i = 0; i < this.#regions.length; i++) {
      const rr = await next();
      if (rr.type !== RecordType.Region) throw rr.payload.error(`expected REGION ${i}, got ${recordName(rr.type)}`);
      const d = decodeRegion(rr.payload);
      const mine = (this.#regions[i] as ReceivedRegion).region;
      if (d.index !== i || d.guestBase !== mine.guestBase || d.size !== mine.size || d.pageSize !== mine.pageSize)
        throw new MigrationError(
          "REGION_MISMATCH",
          `region ${i}: source [${d.guestBase}, +${d.size}) page ${d.pageSize}, destination [${mine.guestBase}, +${mine.size}) page ${mine.pageSize}`,
          rr.offset,
          {
            region: i,
            source: d,
            destination: { guestBase: mine.guestBase, size: mine.size, pageSize: mine.pageSize },
          },
        );
    }
    return c.capabilities;
  }

  #applyDiscard(r: Record): void {
    const d = decodeDiscard(r.payload);
    const st = this.#regions[d.region];
    if (!st) throw r.payload.error(`discard map for region ${d.region}`, { region: d.region });
    // Blocks are dropped with madvise: a block must be whole pages (and a power of two, as
    // DiscardMap wants) before any block of the map is acted on.
    if (d.blockSize < PAGE || d.blockSize % PAGE !== 0 || !Number.isInteger(Math.log2(d.blockSize)))
      throw r.payload.error(
        `discard block size ${d.blockSize} is not a power-of-two multiple of the page size ${PAGE}`,
        {
          region: d.region,
          blockSize: d.blockSize,
        },
      );
    if (d.blockSize === 0 || st.region.size % d.blockSize !== 0 || d.states.length !== st.region.size / d.blockSize)
      throw new MigrationError(
        "REGION_MISMATCH",
        `discard map of ${d.states.length} blocks of ${d.blockSize}`,
        r.offset,
        {
          region: d.region,
        },
      );
    for (const v of d.states) if (v > 1) throw r.payload.error(`bad block state ${v}`);
    // Blocks discarded since the last map: what was sent into them is gone, and they are not
    // populated here any more (pages of a later plug arrive as dirty pages, or stay zero).
    const advice = st.region.backing.kind === "anonymous" ? MADV_DONTNEED : MADV_REMOVE;
    for (const b of this.#mem.applyDiscard(st, d.blockSize, d.states, r.offset))
      st.region.mapping?.advise(b * d.blockSize, d.blockSize, advice);
  }

  /** Validates a whole PAGES record, then applies it. Returns its page count. */
  #applyPages(r: Record): number {
    const rec = decodePages(r.payload, PAGE);
    const st = this.#mem.checkPages(rec.region, rec.pages, r.offset);
    if (this.#postcopy) this.#faults.placePages(st, rec);
    else this.#writePages(st, rec, r.pageHashes);
    return rec.pages.length;
  }

  /** `hashes`: the full pages' hashes when the reader computed them (Record.pageHashes). */
  #writePages(st: ReceivedRegion, rec: PagesRecord, hashes?: Uint32Array | null): void {
    // Full pages' data lies in record order: gather their indices and copy them in bulk.
    const full = new Uint32Array(rec.pages.length);
    let n = 0;
    for (let k = 0; k < rec.pages.length; k++) {
      const p = rec.pages[k] as number;
      if ((rec.dataOffsets[k] as number) < 0) {
        this.#zero++;
        // Fresh memory is zero: a zero page never written here stays unpopulated.
        if (this.#mem.receivedZero(st, p)) (st.region.bytes(p * PAGE, PAGE) as Uint8Array).fill(0);
        continue;
      }
      full[n++] = p;
      this.#mem.received(st, p);
    }
    writeRegionPages(st.region, full, n, rec.data);
    if (hashes && hashes.length === 2 * n) st.hashes?.setFromHashes(full, n, hashes);
    else st.hashes?.setFromData(full, n, rec.data);
    this.#pages += n;
  }

  /** Drops pages sent in precopy and dirtied since: they must fault and be fetched again. */
  #applyAdvise(p: PayloadReader): void {
    const a = decodePostcopyAdvise(p);
    const st = this.#regions[a.region];
    if (!st || a.pages !== st.pages) throw p.error(`advise for region ${a.region} of ${a.pages} pages`);
    const drop = PageSet.wrap(a.bitmap, a.pages);
    const mapping = st.region.mapping;
    if (!mapping) throw new MigrationError("UNSUPPORTED", "postcopy needs regions with an owned mapping");
    const advice = st.region.backing.kind === "anonymous" ? MADV_DONTNEED : MADV_REMOVE;
    for (const [first, end] of this.#mem.dropAdvised(st, drop))
      mapping.advise(first * PAGE, (end - first) * PAGE, advice);
  }

  async #finish(digests: Map<number, Uint8Array>, writer: RecordWriter, stream: Duplex): Promise<MigrationResult> {
    const postcopy = this.#postcopy;
    // Every page the source still had to send has been placed: nothing can fault any more.
    // Unregister before reading memory here (this thread must never fault on guest memory).
    if (postcopy) await this.#o.hooks?.beforeVerify?.();
    this.#faults.stop();
    const resumedWith = this.#resumedWith;
    if (!postcopy && !resumedWith)
      throw new MigrationError("BAD_RECORD", "END of a precopy stream without SWITCHOVER", undefined);
    if (postcopy) this.#phase("verify");
    const verifyStart = postcopy ? performance.now() : this.#resumedAt;
    const verify = this.#o.verify ?? true;
    const cmp = this.#regions.map((_, i) => {
      // Precopy: the digest as of SWITCHOVER, from the hashes of the pages as they were written.
      // Postcopy: pages never written here are still the fresh memory's zeros: hashed without
      // reading them.
      const mine = !verify ? new Uint8Array(32) : (resumedWith?.[i] ?? this.#mem.memoryDigest(i));
      const theirs = digests.get(i);
      const source = theirs ? hex(theirs) : "";
      return { region: i, source, destination: verify ? hex(mine) : "", match: !verify || source === hex(mine), mine };
    });
    const ok = cmp.every((c) => c.match);
    writer.writeNow(
      encodeComplete(
        ok,
        cmp.map((c) => c.mine),
      ),
    );
    const digestsOut = cmp.map(({ mine: _m, ...rest }) => rest);
    if (!ok)
      throw new MigrationError("DIGEST_MISMATCH", "memory differs from the source's digest", undefined, {
        digests: digestsOut,
      });
    const verifyMs = performance.now() - verifyStart;
    await new Promise<void>((r) => stream.end(r));
    this.#phase("complete");
    const result: MigrationResult = {
      role: "destination",
      mode: postcopy ? "postcopy" : "precopy",
      rounds: this.#rounds,
      totalMs: performance.now() - this.#t0,
      downtimeMs: 0,
      verifyMs,
      bytesSent: 0,
      pagesSent: this.#pages + this.#faults.pages,
      zeroPages: this.#zero + this.#faults.zero,
      converged: true,
      digests: digestsOut,
      roundStats: [],
      deviceStates: this.#deviceStates,
      ...(postcopy ? { postcopy: this.#faults.stats(), preempt: this.#preemptUsed } : {}),
    };
    this.events.emit("complete", result);
    return result;
  }
}

/**
 * A failure while `r` was applied, as the error recovery and the peer key on: a MigrationError
 * keeps its code (and gets the record's offset if it had none); anything else (a hook's error,
 * a failed system call) is BAD_RECORD at the record's offset.
 */
function recordFailure(e: unknown, r: Record): MigrationError {
  if (e instanceof MigrationError) {
    if (e.offset !== undefined || e.code === "ABORTED") return e;
    return new MigrationError(e.code, e.message, r.offset, e.details);
  }
  const err = e as { message?: unknown; code?: unknown };
  return new MigrationError(
    "BAD_RECORD",
    `${recordName(r.type)}: applying it failed: ${String(err?.message ?? e)}`,
    r.offset,
    { record: recordName(r.type), cause: typeof err?.code === "string" ? err.code : undefined },
  );
}
