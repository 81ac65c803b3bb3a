/**
 * Byte-level fixtures for every payload layout of vhost-user.rst, decoded through the request
 * tables (so size, fd and flag checks run too) and encoded back to the same bytes.
 */
import assert from "node:assert/strict";
import { test } from "node:test";
import type { Fd } from "../../src/sys/fd.js";
import { isOpenFd } from "../../src/sys/fd.js";
import {
  BACKEND_INDEX,
  BACKEND_REQUESTS,
  BackendRequest,
  decodeHeader,
  decodeReply,
  decodeRequest,
  deviceStateFdReply,
  encodeReply,
  encodeRequest,
  FRONTEND_INDEX,
  FRONTEND_REQUESTS,
  FrontendRequest,
  featureMask,
  hasFeature,
  ProtocolFeature,
  rarpMac,
  SHMEM_CONFIG_SIZE,
  uuidFromString,
  uuidToString,
  VHOST_VRING_F_LOG,
  VirtioFeature,
} from "../../src/vhost-user/protocol/index.js";
import { header, hex, le32, le64, memfds, splitMessage } from "./fixtures.js";

function frontReq(bytes: Uint8Array, fds: Fd[] = []) {
  const { header: h, payload } = splitMessage(bytes);
  return decodeRequest(FRONTEND_INDEX, decodeHeader(h), payload, fds);
}

function closeAll(fds: readonly Fd[]) {
  for (const f of fds) f.close();
}

test("tables list every request of the current spec with its number", () => {
  assert.equal(Object.keys(FRONTEND_REQUESTS).length, 44);
  assert.equal(Object.keys(BACKEND_REQUESTS).length, 10);
  for (const [name, spec] of Object.entries(FRONTEND_REQUESTS)) {
    assert.equal(spec.code, FrontendRequest[name as keyof typeof FrontendRequest], name);
    assert.equal(spec.name, name);
  }
  for (const [name, spec] of Object.entries(BACKEND_REQUESTS))
    assert.equal(spec.code, BackendRequest[name as keyof typeof BackendRequest], name);
  assert.equal(FrontendRequest.GET_SHMEM_CONFIG, 44);
  assert.equal(BackendRequest.SHMEM_MAP, 9);
  assert.equal(BackendRequest.SHMEM_UNMAP, 10);
  assert.equal(ProtocolFeature.SHMEM, 20);
  assert.equal(ProtocolFeature.DEVICE_STATE, 19);
  assert.equal(ProtocolFeature.SHARED_OBJECT, 18);
});

test("feature bits: the QSD feature word of the rig decodes as documented", () => {
  const qsd = 0x175007e46n; // qemu10-rig.md step 3b
  assert.ok(hasFeature(qsd, VirtioFeature.VHOST_USER_F_PROTOCOL_FEATURES));
  assert.ok(hasFeature(qsd, VirtioFeature.VHOST_F_LOG_ALL));
  assert.ok(hasFeature(qsd, VirtioFeature.VIRTIO_F_VERSION_1));
  assert.ok(!hasFeature(qsd, VirtioFeature.VIRTIO_F_RING_PACKED));
  const proto = 0x8f2bn;
  assert.equal(
    proto,
    featureMask(
      ProtocolFeature.MQ,
      ProtocolFeature.LOG_SHMFD,
      ProtocolFeature.REPLY_ACK,
      ProtocolFeature.BACKEND_REQ,
      ProtocolFeature.PAGEFAULT,
      ProtocolFeature.CONFIG,
      ProtocolFeature.BACKEND_SEND_FD,
      ProtocolFeature.HOST_NOTIFIER,
      ProtocolFeature.CONFIGURE_MEM_SLOTS,
    ),
  );
});

test("GET_FEATURES: empty request, u64 reply above 2^32 stays exact", () => {
  const req = hex(header(1, 1, 0));
  const msg = frontReq(req);
  assert.equal(msg.name, "GET_FEATURES");
  assert.equal(msg.needReply, false);
  assert.deepEqual(encodeRequest(FRONTEND_INDEX, "GET_FEATURES", undefined).bytes, req);

  const big = 0xffff_ffff_ffff_fff0n; // far above 2^53: must not round
  const rep = hex(`${header(1, 5, 8)} ${le64(big)}`);
  const { header: h, payload } = splitMessage(rep);
  const r = decodeReply(FRONTEND_INDEX, "GET_FEATURES", decodeHeader(h), payload, []);
  assert.equal(r.payload, big);
  assert.deepEqual(encodeReply(FRONTEND_INDEX, "GET_FEATURES", big).bytes, rep);
});

