/**
 * `migrate`: a 1 GiB precopy migration with a steady writer, vmshift against QEMU's own precopy
 * of a guest with the same memory size, in the same run, over two links:
 *  - loopback: both sides in one private network namespace (127.0.0.1 there);
 *  - a veth pair between two namespaces shaped to 1 Gbit/s with tbf (the link's capacity is
 *    measured in the same run with a plain TCP stream between the namespaces).
 * Both sides of each migration are separate processes (test/migration/netns-child.js for
 * vmshift, two QEMUs for the reference). Memory content is alike: vmshift's source fills 640 MiB
 * of its 1 GiB with non-zero pages; the QEMU guest (the interop rig's, TCG) fills 640 MiB of
 * tmpfs with random data. Writers: vmshift 5000 pages/s (20 MB/s) into a 4 MiB hot set plus 10%
 * anywhere; the guest rewrites a 4 MiB tmpfs file every 0.2 s (~20 MB/s). QEMU's max-bandwidth
 * is 1 TB/s (unlimited), downtime limit 300 ms on both.
 *
 * Figures (medians of RUNS): throughput = bytes on the wire / total migration time (vmshift's
 * includes the digest verification of all memory, which QEMU does not do, so the throughput
 * without it is given too); downtime as each reports it (vmshift: stop -> destination running;
 * its verification runs after the destination resumed, so stop -> verified is given too); on the shaped link,
 * the first round's rate of each against the link's capacity. Then postcopy remote-fault
 * latency (destination side: fault read -> page placed) with the background stream at full
 * speed, for each way a requested page can travel (behind the background stream; on the preempt
 * channel served by the main threads, by the native fault threads, or over TLS), on loopback and
 * on the shaped link, against bench/c/uffd-resolver.c doing the same round trip over TCP
 * loopback in C (no background stream) for as many pages as our fault threads served; and the
 * longest single access the destination's guest thread saw (its worst stall). Like with like:
 * the C resolver is one process (its page server a thread), ours two (source and destination);
 * so the fault-thread row is also given against the C resolver with its page server in a
 * process of its own, and our fault path is also measured with both sides in one process
 * (netns-child.js both) against the one-process C.
 *
 * TLS rows: the same precopy runs over mutual TLS 1.3 (vmshift: --tls-creds, x509 credentials
 * made with openssl in QEMU's layout; QEMU: tls-creds-x509 objects with verify-peer and an
 * authz-simple on the client's CN, the same credentials directory), alternating with the plain
 * runs so that drift hits both; against QEMU's TLS migration, and against our own plain TCP.
 */
