/**
 * Malformed front-end messages against a real VhostUserDaemon (echo device, 2 queues, a config
 * space) over a real socket. For every request of the protocol: a payload one byte too long or
 * too short, one fd too many or too few, a bad version, a reserved flag, the REPLY flag; then
 * truncated headers and payloads, unknown request codes, more fds than fit in one receive,
 * overlapping and bogus memory regions, rings outside guest memory, bad ring sizes and indices.
 *
 * The rule, every time: the daemon answers with a NACK (the message asked for REPLY_ACK) or
 * drops that connection and accepts the next one; it never crashes and never keeps an fd.
 * After each case a well-behaved front-end gets an answer on the same connection (when it
 * was kept) and the fd count of this process (which runs the daemon) is back to the start;
 * after each request's group, and after every other case, an echo request goes round trip.
 */
import assert from "node:assert/strict";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";
import { echoDevice } from "../../src/devices/examples/echo.js";
import { EventFd } from "../../src/sys/eventfd.js";
import type { Fd } from "../../src/sys/fd.js";
import { createMemfd } from "../../src/sys/memfd.js";
import { UnixSocket } from "../../src/sys/unix-socket.js";
import { VhostUserDaemon } from "../../src/vhost-user/backend/daemon.js";
import type { RawMessage } from "../../src/vhost-user/connection.js";
import {
  featureMask,
  HEADER_SIZE,
  VHOST_USER_NEED_REPLY_MASK,
  VHOST_USER_REPLY_MASK,
  VHOST_USER_VERSION,
  VHOST_VRING_F_LOG,
  VirtioFeature,
} from "../../src/vhost-user/protocol/constants.js";
import {
  FRONTEND_INDEX,
  FRONTEND_REQUESTS,
  type FrontendRequests,
} from "../../src/vhost-user/protocol/frontend-requests.js";
import {
  encodeHeader,
  encodeRequest,
  isReply,
  type RequestName,
  type RequestPayload,
} from "../../src/vhost-user/protocol/message.js";
import { type MemoryRegion, U64 } from "../../src/vhost-user/protocol/payloads.js";
import { countFds } from "../helpers/proc.js";
import { FEATURES, Peer } from "./malformed-peer.js";

const PATH = join(tmpdir(), `vmshift-malformed-${process.pid}.sock`);
const NEED_REPLY = VHOST_USER_NEED_REPLY_MASK;
const V1 = VHOST_USER_VERSION;

let daemon: VhostUserDaemon;
let serving: Promise<void>;
let fdsBase = 0;
let crashed: unknown = null;
const onCrash = (e: unknown) => {
  crashed = e;
};

before(() => {
  process.on("uncaughtException", onCrash);
  fdsBase = countFds();
  daemon = VhostUserDaemon.listen(echoDevice({ queues: 2, config: new Uint8Array(8) }), PATH);
  daemon.on("log", () => undefined);
  serving = daemon.serve();
});

after(async () => {
  await daemon.close();
  await serving;
  process.off("uncaughtException", onCrash);
  assert.equal(crashed, null, "an exception escaped the daemon");
});

type Name = RequestName<FrontendRequests>;
type Outcome = "nack" | "closed";

interface Wire {
  bytes: Uint8Array;
  fds: Fd[];
}

/** Waits until the daemon has torn the last session down, then checks the fd count. */
async function settled(what: string): Promise<void> {
  for (let i = 0; i < 400 && daemon.session; i++) await new Promise((r) => setTimeout(r, 5));
  assert.equal(daemon.session, null, `${what}: the session was never torn down`);
  assert.equal(countFds(), fdsBase + 1, `${what}: fds leaked (the +1 is the daemon's listening socket)`);
  assert.equal(crashed, null, `${what}: an exception escaped the daemon`);
}

