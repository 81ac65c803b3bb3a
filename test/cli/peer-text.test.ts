/**
 * issue 12, item 7: a migration peer's FAIL text reaches the operator's terminal escaped and
 * bounded. A fake destination answers `vmshift migrate --to` with a FAIL record whose code and
 * message carry escape sequences (clear screen, a window title, a C1 CSI, a bidi override) and
 * 8 MiB of text: stderr gets none of those bytes and a few KiB at most; --json stays valid JSON
 * without them.
 */
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { once } from "node:events";
import { mkdtempSync, rmSync } from "node:fs";
import { createServer } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, test } from "node:test";
import { encodeRecord, RecordType } from "../../src/migration/format.js";

const dir = mkdtempSync(join(tmpdir(), "vmshift-peer-text-"));
after(() => rmSync(dir, { recursive: true, force: true }));
const main = new URL("../../src/cli/main.js", import.meta.url).pathname;

const HOSTILE_CODE = "X\x1b[2J";
const HOSTILE = `\x1b]0;owned\x07\x1b[31mred\u009b2J\u202eevil\r${"A".repeat(8 << 20)}`;

function failRecord(code: string, message: string): Buffer {
  const c = Buffer.from(code);
  const m = Buffer.from(message);
  const payload = Buffer.alloc(2 + c.length + m.length);
  payload.writeUInt16LE(c.length, 0);
  c.copy(payload, 2);
  m.copy(payload, 2 + c.length);
  return encodeRecord(RecordType.Fail, payload);
}

/** Runs `vmshift migrate --to unix:...` against a destination that only says FAIL. */
async function migrateAgainstHostilePeer(json: boolean): Promise<{ code: number | null; out: Buffer; err: Buffer }> {
  const path = join(dir, `dest-${json}.sock`);
  const server = createServer((s) => {
    s.on("error", () => undefined);
    s.resume(); // drain what the source sends
    s.write(failRecord(HOSTILE_CODE, HOSTILE));
  });
  server.listen(path);
  await once(server, "listening");
  try {
    const child = spawn(
      process.execPath,
      [main, "migrate", "--to", `unix:${path}`, "--size", "8", ...(json ? ["--json"] : [])],
      { stdio: ["ignore", "pipe", "pipe"] },
    );
    const out: Buffer[] = [];
    const err: Buffer[] = [];
    child.stdout.on("data", (d: Buffer) => out.push(d));
    child.stderr.on("data", (d: Buffer) => err.push(d));
    const [code] = (await once(child, "close")) as [number | null];
    return { code, out: Buffer.concat(out), err: Buffer.concat(err) };
  } finally {
    server.close();
  }
}

const RAW = [0x1b, 0x07];
const rawIn = (b: Buffer) => RAW.filter((c) => b.includes(c));

test("a destination's FAIL text with escape sequences and 8 MiB: escaped and bounded on stderr", async () => {
  const r = await migrateAgainstHostilePeer(false);
  assert.equal(r.code, 1, r.err.toString().slice(0, 500));
  const text = r.err.toString("utf8");
  assert.match(text, /PEER_FAILED/);
  assert.match(text, /\\x1b\]0;owned\\x07/, "the escape sequence is shown, escaped");
  assert.match(text, /evil\\x0dAAA/, "a carriage return from the peer cannot overwrite the line");
  assert.deepEqual(rawIn(r.err), [], "no raw ESC or BEL from the peer");
  assert.ok(!text.includes("\u009b") && !text.includes("\u202e"), "no raw C1 CSI or bidi override");
  assert.ok(r.err.length < 16 * 1024, `${r.err.length} bytes on stderr`);
});

test("--json: the same FAIL gives valid JSON lines without raw control characters", async () => {
  const r = await migrateAgainstHostilePeer(true);
  assert.equal(r.code, 1);
  const lines = r.out.toString("utf8").trim().split("\n");
  const last = JSON.parse(lines.at(-1) as string) as { event: string; code: string; message: string };
  assert.equal(last.event, "failed");
  assert.equal(last.code, "PEER_FAILED");
  assert.ok(last.message.includes("\x1b]0;owned"), "the text survives JSON, escaped on the wire");
  assert.deepEqual(rawIn(r.out), []);
  assert.ok(!r.out.toString("utf8").includes("\u009b"), "no raw C1 in the JSON");
  assert.ok(r.out.length < 64 * 1024, `${r.out.length} bytes on stdout`);
});
