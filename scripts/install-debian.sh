#!/bin/sh
# Debian packages for the QEMU interop tests (test/interop/), then the rig's guest (kernel + initramfs).
# Run as root. Idempotent; when everything is present it only checks versions and exits (well under a second).
#   - QEMU 10 from bookworm-backports (7.2 from bookworm corrupts destination guests after vhost-user-blk
#     precopy about 1 run in 10 on this kind of machine: see docs/interop-rig.md).
#   - qemu-storage-daemon comes with qemu-system-common (a dependency of qemu-system-x86).
#   - iproute2 (ip netns, veth, tc tbf) for the two-hosts-on-one-machine tests (test/migration/netns.ts).
#   - chromium for the dashboard test (test/cli/dashboard.test.ts drives it headless with playwright-core;
#     the test skips, loudly, without it).
#   - busybox-static and cpio for the guest initramfs; the guest kernel is fetched by scripts/build-guest.sh
#     with `apt-get download` into the cache, never installed on the host.
# Env: VMSHIFT_SKIP_GUEST=1 skips building the guest here (the rig then builds it lazily).
set -eu
cd "$(dirname "$0")/.."

[ "$(id -u)" = 0 ] || { echo "install-debian.sh: needs root (skipping; interop tests will skip)" >&2; exit 0; }
command -v apt-get >/dev/null 2>&1 || { echo "install-debian.sh: no apt-get, not Debian (skipping)" >&2; exit 0; }

CODENAME=$(. /etc/os-release 2>/dev/null && echo "${VERSION_CODENAME:-}")
PKGS="qemu-system-x86 qemu-utils"
EXTRA="busybox-static cpio iproute2 chromium"
export DEBIAN_FRONTEND=noninteractive

# Version of an installed package, empty when it is not installed.
installed() { dpkg-query -W -f '${db:Status-Abbrev}${Version}\n' "$1" 2>/dev/null | sed -n 's/^ii *//p'; }

need=0
for p in $PKGS $EXTRA; do [ -n "$(installed "$p")" ] || need=1; done
if [ "$CODENAME" = bookworm ]; then
  # Backports builds carry "bpo12" in the version; anything else is bookworm's QEMU 7.2.
  case "$(installed qemu-system-x86)" in *bpo12*) ;; *) need=1 ;; esac
  case "$(installed qemu-utils)" in *bpo12*) ;; *) need=1 ;; esac
fi

if [ "$need" = 1 ]; then
  t0=$(date +%s)
  if [ "$CODENAME" = bookworm ]; then
    # The machine's own mirror: the first URIs line (deb822) or deb line (one-line format) that serves
    # the plain "bookworm" suite, so backports comes from the same place as everything else.
    MIRROR=$(cat /etc/apt/sources.list.d/*.sources 2>/dev/null | awk '
      /^URIs:/ { uri = $2 } /^Suites:/ { for (i = 2; i <= NF; i++) if ($i == "bookworm") { print uri; exit } }')
    if [ -z "$MIRROR" ]; then
      MIRROR=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null | awk '
        $1 == "deb" { u = ""; s = ""; for (i = 2; i <= NF; i++) { if ($i ~ /^\[/) { while ($i !~ /\]$/) i++; continue }
          if (u == "") u = $i; else if (s == "") s = $i }
          if (s == "bookworm") { print u; exit } }')
    fi
    [ -n "$MIRROR" ] || { echo "install-debian.sh: no bookworm mirror found in /etc/apt/sources.list*" >&2; exit 1; }
    SRC=/etc/apt/sources.list.d/vmshift-backports.sources
    # Only add our own file when no source already provides bookworm-backports.
    if ! cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources 2>/dev/null |
        grep -q '^[^#]*bookworm-backports'; then
      printf '%s\n' 'Types: deb' "URIs: $MIRROR" 'Suites: bookworm-backports' 'Components: main' \
        'Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg' > "$SRC"
      echo "install-debian.sh: added $SRC ($MIRROR)" >&2
    fi
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends -t bookworm-backports $PKGS
  else
    # Newer Debian (trixie and later) ships QEMU >= 10 in the release itself.
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends $PKGS
  fi
  apt-get install -y -qq --no-install-recommends $EXTRA
  echo "install-debian.sh: packages installed in $(( $(date +%s) - t0 )) s" >&2
fi

command -v qemu-storage-daemon >/dev/null 2>&1 || {
  # Packaged separately in some releases; bookworm/trixie ship it in qemu-system-common.
  apt-get install -y -qq --no-install-recommends qemu-storage-daemon 2>/dev/null || true; }

if [ "${VMSHIFT_SKIP_GUEST:-0}" != 1 ]; then
  sh scripts/build-guest.sh >/dev/null
fi
