/**
 * The sending side of a migration: precopy rounds until the predicted downtime fits the
 * limit, then switchover; or postcopy, where the destination runs first and pulls the pages
 * it faults on through the return path of the same connection. The pages it asks for go back
 * on that connection too, queued behind the background stream, or, given a second connection
 * (`preempt`, QEMU's postcopy-preempt), on that one, ahead of everything.
 */
import { randomBytes } from "node:crypto";
import type { Duplex } from "node:stream";
import type { DirtySource } from "../memory/dirty-source.js";
import { DirtyTracker, RegionBitmapSource } from "../memory/dirty-tracker.js";
import type { DiscardMap } from "../memory/discard-map.js";
import type { GuestMemory } from "../memory/guest-memory.js";
import type { GuestMemoryRegion } from "../memory/region.js";
import { boundSocketBuffers, MigrationChannel, POSTCOPY_SOCKET_BUFFER, RecordWriter } from "./channel.js";
import { convergence, convergenceLimits, predictDowntimeMs } from "./convergence.js";
import { hex, regionDigest } from "./digest.js";
import { asMigrationError, MigrationError, withDeadline } from "./errors.js";
import {
  DIRTY_HEAT_CELLS,
  MigrationEvents,
  type MigrationResult,
  type RegionDigest,
  type RequestStats,
  type RoundStats,
} from "./events.js";
import {
  Capability,
  encodeCapabilities,
  encodeDeviceState,
  encodeDigest,
  encodeDiscard,
  encodeNonce,
  encodePostcopyAdvise,
  encodePreempt,
  encodeRecord,
  encodeRegion,
  encodeRound,
  encodeStreamHeader,
  RecordType,
} from "./format.js";
import { PageSender } from "./page-sender.js";
import { PAGE, PageSet } from "./page-set.js";
import { sourcePhases } from "./phases.js";
import { offerRecovery, recoverConnection } from "./recovery.js";
import { ReturnPath } from "./return-path.js";
import { describePeer, type PeerIdentity, peerIdentity, samePeer } from "./transport.js";

export { MAX_REQUEST_PAGES, REQUEST_QUEUE_BYTES } from "./return-path.js";

const GiB = 1024 ** 3;

export interface DeviceState {
  name: string;
  blob: Uint8Array;
}

/** How the migration reaches the things that write guest memory and hold device state. */
export interface SourceHooks {
  /** Switchover: stop every writer (vCPUs, device backends). Resolves once they are stopped. */
  stopWriters?(): void | Promise<void>;
  /** The migration failed before the destination ran: the source carries on. */
  resumeWriters?(): void | Promise<void>;
  /** Auto-converge: slow the writers down to `level` (0 = full speed; higher = slower). */
  throttle?(level: number): void | Promise<void>;
  /** Total ms the writers have spent blocked (throttling, write faults) so far. */
  writerStallMs?(): number;
  /** Opaque device state, taken after the writers stopped. */
  saveDeviceState?(): DeviceState[] | Promise<DeviceState[]>;
}

/** Auto-converge settings; each one left out takes its default (CONVERGENCE_DEFAULTS in convergence.ts). */
export interface AutoConvergeOptions {
  /** First round that may throttle. */
  startRound?: number;
  /** Throttle when a round's dirty bytes exceed this fraction of the bytes it sent. */
  threshold?: number;
  /** The highest throttle level. */
  maxLevel?: number;
}

