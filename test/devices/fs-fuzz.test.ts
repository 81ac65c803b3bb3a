/**
 * Property-based fuzzing of the virtio-fs session (fast-check): FUSE requests built as the
 * kernel lays them out, with hostile names ("..", "/", ".", NUL, over-long), node ids, handles,
 * offsets and sizes, then bytes flipped, cut, appended and the length field rewritten.
 *
 * - The decoder throws nothing but FuseError, and every name it lets through is one component.
 * - Sequences of such requests against a real shared directory: handle() never throws, never
 *   writes past the writable part, nothing outside the shared directory is created or changed,
 *   and closing the session closes every fd it opened.
 *
 * A fixed seed and a bounded number of runs here; `npm run fuzz -- RUNS` runs longer with a
 * fresh seed (VMSHIFT_FUZZ_RUNS, VMSHIFT_FUZZ_SEED).
 */
import assert from "node:assert/strict";
import { mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, symlinkSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, test } from "node:test";
import fc from "fast-check";
import { decodeRequest, FuseError, isComponent } from "../../src/devices/fs/decode.js";
import { PassthroughFs } from "../../src/devices/fs/passthrough.js";
import { FuseServer } from "../../src/devices/fs/server.js";
import { BufferChain, cstr, FuseTestClient, Op, request, struct } from "../helpers/fuse-client.js";
import { countFds } from "../helpers/proc.js";

const RUNS = Number(process.env.VMSHIFT_FUZZ_RUNS ?? 400);
const SEED = Number(process.env.VMSHIFT_FUZZ_SEED ?? 0x5eed);
if (process.env.VMSHIFT_FUZZ_RUNS) process.stderr.write(`fs-fuzz: ${RUNS} runs, seed ${SEED}\n`);

const top = mkdtempSync(join(tmpdir(), "vmshift-fs-fuzz-"));
after(() => rmSync(top, { recursive: true, force: true }));

const nameArb = fc.oneof(
  fc.constantFrom("a", "b", "dir", "l-out", "l-up", "fifo", "..", ".", "/", "a/..", "/etc/passwd", "", "x".repeat(256)),
  fc.uint8Array({ minLength: 0, maxLength: 12 }).map((b) => Buffer.from(b).toString("latin1")),
);
const nodeArb = fc.oneof(
  fc.constantFrom(0n, 1n, 2n, 3n, 4n, 5n, 6n, 2n ** 64n - 1n),
  fc.bigInt({ min: 0n, max: 2n ** 64n - 1n }),
);
const fhArb = fc.oneof(fc.constantFrom(0n, 1n, 2n, 3n, 2n ** 63n), fc.bigInt({ min: 0n, max: 2n ** 64n - 1n }));
const offArb = fc.oneof(
  fc.constantFrom(0n, 1n, 4096n, 2n ** 53n, 2n ** 63n),
  fc.bigInt({ min: 0n, max: 2n ** 64n - 1n }),
);
const sizeArb = fc.oneof(fc.constantFrom(0, 1, 4096, 1 << 20, (1 << 20) + 1, 0xffffffff), fc.nat({ max: 70000 }));

const rwArgs = (fh: bigint, off: bigint, size: number) =>
  struct(40, (v) => {
    v.setBigUint64(0, fh, true);
    v.setBigUint64(8, off, true);
    v.setUint32(16, size, true);
  });

/** One request, well-formed in layout (the values are hostile). */
const requestArb: fc.Arbitrary<Uint8Array> = fc.oneof(
  fc.tuple(nodeArb, nameArb).map(([n, s]) => request(Op.LOOKUP, n, cstr(s))),
  fc.tuple(nodeArb, nameArb, fc.nat()).map(([n, s, mode]) =>
    request(
      Op.MKDIR,
      n,
      struct(8, (v) => v.setUint32(0, mode, true)),
      cstr(s),
    ),
  ),
  fc.tuple(nodeArb, nameArb, fc.nat(), fc.nat()).map(([n, s, flags, mode]) =>
    request(
      Op.CREATE,
      n,
      struct(16, (v) => {
        v.setUint32(0, flags, true);
        v.setUint32(4, mode, true);
      }),
      cstr(s),
    ),
  ),
  fc.tuple(nodeArb, nameArb, fc.nat(), fc.nat()).map(([n, s, mode, rdev]) =>
    request(
      Op.MKNOD,
      n,
      struct(16, (v) => {
        v.setUint32(0, mode, true);
        v.setUint32(4, rdev, true);
      }),
      cstr(s),
    ),
  ),
  fc.tuple(nodeArb, nameArb, nameArb).map(([n, s, t]) => request(Op.SYMLINK, n, cstr(s), cstr(t))),
  fc.tuple(nodeArb, nameArb, nodeArb, nameArb, fc.nat({ max: 7 })).map(([n, s, d, t, flags]) =>
    request(
      Op.RENAME2,
      n,
      struct(16, (v) => {
        v.setBigUint64(0, d, true);
        v.setUint32(8, flags, true);
      }),
      cstr(s),
      cstr(t),
    ),
  ),
  fc.tuple(nodeArb, nodeArb, nameArb).map(([n, o, s]) =>
    request(
      Op.LINK,
      n,
      struct(8, (v) => v.setBigUint64(0, o, true)),
      cstr(s),
    ),
  ),
  fc.tuple(fc.constantFrom(Op.UNLINK, Op.RMDIR), nodeArb, nameArb).map(([op, n, s]) => request(op, n, cstr(s))),
  fc.tuple(fc.constantFrom(Op.OPEN, Op.OPENDIR), nodeArb, fc.nat()).map(([op, n, f]) =>
    request(
      op,
      n,
      struct(8, (v) => v.setUint32(0, f, true)),
    ),
  ),
  fc
    .tuple(fc.constantFrom(Op.READ, Op.READDIR, Op.READDIRPLUS), nodeArb, fhArb, offArb, sizeArb)
    .map(([op, n, fh, off, size]) => request(op, n, rwArgs(fh, off, size))),
  fc
    .tuple(nodeArb, fhArb, offArb, fc.uint8Array({ maxLength: 9000 }))
    .map(([n, fh, off, data]) => request(Op.WRITE, n, rwArgs(fh, off, data.length), data)),
  fc.tuple(fc.constantFrom(Op.RELEASE, Op.RELEASEDIR, Op.FLUSH), nodeArb, fhArb).map(([op, n, fh]) =>
    request(
      op,
      n,
      struct(24, (v) => v.setBigUint64(0, fh, true)),
    ),
  ),
  fc.tuple(nodeArb, fc.bigInt({ min: 0n, max: 2n ** 64n - 1n })).map(([n, k]) =>
    request(
      Op.FORGET,
      n,
      struct(8, (v) => v.setBigUint64(0, k, true)),
    ),
  ),
  fc.tuple(nodeArb, fc.nat(), fhArb, offArb).map(([n, valid, fh, size]) =>
    request(
      Op.SETATTR,
      n,
      struct(88, (v) => {
        v.setUint32(0, valid & 0xfff, true);
        v.setBigUint64(8, fh, true);
        v.setBigUint64(16, size & 0xffffffn, true);
        v.setUint32(68, 0o644, true);
      }),
    ),
  ),
  fc
    .tuple(fc.constantFrom(Op.GETATTR, Op.STATFS, Op.READLINK, Op.DESTROY), nodeArb)
    .map(([op, n]) => request(op, n, op === Op.GETATTR ? new Uint8Array(16) : new Uint8Array(0))),
  fc.tuple(fc.nat({ max: 60 }), nodeArb, fc.uint8Array({ maxLength: 64 })).map(([op, n, b]) => request(op, n, b)),
);

