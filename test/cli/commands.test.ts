/**
 * Every command as an operator meets it: `--help` exits 0 with the usage on stdout; bad input
 * exits 2 with one line on stderr and no stack trace; a reader that goes away (`| head`) is
 * not a crash; SIGINT cancels with a `cancelled` event and exit 130.
 */
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { existsSync, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { test } from "node:test";
import { assertNoStack, CliProcess, eventValidator, MAIN, runCli } from "./helpers.js";

const COMMANDS = ["demo", "migrate", "snapshot", "probe", "blk"];

for (const cmd of COMMANDS) {
  for (const flag of ["--help", "-h"]) {
    test(`vmshift ${cmd} ${flag}: the usage on stdout, exit 0`, async () => {
      const r = await runCli([cmd, flag], 20_000);
      assert.equal(r.code, 0, r.stderr);
      assert.match(r.stdout, /^usage:/);
      assert.match(r.stdout, /--log-level/, "the common options are listed");
      assert.equal(r.stderr, "");
    });
  }
}

test("vmshift --help, -h, help and help COMMAND exit 0; help BOGUS and an unknown command exit 2", async () => {
  for (const args of [["--help"], ["-h"], ["help"], []]) {
    const r = await runCli(args, 20_000);
    assert.equal(r.code, 0, `${args.join(" ")}: ${r.stderr}`);
    assert.match(r.stdout, /^usage: vmshift <command>/, args.join(" "));
  }
  const h = await runCli(["help", "migrate"], 20_000);
  assert.equal(h.code, 0);
  assert.match(h.stdout, /vmshift migrate --listen/);
  for (const args of [["help", "bogus"], ["bogus"], ["--bogus"]]) {
    const r = await runCli(args, 20_000);
    assert.equal(r.code, 2, args.join(" "));
    assert.equal(r.stderr.trim().split("\n").length, 1, `one line: ${r.stderr}`);
  }
});

test("vmshift --version prints the package version, exit 0", async () => {
  const r = await runCli(["--version"], 20_000);
  assert.equal(r.code, 0, r.stderr);
  assert.match(r.stdout.trim(), /\d+\.\d+\.\d+/);
});

const BAD: [string[], RegExp][] = [
  [["demo", "--size", "abc"], /--size must be an integer 16\.\.4096/],
  [["demo", "--mode", "sideways"], /--mode must be precopy or postcopy/],
  [["demo", "--vcpus", "0"], /--vcpus must be an integer 1\.\.8/],
  [["demo", "--dirty-rate", "-5"], /--dirty-rate must be a number >= 0/],
  [["demo", "--dashboard", "localhost"], /--dashboard must be tcp:HOST:PORT/],
  [["demo", "--bogus"], /unknown option --bogus/],
  [["snapshot"], /save or restore\?/],
  [["snapshot", "save"], /--file PATH is required/],
  [["snapshot", "load", "--file", "x"], /unknown action 'load'/],
  [["snapshot", "save", "--file", "x", "--size", "0"], /--size must be an integer 1\.\.4096/],
  [["probe"], /--socket PATH is required/],
  [["probe", "--socket", "/x", "--timeout", "soon"], /--timeout must be an integer/],
  [["probe", "--socket", "/x", "--device", "net"], /--device must be blk/],
  [["migrate"], /give exactly one of --listen or --to/],
  [["migrate", "--to", "tcp:127.0.0.1:1", "--size", "abc"], /--size must be an integer/],
  [["migrate", "--to", "tcp:127.0.0.1:1", "--pattern", "x"], /--pattern must be sequential, random or hotset/],
  [["migrate", "--to", "tcp:127.0.0.1:1", "--mode", "foo"], /--mode must be precopy or postcopy/],
  [["migrate", "--to", "tcp:127.0.0.1:1", "--rate", "-1"], /--rate must be/],
  [["migrate", "--to", "tcp:127.0.0.1:1", "--threads", "0"], /--threads must be/],
  [["migrate", "--to", "tcp:127.0.0.1:1", "--downtime", "x"], /--downtime must be/],
  [["migrate", "--to", "tcp:127.0.0.1:1", "--max-rounds", "0"], /--max-rounds must be/],
  [["migrate", "--to", "tcp:127.0.0.1:1", "--bandwidth", "-3"], /--bandwidth must be/],
  [["migrate", "--to", "nowhere"], /--to: endpoint nowhere: expected tcp:HOST:PORT, unix:PATH or fd:N/],
  [["migrate", "--listen", "tcp:h:99999"], /--listen: bad port/],
  [["blk", "--socket-path", "/tmp/x.sock"], /--image FILE is required/],
  [["blk", "--socket-path", "/tmp/x.sock", "--image", "/x", "--queues", "0"], /--queues must be/],
  [["blk", "--socket-path", "/tmp/x.sock", "--image", "/x", "--queue-workers", "0"], /--queue-workers must be/],
  [
    ["blk", "--socket-path", "/tmp/x.sock", "--image", "/x", "--io", "fast"],
    /--io must be auto, sync, async or adaptive/,
  ],
  [["blk", "--socket-path", "/tmp/x.sock", "--image", "/x", "--metrics", "9100"], /--metrics must be tcp:HOST:PORT/],
];

for (const [args, message] of BAD) {
  test(`vmshift ${args.join(" ")}: exit 2, one line, no stack trace`, async () => {
    const r = await runCli(args, 20_000);
    assert.equal(r.code, 2, `exit code (stderr: ${r.stderr})`);
    assert.match(r.stderr, message);
    assert.equal(r.stderr.trimEnd().split("\n").length, 1, `one line: ${r.stderr}`);
    assert.equal(assertNoStack(r.stderr), null, r.stderr);
    assert.equal(r.stdout, "");
  });
}

test("a reader that goes away (`vmshift ... | head -0`) is not a crash: no EPIPE stack, exit 0", async () => {
  for (const args of [
    ["demo", "--memory-only", "--json", "--size", "16"],
    ["snapshot", "--help"],
  ]) {
    const child = spawn(process.execPath, [MAIN, ...args], { stdio: ["ignore", "pipe", "pipe"] });
    // Close our end of stdout before the child can write anything: every write it makes fails.
    child.stdout.destroy();
    let stderr = "";
    child.stderr.on("data", (d: Buffer) => {
      stderr += d.toString();
    });
    const code = await new Promise<number | null>((r) => child.once("exit", (c) => r(c)));
    assert.equal(assertNoStack(stderr), null, stderr);
    assert.doesNotMatch(stderr, /EPIPE/);
    assert.equal(code, 0, `${args.join(" ")}: ${stderr}`);
  }
});

test("SIGINT while the demo waits for its dashboard: a cancelled event, exit 130", async () => {
  const p = new CliProcess(["demo", "--json", "--dashboard", "tcp:127.0.0.1:0", "--dashboard-wait"]);
  try {
    await p.next((e) => e.event === "dashboard", "dashboard");
    p.child.kill("SIGINT");
    const { code } = await p.exited;
    assert.equal(code, 130, p.stderr);
    const last = p.events.at(-1);
    assert.equal(last?.event, "cancelled");
    assert.match(String(last?.reason), /SIGINT/);
  } finally {
    await p.kill();
  }
});

test("SIGINT in the middle of a demo migration: one cancelled event (no failed), status cancelled, exit 130", async () => {
  // 64 MiB at 5 MB/s: the first round alone takes over ten seconds.
  const p = new CliProcess(["demo", "--json", "--size", "64", "--bandwidth", "5"]);
  try {
    await p.next((e) => e.event === "phase" && e.role === "source" && e.phase === "precopy", "precopy");
    p.child.kill("SIGINT");
    const { code } = await p.exited;
    assert.equal(code, 130, p.stderr);
    const terminal = p.events.filter((e) => ["cancelled", "failed", "complete", "summary"].includes(String(e.event)));
    assert.deepEqual(
      terminal.map((e) => `${String(e.event)}:${String(e.role)}`),
      ["cancelled:source"],
      "exactly one terminal event",
    );
    const info = terminal[0]?.info as { status: string; ram: { transferredBytes: number } };
    assert.equal(info.status, "cancelled");
    assert.ok(info.ram.transferredBytes > 0, "it had started sending");
    const validate = eventValidator();
    for (const e of p.events) assert.deepEqual(validate(e), [], JSON.stringify(e).slice(0, 200));
    assert.equal(assertNoStack(p.stderr), null, p.stderr);
  } finally {
    await p.kill();
  }
});

test("snapshot save then restore --json: versioned events, valid against the schema", async () => {
  const dir = mkdtempSync(join(tmpdir(), "vmshift-cli-"));
  try {
    const file = join(dir, "snap.bin");
    const s = await runCli(["snapshot", "save", "--file", file, "--size", "16", "--json"], 60_000);
    assert.equal(s.code, 0, s.stderr);
    const r = await runCli(["snapshot", "restore", "--file", file, "--size", "16", "--json"], 60_000);
    assert.equal(r.code, 0, r.stderr);
    const validate = eventValidator();
    const saved = JSON.parse(s.stdout) as Record<string, unknown>;
    const restored = JSON.parse(r.stdout) as Record<string, unknown>;
    assert.deepEqual(validate(saved), []);
    assert.deepEqual(validate(restored), []);
    assert.equal(saved.event, "snapshot");
    assert.equal(restored.event, "restore");
    assert.equal(restored.verified, true);
    const missing = await runCli(["snapshot", "restore", "--file", join(dir, "none"), "--json"], 20_000);
    assert.equal(missing.code, 1);
    const failed = JSON.parse(missing.stdout) as Record<string, unknown>;
    assert.deepEqual(validate(failed), []);
    assert.equal(failed.event, "failed");
    assert.equal(assertNoStack(missing.stderr), null, missing.stderr);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test("`vmshift probe | head -1` against a running vmshift blk: no EPIPE stack, exit 0; blk stops on SIGINT", async () => {
  const dir = mkdtempSync(join(tmpdir(), "vmshift-cli-"));
  const image = join(dir, "disk.img");
  writeFileSync(image, Buffer.alloc(1 << 20));
  const sock = join(dir, "blk.sock");
  const blk = new CliProcess(["blk", "--socket-path", sock, "--image", image]);
  try {
    const deadline = Date.now() + 10_000;
    while (!blk.stderr.includes("serving") && Date.now() < deadline) await new Promise((r) => setTimeout(r, 20));
    assert.match(blk.stderr, /^\S+Z INFO {2}blk: serving /m, "a timestamped, levelled log line");
    const child = spawn(process.execPath, [MAIN, "probe", "--socket", sock, "--device", "blk"], {
      stdio: ["ignore", "pipe", "pipe"],
    });
    // Read one line, then go away, as `head -1` does.
    const first = await new Promise<string>((resolve) => {
      child.stdout.once("data", (d: Buffer) => {
        resolve(d.toString().split("\n")[0] as string);
        child.stdout.destroy();
      });
    });
    let stderr = "";
    child.stderr.on("data", (d: Buffer) => {
      stderr += d.toString();
    });
    const code = await new Promise<number | null>((r) => child.once("exit", (c) => r(c)));
    assert.match(first, /^socket /);
    assert.equal(assertNoStack(stderr), null, stderr);
    assert.equal(code, 0, stderr);
    blk.child.kill("SIGINT");
    assert.equal((await blk.exited).code, 0, blk.stderr);
    assert.match(blk.stderr, /INFO {2}blk: stopped/);
  } finally {
    await blk.kill();
    rmSync(dir, { recursive: true, force: true });
  }
});

test("progress is redrawn in place on a terminal only (script(1) gives the demo a TTY)", {
  skip: existsSync("/usr/bin/script") ? false : "no script(1)",
}, async () => {
  const tty = await new Promise<string>((resolve) => {
    const child = spawn("/usr/bin/script", ["-qec", `${process.execPath} ${MAIN} demo --size 16`, "/dev/null"], {
      stdio: ["ignore", "pipe", "pipe"],
    });
    let out = "";
    child.stdout.on("data", (d: Buffer) => {
      out += d.toString();
    });
    child.once("exit", () => resolve(out));
  });
  // Carriage return, then ESC [2K (erase the line), then the progress line.
  const redraw = new RegExp(`\r${String.fromCharCode(27)}\\[2K(precopy|switchover|setup) +round`);
  assert.match(tty, redraw, "a redrawn progress line on the terminal");
  assert.match(tty, /verified/);
  const piped = await runCli(["demo", "--size", "16"], 60_000);
  assert.equal(piped.code, 0, piped.stderr);
  assert.doesNotMatch(piped.stdout + piped.stderr, /\r/, "no carriage return into a pipe");
  assert.doesNotMatch(piped.stdout, /\b1 rounds\b/);
});
