/**
 * A minimal virtio-blk driver for tests: builds requests (16-byte header, data, status byte) in
 * guest memory through a SplitQueueDriver, kicks the backend through the frontend, waits for the
 * call and reads the status. Headers and status bytes live in caller-chosen scratch areas, one
 * slot per request in flight, so a test knows exactly which guest pages the device writes.
 */
import type { GuestMemory } from "../../../src/memory/guest-memory.js";
import type { VhostUserFrontend } from "../../../src/vhost-user/frontend/frontend.js";
import type { Segment, SplitQueueDriver } from "../../../src/virtio/driver.js";

export const VIRTIO_BLK_T_IN = 0;
export const VIRTIO_BLK_T_OUT = 1;
export const VIRTIO_BLK_T_FLUSH = 4;
export const VIRTIO_BLK_T_GET_ID = 8;
export const VIRTIO_BLK_S_OK = 0;
export const VIRTIO_BLK_S_IOERR = 1;
export const VIRTIO_BLK_S_UNSUPP = 2;
export const SECTOR_SIZE = 512;
const HEADER_SIZE = 16;

export interface BlkRequest {
  type: number;
  sector: number;
  /** Data buffers: device-readable for OUT, device-writable for IN / GET_ID. */
  data: Segment[];
}

export interface BlkCompletion {
  head: number;
  status: number;
  /** Bytes the device says it wrote (used element len). */
  len: number;
  request: BlkRequest;
}

export class VirtioBlkDriver {
  readonly #pending = new Map<number, { slot: number; request: BlkRequest }>();
  readonly #freeSlots: number[];

  constructor(
    readonly frontend: VhostUserFrontend,
    readonly queueIndex: number,
    readonly queue: SplitQueueDriver,
    readonly memory: GuestMemory,
    /** Scratch for headers (16 bytes a slot, device-readable) and status bytes (1 byte a slot). */
    readonly scratch: { headers: number; statuses: number },
  ) {
    this.#freeSlots = Array.from({ length: queue.size }, (_, i) => queue.size - 1 - i);
  }

  headerAddress(slot: number): number {
    return this.scratch.headers + slot * HEADER_SIZE;
  }

  statusAddress(slot: number): number {
    return this.scratch.statuses + slot;
  }

  get inFlight(): number {
    return this.#pending.size;
  }

  /** Adds one request (not yet visible to the device); returns its head. */
  submit(request: BlkRequest): number {
    const slot = this.#freeSlots.pop();
    if (slot === undefined) throw new Error("no free request slot");
    const h = this.headerAddress(slot);
    this.memory.writeU32(h, request.type);
    this.memory.writeU32(h + 4, 0);
    this.memory.writeU32(h + 8, request.sector % 2 ** 32);
    this.memory.writeU32(h + 12, Math.floor(request.sector / 2 ** 32));
    const st = this.statusAddress(slot);
    this.memory.writeU8(st, 0xff); // not a status the device would write
    const toDevice = request.type === VIRTIO_BLK_T_OUT;
    const readable: Segment[] = [{ addr: h, len: HEADER_SIZE }, ...(toDevice ? request.data : [])];
    const writable: Segment[] = [...(toDevice ? [] : request.data), { addr: st, len: 1 }];
    const head = this.queue.add(readable, writable);
    this.#pending.set(head, { slot, request });
    return head;
  }

  /** Publishes what was added and kicks when the device asks for it. */
  kick(): void {
    if (this.queue.publish()) this.frontend.kick(this.queueIndex);
  }

  /** Waits until every request in flight has completed; returns them in completion order. */
  async drain(timeoutMs = 5000): Promise<BlkCompletion[]> {
    const done: BlkCompletion[] = [];
    const deadline = Date.now() + timeoutMs;
    while (this.#pending.size > 0) {
      const since = this.frontend.vring(this.queueIndex).calls;
      this.#collect(done);
      if (this.#pending.size === 0) break;
      if (this.queue.enableInterrupts()) continue;
      await this.frontend.waitCall(this.queueIndex, { since, timeoutMs: Math.max(1, deadline - Date.now()) });
    }
    return done;
  }

  #collect(into: BlkCompletion[]): void {
    for (let u = this.queue.getUsed(); u; u = this.queue.getUsed()) {
      const p = this.#pending.get(u.head);
      if (!p) throw new Error(`device completed head ${u.head}, which is not in flight`);
      this.#pending.delete(u.head);
      const status = this.memory.readU8(this.statusAddress(p.slot));
      this.#freeSlots.push(p.slot);
      into.push({ head: u.head, status, len: u.len, request: p.request });
    }
  }

  /** One request, start to end; returns the status byte. */
  async run(request: BlkRequest, timeoutMs = 5000): Promise<BlkCompletion> {
    this.submit(request);
    this.kick();
    const [c] = await this.drain(timeoutMs);
    if (!c) throw new Error("no completion");
    return c;
  }

  read(sector: number, addr: number, len: number): Promise<BlkCompletion> {
    return this.run({ type: VIRTIO_BLK_T_IN, sector, data: [{ addr, len }] });
  }

  write(sector: number, addr: number, len: number): Promise<BlkCompletion> {
    return this.run({ type: VIRTIO_BLK_T_OUT, sector, data: [{ addr, len }] });
  }
}
