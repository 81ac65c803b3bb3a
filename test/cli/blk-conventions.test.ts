/**
 * `vmshift blk` and `vmshift-blk` against the vhost-user spec's "Backend program conventions"
 * and QEMU's vhost-user.json (issue 13, item 1): --print-capabilities whatever else is on the
 * command line, the JSON descriptor, and the program it names serving with the spec's options.
 */
import assert from "node:assert/strict";
import { type ChildProcess, execFile, spawn } from "node:child_process";
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { isAbsolute, join } from "node:path";
import { after, test } from "node:test";
import { fileURLToPath } from "node:url";
import { promisify } from "node:util";
import { probe } from "../../src/cli/probe.js";
import { capabilitiesErrors, descriptorErrors } from "./vhost-user-schema.js";

const run = promisify(execFile);
const MAIN = fileURLToPath(new URL("../../src/cli/main.js", import.meta.url));
const dir = mkdtempSync(join(tmpdir(), "vmshift-blk-conv-"));
after(() => rmSync(dir, { recursive: true, force: true }));

test("the schema check can fail: the old capabilities object is not a VHostUserBackendCapabilities", () => {
  assert.deepEqual(capabilitiesErrors({ type: "block-device", features: ["read-only", "blk-file"] }), [
    'type: "block-device" is not a VHostUserBackendType',
  ]);
  assert.ok(capabilitiesErrors({ type: "block", features: ["read-only", "fast"] }).length > 0);
  assert.ok(descriptorErrors({ type: "block", binary: "/x" }).length > 0, "description is required");
});

test("--print-capabilities prints a valid VHostUserBackendCapabilities and exits 0 whatever else is given", async () => {
  for (const extra of [[], ["--image", "/nonexistent", "--queues", "x"], ["--bogus", "--socket-path"]]) {
    const { stdout } = await run(process.execPath, [MAIN, "blk", ...extra, "--print-capabilities"]);
    const caps = JSON.parse(stdout);
    assert.deepEqual(caps, { type: "block", features: ["read-only", "blk-file"] });
    assert.deepEqual(capabilitiesErrors(caps), [], `with ${extra.join(" ")}`);
  }
});

test("--write-descriptor writes 50-vmshift-blk.json; its binary answers --print-capabilities and serves --socket-path/--blk-file/--read-only", async () => {
  const vu = join(dir, "qemu", "vhost-user");
  const { stdout } = await run(process.execPath, [MAIN, "blk", "--write-descriptor", vu]);
  const file = join(vu, "50-vmshift-blk.json");
  assert.equal(stdout.trim(), file);
  const d = JSON.parse(readFileSync(file, "utf8"));
  assert.deepEqual(descriptorErrors(d), []);
  assert.equal(d.type, "block");
  assert.ok(isAbsolute(d.binary));
  // Management software runs the binary itself (no node in front of it).
  const caps = await run(d.binary, ["--print-capabilities", "--fd", "3"]);
  assert.deepEqual(capabilitiesErrors(JSON.parse(caps.stdout)), []);

  const image = join(dir, "disk.img");
  writeFileSync(image, new Uint8Array(1 << 20));
  const sock = join(dir, "blk.sock");
  const child: ChildProcess = spawn(d.binary, ["--socket-path", sock, "--blk-file", image, "--read-only"], {
    stdio: ["ignore", "ignore", "pipe"],
  });
  try {
    // Ready when it says so on stderr (it listens before it logs "serving").
    await new Promise<void>((resolve, reject) => {
      let err = "";
      child.stderr?.on("data", (b: Buffer) => {
        err += b.toString();
        if (err.includes("serving")) resolve();
      });
      child.on("exit", (code) => reject(new Error(`vmshift-blk exited ${code}: ${err}`)));
    });
    assert.ok(existsSync(sock));
    const r = await probe(sock, { timeoutMs: 5000 });
    assert.ok((r.features >> 5n) & 1n, "VIRTIO_BLK_F_RO offered (--read-only)");
    assert.ok((r.config?.length ?? 0) >= 60, "the config space is read");
  } finally {
    const exited = new Promise<number | null>((resolve) => child.on("exit", (code) => resolve(code)));
    child.kill("SIGTERM");
    assert.equal(await exited, 0);
  }
});

test("`vmshift fs --print-capabilities` too: type fs, exit 0 whatever else is given", async () => {
  for (const extra of [[], ["--shared-dir"], ["--bogus", "--cache", "sometimes"]]) {
    const { stdout } = await run(process.execPath, [MAIN, "fs", ...extra, "--print-capabilities"]);
    const caps = JSON.parse(stdout);
    assert.equal(caps.type, "fs", `with ${extra.join(" ")}`);
    assert.deepEqual(caps.features, ["migrate-precopy"]);
  }
});