/** Mutations of a request's bytes: flips, a cut, an append, a rewritten length. */
const mutatedArb: fc.Arbitrary<Uint8Array> = fc
  .tuple(
    requestArb,
    fc.array(fc.tuple(fc.nat(), fc.nat({ max: 255 })), { maxLength: 4 }),
    fc.option(fc.nat(), { nil: undefined }),
    fc.option(fc.uint8Array({ minLength: 1, maxLength: 16 }), { nil: undefined }),
    fc.option(fc.nat({ max: 0xffffffff }), { nil: undefined }),
  )
  .map(([req, flips, cut, tail, len]) => {
    let b = new Uint8Array(req);
    for (const [pos, val] of flips) if (b.length) b[pos % b.length] = val;
    if (cut !== undefined && b.length) b = b.subarray(0, cut % (b.length + 1));
    if (tail) b = Buffer.concat([b, tail]);
    if (len !== undefined && b.length >= 4) new DataView(b.buffer, b.byteOffset).setUint32(0, len, true);
    return b;
  });

const anyRequest = fc.oneof({ weight: 3, arbitrary: requestArb }, { weight: 1, arbitrary: mutatedArb });

test("decoder: only FuseError, and every name let through is one path component", () => {
  fc.assert(
    fc.property(anyRequest, (b) => {
      try {
        const { request: r } = decodeRequest(b, b.length);
        for (const key of ["name", "newname"] as const) {
          const n = (r as Record<string, unknown>)[key];
          if (n instanceof Uint8Array) assert.ok(isComponent(n), `decoded name ${Buffer.from(n).toString("latin1")}`);
        }
      } catch (e) {
        if (!(e instanceof FuseError)) throw e;
      }
    }),
    { numRuns: RUNS * 10, seed: SEED },
  );
});

let caseSeq = 0;

test("session: random request sequences never throw, never overrun, never touch the outside; no fd leaks", () => {
  const fdsBefore = countFds();
  fc.assert(
    fc.property(
      fc.array(fc.tuple(anyRequest, fc.nat({ max: 300 }), fc.constantFrom(1, 7, 4096)), { maxLength: 30 }),
      (reqs) => {
        const base = join(top, `c${++caseSeq}`);
        const share = join(base, "share");
        mkdirSync(join(share, "dir"), { recursive: true });
        writeFileSync(join(base, "secret"), "outside");
        writeFileSync(join(share, "a"), "inside");
        symlinkSync(join(base, "secret"), join(share, "l-out"));
        symlinkSync("..", join(share, "l-up"));
        const fs = new PassthroughFs(share);
        const server = new FuseServer(fs);
        try {
          new FuseTestClient(server).init();
          for (const [b, extra, piece] of reqs) {
            const chain = new BufferChain(b, 16 + extra + (b.length > 40 ? 160 : 0), piece);
            const used = server.handle(chain);
            assert.ok(used >= 0 && used <= chain.writableLength, `used ${used} of ${chain.writableLength}`);
          }
        } finally {
          fs.close();
        }
        assert.deepEqual(readdirSync(base).sort(), ["secret", "share"], "nothing created outside the share");
        assert.equal(readFileSync(join(base, "secret"), "utf8"), "outside", "the outside file is untouched");
        rmSync(base, { recursive: true, force: true });
      },
    ),
    { numRuns: RUNS, seed: SEED },
  );
  assert.equal(countFds(), fdsBefore, "every fd the sessions opened is closed");
});
