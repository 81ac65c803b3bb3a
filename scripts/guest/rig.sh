# Helpers sourced by every script the rig runs in the guest (busybox sh). Sizes are in MiB, offsets in MiB.
# Every result is one line starting with RIG- so the host can parse it from the console.
rig_up() { cut -d' ' -f1 /proc/uptime; }

# rig_write DEV OFF LEN: writes LEN MiB of random data at OFF (O_DIRECT, fsync), prints its sha256.
rig_write() {
  dd if=/dev/urandom of=/tmp/rig-w bs=1M count="$3" 2>/dev/null || return 1
  s=$(sha256sum < /tmp/rig-w | cut -d' ' -f1)
  dd if=/tmp/rig-w of="$1" bs=1M seek="$2" oflag=direct conv=fsync,notrunc 2>/dev/null || { echo "RIG-ERROR write $1"; return 1; }
  rm -f /tmp/rig-w
  echo "RIG-WROTE dev=$1 off=$2 len=$3 sha256=$s"
}

# rig_sum DEV OFF LEN: sha256 of LEN MiB at OFF, read with O_DIRECT (not from the guest's page cache).
rig_sum() {
  s=$(dd if="$1" bs=1M skip="$2" count="$3" iflag=direct 2>/dev/null | sha256sum | cut -d' ' -f1)
  echo "RIG-SUM dev=$1 off=$2 len=$3 sha256=$s"
}

# rig_loop DEV FIRST SLOTS [SLEEP]: background I/O loop until rig_loop_stop. Iteration n writes 1 MiB of
# random data to slot FIRST + n % SLOTS, reads it back with O_DIRECT and compares.
rig_loop() {
  rm -f /tmp/rig-loop-stop
  ( n=0
    while [ ! -e /tmp/rig-loop-stop ]; do
      n=$((n + 1)); off=$(( $2 + n % $3 ))
      dd if=/dev/urandom of=/tmp/rig-l bs=1M count=1 2>/dev/null
      w=$(sha256sum < /tmp/rig-l | cut -d' ' -f1)
      dd if=/tmp/rig-l of="$1" bs=1M seek=$off oflag=direct conv=fsync,notrunc 2>/dev/null
      r=$(dd if="$1" bs=1M skip=$off count=1 iflag=direct 2>/dev/null | sha256sum | cut -d' ' -f1)
      [ "$w" = "$r" ] && st=ok || st=MISMATCH
      echo "RIG-LOOP n=$n off=$off sha256=$w io=$st uptime=$(rig_up)"
      sleep "${4:-0.2}"
    done
    echo "RIG-LOOP-STOPPED n=$n uptime=$(rig_up)"
    rm -f /tmp/rig-l ) > /dev/console 2>&1 &
  echo "RIG-LOOP-STARTED pid=$!"
}
# rig_loop_stop: stops rig_loop after its current iteration and waits for it (at most ~20 s).
rig_loop_stop() {
  touch /tmp/rig-loop-stop
  i=0; while pidof dd >/dev/null 2>&1 || [ -e /tmp/rig-l ]; do sleep 0.1; i=$((i + 1)); [ $i -gt 200 ] && break; done
  sleep 0.3
}

# rig_dirty MIB [SLEEP]: background RAM dirtier (rewrites MIB of tmpfs pages per pass) until rig_dirty_stop.
rig_dirty() {
  rm -f /tmp/rig-dirty-stop
  ( p=0; while [ ! -e /tmp/rig-dirty-stop ]; do
      dd if=/dev/zero of=/tmp/rig-dirty bs=1M count="$1" conv=notrunc 2>/dev/null; p=$((p + 1))
      [ $((p % 10)) = 0 ] && echo "RIG-DIRTY pass=$p uptime=$(rig_up)"
      sleep "${2:-0.1}"
    done; rm -f /tmp/rig-dirty ) > /dev/console 2>&1 &
  echo "RIG-DIRTY-STARTED pid=$!"
}
rig_dirty_stop() { touch /tmp/rig-dirty-stop; sleep 0.3; }