/** A fresh, well-behaved front-end: handshake, queue 0, one echo request. */
async function wellBehaved(tag: number): Promise<void> {
  const p = new Peer(PATH);
  try {
    await p.handshake(true);
    await p.echo(tag);
  } finally {
    p.close();
  }
}

/** What the daemon did with a message it must refuse: a non-zero REPLY_ACK to `code`, or a hang-up. */
async function refusal(p: Peer, code: number, what: string): Promise<Outcome> {
  const r = await p.next();
  if (r === "closed") return "closed";
  const m = r as RawMessage;
  for (const f of m.fds) f.close();
  assert.equal(m.header.request, code, `${what}: answered as another request`);
  assert.ok(isReply(m.header.flags), `${what}: answer without REPLY flag`);
  assert.equal(m.payload.byteLength, 8, `${what}: answered with a ${m.payload.byteLength}-byte payload, not a NACK`);
  assert.notEqual(U64.decode(m.payload, what), 0n, `${what}: acknowledged as a success`);
  return "nack";
}

interface CaseOptions {
  /** Queue 0 running on the bad connection before the message. */
  ring?: boolean;
  /** The only acceptable outcome (default: either). */
  expect?: Outcome;
  /** Skip the echo with a fresh front-end (a group checks it once at its end). */
  light?: boolean;
}

let tags = 0;

/**
 * One case: a peer does the handshake, `send` sends something bad and returns the request code
 * a NACK would carry; the daemon must refuse it; a well-behaved request (or echo) follows on the
 * same connection when it was kept; then a fresh front-end is served and no fd is left over.
 */
async function refuse(what: string, send: (p: Peer) => Promise<number>, o: CaseOptions = {}): Promise<Outcome> {
  const p = new Peer(PATH);
  let outcome: Outcome;
  try {
    await p.handshake(o.ring ?? false);
    const code = await send(p);
    outcome = await refusal(p, code, what);
    if (o.expect) assert.equal(outcome, o.expect, what);
    if (outcome === "nack") {
      if (o.ring) await p.echo(++tags);
      else await p.request("GET_FEATURES", undefined);
    }
  } finally {
    p.close();
  }
  if (!o.light) await wellBehaved(++tags);
  await settled(what);
  return outcome;
}

// ---------------------------------------------------------------- one valid message per request

function eventFd(): Fd {
  return new EventFd().fd;
}

function memfd(size = 4096): Fd {
  return createMemfd("vu-malformed", size);
}

