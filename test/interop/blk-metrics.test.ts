/**
 * `vmshift blk --metrics` under a real QEMU 10 guest: the per-queue request and byte counters
 * Prometheus scrapes rise with the guest's I/O, on the queue the guest used, with no errors; the
 * front-end connection and dirty-log state are reported. Skips loudly when QEMU or the guest is
 * missing (VMSHIFT_REQUIRE_INTEROP=1 fails instead).
 */
import assert from "node:assert/strict";
import { describe, test } from "node:test";
import { blkFixture, skipBanner, startBlk } from "./blk-helpers.js";
import { MiB, probeInterop } from "./rig.js";

const probe = await probeInterop();
const skip = skipBanner("test/interop/blk-metrics.test", probe.ok ? null : probe.reason);
if (!probe.ok && process.env.VMSHIFT_REQUIRE_INTEROP === "1") {
  test("QEMU interop rig is available (VMSHIFT_REQUIRE_INTEROP=1)", () => assert.fail(probe.reason));
}

/** `name{labels} value` samples of a Prometheus text page. */
function samples(text: string, name: string): Map<string, number> {
  const out = new Map<string, number>();
  for (const l of text.split("\n")) {
    const m = /^(\w+)(\{[^}]*\})? (\S+)$/.exec(l);
    if (m && m[1] === name) out.set(m[2] ?? "", Number(m[3]));
  }
  return out;
}

describe("vmshift blk --metrics under QEMU", { timeout: 120_000 }, () => {
  const fx = blkFixture("blk-metrics", probe.ok);

  test("per-queue request and byte counters rise with the guest's I/O", { skip }, async () => {
    const rig = fx.rig();
    const img = await rig.createRawImage("disk.img", 64 * MiB);
    const be = await startBlk(rig, { name: "blk", image: img, queues: 2, metrics: true });
    fx.backends.push(be);
    const url = await be.metricsUrl();
    const scrape = async () => (await fetch(url)).text();
    const idle = await scrape();
    assert.match(idle, /^vmshift_vhost_user_connected 0$/m, "no front-end yet");
    const vm = await rig.startVm({ name: "vm", vhostUserBlk: [{ socket: be.socket, numQueues: 2 }] });
    await vm.guest.ready();
    const before = await scrape();
    assert.match(before, /^vmshift_vhost_user_connected 1$/m);
    assert.match(before, /^vmshift_vhost_user_dirty_log_active 0$/m, "not migrating");
    const req0 = samples(before, "vmshift_blk_requests_total");
    const bytes0 = samples(before, "vmshift_blk_bytes_total");

    const written = await vm.guest.write("/dev/vda", 1, 8);
    assert.equal(await vm.guest.sum("/dev/vda", 1, 8), written);

    const after = await scrape();
    const req1 = samples(after, "vmshift_blk_requests_total");
    const bytes1 = samples(after, "vmshift_blk_bytes_total");
    const total = (m: Map<string, number>, type: string) =>
      [...m].filter(([k]) => k.includes(`type="${type}"`)).reduce((n, [, v]) => n + v, 0);
    const dir = (m: Map<string, number>, d: string) =>
      [...m].filter(([k]) => k.includes(`direction="${d}"`)).reduce((n, [, v]) => n + v, 0);
    assert.ok(
      total(req1, "write") > total(req0, "write"),
      `writes rose: ${total(req0, "write")} -> ${total(req1, "write")}`,
    );
    assert.ok(
      total(req1, "read") > total(req0, "read"),
      `reads rose: ${total(req0, "read")} -> ${total(req1, "read")}`,
    );
    assert.ok(dir(bytes1, "write") - dir(bytes0, "write") >= 8 * MiB, "at least the 8 MiB written");
    assert.ok(dir(bytes1, "read") - dir(bytes0, "read") >= 8 * MiB, "at least the 8 MiB read back");
    for (const q of ["0", "1"])
      assert.ok(
        [...req1.keys()].some((k) => k.includes(`queue="${q}"`)),
        `queue ${q} is labelled`,
      );
    assert.deepEqual(
      [...samples(after, "vmshift_blk_errors_total").values()].filter((v) => v > 0),
      [],
      "no request failed",
    );
    assert.deepEqual(
      [...samples(after, "vmshift_blk_in_flight").values()].filter((v) => v !== 0),
      [],
      "nothing left in flight once the guest's I/O is done",
    );
    process.stderr.write(
      `blk metrics: requests ${JSON.stringify(Object.fromEntries(req1))}, bytes ${JSON.stringify(Object.fromEntries(bytes1))}\n`,
    );
    await vm.close();
  });
});
