/**
 * The vhost-user shared dirty log, both sides.
 *
 * Layout (vhost-user spec, "Migration"): one bit per 4 KiB page of guest-physical address
 * space starting at 0; page p is bit p%8 of byte p/8. The backend sets bits with atomic OR,
 * the frontend (QEMU, in C) reads and clears them concurrently with atomic exchange. We OR
 * 32-bit words: on little-endian that is the same bit for the same page, and an aligned
 * 32-bit atomic never tears a neighbouring byte the frontend is exchanging.
 *
 * - DirtyLogArea: one mapped log (fd + size + offset), usable by either side.
 * - SharedDirtyLog: the backend's *current* log, replaceable at run time (SET_LOG_BASE again
 *   when the frontend grows guest memory) with this guarantee: once replace() resolves, no
 *   thread marks the old log any more, and every mark made before is in the old log.
 * - DirtyLogWriter: what each marking thread holds (posted to workers).
 * - SharedLogDirtySource: the frontend's DirtySource over a log it owns.
 */
import { MessageChannel, type MessagePort, receiveMessageOnPort } from "node:worker_threads";
import type { Fd } from "../sys/fd.js";
import { Mapping, WINDOW_SIZE } from "../sys/mapping.js";
import { createMemfd } from "../sys/memfd.js";
import { takeBits } from "./atomic-bitmap.js";
import type { DirtySink, DirtySource } from "./dirty-source.js";
import { GuestMemoryError } from "./errors.js";
import { hex, toLength } from "./guest-address.js";

/** VHOST_LOG_PAGE: the log's page size, fixed by the spec. */
export const VHOST_LOG_PAGE = 4096;
const LOG_PAGE_SHIFT = 12;

/** What another thread needs to mark the same log. */
export interface SharedLogArea {
  buffer: SharedArrayBuffer;
  size: number;
  /** Byte offset of the log inside `buffer`. */
  start: number;
}

/** Bytes of log needed to cover `guestBytes` of guest-physical address space from 0. */
export function logSizeFor(guestBytes: number): number {
  const pages = Math.ceil(guestBytes / VHOST_LOG_PAGE);
  // QEMU sizes its log in 64-bit chunks; round the same way so sizes compare equal.
  return Math.ceil(pages / 64) * 8;
}

/** One dirty log mapped into this process. */
export class DirtyLogArea implements Disposable {
  readonly size: number;
  readonly offset: number;
  /** The fd the log came from or was created with (owned); null for a view from another thread. */
  readonly fd: Fd | null;
  readonly words: Uint32Array;
  /** Pages the log can describe: size * 8. */
  readonly pages: number;
  readonly #mapping: Mapping | null;
  readonly #buffer: SharedArrayBuffer;
  readonly #start: number;

  private constructor(
    fd: Fd | null,
    mapping: Mapping | null,
    buffer: SharedArrayBuffer,
    start: number,
    size: number,
    offset: number,
  ) {
    this.fd = fd;
    this.#mapping = mapping;
    this.#buffer = buffer;
    this.#start = start;
    this.size = size;
    this.offset = offset;
    this.pages = size * 8;
    this.words = new Uint32Array(buffer, start, Math.ceil(size / 4));
  }

  /**
   * Maps a log a peer sent (SET_LOG_BASE: fd, mmap size, mmap offset). Takes ownership of `fd`.
   * The u64 values are checked exactly: a log must fit one 1 GiB window (enough for 32 TiB of
   * guest memory) and the offset must be page aligned.
   */
  static map(fd: Fd, size: number | bigint, offset: number | bigint): DirtyLogArea {
    try {
      const n = toLength(size);
      const off = toLength(offset);
      if (n === 0 || n > WINDOW_SIZE)
        throw new GuestMemoryError(
          "BAD_REGION",
          `dirty log size ${n} is 0 or above ${WINDOW_SIZE}`,
          undefined,
          BigInt(size),
        );
      if (off % 4096 !== 0)
        throw new GuestMemoryError("BAD_REGION", `dirty log offset ${hex(off)} is not page aligned`, BigInt(offset));
      // Map whole words: the mapping is page granular anyway.
      const mapping = Mapping.map(fd, Math.ceil(n / 4) * 4, { offset: off });
      return new DirtyLogArea(fd, mapping, mapping.windows[0] as SharedArrayBuffer, 0, n, off);
    } catch (e) {
      fd.close();
      throw e;
    }
  }

  /** A new memfd-backed log covering `guestBytes` of address space (the frontend's side). */
  static create(guestBytes: number): DirtyLogArea {
    const size = logSizeFor(guestBytes);
    return DirtyLogArea.map(createMemfd("vmshift-dirty-log", size, { sealSize: true }), size, 0);
  }

  static fromShared(s: SharedLogArea): DirtyLogArea {
    return new DirtyLogArea(null, null, s.buffer, s.start, s.size, 0);
  }

