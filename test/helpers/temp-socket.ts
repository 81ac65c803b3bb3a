/**
 * Unix socket paths for tests in one private directory per test process, removed when the
 * process exits: a back-end the test SIGKILLs cannot unlink its own socket, and socket files
 * must not pile up in the system temp dir run after run.
 */
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";

let dir: string | null = null;

/** A fresh path `<private dir>/<name>.sock` (the directory is 0700, short enough for sun_path). */
export function tempSocketPath(name: string): string {
  if (dir === null) {
    const d = mkdtempSync(join(tmpdir(), "vmshift-t-"));
    dir = d;
    process.on("exit", () => rmSync(d, { recursive: true, force: true }));
  }
  return join(dir, `${name}.sock`);
}
