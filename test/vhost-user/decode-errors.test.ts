/** Every decode error path: a typed VhostUserError with code, request name and the wrong value; fds closed. */
import assert from "node:assert/strict";
import { test } from "node:test";
import { type Fd, isOpenFd } from "../../src/sys/fd.js";
import {
  BACKEND_INDEX,
  decodeHeader,
  decodeReply,
  decodeRequest,
  encodeRequest,
  FRONTEND_INDEX,
  MemoryTableCodec,
  U64,
  VhostUserError,
} from "../../src/vhost-user/protocol/index.js";
import { header, hex, le32, le64, memfds, splitMessage } from "./fixtures.js";

function decodeFront(bytes: Uint8Array, fds: Fd[] = []) {
  const { header: h, payload } = splitMessage(bytes);
  return decodeRequest(FRONTEND_INDEX, decodeHeader(h), payload, fds);
}

function expectError(fn: () => unknown, code: string, request?: string, value?: number | bigint | string) {
  assert.throws(fn, (e: unknown) => {
    assert.ok(e instanceof VhostUserError, String(e));
    assert.equal(e.code, code, e.message);
    if (request !== undefined) assert.equal(e.request, request);
    if (value !== undefined) assert.equal(e.value, value);
    return true;
  });
}

function rawFds(fds: Fd[]): number[] {
  return fds.map((f) => f.fd);
}

test("BAD_SIZE: SET_VRING_ADDR with 39 bytes", () => {
  expectError(() => decodeFront(hex(`${header(9, 1, 39)} ${"00".repeat(39)}`)), "BAD_SIZE", "SET_VRING_ADDR", 39);
});

test("BAD_SIZE: u64 request with 4 bytes; empty request with a payload", () => {
  expectError(() => decodeFront(hex(`${header(2, 1, 4)} 00000000`)), "BAD_SIZE", "SET_FEATURES", 4);
  expectError(() => decodeFront(hex(`${header(1, 1, 8)} ${le64(0n)}`)), "BAD_SIZE", "GET_FEATURES", 8);
});

test("BAD_SIZE: memory table whose size disagrees with num regions", () => {
  expectError(
    () => decodeFront(hex(`${header(5, 1, 40)} 02000000 00000000 ${"00".repeat(32)}`), memfds(2)),
    "BAD_SIZE",
    "SET_MEM_TABLE",
    40,
  );
  expectError(() => decodeFront(hex(`${header(5, 1, 4)} 00000000`)), "BAD_SIZE", "SET_MEM_TABLE", 4);
});

test("TOO_MANY_REGIONS: SET_MEM_TABLE announcing 9 regions", () => {
  const fds = memfds(8);
  const raw = rawFds(fds);
  expectError(
    () => decodeFront(hex(`${header(5, 1, 8 + 9 * 32)} 09000000 00000000 ${"00".repeat(9 * 32)}`), fds),
    "TOO_MANY_REGIONS",
    "SET_MEM_TABLE",
    9,
  );
  for (const n of raw) assert.ok(!isOpenFd(n), `fd ${n} leaked`);
});

test("BAD_SIZE: config size field above 256, and config payload shorter than size", () => {
  expectError(
    () => decodeFront(hex(`${header(25, 1, 12)} ${le32(0)} ${le32(257)} ${le32(0)}`)),
    "BAD_SIZE",
    "SET_CONFIG",
    257,
  );
  expectError(
    () => decodeFront(hex(`${header(25, 1, 14)} ${le32(0)} ${le32(4)} ${le32(0)} 0102`)),
    "BAD_SIZE",
    "SET_CONFIG",
    14,
  );
});

test("BAD_SIZE: GET_SHMEM_CONFIG reply truncated to nregions", () => {
  const { header: h, payload } = splitMessage(hex(`${header(44, 5, 16)} ${le32(1)} ${le32(0)} ${le64(4096n)}`));
  expectError(() => decodeReply(FRONTEND_INDEX, "GET_SHMEM_CONFIG", decodeHeader(h), payload, []), "BAD_SIZE");
});