function sample(name: Name, p: Peer): { payload: unknown; fds: Fd[] } {
  const ring = { index: 1, num: 16 };
  const d = p.driver;
  switch (name) {
    case "SET_FEATURES":
      return { payload: FEATURES, fds: [] };
    case "SET_PROTOCOL_FEATURES":
    case "SEND_RARP":
    case "NET_SET_MTU":
    case "CLOSE_CRYPTO_SESSION":
    case "SET_STATUS":
      return { payload: 0n, fds: [] };
    case "SET_MEM_TABLE":
      return { payload: { regions: [p.table] }, fds: [memfd(p.region.size)] };
    case "SET_LOG_BASE":
      return { payload: { mmapSize: 4096n, mmapOffset: 0n }, fds: [memfd()] };
    case "SET_LOG_FD":
    case "SET_BACKEND_REQ_FD":
    case "GPU_SET_SOCKET":
      return { payload: undefined, fds: [eventFd()] };
    case "SET_VRING_NUM":
    case "SET_VRING_BASE":
    case "GET_VRING_BASE":
    case "SET_VRING_ENABLE":
    case "SET_VRING_ENDIAN":
    case "VRING_KICK":
      return { payload: ring, fds: [] };
    case "SET_VRING_ADDR":
      return {
        payload: {
          index: 1,
          flags: 0,
          descriptor: p.uva(d.descTable),
          used: p.uva(d.usedRing),
          available: p.uva(d.availRing),
          log: 0n,
        },
        fds: [],
      };
    case "SET_VRING_KICK":
    case "SET_VRING_CALL":
    case "SET_VRING_ERR":
      return { payload: { index: 1, noFd: false }, fds: [eventFd()] };
    case "IOTLB_MSG":
      return { payload: { iova: 0n, size: 4096n, userAddress: p.uva(0), permissions: 3, type: 2 }, fds: [] };
    case "GET_CONFIG":
    case "SET_CONFIG":
      return { payload: { offset: 0, flags: 0, data: new Uint8Array(4) }, fds: [] };
    case "CREATE_CRYPTO_SESSION":
      return { payload: new Uint8Array(16), fds: [] };
    case "GET_INFLIGHT_FD":
      return { payload: { mmapSize: 0n, mmapOffset: 0n, numQueues: 1, queueSize: 64 }, fds: [] };
    case "SET_INFLIGHT_FD":
      return { payload: { mmapSize: 4096n, mmapOffset: 0n, numQueues: 1, queueSize: 64 }, fds: [memfd()] };
    case "ADD_MEM_REG":
      return {
        payload: { kind: "region", region: { ...p.table, guestAddress: 1n << 32n } },
        fds: [memfd(p.region.size)],
      };
    case "REM_MEM_REG":
      return { payload: p.table, fds: [] };
    case "GET_SHARED_OBJECT":
      return { payload: { uuid: new Uint8Array(16) }, fds: [] };
    case "SET_DEVICE_STATE_FD":
      return { payload: { direction: 0, phase: 0 }, fds: [eventFd()] };
    default:
      return { payload: undefined, fds: [] };
  }
}

/** The valid encoding of `name` (with NEED_REPLY): bytes, and the fds it carries (ours to close). */
function valid(name: Name, p: Peer): Wire {
  const s = sample(name, p);
  const e = encodeRequest(FRONTEND_INDEX, name, s.payload as RequestPayload<FrontendRequests, Name>, {
    needReply: true,
    fds: s.fds,
  });
  return { bytes: e.bytes, fds: s.fds };
}

function withPayload(w: Wire, payload: Uint8Array): Wire {
  const bytes = new Uint8Array(HEADER_SIZE + payload.byteLength);
  bytes.set(w.bytes.subarray(0, HEADER_SIZE));
  new DataView(bytes.buffer).setUint32(8, payload.byteLength, true);
  bytes.set(payload, HEADER_SIZE);
  return { bytes, fds: w.fds };
}

function withFlags(w: Wire, flags: number): Wire {
  const bytes = w.bytes.slice();
  new DataView(bytes.buffer).setUint32(4, flags, true);
  return { bytes, fds: w.fds };
}

async function sendWire(p: Peer, w: Wire): Promise<void> {
  try {
    await p.send(w.bytes, w.fds);
  } finally {
    for (const f of w.fds) f.close();
  }
}

interface Mutation {
  what: string;
  applies(w: Wire, name: Name): boolean;
  mutate(w: Wire, name: Name): Wire;
}