test("SET_FEATURES with NEED_REPLY (flags 0x9)", () => {
  const bytes = hex(`${header(2, 9, 8)} ${le64(0x1_4000_0000n | (1n << 26n))}`);
  const msg = frontReq(bytes);
  assert.equal(msg.name, "SET_FEATURES");
  assert.equal(msg.needReply, true);
  assert.equal(msg.payload, 0x1_4400_0000n);
  assert.deepEqual(encodeRequest(FRONTEND_INDEX, "SET_FEATURES", 0x1_4400_0000n, { needReply: true }).bytes, bytes);
});

test("SET_MEM_TABLE with 2 regions and 2 fds (8 + 2 × 32 bytes)", () => {
  const bytes = hex(`
    05000000 01000000 48000000
    02000000 00000000
    0000000000000000 0000000008000000 00007f1234000000 0000000000000000
    0000000001000000 0000000018000000 00007f2234000000 0000000008000000`);
  const fds = memfds(2);
  const msg = frontReq(bytes, fds);
  assert.equal(msg.name, "SET_MEM_TABLE");
  if (msg.name !== "SET_MEM_TABLE") return;
  assert.deepEqual(msg.payload.regions, [
    { guestAddress: 0n, size: 0x8_0000_0000n, userAddress: 0x34_127f_0000n, mmapOffset: 0n },
    { guestAddress: 0x1_0000_0000n, size: 0x18_0000_0000n, userAddress: 0x34_227f_0000n, mmapOffset: 0x8_0000_0000n },
  ]);
  assert.equal(msg.fds.length, 2);
  assert.deepEqual(encodeRequest(FRONTEND_INDEX, "SET_MEM_TABLE", msg.payload, { fds: msg.fds }).bytes, bytes);
  closeAll(msg.fds);
});

test("SET_MEM_TABLE reply: postcopy table, or REPLY_ACK u64", () => {
  const table = hex(
    `${header(5, 5, 40)} 01000000 00000000 ${le64(0n)} ${le64(0x1000n)} ${le64(0x7f00_0000_0000n)} ${le64(0n)}`,
  );
  let { header: h, payload } = splitMessage(table);
  const r = decodeReply(FRONTEND_INDEX, "SET_MEM_TABLE", decodeHeader(h), payload, []);
  assert.equal(r.payload.kind, "table");
  const ack = hex(`${header(5, 5, 8)} ${le64(0n)}`);
  ({ header: h, payload } = splitMessage(ack));
  assert.deepEqual(decodeReply(FRONTEND_INDEX, "SET_MEM_TABLE", decodeHeader(h), payload, []).payload, {
    kind: "ack",
    value: 0n,
  });
});

test("SET_LOG_BASE: 16-byte log description with the log fd", () => {
  const bytes = hex(`${header(6, 1, 16)} ${le64(0x4_0000n)} ${le64(0x1000n)}`);
  const [fd] = memfds(1) as [Fd];
  const msg = frontReq(bytes, [fd]);
  assert.equal(msg.name, "SET_LOG_BASE");
  if (msg.name !== "SET_LOG_BASE") return;
  assert.deepEqual(msg.payload, { mmapSize: 0x4_0000n, mmapOffset: 0x1000n });
  assert.equal(msg.fds[0], fd);
  assert.deepEqual(encodeRequest(FRONTEND_INDEX, "SET_LOG_BASE", msg.payload, { fds: [fd] }).bytes, bytes);
  fd.close();
});

