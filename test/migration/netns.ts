/**
 * Two hosts on one machine: a pair of network namespaces joined by a veth pair, optionally
 * shaped with a `tbf` qdisc (netem is not available here; tbf at 1 Gbit/s measures ~115-119
 * MB/s). Processes run inside with `ip netns exec NAME ...`, so the traffic of a test never
 * leaves its own namespaces.
 *
 *   const reason = netnsUnavailable();          // skip loudly when it is not null
 *   await using link = await NetnsLink.create({ rate: "1gbit" });
 *   const p = link.spawn("b", process.execPath, [script, ...]);   // killed by link.close()
 *
 * Names carry this process's pid (namespaces `vmshift-<pid>-<n>-a|b`, links `vmsh<pid36><n>a|b`),
 * so leftovers of a run that was SIGKILLed (no exit hook ran) are found by prefix and removed
 * by the next create() once their pid is gone. An exit hook removes this process's own.
 */
import { type ChildProcess, execFileSync, spawn } from "node:child_process";
import { existsSync } from "node:fs";

const NS_PREFIX = "vmshift-";
const LINK_PREFIX = "vmsh";
/** Both ends of every link use these: each pair of namespaces is its own network. */
export const ADDR_A = "10.199.0.1";
export const ADDR_B = "10.199.0.2";

const IP_TIMEOUT_MS = 10_000;

function ipPath(): string | null {
  for (const p of ["/usr/sbin/ip", "/sbin/ip", "/usr/bin/ip", "/bin/ip"]) if (existsSync(p)) return p;
  return null;
}

function run(cmd: string, args: string[]): string {
  return execFileSync(cmd, args, { timeout: IP_TIMEOUT_MS, encoding: "utf8", stdio: ["ignore", "pipe", "pipe"] });
}

function ip(args: string[]): string {
  const p = ipPath();
  if (!p) throw new Error("ip (iproute2) not found");
  return run(p, args);
}

function tryIp(args: string[]): void {
  try {
    ip(args);
  } catch {
    // already gone
  }
}

/** Why namespaces cannot be used here, or null when they can (root, iproute2, tbf). */
export function netnsUnavailable(): string | null {
  if (process.platform !== "linux") return "not Linux";
  if (process.getuid?.() !== 0) return "not root (ip netns add needs CAP_SYS_ADMIN)";
  if (!ipPath()) return "ip (iproute2) not found: run sh scripts/install-debian.sh as root";
  try {
    ip(["netns", "list"]);
  } catch (e) {
    return `ip netns list failed: ${(e as Error).message}`;
  }
  return null;
}

function alive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (e) {
    return (e as NodeJS.ErrnoException).code !== "ESRCH";
  }
}

/** Kills every process still inside namespace `ns` (they would keep it alive after `ip netns del`). */
function killInside(ns: string): void {
  let out = "";
  try {
    out = ip(["netns", "pids", ns]);
  } catch {
    return;
  }
  for (const s of out.split(/\s+/)) {
    const pid = Number(s);
    if (!Number.isInteger(pid) || pid <= 0 || pid === process.pid) continue;
    try {
      process.kill(pid, "SIGKILL");
    } catch {
      // exited meanwhile
    }
  }
}

/**
 * Removes namespaces and root-namespace veth ends left by runs whose process is gone. Links are
 * normally destroyed with their namespace; a root-namespace end only survives a crash between
 * `ip link add` and moving it.
 */
export function sweepStaleNamespaces(): void {
  let list = "";
  try {
    list = ip(["netns", "list"]);
  } catch {
    return;
  }
  for (const line of list.split("\n")) {
    const name = line.split(" ")[0] ?? "";
    const m = /^vmshift-(\d+)-\d+-[ab]$/.exec(name);
    if (!m || alive(Number(m[1]))) continue;
    killInside(name);
    tryIp(["netns", "del", name]);
  }
  let links = "";
  try {
    links = ip(["-o", "link", "show"]);
  } catch {
    return;
  }
  for (const line of links.split("\n")) {
    const m = /^\d+:\s+(vmsh([0-9a-z]+)x\d+[ab])[@:]/.exec(line);
    if (!m || alive(Number.parseInt(m[2] as string, 36))) continue;
    tryIp(["link", "del", m[1] as string]);
  }
}

export interface LinkOptions {
  /** tbf rate on both directions, e.g. "1gbit"; none = the veth's own speed. */
  rate?: string;
}

export type Side = "a" | "b";

const open = new Set<NetnsLink>();
let seq = 0;

function closeAllSync(): void {
  for (const l of open) l.closeSync();
}

export class NetnsLink {
  readonly #children = new Set<ChildProcess>();
  #closed = false;

