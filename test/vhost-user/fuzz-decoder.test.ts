/**
 * Property-based fuzzing of the vhost-user decoder (fast-check): valid messages from
 * encodeRequest / encodeReply, then bytes flipped, cut, appended, the size field rewritten and
 * the fd count changed, pushed through the MessageFramer and decodeRequest / decodeReply. Nothing
 * may throw but a VhostUserError, and every fd handed in is either closed or owned by the message
 * that came out.
 *
 * A fixed seed and a bounded number of runs here; `npm run fuzz -- RUNS` runs longer with a
 * fresh seed (VMSHIFT_FUZZ_RUNS, VMSHIFT_FUZZ_SEED).
 */
import assert from "node:assert/strict";
import { test } from "node:test";
import fc from "fast-check";
import { EventFd } from "../../src/sys/eventfd.js";
import type { Fd } from "../../src/sys/fd.js";
import { MessageFramer } from "../../src/vhost-user/connection.js";
import { VhostUserError } from "../../src/vhost-user/protocol/errors.js";
import {
  FRONTEND_INDEX,
  FRONTEND_REQUESTS,
  type FrontendRequests,
} from "../../src/vhost-user/protocol/frontend-requests.js";
import {
  decodeReply,
  decodeRequest,
  encodeReply,
  encodeRequest,
  type RequestName,
} from "../../src/vhost-user/protocol/message.js";
import { countFds } from "../helpers/proc.js";

const RUNS = Number(process.env.VMSHIFT_FUZZ_RUNS ?? 2000);
const SEED = Number(process.env.VMSHIFT_FUZZ_SEED ?? 0x5eed);
if (process.env.VMSHIFT_FUZZ_RUNS) process.stderr.write(`fuzz-decoder: ${RUNS} runs, seed ${SEED}\n`);

type Name = RequestName<FrontendRequests>;
const NAMES = Object.keys(FRONTEND_REQUESTS) as Name[];

const u64 = fc.bigInt({ min: 0n, max: (1n << 64n) - 1n });
const u32 = fc.nat({ max: 0xffff_ffff });
const u16 = fc.nat({ max: 0xffff });
const region = fc.record({ guestAddress: u64, size: u64, userAddress: u64, mmapOffset: u64 });
const vringState = fc.record({ index: u32, num: u32 });
const config = fc.record({ offset: u32, flags: u32, data: fc.uint8Array({ maxLength: 256 }) });
const inflight = fc.record({ mmapSize: u64, mmapOffset: u64, numQueues: u16, queueSize: u16 });

/** A payload of the request's own layout (values in range of their fields, not necessarily sensible). */
function requestPayload(name: Name): fc.Arbitrary<unknown> {
  switch (name) {
    case "SET_FEATURES":
    case "SET_PROTOCOL_FEATURES":
    case "SEND_RARP":
    case "NET_SET_MTU":
    case "CLOSE_CRYPTO_SESSION":
    case "SET_STATUS":
      return u64;
    case "SET_MEM_TABLE":
      return fc.record({ regions: fc.array(region, { maxLength: 8 }) });
    case "SET_LOG_BASE":
      return fc.record({ mmapSize: u64, mmapOffset: u64 });
    case "SET_VRING_NUM":
    case "SET_VRING_BASE":
    case "GET_VRING_BASE":
    case "SET_VRING_ENABLE":
    case "SET_VRING_ENDIAN":
    case "VRING_KICK":
      return vringState;
    case "SET_VRING_ADDR":
      return fc.record({ index: u32, flags: u32, descriptor: u64, used: u64, available: u64, log: u64 });
    case "SET_VRING_KICK":
    case "SET_VRING_CALL":
    case "SET_VRING_ERR":
      return fc.record({ index: fc.nat({ max: 255 }), noFd: fc.boolean() });
    case "IOTLB_MSG":
      return fc.record({
        iova: u64,
        size: u64,
        userAddress: u64,
        permissions: fc.nat({ max: 3 }),
        type: fc.integer({ min: 1, max: 4 }),
      });
    case "GET_CONFIG":
    case "SET_CONFIG":
      return config;
    case "CREATE_CRYPTO_SESSION":
      return fc.uint8Array({ maxLength: 64 });
    case "GET_INFLIGHT_FD":
    case "SET_INFLIGHT_FD":
      return inflight;
    case "ADD_MEM_REG":
      return fc.oneof(
        fc.record({ kind: fc.constant("region"), region }),
        fc.record({ kind: fc.constant("ack"), value: u64 }),
      );
    case "REM_MEM_REG":
      return region;
    case "GET_SHARED_OBJECT":
      return fc.record({ uuid: fc.uint8Array({ minLength: 16, maxLength: 16 }) });
    case "SET_DEVICE_STATE_FD":
      return fc.record({ direction: fc.nat({ max: 1 }), phase: fc.constant(0) });
    default:
      return fc.constant(undefined);
  }
}

