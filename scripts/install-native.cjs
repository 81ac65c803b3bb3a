// The package's install step: nothing to do when the prebuilt binary (prebuilds/linux-x64/) loads
// on this Node, which is the normal case; a source build of native/ only when no prebuild fits.
// A failed source build is reported but does not fail the install: `vmshift --help`, `--version`
// and `blk --print-capabilities` work without the addon, and any call that needs it says why.
"use strict";
const { existsSync, realpathSync } = require("node:fs");
const { join, resolve } = require("node:path");
const { spawnSync } = require("node:child_process");

const root = resolve(__dirname, "..");
// A source checkout builds its addon with `npm run build`; nothing to do at `npm install` there.
if (existsSync(join(root, "src", "sys", "native.ts"))) process.exit(0);

const candidates = [
  join(root, "prebuilds", `${process.platform}-${process.arch}`, "vmshift.napi.node"),
  join(root, "native", "build", "Release", "vmshift.node"),
];
const failures = [];
for (const path of candidates) {
  if (!existsSync(path)) continue;
  try {
    require(path);
    process.exit(0);
  } catch (e) {
    failures.push(`${path}: ${e.message}`);
  }
}

console.error(`vmshift: no prebuilt addon fits Node ${process.version} ${process.platform}-${process.arch}; building from source`);
for (const f of failures) console.error(`  ${f}`);
const prefix = resolve(realpathSync(process.execPath), "..", "..");
const args = ["rebuild", "--directory=native", "--jobs=2"];
// The running Node's own headers when it has them (official builds, nvm, distro packages).
if (existsSync(join(prefix, "include", "node", "node_api.h"))) args.push(`--nodedir=${prefix}`);
const env = { ...process.env };
delete env.npm_config_nodedir;
delete env.NPM_CONFIG_NODEDIR;
const gyp = process.env.npm_config_node_gyp;
const r = gyp
  ? spawnSync(process.execPath, [gyp, ...args], { cwd: root, env, stdio: "inherit" })
  : spawnSync("node-gyp", args, { cwd: root, env, stdio: "inherit" });
if (r.status !== 0) {
  console.error(
    "vmshift: the native addon could not be built; commands that need it will fail with NativeLoadError " +
      "(vmshift needs Node.js ^24.16.0 or >=26.1.0 on linux-x64, and a C++ compiler for a source build)",
  );
}
