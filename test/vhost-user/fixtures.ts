/** Hand-written byte fixtures: hex words as they appear on an x86-64 / arm64 (little-endian) wire. */

import { readdirSync } from "node:fs";
import { EventFd } from "../../src/sys/eventfd.js";
import type { Fd } from "../../src/sys/fd.js";
import { createMemfd } from "../../src/sys/memfd.js";

/** "05000000 01000000" → bytes; whitespace and '|' are separators. */
export function hex(s: string): Uint8Array {
  const h = s.replace(/[\s|]/g, "");
  if (h.length % 2 !== 0) throw new Error(`odd hex length in ${s}`);
  return Uint8Array.from({ length: h.length / 2 }, (_, i) => Number.parseInt(h.slice(i * 2, i * 2 + 2), 16));
}

/** A little-endian u64 as 16 hex digits. */
export function le64(v: bigint): string {
  let out = "";
  for (let i = 0n; i < 8n; i++) out += ((v >> (8n * i)) & 0xffn).toString(16).padStart(2, "0");
  return out;
}

export function le32(v: number): string {
  return le64(BigInt(v)).slice(0, 8);
}

export function header(request: number, flags: number, size: number): string {
  return `${le32(request)} ${le32(flags)} ${le32(size)}`;
}

export function memfds(n: number): Fd[] {
  return Array.from({ length: n }, (_, i) => createMemfd(`vu-test-${i}`, 4096));
}

export function eventFd(): Fd {
  return new EventFd().fd;
}

export function openFdCount(): number {
  return readdirSync("/proc/self/fd").length;
}

export function splitMessage(bytes: Uint8Array): { header: Uint8Array; payload: Uint8Array } {
  return { header: bytes.subarray(0, 12), payload: bytes.subarray(12) };
}
