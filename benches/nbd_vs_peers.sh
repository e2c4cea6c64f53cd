#!/usr/bin/env bash
# Side-by-side block I/O benchmark, one run, one ext4 directory:
#   (a) fio io_uring, O_DIRECT, on a raw file          (the disk itself)
#   (b) qemu-nbd --cache=none --aio=io_uring on a raw file, via fio's nbd engine
#   (c) a storaged `simple` volume, via fio's nbd engine
#   (d) a `mirror-2` and (e) a `mirror-3` volume, via fio's nbd engine to
#       node 1 of the same local 3-node cluster (c is on that cluster too)
# Jobs: 4k randwrite QD1/QD32, 4k randread QD1/QD32, 1M seq write/read QD8.
# Prints IOPS, MB/s, p50/p99 latency, the ratios c/b, c/a, d/c, e/c, e/b,
# and for (c), (d), (e) the CPU time each storaged node used per I/O.
#
# With 2 or more CPUs the servers (qemu-nbd and all three storaged
# processes) run on CPU 1 and fio on CPU 0 (taskset), so the comparison is
# of the servers' efficiency, not of the scheduler; the 3-node cluster thus
# shares one CPU, where a real cluster has one machine per node.
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
QEMU_PORT=17110
S2D_PIDS=()
grpc() { echo "127.0.0.1:$((17100 + $1))"; }
cleanup() {
  for p in "${S2D_PIDS[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  for p in "${S2D_PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
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

# (c), (d), (e): a 3-node storaged cluster, one disk file per node; the
# volumes are filled with data first.
start_node() {
  local i=$1; shift
  "${SERVER_CPU[@]}" $BIN/storaged --data-dir "$DIR/n$i/data" --name "n$i" --listen "$(grpc "$i")" \
    --nbd-listen "127.0.0.1:$((17110 + i))" --disk "$DIR/n$i/disk.img" --disk-size 4GiB \
    --extent-size 64MiB "$@" >"$DIR/n$i.log" 2>&1 &
  S2D_PIDS+=($!)
  for _ in $(seq 300); do (exec 3<>"/dev/tcp/127.0.0.1/$((17110 + i))") 2>/dev/null && return; sleep 0.1; done
  echo "storaged n$i did not start; see $DIR/n$i.log" >&2; exit 1
}
rm -rf "$DIR"/n1 "$DIR"/n2 "$DIR"/n3
mkdir -p "$DIR"/n1 "$DIR"/n2 "$DIR"/n3
start_node 1
$BIN/s2dctl --endpoint "$(grpc 1)" cluster init --name bench >/dev/null
start_node 2 --join "$(grpc 1)"
start_node 3 --join "$(grpc 1)"
uri_of() { # volume name -> its NBD URI as node 1 reports it
  $BIN/s2dctl --endpoint "$(grpc 1)" --json volume show "$1" | python3 -c 'import json,sys; print(json.load(sys.stdin)["nbd_uri"])'
}
for v in "c simple" "d mirror-2" "e mirror-3"; do
  set -- $v
  $BIN/s2dctl --endpoint "$(grpc 1)" volume create "bench-$1" --size "$SIZE" --resiliency "$2" >/dev/null
  fio --name=fill --ioengine=nbd --uri="$(uri_of "bench-$1")" --size="$SIZE" --rw=write --bs=1M \
      --iodepth=8 --output=/dev/null
  sleep 1.5 # let the volume detach before the next client
done
URI_C=$(uri_of bench-c)
URI_D=$(uri_of bench-d)
URI_E=$(uri_of bench-e)
for _ in $(seq 50); do nbdinfo --size "nbd://127.0.0.1:$QEMU_PORT/bench" >/dev/null 2>&1 && break; sleep 0.1; done

# CPU seconds (user + system) of the storaged processes, one number per node.
cpu() {
  for p in "${S2D_PIDS[@]}"; do
    awk -v hz="$(getconf CLK_TCK)" '{printf "%.3f ", ($14 + $15) / hz}' "/proc/$p/stat"
  done
}

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
  for k in c d e; do
    uri_var="URI_${k^^}"
    before=$(cpu)
    "${CLIENT_CPU[@]}" fio "${common[@]}" --ioengine=nbd --uri="${!uri_var}" \
        --output="$OUT/$k-$name.json"
    echo "$before" > "$OUT/$k-$name.cpu"
    cpu >> "$OUT/$k-$name.cpu"
    sleep 1.5 # detach before the next volume's client
  done
done

python3 - "$OUT" "${JOBS[@]}" <<'PY'
import json, sys
out = sys.argv[1]
names = [j.split()[0] for j in sys.argv[2:]]
def stats(path):
    j = json.load(open(path))["jobs"][0]
    side = j["write"] if j["write"]["io_bytes"] > 0 else j["read"]
    pct = side["clat_ns"].get("percentile", {})
    ios = side["total_ios"] if "total_ios" in side else side["iops"] * j["job_runtime"] / 1e3
    return (side["iops"], side["bw_bytes"] / 1e6,
            pct.get("50.000000", 0) / 1e3, pct.get("99.000000", 0) / 1e3, ios)
def cpu_us_per_io(k, n, ios):
    try:
        before, after = open(f"{out}/{k}-{n}.cpu").read().split("\n")[:2]
    except (OSError, ValueError):
        return ""
    used = [float(b) - float(a) for a, b in zip(before.split(), after.split())]
    return " ".join(f"{u * 1e6 / max(ios, 1):5.1f}" for u in used)
print(f"{'job':<18} {'target':<16} {'IOPS':>10} {'MB/s':>9} {'p50 us':>9} {'p99 us':>9}  ratios / CPU us per I/O on n1 n2 n3")
labels = {"a": "raw io_uring", "b": "qemu-nbd", "c": "storaged simple",
          "d": "storaged mirror-2", "e": "storaged mirror-3"}
for n in names:
    s = {k: stats(f"{out}/{k}-{n}.json") for k in "abcde"}
    for k in "abcde":
        iops, mbs, p50, p99, ios = s[k]
        extra = ""
        if k == "c":
            extra = f"  c/b {iops/s['b'][0]:4.2f}x c/a {iops/s['a'][0]:4.2f}x"
        elif k == "d":
            extra = f"  d/c {iops/s['c'][0]:4.2f}x"
        elif k == "e":
            extra = (f"  e/c {iops/s['c'][0]:4.2f}x e/b {iops/s['b'][0]:4.2f}x"
                     f" p50 e/c {p50/max(s['c'][2], 1e-9):4.2f}x")
        if k in "cde":
            extra += f"  cpu {cpu_us_per_io(k, n, ios)}"
        print(f"{n:<18} {labels[k]:<16} {iops:>10.0f} {mbs:>9.1f} {p50:>9.1f} {p99:>9.1f}{extra}")
PY
echo "raw results: $OUT"
