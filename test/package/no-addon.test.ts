/**
 * What runs without the native addon (a machine where it cannot load: no prebuild fits, a Node
 * line without the Node-API it needs): `vmshift --help`, `--version`, `blk --print-capabilities`
 * and importing the package. VMSHIFT_NATIVE_PATH pointing nowhere makes the addon unloadable for
 * real. A command that needs the addon fails with the loader's reason, not a stack trace from import.
 */
import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import { readFileSync } from "node:fs";
import { test } from "node:test";
import { fileURLToPath } from "node:url";

const ROOT = fileURLToPath(new URL("../../../", import.meta.url));
const MAIN = fileURLToPath(new URL("../../src/cli/main.js", import.meta.url));
const INDEX = fileURLToPath(new URL("../../src/index.js", import.meta.url));
const VERSION = (JSON.parse(readFileSync(`${ROOT}package.json`, "utf8")) as { version: string }).version;

function run(args: string[], input?: string) {
  const r = spawnSync(process.execPath, args, {
    cwd: ROOT,
    encoding: "utf8",
    env: { ...process.env, VMSHIFT_NATIVE_PATH: "/nonexistent/vmshift.node" },
    input,
    timeout: 60_000,
  });
  return { status: r.status, stdout: r.stdout, stderr: r.stderr };
}

test("--version, --help, help blk and blk --print-capabilities need no addon", () => {
  const v = run([MAIN, "--version"]);
  assert.equal(v.status, 0, v.stderr);
  assert.equal(v.stdout, `vmshift ${VERSION}\n`);
  const h = run([MAIN, "--help"]);
  assert.equal(h.status, 0, h.stderr);
  assert.match(h.stdout, /^usage: vmshift <command>/);
  const hb = run([MAIN, "help", "blk"]);
  assert.equal(hb.status, 0, hb.stderr);
  assert.match(hb.stdout, /^usage: vmshift blk/);
  const c = run([MAIN, "blk", "--print-capabilities"]);
  assert.equal(c.status, 0, c.stderr);
  assert.deepEqual(JSON.parse(c.stdout), { type: "block", features: ["read-only", "blk-file"] });
});

test("importing the package loads nothing native; the first native call throws NativeLoadError", () => {
  const code = `
    const v = await import(${JSON.stringify(INDEX)});
    if (typeof v.GuestMemory !== "function" || typeof v.MigrationSource !== "function") throw new Error("exports");
    try { v.Mapping.anonymous(4096); console.log("loaded?!"); }
    catch (e) { console.log(e instanceof v.NativeLoadError, e.message.split("\\n")[0]); }`;
  const r = run(["--input-type=module", "-e", code]);
  assert.equal(r.status, 0, r.stderr);
  assert.match(r.stdout, /^true vmshift native addon could not be loaded on Node v\d+/);
  assert.match(r.stdout, /needs Node\.js \^24\.16\.0 or >=26\.1\.0/);
});

test("a command that needs the addon says why it cannot run", () => {
  const r = run([MAIN, "demo", "--memory-only", "--size", "16", "--rounds", "1"]);
  assert.notEqual(r.status, 0);
  assert.match(r.stderr, /vmshift native addon could not be loaded/);
});