# ---- virtio-fs helpers
# rig_fs_mount TAG DIR: mounts the virtio-fs device tagged TAG on DIR.
rig_fs_mount() {
  mkdir -p "$2" && mount -t virtiofs "$1" "$2" || { echo "RIG-ERROR mount $1"; return 1; }
  echo "RIG-FS-MOUNTED tag=$1 dir=$2"
}
# rig_fwrite FILE MiB: writes MiB MiB of random data to FILE (fsync), prints its sha256.
rig_fwrite() {
  dd if=/dev/urandom of=/tmp/rig-f bs=1M count="$2" 2>/dev/null || return 1
  s=$(sha256sum < /tmp/rig-f | cut -d' ' -f1)
  dd if=/tmp/rig-f of="$1" bs=1M conv=fsync 2>/dev/null || { echo "RIG-ERROR fwrite $1"; rm -f /tmp/rig-f; return 1; }
  rm -f /tmp/rig-f
  echo "RIG-FWROTE file=$1 len=$2 sha256=$s"
}
# rig_fsum FILE: sha256 of FILE read through the back-end (the guest's page cache dropped first).
rig_fsum() {
  sync; echo 3 > /proc/sys/vm/drop_caches
  s=$(sha256sum < "$1" | cut -d' ' -f1) || { echo "RIG-ERROR fsum $1"; return 1; }
  echo "RIG-FSUM file=$1 sha256=$s"
}
# rig_floop DIR [SLEEP]: background file I/O loop until rig_floop_stop. Iteration n writes 1 MiB of random data
# to DIR/floop-<n % 4> through the back-end, drops the page cache, reads it back (READ requests: the back-end
# writes guest memory) and compares.
rig_floop() {
  rm -f /tmp/rig-floop-stop
  ( n=0
    while [ ! -e /tmp/rig-floop-stop ]; do
      n=$((n + 1)); f="$1/floop-$((n % 4))"
      dd if=/dev/urandom of=/tmp/rig-fl bs=1M count=1 2>/dev/null
      w=$(sha256sum < /tmp/rig-fl | cut -d' ' -f1)
      dd if=/tmp/rig-fl of="$f" bs=64k conv=fsync 2>/dev/null
      echo 3 > /proc/sys/vm/drop_caches
      r=$(sha256sum < "$f" | cut -d' ' -f1)
      [ "$w" = "$r" ] && st=ok || st=MISMATCH
      echo "RIG-FLOOP n=$n file=$f sha256=$w io=$st uptime=$(rig_up)"
      sleep "${2:-0.1}"
    done
    echo "RIG-FLOOP-STOPPED n=$n"
    rm -f /tmp/rig-fl ) > /dev/console 2>&1 &
  echo "RIG-FLOOP-STARTED pid=$!"
}
rig_floop_stop() {
  touch /tmp/rig-floop-stop
  i=0; while [ -e /tmp/rig-fl ]; do sleep 0.1; i=$((i + 1)); [ $i -gt 200 ] && break; done
}
# rig_fhold FILE: a background process holds FILE open (fd 3 for reading, fd 4 for appending) until
# /tmp/rig-fhold-go exists; then appends a line through fd 4, drops the page cache, reads the whole
# file through fd 3 (READ requests on the handle opened before) and prints its sha256.
rig_fhold() {
  rm -f /tmp/rig-fhold-go
  ( exec 3<"$1" 4>>"$1"
    echo "RIG-FHOLD-OPEN file=$1"
    while [ ! -e /tmp/rig-fhold-go ]; do sleep 0.1; done
    echo "written-through-the-held-handle" >&4 || echo "RIG-ERROR fhold write"
    sync; echo 3 > /proc/sys/vm/drop_caches
    s=$(sha256sum <&3 | cut -d' ' -f1) || echo "RIG-ERROR fhold read"
    echo "RIG-FHOLD file=$1 sha256=$s"
    exec 3<&- 4>&-
    echo "RIG-FHOLD-CLOSED" ) > /dev/console 2>&1 &
}