  private constructor(
    /** namespace names */
    readonly a: string,
    readonly b: string,
    readonly linkA: string,
    readonly linkB: string,
    readonly rate: string | null,
  ) {}

  /** Address of a side (each side's end of the veth). */
  addr(side: Side): string {
    return side === "a" ? ADDR_A : ADDR_B;
  }

  ns(side: Side): string {
    return side === "a" ? this.a : this.b;
  }

  static async create(o: LinkOptions = {}): Promise<NetnsLink> {
    sweepStaleNamespaces();
    const n = ++seq;
    const base = `${NS_PREFIX}${process.pid}-${n}`;
    const lbase = `${LINK_PREFIX}${process.pid.toString(36)}x${n}`;
    const link = new NetnsLink(`${base}-a`, `${base}-b`, `${lbase}a`, `${lbase}b`, o.rate ?? null);
    if (open.size === 0) process.on("exit", closeAllSync);
    open.add(link);
    try {
      ip(["netns", "add", link.a]);
      ip(["netns", "add", link.b]);
      ip(["link", "add", link.linkA, "type", "veth", "peer", "name", link.linkB]);
      ip(["link", "set", link.linkA, "netns", link.a]);
      ip(["link", "set", link.linkB, "netns", link.b]);
      for (const [ns, dev, addr] of [
        [link.a, link.linkA, ADDR_A],
        [link.b, link.linkB, ADDR_B],
      ] as const) {
        ip(["-n", ns, "addr", "add", `${addr}/24`, "dev", dev]);
        ip(["-n", ns, "link", "set", "lo", "up"]);
        ip(["-n", ns, "link", "set", dev, "up"]);
        // tbf needs a burst of at least rate/HZ; 1 MiB covers 1 Gbit/s (and 10 Gbit/s at HZ=1000).
        if (o.rate)
          runTc([
            "-n",
            ns,
            "qdisc",
            "add",
            "dev",
            dev,
            "root",
            "tbf",
            "rate",
            o.rate,
            "burst",
            "1mb",
            "latency",
            "50ms",
          ]);
      }
    } catch (e) {
      link.closeSync();
      throw e;
    }
    // Neighbour discovery happens on the first packet; nothing to wait for.
    await Promise.resolve();
    return link;
  }

