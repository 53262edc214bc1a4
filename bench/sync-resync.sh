#!/bin/bash
# Resync of a synchronous replica: what a link added back sends after 1% of the volume changed (every region is
# dirty to a new link, as after a failover: the checksum compare finds what changed), against a full copy to a
# replica that has nothing. Both nodes on loopback; a 256 MiB volume, 128 MiB of it data; 3 interleaved rounds.
# Each line: case, data bytes sent, bytes found equal, seconds (from the owner's log). Needs fio (nbd engine).
#   bench/sync-resync.sh
source "$(dirname "$0")/sync-nodes.sh"
$C volume create v --size 256MiB --api $D/alpha.api >/dev/null
fio() { command fio --name=w --ioengine=nbd --uri="nbd+unix:///v?socket=$D/alpha.sock" --bs=4k --iodepth=16 --numjobs=1 "$@" >/dev/null 2>&1; }
fio --rw=write --bs=1m --size=128m --refill_buffers
add() {
  $C replica add v --peer 127.0.0.1:$PB --sync --api $D/alpha.api >/dev/null
  for i in $(seq 600); do $C replica status v --api $D/alpha.api --json | grep -q '"state": "in-sync"' && break; sleep 0.2; done
  sleep 0.5
  local status=$($C replica status v --api $D/alpha.api --json)
  local seconds=$(grep -o 'is in sync: resync sent [^ ]* [^ ]* in [0-9.]* s' $D/alpha.log | tail -1 | awk '{print $(NF-1)}')
  echo "$1 $(echo "$status" | node -e 'let s="";process.stdin.on("data",d=>s+=d).on("end",()=>{const r=JSON.parse(s).replicas[0];console.log(r.resyncBytesTotal, r.resyncEqualBytesTotal)})') $seconds"
  $C replica remove v --peer 127.0.0.1:$PB --api $D/alpha.api >/dev/null
}
for round in 1 2 3; do
  $C volume rm v --api $D/beta.api >/dev/null 2>&1 || true
  add full
  # 1% of 256 MiB: 640 distinct random 4 KiB blocks of new data.
  fio --rw=randwrite --io_size=2560k --size=256m --refill_buffers --randseed=$round
  add 1%
done
