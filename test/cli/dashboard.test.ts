/**
 * The live dashboard in a real browser: `vmshift demo --dashboard tcp:127.0.0.1:0
 * --dashboard-wait` waits for headless Chromium (Debian's, driven by playwright-core) to open
 * the page, then migrates; the page must go through the phases to `complete` on its root
 * element's data-phase, draw a heat-map row per round, show the final report, and still be
 * served after the migration, until SIGINT. A screenshot is saved and checked (not blank). The
 * same run serves Prometheus metrics of the migration.
 */
import assert from "node:assert/strict";
import { existsSync, mkdirSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { test } from "node:test";
import { inflateSync } from "node:zlib";
import { chromium } from "playwright-core";
import { CliProcess, eventValidator, REPO } from "./helpers.js";

const CHROMIUM = ["/usr/bin/chromium", "/usr/bin/chromium-browser"].find((p) => existsSync(p));
if (!CHROMIUM)
  process.stderr.write(
    "\n*** SKIPPING test/cli/dashboard.test.ts: no Chromium (apt-get install chromium; scripts/install-debian.sh does) ***\n\n",
  );

/** Distinct RGB colours in an 8-bit RGB/RGBA PNG (a blank page has one or two). */
function pngColours(png: Buffer): number {
  assert.equal(png.subarray(1, 4).toString(), "PNG");
  let off = 8;
  let width = 0;
  let colourType = 0;
  const idat: Buffer[] = [];
  while (off < png.length) {
    const len = png.readUInt32BE(off);
    const type = png.subarray(off + 4, off + 8).toString();
    const data = png.subarray(off + 8, off + 8 + len);
    if (type === "IHDR") {
      width = data.readUInt32BE(0);
      assert.equal(data[8], 8, "8-bit channels");
      colourType = data[9] as number;
    } else if (type === "IDAT") idat.push(data);
    off += 12 + len;
  }
  const bpp = colourType === 6 ? 4 : 3;
  const raw = inflateSync(Buffer.concat(idat));
  const stride = width * bpp + 1;
  const rows = raw.length / stride;
  const prev = Buffer.alloc(width * bpp);
  const colours = new Set<number>();
  // Undo the per-row filters (PNG spec 9.2) to read real pixel values.
  for (let y = 0; y < rows; y++) {
    const f = raw[y * stride] as number;
    const line = Buffer.from(raw.subarray(y * stride + 1, (y + 1) * stride));
    for (let i = 0; i < line.length; i++) {
      const a = i >= bpp ? (line[i - bpp] as number) : 0;
      const b = prev[i] as number;
      const c = i >= bpp ? (prev[i - bpp] as number) : 0;
      let add = 0;
      if (f === 1) add = a;
      else if (f === 2) add = b;
      else if (f === 3) add = (a + b) >> 1;
      else if (f === 4) {
        const p = a + b - c;
        const pa = Math.abs(p - a);
        const pb = Math.abs(p - b);
        const pc = Math.abs(p - c);
        add = pa <= pb && pa <= pc ? a : pb <= pc ? b : c;
      }
      line[i] = ((line[i] as number) + add) & 0xff;
    }
    line.copy(prev);
    for (let x = 0; x < width; x += 3) {
      const i = x * bpp;
      colours.add(((line[i] as number) << 16) | ((line[i + 1] as number) << 8) | (line[i + 2] as number));
    }
  }
  return colours.size;
}

test("Chromium sees the dashboard go through the phases to complete; it stays up until SIGINT", {
  skip: CHROMIUM ? false : "no Chromium",
}, async () => {
  const demo = new CliProcess([
    "demo",
    "--json",
    "--size",
    "64",
    "--dirty-rate",
    "64",
    "--bandwidth",
    "100",
    "--dashboard",
    "tcp:127.0.0.1:0",
    "--dashboard-wait",
    "--metrics",
    "tcp:127.0.0.1:0",
  ]);
  const browser = await chromium.launch({ executablePath: CHROMIUM, headless: true, args: ["--no-sandbox"] });
  try {
    const { url } = (await demo.next((e) => e.event === "dashboard", "the dashboard event")) as { url: string };
    const metricsUrl = ((await demo.next((e) => e.event === "metrics", "the metrics event")) as { url: string }).url;
    assert.match(url, /^http:\/\/127\.0\.0\.1:\d+$/, "the address actually bound, port 0 resolved");
    const page = await browser.newPage({ viewport: { width: 1280, height: 900 } });
    await page.goto(url);
    // The demo waited for this page: nothing had migrated before the browser was there.
    await demo.next((e) => e.event === "start", "start");
    await page.waitForSelector("html[data-phase=complete]", { timeout: 60_000 });
    await page.waitForFunction(`document.querySelector("#final").textContent.includes("demo verified")`, null, {
      timeout: 30_000,
    });
    // Every value the page gave data-phase, in order (the page keeps them as it sets them).
    const phases = (await page.evaluate("window.vmshift.phases")) as string[];
    const at = (p: string) => phases.indexOf(p);
    assert.ok(at("setup") >= 0 && at("precopy") > at("setup"), `setup then precopy: ${phases.join(" > ")}`);
    assert.ok(at("switchover") > at("precopy"), `switchover after precopy: ${phases.join(" > ")}`);
    assert.equal(phases.at(-1), "complete", phases.join(" > "));
    const rounds = demo.events.filter((e) => e.event === "round").length;
    assert.ok(rounds >= 1);
    const heatRows = await page.evaluate(`document.getElementById("heat").height`);
    assert.equal(heatRows, rounds, "one heat-map row per round");
    const finalText = (await page.textContent("#final")) ?? "";
    assert.match(finalText, /verifiedtrue/);
    assert.match(finalText, /digestsmatch/);

    const png = await page.screenshot({ fullPage: true });
    const dir = join(REPO, ".tmp", "test-output");
    mkdirSync(dir, { recursive: true });
    writeFileSync(join(dir, "dashboard.png"), png);
    const colours = pngColours(png);
    assert.ok(colours > 20, `the screenshot is not blank (${colours} colours); saved in ${dir}/dashboard.png`);

    // The run is over, the page is still served, and /state answers like query-migrate.
    await demo.next((e) => e.event === "summary", "summary");
    const state = (await (await fetch(`${url}/state`)).json()) as Record<string, { status: string }>;
    assert.equal(state.source?.status, "completed");
    const metrics = await (await fetch(metricsUrl)).text();
    assert.match(metrics, /^vmshift_migration_status\{status="completed"\} 1$/m);
    const sent = /^vmshift_migration_ram_transferred_bytes (\d+)$/m.exec(metrics);
    assert.ok(sent && Number(sent[1]) >= 64 * 2 ** 20, `transferred bytes: ${sent?.[1]}`);
    assert.match(metrics, /^vmshift_migration_rounds \d+$/m);
    assert.equal((await fetch(url)).status, 200, "still served after the migration");

    const validate = eventValidator();
    for (const e of demo.events) assert.deepEqual(validate(e), [], JSON.stringify(e).slice(0, 300));

    demo.child.kill("SIGINT");
    const { code } = await demo.exited;
    assert.equal(code, 0, `a verified run stopped by SIGINT afterwards exits 0: ${demo.stderr}`);
    await assert.rejects(fetch(url), "the dashboard is gone once the command exited");
  } finally {
    await browser.close();
    await demo.kill();
  }
});

test("postcopy on the dashboard: the remote-fault latency histogram is drawn from the destination's events", {
  skip: CHROMIUM ? false : "no Chromium",
}, async () => {
  const demo = new CliProcess([
    "demo",
    "--json",
    "--size",
    "32",
    "--mode",
    "postcopy",
    "--dashboard",
    "tcp:127.0.0.1:0",
  ]);
  const browser = await chromium.launch({ executablePath: CHROMIUM, headless: true, args: ["--no-sandbox"] });
  try {
    const { url } = (await demo.next((e) => e.event === "dashboard", "the dashboard event")) as { url: string };
    // A browser that comes late still sees the whole run (the event stream replays it).
    const summary = await demo.next((e) => e.event === "summary", "summary");
    assert.equal(summary.verified, true);
    const faults = demo.events.filter((e) => e.event === "faults");
    assert.ok(faults.length > 0, "the destination reported remote faults");
    const page = await browser.newPage();
    await page.goto(url);
    await page.waitForSelector("html[data-phase=complete]", { timeout: 30_000 });
    assert.equal(await page.locator("#faults rect").count(), 12, "one bar per latency bucket");
    assert.match((await page.textContent("#faultsum")) ?? "", /\d+ remote faults, median [\d.]+ µs/);
    demo.child.kill("SIGINT");
    assert.equal((await demo.exited).code, 0, demo.stderr);
  } finally {
    await browser.close();
    await demo.kill();
  }
});
