#!/usr/bin/env bash
# Cluster metadata benchmark on a local 3-node cluster (release build,
# storaged processes on 127.0.0.1, one 1 GiB disk file each under DIR):
#   1. metadata operations per second: volume create + delete pairs through
#      s2dctl, from one client and from CLIENTS concurrent clients, each
#      client talking to a different node (followers forward to the leader);
#      `cluster status` (answered locally, no Raft) is timed too, as the
#      cost of starting s2dctl itself;
#   2. leader failover: kill -9 the leader, then time until the first
#      `volume create` on a survivor commits; ROUNDS times, restarting the
#      killed node in between.
# This is a report, not a test: it asserts nothing.
#
# Usage: benches/meta_ops.sh [DIR]   (default: a temp dir under /var/tmp)
# Env:   OPS=create+delete pairs per client (default 200), CLIENTS=concurrent
#        clients (default 3), ROUNDS=failover rounds (default 5)
set -euo pipefail
cd "$(dirname "$0")/.."
OPS=${OPS:-200}
CLIENTS=${CLIENTS:-3}
ROUNDS=${ROUNDS:-5}
DIR=${1:-$(mktemp -d /var/tmp/s2d-meta-bench.XXXXXX)}
mkdir -p "$DIR"

nice -n 10 cargo build --release -p storaged -p s2dctl --quiet
BIN=$PWD/target/release
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null || true; done; }
trap cleanup EXIT

grpc() { echo "127.0.0.1:$((17300 + $1))"; }
start() {
  local i=$1; shift
  mkdir -p "$DIR/n$i"
  "$BIN/storaged" --data-dir "$DIR/n$i/data" --listen "$(grpc "$i")" \
    --nbd-listen "127.0.0.1:$((17400 + i))" --disk "$DIR/n$i/disk.img" \
    --disk-size 1GiB --extent-size 16MiB --name "n$i" --down-after 2s "$@" \
    >>"$DIR/n$i/log" 2>&1 &
  PIDS[$i]=$!
  for _ in $(seq 100); do
    "$BIN/s2dctl" --endpoint "$(grpc "$i")" cluster status >/dev/null 2>&1 && return
    sleep 0.1
  done
  echo "node $i did not start; see $DIR/n$i/log" >&2; exit 1
}
ctl() { local i=$1; shift; "$BIN/s2dctl" --endpoint "$(grpc "$i")" "$@"; }
now() { date +%s.%N; }

start 1
ctl 1 cluster init --name bench >/dev/null
start 2 --join "$(grpc 1)"
start 3 --join "$(grpc 1)"
sleep 1

t0=$(now)
for k in $(seq "$OPS"); do ctl 1 cluster status >/dev/null; done
t1=$(now)
base=$(echo "$OPS / ($t1 - $t0)" | bc -l)
printf 'cluster status (local, s2dctl start-up cost): %8.1f calls/s\n' "$base"

bench() { # CLIENTS
  local n=$1 pids=() t0 t1
  t0=$(now)
  for c in $(seq "$n"); do
    ( node=$(( (c - 1) % 3 + 1 ))
      for k in $(seq "$OPS"); do
        ctl "$node" volume create "b$c-$k" --size 64MiB >/dev/null
        ctl "$node" volume delete "b$c-$k" >/dev/null
      done ) &
    pids+=($!)
  done
  for p in "${pids[@]}"; do wait "$p"; done
  t1=$(now)
  echo "2 * $n * $OPS / ($t1 - $t0)" | bc -l
}
one=$(bench 1)
printf 'create+delete, 1 client:          %8.1f metadata ops/s\n' "$one"
many=$(bench "$CLIENTS")
printf 'create+delete, %d clients:         %8.1f metadata ops/s\n' "$CLIENTS" "$many"

leader() {
  for i in 1 2 3; do
    l=$(ctl "$i" --json cluster status 2>/dev/null | sed -n 's/.*"leader_id": *\([0-9]*\).*/\1/p')
    [ -n "$l" ] && [ "$l" != 0 ] && { echo "$l"; return; }
  done
}
for r in $(seq "$ROUNDS"); do
  l=$(leader)
  survivor=$(( l % 3 + 1 ))
  kill -9 "${PIDS[$l]}"
  t0=$(now)
  until ctl "$survivor" volume create "f$r" --size 64MiB >/dev/null 2>&1; do sleep 0.05; done
  t1=$(now)
  printf 'failover round %d: leader n%d killed, first commit on n%d after %6.0f ms\n' \
    "$r" "$l" "$survivor" "$(echo "($t1 - $t0) * 1000" | bc -l)"
  start "$l"
  sleep 2
done
echo "logs and disks: $DIR"