test("SET_VRING_ADDR with VHOST_VRING_F_LOG and a log address above 2^53", () => {
  const bytes = hex(`${header(9, 1, 40)} ${le32(1)} ${le32(VHOST_VRING_F_LOG)}
    ${le64(0x1_2345_6000n)} ${le64(0x1_2345_7000n)} ${le64(0x1_2345_6800n)} ${le64(0xffff_ffff_ffff_f000n)}`);
  const msg = frontReq(bytes);
  assert.equal(msg.name, "SET_VRING_ADDR");
  if (msg.name !== "SET_VRING_ADDR") return;
  assert.deepEqual(msg.payload, {
    index: 1,
    flags: 1,
    descriptor: 0x1_2345_6000n,
    used: 0x1_2345_7000n,
    available: 0x1_2345_6800n,
    log: 0xffff_ffff_ffff_f000n,
  });
  assert.deepEqual(encodeRequest(FRONTEND_INDEX, "SET_VRING_ADDR", msg.payload).bytes, bytes);
});

test("vring state: SET_VRING_NUM, SET_VRING_ENABLE, GET_VRING_BASE request and reply", () => {
  const num = frontReq(hex(`${header(8, 1, 8)} ${le32(0)} ${le32(256)}`));
  assert.deepEqual(num.payload, { index: 0, num: 256 });
  const en = frontReq(hex(`${header(18, 9, 8)} ${le32(3)} ${le32(1)}`));
  assert.equal(en.name, "SET_VRING_ENABLE");
  assert.equal(en.needReply, true);
  const rep = hex(`${header(11, 5, 8)} ${le32(0)} ${le32(0x1234)}`);
  const { header: h, payload } = splitMessage(rep);
  assert.deepEqual(decodeReply(FRONTEND_INDEX, "GET_VRING_BASE", decodeHeader(h), payload, []).payload, {
    index: 0,
    num: 0x1234,
  });
  assert.deepEqual(encodeReply(FRONTEND_INDEX, "GET_VRING_BASE", { index: 0, num: 0x1234 }).bytes, rep);
});

test("SET_VRING_KICK/CALL/ERR: index in bits 0-7, bit 8 = no fd", () => {
  const fd = memfds(1);
  const kick = frontReq(hex(`${header(12, 1, 8)} ${le64(2n)}`), fd);
  assert.deepEqual(kick.payload, { index: 2, noFd: false });
  assert.equal(kick.fds.length, 1);
  closeAll(kick.fds);
  const call = frontReq(hex(`${header(13, 1, 8)} ${le64(0x101n)}`));
  assert.deepEqual(call.payload, { index: 1, noFd: true });
  assert.deepEqual(
    encodeRequest(FRONTEND_INDEX, "SET_VRING_ERR", { index: 1, noFd: true }).bytes,
    hex(`${header(14, 1, 8)} ${le64(0x101n)}`),
  );
});

test("ADD_MEM_REG: padding + region with exactly 1 fd; the fd-less postcopy u64 ack", () => {
  const bytes = hex(
    `${header(37, 9, 40)} ${le64(0n)} ${le64(0x1_0000_0000n)} ${le64(0x4000_0000n)} ${le64(0x7f00_0000_0000n)} ${le64(0n)}`,
  );
  const msg = frontReq(bytes, memfds(1));
  assert.equal(msg.name, "ADD_MEM_REG");
  if (msg.name !== "ADD_MEM_REG") return;
  assert.deepEqual(msg.payload, {
    kind: "region",
    region: { guestAddress: 0x1_0000_0000n, size: 0x4000_0000n, userAddress: 0x7f00_0000_0000n, mmapOffset: 0n },
  });
  assert.deepEqual(
    encodeRequest(FRONTEND_INDEX, "ADD_MEM_REG", msg.payload, { fds: msg.fds, needReply: true }).bytes,
    bytes,
  );
  closeAll(msg.fds);
  // qemu10-rig.md step 5: "one fd-less ADD_MEM_REG whose u64 payload is 0 (ack, no reply)"
  const ack = frontReq(hex(`${header(37, 1, 8)} ${le64(0n)}`));
  assert.deepEqual(ack.payload, { kind: "ack", value: 0n });
  assert.equal(ack.fds.length, 0);
});

