/** The CLI's logger: levels, text and JSON formats, timestamps. */
import assert from "node:assert/strict";
import { test } from "node:test";
import { createLogger, textLine } from "../../src/cli/log.js";

test("text format: ISO time, level, command, message, fields as key=value; below the level: nothing", () => {
  const lines: string[] = [];
  const log = createLogger({ name: "blk", level: "info", format: "text", write: (l) => lines.push(l) });
  log.debug("hidden");
  log.info({ queue: 0, image: "/tmp/disk img" }, "serving");
  log.warn("careful");
  assert.equal(lines.length, 2);
  assert.match(
    lines[0] as string,
    /^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z INFO {2}blk: serving queue=0 image="\/tmp\/disk img"\n$/,
  );
  assert.match(lines[1] as string, / WARN {2}blk: careful\n$/);
});

test("json format: one parseable object per line with time, level and name", () => {
  const lines: string[] = [];
  const log = createLogger({ name: "migrate", level: "debug", format: "json", write: (l) => lines.push(l) });
  log.debug({ round: 3 }, "synced");
  const o = JSON.parse(lines[0] as string) as Record<string, unknown>;
  assert.equal(o.level, 20);
  assert.equal(o.name, "migrate");
  assert.equal(o.msg, "synced");
  assert.equal(o.round, 3);
  assert.match(String(o.time), /^\d{4}-\d\d-\d\dT/);
});

test("silent logs nothing; a non-JSON line passes through textLine unchanged", () => {
  const lines: string[] = [];
  const log = createLogger({ name: "x", level: "silent", write: (l) => lines.push(l) });
  log.error("nope");
  assert.equal(lines.length, 0);
  assert.equal(textLine("not json"), "not json");
});
