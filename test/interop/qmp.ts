/**
 * A QMP client (QEMU Machine Protocol: one JSON object per line over a unix socket), enough to drive
 * migrations from tests: the capabilities handshake, commands matched to replies by id, and every
 * asynchronous event kept in a history so a test can wait for one that may already have arrived.
 * See QEMU docs/interop/qmp-spec.rst.
 */
import { connect, type Socket } from "node:net";
import { setTimeout as sleep } from "node:timers/promises";

export interface QmpEvent {
  event: string;
  data: Record<string, unknown>;
  timestamp: { seconds: number; microseconds: number };
}

/** A command QEMU answered with an error object: `class` is QMP's error class (GenericError, ...). */
export class QmpError extends Error {
  constructor(
    readonly command: string,
    readonly errorClass: string,
    readonly desc: string,
  ) {
    super(`QMP ${command}: ${errorClass}: ${desc}`);
    this.name = "QmpError";
  }
}

export class QmpTimeoutError extends Error {
  constructor(what: string, timeoutMs: number) {
    super(`QMP: ${what} timed out after ${timeoutMs} ms`);
    this.name = "QmpTimeoutError";
  }
}

interface Pending {
  command: string;
  resolve: (v: unknown) => void;
  reject: (e: Error) => void;
}

interface EventWaiter {
  name: string;
  from: number;
  match: (data: Record<string, unknown>) => boolean;
  resolve: (e: QmpEvent) => void;
  reject: (e: Error) => void;
}

export interface QmpConnectOptions {
  /** How long to keep retrying while the socket does not exist yet or refuses connections. */
  timeoutMs?: number;
  /** Rejects the wait early when the peer is known to be gone (e.g. QEMU exited). */
  signal?: AbortSignal;
}

export class QmpClient {
  /** The greeting's "QMP" member: version and capabilities. */
  greeting: Record<string, unknown> = {};
  /** Every event received since connecting, in order. */
  readonly events: QmpEvent[] = [];
  private readonly pending = new Map<string, Pending>();
  private readonly waiters = new Set<EventWaiter>();
  private buffer = "";
  private nextId = 1;
  private closedError: Error | null = null;
  private greetingWaiter: ((g: Record<string, unknown>) => void) | null = null;

  private constructor(
    private readonly socket: Socket,
    readonly path: string,
  ) {
    socket.setEncoding("utf8");
    socket.on("data", (chunk: string) => this.onData(chunk));
    socket.on("error", (e) => this.fail(e));
    socket.on("close", () => this.fail(new Error(`QMP socket ${path} closed`)));
  }

  /** Connects (retrying until the socket accepts), reads the greeting and leaves capabilities negotiation. */
  static async connect(path: string, opts: QmpConnectOptions = {}): Promise<QmpClient> {
    const timeoutMs = opts.timeoutMs ?? 10_000;
    const deadline = Date.now() + timeoutMs;
    let lastError: unknown;
    for (;;) {
      opts.signal?.throwIfAborted();
      let client: QmpClient | undefined;
      try {
        const socket = await new Promise<Socket>((resolve, reject) => {
          const s = connect(path);
          s.once("connect", () => {
            s.off("error", reject);
            resolve(s);
          });
          s.once("error", reject);
        });
        client = new QmpClient(socket, path);
        const c = client;
        const greeting = await c.withTimeout(
          new Promise<Record<string, unknown>>((resolve) => {
            c.greetingWaiter = resolve;
          }),
          Math.max(1000, deadline - Date.now()),
          "greeting",
        );
        c.greeting = greeting;
        await c.execute("qmp_capabilities", undefined, { timeoutMs: Math.max(1000, deadline - Date.now()) });
        return c;
      } catch (e) {
        client?.close();
        lastError = e;
        if (Date.now() > deadline) break;
        await sleep(50);
      }
    }
    throw new Error(`QMP: cannot connect to ${path} within ${timeoutMs} ms: ${String(lastError)}`);
  }

