/** `vmshift snapshot`: save a running workload's memory to a file in the background; restore it. */
import { parseArgs } from "node:util";
import { GuestMemory } from "../memory/guest-memory.js";
import { GuestMemoryRegion } from "../memory/region.js";
import { restoreSnapshot, saveSnapshot } from "../migration/snapshot.js";
import { Workload } from "../migration/workload.js";

export const SNAPSHOT_USAGE = `usage:
  vmshift snapshot save --file PATH [--size MiB] [--rate PAGES/s] [--force] [--json]
        run a writer workload and snapshot its memory while it keeps writing (uffd write-protect);
        the file is created 0600 and never through a symlink; an existing file only with --force
  vmshift snapshot restore --file PATH [--size MiB] [--lazy] [--json]
        restore into fresh memory (eager, or lazily through userfaultfd) and verify the digests`;

export async function snapshotCommand(argv: string[]): Promise<number> {
  const [verb, ...rest] = argv;
  const { values } = parseArgs({
    args: rest,
    options: {
      file: { type: "string" },
      size: { type: "string", default: "64" },
      rate: { type: "string", default: "0" },
      lazy: { type: "boolean", default: false },
      force: { type: "boolean", default: false },
      json: { type: "boolean", default: false },
    },
  });
  if ((verb !== "save" && verb !== "restore") || !values.file) {
    process.stderr.write(`${SNAPSHOT_USAGE}\n`);
    return 2;
  }
  const size = Number(values.size) * 1024 * 1024;
  const memory = new GuestMemory([GuestMemoryRegion.memfd(0, size, { name: "vmshift-snapshot" })]);
  const out = (o: Record<string, unknown>) =>
    process.stdout.write(
      values.json
        ? `${JSON.stringify(o)}\n`
        : `${Object.entries(o)
            .map(([k, v]) => `${k}=${typeof v === "number" ? +v.toFixed(2) : JSON.stringify(v)}`)
            .join(" ")}\n`,
    );
  try {
    if (verb === "save") {
      const wl = await Workload.start({ memory, pagesPerSecond: Number(values.rate), pattern: "random" });
      try {
        await new Promise((r) => setTimeout(r, 200));
        const res = await saveSnapshot({
          memory,
          path: values.file,
          overwrite: values.force,
          hooks: { stopWriters: () => wl.pause(), resumeWriters: () => wl.resume() },
        });
        out({ event: "snapshot", ...res, writerStallMs: wl.stallMs });
      } finally {
        await wl.close();
      }
      return 0;
    }
    const r = await restoreSnapshot({ memory, path: values.file, lazy: values.lazy });
    const res = await r.done;
    out({ event: "restore", ...res, digests: res.digests.map((d) => d.match) });
    return 0;
  } catch (e) {
    const err = e as { code?: string; message?: string };
    out({ event: "error", code: err.code, message: err.message });
    return 1;
  } finally {
    memory.close();
  }
}
