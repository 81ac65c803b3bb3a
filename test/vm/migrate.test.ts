/**
 * Live migration of a running micro-VM between two processes: this test process is the
 * source (the VM runs here), `vmshift demo-destination` is spawned as the destination. Every
 * combination of precopy/postcopy and bitmap/ring tracking (1 vCPU with the bitmap, 2 with rings:
 * one ring per vCPU): the memory digests match and each vCPU's first report on the destination is
 * exactly its last on the source + 1.
 */
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { test } from "node:test";
import { fileURLToPath } from "node:url";
import { runVmDemo, type VmDemoResult } from "../../src/cli/demo-vm.js";
import { countFds } from "../helpers/proc.js";
import { skipWithoutKvm } from "../kvm/rig.js";

const MAIN = fileURLToPath(new URL("../../src/cli/main.js", import.meta.url));

function summary(r: VmDemoResult): string {
  return JSON.stringify({
    mode: r.mode,
    tracking: r.dirtyTracking,
    rounds: r.rounds,
    MiB: +(r.bytes / 2 ** 20).toFixed(1),
    MBps: +r.throughputMBps.toFixed(0),
    downtimeMs: +r.downtimeMs.toFixed(1),
    stopAndCopyMs: r.stopAndCopyMs === null ? null : +r.stopAndCopyMs.toFixed(1),
    counter: r.counter,
    remoteFaults: r.postcopy?.remoteFaults ?? null,
  });
}

for (const mode of ["precopy", "postcopy"] as const) {
  for (const dirtyTracking of ["bitmap", "ring"] as const) {
    const vcpus = dirtyTracking === "ring" ? 2 : 1;
    test(`${mode} with KVM ${dirtyTracking} tracking, ${vcpus} vCPU(s): a running micro-VM moves to another process, digests equal, counters continue`, async (t) => {
      if (skipWithoutKvm(t)) return;
      const fds = countFds();
      const lines: string[] = [];
      const r = await runVmDemo({
        sizeMiB: 32,
        vcpus,
        dirtyRateMiB: 32,
        mode,
        dirtyTracking,
        json: true,
        out: (l) => lines.push(l),
        timeoutMs: 30_000,
      });
      console.log(summary(r));
      assert.equal(r.guest, "kvm");
      assert.equal(r.mode, mode);
      assert.equal(r.dirtyTracking, dirtyTracking);
      assert.ok(r.digests.length === 1 && r.digests.every((d) => d.match && d.source === d.destination), "digests");
      assert.ok(r.counter, "the destination reported its counter");
      assert.ok(r.counter.sourceLast > 0, "the guest ran on the source");
      assert.equal(r.counter.destinationFirst, r.counter.sourceLast + 1, "first report there = last here + 1");
      assert.ok(r.counter.continued);
      assert.equal(r.counter.vcpus.length, vcpus, "every vCPU travelled");
      for (const [i, [last, first]] of r.counter.vcpus.entries())
        assert.ok(last > 0 && first === last + 1, `vCPU ${i}: ${last} -> ${first}`);
      assert.ok((r.counter.destinationAfter ?? 0) >= r.counter.destinationFirst + 5, "and it ran on");
      if (mode === "precopy") assert.ok(r.rounds >= 1);
      else assert.ok(r.postcopy && r.postcopy.remoteFaults > 0, "the vCPU faulted pages in from the source (via KVM)");
      assert.equal(r.verified, true);
      const events = lines.map((l) => JSON.parse(l) as { event: string; role?: string });
      assert.ok(
        events.some((e) => e.event === "phase" && e.role === "destination"),
        "the child's events are relayed",
      );
      assert.equal(events.at(-1)?.event, "summary");
      assert.equal(countFds(), fds, "no fd left behind (VM, vCPU, socket, memfd)");
    });
  }
}

test("without KVM (forced here): the same migration of a worker-thread workload, and it says so", async () => {
  const lines: string[] = [];
  const r = await runVmDemo({
    sizeMiB: 32,
    dirtyRateMiB: 32,
    mode: "precopy",
    dirtyTracking: "bitmap",
    json: false,
    forceWorkload: true,
    out: (l) => lines.push(l),
    timeoutMs: 30_000,
  });
  assert.equal(r.guest, "worker-threads");
  assert.equal(r.counter, null);
  assert.equal(r.verified, true);
  assert.ok(r.digestsEqual);
  const text = lines.join("\n");
  assert.match(text, /NO KVM/);
  assert.match(text, /guest counter: n\/a/);
});

function runCli(args: string[], timeoutMs: number): Promise<{ code: number | null; stdout: string; stderr: string }> {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, [MAIN, ...args], { stdio: ["ignore", "pipe", "pipe"] });
    let stdout = "";
    let stderr = "";
    child.stdout.on("data", (d: Buffer) => {
      stdout += d.toString();
    });
    child.stderr.on("data", (d: Buffer) => {
      stderr += d.toString();
    });
    const timer = setTimeout(() => {
      child.kill("SIGKILL");
      reject(new Error(`vmshift ${args.join(" ")} did not finish in ${timeoutMs} ms: ${stderr}`));
    }, timeoutMs);
    child.once("exit", (code) => {
      clearTimeout(timer);
      resolve({ code, stdout, stderr });
    });
  });
}

test("`vmshift demo --json` end to end: versioned JSON lines, the last one the verified summary", async () => {
  const { code, stdout, stderr } = await runCli(["demo", "--json", "--size", "32"], 60_000);
  const lines = stdout.trim().split("\n");
  const last = JSON.parse(lines.at(-1) as string) as Record<string, unknown>;
  assert.equal(code, 0, stderr);
  for (const l of lines) JSON.parse(l);
  assert.equal(last.event, "summary");
  assert.equal(last.verified, true);
  for (const l of lines) assert.equal((JSON.parse(l) as { version?: number }).version, 1, l.slice(0, 100));
  const info = last.source as {
    rounds: number;
    downtimeMs: number;
    totalTimeMs: number;
    ram: { transferredBytes: number };
  };
  for (const v of [info.rounds, info.downtimeMs, info.totalTimeMs, info.ram.transferredBytes])
    assert.equal(typeof v, "number");
  assert.equal(last.mode, "precopy");
  assert.equal(last.dirtyTracking, last.guest === "kvm" ? "bitmap" : "worker bitmap");
  if (last.guest !== "kvm") console.warn(`[test/vm] demo ran WITHOUT KVM: ${String(last.kvmUnavailable)}`);
});

test("`vmshift demo` rejects bad options with exit code 2", async () => {
  const r = await runCli(["demo", "--mode", "sideways"], 10_000);
  assert.equal(r.code, 2);
  assert.match(r.stderr, /--mode must be precopy or postcopy/);
});

test("a demo past its deadline fails cleanly: rejected, destination process killed, no hang", async () => {
  const t0 = performance.now();
  await assert.rejects(
    runVmDemo({
      sizeMiB: 256,
      dirtyRateMiB: 64,
      mode: "precopy",
      dirtyTracking: "bitmap",
      json: true,
      out: () => undefined,
      timeoutMs: 150,
    }),
    /did not finish within 150 ms/,
  );
  assert.ok(performance.now() - t0 < 10_000);
});
