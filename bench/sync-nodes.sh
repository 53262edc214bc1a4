# Sourced by bench/sync-replicas.sh, bench/sync-resync.sh, bench/sync-copies.sh and bench/sync-cpu.sh: two nodes,
# alpha and beta (and gamma with NODES=3), on loopback with mutual-TLS peer ports; sets D (their scratch directory,
# removed at exit), C (the CLI), PA, PB and PC (the peer ports); api NODE gives a node's --api, insync VOLUME N
# waits until N replicas of VOLUME are in sync.
set -e
cd "$(dirname "$0")/.."
export PATH=$PWD/node_modules/.bin:$PATH
D=$(mktemp -d /tmp/chunkd-sync-bench.XXXX)
C="node bin/chunkd.js"
$C tls init $D/tls --node alpha --node beta --node gamma >/dev/null
PA=$((20000 + RANDOM % 10000)); PB=$((PA + 1)); PC=$((PA + 2))
$C serve --listen 127.0.0.1:0 --pool $D/alpha --socket $D/alpha.sock --api $D/alpha.api --peer-listen 127.0.0.1:$PA --tls-dir $D/tls/alpha > $D/alpha.log 2>&1 &
A=$!
$C serve --listen 127.0.0.1:0 --pool $D/beta --socket $D/beta.sock --api $D/beta.api --peer-listen 127.0.0.1:$PB --tls-dir $D/tls/beta > $D/beta.log 2>&1 &
B=$!
G=
if [ "${NODES:-2}" = 3 ]; then
  $C serve --listen 127.0.0.1:0 --pool $D/gamma --socket $D/gamma.sock --api $D/gamma.api --peer-listen 127.0.0.1:$PC --tls-dir $D/tls/gamma > $D/gamma.log 2>&1 &
  G=$!
fi
trap "kill $A $B $G 2>/dev/null; sleep 1; rm -rf $D" EXIT
for i in $(seq 50); do [ -S $D/alpha.api ] && [ -S $D/beta.api ] && { [ -z "$G" ] || [ -S $D/gamma.api ]; } && break; sleep 0.2; done
sleep 1
api() { echo "--api $D/$1.api"; }
insync() {
  for i in $(seq 600); do
    [ "$($C replica status $1 $(api alpha) --json | grep -c '"state": "in-sync"')" = "$2" ] && return 0
    sleep 0.2
  done
  echo "replicas of $1 not in sync" >&2; exit 1
}