  toShared(): SharedLogArea {
    return { buffer: this.#buffer, size: this.size, start: this.#start };
  }

  /**
   * Marks every log page touched by [gpa, gpa+len). Returns false when part of the range lies
   * beyond what the log covers (those pages cannot be recorded: the caller must count them).
   */
  mark(gpa: number, len: number): boolean {
    if (len <= 0) return true;
    const first = Math.floor(gpa / VHOST_LOG_PAGE);
    const lastWanted = Math.floor((gpa + len - 1) / VHOST_LOG_PAGE);
    const last = Math.min(lastWanted, this.pages - 1);
    const w = this.words;
    let p = first;
    while (p <= last) {
      const bit = p & 31;
      const n = Math.min(32 - bit, last - p + 1);
      Atomics.or(w, p >>> 5, n === 32 ? 0xffffffff : ((1 << n) - 1) << bit);
      p += n;
    }
    return lastWanted === last;
  }

  isDirty(gpa: number): boolean {
    const p = gpa >>> 0 === gpa ? gpa >>> LOG_PAGE_SHIFT : Math.floor(gpa / VHOST_LOG_PAGE);
    if (p >= this.pages) return false;
    return (Atomics.load(this.words, p >>> 5) & (1 << (p & 31))) !== 0;
  }

  /** Dirty page numbers without clearing (inspection, tests). */
  peek(): number[] {
    const out: number[] = [];
    const w = this.words;
    for (let i = 0; i < w.length; i++) {
      let v = Atomics.load(w, i);
      while (v !== 0) {
        const p = i * 32 + (31 - Math.clz32(v & -v));
        if (p < this.pages) out.push(p);
        v &= v - 1;
      }
    }
    return out;
  }

  /** Takes and clears the dirty pages (atomic exchange per word: no concurrent mark is lost). */
  take(): Uint32Array {
    return takeBits(this.words, this.pages);
  }

  close(): void {
    this.#mapping?.close();
    this.fd?.close();
  }

  [Symbol.dispose](): void {
    this.close();
  }
}

// Layout of the control block shared by a SharedDirtyLog and all its writers.
const GEN = 0; // generation of the current log; bumped by every replace()
const ACTIVE = 1; // ACTIVE + (gen & 1): writers inside a mark of that generation
const DROPPED = 3; // marks that fell outside the log (pages it does not cover)
const CONTROL_WORDS = 4;

interface LogMessage {
  gen: number;
  area: SharedLogArea | null;
}

/** What a worker needs to mark the log: post it with `transferList: [handle.port]`. */
export interface DirtyLogWriterHandle {
  control: SharedArrayBuffer;
  port: MessagePort;
}

/**
 * A thread's marker for a SharedDirtyLog. mark() is a short critical section: it announces
 * itself in the generation it read, re-checks the generation, ORs the bits, and leaves. A
 * replace() bumps the generation and waits until nobody is inside the old one, so after it
 * resolves no mark can reach the old log. New logs reach the writer through its MessagePort,
 * read synchronously (receiveMessageOnPort) the first time the writer sees the new
 * generation: the message is queued before the generation is published, so it is there.
 */
export class DirtyLogWriter {
  readonly #ctl: Int32Array;
  readonly #port: MessagePort;
  #gen = -1;
  #area: DirtyLogArea | null = null;

  private constructor(handle: DirtyLogWriterHandle) {
    this.#ctl = new Int32Array(handle.control, 0, CONTROL_WORDS);
    this.#port = handle.port;
  }

  static fromHandle(handle: DirtyLogWriterHandle): DirtyLogWriter {
    return new DirtyLogWriter(handle);
  }

  /** True while a log is installed (logging is on). */
  get logging(): boolean {
    this.#catchUp(Atomics.load(this.#ctl, GEN));
    return this.#area !== null;
  }

