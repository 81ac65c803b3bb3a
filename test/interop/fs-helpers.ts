/**
 * Our `vmshift fs` as a child process for the interop tests (spawned like `vmshift blk` is, with
 * VMSHIFT_FS_TRACE=1: its stderr log lists every vhost-user request), and the QEMU arguments of a
 * vhost-user-fs-pci device on its socket.
 */
import { readFile, stat } from "node:fs/promises";
import { join } from "node:path";
import { setTimeout as sleep } from "node:timers/promises";
import { type GuestResult, ManagedProcess, parseRigRecords, type Rig, repoRoot, rigFixture } from "./rig.js";

export interface FsBackendOptions {
  name: string;
  sharedDir: string;
  socket?: string;
  readonly?: boolean;
  cache?: "auto" | "always" | "never";
  maxPages?: number;
  lifetimeMs?: number;
}

export class FsBackend {
  constructor(
    readonly name: string,
    readonly socket: string,
    readonly proc: ManagedProcess,
    readonly logPath: string,
  ) {}

  async log(): Promise<string> {
    return readFile(this.logPath, "utf8").catch(() => "");
  }

  /** The vhost-user requests it logged, in order. */
  async requests(): Promise<{ name: string; detail: string }[]> {
    const out: { name: string; detail: string }[] = [];
    for (const line of (await this.log()).split("\n")) {
      const m = /vmshift fs: trace: (\S+) ?(.*)$/.exec(line);
      if (m) out.push({ name: m[1] as string, detail: m[2] ?? "" });
    }
    return out;
  }

  async close(): Promise<void> {
    await this.proc.stop();
  }
}

export function fsMainPath(): string {
  return join(repoRoot(), "dist", "src", "cli", "fs-main.js");
}

/** Starts `node dist/src/cli/fs-main.js --socket-path ... --shared-dir ...`; resolves once the socket exists. */
export async function startFs(rig: Rig, o: FsBackendOptions): Promise<FsBackend> {
  const socket = o.socket ?? rig.path(`${o.name}.sock`);
  const args = [fsMainPath(), "--socket-path", socket, "--shared-dir", o.sharedDir];
  if (o.readonly) args.push("--readonly");
  if (o.cache) args.push("--cache", o.cache);
  if (o.maxPages) args.push("--max-pages", String(o.maxPages));
  const logPath = rig.path(`${o.name}.log`);
  const saved = process.env.VMSHIFT_FS_TRACE;
  process.env.VMSHIFT_FS_TRACE = "1";
  let proc: ManagedProcess;
  try {
    proc = new ManagedProcess(process.execPath, args, {
      name: `vmshift fs ${o.name}`,
      lifetimeMs: o.lifetimeMs ?? 180_000,
      stderrLog: logPath,
    });
  } finally {
    if (saved === undefined) delete process.env.VMSHIFT_FS_TRACE;
    else process.env.VMSHIFT_FS_TRACE = saved;
  }
  const b = new FsBackend(o.name, socket, proc, logPath);
  const deadline = Date.now() + 10_000;
  for (;;) {
    try {
      if ((await stat(socket)).isSocket()) break;
    } catch {
      // not yet
    }
    if (!proc.running) throw new Error(`${proc.describeExit()} before creating ${socket}: ${proc.stderr().trim()}`);
    if (Date.now() > deadline) {
      await proc.stop();
      throw new Error(`${o.name}: no socket after 10 s: ${proc.stderr().trim()}`);
    }
    await sleep(20);
  }
  return b;
}

/** QEMU arguments for a vhost-user-fs-pci device on `socket` with mount tag `tag`. */
export function fsDeviceArgs(socket: string, tag: string, o: { id?: string; queueSize?: number } = {}): string[] {
  const id = o.id ?? "vfs0";
  let dev = `vhost-user-fs-pci,chardev=${id}-chr,id=${id},tag=${tag}`;
  if (o.queueSize) dev += `,queue-size=${o.queueSize}`;
  return ["-chardev", `socket,id=${id}-chr,path=${socket}`, "-device", dev];
}

/** The value of `name=` in the first `kind` record of a guest command's output. */
export function field(r: GuestResult, kind: string, name: string): string {
  const v = parseRigRecords(r.output, kind)[0]?.fields[name];
  if (v === undefined) throw new Error(`guest: no ${kind} ${name}= in output:\n${r.output.join("\n")}`);
  return v;
}

/** The rig and back-ends of one describe(): created before its tests, closed after them and checked gone. */
export function fsFixture(name: string, available: boolean): { rig(): Rig; backends: { close(): Promise<void> }[] } {
  return rigFixture(name, available);
}