const MUTATIONS: Mutation[] = [
  {
    what: "payload one byte longer than its layout",
    // Opaque payloads have no layout to break.
    applies: (_w, name) => name !== "CREATE_CRYPTO_SESSION",
    mutate: (w) => {
      const payload = w.bytes.subarray(HEADER_SIZE);
      const longer = new Uint8Array(payload.byteLength + 1);
      longer.set(payload);
      return withPayload(w, longer);
    },
  },
  {
    what: "payload one byte shorter than its layout",
    applies: (w, name) => w.bytes.byteLength > HEADER_SIZE && name !== "CREATE_CRYPTO_SESSION",
    mutate: (w) => withPayload(w, w.bytes.subarray(HEADER_SIZE, w.bytes.byteLength - 1)),
  },
  {
    what: "payload of 7 bytes (a u64 cut short)",
    applies: (w) => w.bytes.byteLength === HEADER_SIZE + 8,
    mutate: (w) => withPayload(w, new Uint8Array(7)),
  },
  {
    what: "one fd too many",
    applies: () => true,
    // REM_MEM_REG may carry one fd (and must close it): two is one too many there.
    mutate: (w, name) => ({
      bytes: w.bytes,
      fds: [...w.fds, eventFd(), ...(name === "REM_MEM_REG" ? [eventFd()] : [])],
    }),
  },
  {
    what: "one fd too few",
    // SET_LOG_BASE without its fd is legal (a front-end without LOG_SHMFD sends it so).
    applies: (w, name) => w.fds.length > 0 && name !== "SET_LOG_BASE",
    mutate: (w) => {
      for (const f of w.fds) f.close();
      return { bytes: w.bytes, fds: [] };
    },
  },
  { what: "version 0", applies: () => true, mutate: (w) => withFlags(w, NEED_REPLY) },
  { what: "version 2", applies: () => true, mutate: (w) => withFlags(w, NEED_REPLY | 2) },
  { what: "version 3", applies: () => true, mutate: (w) => withFlags(w, NEED_REPLY | 3) },
  { what: "reserved flag bit 4", applies: () => true, mutate: (w) => withFlags(w, NEED_REPLY | V1 | 0x10) },
  { what: "reserved flag bit 31", applies: () => true, mutate: (w) => withFlags(w, NEED_REPLY | V1 | 0x80000000) },
  {
    what: "REPLY flag on a request",
    applies: () => true,
    mutate: (w) => withFlags(w, V1 | VHOST_USER_REPLY_MASK),
  },
];

describe("every front-end request, malformed", { timeout: 60_000 }, () => {
  for (const name of Object.keys(FRONTEND_REQUESTS) as Name[]) {
    const code = FRONTEND_REQUESTS[name].code;
    test(`${code} ${name}`, async () => {
      for (const m of MUTATIONS) {
        const what = `${name}: ${m.what}`;
        await refuse(
          what,
          async (p) => {
            const w = valid(name, p);
            if (!m.applies(w, name)) {
              for (const f of w.fds) f.close();
              // Not applicable: a plain bad-version message stands in, so the case still runs.
              await sendWire(p, withFlags(valid(name, p), NEED_REPLY));
              return code;
            }
            await sendWire(p, m.mutate(w, name));
            return code;
          },
          { light: true },
        );
      }
      await wellBehaved(++tags);
      await settled(name);
    });
  }
});

// ---------------------------------------------------------------- framing