  /** Runs `cmd args` inside side's namespace; the child is killed by close(). */
  spawn(side: Side, cmd: string, args: string[], env?: NodeJS.ProcessEnv): ChildProcess {
    if (this.#closed) throw new Error("link closed");
    const p = ipPath() as string;
    const child = spawn(p, ["netns", "exec", this.ns(side), cmd, ...args], {
      stdio: ["ignore", "pipe", "pipe"],
      env: env ?? process.env,
    });
    this.#children.add(child);
    child.once("exit", () => this.#children.delete(child));
    return child;
  }

  /** Bytes sent and received on side's veth end. */
  stats(side: Side): { txBytes: number; rxBytes: number } {
    const dev = side === "a" ? this.linkA : this.linkB;
    const read = (what: string) =>
      Number(ip(["netns", "exec", this.ns(side), "cat", `/sys/class/net/${dev}/statistics/${what}`]).trim());
    return { txBytes: read("tx_bytes"), rxBytes: read("rx_bytes") };
  }

  /** Kills the children (waiting up to 5 s for them to exit), then deletes both namespaces. */
  async close(): Promise<void> {
    if (this.#closed) return;
    const waits = [...this.#children].map(
      (c) =>
        new Promise<void>((r) => {
          if (c.exitCode !== null || c.signalCode !== null) return r();
          const t = setTimeout(r, 5000);
          c.once("exit", () => {
            clearTimeout(t);
            r();
          });
          c.kill("SIGKILL");
        }),
    );
    await Promise.all(waits);
    this.closeSync();
  }

  closeSync(): void {
    if (this.#closed) return;
    this.#closed = true;
    for (const c of this.#children) c.kill("SIGKILL");
    for (const ns of [this.a, this.b]) {
      killInside(ns);
      tryIp(["netns", "del", ns]);
    }
    // Deleting a namespace destroys its veth end and so the pair; this only matters when
    // creation failed before the ends were moved.
    tryIp(["link", "del", this.linkA]);
    open.delete(this);
  }

  async [Symbol.asyncDispose](): Promise<void> {
    await this.close();
  }
}

function runTc(args: string[]): void {
  for (const p of ["/usr/sbin/tc", "/sbin/tc"])
    if (existsSync(p)) {
      run(p, args);
      return;
    }
  throw new Error("tc (iproute2) not found");
}

/** Namespaces of this module still present (for tests of the helper itself). */
export function listOwnNamespaces(): string[] {
  try {
    return ip(["netns", "list"])
      .split("\n")
      .map((l) => l.split(" ")[0] ?? "")
      .filter((n) => n.startsWith(`${NS_PREFIX}${process.pid}-`));
  } catch {
    return [];
  }
}

/** A child's JSON-lines stdout, collected; every wait is bounded. */
export class JsonLines {
  readonly events: Record<string, unknown>[] = [];
  stderr = "";
  readonly exited: Promise<{ code: number | null; signal: string | null }>;
  #waiters: (() => void)[] = [];

  constructor(readonly child: ChildProcess) {
    let buf = "";
    child.stdout?.setEncoding("utf8").on("data", (d: string) => {
      buf += d;
      for (let i = buf.indexOf("\n"); i >= 0; i = buf.indexOf("\n")) {
        const line = buf.slice(0, i);
        buf = buf.slice(i + 1);
        try {
          this.events.push(JSON.parse(line) as Record<string, unknown>);
        } catch {
          this.events.push({ event: "text", line });
        }
      }
      for (const w of this.#waiters.splice(0)) w();
    });
    child.stderr?.setEncoding("utf8").on("data", (d: string) => {
      this.stderr = (this.stderr + d).slice(-4000);
    });
    this.exited = new Promise((r) => {
      child.once("exit", (code, signal) => {
        r({ code, signal });
        for (const w of this.#waiters.splice(0)) w();
      });
    });
  }

  /** The first event named `name`, waiting up to `timeoutMs`. */
  async next(name: string, timeoutMs: number): Promise<Record<string, unknown>> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const e = this.events.find((x) => x.event === name);
      if (e) return e;
      if (this.child.exitCode !== null || this.child.signalCode !== null)
        throw new Error(
          `child exited (${this.child.exitCode ?? this.child.signalCode}) without '${name}': ${this.tail()}`,
        );
      const left = deadline - Date.now();
      if (left <= 0) throw new Error(`no '${name}' within ${timeoutMs} ms: ${this.tail()}`);
      await new Promise<void>((r) => {
        const t = setTimeout(r, left);
        this.#waiters.push(() => {
          clearTimeout(t);
          r();
        });
      });
    }
  }

  /** Waits for the exit (bounded), then returns its code. */
  async exit(timeoutMs: number): Promise<number | null> {
    let t: NodeJS.Timeout | undefined;
    const to = new Promise<never>((_, rej) => {
      t = setTimeout(() => rej(new Error(`child did not exit within ${timeoutMs} ms: ${this.tail()}`)), timeoutMs);
    });
    try {
      return (await Promise.race([this.exited, to])).code;
    } finally {
      clearTimeout(t);
    }
  }

  tail(): string {
    const last = this.events.slice(-3).map((e) => JSON.stringify(e).slice(0, 300));
    return `last events ${last.join(" ")}; stderr ${this.stderr.slice(-1500)}`;
  }
}

export interface ChildMigration {
  source: Record<string, unknown>;
  destination: Record<string, unknown>;
  sourceEvents: Record<string, unknown>[];
  destinationEvents: Record<string, unknown>[];
}

/**
 * A migration between two child processes (test/migration/netns-child.js): the destination on
 * side b (listening on its address, port chosen by the kernel), the source on side a, or both
 * on side `loopback` over that namespace's own 127.0.0.1. Resolves with both results.
 */
export async function migrateBetween(
  link: NetnsLink,
  o: { sourceArgs: string[]; destinationArgs: string[]; loopback?: Side; timeoutMs: number },
): Promise<ChildMigration> {
  const script = new URL("./netns-child.js", import.meta.url).pathname;
  const dside: Side = o.loopback ?? "b";
  const sside: Side = o.loopback ?? "a";
  const host = o.loopback ? "127.0.0.1" : link.addr("b");
  const dst = new JsonLines(
    link.spawn(dside, process.execPath, [script, "destination", "--listen", `${host}:0`, ...o.destinationArgs]),
  );
  try {
    const l = await dst.next("listening", 10_000);
    const src = new JsonLines(
      link.spawn(sside, process.execPath, [script, "source", "--to", `${host}:${l.port}`, ...o.sourceArgs]),
    );
    try {
      const [sc, dc] = await Promise.all([src.exit(o.timeoutMs), dst.exit(o.timeoutMs)]);
      if (sc !== 0 || dc !== 0)
        throw new Error(`migration failed: source exit ${sc} (${src.tail()}); destination exit ${dc} (${dst.tail()})`);
      return {
        source: await src.next("complete", 1000),
        destination: await dst.next("complete", 1000),
        sourceEvents: src.events,
        destinationEvents: dst.events,
      };
    } finally {
      src.child.kill("SIGKILL");
    }
  } finally {
    dst.child.kill("SIGKILL");
  }
}
