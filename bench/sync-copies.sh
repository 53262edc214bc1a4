#!/bin/bash
# Issue 17's same-run comparison of copies: a volume with no replica, with one synchronous replica (beta) and with two
# (beta and gamma), three nodes on loopback on this machine's CPUs; fio's nbd engine on alpha's unix socket, rows
# 4 KiB random write QD32, 1 MiB sequential write QD8 and 4 KiB random read QD32 (reads should not change: they are
# served by the owner alone); the three volumes interleaved, ROUNDS rounds (3) of RUNTIME s (8) after a 2 s ramp.
# Each line: row, volume, IOPS, MB/s, p50 and p99 completion latency in microseconds. Then a resync's throughput
# against nbdcopy: SIZE (512 MiB) of data on a volume, a synchronous replica added on beta that has nothing (the
# whole volume resynced: its data sent, its holes found equal), against nbdcopy --flush of the same volume's snapshot
# over alpha's unix socket into a fresh volume on beta, interleaved, ROUNDS rounds; MB/s of volume data per second.
#   bench/sync-copies.sh            (ROUNDS=1 RUNTIME=3 SIZE=64 for a check that it works)
#   ONLY=resync bench/sync-copies.sh   (the resync against nbdcopy alone, no fio rows)
NODES=3
source "$(dirname "$0")/sync-nodes.sh"
ROUNDS=${ROUNDS:-3}; RUNTIME=${RUNTIME:-8}; SIZE=${SIZE:-512}
if [ "${ONLY:-}" != resync ]; then
for v in none one two; do $C volume create $v --size 1GiB $(api alpha) >/dev/null; done
$C replica add one --peer 127.0.0.1:$PB --sync $(api alpha) >/dev/null
$C replica add two --peer 127.0.0.1:$PB --sync $(api alpha) >/dev/null
$C replica add two --peer 127.0.0.1:$PC --sync $(api alpha) >/dev/null
insync one 1; insync two 2
fio_json() {
  fio --name=w --ioengine=nbd --uri="nbd+unix:///$1?socket=$D/alpha.sock" --size=1g --time_based --runtime=$RUNTIME --ramp_time=2 \
    --numjobs=1 --refill_buffers --output-format=json "${@:2}" 2>/dev/null | sed -n '/^{/,$p'
}
row() {
  local name=$1 volume=$2 kind=$3; shift 3
  fio_json $volume "$@" | node -e 'let s="";process.stdin.on("data",d=>s+=d).on("end",()=>{const j=JSON.parse(s).jobs[0]['"\"$kind\""'];const p=j.clat_ns.percentile;console.log(process.argv[1], process.argv[2], Math.round(j.iops), (j.bw_bytes/1e6).toFixed(0), (p["50.000000"]/1000).toFixed(0), (p["99.000000"]/1000).toFixed(0))})' "$name" "$volume"
}
# The read rows read written data: fill each volume once (through its replicas).
for v in none one two; do fio_json $v --rw=write --bs=1m --iodepth=8 --time_based=0 --runtime=0 --ramp_time=0 >/dev/null; done
for round in $(seq $ROUNDS); do
  for v in none one two; do row randwrite-4k-qd32 $v write --rw=randwrite --bs=4k --iodepth=32; done
  for v in none one two; do row write-1m-qd8 $v write --rw=write --bs=1m --iodepth=8; done
  for v in none one two; do row randread-4k-qd32 $v read --rw=randread --bs=4k --iodepth=32; done
done
for v in one two; do $C replica status $v $(api alpha); done
fi
# Resync against nbdcopy.
$C volume create src --size ${SIZE}MiB $(api alpha) >/dev/null
fio --name=w --ioengine=nbd --uri="nbd+unix:///src?socket=$D/alpha.sock" --rw=write --bs=1m --iodepth=8 --size=${SIZE}m --refill_buffers >/dev/null 2>&1
$C snapshot create src base $(api alpha) >/dev/null
for round in $(seq $ROUNDS); do
  $C volume rm src $(api beta) >/dev/null 2>&1 || true
  start=$(date +%s.%N)
  $C replica add src --peer 127.0.0.1:$PB --sync $(api alpha) >/dev/null
  insync src 1
  end=$(date +%s.%N)
  # The resync's own time (the owner's log, from the link's start to in sync) and the command's (CLI starts, polling).
  seconds=$(grep -o 'src: synchronous replica .* is in sync: resync sent [^ ]* [^ ]* in [0-9.]* s' $D/alpha.log | tail -1 | awk '{print $(NF-1)}')
  echo "resync $(node -e 'const s=+process.argv[1];console.log(s.toFixed(2), "s", (process.argv[2]*1048576/1e6/s).toFixed(0), "MB/s")' $seconds $SIZE) (command $(node -e 'console.log(((+process.argv[2])-(+process.argv[1])).toFixed(2))' $start $end) s)"
  $C replica remove src --peer 127.0.0.1:$PB $(api alpha) >/dev/null
  $C volume rm src $(api beta) >/dev/null 2>&1 || true
  $C volume rm copy $(api beta) >/dev/null 2>&1 || true
  $C volume create copy --size ${SIZE}MiB $(api beta) >/dev/null
  start=$(date +%s.%N)
  nbdcopy --flush "nbd+unix:///src@base?socket=$D/alpha.sock" "nbd+unix:///copy?socket=$D/beta.sock"
  end=$(date +%s.%N)
  echo "nbdcopy $(node -e 'const s=(+process.argv[2])-(+process.argv[1]);console.log(s.toFixed(2), "s", (process.argv[3]*1048576/1e6/s).toFixed(0), "MB/s")' $start $end $SIZE)"
done
