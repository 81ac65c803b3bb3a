/**
 * issue 12, item 5, as the operator meets it: `vmshift blk --socket-path P` refuses a regular
 * file at P (exit 1, the file intact) and a live back-end's socket (exit 1, the first back-end
 * still reachable at P, also after the second one exited), and honours --socket-mode /
 * --socket-group (default 0600).
 */
import assert from "node:assert/strict";
import { type ChildProcess, spawn } from "node:child_process";
import { once } from "node:events";
import { lstatSync, mkdtempSync, readFileSync, rmSync, statSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, test } from "node:test";
import { VhostUserFrontend } from "../../src/vhost-user/frontend/frontend.js";

const dir = mkdtempSync(join(tmpdir(), "vmshift-blk-sock-"));
after(() => rmSync(dir, { recursive: true, force: true }));
const image = join(dir, "disk.img");
writeFileSync(image, Buffer.alloc(1 << 20));
const blkMain = new URL("../../src/cli/blk-main.js", import.meta.url).pathname;

interface Blk {
  child: ChildProcess;
  stderr: () => string;
  exited: Promise<number | null>;
}

function blk(...args: string[]): Blk {
  const child = spawn(process.execPath, [blkMain, "--image", image, ...args], { stdio: ["ignore", "ignore", "pipe"] });
  let err = "";
  child.stderr?.setEncoding("utf8").on("data", (d: string) => {
    err += d;
  });
  const exited = once(child, "exit").then(([c]) => c as number | null);
  return { child, stderr: () => err, exited };
}

/** Resolves once the back-end says it serves (or rejects if it exits first). */
async function serving(b: Blk): Promise<void> {
  while (!/serving /.test(b.stderr())) {
    const r = await Promise.race([once(b.child.stderr as NodeJS.ReadableStream, "data"), b.exited]);
    if (typeof r === "number" || r === null) throw new Error(`blk exited (${r}): ${b.stderr()}`);
  }
}

/** How a back-end that should refuse to start ends: its exit code, or "serving" (it took the path). */
async function refusal(b: Blk): Promise<number | null | "serving"> {
  try {
    await serving(b);
  } catch {
    return b.exited;
  }
  await stop(b);
  return "serving";
}

async function stop(b: Blk): Promise<number | null> {
  if (b.child.exitCode === null) b.child.kill("SIGTERM");
  return b.exited;
}

test("a regular file at --socket-path: exit 1, the file intact", async () => {
  const path = join(dir, "file.sock");
  writeFileSync(path, "precious data");
  const b = blk("--socket-path", path);
  assert.equal(await refusal(b), 1, b.stderr());
  assert.match(b.stderr(), /not a socket/);
  assert.equal(readFileSync(path, "utf8"), "precious data");
});

test("a live back-end's socket: the second back-end exits 1, the first stays reachable", async () => {
  const path = join(dir, "live.sock");
  const first = blk("--socket-path", path);
  try {
    await serving(first);
    const ino = lstatSync(path).ino;
    const second = blk("--socket-path", path);
    assert.equal(await refusal(second), 1, second.stderr());
    assert.match(second.stderr(), /live socket/);
    assert.equal(lstatSync(path).ino, ino, "the socket at the path is still the first back-end's");
    const fe = VhostUserFrontend.connect(path, { timeoutMs: 10_000 });
    try {
      const n = await fe.negotiate();
      assert.ok(n.features > 0n, "the first back-end answers");
    } finally {
      fe.close();
    }
  } finally {
    assert.equal(await stop(first), 0, first.stderr());
  }
  assert.throws(() => lstatSync(path), /ENOENT/, "the first back-end removed its socket on exit");
});

test("--socket-mode and --socket-group; 0600 by default", async () => {
  const a = join(dir, "default.sock");
  const b1 = blk("--socket-path", a);
  try {
    await serving(b1);
    assert.equal(statSync(a).mode & 0o777, 0o600);
  } finally {
    await stop(b1);
  }
  const b = join(dir, "shared.sock");
  const gid = process.getgid?.() ?? 0;
  const b2 = blk("--socket-path", b, "--socket-mode", "0660", "--socket-group", String(gid));
  try {
    await serving(b2);
    assert.equal(statSync(b).mode & 0o777, 0o660);
    assert.equal(statSync(b).gid, gid);
  } finally {
    await stop(b2);
  }
  const bad = blk("--socket-path", join(dir, "bad.sock"), "--socket-mode", "rwx");
  assert.equal(await bad.exited, 2, "a bad mode is a usage error");
});