/** One change to a valid encoding. */
type Mutation =
  | { kind: "flip"; at: number; xor: number }
  | { kind: "cut"; keep: number }
  | { kind: "extend"; bytes: Uint8Array }
  | { kind: "size"; size: number }
  | { kind: "flags"; flags: number }
  | { kind: "code"; code: number };

const mutation: fc.Arbitrary<Mutation> = fc.oneof(
  fc.record({ kind: fc.constant("flip" as const), at: fc.nat({ max: 4096 }), xor: fc.integer({ min: 1, max: 255 }) }),
  fc.record({ kind: fc.constant("cut" as const), keep: fc.nat({ max: 300 }) }),
  fc.record({ kind: fc.constant("extend" as const), bytes: fc.uint8Array({ minLength: 1, maxLength: 40 }) }),
  fc.record({
    kind: fc.constant("size" as const),
    size: fc.oneof(fc.nat({ max: 300 }), fc.constantFrom(0xffff_ffff, 0x1001, 4096)),
  }),
  fc.record({ kind: fc.constant("flags" as const), flags: fc.oneof(u32, fc.constantFrom(0, 1, 5, 9, 13, 0x11)) }),
  fc.record({ kind: fc.constant("code" as const), code: fc.oneof(fc.nat({ max: 50 }), u32) }),
);

function mutate(bytes: Uint8Array, m: Mutation): Uint8Array {
  switch (m.kind) {
    case "flip": {
      const b = bytes.slice();
      if (b.length > 0) b[m.at % b.length] = (b[m.at % b.length] as number) ^ m.xor;
      return b;
    }
    case "cut":
      return bytes.slice(0, Math.min(m.keep, bytes.length));
    case "extend": {
      const b = new Uint8Array(bytes.length + m.bytes.length);
      b.set(bytes);
      b.set(m.bytes, bytes.length);
      return b;
    }
    case "size":
    case "flags":
    case "code": {
      const b = bytes.slice();
      if (b.length < 12) return b;
      const off = m.kind === "code" ? 0 : m.kind === "flags" ? 4 : 8;
      const v = m.kind === "code" ? m.code : m.kind === "flags" ? m.flags : m.size;
      new DataView(b.buffer).setUint32(off, v >>> 0, true);
      return b;
    }
  }
}

function eventFds(n: number): Fd[] {
  return Array.from({ length: n }, () => new EventFd().fd);
}

function expectVhostUserError(e: unknown, what: string): void {
  if (!(e instanceof VhostUserError)) {
    assert.fail(`${what} threw ${e instanceof Error ? `${e.name}: ${e.message}` : String(e)}, not a VhostUserError`);
  }
}

/**
 * Frames `bytes` (one chunk, carrying `fds`) and decodes every message that comes out as a
 * request. Checks the error type, closes what the messages own, and returns every fd we made
 * so the caller can check they are all closed.
 */
function frameAndDecode(bytes: Uint8Array, fdCount: number, split: number): Fd[] {
  const fds = eventFds(fdCount);
  const framer = new MessageFramer();
  const cut = Math.min(split, bytes.length);
  const chunks = split > 0 && cut < bytes.length ? [bytes.subarray(0, cut), bytes.subarray(cut)] : [bytes];
  try {
    for (const [i, chunk] of chunks.entries()) {
      let messages: ReturnType<MessageFramer["push"]>;
      try {
        messages = framer.push(chunk, i === 0 ? fds : []);
      } catch (e) {
        expectVhostUserError(e, "MessageFramer.push");
        return fds;
      }
      for (const m of messages) {
        try {
          const msg = decodeRequest(FRONTEND_INDEX, m.header, m.payload, m.fds);
          for (const f of msg.fds) f.close();
        } catch (e) {
          expectVhostUserError(e, "decodeRequest");
          for (const f of m.fds) assert.ok(f.closed, "decodeRequest threw and left an fd open");
        }
      }
    }
  } finally {
    framer.close();
  }
  return fds;
}