describe("framing", { timeout: 30_000 }, () => {
  test("a header cut short, then the front-end hangs up (with and without fds)", async () => {
    const full = encodeRequest(FRONTEND_INDEX, "GET_FEATURES", undefined).bytes;
    for (const n of [1, 4, 8, 11]) {
      for (const withFds of [false, true]) {
        const s = UnixSocket.connect(PATH);
        const fds = withFds ? [eventFd(), memfd()] : [];
        await s.send(full.subarray(0, n), fds);
        for (const f of fds) f.close();
        s.close();
        await wellBehaved(++tags);
        await settled(`header of ${n} bytes${withFds ? " with fds" : ""}`);
      }
    }
  });

  test("a payload cut short with its fd, then the front-end hangs up", async () => {
    const s = UnixSocket.connect(PATH);
    const fd = memfd();
    const bytes = new Uint8Array(HEADER_SIZE + 10);
    encodeHeader({ request: FRONTEND_REQUESTS.SET_MEM_TABLE.code, flags: V1 | NEED_REPLY, size: 40 }, bytes);
    await s.send(bytes, [fd]);
    fd.close();
    s.close();
    await wellBehaved(++tags);
    await settled("payload cut short");
  });

  test("a header announcing a payload above the limit: the connection is dropped", async () => {
    await refuse(
      "size 1 MiB",
      async (p) => {
        const fd = memfd();
        const bytes = new Uint8Array(HEADER_SIZE + 64);
        encodeHeader({ request: FRONTEND_REQUESTS.SET_MEM_TABLE.code, flags: V1 | NEED_REPLY, size: 1 << 20 }, bytes);
        await p.send(bytes, [fd]);
        fd.close();
        return FRONTEND_REQUESTS.SET_MEM_TABLE.code;
      },
      { expect: "closed" },
    );
  });

  test("unknown request codes (with and without NEED_REPLY, with an fd)", async () => {
    for (const code of [0, 45, 99, 0x7fff_ffff, 0xffff_ffff]) {
      for (const flags of [V1, V1 | NEED_REPLY]) {
        await refuse(
          `code ${code} flags ${flags}`,
          async (p) => {
            const bytes = new Uint8Array(HEADER_SIZE + 8);
            encodeHeader({ request: code, flags, size: 8 }, bytes);
            const fd = eventFd();
            await p.send(bytes, [fd]);
            fd.close();
            return code;
          },
          { light: code !== 0xffff_ffff },
        );
      }
    }
  });

  test("16 fds on one message (two sends), beyond what one receive holds", async () => {
    await refuse("16 fds", async (p) => {
      const w = encodeRequest(
        FRONTEND_INDEX,
        "SET_VRING_CALL",
        { index: 1, noFd: false },
        { needReply: true, fds: [0] },
      );
      const a = Array.from({ length: 8 }, eventFd);
      const b = Array.from({ length: 8 }, eventFd);
      await p.send(w.bytes.subarray(0, 14), a);
      await p.send(w.bytes.subarray(14), b);
      for (const f of [...a, ...b]) f.close();
      return FRONTEND_REQUESTS.SET_VRING_CALL.code;
    });
  });

  test("a well-formed message glued after a malformed one in the same send", async () => {
    const p = new Peer(PATH);
    try {
      await p.handshake(false);
      const bad = withPayload(valid("SET_VRING_NUM", p), new Uint8Array(3));
      const good = encodeRequest(FRONTEND_INDEX, "GET_QUEUE_NUM", undefined).bytes;
      const both = new Uint8Array(bad.bytes.byteLength + good.byteLength);
      both.set(bad.bytes);
      both.set(good, bad.bytes.byteLength);
      await p.send(both);
      const first = await refusal(p, FRONTEND_REQUESTS.SET_VRING_NUM.code, "glued");
      if (first === "nack") {
        const r = await p.next();
        assert.notEqual(r, "closed");
        assert.equal(U64.decode((r as RawMessage).payload, "GET_QUEUE_NUM"), 2n);
      }
    } finally {
      p.close();
    }
    await wellBehaved(++tags);
    await settled("glued");
  });
});

// ---------------------------------------------------------------- memory tables