import { execFile } from "node:child_process";
import { mkdirSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { promisify } from "node:util";
import { migrate, probeInterop, Rig, repoRoot, type Vm } from "../test/interop/rig.js";
import {
  ADDR_A,
  ADDR_B,
  JsonLines,
  migrateBetween,
  NetnsLink,
  netnsUnavailable,
  type Side,
} from "../test/migration/netns.js";
import { CLIENT_CN, makeTestCreds, type TestCreds } from "../test/migration/tls-creds.js";
import { type Figure, figure, median } from "./report.js";

const execFileP = promisify(execFile);
const RUNS = Number(process.env.VMSHIFT_BENCH_RUNS ?? 3);
const SIZE_MIB = 1024;
const FILL = 0.625; // 640 MiB of non-zero pages
const RATE = 5000; // pages/s
const log = (s: string) => process.stderr.write(`migrate: ${s}\n`);

interface Run {
  mbps: number;
  /** vmshift: wire bytes / (total time - digest verification); QEMU: = mbps */
  mbpsUnverified: number;
  /** stop -> destination running */
  downtimeMs: number;
  /** stop -> digests compared (vmshift: downtime + verification after resume; QEMU: = downtimeMs) */
  verifiedMs: number;
  /** first round's wire rate, MB/s */
  round1Mbps: number;
}

async function ours(link: NetnsLink, loopback: Side | undefined, creds: TestCreds | null): Promise<Run> {
  const security = creds ? ["--tls-creds", creds.good] : ["--insecure"];
  const r = await migrateBetween(link, {
    sourceArgs: [
      "--size",
      String(SIZE_MIB),
      "--fill",
      String(FILL),
      "--rate",
      String(RATE),
      "--pattern",
      "hotset",
      "--hot",
      String(4 / SIZE_MIB),
      "--downtime",
      "300",
      ...security,
    ],
    destinationArgs: ["--size", String(SIZE_MIB), ...security, ...(creds ? ["--tls-authz", CLIENT_CN] : [])],
    ...(loopback ? { loopback } : {}),
    timeoutMs: 120_000,
  });
  const s = r.source;
  const phase = (p: string) => (r.sourceEvents.find((e) => e.event === "phase" && e.phase === p)?.atMs as number) ?? 0;
  const rounds = s.roundStats as { bandwidth: number }[];
  return {
    mbps: (s.bytesSent as number) / (s.totalMs as number) / 1000,
    mbpsUnverified: (s.bytesSent as number) / (phase("verify") - phase("setup")) / 1000,
    downtimeMs: s.downtimeMs as number,
    verifiedMs: (s.downtimeMs as number) + ((s.verifyMs as number | undefined) ?? 0),
    round1Mbps: (rounds[0]?.bandwidth ?? 0) / 1e6,
  };
}

/**
 * A plain TCP stream a -> b inside the link (or, with `loopback`, over 127.0.0.1 inside that
 * side's namespace), `mib` MiB in 1 MiB writes: its capacity as Node sees it.
 */
async function capacity(link: NetnsLink, loopback?: Side, mib = 300): Promise<number> {
  const code = `const net=require("node:net");const [m,h,p]=process.argv.slice(1);
if(m==="s"){const s=net.createServer(c=>{let n=0;const t=performance.now();c.on("data",d=>n+=d.length);
c.on("end",()=>{console.log(JSON.stringify({event:"cap",MBps:n/(performance.now()-t)/1000}));c.end();s.close()})}).listen(0,h,()=>console.log(JSON.stringify({event:"listening",port:s.address().port})))}
else{const c=net.connect(+p,h,()=>{const b=Buffer.alloc(1<<20,7);let left=${mib};const w=()=>{while(left>0){left--;if(!c.write(b)){c.once("drain",w);return}}c.end()};w()});c.on("data",()=>{})}`;
  const host = loopback ? "127.0.0.1" : link.addr("b");
  const srv = new JsonLines(link.spawn(loopback ?? "b", process.execPath, ["-e", code, "s", host]));
  const l = await srv.next("listening", 10_000);
  const cli = new JsonLines(link.spawn(loopback ?? "a", process.execPath, ["-e", code, "c", host, String(l.port)]));
  const r = await srv.next("cap", 60_000);
  await cli.exit(10_000);
  return r.MBps as number;
}

/** The QEMU side: a rig per namespace (QEMU started through `ip netns exec`). */
class QemuPair {
  src: Vm | null = null;
  #srcSide: Side = "a";
  #port = 7600;

  private constructor(
    readonly link: NetnsLink,
    readonly rigs: Record<Side, Rig>,
    readonly loopback: boolean,
    readonly tlsArgs: string[],
  ) {}

  static async create(link: NetnsLink, loopback: boolean, creds: TestCreds): Promise<QemuPair> {
    const dir = join(repoRoot(), ".tmp", "bench-migrate");
    mkdirSync(dir, { recursive: true });
    const saved = process.env.VMSHIFT_QEMU;
    const rigs: Partial<Record<Side, Rig>> = {};
    try {
      for (const side of ["a", "b"] as const) {
        const wrapper = join(dir, `qemu-${link.ns(side)}.sh`);
        writeFileSync(wrapper, `#!/bin/sh\nexec ip netns exec ${link.ns(side)} qemu-system-x86_64 "$@"\n`, {
          mode: 0o755,
        });
        process.env.VMSHIFT_QEMU = wrapper;
        rigs[side] = await Rig.create(`bm-${side}`);
      }
    } catch (e) {
      await Promise.allSettled(Object.values(rigs).map((r) => r.close()));
      throw e;
    } finally {
      if (saved === undefined) delete process.env.VMSHIFT_QEMU;
      else process.env.VMSHIFT_QEMU = saved;
    }
    // Every VM can be either end: both credentials objects, and the client identity to accept.
    const tlsArgs = [
      "-object",
      `tls-creds-x509,id=tlsS,dir=${creds.good},endpoint=server,verify-peer=on`,
      "-object",
      `tls-creds-x509,id=tlsC,dir=${creds.good},endpoint=client`,
      "-object",
      `authz-simple,id=auth0,identity=CN=${CLIENT_CN}`,
    ];
    return new QemuPair(link, rigs as Record<Side, Rig>, loopback, tlsArgs);
  }

  /** Boots the source guest and fills its memory; starts its writer. */
  async boot(): Promise<void> {
    const vm = await this.rigs.a.startVm({
      name: "src0",
      memMiB: SIZE_MIB,
      lifetimeMs: 1_200_000,
      extraArgs: this.tlsArgs,
    });
    this.src = vm;
    await vm.guest.ready(120_000);
    const t = performance.now();
    await vm.guest.runOk(
      [
        "mount -o remount,size=960m /tmp",
        "head -c 1048576 /dev/urandom > /tmp/s1",
        "for n in 1 2 4 8 16 32; do cat /tmp/s$n /tmp/s$n > /tmp/s$((n * 2)); rm /tmp/s$n; done",
        "i=0; while [ $i -lt 9 ]; do cat /tmp/s64; i=$((i + 1)); done > /tmp/fill",
        "head -c 4194304 /tmp/s64 > /tmp/seed4",
        "( while :; do dd if=/tmp/seed4 of=/tmp/dirty bs=1M count=4 conv=notrunc 2>/dev/null; sleep 0.2; done ) < /dev/null > /dev/null 2>&1 &",
        "free -m | sed -n 2p",
      ].join("\n"),
      { timeoutMs: 240_000 },
    );
    log(`qemu guest filled in ${((performance.now() - t) / 1000).toFixed(1)} s`);
  }

  /** One migration from the current source to a fresh incoming QEMU; the destination becomes the source. */
  async migrateOnce(tls: boolean): Promise<Run & { dirtyPagesRate: number; syncs: number }> {
    const src = this.src as Vm;
    const dside: Side = this.loopback ? "a" : this.#srcSide === "a" ? "b" : "a";
    const host = this.loopback ? "127.0.0.1" : this.link.addr(dside);
    const dst = await this.rigs[dside].startVm({
      name: `dst${this.#port}`,
      memMiB: SIZE_MIB,
      incoming: true,
      lifetimeMs: 1_200_000,
      extraArgs: this.tlsArgs,
    });
    // Set both ways every time: a VM that was a TLS destination is a plain source next.
    const r = await migrate(src, dst, {
      uri: `tcp:${host}:${++this.#port}`,
      maxBandwidth: 1e12,
      downtimeLimitMs: 300,
      timeoutMs: 180_000,
      parameters: {
        source: { "tls-creds": tls ? "tlsC" : "", "tls-hostname": tls ? "localhost" : "", "tls-authz": "" },
        destination: { "tls-creds": tls ? "tlsS" : "", "tls-hostname": "", "tls-authz": tls ? "auth0" : "" },
      },
    });
    await src.close();
    this.src = dst;
    this.#srcSide = dside;
    const ram = (r.raw.ram ?? {}) as Record<string, number>;
    const total = r.totalTimeMs ?? r.wallMs;
    return {
      mbps: (r.ram.transferred ?? 0) / total / 1000,
      mbpsUnverified: (r.ram.transferred ?? 0) / total / 1000,
      downtimeMs: r.downtimeMs ?? Number.NaN,
      verifiedMs: r.downtimeMs ?? Number.NaN,
      // QEMU's own average over the migration ("mbps" is megabits per second).
      round1Mbps: (r.ram.mbps ?? 0) / 8,
      dirtyPagesRate: ram["dirty-pages-rate"] ?? 0,
      syncs: r.ram.dirtySyncCount ?? 0,
    };
  }

  async close(): Promise<void> {
    await Promise.allSettled([this.rigs.a.close(), this.rigs.b.close()]);
  }
}

function med(runs: Run[], k: keyof Run): number {
  return median(runs.map((r) => r[k]));
}

async function precopyFigures(
  name: string,
  link: NetnsLink,
  loopback: boolean,
  cap: number | null,
  creds: TestCreds,
): Promise<Figure[]> {
  const mine: Run[] = [];
  const theirs: Run[] = [];
  const mineTls: Run[] = [];
  const theirsTls: Run[] = [];
  /** Loopback: raw TCP capacity, a plain socket pair pushing about what a migration sends, before each run. */
  const raw: number[] = [];
  // vmshift's runs first, then QEMU's, so that each migrates with only its own memory resident:
  // on this nested-virtualised machine a resident 1 GiB QEMU guest makes the kernel's copies
  // into fresh memory ~3x slower (measured with perf), which QEMU's own runs never suffer
  // because our processes have exited by then. Plain and TLS alternate.
  for (let i = 0; i < RUNS; i++) {
    if (loopback) {
      raw.push(await capacity(link, "a", Math.round(SIZE_MIB * FILL)));
      log(`${name} run ${i + 1}: raw TCP loopback ${(raw.at(-1) as number).toFixed(0)} MB/s`);
    }
    for (const tls of [false, true]) {
      const o = await ours(link, loopback ? "a" : undefined, tls ? creds : null);
      (tls ? mineTls : mine).push(o);
      log(
        `${name} run ${i + 1}${tls ? " TLS" : ""}: vmshift ${o.mbps.toFixed(0)} MB/s, downtime ${o.downtimeMs.toFixed(0)} ms ` +
          `(verified ${o.verifiedMs.toFixed(0)} ms after the stop), round 1 ${o.round1Mbps.toFixed(0)} MB/s`,
      );
    }
  }
  const qemu = await QemuPair.create(link, loopback, creds);
  try {
    await qemu.boot();
    for (let i = 0; i < RUNS; i++) {
      for (const tls of [false, true]) {
        const q = await qemu.migrateOnce(tls);
        (tls ? theirsTls : theirs).push(q);
        log(
          `${name} run ${i + 1}${tls ? " TLS" : ""}: qemu ${q.mbps.toFixed(0)} MB/s, downtime ${q.downtimeMs} ms, ` +
            `dirty ${q.dirtyPagesRate} pages/s, ${q.syncs} syncs`,
        );
      }
    }
  } finally {
    await qemu.close();
  }
  const ref = `QEMU ${loopback ? "" : "over the same link "}precopy, 1 GiB TCG guest, same run`;
  const refTls = `QEMU ${loopback ? "" : "over the same link "}precopy over TLS (tls-creds-x509), same run`;
  const out = [
    figure(
      "migrate",
      `${name}: throughput (wire bytes / total time)`,
      "MB/s",
      "higher",
      med(mine, "mbps"),
      ref,
      med(theirs, "mbps"),
    ),
    figure(
      "migrate",
      `${name}: throughput without digest verification`,
      "MB/s",
      "higher",
      med(mine, "mbpsUnverified"),
      ref,
      med(theirs, "mbps"),
    ),
    figure(
      "migrate",
      `${name}: downtime (stop -> destination running)`,
      "ms",
      "lower",
      med(mine, "downtimeMs"),
      ref,
      med(theirs, "downtimeMs"),
    ),
    figure(
      "migrate",
      `${name}: stop -> memory verified (vmshift: downtime + digest comparison after resume)`,
      "ms",
      "lower",
      med(mine, "verifiedMs"),
      ref,
      med(theirs, "downtimeMs"),
    ),
    figure(
      "migrate",
      `${name}: TLS throughput (wire bytes / total time)`,
      "MB/s",
      "higher",
      med(mineTls, "mbps"),
      refTls,
      med(theirsTls, "mbps"),
    ),
    figure(
      "migrate",
      `${name}: TLS throughput without digest verification`,
      "MB/s",
      "higher",
      med(mineTls, "mbpsUnverified"),
      refTls,
      med(theirsTls, "mbps"),
    ),
    figure(
      "migrate",
      `${name}: TLS downtime (stop -> destination running)`,
      "ms",
      "lower",
      med(mineTls, "downtimeMs"),
      refTls,
      med(theirsTls, "downtimeMs"),
    ),
    figure(
      "migrate",
      `${name}: vmshift TLS throughput vs vmshift plain TCP`,
      "MB/s",
      "higher",
      med(mineTls, "mbps"),
      "vmshift plain TCP, same run",
      med(mine, "mbps"),
    ),
    figure(
      "migrate",
      `${name}: QEMU TLS throughput vs QEMU plain TCP (value = QEMU TLS)`,
      "MB/s",
      "higher",
      med(theirsTls, "mbps"),
      "QEMU plain TCP, same run",
      med(theirs, "mbps"),
    ),
  ];
  if (loopback) {
    const rawRef = `raw TCP over loopback (plain node:net pair, ${Math.round(SIZE_MIB * FILL)} MiB, same run)`;
    out.push(
      figure("migrate", `${name}: throughput vs raw TCP`, "MB/s", "higher", med(mine, "mbps"), rawRef, median(raw)),
      figure(
        "migrate",
        `${name}: throughput without digest verification vs raw TCP`,
        "MB/s",
        "higher",
        med(mine, "mbpsUnverified"),
        rawRef,
        median(raw),
      ),
      figure(
        "migrate",
        `${name}: TLS throughput vs raw TCP`,
        "MB/s",
        "higher",
        med(mineTls, "mbps"),
        rawRef,
        median(raw),
      ),
    );
  }
  if (cap !== null) {
    const capRef = `link capacity (tbf 1 Gbit/s, TCP stream measured in this run)`;
    out.push(
      figure(
        "migrate",
        `${name}: vmshift round-1 rate vs capacity`,
        "MB/s",
        "higher",
        med(mine, "round1Mbps"),
        capRef,
        cap,
      ),
    );
    out.push(
      figure(
        "migrate",
        `${name}: vmshift TLS round-1 rate vs capacity`,
        "MB/s",
        "higher",
        med(mineTls, "round1Mbps"),
        capRef,
        cap,
      ),
    );
    out.push(
      figure(
        "migrate",
        `${name}: QEMU average rate vs capacity (value = QEMU)`,
        "MB/s",
        "higher",
        med(theirs, "round1Mbps"),
        capRef,
        cap,
      ),
    );
  }
  return out;
}

/** How requested pages travel in a fault-latency run. */
type FaultPath = "main stream" | "preempt, main thread" | "preempt, fault thread" | "preempt over TLS";

interface FaultRun {
  medianUs: number;
  p99Us: number;
  remoteFaults: number;
  /** The destination guest's longest single access (a fault round trip), µs. */
  guestMaxUs: number;
}

/** The source's arguments of every fault-latency run: 256 MiB, 70 % non-zero, postcopy at once. */
const FAULT_SOURCE_ARGS = [
  "--size",
  "256",
  "--fill",
  "0.7",
  "--rate",
  String(RATE),
  "--mode",
  "postcopy",
  "--postcopy-after",
  "0",
];
const FAULT_GUEST_ARGS = ["--guest-threads", "1"];
const FAULT_DESTINATION_ARGS = ["--size", "256", ...FAULT_GUEST_ARGS];

/** The destination's postcopy figures (its `complete` event) and its guest's longest access. */
function faultFiguresOf(
  done: Record<string, unknown> | undefined,
  events: Record<string, unknown>[],
): FaultRun & { preemptPages?: number; faultThread?: boolean } {
  const pc = done?.postcopy as
    | {
        remoteFaults: number;
        latencyMedianUs: number;
        latencyP99Us: number;
        preemptPages?: number;
        faultThread?: boolean;
      }
    | undefined;
  if (!pc) throw new Error("the destination reported no postcopy figures");
  const guest = events.find((e) => e.event === "guest");
  return {
    medianUs: pc.latencyMedianUs,
    p99Us: pc.latencyP99Us,
    remoteFaults: pc.remoteFaults,
    guestMaxUs: typeof guest?.maxOpUs === "number" ? guest.maxOpUs : Number.NaN,
    ...(pc.preemptPages !== undefined ? { preemptPages: pc.preemptPages } : {}),
    ...(pc.faultThread !== undefined ? { faultThread: pc.faultThread } : {}),
  };
}

/**
 * One postcopy migration of 256 MiB with the background stream at full speed (no bandwidth
 * limit) while one guest thread on the destination touches random pages. "preempt, main thread"
 * forces the fault path onto the main threads (VMSHIFT_POSTCOPY_THREAD=0 in both children).
 */
async function faultRun(link: NetnsLink, path: FaultPath, loopback: boolean, creds: TestCreds): Promise<FaultRun> {
  const security = path === "preempt over TLS" ? ["--tls-creds", creds.good] : ["--insecure"];
  const saved = process.env.VMSHIFT_POSTCOPY_THREAD;
  if (path === "preempt, main thread") process.env.VMSHIFT_POSTCOPY_THREAD = "0";
  try {
    const r = await migrateBetween(link, {
      sourceArgs: [...FAULT_SOURCE_ARGS, ...(path === "main stream" ? [] : ["--preempt"]), ...security],
      destinationArgs: [...FAULT_DESTINATION_ARGS, ...security],
      ...(loopback ? { loopback: "a" as Side } : {}),
      timeoutMs: 120_000,
    });
    const f = faultFiguresOf(r.destination, r.destinationEvents);
    if (path !== "main stream" && !f.preemptPages) throw new Error(`${path}: no page came on the preempt channel`);
    if ((f.faultThread ?? false) !== (path === "preempt, fault thread"))
      throw new Error(`${path}: faults served by the ${f.faultThread ? "fault thread" : "main thread"}`);
    return f;
  } finally {
    if (saved === undefined) delete process.env.VMSHIFT_POSTCOPY_THREAD;
    else process.env.VMSHIFT_POSTCOPY_THREAD = saved;
  }
}

/**
 * One postcopy migration like faultRun's "preempt, fault thread" on loopback, with the source
 * and the destination in ONE process (netns-child.js both): no address-space switch between the
 * two sides on a round trip, as in the one-process C reference.
 */
async function faultRunOneProcess(link: NetnsLink): Promise<FaultRun> {
  const script = new URL("../test/migration/netns-child.js", import.meta.url).pathname;
  const args = [script, "both", ...FAULT_SOURCE_ARGS, ...FAULT_GUEST_ARGS, "--preempt", "--insecure"];
  const c = new JsonLines(link.spawn("a", process.execPath, args));
  try {
    const code = await c.exit(120_000);
    if (code !== 0) throw new Error(`one-process migration failed: exit ${code} (${c.tail()})`);
    const f = faultFiguresOf(
      c.events.find((e) => e.event === "complete" && e.role === "destination"),
      c.events,
    );
    if (!f.faultThread) throw new Error(`one-process migration: faults not served by the fault thread (${c.tail()})`);
    return f;
  } finally {
    c.child.kill("SIGKILL");
  }
}

interface ResolverFigures {
  med: number;
  p99: number;
}

/**
 * The C reference: bench/c/uffd-resolver.c, fetch over TCP loopback + UFFDIO_COPY, `pages`
 * faults; "tcp" with the page server a thread of the resolver's process, "tcp-process" with it in
 * a process of its own (a migration's structure: the source is another process).
 */
async function resolverRuns(link: NetnsLink, pages: number, mode: "tcp" | "tcp-process"): Promise<ResolverFigures> {
  const dir = join(repoRoot(), ".tmp", "bench-migrate");
  mkdirSync(dir, { recursive: true });
  const bin = join(dir, "uffd-resolver");
  await execFileP("gcc", ["-O2", "-pthread", "-o", bin, join(repoRoot(), "bench", "c", "uffd-resolver.c")], {
    timeout: 60_000,
  });
  const cm: number[] = [];
  const cp: number[] = [];
  for (let i = 0; i < RUNS; i++) {
    const c = new JsonLines(link.spawn("a", bin, [String(pages), mode]));
    await c.exit(60_000);
    const line = c.events.find((e) => typeof e.resolverMedianUs === "number");
    if (!line) throw new Error(`uffd-resolver printed nothing: ${c.tail()}`);
    cm.push(line.resolverMedianUs as number);
    cp.push(line.resolverP99Us as number);
  }
  return { med: median(cm), p99: median(cp) };
}

/**
 * Postcopy remote-fault latency (destination: fault read -> page placed) for each fault path,
 * runs alternating so drift hits all, against the C resolver measured in the same run (between
 * the rounds). `shaped`: the same over the tbf-shaped veth (the C reference stays loopback: it
 * has no network of its own). Also the guest's longest single access (its worst stall).
 */
async function faultFigures(loop: NetnsLink, shaped: NetnsLink | null, creds: TestCreds): Promise<Figure[]> {
  const paths: FaultPath[] = ["main stream", "preempt, main thread", "preempt, fault thread", "preempt over TLS"];
  const links: [string, NetnsLink, boolean][] = [["loopback", loop, true]];
  if (shaped) links.push(["veth 1 Gbit/s (tbf)", shaped, false]);
  const runs = new Map<string, FaultRun[]>();
  const oneProcess: FaultRun[] = [];
  const threads: ResolverFigures[] = [];
  const processes: ResolverFigures[] = [];
  let pages = 0;
  for (let i = 0; i < RUNS; i++) {
    for (const [name, link, loopback] of links)
      for (const path of paths) {
        const r = await faultRun(link, path, loopback, creds);
        const key = `${name}|${path}`;
        runs.set(key, [...(runs.get(key) ?? []), r]);
        // The references serve as many faults as our fault threads did in their first run.
        if (!pages && path === "preempt, fault thread") pages = Math.max(1, r.remoteFaults);
        log(`${key}: median ${r.medianUs.toFixed(1)} us, p99 ${r.p99Us.toFixed(1)} us, guest max ${r.guestMaxUs} us`);
      }
    const one = await faultRunOneProcess(loop);
    oneProcess.push(one);
    log(`loopback|one process: median ${one.medianUs.toFixed(1)} us, p99 ${one.p99Us.toFixed(1)} us`);
    // The references between the rounds of ours.
    threads.push(await resolverRuns(loop, pages, "tcp"));
    processes.push(await resolverRuns(loop, pages, "tcp-process"));
    log(
      `C resolver: one process ${threads.at(-1)?.med} us, page server in its own process ${processes.at(-1)?.med} us`,
    );
  }
  const ref = `C uffd resolver, TCP loopback page fetch + UFFDIO_COPY, ${pages} pages`;
  const cm = median(threads.map((c) => c.med));
  const cp = median(threads.map((c) => c.p99));
  const ref2 = `${ref}, page server in its own process`;
  const c2m = median(processes.map((c) => c.med));
  const c2p = median(processes.map((c) => c.p99));
  const out: Figure[] = [];
  const latency = (what: string, rs: FaultRun[], refName: string, refMed: number, refP99: number) => {
    const m = (f: (r: FaultRun) => number) => median(rs.map(f));
    out.push(
      figure(
        "migrate",
        `${what}, median`,
        "us",
        "lower",
        m((r) => r.medianUs),
        refName,
        refMed,
      ),
    );
    out.push(
      figure(
        "migrate",
        `${what}, p99`,
        "us",
        "lower",
        m((r) => r.p99Us),
        refName,
        refP99,
      ),
    );
  };
  for (const [name] of links)
    for (const path of paths) {
      const rs = runs.get(`${name}|${path}`) ?? [];
      latency(`postcopy remote fault latency (${name}, ${path}, background at full speed)`, rs, ref, cm, cp);
      out.push(
        figure(
          "migrate",
          `postcopy guest stall, longest single access (${name}, ${path})`,
          "us",
          "lower",
          median(rs.map((r) => r.guestMaxUs)),
          `${ref}, p99`,
          cp,
        ),
      );
    }
  // Like with like: the two sides as separate processes against the C reference with its page
  // server in a process of its own, and both sides in one process against the one-process C.
  latency(
    "postcopy remote fault latency (loopback, preempt, fault thread, background at full speed; source and destination processes)",
    runs.get("loopback|preempt, fault thread") ?? [],
    ref2,
    c2m,
    c2p,
  );
  latency(
    "postcopy remote fault latency (loopback, preempt, fault thread, background at full speed; source and destination in one process)",
    oneProcess,
    ref,
    cm,
    cp,
  );
  return out;
}

export async function run(): Promise<Figure[]> {
  const why = netnsUnavailable();
  if (why) {
    log(`*** SKIPPED: needs network namespaces: ${why} ***`);
    return [];
  }
  const probe = await probeInterop({ needQsd: false });
  const figures: Figure[] = [];
  // The server certificate names both veth addresses and localhost (QEMU's tls-hostname).
  const creds = makeTestCreds({ serverNames: [ADDR_A, ADDR_B] });
  try {
    figures.push(...(await runLinks(probe, creds)));
  } finally {
    creds.close();
  }
  return figures;
}

async function runLinks(probe: Awaited<ReturnType<typeof probeInterop>>, creds: TestCreds): Promise<Figure[]> {
  const figures: Figure[] = [];
  const loop = await NetnsLink.create();
  try {
    if (!process.env.VMSHIFT_BENCH_ONLY || process.env.VMSHIFT_BENCH_ONLY === "faults") {
      const shaped = await NetnsLink.create({ rate: "1gbit" });
      try {
        figures.push(...(await faultFigures(loop, shaped, creds)));
      } finally {
        await shaped.close();
      }
    }
    if (!probe.ok) {
      log(`*** QEMU comparison SKIPPED: ${probe.reason} ***`);
      return figures;
    }
    if (!process.env.VMSHIFT_BENCH_ONLY || process.env.VMSHIFT_BENCH_ONLY === "loopback")
      figures.push(...(await precopyFigures("loopback", loop, true, null, creds)));
  } finally {
    await loop.close();
  }
  if (!process.env.VMSHIFT_BENCH_ONLY || process.env.VMSHIFT_BENCH_ONLY === "veth") {
    const shaped = await NetnsLink.create({ rate: "1gbit" });
    try {
      const cap = await capacity(shaped);
      log(`shaped link capacity: ${cap.toFixed(1)} MB/s`);
      figures.push(...(await precopyFigures("veth 1 Gbit/s (tbf)", shaped, false, cap, creds)));
    } finally {
      await shaped.close();
    }
  }
  return figures;
}