test("BAD_FD_COUNT: SET_MEM_TABLE 2 regions with 1 fd, SET_LOG_BASE u64 with an fd, no-fd kick with an fd", () => {
  const table = `${header(5, 1, 72)} 02000000 00000000 ${"00".repeat(64)}`;
  const one = memfds(1);
  const raw = rawFds(one);
  expectError(() => decodeFront(hex(table), one), "BAD_FD_COUNT", "SET_MEM_TABLE", 1);
  assert.ok(!isOpenFd(raw[0] as number));
  // SET_LOG_BASE: the log description with its fd (LOG_SHMFD) or without (QEMU, no LOG_SHMFD);
  // the bare u64 address (rust-vmm, no LOG_SHMFD) never has one.
  const withoutFd = decodeFront(hex(`${header(6, 1, 16)} ${le64(4096n)} ${le64(0n)}`));
  assert.deepEqual(withoutFd.payload, { mmapSize: 4096n, mmapOffset: 0n });
  assert.deepEqual(decodeFront(hex(`${header(6, 1, 8)} ${le64(0x1000n)}`)).payload, { address: 0x1000n });
  expectError(
    () => decodeFront(hex(`${header(6, 1, 8)} ${le64(0x1000n)}`), memfds(1)),
    "BAD_FD_COUNT",
    "SET_LOG_BASE",
    1,
  );
  expectError(
    () => decodeFront(hex(`${header(12, 1, 8)} ${le64(0x100n)}`), memfds(1)),
    "BAD_FD_COUNT",
    "SET_VRING_KICK",
    1,
  );
  expectError(() => decodeFront(hex(`${header(13, 1, 8)} ${le64(0n)}`)), "BAD_FD_COUNT", "SET_VRING_CALL", 0);
  expectError(() => decodeFront(hex(header(4, 1, 0)), memfds(1)), "BAD_FD_COUNT", "RESET_OWNER", 1);
  const lookup = splitMessage(hex(`${header(8, 5, 8)} ${le64(1n)}`));
  expectError(
    () => decodeReply(BACKEND_INDEX, "SHARED_OBJECT_LOOKUP", decodeHeader(lookup.header), lookup.payload, memfds(1)),
    "BAD_FD_COUNT",
    "SHARED_OBJECT_LOOKUP",
    1,
  );
});

test("UNKNOWN_REQUEST: code 0, 45 on the main socket, 11 on the back-end channel", () => {
  expectError(() => decodeFront(hex(header(0, 1, 0))), "UNKNOWN_REQUEST", undefined, 0);
  expectError(() => decodeFront(hex(header(45, 1, 0))), "UNKNOWN_REQUEST", undefined, 45);
  const m = splitMessage(hex(header(11, 1, 0)));
  expectError(
    () => decodeRequest(BACKEND_INDEX, decodeHeader(m.header), m.payload, []),
    "UNKNOWN_REQUEST",
    undefined,
    11,
  );
});

test("BAD_VERSION and BAD_FLAGS", () => {
  expectError(() => decodeFront(hex(header(1, 0, 0))), "BAD_VERSION", "GET_FEATURES", 0);
  expectError(() => decodeFront(hex(header(1, 2, 0))), "BAD_VERSION", "GET_FEATURES", 2);
  expectError(() => decodeFront(hex(header(1, 0x11, 0))), "BAD_FLAGS", "GET_FEATURES", 0x11);
  expectError(() => decodeFront(hex(header(1, 5, 0))), "BAD_FLAGS", "GET_FEATURES", 5); // REPLY on a request
  const r = splitMessage(hex(`${header(1, 1, 8)} ${le64(1n)}`)); // reply without REPLY
  expectError(() => decodeReply(FRONTEND_INDEX, "GET_FEATURES", decodeHeader(r.header), r.payload, []), "BAD_FLAGS");
  const code = splitMessage(hex(`${header(15, 5, 8)} ${le64(1n)}`));
  expectError(
    () => decodeReply(FRONTEND_INDEX, "GET_FEATURES", decodeHeader(code.header), code.payload, []),
    "UNEXPECTED_REPLY",
    "GET_FEATURES",
    15,
  );
});

