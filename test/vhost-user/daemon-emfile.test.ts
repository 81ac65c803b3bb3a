/**
 * Issue 12, item 2's consequence: "at EMFILE the daemon's accept fails and it stops serving".
 * A daemon whose process has no fd left fails accept(2) with EMFILE; it must wait and take the
 * connection once fds are free, not stop.
 */
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { test } from "node:test";
import { fileURLToPath } from "node:url";
import { VhostUserFrontend } from "../../src/vhost-user/frontend/frontend.js";

const CHILD = fileURLToPath(new URL("../helpers/emfile-daemon.js", import.meta.url));

test("accept failing with EMFILE is retried: the waiting front-end is served once fds are free", async () => {
  const sock = join(tmpdir(), `vmshift-emfile-${process.pid}.sock`);
  const child = spawn("prlimit", ["--nofile=128:128", process.execPath, CHILD, sock], {
    stdio: ["ignore", "pipe", "inherit"],
  });
  const lines: string[] = [];
  const seen = (what: string) =>
    new Promise<void>((resolve, reject) => {
      const check = () => {
        if (lines.includes(what)) resolve();
      };
      child.stdout?.on("data", (b: Buffer) => {
        lines.push(...b.toString().split("\n").filter(Boolean));
        check();
      });
      child.once("exit", (code) => reject(new Error(`child exited ${code} before "${what}" (${lines.join(",")})`)));
      check();
    });
  try {
    await seen("exhausted");
    const fe = VhostUserFrontend.connect(sock, { timeoutMs: 10_000 });
    try {
      const features = await fe.getFeatures();
      assert.ok(features > 0n, "answered");
      assert.ok(lines.includes("retrying"), "the first accept failed with EMFILE");
      await seen("served");
    } finally {
      fe.close();
    }
  } finally {
    child.kill("SIGTERM");
  }
});
