#!/usr/bin/env bash
# Side-by-side block I/O benchmark, one run, one ext4 directory:
#   (a) fio io_uring, O_DIRECT, on a raw file          (the disk itself)
#   (b) qemu-nbd --cache=none --aio=io_uring on a raw file, via fio's nbd engine
#   (c) a storaged `simple` volume, via fio's nbd engine
# Jobs: 4k randwrite QD1/QD32, 4k randread QD1/QD32, 1M seq write/read QD8.
# Prints IOPS, MB/s, p50/p99 latency and the ratios c/b and c/a.
#
# With 2 or more CPUs the servers run on CPU 1 and fio on CPU 0 (taskset),
# so the comparison is of the servers' efficiency, not of the scheduler.
#
# Usage: benches/nbd_vs_peers.sh [DIR] (default: a temp dir under /var/tmp)
# Env:   RUNTIME=seconds per job (default 10), SIZE=file size (default 1GiB)
# This is a report, not a test: it asserts nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNTIME=${RUNTIME:-10}
SIZE=${SIZE:-1GiB}
DIR=${1:-$(mktemp -d /var/tmp/s2d-bench.XXXXXX)}
mkdir -p "$DIR"
OUT="$DIR/results"
mkdir -p "$OUT"
cargo build --release --bins --quiet
BIN=target/release

if [ "$(nproc)" -ge 2 ]; then
  SERVER_CPU=(taskset -c 1)
  CLIENT_CPU=(taskset -c 0)
else
  SERVER_CPU=()
  CLIENT_CPU=()
fi
GRPC=127.0.0.1:17101
S2D_NBD=127.0.0.1:17109
QEMU_PORT=17110
cleanup() {
  [ -n "${S2D_PID:-}" ] && kill -TERM "$S2D_PID" 2>/dev/null && wait "$S2D_PID" 2>/dev/null || true
  [ -n "${QEMU_PID:-}" ] && kill "$QEMU_PID" 2>/dev/null && wait "$QEMU_PID" 2>/dev/null || true
}
trap cleanup EXIT

# (a) and (b): raw files, filled with data first so reads hit the disk.
for f in raw-direct.img raw-qemu.img; do
  rm -f "$DIR/$f"
  fio --name=fill --filename="$DIR/$f" --size="$SIZE" --rw=write --bs=1M --direct=1 \
      --ioengine=io_uring --iodepth=8 --output=/dev/null
done
"${SERVER_CPU[@]}" qemu-nbd -f raw --cache=none --aio=io_uring -x bench -p $QEMU_PORT -b 127.0.0.1 \
  --persistent --shared=8 "$DIR/raw-qemu.img" &
QEMU_PID=$!

# (c): storaged with one disk file, a volume filled with data first.
"${SERVER_CPU[@]}" $BIN/storaged --data-dir "$DIR/s2d-data" --listen $GRPC --nbd-listen $S2D_NBD \
  --disk "$DIR/s2d-disk.img" --disk-size 3GiB --extent-size 64MiB >"$DIR/storaged.log" 2>&1 &
S2D_PID=$!
for _ in $(seq 100); do $BIN/s2dctl --endpoint $GRPC pool status >/dev/null 2>&1 && break; sleep 0.1; done
$BIN/s2dctl --endpoint $GRPC volume create bench --size "$SIZE" >/dev/null
fio --name=fill --ioengine=nbd --uri="nbd://$S2D_NBD/bench" --size="$SIZE" --rw=write --bs=1M \
    --iodepth=8 --output=/dev/null
for _ in $(seq 50); do nbdinfo --size "nbd://127.0.0.1:$QEMU_PORT/bench" >/dev/null 2>&1 && break; sleep 0.1; done

JOBS=(
  "randwrite-4k-qd1 --rw=randwrite --bs=4k --iodepth=1"
  "randwrite-4k-qd32 --rw=randwrite --bs=4k --iodepth=32"
  "randread-4k-qd1 --rw=randread --bs=4k --iodepth=1"
  "randread-4k-qd32 --rw=randread --bs=4k --iodepth=32"
  "write-1m-qd8 --rw=write --bs=1M --iodepth=8"
  "read-1m-qd8 --rw=read --bs=1M --iodepth=8"
)
for job in "${JOBS[@]}"; do
  set -- $job
  name=$1; shift
  common=(--name="$name" --size="$SIZE" --time_based --runtime="$RUNTIME" --ramp_time=1
          --output-format=json "$@")
  "${CLIENT_CPU[@]}" fio "${common[@]}" --filename="$DIR/raw-direct.img" --direct=1 --ioengine=io_uring \
      --output="$OUT/a-$name.json"
  "${CLIENT_CPU[@]}" fio "${common[@]}" --ioengine=nbd --uri="nbd://127.0.0.1:$QEMU_PORT/bench" \
      --output="$OUT/b-$name.json"
  "${CLIENT_CPU[@]}" fio "${common[@]}" --ioengine=nbd --uri="nbd://$S2D_NBD/bench" \
      --output="$OUT/c-$name.json"
done

python3 - "$OUT" "${JOBS[@]}" <<'PY'
import json, sys
out = sys.argv[1]
names = [j.split()[0] for j in sys.argv[2:]]
def stats(path):
    j = json.load(open(path))["jobs"][0]
    side = j["write"] if j["write"]["io_bytes"] > 0 else j["read"]
    pct = side["clat_ns"].get("percentile", {})
    return (side["iops"], side["bw_bytes"] / 1e6,
            pct.get("50.000000", 0) / 1e3, pct.get("99.000000", 0) / 1e3)
print(f"{'job':<18} {'target':<16} {'IOPS':>10} {'MB/s':>9} {'p50 us':>9} {'p99 us':>9}   c/b    c/a")
labels = {"a": "raw io_uring", "b": "qemu-nbd", "c": "storaged"}
for n in names:
    s = {k: stats(f"{out}/{k}-{n}.json") for k in "abc"}
    for k in "abc":
        iops, mbs, p50, p99 = s[k]
        extra = ""
        if k == "c":
            extra = f"  {s['c'][0]/s['b'][0]:5.2f}x {s['c'][0]/s['a'][0]:5.2f}x"
        print(f"{n:<18} {labels[k]:<16} {iops:>10.0f} {mbs:>9.1f} {p50:>9.1f} {p99:>9.1f}{extra}")
PY
echo "raw results: $OUT"
