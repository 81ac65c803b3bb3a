/** `vmshift snapshot`: save a running workload's memory to a file in the background; restore it. */
import { unlinkSync } from "node:fs";
import { GuestMemory } from "../memory/guest-memory.js";
import { GuestMemoryRegion } from "../memory/region.js";
import { EVENT_VERSION, r1 } from "../migration/report.js";
import { restoreSnapshot, saveSnapshot } from "../migration/snapshot.js";
import { Workload } from "../migration/workload.js";
import { UsageError } from "./options.js";
import { type CommandContext, defineCommand, EXIT_CANCELLED, EXIT_FAILED, EXIT_OK } from "./runtime.js";

export const SNAPSHOT_USAGE = `usage:
  vmshift snapshot save --file PATH [--size MiB] [--rate PAGES/s] [--force] [--json]
        run a writer workload and snapshot its memory while it keeps writing (userfaultfd
        write-protect: a page is saved before a writer changes it); the file is created 0600,
        never through a symlink, and an existing file is replaced only with --force
  vmshift snapshot restore --file PATH [--size MiB] [--lazy] [--json]
        restore into fresh memory (eager, or lazily through userfaultfd) and verify the digests
  --file PATH       the snapshot file
  --size MiB        guest memory, 1..4096 (default 64; restore: the size it was saved with)
  --rate PAGES/s    save: how fast the workload writes (default 0: as fast as it can)
  --force           save: replace an existing file (never a symlink)
  --lazy            restore: serve pages on first touch, the rest in the background
  --json            one versioned JSON event on stdout (docs/events.schema.json)
exit status: 0 done (restore: verified), 1 failed, 2 bad usage, 130 cancelled (SIGINT)`;

const MiB = 1024 * 1024;

/** Waits for `p` or the cancel signal, whichever first; `p` is always waited for in the end. */
async function orCancel<T>(ctx: CommandContext, p: Promise<T>): Promise<{ value?: T; cancelled: boolean }> {
  p.catch(() => undefined);
  const cancel = new Promise<"cancel">((r) => {
    if (ctx.signal.aborted) r("cancel");
    ctx.signal.addEventListener("abort", () => r("cancel"), { once: true });
  });
  const first = await Promise.race([p.then((v) => ({ v })), cancel]);
  if (first !== "cancel") return { value: first.v, cancelled: false };
  // The library owns its fds until it settles: let it, then report the cancel.
  await p.catch(() => undefined);
  return { cancelled: true };
}

export const snapshotCommand = defineCommand({
  name: "snapshot",
  usage: SNAPSHOT_USAGE,
  positionals: 1,
  options: {
    file: { type: "string" },
    size: { type: "integer", default: 64, min: 1, max: 4096, unit: "MiB" },
    rate: { type: "integer", default: 0, min: 0, unit: "pages/s" },
    lazy: { type: "boolean" },
    force: { type: "boolean" },
    json: { type: "boolean" },
  },
  async run(v, ctx, [verb]) {
    if (verb !== "save" && verb !== "restore")
      throw new UsageError(verb === undefined ? "save or restore?" : `unknown action '${verb}' (save or restore)`);
    if (!v.file) throw new UsageError("--file PATH is required");
    if (verb === "save" && v.lazy) throw new UsageError("--lazy is for restore");
    const file = v.file;
    const t0 = performance.now();
    const event = (e: Record<string, unknown>) => {
      if (v.json) ctx.json({ event: e.event, version: EVENT_VERSION, t: r1(performance.now() - t0), ...e });
    };
    const failed = (e: unknown) => {
      const err = e as { code?: unknown; message?: unknown; offset?: unknown };
      const code = typeof err?.code === "string" ? err.code : "ERROR";
      event({
        event: "failed",
        code,
        message: String(err?.message ?? e),
        offset: typeof err?.offset === "number" ? err.offset : null,
      });
      ctx.log.error({ code }, `snapshot ${verb} failed: ${String(err?.message ?? e)}`);
      return EXIT_FAILED;
    };
    const cancelled = () => {
      event({ event: "cancelled", reason: String((ctx.signal.reason as Error)?.message ?? "cancelled") });
      return EXIT_CANCELLED;
    };
    const memory = new GuestMemory([GuestMemoryRegion.memfd(0, v.size * MiB, { name: "vmshift-snapshot" })]);
    try {
      if (verb === "save") {
        const wl = await Workload.start({ memory, pagesPerSecond: v.rate, pattern: "random" });
        try {
          // Let the writers get going: the snapshot is of memory that is being written.
          const until = performance.now() + 5000;
          while (wl.pagesWritten === 0 && performance.now() < until && !ctx.signal.aborted)
            await new Promise((r) => setTimeout(r, 5));
          const r = await orCancel(
            ctx,
            saveSnapshot({
              memory,
              path: file,
              overwrite: v.force === true,
              hooks: { stopWriters: () => wl.pause(), resumeWriters: () => wl.resume() },
            }),
          );
          if (r.cancelled) {
            try {
              unlinkSync(file);
            } catch {
              // never written
            }
            return cancelled();
          }
          const res = r.value as Awaited<ReturnType<typeof saveSnapshot>>;
          event({
            event: "snapshot",
            file,
            fileBytes: res.fileBytes,
            pagesSaved: res.pagesSaved,
            zeroPages: res.zeroPages,
            totalMs: r1(res.totalMs),
            pauseMs: r1(res.pauseMs),
            writeFaults: res.writeFaults,
            writeFaultMedianUs: r1(res.writeFaultMedianUs),
            writeFaultP99Us: r1(res.writeFaultP99Us),
            writerStallMs: r1(wl.stallMs),
            digests: res.digests,
          });
          if (!v.json)
            ctx.out(
              `saved ${v.size} MiB of running memory to ${file} (${(res.fileBytes / MiB).toFixed(1)} MiB) in ` +
                `${res.totalMs.toFixed(0)} ms: ${res.pagesSaved} pages (${res.zeroPages} zero), writers paused ` +
                `${res.pauseMs.toFixed(1)} ms, ${res.writeFaults} write faults (median ` +
                `${res.writeFaultMedianUs.toFixed(0)} µs), writers stalled ${wl.stallMs.toFixed(1)} ms`,
            );
          return EXIT_OK;
        } finally {
          await wl.close();
        }
      }
      const r = await orCancel(
        ctx,
        restoreSnapshot({ memory, path: file, lazy: v.lazy }).then((x) => x.done),
      );
      if (r.cancelled) return cancelled();
      const res = r.value as Awaited<Awaited<ReturnType<typeof restoreSnapshot>>["done"]>;
      const verified = res.digests.every((d) => d.match);
      event({
        event: "restore",
        file,
        lazy: v.lazy,
        verified,
        totalMs: r1(res.totalMs),
        pagesRestored: res.pagesRestored,
        faults: res.faults,
        faultMedianUs: r1(res.faultMedianUs),
        faultP99Us: r1(res.faultP99Us),
        digests: res.digests,
      });
      if (!v.json)
        ctx.out(
          `restored ${file}${v.lazy ? " lazily" : ""} in ${res.totalMs.toFixed(0)} ms: ${res.pagesRestored} pages` +
            `${v.lazy ? `, ${res.faults} faults served (median ${res.faultMedianUs.toFixed(0)} µs)` : ""}; ` +
            `${verified ? "digests match: verified" : "DIGESTS DIFFER"}`,
        );
      return verified ? EXIT_OK : EXIT_FAILED;
    } catch (e) {
      return failed(e);
    } finally {
      memory.close();
    }
  },
});
