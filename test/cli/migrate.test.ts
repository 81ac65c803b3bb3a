/**
 * `vmshift migrate` as an operator runs it, two processes on loopback: every --json line carries
 * `version` and is valid against docs/events.schema.json; the destination prints the address it
 * really bound; nobody listening is CONNECTION_REFUSED (one failed event, exit 1); SIGINT on
 * either side is one `cancelled` event and exit 130.
 */
import assert from "node:assert/strict";
import { test } from "node:test";
import { assertNoStack, CliProcess, eventValidator, runCli } from "./helpers.js";

const validate = eventValidator();

function assertValid(p: CliProcess): void {
  assert.ok(p.lines.length > 0);
  for (const l of p.lines) {
    const e = JSON.parse(l) as Record<string, unknown>;
    assert.equal(e.version, 1, l.slice(0, 200));
    assert.deepEqual(validate(e), [], l.slice(0, 300));
  }
}

async function listening(p: CliProcess): Promise<string> {
  const e = await p.next((x) => x.event === "listening", "listening");
  return String(e.endpoint);
}

test("precopy between two processes: versioned, valid events on both sides; the bound port is printed", async () => {
  const dst = new CliProcess(["migrate", "--listen", "tcp:127.0.0.1:0", "--size", "32", "--json"]);
  try {
    const ep = await listening(dst);
    assert.match(ep, /^tcp:127\.0\.0\.1:[1-9]\d*$/, "port 0 resolved to the real port");
    assert.match(dst.stderr, new RegExp(`listening on ${ep}`));
    const s = new CliProcess(["migrate", "--to", ep, "--size", "32", "--json", "--downtime", "1000"]);
    await using _ = { [Symbol.asyncDispose]: () => s.kill() };
    const [sc, dc] = await Promise.all([s.exited, dst.exited]);
    assert.equal(sc.code, 0, s.stderr);
    assert.equal(dc.code, 0, dst.stderr);
    assertValid(s);
    assertValid(dst);
    const sc1 = s.events.filter((e) => e.event === "complete");
    const dc1 = dst.events.filter((e) => e.event === "complete");
    assert.equal(sc1.length, 1);
    assert.equal(dc1.length, 1);
    const si = sc1[0]?.info as { ram: { transferredBytes: number }; downtimeMs: number };
    const di = dc1[0]?.info as { ram: { transferredBytes: number }; verified: boolean };
    assert.equal(di.ram.transferredBytes, si.ram.transferredBytes, "the destination reports what it received");
    assert.equal(di.verified, true);
    assert.ok(si.downtimeMs > 0);
    for (const p of [s, dst]) assert.equal(assertNoStack(p.stderr), null);
  } finally {
    await dst.kill();
  }
});

test("nobody listening: one failed event, CONNECTION_REFUSED, exit 1, no stack", async () => {
  const dst = new CliProcess(["migrate", "--listen", "tcp:127.0.0.1:0", "--size", "16", "--json"]);
  let ep: string;
  try {
    ep = await listening(dst);
  } finally {
    await dst.kill();
  }
  // The port was just freed: nothing listens there now.
  const r = await runCli(["migrate", "--to", ep, "--size", "16", "--json"], 30_000);
  assert.equal(r.code, 1, r.stderr);
  const events = r.stdout
    .trim()
    .split("\n")
    .map((l) => JSON.parse(l) as Record<string, unknown>);
  const failed = events.filter((e) => e.event === "failed");
  assert.equal(failed.length, 1);
  assert.equal(failed[0]?.code, "CONNECTION_REFUSED");
  for (const e of events) assert.deepEqual(validate(e), []);
  assert.equal(assertNoStack(r.stderr), null, r.stderr);
  assert.equal(r.stderr.trim().split("\n").length, 1, `one log line: ${r.stderr}`);
});