test("REM_MEM_REG: an fd sent anyway is accepted and closed ('MUST close it without using it')", () => {
  const bytes = hex(
    `${header(38, 1, 40)} ${le64(0n)} ${le64(0x1_0000_0000n)} ${le64(0x4000_0000n)} ${le64(0x7f00_0000_0000n)} ${le64(0n)}`,
  );
  const fds = memfds(1);
  const raw = (fds[0] as Fd).fd;
  const msg = frontReq(bytes, fds);
  assert.equal(msg.fds.length, 0);
  assert.ok(!isOpenFd(raw));
  assert.equal(frontReq(bytes).name, "REM_MEM_REG");
});

test("IOTLB_MSG: 3 × u64, perm, type, 6 bytes padding (32 bytes)", () => {
  const bytes = hex(
    `${header(22, 1, 32)} ${le64(0x8000_0000n)} ${le64(0x1000n)} ${le64(0x7f00_1000_0000n)} 03 02 000000000000`,
  );
  const msg = frontReq(bytes);
  assert.deepEqual(msg.payload, {
    iova: 0x8000_0000n,
    size: 0x1000n,
    userAddress: 0x7f00_1000_0000n,
    permissions: 3,
    type: 2,
  });
  assert.deepEqual(encodeRequest(FRONTEND_INDEX, "IOTLB_MSG", msg.payload as never).bytes, bytes);
  const { header: h, payload } = splitMessage(
    hex(`${header(1, 1, 32)} ${le64(0x9000n)} ${le64(0n)} ${le64(0n)} 01 01 000000000000`),
  );
  const bm = decodeRequest(BACKEND_INDEX, decodeHeader(h), payload, []);
  assert.equal(bm.name, "IOTLB_MSG");
});

test("GET_CONFIG / SET_CONFIG: offset, size, flags, size bytes; empty reply = error", () => {
  const bytes = hex(`${header(24, 1, 20)} ${le32(0)} ${le32(8)} ${le32(0)} 0000100000000000`);
  const msg = frontReq(bytes);
  assert.equal(msg.name, "GET_CONFIG");
  if (msg.name !== "GET_CONFIG") return;
  assert.deepEqual(msg.payload, { offset: 0, flags: 0, data: hex("0000100000000000") });
  const rep = hex(`${header(24, 5, 20)} ${le32(0)} ${le32(8)} ${le32(0)} 0000020000000000`);
  let { header: h, payload } = splitMessage(rep);
  const r = decodeReply(FRONTEND_INDEX, "GET_CONFIG", decodeHeader(h), payload, []);
  assert.deepEqual(r.payload?.data, hex("0000020000000000"));
  assert.deepEqual(encodeReply(FRONTEND_INDEX, "GET_CONFIG", r.payload).bytes, rep);
  ({ header: h, payload } = splitMessage(hex(header(24, 5, 0))));
  assert.equal(decodeReply(FRONTEND_INDEX, "GET_CONFIG", decodeHeader(h), payload, []).payload, null);
  const set = frontReq(hex(`${header(25, 1, 13)} ${le32(0x14)} ${le32(1)} ${le32(1)} 01`));
  assert.deepEqual(set.payload, { offset: 0x14, flags: 1, data: hex("01") });
});

test("GET_INFLIGHT_FD / SET_INFLIGHT_FD: 24 bytes (2 × u64, 2 × u16, padding)", () => {
  const bytes = hex(`${header(31, 1, 24)} ${le64(0n)} ${le64(0n)} 0100 0001 00000000`);
  const msg = frontReq(bytes);
  assert.deepEqual(msg.payload, { mmapSize: 0n, mmapOffset: 0n, numQueues: 1, queueSize: 256 });
  const rep = hex(`${header(31, 5, 24)} ${le64(0x2040n)} ${le64(0n)} 0100 0001 00000000`);
  const { header: h, payload } = splitMessage(rep);
  const fds = memfds(1);
  const r = decodeReply(FRONTEND_INDEX, "GET_INFLIGHT_FD", decodeHeader(h), payload, fds);
  assert.equal(r.payload.mmapSize, 0x2040n);
  assert.equal(r.fds.length, 1);
  closeAll(r.fds);
  const set = frontReq(hex(`${header(32, 1, 24)} ${le64(0x2040n)} ${le64(0n)} 0100 0001 00000000`), memfds(1));
  closeAll(set.fds);
});

