/**
 * Userfaultfd with a worker as the faulting thread and the main thread as the resolver (the
 * faulting thread must never be the one that resolves).
 */
import assert from "node:assert/strict";
import { type TestContext, test } from "node:test";
import { SysError } from "../../src/sys/errors.js";
import { EventFd } from "../../src/sys/eventfd.js";
import { isOpenFd } from "../../src/sys/fd.js";
import { Mapping } from "../../src/sys/mapping.js";
import {
  UFFD_EVENT_PAGEFAULT,
  UFFD_PAGEFAULT_FLAG_WP,
  UFFD_PAGEFAULT_FLAG_WRITE,
  UFFDIO_REGISTER_MODE_MISSING,
  UFFDIO_REGISTER_MODE_WP,
  UffdFeature,
  type UffdMessage,
  Userfaultfd,
} from "../../src/sys/userfaultfd.js";
import { startWorker } from "../helpers/workers.js";

const PAGE = 4096;

function createOrSkip(t: TestContext): Userfaultfd | null {
  try {
    return Userfaultfd.create();
  } catch (e) {
    const msg = `!!! SKIPPED: userfaultfd is unavailable on this machine (${(e as Error).message}) !!!`;
    console.warn(msg);
    t.skip(msg);
    return null;
  }
}

function nextFault(uffd: Userfaultfd): Promise<UffdMessage> {
  return new Promise((resolve) => {
    const w = uffd.onMessages((msgs) => {
      const m = msgs.find((x) => x.event === UFFD_EVENT_PAGEFAULT);
      if (!m) return;
      w.close();
      resolve(m);
    });
  });
}

test("MISSING: a worker blocks on a missing page, main places it with copy(); EEXIST and zeropage", async (t) => {
  const uffd = createOrSkip(t);
  if (!uffd) return;
  const m = Mapping.anonymous(4 * PAGE);
  const base = m.address;
  uffd.register(base, 4 * PAGE, UFFDIO_REGISTER_MODE_MISSING);

  const fault = nextFault(uffd);
  const worker = startWorker({ kind: "uffd-read", sab: m.windows[0] as SharedArrayBuffer, offset: PAGE + 8 });
  const msg = await fault;
  assert.equal(msg.address & ~BigInt(PAGE - 1), base + BigInt(PAGE), "the fault is on page 1");
  assert.equal(msg.flags & UFFD_PAGEFAULT_FLAG_WRITE, 0n, "a read fault");

  const src = new Uint32Array(PAGE / 4).fill(0x600df00d);
  src[2] = 0x12345678;
  assert.equal(uffd.copy(base + BigInt(PAGE), src), true);
  assert.equal(await worker.next(), 0x12345678, "the worker continued with the placed data");
  assert.equal(await worker.exited, 0);

  // Already placed: copy() says so and does not overwrite.
  assert.equal(uffd.copy(base + BigInt(PAGE), new Uint32Array(PAGE / 4).fill(0xbad)), false);
  const view = new Uint32Array(m.windows[0] as SharedArrayBuffer);
  assert.equal(view[PAGE / 4 + 2], 0x12345678);
  assert.equal(view[PAGE / 4], 0x600df00d);

  // zeropage on page 2 (populated by us, so reading it here cannot fault).
  assert.equal(uffd.zeropage(base + 2n * BigInt(PAGE), PAGE), true);
  assert.equal(uffd.zeropage(base + 2n * BigInt(PAGE), PAGE), false, "already populated");
  assert.ok(
    view.subarray((2 * PAGE) / 4, (3 * PAGE) / 4).every((x) => x === 0),
    "a zero page",
  );

  uffd.close();
  m.close();
});

