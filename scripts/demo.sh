#!/usr/bin/env bash
# The main job, for a newcomer: build s2d, start storaged on disk files
# under a temp dir, create a volume, write and read it over NBD, and leave
# it running so you can try the printed commands. Ctrl-C stops it cleanly.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --release --bins --quiet
BIN=target/release
DIR=$(mktemp -d /var/tmp/s2d-demo.XXXXXX)
GRPC=127.0.0.1:7001
NBD=127.0.0.1:10809

echo "== starting storaged: 2 disk files of 4 GiB (sparse) under $DIR"
$BIN/storaged --data-dir "$DIR/data" --listen $GRPC --nbd-listen $NBD \
  --disk "$DIR/disk0.img" --disk "$DIR/disk1.img" --disk-size 4GiB --extent-size 64MiB \
  >"$DIR/storaged.log" 2>&1 &
PID=$!
trap 'kill -TERM $PID 2>/dev/null; wait $PID 2>/dev/null; echo "storaged stopped; files kept in $DIR"' EXIT
for _ in $(seq 100); do
  $BIN/s2dctl --endpoint $GRPC pool status >/dev/null 2>&1 && break
  sleep 0.1
done

echo "== s2dctl volume create demo --size 10GiB"
$BIN/s2dctl --endpoint $GRPC volume create demo --size 10GiB
$BIN/s2dctl --endpoint $GRPC volume list
echo
$BIN/s2dctl --endpoint $GRPC pool status
echo
URI="nbd://$NBD/demo"
echo "== writing and reading back through NBD with qemu-io"
qemu-io -f raw "$URI" -c 'write -P 0x5a 0 1M' -c 'read -P 0x5a 0 1M' -c 'read -P 0 1M 1M'
echo
echo "The volume is served at:  $URI"
echo "Try:  qemu-io -f raw $URI -c 'write -P 0xab 4096 8192' -c 'read -P 0xab 4096 8192'"
echo "      nbdinfo $URI          $BIN/s2dctl volume show demo"
if [ -n "${S2D_DEMO_NO_WAIT:-}" ]; then exit 0; fi
echo "storaged runs until you press Ctrl-C (log: $DIR/storaged.log)."
wait $PID
