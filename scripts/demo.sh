#!/usr/bin/env bash
# The main job, for a newcomer: build s2d, start a local 3-node cluster
# (three storaged processes on 127.0.0.1, disk files under a temp dir),
# create a mirror-3 volume, write and read it over NBD through one node and
# read it back through another, and leave the cluster running so you can
# try the printed commands. Ctrl-C stops every node cleanly.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --release --bins --quiet
BIN=target/release
DIR=$(mktemp -d /var/tmp/s2d-demo.XXXXXX)
PIDS=()
grpc() { echo "127.0.0.1:$((7000 + $1))"; }
nbd() { echo "127.0.0.1:$((10808 + $1))"; }
stop() {
  for p in "${PIDS[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
  echo "cluster stopped; files kept in $DIR"
}
trap stop EXIT

start() { # node number, extra flags...
  local i=$1; shift
  mkdir -p "$DIR/n$i"
  $BIN/storaged --data-dir "$DIR/n$i/data" --name "n$i" --listen "$(grpc "$i")" \
    --nbd-listen "$(nbd "$i")" --disk "$DIR/n$i/disk0.img" --disk-size 4GiB \
    --extent-size 64MiB "$@" >"$DIR/n$i/storaged.log" 2>&1 &
  PIDS+=($!)
  # Ready once its NBD port accepts (it opens after the node joined).
  for _ in $(seq 300); do
    (exec 3<>"/dev/tcp/127.0.0.1/$((10808 + i))") 2>/dev/null && return
    sleep 0.1
  done
  echo "node n$i did not start; log: $DIR/n$i/storaged.log" >&2
  exit 1
}

echo "== starting a 3-node cluster: one 4 GiB disk file (sparse) per node under $DIR"
start 1
$BIN/s2dctl --endpoint "$(grpc 1)" cluster init --name demo >/dev/null
start 2 --join "$(grpc 1)"
start 3 --join "$(grpc 1)"
$BIN/s2dctl --endpoint "$(grpc 1)" node list
echo

echo "== s2dctl volume create demo --size 10GiB --resiliency mirror-3"
$BIN/s2dctl --endpoint "$(grpc 1)" volume create demo --size 10GiB --resiliency mirror-3
echo
URI1="nbd://$(nbd 1)/demo"
URI2="nbd://$(nbd 2)/demo"
echo "== writing through n1 and reading back with qemu-io"
qemu-io -f raw "$URI1" -c 'write -P 0x5a 0 1M' -c 'read -P 0x5a 0 1M' -c 'read -P 0 1M 1M'
sleep 1.5 # n1 lets the volume go a moment after its last client left
echo "== reading it back through n2"
qemu-io -f raw "$URI2" -c 'read -P 0x5a 0 1M'
echo
$BIN/s2dctl --endpoint "$(grpc 3)" volume show demo
echo
echo "The volume is served by any node, e.g.:  $URI1"
echo "Try:  qemu-io -f raw $URI1 -c 'write -P 0xab 4096 8192' -c 'read -P 0xab 4096 8192'"
echo "      $BIN/s2dctl --endpoint $(grpc 2) volume verify demo"
echo "      $BIN/s2dctl --endpoint $(grpc 3) node list"
if [ -n "${S2D_DEMO_NO_WAIT:-}" ]; then exit 0; fi
echo "The cluster runs until you press Ctrl-C (logs: $DIR/n*/storaged.log)."
wait "${PIDS[@]}"
