#!/bin/sh
# /init of the interop rig's guest (busybox). Loads the virtio modules, then runs a command agent on the
# serial console: the host sends
#     RIGCMD <id>
#     <base64 of a shell script, any number of lines>
#     .
# and the agent prints "RIG-BEGIN <id>", the script's output, then "RIG-END <id> rc=<exit code>".
# Scripts run with /etc/rig.sh sourced (helpers: rig_write, rig_sum, rig_loop, ...) and stdin from /dev/null.
# Kernel cmdline: rig.run=<base64 script> runs once before the agent starts (output between
# RIG-BEGIN boot / RIG-END boot); rig.poweroff=1 powers off after it.
export PATH=/bin:/sbin
/bin/busybox --install -s /bin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev; mount -t tmpfs tmp /tmp
up() { cut -d' ' -f1 /proc/uptime; }
echo "RIG-INIT uptime=$(up)"
for m in $(cat /etc/rig-modules); do insmod "/lib/modules/$m.ko" || echo "RIG-ERROR insmod $m"; done
# The block device node appears shortly after virtio_blk's probe (devtmpfs is asynchronous).
for b in /sys/block/vd*; do
  [ -e "$b" ] || continue
  i=0; while [ ! -b "/dev/${b##*/}" ] && [ $i -lt 50 ]; do sleep 0.05; i=$((i + 1)); done
done
stty -echo -icanon icanon 2>/dev/null; stty -echo 2>/dev/null
RUN=""; OFF=0
for a in $(cat /proc/cmdline); do
  case $a in rig.run=*) RUN=${a#rig.run=} ;; rig.poweroff=1) OFF=1 ;; esac
done
runscript() { # $1 = id, $2 = file with the script
  echo "RIG-BEGIN $1"
  sh -c '. /etc/rig.sh; . "$1"' rig "$2" < /dev/null
  echo "RIG-END $1 rc=$?"
}
if [ -n "$RUN" ]; then
  echo "$RUN" | base64 -d > /tmp/boot.sh && runscript boot /tmp/boot.sh
fi
[ "$OFF" = 1 ] && { echo "RIG-POWEROFF uptime=$(up)"; poweroff -f; }
echo "RIG-READY uptime=$(up) disks=$(ls /sys/block | tr '\n' ' ')"
while IFS= read -r line; do
  case $line in
    "RIGCMD "*)
      id=${line#RIGCMD }
      : > /tmp/cmd.b64
      while IFS= read -r l; do [ "$l" = . ] && break; echo "$l" >> /tmp/cmd.b64; done
      if base64 -d /tmp/cmd.b64 > /tmp/cmd.sh 2>/dev/null; then runscript "$id" /tmp/cmd.sh
      else echo "RIG-BEGIN $id"; echo "RIG-END $id rc=254"; fi
      ;;
    "") ;;
    *) echo "RIG-ERROR unexpected input: $line" ;;
  esac
done
echo "RIG-ERROR console closed"
poweroff -f
