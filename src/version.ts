/** The package's version, read from its package.json (one source of truth; no build step). */
import { createRequire } from "node:module";

const require = createRequire(import.meta.url);
// dist/src/version.js and src/version.ts are both two levels below the package root... or one:
// try the compiled layout first, then the source layout.
function readVersion(): string {
  for (const rel of ["../../package.json", "../package.json"]) {
    try {
      const pkg = require(rel) as { name?: string; version?: string };
      if (pkg.name === "vmshift" && typeof pkg.version === "string") return pkg.version;
    } catch {
      // not this layout
    }
  }
  return "0.0.0-unknown";
}

export const VERSION: string = readVersion();
