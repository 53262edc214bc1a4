# Sourced by bench/sync-replicas.sh and bench/sync-resync.sh: two nodes, alpha and beta, on loopback with mutual-TLS
# peer ports; sets D (their scratch directory, removed at exit), C (the CLI), PA and PB (the peer ports).
set -e
cd "$(dirname "$0")/.."
export PATH=$PWD/node_modules/.bin:$PATH
D=$(mktemp -d /tmp/chunkd-sync-bench.XXXX)
C="node bin/chunkd.js"
$C tls init $D/tls --node alpha --node beta >/dev/null
PA=$((20000 + RANDOM % 10000)); PB=$((PA + 1))
$C serve --listen 127.0.0.1:0 --pool $D/alpha --socket $D/alpha.sock --api $D/alpha.api --peer-listen 127.0.0.1:$PA --tls-dir $D/tls/alpha > $D/alpha.log 2>&1 &
A=$!
$C serve --listen 127.0.0.1:0 --pool $D/beta --socket $D/beta.sock --api $D/beta.api --peer-listen 127.0.0.1:$PB --tls-dir $D/tls/beta > $D/beta.log 2>&1 &
B=$!
trap "kill $A $B 2>/dev/null; sleep 1; rm -rf $D" EXIT
for i in $(seq 50); do [ -S $D/alpha.api ] && [ -S $D/beta.api ] && break; sleep 0.2; done
sleep 1
