/**
 * The 12-byte header and the table-driven request/reply codec shared by both directions.
 * A table (frontend-requests.ts, backend-requests.ts) says per request which payload layout a
 * request and its reply carry, whether a reply always comes, and how many fds ride along.
 */
import { endianness } from "node:os";
import type { Fd } from "../../sys/fd.js";
import {
  HEADER_SIZE,
  VHOST_USER_KNOWN_FLAGS,
  VHOST_USER_NEED_REPLY_MASK,
  VHOST_USER_REPLY_MASK,
  VHOST_USER_VERSION,
  VHOST_USER_VERSION_MASK,
} from "./constants.js";
import { VhostUserError } from "./errors.js";
import type { PayloadCodec } from "./payloads.js";

const LE = endianness() === "LE";
/** Where the bytes of a u32 go, least significant first. */
const U32_LE = [0, 1, 2, 3] as const;
const U32_BE = [3, 2, 1, 0] as const;

export interface Header {
  /** Request code. */
  request: number;
  flags: number;
  /** Payload size in bytes. */
  size: number;
}

export function decodeHeader(bytes: Uint8Array): Header {
  if (bytes.byteLength < HEADER_SIZE)
    throw new VhostUserError("BAD_SIZE", "header", { value: bytes.byteLength, expected: HEADER_SIZE });
  // Read by hand: a DataView per message is garbage on the control path.
  return { request: getU32(bytes, 0), flags: getU32(bytes, 4), size: getU32(bytes, 8) };
}

/** A u32 in the host's byte order (the protocol's), read without a DataView. */
function getU32(b: Uint8Array, off: number): number {
  const b0 = b[off] as number;
  const b1 = b[off + 1] as number;
  const b2 = b[off + 2] as number;
  const b3 = b[off + 3] as number;
  return (LE ? b0 | (b1 << 8) | (b2 << 16) | (b3 << 24) : (b0 << 24) | (b1 << 16) | (b2 << 8) | b3) >>> 0;
}

export function encodeHeader(header: Header, into?: Uint8Array): Uint8Array {
  const b = into ?? new Uint8Array(HEADER_SIZE);
  const dv = new DataView(b.buffer, b.byteOffset, HEADER_SIZE);
  dv.setUint32(0, header.request, LE);
  dv.setUint32(4, header.flags, LE);
  dv.setUint32(8, header.size, LE);
  return b;
}

export function isReply(flags: number): boolean {
  return (flags & VHOST_USER_REPLY_MASK) !== 0;
}

export function needsReply(flags: number): boolean {
  return (flags & VHOST_USER_NEED_REPLY_MASK) !== 0;
}

/**
 * Version must be 0x1 and no reserved bit may be set. A request never has REPLY; a reply always
 * has it ("needs to be sent on each reply") and never has NEED_REPLY.
 */
export function checkFlags(header: Header, expectReply: boolean, request?: string): void {
  const version = header.flags & VHOST_USER_VERSION_MASK;
  if (version !== VHOST_USER_VERSION)
    throw new VhostUserError("BAD_VERSION", "header version", {
      request,
      value: version,
      expected: VHOST_USER_VERSION,
    });
  if ((header.flags & ~VHOST_USER_KNOWN_FLAGS) !== 0)
    throw new VhostUserError("BAD_FLAGS", "reserved flag bits set", { request, value: header.flags });
  if (isReply(header.flags) !== expectReply)
    throw new VhostUserError("BAD_FLAGS", expectReply ? "reply without REPLY flag" : "request with REPLY flag", {
      request,
      value: header.flags,
    });
  if (expectReply && needsReply(header.flags))
    throw new VhostUserError("BAD_FLAGS", "reply with NEED_REPLY flag", { request, value: header.flags });
}

// ---- tables --------------------------------------------------------------------------------

/** When a reply comes back for a request. */
export type ReplyRule =
  /** The spec always replies (GET_*, IOTLB_MSG, ...). NEED_REPLY changes nothing. */
  | "always"
  /** Only when the sender set NEED_REPLY (REPLY_ACK negotiated): a u64, 0 = success. */
  | "need-reply"
  /** Only in a protocol state the caller knows about (postcopy, LOG_SHMFD), or with NEED_REPLY. */
  | "conditional";

/** Exact count, or an inclusive range. */
export type FdRange = number | readonly [number, number];

