#!/bin/bash
# A whole-volume resync against nbdcopy (issue 17's goal: at least 0.8x), time and CPU, for a machine whose CPUs
# other work shares: alpha and beta on loopback, SIZE MiB (512) of data written by fio into a volume on alpha (no
# snapshot: the resync copies the live volume), then ROUNDS rounds (3) of: a synchronous replica added on beta,
# which has nothing (its data sent, its holes found equal), until in sync; nbdcopy --flush of the same volume over
# alpha's unix socket into a fresh volume on beta. Each line: what, seconds (the resync's from the owner's log),
# MB/s, and CPU seconds per GB of data of alpha, beta and (nbdcopy) nbdcopy itself, from /proc/PID/stat and time(1).
# TREE (default this checkout) runs another checkout's nodes with this script: run it alternately in both.
#   bench/sync-resync-cpu.sh [TREE]      (ROUNDS=3 SIZE=512)
TREE=$(cd "${1:-$(dirname "$0")/..}" && pwd)
NODES=2
# sync-nodes.sh starts the nodes from the checkout it is in: from TREE's.
source <(sed "s#^cd .*#cd $TREE#" "$(dirname "$0")/sync-nodes.sh")
ROUNDS=${ROUNDS:-3}; SIZE=${SIZE:-512}
ticks() { awk '{print $14+$15}' /proc/$1/stat; }
gb=$(node -e "console.log(${SIZE}*1048576/1e9)")
per() { node -e "console.log(((+process.argv[2]-(+process.argv[1]))/100/$gb).toFixed(2))" "$1" "$2"; }
$C volume create src --size ${SIZE}MiB $(api alpha) >/dev/null
fio --name=w --ioengine=nbd --uri="nbd+unix:///src?socket=$D/alpha.sock" --rw=write --bs=1m --iodepth=8 --size=${SIZE}m --refill_buffers >/dev/null 2>&1
for round in $(seq $ROUNDS); do
  $C volume rm src $(api beta) >/dev/null 2>&1 || true
  a0=$(ticks $A); b0=$(ticks $B)
  $C replica add src --peer 127.0.0.1:$PB --sync $(api alpha) >/dev/null
  insync src 1
  a1=$(ticks $A); b1=$(ticks $B)
  # The owner logs the resync's time just after the status says in sync.
  for i in $(seq 50); do [ "$(grep -c 'src: synchronous replica .* is in sync: resync sent' $D/alpha.log)" -ge $round ] && break; sleep 0.1; done
  seconds=$(grep -o 'src: synchronous replica .* is in sync: resync sent [^ ]* [^ ]* in [0-9.]* s' $D/alpha.log | tail -1 | awk '{print $(NF-1)}')
  echo "resync $seconds s $(node -e "console.log((${SIZE}*1048576/1e6/$seconds).toFixed(0))") MB/s cpu/GB alpha $(per $a0 $a1) beta $(per $b0 $b1)"
  $C replica remove src --peer 127.0.0.1:$PB $(api alpha) >/dev/null
  $C volume rm src $(api beta) >/dev/null 2>&1 || true
  $C volume rm copy $(api beta) >/dev/null 2>&1 || true
  $C volume create copy --size ${SIZE}MiB $(api beta) >/dev/null
  a0=$(ticks $A); b0=$(ticks $B)
  start=$(date +%s.%N)
  /usr/bin/time -f '%U %S' -o $D/copytime nbdcopy --flush "nbd+unix:///src?socket=$D/alpha.sock" "nbd+unix:///copy?socket=$D/beta.sock"
  end=$(date +%s.%N)
  a1=$(ticks $A); b1=$(ticks $B)
  seconds=$(node -e 'console.log(((+process.argv[2])-(+process.argv[1])).toFixed(2))' $start $end)
  echo "nbdcopy $seconds s $(node -e "console.log((${SIZE}*1048576/1e6/$seconds).toFixed(0))") MB/s cpu/GB alpha $(per $a0 $a1) beta $(per $b0 $b1) nbdcopy $(awk "{printf \"%.2f\", (\$1+\$2)/$gb}" $D/copytime)"
done
echo "load $(cut -d' ' -f1-3 /proc/loadavg)"