test("copyRun / zeropageRun: a run stops before a page already there; the caller goes on after it", (t) => {
  const uffd = createOrSkip(t);
  if (!uffd) return;
  const m = Mapping.anonymous(8 * PAGE);
  const base = m.address;
  uffd.register(base, 8 * PAGE, UFFDIO_REGISTER_MODE_MISSING);
  const at = (p: number) => base + BigInt(p * PAGE);
  // Page 2 is there already.
  assert.equal(uffd.copy(at(2), new Uint8Array(PAGE).fill(2)), true);
  const src = new Uint8Array(5 * PAGE);
  for (let p = 0; p < 5; p++) src.fill(10 + p, p * PAGE, (p + 1) * PAGE);
  assert.equal(uffd.copyRun(at(0), src), 2 * PAGE, "pages 0 and 1, then it stops before page 2");
  assert.equal(uffd.copyRun(at(2), src.subarray(2 * PAGE)), 0, "page 2 is there: nothing placed");
  assert.equal(uffd.copyRun(at(3), src.subarray(3 * PAGE)), 2 * PAGE, "pages 3 and 4");
  const v = new Uint8Array(m.windows[0] as SharedArrayBuffer);
  assert.deepEqual(
    [0, 1, 2, 3, 4].map((p) => v[p * PAGE + 7]),
    [10, 11, 2, 13, 14],
    "page 2 not overwritten",
  );
  // Zero pages the same way: page 6 is there.
  assert.equal(uffd.copy(at(6), new Uint8Array(PAGE).fill(6)), true);
  assert.equal(uffd.zeropageRun(at(5), 3 * PAGE), PAGE, "page 5, then it stops before page 6");
  assert.equal(uffd.zeropageRun(at(6), 2 * PAGE), 0);
  assert.equal(uffd.zeropageRun(at(7), PAGE), PAGE);
  assert.deepEqual([v[5 * PAGE], v[6 * PAGE], v[7 * PAGE]], [0, 6, 0]);
  uffd.close();
  m.close();
});

test("WP: a write to a write-protected page faults with FLAG_WP; writeProtect(false) releases it", async (t) => {
  const uffd = createOrSkip(t);
  if (!uffd) return;
  const m = Mapping.anonymous(2 * PAGE);
  const view = new Uint32Array(m.windows[0] as SharedArrayBuffer);
  view[0] = 1; // populate both pages before protecting them
  view[PAGE / 4] = 2;
  const base = m.address;
  uffd.register(base, 2 * PAGE, UFFDIO_REGISTER_MODE_WP);
  uffd.writeProtect(base, 2 * PAGE, true);

  const fault = nextFault(uffd);
  const worker = startWorker({
    kind: "uffd-write",
    sab: m.windows[0] as SharedArrayBuffer,
    offset: PAGE + 4,
    value: 77,
  });
  const msg = await fault;
  assert.equal(msg.address & ~BigInt(PAGE - 1), base + BigInt(PAGE));
  assert.notEqual(msg.flags & UFFD_PAGEFAULT_FLAG_WP, 0n, "the fault carries UFFD_PAGEFAULT_FLAG_WP");
  assert.notEqual(msg.flags & UFFD_PAGEFAULT_FLAG_WRITE, 0n, "and is a write");
  assert.equal(view[PAGE / 4 + 1], 0, "the write has not happened yet");

  uffd.writeProtect(base + BigInt(PAGE), PAGE, false);
  assert.equal(await worker.next(), "written");
  assert.equal(view[PAGE / 4 + 1], 77, "the worker's write landed after release");
  assert.equal(view[0], 1);
  assert.equal(await worker.exited, 0);
  uffd.close();
  m.close();
});

test("features: the requested ones when some were asked for, everything supported otherwise", (t) => {
  const probe = createOrSkip(t);
  if (!probe) return;
  const supported = probe.features;
  probe.close();
  assert.equal(Userfaultfd.supportedFeatures(), supported);
  const want = UffdFeature.THREAD_ID;
  if ((supported & want) === 0n) return t.skip("THREAD_ID not supported");
  const u = Userfaultfd.create({ features: want });
  assert.equal(u.features, want, "features is what is enabled, not the kernel's supported list");
  u.close();
});

test("adopt() takes only a userfaultfd: an eventfd is refused with EINVAL and closed", (t) => {
  const real = createOrSkip(t);
  if (!real) return;
  const adopted = Userfaultfd.adopt(real.fd.dup());
  adopted.close();
  real.close();
  const ev = new EventFd();
  const fd = ev.fd.dup();
  const n = fd.fd;
  assert.throws(
    () => Userfaultfd.adopt(fd),
    (e: unknown) => e instanceof SysError && e.code === "EINVAL" && /anon_inode:\[eventfd\]/.test(e.message),
  );
  assert.equal(fd.closed, true, "ownership was taken: closed on refusal");
  assert.equal(isOpenFd(n), false);
  ev.close();
});