test("GET_SHARED_OBJECT and SHARED_OBJECT_*: 16-byte UUID in string order", () => {
  const uuid = "6b2d6f33-9a5e-4c1b-8f00-112233445566";
  const bytes = hex(`${header(41, 1, 16)} 6b2d6f33 9a5e 4c1b 8f00 112233445566`);
  const msg = frontReq(bytes);
  assert.equal(msg.name, "GET_SHARED_OBJECT");
  if (msg.name !== "GET_SHARED_OBJECT") return;
  assert.equal(uuidToString(msg.payload.uuid), uuid);
  assert.deepEqual(encodeRequest(FRONTEND_INDEX, "GET_SHARED_OBJECT", { uuid: uuidFromString(uuid) }).bytes, bytes);
  const lookup = hex(`${header(8, 1, 16)} 6b2d6f33 9a5e 4c1b 8f00 112233445566`);
  const { header: h, payload } = splitMessage(lookup);
  assert.equal(decodeRequest(BACKEND_INDEX, decodeHeader(h), payload, []).name, "SHARED_OBJECT_LOOKUP");
  const rep = splitMessage(hex(`${header(8, 5, 8)} ${le64(0n)}`));
  const fds = memfds(1);
  const r = decodeReply(BACKEND_INDEX, "SHARED_OBJECT_LOOKUP", decodeHeader(rep.header), rep.payload, fds);
  assert.equal(r.fds.length, 1);
  closeAll(r.fds);
});

test("SET_DEVICE_STATE_FD: direction + phase with the pipe fd; reply bit 8 = no fd", () => {
  const bytes = hex(`${header(42, 1, 8)} ${le32(0)} ${le32(0)}`);
  const msg = frontReq(bytes, memfds(1));
  assert.deepEqual(msg.payload, { direction: 0, phase: 0 });
  closeAll(msg.fds);
  const rep = splitMessage(hex(`${header(42, 5, 8)} ${le64(0x100n)}`));
  const r = decodeReply(FRONTEND_INDEX, "SET_DEVICE_STATE_FD", decodeHeader(rep.header), rep.payload, []);
  assert.deepEqual(deviceStateFdReply(r.payload), { ok: true, status: 0, noFd: true });
});

test("GET_SHMEM_CONFIG reply: nregions + 256 sizes (2056 bytes)", () => {
  let words = `${le32(2)} ${le32(0)} ${le64(0x4000_0000n)} ${le64(0x10_0000n)}`;
  for (let i = 2; i < 256; i++) words += ` ${le64(0n)}`;
  const bytes = hex(`${header(44, 5, SHMEM_CONFIG_SIZE)} ${words}`);
  assert.equal(bytes.length, 12 + 2056);
  const { header: h, payload } = splitMessage(bytes);
  const r = decodeReply(FRONTEND_INDEX, "GET_SHMEM_CONFIG", decodeHeader(h), payload, []);
  assert.equal(r.payload.nregions, 2);
  assert.equal(r.payload.memorySizes.length, 256);
  assert.equal(r.payload.memorySizes[1], 0x10_0000n);
  assert.deepEqual(encodeReply(FRONTEND_INDEX, "GET_SHMEM_CONFIG", r.payload).bytes, bytes);
});

test("SHMEM_MAP with its fd, SHMEM_UNMAP without: shmid, 7 bytes padding, 4 × u64", () => {
  const body = `01 00000000000000 ${le64(0x2000n)} ${le64(0x10_0000n)} ${le64(0x1000n)} ${le64(1n)}`;
  const map = splitMessage(hex(`${header(9, 9, 40)} ${body}`));
  const fds = memfds(1);
  const m = decodeRequest(BACKEND_INDEX, decodeHeader(map.header), map.payload, fds);
  assert.equal(m.name, "SHMEM_MAP");
  assert.deepEqual(m.payload, { shmid: 1, fdOffset: 0x2000n, shmOffset: 0x10_0000n, len: 0x1000n, flags: 1n });
  assert.deepEqual(
    encodeRequest(BACKEND_INDEX, "SHMEM_MAP", m.payload as never, { fds: m.fds, needReply: true }).bytes,
    hex(`${header(9, 9, 40)} ${body}`),
  );
  closeAll(m.fds);
  const unmap = splitMessage(hex(`${header(10, 1, 40)} ${body}`));
  assert.equal(decodeRequest(BACKEND_INDEX, decodeHeader(unmap.header), unmap.payload, []).name, "SHMEM_UNMAP");
});