export interface SourceOptions {
  memory: GuestMemory;
  /** Every writer's dirty tracking; default: the regions' own bitmaps (RegionBitmapSource). */
  sources?: DirtySource[];
  discard?: ReadonlyMap<GuestMemoryRegion, DiscardMap>;
  mode?: "precopy" | "postcopy";
  // When precopy stops: see convergence.ts, which holds the defaults of these five options.
  /** Postcopy: precopy rounds before the destination starts (0 = at once). */
  postcopyAfterRounds?: number;
  /** The longest predicted switchover pause precopy aims for. */
  downtimeLimitMs?: number;
  /** Precopy rounds before giving up (or stopping anyway, see whenNotConverged). */
  maxRounds?: number;
  /** What to do when maxRounds is reached over the limit: fail (NOT_CONVERGED) or stop anyway. */
  whenNotConverged?: "fail" | "switchover";
  /** Bytes per second, 0 = unlimited. */
  bandwidthLimit?: number;
  autoConverge?: AutoConvergeOptions | false;
  hooks?: SourceHooks;
  signal?: AbortSignal;
  /**
   * Postcopy recovery. Once the destination runs, a lost connection cannot be undone by
   * resuming the source (the guest has moved on there), so without this it fails both sides.
   * With it, both sides pause (the destination's faulting threads wait) and the source calls
   * `reconnect` until it gets a new connection to the same destination, or `timeoutMs` (default
   * 60 s) passes; the destination then says which pages it holds and the rest are sent again.
   */
  postcopyRecovery?: { reconnect(): Promise<Duplex>; timeoutMs?: number };
  /**
   * How long to wait for the destination's answers: RESUMED after SWITCHOVER or POSTCOPY_RUN
   * (default 30 s; includes its resume hook) and COMPLETE after END (default 60 s, counted
   * from END; includes its digest of all memory). Past one, the destination counts as lost
   * (CONNECTION_LOST: in postcopy with recovery, the migration pauses and reconnects).
   */
  deadlines?: { resumedMs?: number; completeMs?: number };
}

export interface RunOptions {
  /**
   * Postcopy: a second connection to the same destination for the pages it faults on, so an
   * urgent page never queues behind the background stream (QEMU's postcopy-preempt). Owned
   * from here on like the main stream; in precopy it is closed unused.
   */
  preempt?: Duplex;
}

interface RegionInfo {
  region: GuestMemoryRegion;
  pages: number;
  discard: DiscardMap | undefined;
}

