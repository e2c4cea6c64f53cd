#!/usr/bin/env bash
# Side-by-side iSCSI benchmark, one run, one ext4 directory, same machine:
#   (a) tgt (Linux user-space target) on a raw file, O_DIRECT backing store
#   (b) a storaged `simple` volume served by `storaged --iscsi-listen`
# Both are filled with the same random data first, so reads hit the disk.
# Workloads, with `qemu-img bench` over iscsi:// (sequential, as qemu-img
# bench runs): 4k write QD32, 4k read QD32, 1M write QD8, 1M read QD8.
# Prints seconds, IOPS and MB/s of each, and the ratio tgt time / storaged
# time (above 1: storaged is faster).
#
# Usage: benches/iscsi_vs_tgt.sh [DIR]   (default: a temp dir under /var/tmp)
# Env:   SIZE=volume and file size, e.g. 512MiB (default 1GiB), OPS4K=4k requests per run
#        (default 100000), OPS1M=1M requests per run (default 2000),
#        TGT_BSOFLAGS=tgt backing-store flags (default direct; "" = page cache),
#        KEEP=1 keeps the disk images in DIR afterwards
# Needs: root (tgtd), tgt, qemu-utils, qemu-block-extra.
# tgt is not installed by CI: apt-get install tgt (Debian 12: 1.0.85).
# This is a report, not a test: it asserts nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
SIZE=${SIZE:-1GiB}
OPS4K=${OPS4K:-100000}
OPS1M=${OPS1M:-2000}
TGT_BSOFLAGS=${TGT_BSOFLAGS-direct}
DIR=${1:-$(mktemp -d /var/tmp/s2d-iscsi-bench.XXXXXX)}
mkdir -p "$DIR"

for tool in tgtd tgtadm qemu-img; do
  command -v $tool >/dev/null || { echo "$tool is missing (apt-get install tgt qemu-utils qemu-block-extra)" >&2; exit 1; }
done
qemu-img --help | grep -qw iscsi || { echo "qemu has no iscsi driver (apt-get install qemu-block-extra)" >&2; exit 1; }

nice -n 10 cargo build --release -p storaged -p s2dctl --quiet
BIN=target/release

GRPC=127.0.0.1:17201
S2D_NBD=127.0.0.1:17202
S2D_ISCSI=127.0.0.1:17260
TGT_PORTAL=127.0.0.1:17261
TGT_CONTROL=1726   # tgtd's management channel number (its own unix socket)
TGT_IQN=iqn.2026-01.io.s2d.bench:tgt
S2D_URL=iscsi://$S2D_ISCSI/iqn.2026-01.io.s2d:bench/0
TGT_URL=iscsi://$TGT_PORTAL/$TGT_IQN/1   # LUN 0 is tgt's controller

cleanup() {
  if [ -n "${TGT_PID:-}" ]; then
    tgtadm -C $TGT_CONTROL --lld iscsi --op delete --mode target --tid 1 --force >/dev/null 2>&1 || true
    tgtadm -C $TGT_CONTROL --op delete --mode system >/dev/null 2>&1 || true
    wait "$TGT_PID" 2>/dev/null || true
  fi
  if [ -n "${S2D_PID:-}" ]; then
    kill -TERM "$S2D_PID" 2>/dev/null || true
    wait "$S2D_PID" 2>/dev/null || true
  fi
  # Keep the results and logs, not the gigabytes of images.
  [ -n "${KEEP:-}" ] || rm -rf "$DIR/source.raw" "$DIR/tgt.img" "$DIR/s2d-disk.img" "$DIR/s2d-data"
}
trap cleanup EXIT

bytes=$(numfmt --from=iec-i "${SIZE%B}")
echo "preparing $SIZE of random data in $DIR"
head -c "$bytes" /dev/urandom >"$DIR/source.raw"

