#!/bin/bash
# Same-run comparison: 4 KiB random writes at QD32 (fio nbd engine, 1 job) to a volume without and with one
# synchronous replica, both nodes on loopback; interleaved, 3 rounds of 10 s each. Each line: configuration, IOPS,
# p50 and p99 completion latency in microseconds. Needs fio with its nbd engine. Run from anywhere:
#   bench/sync-replicas.sh
source "$(dirname "$0")/sync-nodes.sh"
$C volume create plain --size 1GiB --api $D/alpha.api >/dev/null
$C volume create synced --size 1GiB --api $D/alpha.api >/dev/null
$C replica add synced --peer 127.0.0.1:$PB --sync --api $D/alpha.api >/dev/null
for i in $(seq 100); do $C replica status synced --api $D/alpha.api | grep -q 'in-sync' && break; sleep 0.2; done
run() {
  fio --name=w --ioengine=nbd --uri="nbd+unix:///$1?socket=$D/alpha.sock" --rw=randwrite --bs=4k --iodepth=32 --numjobs=1 \
    --size=1g --time_based --runtime=10 --ramp_time=2 --output-format=json 2>/dev/null | sed -n '/^{/,$p' \
    | node -e 'let s="";process.stdin.on("data",d=>s+=d).on("end",()=>{const j=JSON.parse(s).jobs[0].write;console.log(Math.round(j.iops), (j.clat_ns.percentile["50.000000"]/1000).toFixed(0), (j.clat_ns.percentile["99.000000"]/1000).toFixed(0))})'
}
for round in 1 2 3; do
  echo "plain  $(run plain)"
  echo "synced $(run synced)"
done
$C replica status synced --api $D/alpha.api