test("SIGINT on a waiting destination: cancelled, exit 130", async () => {
  const dst = new CliProcess(["migrate", "--listen", "tcp:127.0.0.1:0", "--size", "16", "--json"]);
  try {
    await listening(dst);
    dst.child.kill("SIGINT");
    const { code } = await dst.exited;
    assert.equal(code, 130, dst.stderr);
    assert.equal(dst.events.at(-1)?.event, "cancelled");
    assertValid(dst);
  } finally {
    await dst.kill();
  }
});

test("SIGINT on the source mid-migration: one cancelled event, exit 130; the destination fails, exit 1", async () => {
  const dst = new CliProcess(["migrate", "--listen", "tcp:127.0.0.1:0", "--size", "64", "--json"]);
  try {
    const ep = await listening(dst);
    // 64 MiB at 2 MB/s: over thirty seconds of first round.
    const src = new CliProcess(["migrate", "--to", ep, "--size", "64", "--bandwidth", "2", "--json"]);
    try {
      await src.next((e) => e.event === "phase" && e.phase === "precopy", "precopy");
      src.child.kill("SIGINT");
      const [sc, dc] = await Promise.all([src.exited, dst.exited]);
      assert.equal(sc.code, 130, src.stderr);
      assert.equal(dc.code, 1, dst.stderr);
      const terminal = src.events.filter((e) => ["cancelled", "failed", "complete"].includes(String(e.event)));
      assert.deepEqual(
        terminal.map((e) => e.event),
        ["cancelled"],
      );
      assert.equal((terminal[0]?.info as { status?: string } | undefined)?.status, "cancelled");
      const dterminal = dst.events.filter((e) => ["cancelled", "failed", "complete"].includes(String(e.event)));
      assert.equal(dterminal.length, 1, "one failure on the destination");
      assert.equal(dterminal[0]?.event, "failed");
      assertValid(src);
      assertValid(dst);
    } finally {
      await src.kill();
    }
  } finally {
    await dst.kill();
  }
});

test("the source's progress is not redrawn into a pipe: no carriage returns on stderr", async () => {
  const dst = new CliProcess(["migrate", "--listen", "tcp:127.0.0.1:0", "--size", "16"]);
  try {
    const deadline = Date.now() + 10_000;
    while (!/listening on (tcp:\S+)/.test(dst.stderr) && Date.now() < deadline)
      await new Promise((r) => setTimeout(r, 20));
    const ep = /listening on (tcp:\S+)/.exec(dst.stderr)?.[1] as string;
    const r = await runCli(["migrate", "--to", ep, "--size", "16", "--log-level", "debug"], 60_000);
    assert.equal(r.code, 0, r.stderr);
    assert.doesNotMatch(r.stderr, /\r/);
    assert.match(r.stderr, /INFO {2}migrate: source: done in [\d.]+ ms, \d+ rounds?, /);
    assert.doesNotMatch(r.stderr, /\b1 rounds\b/);
    assert.equal((await dst.exited).code, 0);
  } finally {
    await dst.kill();
  }
});

test("--listen tcp::PORT listens on every interface (as QEMU means it) and says which address it bound", async () => {
  // Every interface is beyond loopback: plain needs --insecure (TLS is tested in test/migration/tls).
  const dst = new CliProcess(["migrate", "--listen", "tcp::0", "--size", "16", "--json", "--insecure"]);
  try {
    const ep = await listening(dst);
    const m = /^tcp:(\[::\]|0\.0\.0\.0):(\d+)$/.exec(ep);
    assert.ok(m, `every interface, the real port: ${ep}`);
    // Reachable over loopback like any other address of the machine.
    const src = await runCli(["migrate", "--to", `tcp:127.0.0.1:${m[2]}`, "--size", "16", "--json"], 60_000);
    assert.equal(src.code, 0, src.stderr);
    assert.equal((await dst.exited).code, 0, dst.stderr);
  } finally {
    await dst.kill();
  }
});