describe("memory tables", { timeout: 30_000 }, () => {
  const setMemTable = (p: Peer, regions: MemoryRegion[], fds: Fd[]) =>
    sendWire(p, {
      bytes: encodeRequest(FRONTEND_INDEX, "SET_MEM_TABLE", { regions }, { needReply: true, fds }).bytes,
      fds,
    }).then(() => FRONTEND_REQUESTS.SET_MEM_TABLE.code);
  const addMemReg = (p: Peer, region: MemoryRegion, fd: Fd) =>
    sendWire(p, {
      bytes: encodeRequest(FRONTEND_INDEX, "ADD_MEM_REG", { kind: "region", region }, { needReply: true, fds: [fd] })
        .bytes,
      fds: [fd],
    }).then(() => FRONTEND_REQUESTS.ADD_MEM_REG.code);
  const MiB4 = 4 << 20;

  test("overlapping regions in SET_MEM_TABLE: NACK, the old table and the ring go on", async () => {
    await refuse(
      "overlap",
      (p) => setMemTable(p, [p.table, { ...p.table, guestAddress: 4096n }], [memfd(MiB4), memfd(MiB4)]),
      { ring: true, expect: "nack" },
    );
  });

  test("ADD_MEM_REG overlapping a region in use: NACK", async () => {
    await refuse("add overlap", (p) => addMemReg(p, { ...p.table, guestAddress: 0x100000n }, memfd(MiB4)), {
      ring: true,
      expect: "nack",
    });
  });

  // An mmap_offset inside a page is served (unaligned-region.test.ts); one that is not a multiple
  // of 8 still is not (the ring indices' atomic views need it), and says so.
  test("regions of size 0, an offset not a multiple of 8, wrapping past 2^64, past 2^53", async () => {
    const bad = (p: Peer) => [
      { ...p.table, size: 0n },
      { ...p.table, size: 1n << 20n, mmapOffset: 4096n + 100n },
      { ...p.table, guestAddress: (1n << 64n) - 4096n },
      { ...p.table, guestAddress: 1n << 60n },
      { ...p.table, size: 1n << 62n },
      { ...p.table, size: 4097n },
    ];
    for (let i = 0; i < 6; i++) {
      await refuse(`bad region ${i}`, (p) => setMemTable(p, [bad(p)[i] as typeof p.table], [memfd(MiB4)]), {
        ring: true,
        expect: "nack",
        light: i < 5,
      });
    }
  });

  test("a region larger than the file behind it (an access would be SIGBUS): NACK", async () => {
    await refuse(
      "region past EOF",
      async (p) => {
        const code = await setMemTable(p, [{ ...p.table, size: BigInt(MiB4) }], [memfd(64 * 1024)]);
        return code;
      },
      { ring: true, expect: "nack" },
    );
    await refuse(
      "region past EOF at an offset",
      (p) => setMemTable(p, [{ ...p.table, size: BigInt(MiB4), mmapOffset: 4096n }], [memfd(MiB4)]),
      { ring: true, expect: "nack" },
    );
  });

  test("REM_MEM_REG of a region that is not there: NACK", async () => {
    await refuse(
      "rem missing",
      (p) =>
        sendWire(p, {
          bytes: encodeRequest(
            FRONTEND_INDEX,
            "REM_MEM_REG",
            { ...p.table, guestAddress: 1n << 40n },
            { needReply: true },
          ).bytes,
          fds: [],
        }).then(() => FRONTEND_REQUESTS.REM_MEM_REG.code),
      { ring: true, expect: "nack" },
    );
  });

  test("a dirty log smaller than the file behind it says (a mark would be SIGBUS): refused", async () => {
    await refuse(
      "log past EOF",
      (p) =>
        sendWire(p, {
          bytes: encodeRequest(
            FRONTEND_INDEX,
            "SET_LOG_BASE",
            { mmapSize: 4096n, mmapOffset: 0n },
            { needReply: true, fds: [0] },
          ).bytes,
          fds: [memfd(0)],
        }).then(() => FRONTEND_REQUESTS.SET_LOG_BASE.code),
      { ring: true },
    );
  });
});

// ---------------------------------------------------------------- rings

const req = async <K extends Name>(p: Peer, name: K, payload: RequestPayload<FrontendRequests, K>, fds: Fd[] = []) => {
  await sendWire(p, { bytes: encodeRequest(FRONTEND_INDEX, name, payload, { needReply: true, fds }).bytes, fds });
  return FRONTEND_REQUESTS[name].code;
};