test("BAD_VALUE: reserved bits, unknown enums", () => {
  expectError(
    () => decodeFront(hex(`${header(12, 1, 8)} ${le64(0x200n)}`), memfds(1)),
    "BAD_VALUE",
    "SET_VRING_KICK",
    0x200n,
  );
  expectError(
    () => decodeFront(hex(`${header(22, 1, 32)} ${le64(0n)} ${le64(0n)} ${le64(0n)} 03 05 000000000000`)),
    "BAD_VALUE",
    "IOTLB_MSG",
    5,
  );
  expectError(
    () => decodeFront(hex(`${header(22, 1, 32)} ${le64(0n)} ${le64(0n)} ${le64(0n)} 04 02 000000000000`)),
    "BAD_VALUE",
    "IOTLB_MSG",
    4,
  );
  expectError(
    () => decodeFront(hex(`${header(42, 1, 8)} ${le32(2)} ${le32(0)}`), memfds(1)),
    "BAD_VALUE",
    "SET_DEVICE_STATE_FD",
    2,
  );
  expectError(
    () => decodeFront(hex(`${header(42, 1, 8)} ${le32(1)} ${le32(1)}`), memfds(1)),
    "BAD_VALUE",
    "SET_DEVICE_STATE_FD",
    1,
  );
  const map = splitMessage(hex(`${header(9, 1, 40)} ${"00".repeat(32)} ${le64(2n)}`));
  expectError(
    () => decodeRequest(BACKEND_INDEX, decodeHeader(map.header), map.payload, memfds(1)),
    "BAD_VALUE",
    "SHMEM_MAP",
    2n,
  );
});

test("ADD_MEM_REG: region without fd, u64 ack with fd, odd size", () => {
  const region = `${le64(0n)} ${le64(0n)} ${le64(4096n)} ${le64(0n)} ${le64(0n)}`;
  expectError(() => decodeFront(hex(`${header(37, 1, 40)} ${region}`)), "BAD_FD_COUNT", "ADD_MEM_REG", 0);
  expectError(() => decodeFront(hex(`${header(37, 1, 8)} ${le64(0n)}`), memfds(1)), "BAD_FD_COUNT", "ADD_MEM_REG", 1);
  expectError(() => decodeFront(hex(`${header(37, 1, 16)} ${le64(0n)} ${le64(0n)}`)), "BAD_SIZE", "ADD_MEM_REG", 16);
});

test("encoding refuses what decoding would reject", () => {
  assert.throws(
    () => U64.encode(-1n),
    (e: unknown) => e instanceof VhostUserError && e.code === "OUT_OF_RANGE",
  );
  assert.throws(
    () => U64.encode(1n << 64n),
    (e: unknown) => e instanceof VhostUserError && e.code === "OUT_OF_RANGE",
  );
  const r = { guestAddress: 0n, size: 4096n, userAddress: 0n, mmapOffset: 0n };
  assert.throws(
    () => MemoryTableCodec.encode({ regions: Array(9).fill(r) }),
    (e: unknown) => e instanceof VhostUserError && e.code === "TOO_MANY_REGIONS",
  );
  assert.throws(
    () => encodeRequest(FRONTEND_INDEX, "SET_LOG_BASE", { address: 4096n }, { fds: [0] }),
    (e: unknown) => e instanceof VhostUserError && e.code === "BAD_FD_COUNT",
  );
  assert.throws(
    () => encodeRequest(FRONTEND_INDEX, "SET_VRING_KICK", { index: 256, noFd: true }),
    (e: unknown) => e instanceof VhostUserError && e.code === "OUT_OF_RANGE",
  );
});

test("error messages name the request and the values", () => {
  try {
    decodeFront(hex(`${header(9, 1, 39)} ${"00".repeat(39)}`));
    assert.fail("no error");
  } catch (e) {
    assert.ok(e instanceof VhostUserError);
    assert.match(e.message, /BAD_SIZE: SET_VRING_ADDR: .*got 39.*expected 40/);
  }
});