export class MigrationSource {
  readonly events = new MigrationEvents();
  readonly #o: SourceOptions;
  readonly #regions: RegionInfo[];
  readonly #ps = PAGE;
  #t0 = 0;
  #stats: RoundStats[] = [];
  #writersStopped = false;
  #destinationRunning = false;
  #throttle = 0;
  #used = false;
  /** Precopy rounds, the postcopy background pass and (un)plug changes: see page-sender.ts. */
  readonly #sender: PageSender;
  /** Postcopy with a preempt channel: the background loop yields after every record. */
  #yieldEachRecord = false;
  readonly #requests: RequestStats = {
    requests: 0,
    pagesQueued: 0,
    outsideSet: 0,
    resentAhead: 0,
    duplicates: 0,
    refused: 0,
    maxQueuedBytes: 0,
    absentZeros: 0,
  };

  constructor(options: SourceOptions) {
    this.#o = options;
    for (const r of options.memory.regions)
      if (r.pageSize !== PAGE) throw new MigrationError("UNSUPPORTED", `region page size ${r.pageSize} (only ${PAGE})`);
    this.#regions = options.memory.regions.map((region) => ({
      region,
      pages: region.size / PAGE,
      discard: options.discard?.get(region),
    }));
    this.#sender = new PageSender(this.#regions);
  }

  /** The state diagram this side follows (phases.ts, docs/migration.md). */
  readonly #phases = sourcePhases((phase) => this.events.emit("phase", { phase, atMs: performance.now() - this.#t0 }));

  #phase(phase: Exclude<ReturnType<typeof sourcePhases>["phase"], "idle">): void {
    this.#phases.to(phase);
  }

  /** Runs the migration over `stream` (owned from here on: ended on success, destroyed on failure). */
  async run(stream: Duplex, runOptions: RunOptions = {}): Promise<MigrationResult> {
    if (this.#used) throw new Error("a MigrationSource runs once");
    this.#used = true;
    this.#t0 = performance.now();
    const o = this.#o;
    const sources = o.sources ?? [new RegionBitmapSource(o.memory)];
    const tracker = new DirtyTracker(o.memory, sources, o.discard ?? new Map());
    const postcopy = o.mode === "postcopy";
    let preempt = runOptions.preempt ?? null;
    if (preempt && !postcopy) {
      preempt.end();
      preempt = null;
    }
    // The main connection: the stream, its return path's reader and the writer, replaced together
    // by postcopy recovery. It also owns the preempt connection's lifetime.
    const ch = MigrationChannel.over(
      stream,
      {},
      {
        bandwidthLimit: o.bandwidthLimit ?? 0,
        // Precopy: several 1 MiB records in flight, so the socket never waits for the next one.
        // Postcopy without a preempt channel: requested pages queue behind this, keep it short.
        highWater: postcopy && !preempt ? 256 * 1024 : 4 * 1024 * 1024,
      },
    );
    if (preempt) ch.attachPreempt(preempt);
    // The preempt channel carries requested pages; the destination may send its requests on it.
    let preemptWriter = preempt ? new RecordWriter(preempt) : null;
    const hadPreempt = preempt !== null;
    this.#yieldEachRecord = preemptWriter !== null;
    // Preempt and recovery connections must reach the peer the main connection reached.
    const peer = peerIdentity(stream);
    const preemptPeer = preempt ? peerIdentity(preempt) : null;
    const onRefused = (e: MigrationError) => this.events.emit("refused", e);
    let rp = new ReturnPath(ch.reader, this.#regions, this.#requests, onRefused);
    // A destination whose fault thread owns the preempt channel sends its requests there.
    if (preempt) rp.readPreemptRequests(preempt);
    let nativePreempt = false;
    const recovery = postcopy ? (o.postcopyRecovery ?? null) : null;
    const nonce = randomBytes(8).readBigUInt64LE(0);
    const aborted = () => rp.fail(new MigrationError("ABORTED", "migration cancelled"));
    let preemptClosing = false;
    preempt?.once("close", () => {
      if (!preemptClosing) rp.fail(new MigrationError("CONNECTION_LOST", "the postcopy preempt channel closed"));
    });
    o.signal?.addEventListener("abort", aborted, { once: true });
    let trackerStarted = false;
    let recoveryFailure: MigrationError | null = null;
    let postcopyRunSent = false;
    let postcopySet: PageSet[] = [];
    const unsubscribe: (() => void)[] = [];
    const deadline = (ms: number | undefined, fallback: number) => performance.now() + (ms ?? fallback);
    try {
      this.#phase("setup");
      if (preempt && !samePeer(peer, preemptPeer))
        throw new MigrationError(
          "AUTH_FAILED",
          `the preempt channel reached ${describePeer(preemptPeer)}, the main stream ${describePeer(peer)}`,
        );
      await ch.writer.write(encodeStreamHeader());
      const caps =
        Capability.ZERO_PAGES |
        Capability.DIGEST |
        (o.discard?.size ? Capability.DISCARD : 0) |
        (postcopy ? Capability.POSTCOPY : 0) |
        (preempt ? Capability.PREEMPT : 0) |
        (recovery ? Capability.RECOVERY : 0);
      await ch.writer.write(
        encodeCapabilities({
          capabilities: caps,
          pageSize: this.#ps,
          regionCount: this.#regions.length,
          totalBytes: o.memory.size,
        }),
      );
      this.#regions.forEach((ri, index) => {
        ch.writer.writeNow(
          encodeRegion({ index, guestBase: ri.region.guestBase, size: ri.region.size, pageSize: ri.region.pageSize }),
        );
      });
      // A recovery connection names its migration by this nonce, as the preempt channel does.
      if (recovery) ch.writer.writeNow(encodeNonce(RecordType.Session, nonce));
      if (preemptWriter) {
        ch.writer.writeNow(encodePreempt(nonce));
        await preemptWriter.write(encodeStreamHeader());
        await preemptWriter.write(encodePreempt(nonce));
      }
      // Plug state travels first: the destination must know what never to populate. A change
      // while the migration runs goes again, ahead of the next pages.
      unsubscribe.push(...this.#sender.watchPlugState());
      for (const [index, ri] of this.#regions.entries())
        if (ri.discard)
          await ch.writer.write(
            encodeDiscard({ region: index, blockSize: ri.discard.blockSize, states: ri.discard.toBytes() }),
          );
      await tracker.start();
      trackerStarted = true;
      rp.start(ch.writer);

      const { rounds, converged } = await this.#precopy(tracker, ch.writer, rp);
      let end: { digests: Uint8Array[]; complete: { ok: boolean; digests: Uint8Array[] }; verifyStart: number } | null =
        null;
      let downtimeStart: number;
      let downtimeMs: number;
      if (!postcopy) {
        this.#phase("switchover");
        downtimeStart = performance.now();
        await this.#stopWriters();
        await this.#sync(tracker, true);
        await this.#sender.sendDirty(tracker.bitmap, ch.writer, rp);
        this.#sender.sendPlugChanges(ch.writer);
        await this.#sendDeviceStates(ch.writer);
        // The destination resumes on SWITCHOVER with the digest of what it received, known
        // from per-page hashes taken as pages arrived; the comparison comes after it runs.
        await ch.writer.write(encodeRecord(RecordType.Switchover));
        await withDeadline(
          rp.resumed,
          deadline(o.deadlines?.resumedMs, 30_000),
          "the destination did not report RESUMED in time after SWITCHOVER",
        );
        this.#destinationRunning = true;
        downtimeMs = performance.now() - downtimeStart;
      } else {
        this.#phase("postcopy");
        // Page requests answered on this same stream: keep the kernel's queue short.
        if (!preemptWriter) boundSocketBuffers(ch.stream, POSTCOPY_SOCKET_BUFFER);
        downtimeStart = performance.now();
        await this.#stopWriters();
        await this.#sync(tracker, true);
        this.#sender.sendPlugChanges(ch.writer);
        const todo = this.#regions.map((_, i) => tracker.bitmap.take(i));
        const set = this.#regions.map((ri, i) => PageSet.of(todo[i] as Uint32Array, ri.pages));
        postcopySet = set;
        rp.setPostcopySet(set);
        for (const [i, ri] of this.#regions.entries())
          await ch.writer.write(encodePostcopyAdvise(i, ri.pages, (set[i] as PageSet).bytes));
        await this.#sendDeviceStates(ch.writer);
        await ch.writer.write(encodeRecord(RecordType.PostcopyRun));
        // From here the destination may be running: until it says otherwise (FAIL before
        // RESUMED), the source must not run the guest again.
        postcopyRunSent = true;
        // Over a plain socket (and without recovery, which replaces connections) a native thread
        // answers the requests on the preempt channel; otherwise this thread does (TLS).
        if (preempt && !recovery && rp.serveNatively(preempt)) {
          nativePreempt = true;
          preemptClosing = true;
        }
        rp.servePages(preemptWriter ?? ch.writer, (i, p) => this.#sender.pageView(i, p), preemptWriter !== null);
        downtimeMs = 0;
        for (;;) {
          try {
            if (!this.#destinationRunning) {
              await withDeadline(
                rp.resumed,
                deadline(o.deadlines?.resumedMs, 30_000),
                "the destination did not report RESUMED in time after POSTCOPY_RUN",
              );
              this.#destinationRunning = true;
              downtimeMs = performance.now() - downtimeStart;
            }
            await this.#sender.sendBackground(todo, ch.writer, rp, this.#yieldEachRecord);
            const pch = !nativePreempt && preemptWriter ? ch.detachPreempt() : null;
            if (nativePreempt) {
              rp.servePages(ch.writer, (i, p) => this.#sender.pageView(i, p));
              await rp.finishNative();
            } else if (preemptWriter && pch) {
              // Every page is on its way on one channel or the other. Close the preempt channel
              // with a marker the destination waits for before END: pages it carried may still be
              // in flight. A request that comes after this is for a page already sent: served on
              // the main stream, ahead of END.
              rp.servePages(ch.writer, (i, p) => this.#sender.pageView(i, p));
              await preemptWriter.write(encodeRecord(RecordType.PreemptEnd));
              preemptClosing = true;
              await new Promise<void>((r) => pch.end(r));
            }
            end = await this.#verifyAndEnd(ch.writer, rp);
            break;
          } catch (e) {
            const err = rp.failure ?? asMigrationError(e);
            if (!recovery || err.code !== "CONNECTION_LOST") throw e;
            // Postcopy paused: nothing of the old connections is used again.
            rp.close();
            preemptClosing = true;
            preemptWriter = null;
            ch.drop();
            try {
              rp = await this.#recover(ch, recovery, nonce, err, peer, postcopySet);
            } catch (re) {
              recoveryFailure = asMigrationError(re);
              throw re;
            }
            // It took a recovery connection, which it only does once it runs.
            if (!this.#destinationRunning) {
              this.#destinationRunning = true;
              downtimeMs = performance.now() - downtimeStart;
            }
          }
        }
      }
      if (!end) end = await this.#verifyAndEnd(ch.writer, rp);
      const { digests, complete, verifyStart } = end;
      const verifyMs = performance.now() - verifyStart;
      const cmp: RegionDigest[] = digests.map((d, i) => {
        const other = complete.digests[i];
        const destination = other ? hex(other) : "";
        return { region: i, source: hex(d), destination, match: destination === hex(d) };
      });
      if (!complete.ok || cmp.some((c) => !c.match))
        throw new MigrationError("DIGEST_MISMATCH", "destination memory differs from the source", undefined, {
          digests: cmp,
        });
      this.#phase("complete");
      const result: MigrationResult = {
        role: "source",
        mode: postcopy ? "postcopy" : "precopy",
        rounds,
        totalMs: performance.now() - this.#t0,
        downtimeMs,
        verifyMs,
        bytesSent: ch.bytesWritten,
        pagesSent: this.#sender.pages,
        zeroPages: this.#sender.zero,
        converged,
        digests: cmp,
        roundStats: this.#stats,
        ...(postcopy ? { preempt: hadPreempt, requests: { ...this.#requests } } : {}),
        deviceStates: [],
      };
      await tracker.stop();
      for (const u of unsubscribe) u();
      rp.close();
      ch.stream.end();
      this.events.emit("complete", result);
      return result;
    } catch (e) {
      // A lost connection on the send side may have a reason still in flight on the return
      // path (the destination's FAIL record): give it a moment to arrive.
      if (!rp.failure && e instanceof MigrationError && e.code === "CONNECTION_LOST") await rp.settled(200);
      const err = recoveryFailure ?? rp.failure ?? asMigrationError(e);
      // The destination never ran: the source is the VM, unchanged, and carries on. After
      // POSTCOPY_RUN went out that is known only when the destination said it failed.
      const ranNot = !postcopyRunSent || (err.code === "PEER_FAILED" && !this.#destinationRunning);
      if (this.#writersStopped && !this.#destinationRunning && ranNot) await this.#o.hooks?.resumeWriters?.();
      if (trackerStarted) await tracker.stop().catch(() => undefined);
      for (const u of unsubscribe) u();
      rp.close();
      preemptClosing = true;
      ch.destroy();
      if (!this.#phases.final) this.#phase("failed");
      this.events.emit("failed", err);
      throw err;
    } finally {
      o.signal?.removeEventListener("abort", aborted);
    }
  }

  async #stopWriters(): Promise<void> {
    this.#writersStopped = true;
    await this.#o.hooks?.stopWriters?.();
  }

  async #sendDeviceStates(writer: RecordWriter): Promise<void> {
    const states = (await this.#o.hooks?.saveDeviceState?.()) ?? [];
    for (const s of states) await writer.write(encodeDeviceState(s.name, s.blob));
  }

  /** Precopy rounds; returns when it is time to stop the writers. */
  async #precopy(
    tracker: DirtyTracker,
    writer: RecordWriter,
    rp: ReturnPath,
  ): Promise<{ rounds: number; converged: boolean }> {
    const o = this.#o;
    const limits = convergenceLimits(o);
    const postcopy = o.mode === "postcopy";
    const gib = o.memory.size / GiB;
    let prev: RoundStats | null = null;
    let prevEnd = performance.now();
    let round = 0;
    this.#phase("precopy");
    for (;;) {
      rp.check();
      const rep = await this.#sync(tracker, false);
      const remaining = rep.dirtyPages * this.#ps;
      if (prev) {
        const elapsed = (performance.now() - prevEnd + prev.durationMs) / 1000;
        prev.remainingBytes = remaining;
        prev.dirtyRate = elapsed > 0 ? remaining / elapsed : 0;
        prev.predictedDowntimeMs = predictDowntimeMs(remaining, prev.bandwidth);
        prev.syncMsPerGiB = rep.totalMs / gib;
        prev.syncMsPerGiBBySource = Object.fromEntries(Object.entries(rep.perSource).map(([k, v]) => [k, v / gib]));
        this.#stats.push(prev);
        this.events.emit("round", prev);
      }
      const d = convergence(
        { round, last: prev, remainingBytes: remaining, throttle: this.#throttle, postcopy },
        limits,
      );
      if (d.kind === "postcopy") return { rounds: round, converged: true };
      if (d.kind === "switchover") return { rounds: round, converged: d.converged };
      if (d.kind === "not-converged")
        throw new MigrationError(
          "NOT_CONVERGED",
          `precopy did not converge in ${round} rounds: predicted downtime ${d.predictedDowntimeMs.toFixed(1)} ms > limit ${d.limitMs} ms`,
          undefined,
          {
            rounds: round,
            predictedDowntimeMs: d.predictedDowntimeMs,
            limitMs: d.limitMs,
            remainingBytes: remaining,
            dirtyRate: prev?.dirtyRate ?? 0,
            bandwidth: prev?.bandwidth ?? 0,
            throttle: this.#throttle,
          },
        );
      if (d.kind === "throttle") {
        this.#throttle = d.level;
        await o.hooks?.throttle?.(this.#throttle);
        this.events.emit("throttle", { level: this.#throttle, round });
      }
      round++;
      await writer.write(encodeRound(round, remaining));
      const stall0 = o.hooks?.writerStallMs?.() ?? 0;
      const t = performance.now();
      const b0 = writer.bytesWritten;
      const heat = new Array<number>(DIRTY_HEAT_CELLS).fill(0);
      const { pages, zero } = await this.#sender.sendDirty(tracker.bitmap, writer, rp, heat);
      await writer.drain();
      const durationMs = performance.now() - t;
      prevEnd = performance.now();
      const bytesSent = writer.bytesWritten - b0;
      prev = {
        round,
        dirtyPages: rep.dirtyPages,
        pagesSent: pages,
        zeroPages: zero,
        bytesSent,
        durationMs,
        bandwidth: durationMs > 0 ? (bytesSent / durationMs) * 1000 : 0,
        dirtyRate: 0,
        remainingBytes: 0,
        predictedDowntimeMs: 0,
        syncMsPerGiB: 0,
        syncMsPerGiBBySource: {},
        writerStallMs: (o.hooks?.writerStallMs?.() ?? 0) - stall0,
        throttle: this.#throttle,
        dirtyHeat: heat,
      };
    }
  }

  /** A dirty sync of every source; notes which (un)plug events it already accounted for. */
  #sync(tracker: DirtyTracker, final: boolean): ReturnType<DirtyTracker["sync"]> {
    this.#sender.syncing();
    return tracker.sync({ final });
  }

  /** Digests of the frozen memory, END, and the destination's COMPLETE. */
  async #verifyAndEnd(
    writer: RecordWriter,
    rp: ReturnPath,
  ): Promise<{ digests: Uint8Array[]; complete: { ok: boolean; digests: Uint8Array[] }; verifyStart: number }> {
    this.#phase("verify");
    const verifyStart = performance.now();
    // Writers are stopped for good: this hashes the memory itself, as it was sent, whatever
    // dirty tracking said (a missed write is exactly what must show up here).
    const digests = this.#regions.map((ri) => regionDigest(ri.region, ri.discard));
    for (const [i, d] of digests.entries()) writer.writeNow(encodeDigest(i, d));
    await writer.write(encodeRecord(RecordType.End));
    const complete = await withDeadline(
      rp.complete,
      performance.now() + (this.#o.deadlines?.completeMs ?? 60_000),
      "the destination did not report COMPLETE in time after END",
    );
    return { digests, complete, verifyStart };
  }

  /**
   * Postcopy recovery: calls `reconnect` until a new connection to the destination is made and
   * the destination has said which pages it holds (RECEIVED), or the time is up. Requested pages
   * and the background stream go on over the new connection; what the destination holds is not
   * sent again, everything else it still needs is.
   */
  async #recover(
    ch: MigrationChannel,
    recovery: NonNullable<SourceOptions["postcopyRecovery"]>,
    nonce: bigint,
    cause: MigrationError,
    peer: PeerIdentity | null,
    postcopySet: PageSet[],
  ): Promise<ReturnPath> {
    this.#phase("postcopy-paused");
    const { parts, held } = await recoverConnection({
      limitMs: recovery.timeoutMs ?? 60_000,
      cause,
      peer,
      role: "source",
      retryMs: 100,
      check: () => {
        if (this.#o.signal?.aborted)
          throw new MigrationError("ABORTED", "migration cancelled while postcopy was paused");
      },
      candidate: () => recovery.reconnect(),
      handshake: (s, deadline) =>
        offerRecovery(
          s,
          nonce,
          this.#regions.map((ri) => ri.pages),
          deadline,
        ),
      // The destination failed, or answered with something that is not the protocol: no retry.
      fatal: (e) => e.code === "PEER_FAILED" || e.code === "BAD_RECORD" || e.code === "CORRUPT",
    });
    ch.replace(parts);
    const rp = new ReturnPath(ch.reader, this.#regions, this.#requests, (e) => this.events.emit("refused", e));
    rp.setPostcopySet(postcopySet);
    rp.setSent(held);
    rp.start(ch.writer);
    rp.servePages(ch.writer, (i, p) => this.#sender.pageView(i, p));
    this.#phase("postcopy");
    return rp;
  }
}