describe("rings", { timeout: 30_000 }, () => {
  test("non-power-of-two, zero and oversized ring sizes: NACK", async () => {
    for (const num of [0, 3, 100, 1000, 2048, 32768, 65536, 0xffff_ffff]) {
      await refuse(`SET_VRING_NUM ${num}`, (p) => req(p, "SET_VRING_NUM", { index: 1, num }), {
        expect: "nack",
        light: num !== 0xffff_ffff,
      });
    }
  });

  test("ring indices past the device's queues", async () => {
    for (const index of [2, 200, 0xffff_ffff]) {
      await refuse(`SET_VRING_NUM index ${index}`, (p) => req(p, "SET_VRING_NUM", { index, num: 16 }), {
        expect: "nack",
        light: true,
      });
      await refuse(`SET_VRING_ADDR index ${index}`, (p) =>
        req(p, "SET_VRING_ADDR", { index, flags: 0, descriptor: 0n, used: 0n, available: 0n, log: 0n }),
      );
      // GET_VRING_BASE always has a reply; with nothing to say the daemon hangs up.
      await refuse(`GET_VRING_BASE index ${index}`, (p) => req(p, "GET_VRING_BASE", { index, num: 0 }), {
        light: true,
      });
    }
    for (const index of [2, 255]) {
      await refuse(
        `SET_VRING_KICK index ${index}`,
        (p) => req(p, "SET_VRING_KICK", { index, noFd: false }, [eventFd()]),
        {
          expect: "nack",
        },
      );
    }
  });

  test("vring addresses outside guest memory, on a stopped ring: refused when it starts", async () => {
    const outside = (p: Peer) => [
      { descriptor: 0x1234n, used: p.uva(0x20000), available: p.uva(0x30000) },
      { descriptor: p.uva(0x10000), used: p.uva(4 * 1024 * 1024 - 8), available: p.uva(0x30000) },
      { descriptor: p.uva(0x10000), used: p.uva(0x20000), available: (1n << 64n) - 2n },
      { descriptor: p.uva(4 * 1024 * 1024 - 16), used: p.uva(0x20000), available: p.uva(0x30000) },
    ];
    for (let i = 0; i < 4; i++) {
      await refuse(
        `stopped ring, layout ${i}`,
        async (p) => {
          await p.request("SET_VRING_NUM", { index: 1, num: 64 });
          await p.request("SET_VRING_ADDR", {
            index: 1,
            flags: 0,
            log: 0n,
            ...(outside(p)[i] as ReturnType<typeof outside>[0]),
          });
          return req(p, "SET_VRING_KICK", { index: 1, noFd: false }, [eventFd()]);
        },
        { ring: true, expect: "nack", light: i < 3 },
      );
    }
  });

  test("vring addresses outside guest memory on a running ring: NACK, the ring goes on; then a new kick fd", async () => {
    await refuse(
      "running ring moved outside memory",
      async (p) => {
        const d = p.driver;
        const code = await req(p, "SET_VRING_ADDR", {
          index: 0,
          flags: 0,
          descriptor: p.uva(d.descTable),
          used: 0x10n,
          available: p.uva(d.availRing),
          log: 0n,
        });
        assert.equal(await refusal(p, code, "SET_VRING_ADDR"), "nack");
        // The ring still runs on its old addresses...
        await p.echo(++tags);
        // ...and a new kick fd restarts it there, not at the refused addresses.
        await p.request("SET_VRING_KICK", { index: 0, noFd: false }, [p.kick.fd]);
        await p.echo(++tags);
        // A log flag with an address no number can hold.
        return req(p, "SET_VRING_ADDR", {
          index: 0,
          flags: VHOST_VRING_F_LOG,
          descriptor: p.uva(d.descTable),
          used: p.uva(d.usedRing),
          available: p.uva(d.availRing),
          log: 1n << 63n,
        });
      },
      { ring: true, expect: "nack" },
    );
  });

  test("a kick that cannot start the ring keeps the old kick fd in force and leaks neither", async () => {
    await refuse(
      "kick after the rings left the memory table",
      async (p) => {
        // Queue 1 was never given addresses: its kick is refused.
        const code = await req(p, "SET_VRING_KICK", { index: 1, noFd: false }, [eventFd()]);
        assert.equal(await refusal(p, code, "kick without addresses"), "nack");
        // The same memory under another user address: the running ring goes on (it works in
        // guest addresses), but its user addresses no longer translate, so a restart fails.
        const table = { regions: [{ ...p.table, userAddress: p.table.userAddress + (1n << 40n) }] };
        await p.request("SET_MEM_TABLE", table, [p.region.backing.fd as Fd]);
        const k = await req(p, "SET_VRING_KICK", { index: 0, noFd: false }, [eventFd()]);
        assert.equal(await refusal(p, k, "SET_VRING_KICK"), "nack");
        // The ring still answers the kick fd it had.
        await p.echo(++tags);
        return req(p, "SET_VRING_KICK", { index: 0, noFd: false }, [eventFd()]);
      },
      { ring: true, expect: "nack" },
    );
  });

  test("vring u64s with reserved bits, a no-fd bit with an fd, and polling rings", async () => {
    await refuse(
      "reserved bits",
      (p) =>
        sendWire(p, withPayload(valid("SET_VRING_CALL", p), U64.encode(0x200n))).then(
          () => FRONTEND_REQUESTS.SET_VRING_CALL.code,
        ),
      { expect: "nack", light: true },
    );
    await refuse(
      "no-fd bit with an fd",
      (p) =>
        sendWire(p, withPayload(valid("SET_VRING_KICK", p), U64.encode(0x100n))).then(
          () => FRONTEND_REQUESTS.SET_VRING_KICK.code,
        ),
      { expect: "nack", light: true },
    );
    await refuse("polling kick", (p) => req(p, "SET_VRING_KICK", { index: 1, noFd: true }), { expect: "nack" });
  });
});

