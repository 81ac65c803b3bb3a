/**
 * The package as a user gets it: `npm pack` (prepack builds and puts the Node-API binary in
 * prebuilds/linux-x64/), then `npm install <tarball>` into an empty temporary project, offline
 * and with an empty HOME (no ~/.npmrc: no nodedir, nothing from this machine's npm config), and
 * there: `import "vmshift"` and `"vmshift/memory"` (with types: tsc checks a file against the
 * installed .d.ts), a native call served by the prebuilt binary, and `npx vmshift --version`.
 *
 * Runs on the Node that runs the test, and on every Node listed in VMSHIFT_PACK_NODES
 * (colon-separated executables; CI lists its Node 26): the very same binary must load on each.
 */
import assert from "node:assert/strict";
import { execFileSync, spawnSync } from "node:child_process";
import { createHash } from "node:crypto";
import { mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { test } from "node:test";
import { fileURLToPath } from "node:url";

const ROOT = fileURLToPath(new URL("../../../", import.meta.url));
const VERSION = (JSON.parse(readFileSync(join(ROOT, "package.json"), "utf8")) as { version: string }).version;
const PREBUILD = join("prebuilds", "linux-x64", "vmshift.napi.node");

/** This process's environment minus npm's and node:test's own variables, with `node` first on PATH. */
function cleanEnv(node: string, home: string): NodeJS.ProcessEnv {
  const env: NodeJS.ProcessEnv = {};
  for (const [k, v] of Object.entries(process.env)) {
    if (/^npm_/i.test(k) || k === "NODE_TEST_CONTEXT" || k === "NODE_OPTIONS" || k === "INIT_CWD") continue;
    env[k] = v;
  }
  env.HOME = home;
  env.PATH = `${dirname(node)}:${process.env.PATH ?? ""}`;
  env.npm_config_update_notifier = "false";
  return env;
}

function sh(cmd: string, args: string[], cwd: string, env: NodeJS.ProcessEnv): string {
  const r = spawnSync(cmd, args, { cwd, env, encoding: "utf8", timeout: 300_000 });
  assert.equal(r.status, 0, `${cmd} ${args.join(" ")} (in ${cwd}) exited ${r.status}:\n${r.stdout}\n${r.stderr}`);
  return r.stdout;
}

const sha256 = (path: string) => createHash("sha256").update(readFileSync(path)).digest("hex");

const PROBE = `
import * as top from "vmshift";
import * as memory from "vmshift/memory";
import { nativeAddonPath } from "vmshift/sys";
for (const n of ["GuestMemory", "GuestMemoryRegion", "DirtyTracker", "SharedDirtyLog", "VhostUserDaemon",
                 "VhostUserFrontend", "MigrationSource", "MigrationDestination", "MigrationError", "NativeLoadError"])
  if (typeof top[n] !== "function") throw new Error("vmshift lacks " + n);
if (top.GuestMemory !== memory.GuestMemory) throw new Error("vmshift/memory is another module instance");
const m = top.Mapping.anonymous(1 << 20);
new Uint8Array(m.windows[0])[4095] = 7;
if (!(m.windows[0] instanceof SharedArrayBuffer)) throw new Error("not a SharedArrayBuffer");
m.close();
console.log(JSON.stringify({ node: process.version, addon: nativeAddonPath(), version: top.VERSION }));
`;

const TYPES = `
import { GuestMemory, MigrationSource, type SourceOptions, VERSION } from "vmshift";
import { AtomicBitmap, type DirtySource } from "vmshift/memory";
import type { VhostUserFrontend } from "vmshift/vhost-user";
export const classes: unknown[] = [GuestMemory, MigrationSource, AtomicBitmap];
export type Uses = [SourceOptions, DirtySource, VhostUserFrontend];
export const v: string = VERSION;
// @ts-expect-error VERSION is a string: if the package's types were missing (any), this line would not be an error
export const n: number = VERSION;
`;

test("npm pack, install into an empty project offline, import vmshift and vmshift/memory, npx vmshift --version", () => {
  const work = mkdtempSync(join(tmpdir(), "vmshift-pack-"));
  try {
    const home = join(work, "home");
    mkdirSync(home);
    // npm pack runs prepack (build + prebuild) with this checkout's own scripts and pinned Node.
    const packOut = execFileSync("npm", ["pack", "--pack-destination", work, "--json", "--silent"], {
      cwd: ROOT,
      encoding: "utf8",
      env: { ...process.env, npm_config_update_notifier: "false" },
      timeout: 600_000,
      stdio: ["ignore", "pipe", "inherit"],
    });
    const [info] = JSON.parse(packOut.slice(packOut.indexOf("["))) as [{ filename: string; files: { path: string }[] }];
    const files = info.files.map((f) => f.path);
    assert.ok(files.includes(PREBUILD), "the prebuilt binary is in the tarball");
    assert.ok(files.includes("LICENSE") && files.includes("dist/src/index.d.ts"));
    // Our own files only: the bundled runtime dependencies (pino, prom-client) ship as published.
    const unwanted = files.filter(
      (f) => !f.startsWith("node_modules/") && /^(test|bench)\/|^dist\/(test|bench)\/|\.map$|\.tsbuildinfo$/.test(f),
    );
    assert.deepEqual(unwanted, [], "no tests, benchmarks or source maps in the tarball");
    const tarball = join(work, info.filename);

    const nodes = [process.execPath, ...(process.env.VMSHIFT_PACK_NODES ?? "").split(":").filter(Boolean)];
    const loaded = new Map<string, string>();
    for (const node of nodes) {
      const project = join(work, `project-${loaded.size}`);
      mkdirSync(project);
      writeFileSync(join(project, "package.json"), JSON.stringify({ name: "probe", private: true, type: "module" }));
      const env = cleanEnv(node, home);
      // No dependencies to fetch and a prebuilt binary: nothing to download, nothing to compile.
      sh("npm", ["install", "--offline", "--no-audit", "--no-fund", tarball], project, env);
      writeFileSync(join(project, "probe.mjs"), PROBE);
      const probe = JSON.parse(sh(node, ["probe.mjs"], project, env).trim()) as {
        node: string;
        addon: string;
        version: string;
      };
      assert.equal(probe.addon, join(project, "node_modules", "vmshift", PREBUILD), "the prebuild is what loads");
      assert.equal(probe.version, VERSION);
      loaded.set(probe.node, sha256(probe.addon));
      assert.equal(sh("npx", ["vmshift", "--version"], project, env), `vmshift ${VERSION}\n`);
      writeFileSync(join(project, "types.mts"), TYPES);
      sh(
        node,
        [
          join(ROOT, "node_modules", "typescript", "bin", "tsc"),
          "--noEmit",
          "--strict",
          "--module",
          "nodenext",
          "--moduleResolution",
          "nodenext",
          "--target",
          "es2022",
          "--lib",
          "es2022,es2024.sharedmemory,esnext.disposable",
          "--types",
          "node",
          "--typeRoots",
          join(ROOT, "node_modules", "@types"),
          "types.mts",
        ],
        project,
        env,
      );
    }
    assert.equal(new Set(loaded.values()).size, 1, `one binary on every Node line: ${JSON.stringify([...loaded])}`);
  } finally {
    rmSync(work, { recursive: true, force: true });
  }
});