test("VRING_HOST_NOTIFIER_MSG: vring area (u64 index/flags, size, offset)", () => {
  const withFd = splitMessage(hex(`${header(3, 1, 24)} ${le64(1n)} ${le64(0x1000n)} ${le64(0x3000n)}`));
  const fds = memfds(1);
  const m = decodeRequest(BACKEND_INDEX, decodeHeader(withFd.header), withFd.payload, fds);
  assert.deepEqual(m.payload, { index: 1, noFd: false, size: 0x1000n, offset: 0x3000n });
  closeAll(m.fds);
  const none = splitMessage(hex(`${header(3, 1, 24)} ${le64(0x101n)} ${le64(0n)} ${le64(0n)}`));
  assert.equal(decodeRequest(BACKEND_INDEX, decodeHeader(none.header), none.payload, []).fds.length, 0);
});

test("POSTCOPY_ADVISE reply: no payload, the userfaultfd as fd", () => {
  const rep = splitMessage(hex(header(28, 5, 0)));
  const fds = memfds(1);
  const r = decodeReply(FRONTEND_INDEX, "POSTCOPY_ADVISE", decodeHeader(rep.header), rep.payload, fds);
  assert.equal(r.fds.length, 1);
  closeAll(r.fds);
});

test("SEND_RARP: the MAC is the first 6 payload bytes", () => {
  const msg = frontReq(hex(`${header(19, 1, 8)} 525400123456 0000`));
  assert.deepEqual(rarpMac(msg.payload as bigint), hex("525400123456"));
});

test("the remaining no-payload and u64 requests decode by name", () => {
  const cases: [number, string, string][] = [
    [3, "SET_OWNER", ""],
    [4, "RESET_OWNER", ""],
    [7, "SET_LOG_FD", "fd"],
    [10, "SET_VRING_BASE", `${le32(0)} ${le32(7)}`],
    [15, "GET_PROTOCOL_FEATURES", ""],
    [16, "SET_PROTOCOL_FEATURES", le64(0x8f2bn)],
    [17, "GET_QUEUE_NUM", ""],
    [20, "NET_SET_MTU", le64(1500n)],
    [21, "SET_BACKEND_REQ_FD", "fd"],
    [23, "SET_VRING_ENDIAN", `${le32(0)} ${le32(1)}`],
    [26, "CREATE_CRYPTO_SESSION", "0102030405"],
    [27, "CLOSE_CRYPTO_SESSION", le64(5n)],
    [29, "POSTCOPY_LISTEN", ""],
    [30, "POSTCOPY_END", ""],
    [33, "GPU_SET_SOCKET", "fd"],
    [34, "RESET_DEVICE", ""],
    [35, "VRING_KICK", `${le32(0)} ${le32(0)}`],
    [36, "GET_MAX_MEM_SLOTS", ""],
    [39, "SET_STATUS", le64(15n)],
    [40, "GET_STATUS", ""],
    [43, "CHECK_DEVICE_STATE", ""],
    [44, "GET_SHMEM_CONFIG", ""],
  ];
  for (const [code, name, body] of cases) {
    const withFd = body === "fd";
    const payload = withFd ? "" : body;
    const bytes = hex(`${header(code, 1, payload.replace(/\s/g, "").length / 2)} ${payload}`);
    const msg = frontReq(bytes, withFd ? memfds(1) : []);
    assert.equal(msg.name, name);
    closeAll(msg.fds);
  }
  for (const [code, name] of [
    [2, "CONFIG_CHANGE_MSG"],
    [4, "VRING_CALL"],
    [5, "VRING_ERR"],
    [6, "SHARED_OBJECT_ADD"],
    [7, "SHARED_OBJECT_REMOVE"],
  ] as const) {
    const size = code === 2 ? 0 : code <= 5 ? 8 : 16;
    const m = splitMessage(hex(`${header(code, 1, size)} ${"00".repeat(size)}`));
    assert.equal(decodeRequest(BACKEND_INDEX, decodeHeader(m.header), m.payload, []).name, name);
  }
});
