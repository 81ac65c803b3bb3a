import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import type { Socket } from "node:net";
import { GuestMemory } from "../../src/memory/guest-memory.js";
import { GuestMemoryRegion } from "../../src/memory/region.js";
import { MigrationError } from "../../src/migration/errors.js";
import type { SourceHooks } from "../../src/migration/source.js";

export const MiB = 1024 * 1024;

/** Two memfd regions with a hole between them (24 MiB). */
export function makeMemory(sizes: [number, number] = [16 * MiB, 8 * MiB]): GuestMemory {
  return new GuestMemory([
    GuestMemoryRegion.memfd(0, sizes[0], { name: "mig-test-0" }),
    GuestMemoryRegion.memfd(64 * MiB, sizes[1], { name: "mig-test-1" }),
  ]);
}

/** Non-zero content on 3 pages in 4 (the 4th stays zero: the zero-page path is exercised). */
export function fillPattern(mem: GuestMemory, seed = 1, skip?: (gpa: number) => boolean): void {
  const page = new Uint8Array(4096);
  const dv = new DataView(page.buffer);
  for (const r of mem.regions) {
    for (let off = 0; off < r.size; off += 4096) {
      const p = off / 4096;
      if (p % 4 === 3) continue;
      if (skip?.(r.guestBase + off)) continue;
      for (let i = 0; i < 4096; i += 512) dv.setUint32(i, (seed * 2654435761 + r.guestBase + off + i) >>> 0, true);
      (r.bytes(off, 4096) as Uint8Array).set(page);
    }
  }
}

/** sha256 of the whole region's bytes (independent of the migration's own digest code). */
export function rawDigest(mem: GuestMemory, skip?: (gpa: number) => boolean): string[] {
  return mem.regions.map((r) => {
    const h = createHash("sha256");
    for (let off = 0; off < r.size; off += MiB) {
      if (skip?.(r.guestBase + off)) continue;
      h.update(r.bytes(off, MiB) as Uint8Array);
    }
    return h.digest("hex");
  });
}

/**
 * A connected TCP pair on localhost: [source side, destination side]. A raw node:net pair:
 * MigrationListener only hands out connections that already sent their first record.
 */
export async function socketPair(): Promise<[Socket, Socket]> {
  const server = createServer();
  await new Promise<void>((r) => server.listen(0, "127.0.0.1", r));
  const port = (server.address() as { port: number }).port;
  const accepted = new Promise<Socket>((r) => server.once("connection", r));
  const { connectEndpoint } = await import("../../src/migration/transport.js");
  const [a, b] = await Promise.all([connectEndpoint({ kind: "tcp", host: "127.0.0.1", port }), accepted]);
  b.setNoDelay(true);
  server.close();
  return [a, b];
}

export function countFds(): number {
  const { readdirSync } = require_fs();
  return readdirSync("/proc/self/fd").length;
}

import * as fs from "node:fs";

function require_fs(): typeof fs {
  return fs;
}

import { createServer, type Socket as NetSocket } from "node:net";
import { connectEndpoint as connectTo } from "../../src/migration/transport.js";

export interface Proxy {
  /** source side socket, destination side socket */
  source: NetSocket;
  destination: NetSocket;
  /** every byte that went source -> destination */
  captured: () => Buffer;
}

/**
 * Source <-> proxy <-> destination. `mangle(chunk, offset)` may rewrite the forward stream;
 * `cutAt` ends the forward stream (and resets both connections) after that many bytes.
 */
export async function proxyPair(opts: { flipAt?: number; cutAt?: number } = {}): Promise<Proxy> {
  const [s, pin] = await socketPair();
  const [pout, d] = await socketPair();
  const chunks: Buffer[] = [];
  let off = 0;
  let cut = false;
  pin.on("data", (c: Buffer) => {
    if (cut) return;
    let chunk = Buffer.from(c);
    if (opts.flipAt !== undefined && opts.flipAt >= off && opts.flipAt < off + chunk.length)
      chunk[opts.flipAt - off] = (chunk[opts.flipAt - off] as number) ^ 0x40;
    if (opts.cutAt !== undefined && off + chunk.length >= opts.cutAt) {
      chunk = chunk.subarray(0, opts.cutAt - off);
      cut = true;
    }
    chunks.push(chunk);
    off += chunk.length;
    pout.write(chunk);
    if (cut) {
      pout.end(() => {
        pout.destroy();
        pin.destroy();
      });
    }
  });
  pout.on("data", (c: Buffer) => {
    if (!pin.destroyed) pin.write(c);
  });
  const kill = () => {
    pin.destroy();
    pout.destroy();
  };
  pin.on("close", () => {
    if (!cut) kill();
  });
  // The destination's last words (a FAIL record) still reach the source.
  pout.on("close", () => pin.end());
  pin.on("error", () => undefined);
  pout.on("error", () => undefined);
  void createServer;
  void connectTo;
  return { source: s, destination: d, captured: () => Buffer.concat(chunks) };
}

/** Offsets of the records in a captured stream (after the 16-byte header). */
export function recordOffsets(stream: Buffer): number[] {
  const out: number[] = [];
  let o = 16;
  while (o + 8 <= stream.length) {
    out.push(o);
    o += 12 + stream.readUInt32LE(o + 4);
  }
  return out;
}

export const settle = () => new Promise((r) => setTimeout(r, 50));

/** Source hooks that count stopWriters / resumeWriters calls. */
export function hooks(): SourceHooks & { stopped: number; resumed: number } {
  const h = {
    stopped: 0,
    resumed: 0,
    stopWriters() {
      h.stopped++;
    },
    resumeWriters() {
      h.resumed++;
    },
  };
  return h;
}

/** Both sides of a migration must fail, each with a MigrationError; returns them. */
export async function expectBoth(
  source: Promise<unknown>,
  destination: Promise<unknown>,
): Promise<[MigrationError, MigrationError]> {
  const [s, d] = await Promise.allSettled([source, destination]);
  assert.equal(s.status, "rejected", "source should fail");
  assert.equal(d.status, "rejected", "destination should fail");
  const se = (s as PromiseRejectedResult).reason;
  const de = (d as PromiseRejectedResult).reason;
  assert.ok(se instanceof MigrationError, `source error: ${se}`);
  assert.ok(de instanceof MigrationError, `destination error: ${de}`);
  return [se, de];
}