  /** Marks [gpa, gpa+len) in the current log, if logging is on. */
  mark(gpa: number, len: number): void {
    const ctl = this.#ctl;
    for (;;) {
      const g = Atomics.load(ctl, GEN);
      if (g !== this.#gen) this.#catchUp(g);
      const area = this.#area;
      if (area === null) return;
      const slot = ACTIVE + (g & 1);
      Atomics.add(ctl, slot, 1);
      if (Atomics.load(ctl, GEN) !== g) {
        this.#leave(slot);
        continue;
      }
      if (!area.mark(gpa, len)) Atomics.add(ctl, DROPPED, 1);
      this.#leave(slot);
      return;
    }
  }

  #leave(slot: number): void {
    Atomics.sub(this.#ctl, slot, 1);
    // Only a replace() in progress waits on the count: wake it on every change.
    if ((Atomics.load(this.#ctl, GEN) & 1) !== slot - ACTIVE) Atomics.notify(this.#ctl, slot);
  }

  #catchUp(gen: number): void {
    while (this.#gen !== gen) {
      const r = receiveMessageOnPort(this.#port) as { message: LogMessage } | undefined;
      if (!r) {
        // Cannot happen: the message is queued before the generation is published.
        throw new Error(`dirty log generation ${gen} published without its log`);
      }
      this.#gen = r.message.gen;
      this.#area = r.message.area ? DirtyLogArea.fromShared(r.message.area) : null;
    }
  }

  close(): void {
    this.#port.close();
    this.#area = null;
  }
}

/**
 * The backend's current dirty log, replaceable at run time. Writers in any thread mark through
 * DirtyLogWriters; replace() swaps the log with the guarantee described at the top.
 */
export class SharedDirtyLog implements Disposable {
  readonly #control = new SharedArrayBuffer(CONTROL_WORDS * 4);
  readonly #ctl = new Int32Array(this.#control);
  readonly #ports = new Set<MessagePort>();
  #area: DirtyLogArea | null = null;
  #gen = 0;
  #chain: Promise<unknown> = Promise.resolve();
  #closed = false;

  /** The current log, or null when logging is off. */
  get area(): DirtyLogArea | null {
    return this.#area;
  }

  get generation(): number {
    return this.#gen;
  }

  /** Marks that fell outside the log since creation (the log did not cover those pages). */
  get droppedMarks(): number {
    return Atomics.load(this.#ctl, DROPPED);
  }

  /** A writer for another thread; post it with `transferList: [handle.port]`. */
  createWriterHandle(): DirtyLogWriterHandle {
    if (this.#closed) throw new Error("dirty log closed");
    const { port1, port2 } = new MessageChannel();
    port1.unref();
    this.#ports.add(port1);
    port1.postMessage({ gen: this.#gen, area: this.#area?.toShared() ?? null } satisfies LogMessage);
    return { control: this.#control, port: port2 };
  }

  /** A writer for the calling thread. */
  writer(): DirtyLogWriter {
    return DirtyLogWriter.fromHandle(this.createWriterHandle());
  }

  /**
   * Installs `next` (null stops logging) and resolves with the previous log once no writer can
   * mark it any more; every mark made before is in it. The caller owns the returned log
   * (close it once the peer has been answered). Calls are serialised.
   */
  replace(next: DirtyLogArea | null): Promise<DirtyLogArea | null> {
    const run = this.#chain.then(() => this.#replace(next));
    this.#chain = run.catch(() => undefined);
    return run;
  }

  async #replace(next: DirtyLogArea | null): Promise<DirtyLogArea | null> {
    if (this.#closed) throw new Error("dirty log closed");
    const old = this.#area;
    const oldGen = this.#gen;
    const gen = oldGen + 1;
    const msg: LogMessage = { gen, area: next?.toShared() ?? null };
    for (const p of this.#ports) p.postMessage(msg);
    this.#area = next;
    this.#gen = gen;
    Atomics.store(this.#ctl, GEN, gen);
    await this.#drain(ACTIVE + (oldGen & 1));
    return old;
  }

  async #drain(slot: number): Promise<void> {
    for (;;) {
      const v = Atomics.load(this.#ctl, slot);
      if (v === 0) return;
      // Writers notify on every leave while a replace is pending; the timeout is a backstop.
      const w = Atomics.waitAsync(this.#ctl, slot, v, 10);
      if (w.async) await w.value;
    }
  }

  /** Stops logging, waits for writers to leave, closes the current log and every port. */
  async close(): Promise<void> {
    if (this.#closed) return;
    const old = await this.replace(null);
    old?.close();
    this.#closed = true;
    for (const p of this.#ports) p.close();
    this.#ports.clear();
  }

  [Symbol.dispose](): void {
    void this.close();
  }
}

/**
 * The frontend's side: a log it created and handed to a backend, read back as a DirtySource.
 * sync() takes and clears the bits (atomic exchange), so a concurrent mark lands in this sync
 * or the next one.
 */
export class SharedLogDirtySource implements DirtySource {
  readonly name: string;
  #area: DirtyLogArea;

  constructor(area: DirtyLogArea, name = "vhost-user log") {
    this.#area = area;
    this.name = name;
  }

  get area(): DirtyLogArea {
    return this.#area;
  }

  /**
   * Switches to a bigger log (after the backend acknowledged it); the old one is drained into
   * `sink` first so nothing marked before the switch is lost, then closed.
   */
  swap(next: DirtyLogArea, sink: DirtySink): void {
    const old = this.#area;
    this.#area = next;
    sink.markFrames(old.take(), VHOST_LOG_PAGE, 0);
    old.close();
  }

  start(): void {
    this.#area.take();
  }

  sync(sink: DirtySink): void {
    sink.markFrames(this.#area.take(), VHOST_LOG_PAGE, 0);
  }

  stop(): void {}
}