export interface RequestSpec<Req, Rep> {
  readonly name: string;
  readonly code: number;
  /** Layout of the request payload. */
  readonly request: PayloadCodec<Req>;
  /** Layout of the reply payload (the REPLY_ACK u64 for "need-reply" requests). */
  readonly reply: PayloadCodec<Rep>;
  readonly replies: ReplyRule;
  /** Human-readable fd rule of the request, for the table and errors ("1", "0..1", "= num regions"). */
  readonly fds: string;
  readonly replyFds: string;
  /** Fds the spec lets a peer send but says to close unused (REM_MEM_REG). */
  readonly closeFds: boolean;
  /** How many fds a request with this payload must carry. */
  requestFdCount(payload: Req): FdRange;
  replyFdCount(payload: Rep): FdRange;
}

type FdRule<T> = FdRange | ((payload: T) => FdRange);

export interface SpecInit<Req, Rep> {
  code: number;
  request: PayloadCodec<Req>;
  reply: PayloadCodec<Rep>;
  replies: ReplyRule;
  fds?: FdRule<Req>;
  fdsText?: string;
  replyFds?: FdRule<Rep>;
  replyFdsText?: string;
  closeFds?: boolean;
}

function rangeText(r: FdRange): string {
  return typeof r === "number" ? String(r) : `${r[0]}..${r[1]}`;
}

export function defineRequest<Req, Rep>(name: string, init: SpecInit<Req, Rep>): RequestSpec<Req, Rep> {
  const fds = init.fds ?? 0;
  const replyFds = init.replyFds ?? 0;
  return {
    name,
    code: init.code,
    request: init.request,
    reply: init.reply,
    replies: init.replies,
    fds: init.fdsText ?? (typeof fds === "function" ? "depends on payload" : rangeText(fds)),
    replyFds: init.replyFdsText ?? (typeof replyFds === "function" ? "depends on payload" : rangeText(replyFds)),
    closeFds: init.closeFds ?? false,
    requestFdCount: (p) => (typeof fds === "function" ? fds(p) : fds),
    replyFdCount: (p) => (typeof replyFds === "function" ? replyFds(p) : replyFds),
  };
}

// biome-ignore lint/suspicious/noExplicitAny: the table's element type is existential; each entry keeps its own precise types.
export type AnyRequestSpec = RequestSpec<any, any>;
export type RequestTable = { readonly [name: string]: AnyRequestSpec };

export type RequestName<T extends RequestTable> = keyof T & string;
export type RequestPayload<T extends RequestTable, K extends RequestName<T>> =
  T[K] extends RequestSpec<infer Q, unknown> ? Q : never;
export type ReplyPayload<T extends RequestTable, K extends RequestName<T>> =
  T[K] extends RequestSpec<unknown, infer R> ? R : never;

/** A decoded request: handlers switch on `name` and get the payload typed. Fds are theirs to own. */
export type RequestMessage<T extends RequestTable> = {
  [K in RequestName<T>]: {
    readonly name: K;
    readonly code: number;
    readonly flags: number;
    /** NEED_REPLY was set: the receiver must answer (REPLY_ACK). */
    readonly needReply: boolean;
    readonly payload: RequestPayload<T, K>;
    readonly fds: Fd[];
  };
}[RequestName<T>];

export interface ReplyMessage<P> {
  readonly name: string;
  readonly code: number;
  readonly flags: number;
  readonly payload: P;
  readonly fds: Fd[];
}

/** Code → spec, built once per table. */
export class RequestIndex<T extends RequestTable> {
  readonly #byCode = new Map<number, AnyRequestSpec>();
  constructor(readonly table: T) {
    for (const spec of Object.values(table)) this.#byCode.set(spec.code, spec);
  }
  byCode(code: number): AnyRequestSpec | undefined {
    return this.#byCode.get(code);
  }
  byName<K extends RequestName<T>>(name: K): T[K] {
    const s = this.table[name];
    if (!s) throw new VhostUserError("UNKNOWN_REQUEST", "no such request", { value: String(name) });
    return s as T[K];
  }
}

function closeAll(fds: Fd[]): void {
  for (const f of fds) f.close();
  fds.length = 0;
}

function checkFdCount(range: FdRange, got: number, request: string, rule: string): void {
  // No destructuring into a fresh pair: this runs twice per control message.
  const min = typeof range === "number" ? range : range[0];
  const max = typeof range === "number" ? range : range[1];
  if (got < min || got > max)
    throw new VhostUserError("BAD_FD_COUNT", "ancillary fds", { request, value: got, expected: rule });
}

/**
 * Header + payload (+ the fds that came with it) → typed request. On any error every fd is
 * closed before the VhostUserError is thrown, so a bad message cannot leak descriptors.
 */
