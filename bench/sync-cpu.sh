#!/bin/bash
# CPU per replicated write (issue 17): the same three nodes and volumes as bench/sync-copies.sh (no replica, one
# synchronous replica on beta, two on beta and gamma; all on this machine's CPUs), fio's nbd engine on alpha, and
# each process's utime + stime from /proc/PID/stat over each fio run, divided by the writes it made. Each line: row,
# volume, IOPS, then microseconds of CPU per write of alpha (the owner), beta, gamma and fio, and p50/p99 completion
# latency in microseconds. TREE (default this checkout) runs another checkout's nodes with this script, so that a
# base can be measured in turn with the same code: run it alternately in both.
#   bench/sync-cpu.sh [TREE]      (ROWS="4k 1m", VOLS="none one two", ROUNDS=1, RUNTIME=6)
TREE=$(cd "${1:-$(dirname "$0")/..}" && pwd)
NODES=3
# sync-nodes.sh starts the nodes from the checkout it is in: from TREE's.
source <(sed "s#^cd .*#cd $TREE#" "$(dirname "$0")/sync-nodes.sh")
RUNTIME=${RUNTIME:-6}
for v in none one two; do $C volume create $v --size 1GiB $(api alpha) >/dev/null; done
$C replica add one --peer 127.0.0.1:$PB --sync $(api alpha) >/dev/null
$C replica add two --peer 127.0.0.1:$PB --sync $(api alpha) >/dev/null
$C replica add two --peer 127.0.0.1:$PC --sync $(api alpha) >/dev/null
insync one 1; insync two 2
ticks() { awk '{print $14+$15}' /proc/$1/stat; }
row() {
  local name=$1 v=$2; shift 2
  local a0=$(ticks $A) b0=$(ticks $B) g0=$(ticks $G)
  out=$(/usr/bin/time -f '%U %S' -o $D/fiotime fio --name=w --ioengine=nbd --uri="nbd+unix:///$v?socket=$D/alpha.sock" --size=1g --time_based --runtime=$RUNTIME \
    --numjobs=1 --refill_buffers --output-format=json "$@" 2>/dev/null | sed -n '/^{/,$p')
  local a1=$(ticks $A) b1=$(ticks $B) g1=$(ticks $G)
  echo "$out" | node -e 'let s="";process.stdin.on("data",d=>s+=d).on("end",()=>{const j=JSON.parse(s).jobs[0].write;const n=j.total_ios;const a=process.argv.slice(3).map(Number);const f=require("fs").readFileSync(process.argv[9],"utf8").trim().split(" ").map(Number);const us=(t)=>(t*1e4/n).toFixed(1);console.log(process.argv[1],process.argv[2],"iops",Math.round(j.iops),"us/write alpha",us(a[1]-a[0]),"beta",us(a[3]-a[2]),"gamma",us(a[5]-a[4]),"fio",((f[0]+f[1])*1e6/n).toFixed(1),"p50",(j.clat_ns.percentile["50.000000"]/1000).toFixed(0),"p99",(j.clat_ns.percentile["99.000000"]/1000).toFixed(0))})' $name $v $a0 $a1 $b0 $b1 $g0 $g1 $D/fiotime
}
for v in none one two; do fio --name=w --ioengine=nbd --uri="nbd+unix:///$v?socket=$D/alpha.sock" --rw=write --bs=1m --iodepth=8 --size=1g --refill_buffers >/dev/null 2>&1; done
for round in $(seq ${ROUNDS:-1}); do
  for r in ${ROWS:-4k 1m}; do
    for v in ${VOLS:-none one two}; do
      if [ $r = 4k ]; then row 4k $v --rw=randwrite --bs=4k --iodepth=32; else row 1m $v --rw=write --bs=1m --iodepth=8; fi
    done
  done
done
