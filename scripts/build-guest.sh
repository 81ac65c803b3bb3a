#!/bin/sh
# Builds the interop rig's guest: Debian's cloud kernel (fetched with `apt-get download`, unpacked into the
# cache, never installed on the host) and a busybox initramfs whose /init is scripts/guest/init.sh.
# Output dir: ${VMSHIFT_CACHE:-<repo>/.tmp/cache}/guest. Prints shell assignments KERNEL=, INITRD=, KVER=.
# Cached: a second run with unchanged inputs returns at once (no apt query).
# Env: VMSHIFT_GUEST_KERNEL_PKG (default: what linux-image-cloud-amd64 depends on), VMSHIFT_GUEST_REBUILD=1.
# Needs: busybox-static, cpio, gzip, apt-get + dpkg-deb (scripts/install-debian.sh installs them).
# Optional: gcc + libc6-dev, for /bin/vmshift-io (scripts/guest/vmshift-io.c, compiled -static; the bench's in-guest
# I/O tool). Without them the guest is built without the tool (a warning, IOTOOL= empty) and the bench says so.
set -eu
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
CACHE=${VMSHIFT_CACHE:-$REPO/.tmp/cache}
OUT=$CACHE/guest
mkdir -p "$OUT"

BUSYBOX=${VMSHIFT_BUSYBOX:-/bin/busybox}
[ -x "$BUSYBOX" ] || { echo "build-guest.sh: $BUSYBOX missing (apt-get install busybox-static)" >&2; exit 1; }
case "$(file -b "$BUSYBOX" 2>/dev/null || echo unknown)" in
  *dynamically*) echo "build-guest.sh: $BUSYBOX is dynamically linked (install busybox-static)" >&2; exit 1 ;;
esac
command -v cpio >/dev/null 2>&1 || { echo "build-guest.sh: cpio missing (apt-get install cpio)" >&2; exit 1; }

GUEST_CC=${VMSHIFT_GUEST_CC:-$(command -v gcc || true)}
# The tool's source and which compiler is there are part of the key: editing vmshift-io.c or installing gcc rebuilds.
KEY=$( (cat "$0" "$HERE/guest/init.sh" "$HERE/guest/rig.sh" "$HERE/guest/vmshift-io.c" "$BUSYBOX"; echo "cc=${GUEST_CC:-none}") | sha256sum | cut -c1-16)-${VMSHIFT_GUEST_KERNEL_PKG:-default}
emit() { IOTOOL=; . "$OUT/guest.env"; echo "KERNEL=$KERNEL"; echo "INITRD=$INITRD"; echo "KVER=$KVER"; echo "IOTOOL=$IOTOOL"; }
if [ "${VMSHIFT_GUEST_REBUILD:-0}" != 1 ] && [ -f "$OUT/stamp" ] && [ "$(cat "$OUT/stamp")" = "$KEY" ] && [ -f "$OUT/guest.env" ]; then
  emit; exit 0
fi
t0=$(date +%s)

# ---- kernel: unpack once per package into $OUT/kernel/<pkg>/ ----
KPKG=${VMSHIFT_GUEST_KERNEL_PKG:-}
resolve() { apt-cache depends linux-image-cloud-amd64 2>/dev/null | sed -n 's/^ *Depends: *\(linux-image-[^ ]*\).*/\1/p' | head -n 1; }
if [ -z "$KPKG" ]; then
  KPKG=$(resolve)
  if [ -z "$KPKG" ] && [ "$(id -u)" = 0 ]; then apt-get update -qq >&2; KPKG=$(resolve); fi
  [ -n "$KPKG" ] || { echo "build-guest.sh: cannot resolve linux-image-cloud-amd64 (apt-get update?)" >&2; exit 1; }