test("decodeRequest: mutated valid messages throw only VhostUserError and never keep an fd", () => {
  const before = countFds();
  const arb = fc
    .constantFrom(...NAMES)
    .chain((name) =>
      fc.tuple(
        fc.constant(name),
        requestPayload(name),
        fc.boolean(),
        fc.array(mutation, { maxLength: 4 }),
        fc.nat({ max: 10 }),
        fc.nat({ max: 60 }),
      ),
    );
  fc.assert(
    fc.property(arb, ([name, payload, needReply, mutations, fdCount, split]) => {
      let bytes: Uint8Array;
      try {
        // The fd count the layout asks for is part of what the mutations then break.
        const spec = FRONTEND_REQUESTS[name];
        const range = spec.requestFdCount(payload as never);
        const want = typeof range === "number" ? range : range[0];
        bytes = encodeRequest(FRONTEND_INDEX, name, payload as never, {
          needReply,
          fds: Array.from({ length: want }, () => -1),
        }).bytes;
      } catch (e) {
        // A generated value the encoder refuses (e.g. a config of 256 bytes at the limit) is fine.
        expectVhostUserError(e, "encodeRequest");
        return;
      }
      for (const m of mutations) bytes = mutate(bytes, m);
      const fds = frameAndDecode(bytes, Math.min(fdCount, 8), split);
      for (const f of fds) assert.ok(f.closed, "an fd escaped both the error path and the decoded message");
    }),
    { seed: SEED, numRuns: RUNS },
  );
  assert.equal(countFds(), before, "fds leaked across the runs");
});

test("decodeRequest: random bytes with random fds", () => {
  const before = countFds();
  fc.assert(
    fc.property(fc.uint8Array({ maxLength: 600 }), fc.nat({ max: 8 }), fc.nat({ max: 40 }), (bytes, n, split) => {
      const fds = frameAndDecode(bytes, n, split);
      for (const f of fds) assert.ok(f.closed, "an fd escaped");
    }),
    { seed: SEED + 1, numRuns: RUNS },
  );
  assert.equal(countFds(), before, "fds leaked across the runs");
});

test("decodeReply: mutated replies and acks throw only VhostUserError and never keep an fd", () => {
  const before = countFds();
  fc.assert(
    fc.property(
      fc.constantFrom(...NAMES),
      u64,
      fc.array(mutation, { maxLength: 3 }),
      fc.nat({ max: 3 }),
      (name, value, mutations, fdCount) => {
        // A u64 reply to `name` (its REPLY_ACK, or its explicit u64): for the other reply layouts
        // it is a size error from the start, and the mutations take it from there.
        let bytes = encodeReply(FRONTEND_INDEX, "GET_FEATURES", value).bytes;
        new DataView(bytes.buffer).setUint32(0, FRONTEND_REQUESTS[name].code, true);
        for (const m of mutations) bytes = mutate(bytes, m);
        const fds = eventFds(fdCount);
        const framer = new MessageFramer();
        try {
          for (const m of framer.push(bytes, fds)) {
            try {
              const r = decodeReply(FRONTEND_INDEX, name, m.header, m.payload, m.fds);
              for (const f of r.fds) f.close();
            } catch (e) {
              expectVhostUserError(e, "decodeReply");
              for (const f of m.fds) assert.ok(f.closed, "decodeReply threw and left an fd open");
            }
          }
        } catch (e) {
          expectVhostUserError(e, "MessageFramer.push");
        } finally {
          framer.close();
        }
        for (const f of fds) assert.ok(f.closed, "an fd escaped");
      },
    ),
    { seed: SEED + 2, numRuns: RUNS },
  );
  assert.equal(countFds(), before, "fds leaked across the runs");
});