export function decodeRequest<T extends RequestTable>(
  index: RequestIndex<T>,
  header: Header,
  payload: Uint8Array,
  fds: Fd[],
): RequestMessage<T> {
  try {
    const spec = index.byCode(header.request);
    if (!spec) throw new VhostUserError("UNKNOWN_REQUEST", "request code", { value: header.request });
    checkFlags(header, false, spec.name);
    if (payload.byteLength !== header.size)
      throw new VhostUserError("BAD_SIZE", "payload shorter than header size", {
        request: spec.name,
        value: payload.byteLength,
        expected: header.size,
      });
    const value: unknown = spec.request.decode(payload, spec.name);
    const range = spec.requestFdCount(value);
    checkFdCount(range, fds.length, spec.name, spec.fds);
    const own = fds.slice();
    if (spec.closeFds) closeAll(own);
    return {
      name: spec.name,
      code: spec.code,
      flags: header.flags,
      needReply: needsReply(header.flags),
      payload: value,
      fds: own,
    } as RequestMessage<T>;
  } catch (e) {
    closeAll(fds);
    throw e;
  }
}

/**
 * A reply to `name`, decoded with the table's reply layout (which for every request without an
 * explicit reply is the REPLY_ACK u64). Closes fds on error.
 */
export function decodeReply<T extends RequestTable, K extends RequestName<T>>(
  index: RequestIndex<T>,
  name: K,
  header: Header,
  payload: Uint8Array,
  fds: Fd[],
): ReplyMessage<ReplyPayload<T, K>> {
  try {
    const spec = index.byName(name);
    if (header.request !== spec.code)
      throw new VhostUserError("UNEXPECTED_REPLY", "reply code", {
        request: spec.name,
        value: header.request,
        expected: spec.code,
      });
    checkFlags(header, true, spec.name);
    if (payload.byteLength !== header.size)
      throw new VhostUserError("BAD_SIZE", "payload shorter than header size", {
        request: spec.name,
        value: payload.byteLength,
        expected: header.size,
      });
    const value = spec.reply.decode(payload, spec.name) as ReplyPayload<T, K>;
    checkFdCount(spec.replyFdCount(value), fds.length, spec.name, spec.replyFds);
    return { name: spec.name, code: spec.code, flags: header.flags, payload: value, fds: fds.slice() };
  } catch (e) {
    closeAll(fds);
    throw e;
  }
}

export interface EncodedMessage {
  /** Header and payload, ready for one sendmsg. */
  bytes: Uint8Array;
  fds: readonly (Fd | number)[];
}

function frame(code: number, flags: number, payload: Uint8Array): Uint8Array {
  const bytes = new Uint8Array(HEADER_SIZE + payload.byteLength);
  // The header written in place (no Header object, no DataView: one allocation per message).
  putU32(bytes, 0, code);
  putU32(bytes, 4, flags);
  putU32(bytes, 8, payload.byteLength);
  bytes.set(payload, HEADER_SIZE);
  return bytes;
}

/** A u32 in the host's byte order (the protocol's), written without a DataView. */
function putU32(b: Uint8Array, off: number, v: number): void {
  const at = LE ? U32_LE : U32_BE; // indexed, not destructured (no iterator per call)
  b[off + at[0]] = v & 0xff;
  b[off + at[1]] = (v >>> 8) & 0xff;
  b[off + at[2]] = (v >>> 16) & 0xff;
  b[off + at[3]] = v >>> 24;
}

/** Encodes a request; checks the fd count against the table so we never send what we would reject. */
export function encodeRequest<T extends RequestTable, K extends RequestName<T>>(
  index: RequestIndex<T>,
  name: K,
  payload: RequestPayload<T, K>,
  options: { needReply?: boolean; fds?: readonly (Fd | number)[] } = {},
): EncodedMessage {
  const spec = index.byName(name);
  const fds = options.fds ?? [];
  checkFdCount(spec.requestFdCount(payload), fds.length, spec.name, spec.fds);
  const flags = VHOST_USER_VERSION | (options.needReply ? VHOST_USER_NEED_REPLY_MASK : 0);
  return { bytes: frame(spec.code, flags, spec.request.encode(payload, spec.name)), fds };
}

/** Encodes the reply to `name` (explicit reply payload, or the REPLY_ACK u64 for "need-reply" requests). */
export function encodeReply<T extends RequestTable, K extends RequestName<T>>(
  index: RequestIndex<T>,
  name: K,
  payload: ReplyPayload<T, K>,
  fds: readonly (Fd | number)[] = [],
): EncodedMessage {
  const spec = index.byName(name);
  checkFdCount(spec.replyFdCount(payload), fds.length, spec.name, spec.replyFds);
  return {
    bytes: frame(spec.code, VHOST_USER_VERSION | VHOST_USER_REPLY_MASK, spec.reply.encode(payload, spec.name)),
    fds,
  };
}
