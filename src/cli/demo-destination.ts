/**
 * `vmshift demo-destination` (internal): the second process of `vmshift demo`. Listens on
 * the endpoint it is given, receives the guest's memory and (with KVM) its vCPU, runs it
 * here, and prints JSON lines on stdout for the parent: `listening`, the migration's events,
 * then one `destination-result` (the engine's result, the counter continuity, the reports the
 * guest made here after it, or `error`).
 */
import { parseArgs } from "node:util";
import { GuestMemory } from "../memory/guest-memory.js";
import { GuestMemoryRegion } from "../memory/region.js";
import { MigrationDestination } from "../migration/destination.js";
import { MigrationReport } from "../migration/report.js";
import { MigrationListener, parseEndpoint } from "../migration/transport.js";
import { Workload } from "../migration/workload.js";
import { VmDestination } from "../vm/migrate.js";
import { safeJson } from "./printable.js";

const MiB = 1024 * 1024;

export function demoMemory(sizeMiB: number, name: string): GuestMemory {
  return new GuestMemory([GuestMemoryRegion.memfd(0, sizeMiB * MiB, { name })]);
}

export async function demoDestinationCommand(argv: string[]): Promise<number> {
  const { values } = parseArgs({
    args: argv,
    options: {
      listen: { type: "string" },
      size: { type: "string" },
      mode: { type: "string", default: "precopy" },
      guest: { type: "string", default: "kvm" },
      "accept-timeout": { type: "string", default: "10000" },
    },
  });
  const out = (o: Record<string, unknown>) => process.stdout.write(`${safeJson(o)}\n`);
  const size = Number(values.size);
  if (!values.listen || !Number.isInteger(size) || size < 4) {
    out({
      event: "error",
      code: "USAGE",
      message: "demo-destination --listen EP --size MiB [--mode M] [--guest kvm|workload]",
    });
    return 2;
  }
  const mode = values.mode === "postcopy" ? "postcopy" : "precopy";
  const kvm = values.guest === "kvm";
  const memory = demoMemory(size, "vmshift-demo-dst");
  const vmDest = kvm ? new VmDestination({ memory, mode }) : null;
  let workload: Workload | null = null;
  let listener: MigrationListener | null = null;
  let report: MigrationReport | null = null;
  try {
    listener = await MigrationListener.listen(parseEndpoint(values.listen));
    out({ event: "listening", endpoint: values.listen });
    let timer: NodeJS.Timeout | undefined;
    const stream = await Promise.race([
      listener.accept(),
      new Promise<never>((_, rej) => {
        timer = setTimeout(() => rej(new Error("no source connected")), Number(values["accept-timeout"]));
      }),
    ]).finally(() => clearTimeout(timer));
    const l = listener;
    const dest = new MigrationDestination({
      memory,
      // A postcopy source opens a second connection: the preempt channel.
      acceptPreempt: () => l.accept("preempt"),
      hooks: vmDest
        ? vmDest.hooks()
        : {
            // Without KVM the "guest" here is a worker thread that reads its memory (postcopy: faults it in).
            resume: async () => {
              workload = await Workload.start({ memory, mode: "touch", pattern: "sequential", threads: 1 });
            },
          },
    });
    vmDest?.attach(dest);
    // The destination's own view, in the versioned events the parent relays.
    report = new MigrationReport({
      role: "destination",
      mode,
      events: dest.events,
      totalBytes: memory.size,
      transferred: () => stream.bytesRead,
      emit: (e) => out(e as unknown as Record<string, unknown>),
    });
    const result = await dest.run(stream);
    await listener.close();
    listener = null;
    let after: number | null = null;
    if (vmDest) after = await vmDest.keepRunning(5);
    const { roundStats: _r, ...rest } = result;
    out({ event: "destination-result", result: rest, counter: vmDest?.continuity ?? null, progressAfter: after });
    return 0;
  } catch (e) {
    const err = e as { code?: string; message?: string };
    (report as MigrationReport | null)?.failed(e);
    out({ event: "error", role: "destination", code: err.code ?? "ERROR", message: err.message ?? String(e) });
    return 1;
  } finally {
    await listener?.close();
    await (workload as Workload | null)?.close();
    await vmDest?.close();
    memory.close();
  }
}