describe("other requests with bad values", { timeout: 30_000 }, () => {
  test("features and protocol features not offered, config writes past the end, postcopy out of order", async () => {
    await refuse("SET_FEATURES", (p) => req(p, "SET_FEATURES", FEATURES | (1n << 63n)), {
      expect: "nack",
      light: true,
    });
    await refuse("SET_PROTOCOL_FEATURES", (p) => req(p, "SET_PROTOCOL_FEATURES", 1n << 62n), {
      expect: "nack",
      light: true,
    });
    await refuse(
      "SET_CONFIG past the end",
      (p) => req(p, "SET_CONFIG", { offset: 6, flags: 0, data: new Uint8Array(4) }),
      { expect: "nack", light: true },
    );
    await refuse(
      "SET_CONFIG at offset 2^32-1",
      (p) => req(p, "SET_CONFIG", { offset: 0xffff_ffff, flags: 0, data: new Uint8Array(1) }),
      { expect: "nack", light: true },
    );
    await refuse("POSTCOPY_LISTEN before ADVISE", (p) => req(p, "POSTCOPY_LISTEN", undefined), {
      expect: "nack",
      light: true,
    });
    // QEMU sends the fd-less u64 ack after every memory-table update while postcopy listens,
    // even one that added no region: a 0 ack with nothing pending is a no-op; a failure is not.
    await refuse(
      "ADD_MEM_REG postcopy failure ack with nothing to acknowledge",
      (p) => req(p, "ADD_MEM_REG", { kind: "ack", value: 1n }),
      { expect: "nack", light: true },
    );
    await refuse(
      "SET_LOG_BASE without LOG_ALL of a size 0",
      (p) => req(p, "SET_LOG_BASE", { mmapSize: 0n, mmapOffset: 0n }, [memfd()]),
      { light: true },
    );
    await refuse(
      "SET_FEATURES LOG_ALL then SET_LOG_BASE at an unaligned offset",
      async (p) => {
        await p.request("SET_FEATURES", FEATURES | featureMask(VirtioFeature.VHOST_F_LOG_ALL));
        return req(p, "SET_LOG_BASE", { mmapSize: 4096n, mmapOffset: 1n }, [memfd(8192)]);
      },
      {},
    );
  });
});
