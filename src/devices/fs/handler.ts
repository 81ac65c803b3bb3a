/**
 * The virtio-fs queue handlers, run in the framework's queue worker threads (this module is
 * the device's queueWorker: it exports createQueueHandler).
 *
 * Queue 0 is the hiprio queue: the guest sends FORGET / BATCH_FORGET there (virtio 1.2,
 * 5.11.6.1). Queue 1 is the one request queue, and its worker owns the file system (inode and
 * handle tables, every fd). The two threads and the control plane talk over a
 * BroadcastChannel named per device: the hiprio worker forwards forgets to the request
 * worker; the control plane asks the request worker for its state (save) or hands it one
 * (load) — QEMU does both while the rings are stopped.
 */
import { BroadcastChannel } from "node:worker_threads";
import type { GuestMemory } from "../../memory/guest-memory.js";
import type { QueueContext, QueueHandler } from "../../vhost-user/backend/device.js";
import type { DescriptorChain } from "../../virtio/chain.js";
import { type FsState, PassthroughFs } from "./passthrough.js";
import { type FuseChain, FuseServer } from "./server.js";
import { decodeState, encodeState } from "./state.js";

/** What the control plane hands each queue worker. */
export interface FsWorkerData {
  role: "hiprio" | "request";
  /** BroadcastChannel name shared by the device's threads. */
  channel: string;
  sharedDir: string;
  readonly: boolean;
  cacheSeconds: number;
  maxPages: number;
  readdirplus: boolean;
  /** A migrated state to load before the first request (the destination). */
  state: Uint8Array | null;
}

/** Messages on the device's channel. */
export type FsChannelMessage =
  | { type: "up" }
  | { type: "down" }
  | { type: "forget"; forgets: { nodeid: bigint; nlookup: bigint }[] }
  | { type: "save"; id: number }
  | { type: "saved"; id: number; state?: Uint8Array; error?: string }
  | { type: "load"; id: number; state: Uint8Array }
  | { type: "loaded"; id: number; error?: string; stale?: { staleInodes: number; staleHandles: number } };

const MAX_WARNINGS = 20;

/** One line on stderr per state transfer (what travelled, what did not survive). */
function logState(what: string, st: FsState, stale?: { staleInodes: number; staleHandles: number }): void {
  process.stderr.write(
    `vmshift fs: info: ${what}: ${st.inodes.length} inode(s), ${st.handles.length} handle(s)` +
      (stale ? `, ${stale.staleInodes} inode(s) and ${stale.staleHandles} handle(s) stale` : "") +
      "\n",
  );
}

/** A DescriptorChain as the FUSE session sees it: zero-copy views where the buffers allow. */
export class GuestChain implements FuseChain {
  constructor(
    readonly chain: DescriptorChain,
    readonly memory: GuestMemory,
  ) {}

  get readableLength(): number {
    return this.chain.readableLength;
  }

  get writableLength(): number {
    return this.chain.writableLength;
  }

  readReadableInto(into: Uint8Array, offset: number): number {
    return this.chain.readReadableInto(into, offset);
  }

  writeWritable(data: Uint8Array, offset: number): number {
    return this.chain.writeWritable(data, offset);
  }

  #views(first: number, last: number, skip: number, len: number): { views: Uint8Array[]; gpas: number[] } | null {
    const c = this.chain;
    const views: Uint8Array[] = [];
    const gpas: number[] = [];
    let off = 0;
    for (let i = first; i < last && off < len; i++) {
      const dlen = c.len(i);
      if (skip >= dlen) {
        skip -= dlen;
        continue;
      }
      const gpa = c.addr(i) + skip;
      const n = Math.min(dlen - skip, len - off);
      skip = 0;
      const v = this.memory.slice(gpa, n);
      if (!v) return null;
      views.push(v);
      gpas.push(gpa);
      off += n;
    }
    return off === len ? { views, gpas } : null;
  }

  readableViews(offset: number, len: number): Uint8Array[] | null {
    return this.#views(0, this.chain.readableCount, offset, len)?.views ?? null;
  }

  writableViews(offset: number, len: number): { views: Uint8Array[]; written(n: number): void } | null {
    const r = this.#views(this.chain.readableCount, this.chain.count, offset, len);
    if (!r) return null;
    const chain = this.chain;
    return {
      views: r.views,
      // Exactly the bytes the read put into guest memory go into the dirty log.
      written(n: number) {
        for (let k = 0; k < r.views.length && n > 0; k++) {
          const m = Math.min(n, (r.views[k] as Uint8Array).length);
          chain.markWritten(r.gpas[k] as number, m);
          n -= m;
        }
        if (offset + len > chain.written) chain.written = offset + len;
      },
    };
  }
}