fi
KDIR=$OUT/kernel/$KPKG
# Layout 2 adds fs/fuse (virtiofs); an older unpack is redone.
if ! ls "$KDIR"/boot/vmlinuz-* >/dev/null 2>&1 || [ "$(cat "$KDIR/layout" 2>/dev/null)" != 2 ]; then
  T=$(mktemp -d "$OUT/dl.XXXXXX")
  trap 'rm -rf "$T"' EXIT
  ( cd "$T" && apt-get download -q -o APT::Sandbox::User=root "$KPKG" >&2 ) || {
    [ "$(id -u)" = 0 ] && apt-get update -qq >&2
    ( cd "$T" && apt-get download -q -o APT::Sandbox::User=root "$KPKG" >&2 ); }
  mkdir -p "$T/root"
  dpkg-deb -x "$T"/*.deb "$T/root"
  rm -rf "$KDIR"; mkdir -p "$KDIR/boot" "$KDIR/modules"
  cp "$T"/root/boot/vmlinuz-* "$KDIR/boot/"
  MODROOT=$(ls -d "$T"/root/lib/modules/* "$T"/root/usr/lib/modules/* 2>/dev/null | head -n 1)
  # Only the virtio drivers and FUSE (virtiofs) are kept: the initramfs needs nothing else.
  for d in kernel/drivers/virtio kernel/drivers/block kernel/drivers/char kernel/fs/fuse; do
    [ -d "$MODROOT/$d" ] && mkdir -p "$KDIR/modules/$d" && cp -r "$MODROOT/$d/." "$KDIR/modules/$d/"
  done
  basename "$MODROOT" > "$KDIR/kver"
  echo 2 > "$KDIR/layout"
  rm -rf "$T"; trap - EXIT
fi
KVER=$(cat "$KDIR/kver")
KERNEL=$(ls "$KDIR"/boot/vmlinuz-* | head -n 1)

# ---- initramfs ----
W=$(mktemp -d "$OUT/initramfs.XXXXXX")
trap 'rm -rf "$W"' EXIT
mkdir -p "$W/bin" "$W/sbin" "$W/proc" "$W/sys" "$W/dev" "$W/tmp" "$W/etc" "$W/lib/modules"
cp "$BUSYBOX" "$W/bin/busybox"
ln -s busybox "$W/bin/sh"
# Loaded in this order (dependencies first); a module the kernel has built in is simply absent.
ORDER=""
add() {
  case " $ORDER " in *" $1 "*) return ;; esac
  src=$(find "$KDIR/modules" -name "$1.ko" -o -name "$1.ko.xz" -o -name "$1.ko.zst" -o -name "$1.ko.gz" | head -n 1)
  [ -n "$src" ] || return 0
  dst="$W/lib/modules/$1.ko"
  case "$src" in
    *.ko) cp "$src" "$dst" ;;
    *.ko.xz) xz -dc "$src" > "$dst" ;;
    *.ko.zst) zstd -dcq "$src" > "$dst" ;;
    *.ko.gz) gzip -dc "$src" > "$dst" ;;
  esac
  # .modinfo holds "depends=a,b" (what modinfo -F depends prints); module names use '_' (or '-').
  deps=$(grep -a -o 'depends=[A-Za-z0-9_,-]*' "$dst" | head -n 1 | sed 's/^depends=//; s/,/ /g; s/-/_/g')
  for d in $deps; do add "$d"; done
  ORDER="$ORDER $1"
}
for m in virtio_pci virtio_blk virtio_console virtiofs virtio_mem; do add "$m"; done
echo $ORDER > "$W/etc/rig-modules"
cp "$HERE/guest/init.sh" "$W/init"; chmod 755 "$W/init"
cp "$HERE/guest/rig.sh" "$W/etc/rig.sh"
IOTOOL=
if [ -n "$GUEST_CC" ] && "$GUEST_CC" -static -O2 -s -o "$W/bin/vmshift-io" "$HERE/guest/vmshift-io.c" >&2; then
  IOTOOL=/bin/vmshift-io
else
  rm -f "$W/bin/vmshift-io"
  echo "build-guest.sh: warning: no /bin/vmshift-io in the guest (${GUEST_CC:-gcc not found}; needs gcc + libc6-dev for -static)" >&2
fi
(cd "$W" && find . | LC_ALL=C sort | cpio -o -H newc --quiet -R 0:0 | gzip -6) > "$OUT/initramfs.cpio.gz.new"
mv "$OUT/initramfs.cpio.gz.new" "$OUT/initramfs.cpio.gz"
rm -rf "$W"; trap - EXIT
printf 'KERNEL=%s\nINITRD=%s\nKVER=%s\nMODULES="%s"\nIOTOOL=%s\n' "$KERNEL" "$OUT/initramfs.cpio.gz" "$KVER" "$ORDER" "$IOTOOL" > "$OUT/guest.env"
echo "$KEY" > "$OUT/stamp"
echo "build-guest.sh: kernel $KVER ($KPKG), modules:$ORDER, io tool: ${IOTOOL:-none}, built in $(( $(date +%s) - t0 )) s" >&2
emit