  /** Runs a command and resolves with its "return" member; rejects with QmpError on an error reply. */
  execute<T = unknown>(command: string, args?: Record<string, unknown>, opts: { timeoutMs?: number } = {}): Promise<T> {
    if (this.closedError) return Promise.reject(this.closedError);
    const id = `vmshift-${this.nextId++}`;
    const req: Record<string, unknown> = { execute: command, id };
    if (args !== undefined) req.arguments = args;
    const p = new Promise<unknown>((resolve, reject) => {
      this.pending.set(id, { command, resolve, reject });
    });
    this.socket.write(JSON.stringify(req) + "\n");
    return this.withTimeout(p, opts.timeoutMs ?? 10_000, command, () => this.pending.delete(id)) as Promise<T>;
  }

  /** Index of the next event to arrive: pass it as `since` to wait only for later events. */
  eventCursor(): number {
    return this.events.length;
  }

  /**
   * Resolves with the first event named `name` at index >= `since` (default 0: any received so far
   * or later) whose data passes `match`.
   */
  waitEvent(
    name: string,
    opts: { since?: number; timeoutMs?: number; match?: (data: Record<string, unknown>) => boolean } = {},
  ): Promise<QmpEvent> {
    const from = opts.since ?? 0;
    const match = opts.match ?? (() => true);
    for (let i = from; i < this.events.length; i++) {
      const e = this.events[i]!;
      if (e.event === name && match(e.data)) return Promise.resolve(e);
    }
    if (this.closedError) return Promise.reject(this.closedError);
    let waiter: EventWaiter | undefined;
    const p = new Promise<QmpEvent>((resolve, reject) => {
      waiter = { name, from, match, resolve, reject };
      this.waiters.add(waiter);
    });
    return this.withTimeout(p, opts.timeoutMs ?? 10_000, `event ${name}`, () => {
      if (waiter) this.waiters.delete(waiter);
    });
  }

  close(): void {
    this.fail(new Error(`QMP client ${this.path} closed`));
    this.socket.destroy();
  }

  private onData(chunk: string): void {
    this.buffer += chunk;
    for (let nl = this.buffer.indexOf("\n"); nl >= 0; nl = this.buffer.indexOf("\n")) {
      const line = this.buffer.slice(0, nl).trim();
      this.buffer = this.buffer.slice(nl + 1);
      if (line.length === 0) continue;
      let msg: Record<string, unknown>;
      try {
        msg = JSON.parse(line) as Record<string, unknown>;
      } catch {
        continue; // QEMU never sends partial objects on a line; ignore noise rather than crash the test process
      }
      this.dispatch(msg);
    }
  }

  private dispatch(msg: Record<string, unknown>): void {
    if ("QMP" in msg) {
      this.greetingWaiter?.(msg.QMP as Record<string, unknown>);
      this.greetingWaiter = null;
      return;
    }
    if (typeof msg.event === "string") {
      const ev: QmpEvent = {
        event: msg.event,
        data: (msg.data as Record<string, unknown> | undefined) ?? {},
        timestamp: msg.timestamp as QmpEvent["timestamp"],
      };
      const index = this.events.push(ev) - 1;
      for (const w of [...this.waiters]) {
        if (w.name === ev.event && index >= w.from && w.match(ev.data)) {
          this.waiters.delete(w);
          w.resolve(ev);
        }
      }
      return;
    }
    const id = typeof msg.id === "string" ? msg.id : undefined;
    const p = id === undefined ? undefined : this.pending.get(id);
    if (!p || id === undefined) return;
    this.pending.delete(id);
    if ("error" in msg) {
      const err = msg.error as { class?: string; desc?: string };
      p.reject(new QmpError(p.command, err.class ?? "?", err.desc ?? "?"));
    } else {
      p.resolve(msg.return);
    }
  }

  private fail(e: Error): void {
    if (this.closedError) return;
    this.closedError = e;
    for (const p of this.pending.values()) p.reject(e);
    this.pending.clear();
    for (const w of this.waiters) w.reject(e);
    this.waiters.clear();
  }

  private withTimeout<T>(p: Promise<T>, ms: number, what: string, onTimeout?: () => void): Promise<T> {
    return new Promise<T>((resolve, reject) => {
      const t = setTimeout(() => {
        onTimeout?.();
        reject(new QmpTimeoutError(what, ms));
      }, ms);
      p.then(
        (v) => {
          clearTimeout(t);
          resolve(v);
        },
        (e: unknown) => {
          clearTimeout(t);
          reject(e);
        },
      );
    });
  }
}