class HiprioHandler implements QueueHandler {
  #memory: GuestMemory;
  readonly #bc: BroadcastChannel;

  constructor(ctx: QueueContext, d: FsWorkerData) {
    this.#memory = ctx.memory;
    this.#bc = new BroadcastChannel(d.channel);
    this.#bc.unref();
  }

  setMemory(m: GuestMemory): void {
    this.#memory = m;
  }

  process(chain: DescriptorChain): number {
    const forgets = FuseServer.forgetsOf(new GuestChain(chain, this.#memory));
    if (forgets.length > 0) this.#bc.postMessage({ type: "forget", forgets } satisfies FsChannelMessage);
    return 0;
  }

  close(): void {
    this.#bc.close();
  }
}

class RequestHandler implements QueueHandler {
  #memory: GuestMemory;
  readonly #server: FuseServer;
  readonly #bc: BroadcastChannel;
  #warnings = 0;

  constructor(ctx: QueueContext, d: FsWorkerData) {
    this.#memory = ctx.memory;
    const fs = new PassthroughFs(d.sharedDir, { readonly: d.readonly, cacheSeconds: d.cacheSeconds });
    try {
      if (d.state) {
        const st = decodeState(d.state);
        logState("migrated state loaded", st, fs.loadState(st));
      }
    } catch (e) {
      fs.close();
      throw e;
    }
    this.#server = new FuseServer(fs, {
      maxPages: d.maxPages,
      readdirplus: d.readdirplus,
      warn: (m) => this.#warn(m),
    });
    this.#bc = new BroadcastChannel(d.channel);
    this.#bc.unref();
    this.#bc.onmessage = (ev) => this.#onMessage((ev as MessageEvent).data as FsChannelMessage);
    this.#bc.postMessage({ type: "up" } satisfies FsChannelMessage);
  }

  #onMessage(m: FsChannelMessage): void {
    const fs = this.#server.fs;
    switch (m.type) {
      case "forget":
        for (const f of m.forgets) fs.forget(f.nodeid, f.nlookup);
        break;
      case "save":
        try {
          const st = fs.saveState();
          logState("state saved", st);
          this.#bc.postMessage({ type: "saved", id: m.id, state: encodeState(st) } satisfies FsChannelMessage);
        } catch (e) {
          this.#bc.postMessage({ type: "saved", id: m.id, error: (e as Error).message } satisfies FsChannelMessage);
        }
        break;
      case "load":
        try {
          const st = decodeState(m.state);
          const stale = fs.loadState(st);
          logState("migrated state loaded", st, stale);
          this.#bc.postMessage({ type: "loaded", id: m.id, stale } satisfies FsChannelMessage);
        } catch (e) {
          this.#bc.postMessage({ type: "loaded", id: m.id, error: (e as Error).message } satisfies FsChannelMessage);
        }
        break;
    }
  }

  #warn(message: string): void {
    if (this.#warnings >= MAX_WARNINGS) return;
    this.#warnings++;
    const more = this.#warnings === MAX_WARNINGS ? " (further warnings suppressed)" : "";
    process.stderr.write(`vmshift fs: ${message}${more}\n`);
  }

  setMemory(m: GuestMemory): void {
    this.#memory = m;
  }

  process(chain: DescriptorChain): number {
    return this.#server.handle(new GuestChain(chain, this.#memory));
  }

  close(): void {
    this.#bc.postMessage({ type: "down" } satisfies FsChannelMessage);
    this.#bc.close();
    this.#server.fs.close();
  }
}

export function createQueueHandler(ctx: QueueContext): QueueHandler {
  const d = ctx.data as FsWorkerData;
  return d.role === "hiprio" ? new HiprioHandler(ctx, d) : new RequestHandler(ctx, d);
}
