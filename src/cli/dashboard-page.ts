/**
 * The dashboard's page: one self-contained HTML document (no external resources), drawing
 * with inline SVG and a canvas. The root element carries the current phase as `data-phase`.
 */
export const DASHBOARD_PAGE = `<!doctype html>
<html lang="en" data-phase="connecting">
<head>
<meta charset="utf-8">
<title>vmshift migration</title>
<style>
  :root { color-scheme: light; --fg: #1d2330; --muted: #6b7385; --bw: #2a6fdb; --dirty: #d9480f; --ok: #2b8a3e; --bad: #c92a2a; }
  body { font: 14px/1.4 system-ui, sans-serif; margin: 0; color: var(--fg); background: #f6f7f9; }
  header { display: flex; gap: 1.5rem; align-items: baseline; padding: .8rem 1.2rem; background: #fff; border-bottom: 1px solid #dde1e8; }
  h1 { font-size: 1.1rem; margin: 0; }
  #phase { font-weight: 600; padding: .15rem .6rem; border-radius: 1rem; background: #e7ecf5; }
  html[data-phase="complete"] #phase { background: #d3f9d8; color: var(--ok); }
  html[data-phase="failed"] #phase, html[data-phase="cancelled"] #phase { background: #ffe3e3; color: var(--bad); }
  main { display: grid; grid-template-columns: repeat(auto-fit, minmax(420px, 1fr)); gap: 1rem; padding: 1rem 1.2rem; }
  section { background: #fff; border: 1px solid #dde1e8; border-radius: 6px; padding: .8rem 1rem; }
  h2 { font-size: .95rem; margin: 0 0 .5rem; }
  dl { display: grid; grid-template-columns: max-content 1fr; gap: .2rem 1rem; margin: 0; }
  dt { color: var(--muted); } dd { margin: 0; font-variant-numeric: tabular-nums; }
  svg { width: 100%; height: 180px; display: block; }
  canvas { width: 100%; image-rendering: pixelated; border: 1px solid #eee; }
  .legend span { margin-right: 1rem; } .sw { display: inline-block; width: .8rem; height: .8rem; vertical-align: middle; margin-right: .3rem; }
  #report { display: none; } html[data-phase="complete"] #report, html[data-phase="failed"] #report, html[data-phase="cancelled"] #report { display: block; }
  .muted { color: var(--muted); }
</style>
</head>
<body>
<header><h1>vmshift live migration</h1><span id="phase">connecting</span><span id="mode" class="muted"></span><span id="elapsed" class="muted"></span></header>
<main>
  <section><h2>Progress</h2><dl id="progress"></dl></section>
  <section><h2>Dirty rate against bandwidth, per round</h2><svg id="rates" viewBox="0 0 400 180" preserveAspectRatio="none"></svg>
    <div class="legend"><span><i class="sw" style="background:var(--bw)"></i>bandwidth</span><span><i class="sw" style="background:var(--dirty)"></i>dirty rate</span></div></section>
  <section><h2>Remaining and predicted downtime, per round</h2><svg id="remaining" viewBox="0 0 400 180" preserveAspectRatio="none"></svg>
    <div class="legend"><span><i class="sw" style="background:#7048e8"></i>remaining MiB</span><span><i class="sw" style="background:#0c8599"></i>predicted downtime ms</span></div></section>
  <section><h2>Dirty pages of guest memory, per round</h2><canvas id="heat" width="128" height="8"></canvas>
    <div class="muted">one row per round (first at the top), guest memory left to right; darker = more pages sent</div></section>
  <section><h2>Postcopy remote-fault latency</h2><svg id="faults" viewBox="0 0 400 180" preserveAspectRatio="none"></svg><div id="faultsum" class="muted">no remote faults (yet)</div></section>
  <section id="report"><h2>Final report</h2><dl id="final"></dl></section>
</main>
<script>
"use strict";
const BOUNDS = ["50", "100", "200", "500", "1k", "2k", "5k", "10k", "20k", "50k", "100k", ">100k"];
const st = { rounds: [], info: {}, faults: null, phases: [], final: null, mode: "" };
const $ = (id) => document.getElementById(id);
const MiB = (b) => (b / 1048576).toFixed(1) + " MiB";
const ms = (v) => (v === null || v === undefined ? "-" : v.toFixed(1) + " ms");
const esc = (s) => String(s).replace(/[&<>]/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;" })[c]);
function dl(el, rows) { el.innerHTML = rows.map(([k, v]) => "<dt>" + esc(k) + "</dt><dd>" + esc(v) + "</dd>").join(""); }
function setPhase(p) {
  document.documentElement.dataset.phase = p;
  $("phase").textContent = p;
  if (st.phases[st.phases.length - 1] !== p) st.phases.push(p);
}
function line(points, max, color) {
  if (points.length === 0) return "";
  const w = 400, h = 170, n = Math.max(points.length - 1, 1);
  const d = points.map((v, i) => (i ? "L" : "M") + ((i / n) * w).toFixed(1) + "," + (h - (v / max) * h + 5).toFixed(1)).join(" ");
  return '<path d="' + d + '" fill="none" stroke="' + color + '" stroke-width="2.5"/>' +
    points.map((v, i) => '<circle cx="' + ((i / n) * w).toFixed(1) + '" cy="' + (h - (v / max) * h + 5).toFixed(1) + '" r="3" fill="' + color + '"/>').join("");
}
function axis(label) { return '<text x="396" y="14" font-size="11" text-anchor="end" fill="#6b7385">' + esc(label) + "</text>"; }
function draw() {
  const i = st.info.source || st.info.destination || {};
  const ram = i.ram || {};
  dl($("progress"), [
    ["status", i.status || "-"], ["rounds", i.rounds ?? 0],
    ["transferred", ram.transferredBytes !== undefined ? MiB(ram.transferredBytes) + " of " + MiB(ram.totalBytes) : "-"],
    ["remaining", ram.remainingBytes === null || ram.remainingBytes === undefined ? "-" : MiB(ram.remainingBytes)],
    ["expected downtime", ms(i.expectedDowntimeMs)], ["dirty syncs", ram.dirtySyncCount ?? 0],
    ["bandwidth", (ram.mbps ?? 0) + " Mbit/s"], ["dirty rate", (ram.dirtyPagesRate ?? 0) + " pages/s"],
    ["writer stall", ms(i.writerStallMs)], ["sync cost", i.syncMsPerGiB === null || i.syncMsPerGiB === undefined ? "-" : i.syncMsPerGiB + " ms/GiB"],
    ["postcopy requests", ram.postcopyRequests ?? 0],
  ]);
  $("elapsed").textContent = i.totalTimeMs !== undefined ? (i.totalTimeMs / 1000).toFixed(1) + " s" : "";
  $("mode").textContent = i.mode || st.mode;
  const r = st.rounds;
  const rmax = Math.max(1, ...r.map((x) => Math.max(x.bandwidth, x.dirtyRate)));
  $("rates").innerHTML = axis("top: " + (rmax / 1e6).toFixed(0) + " MB/s") + line(r.map((x) => x.bandwidth), rmax, "var(--bw)") + line(r.map((x) => x.dirtyRate), rmax, "var(--dirty)");
  const remMax = Math.max(1, ...r.map((x) => x.remainingBytes / 1048576));
  const pdMax = Math.max(1, ...r.map((x) => x.predictedDowntimeMs || 0));
  $("remaining").innerHTML = axis("top: " + remMax.toFixed(1) + " MiB, " + pdMax.toFixed(0) + " ms") + line(r.map((x) => x.remainingBytes / 1048576), remMax, "#7048e8") + line(r.map((x) => x.predictedDowntimeMs || 0), pdMax, "#0c8599");
  const c = $("heat");
  const rows = Math.max(1, r.length);
  if (c.height !== rows) c.height = rows;
  c.style.height = Math.min(240, rows * 24) + "px";
  const g = c.getContext("2d");
  g.fillStyle = "#fff"; g.fillRect(0, 0, c.width, c.height);
  r.forEach((x, y) => {
    const heat = x.dirtyHeat || [];
    const max = Math.max(1, ...heat);
    heat.forEach((v, k) => {
      if (!v) return;
      const a = 0.15 + 0.85 * (v / max);
      g.fillStyle = "rgba(217,72,15," + a.toFixed(3) + ")";
      g.fillRect(k, y, 1, 1);
    });
  });
  const f = st.faults;
  if (f && f.latencyHistogram && f.latencyHistogram.length) {
    const h = f.latencyHistogram, max = Math.max(1, ...h), bw = 400 / h.length;
    $("faults").innerHTML = h.map((v, k) => '<rect x="' + (k * bw + 2).toFixed(1) + '" y="' + (160 - (v / max) * 150).toFixed(1) + '" width="' + (bw - 4).toFixed(1) + '" height="' + ((v / max) * 150).toFixed(1) + '" fill="#0c8599"/>' +
      '<text x="' + (k * bw + bw / 2).toFixed(1) + '" y="176" font-size="10" text-anchor="middle">' + BOUNDS[k] + '</text>').join("");
    $("faultsum").textContent = f.remoteFaults + " remote faults, median " + f.latencyMedianUs + " µs, p99 " + f.latencyP99Us + " µs (buckets: µs, upper bound)";
  }
  if (st.final) dl($("final"), st.final);
}
function onEvent(e) {
  if (e.info) st.info[e.role || "source"] = e.info;
  switch (e.event) {
    case "start": st.mode = e.mode; break;
    case "phase": if (e.role !== "destination" || !st.info.source) setPhase(e.phase); break;
    case "round": st.rounds.push(e.round); break;
    case "faults": st.faults = e.faults; break;
    case "complete":
      if (e.role === "destination" && e.result.verified === false) setPhase("failed");
      if (e.role === "source" || !st.info.source) {
        setPhase("complete");
        const i = e.info;
        st.final = [["verified", String(e.result.verified)], ["rounds", e.result.rounds], ["sent", MiB(i.ram.transferredBytes)],
          ["downtime", ms(i.downtimeMs)], ["setup time", ms(i.setupTimeMs)], ["total time", ms(i.totalTimeMs)],
          ["converged", String(e.result.converged)], ["digests", e.result.digests.map((d) => d.match ? "match" : "DIFFER").join(", ")]];
      }
      break;
    case "summary":
      st.final = (st.final || []).concat([["demo verified", String(e.verified)], ["guest", e.guest]]);
      if (e.destination) st.info.destination = e.destination;
      break;
    case "failed": setPhase("failed"); st.final = [["code", e.code], ["message", e.message], ["offset", e.offset ?? "-"]]; break;
    case "cancelled": setPhase("cancelled"); st.final = [["reason", e.reason]]; break;
  }
  draw();
}
window.vmshift = st;
const es = new EventSource("/events");
es.onopen = () => { if (document.documentElement.dataset.phase === "connecting") setPhase("waiting"); };
es.onmessage = (m) => onEvent(JSON.parse(m.data));
es.onerror = () => { if (!st.final) $("phase").textContent = document.documentElement.dataset.phase + " (disconnected)"; es.close(); };
draw();
</script>
</body>
</html>
`;