# (a) tgt on a raw file with the data.
cp "$DIR/source.raw" "$DIR/tgt.img"
sync
tgtd -f -C $TGT_CONTROL --iscsi portal=$TGT_PORTAL >"$DIR/tgtd.log" 2>&1 &
TGT_PID=$!
for _ in $(seq 100); do tgtadm -C $TGT_CONTROL --op show --mode target >/dev/null 2>&1 && break; sleep 0.1; done
tgtadm -C $TGT_CONTROL --lld iscsi --op new --mode target --tid 1 -T $TGT_IQN
bsoflags=()
[ -n "$TGT_BSOFLAGS" ] && bsoflags=(--bsoflags "$TGT_BSOFLAGS")
tgtadm -C $TGT_CONTROL --lld iscsi --op new --mode logicalunit --tid 1 --lun 1 \
  -b "$DIR/tgt.img" "${bsoflags[@]}"
tgtadm -C $TGT_CONTROL --lld iscsi --op bind --mode target --tid 1 -I ALL

# (b) storaged with one disk file, a volume holding the same data.
$BIN/storaged --data-dir "$DIR/s2d-data" --listen $GRPC --nbd-listen $S2D_NBD \
  --iscsi-listen $S2D_ISCSI --disk "$DIR/s2d-disk.img" --disk-size 3GiB \
  --extent-size 64MiB >"$DIR/storaged.log" 2>&1 &
S2D_PID=$!
for _ in $(seq 100); do $BIN/s2dctl --endpoint $GRPC pool status >/dev/null 2>&1 && break; sleep 0.1; done
$BIN/s2dctl --endpoint $GRPC volume create bench --size "$SIZE" >/dev/null
qemu-img convert -n -f raw -O raw "$DIR/source.raw" "$S2D_URL"
rm -f "$DIR/source.raw"

JOBS=(
  "4k-write-qd32 -w -s 4k -d 32 -c $OPS4K"
  "4k-read-qd32 -s 4k -d 32 -c $OPS4K"
  "1M-write-qd8 -w -s 1M -d 8 -c $OPS1M"
  "1M-read-qd8 -s 1M -d 8 -c $OPS1M"
)
RESULTS="$DIR/results.txt"
: >"$RESULTS"
seconds() { qemu-img bench -f raw "$@" | awk '/Run completed in/ {print $4}'; }
for job in "${JOBS[@]}"; do
  set -- $job
  name=$1; shift
  s2d=$(seconds "$@" "$S2D_URL")
  tgt=$(seconds "$@" "$TGT_URL")
  size=$(echo "$@" | awk '{for (i = 1; i < NF; i++) if ($i == "-s") print $(i+1)}')
  count=$(echo "$@" | awk '{for (i = 1; i < NF; i++) if ($i == "-c") print $(i+1)}')
  echo "$name $size $count $s2d $tgt" >>"$RESULTS"
done

echo
echo "machine: $(nproc) cores, $(lscpu | sed -n 's/^Model name: *//p' | head -1), $(free -g | awk '/Mem:/ {print $2}') GiB RAM, Linux $(uname -r)"
echo "dir: $DIR ($(df -T "$DIR" | awk 'NR == 2 {print $2}')); tgt $(tgtd -V 2>/dev/null | head -1 | awk '{print $NF}'), backing store flags: ${TGT_BSOFLAGS:-none (page cache)}; qemu-img $(qemu-img --version | awk 'NR == 1 {print $3}')"
echo
awk '
function bytes(s) { n = s + 0; if (s ~ /[kK]$/) n *= 1024; if (s ~ /M$/) n *= 1048576; return n }
BEGIN {
  print "| workload | ops | storaged (s) | tgt (s) | storaged IOPS | tgt IOPS | storaged MB/s | tgt MB/s | ratio (tgt s / storaged s) |"
  print "|---|---|---|---|---|---|---|---|---|"
}
{
  b = bytes($2); c = $3; s = $4; t = $5
  printf "| %s | %d | %.3f | %.3f | %.0f | %.0f | %.0f | %.0f | %.2fx |\n", $1, c, s, t, c / s, c / t, c * b / s / 1e6, c * b / t / 1e6, t / s
}' "$RESULTS"
