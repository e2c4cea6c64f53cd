#!/usr/bin/env bash
# Repair benchmark (issue 7): rebuild throughput after losing one node of a
# local 5-node cluster holding DATA_GIB of mirror-3 data, and client 4k
# randwrite latency before and during a rebuild.
#
# What it measures, in one run, in one ext4 directory under /var/tmp:
#   1. The disk's sequential bandwidth with fio (O_DIRECT, 1 MiB blocks, a
#      file in the directory the node disks live in): write and read at
#      QD8 (the device's bandwidth) and at QD1 (for context: a rebuild
#      copies one 1 MiB chunk at a time). All five node disks are sparse
#      files on that one device, so "the aggregate disk bandwidth available
#      on this machine" is that single device's bandwidth.
#   2. Five storaged nodes on 127.0.0.1 (--down-after 2s --rebuild-after
#      5s, no --repair-bandwidth unless REPAIR_BANDWIDTH is set), a mirror-3
#      volume of DATA_GIB GiB filled completely with fio's (non-zero) data
#      through node 1 over NBD.
#   3. Baseline: fio 4k randwrite at QD (default 1) for RUNTIME seconds
#      through NBD on node 1; p99 completion latency.
#   4. Phase A, no client load: kill -9 the node (not n1) holding the most
#      copies, wait for its copies to be rebuilt elsewhere. Rebuild time is
#      from the first "resync started" to "resync complete" in the
#      coordinator's log (cross-checked by polling `s2dctl --json repair
#      status`), bytes are the status's copied_bytes. Reported as GB/s and
#      as ratios to the fio bandwidth, stating what is divided by:
#        - rate / seq write bandwidth (the issue's literal ratio: each
#          rebuilt byte is written once);
#        - device utilisation = rate x (1/read_bw + 1/write_bw): every byte
#          is also read once from a surviving copy on the same device, so
#          this is the share of the device's sequential capability the
#          rebuild uses. The 70 % target is judged on this one.
#   5. Phase B, client load: restart the killed node (its copies were
#      replaced, so it gives them back), start the same fio client on n1,
#      after WARMUP seconds kill -9 another node (not n1) and keep the
#      client running until that rebuild is done. The p99 of the I/Os that
#      completed while the rebuild ran (fio per-I/O latency log, Unix-epoch
#      timestamps, cut to the rebuild's window from the logs) is compared
#      with the baseline p99; the target is <= 2x.
#   CPU: storaged CPU (utime+stime of every node, /proc/PID/stat) and the
#   machine's busy CPUs (/proc/stat) over each rebuild, to show how much of
#   the 2 shared cores the cluster had.
#
# Size: the issue asks for 20 GiB. Mirror-3 writes 3x the data and the
# rebuilds add up to 0.6x + 0.75x more (released extents are not punched
# out of the sparse disk files; measured: 3.8x after phase B), so the run
# asks for 4.35 x DATA_GIB + 3 GiB free and refuses to start without it,
# naming the DATA_GIB that fits. The 20 GiB run needs ~90 GiB; on the
# development VM (~23 GiB free under /var/tmp) the largest that fits is
# DATA_GIB=4, the size its reported numbers used (about 2 min per run).
#
# Build first:  cargo build --release --bins   (this script builds nothing)
# Run:          benches/rebuild.sh                (DATA_GIB=20)
#               DATA_GIB=2 RUNTIME=10 benches/rebuild.sh   (quick)
# Env:
#   DATA_GIB=20          volume size in GiB (mirror-3; filled completely)
#   RUNTIME=20           seconds of the baseline client fio
#   WARMUP=10            seconds the phase-B client runs before the kill
#   QD=1                 client iodepth (4k randwrite)
#   SEQ_GIB=2            size of the fio sequential-bandwidth file
#   EXTENT_SIZE=256MiB   pool extent (= mirror slab) size (storaged default)
#   REPAIR_BANDWIDTH=    --repair-bandwidth of every node (empty: no limit)
#   PORT_BASE=17400      gRPC on PORT_BASE+i, NBD on PORT_BASE+10+i
#   VERIFY=1             at the end, `s2dctl volume verify` compares every copy
#                        (0: skip it)
#   KEEP=1               keep the temp dir (disk files included) at exit
# Output: progress lines, then a SUMMARY block. Exit status 0 when the
# benchmark ran (targets missed or not), non-zero when something broke
# (a node did not start, a rebuild never started or stalled, client I/O
# errors). Raw results (fio JSON, latency logs, status traces, node logs)
# are in the temp dir, kept when the run fails.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=$PWD/target/release
for b in storaged s2dctl; do
  if [ ! -x "$BIN/$b" ]; then
    echo "$BIN/$b not found: build with  cargo build --release --bins" >&2
    exit 1
  fi
done
for t in fio python3; do
  command -v "$t" >/dev/null || { echo "$t is required" >&2; exit 1; }
done

DATA_GIB=${DATA_GIB:-20}
RUNTIME=${RUNTIME:-20}
WARMUP=${WARMUP:-10}
QD=${QD:-1}
SEQ_GIB=${SEQ_GIB:-2}
EXTENT_SIZE=${EXTENT_SIZE:-256MiB}
REPAIR_BANDWIDTH=${REPAIR_BANDWIDTH:-}
PORT_BASE=${PORT_BASE:-17400}
KEEP=${KEEP:-}
VERIFY=${VERIFY:-1}
VOL=rebuild
DISK_GIB=$(( DATA_GIB * 3 / 2 + 2 ))
# fio sizes are given in bytes: with its default kb_base=1024, fio reads
# "GiB" as 10^9 (and "G" as 2^30), which would leave part of the volume empty.
DATA_BYTES=$(( DATA_GIB << 30 ))

DIR=$(mktemp -d /var/tmp/s2d-rebuild.XXXXXX)
OUT=$DIR/results
mkdir -p "$OUT"
FSTYPE=$(df --output=fstype "$DIR" | tail -1)
AVAIL=$(df --output=avail -B1 "$DIR" | tail -1)
NEED=$(python3 -c "print(int((max(4.35 * $DATA_GIB, $SEQ_GIB) + 3) * 2**30))")
if [ "$AVAIL" -lt "$NEED" ]; then
  FIT=$(python3 -c "print(max(0, int(($AVAIL / 2**30 - 3) / 4.35)))")
  echo "not enough space under /var/tmp for DATA_GIB=$DATA_GIB: needs ~$((NEED >> 30)) GiB" \
       "(4.35 x DATA_GIB + 3), $((AVAIL >> 30)) GiB free; the largest that fits: DATA_GIB=$FIT" >&2
  rm -rf "$DIR"
  exit 1
fi

PIDS=()     # every storaged started, live or not, for the cleanup
declare -A NODE_PID
FIO_PID=
STATUS=fail
cleanup() {
  [ -n "$FIO_PID" ] && kill -9 "$FIO_PID" 2>/dev/null || true
  for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
  if [ -n "$KEEP" ]; then
    echo "kept $DIR"
  elif [ "$STATUS" = ok ]; then
    rm -rf "$DIR"
  else
    rm -f "$DIR"/n*/disk.img "$DIR"/seq.dat
    echo "run failed: logs and results kept in $DIR" >&2
  fi
}
trap cleanup EXIT

grpc() { echo "127.0.0.1:$((PORT_BASE + $1))"; }
nbdport() { echo $((PORT_BASE + 10 + $1)); }
ctl() { "$BIN/s2dctl" --endpoint "$(grpc 1)" "$@"; }
now_ms() { date +%s%3N; }
write_pids() {
  : >"$OUT/pids"
  for i in "${!NODE_PID[@]}"; do echo "n$i ${NODE_PID[$i]}" >>"$OUT/pids"; done
}
start_node() { # node number, extra flags...
  local i=$1; shift
  local extra=()
  [ -n "$REPAIR_BANDWIDTH" ] && extra+=(--repair-bandwidth "$REPAIR_BANDWIDTH")
  mkdir -p "$DIR/n$i"
  "$BIN/storaged" --data-dir "$DIR/n$i/data" --name "n$i" --listen "$(grpc "$i")" \
    --nbd-listen "127.0.0.1:$(nbdport "$i")" --disk "$DIR/n$i/disk.img" --disk-size "${DISK_GIB}GiB" \
    --extent-size "$EXTENT_SIZE" --down-after 2s --rebuild-after 5s "${extra[@]}" "$@" \
    >>"$DIR/n$i.log" 2>&1 &
  NODE_PID[$i]=$!
  PIDS+=($!)
  write_pids
  for _ in $(seq 600); do
    (exec 3<>"/dev/tcp/127.0.0.1/$(nbdport "$i")") 2>/dev/null && return
    kill -0 "${NODE_PID[$i]}" 2>/dev/null || break
    sleep 0.1
  done
  echo "storaged n$i did not start; log: $DIR/n$i.log" >&2
  tail -20 "$DIR/n$i.log" >&2
  exit 1
}

# The helpers that poll and parse (JSON, logs, /proc).
cat >"$DIR/rb.py" <<'PY'
import datetime, json, math, os, re, subprocess, sys, time

BIN, EP, VOL, DIR = os.environ["BIN"], os.environ["EP1"], os.environ["VOL"], os.environ["DIR"]
OUT = os.path.join(DIR, "results")
HZ = os.sysconf("SC_CLK_TCK")

def ctl(*args):
    p = subprocess.run([f"{BIN}/s2dctl", "--endpoint", EP, "--json", *args],
                       capture_output=True, text=True, timeout=60)
    if p.returncode != 0:
        raise RuntimeError(f"s2dctl {' '.join(args)}: {p.stderr.strip()}")
    return json.loads(p.stdout)

def pids():
    out = {}
    for line in open(os.path.join(OUT, "pids")):
        name, pid = line.split()
        out[name] = int(pid)
    return out

def cpu_snap():
    """CPU seconds of every live storaged, and the machine's busy/total ticks."""
    procs = {}
    for name, pid in pids().items():
        try:
            f = open(f"/proc/{pid}/stat").read()
            fields = f[f.rindex(")") + 2:].split()
            procs[name] = (int(fields[11]) + int(fields[12])) / HZ
        except OSError:
            pass
    cpu = [int(x) for x in open("/proc/stat").readline().split()[1:9]]
    total = sum(cpu)
    busy = total - cpu[3] - cpu[4] - cpu[7]
    steal = cpu[7]
    irq = cpu[5] + cpu[6]  # interrupts and softirqs (loopback TCP): no process is charged
    every = {}  # every process (and kernel thread): who else used the CPUs
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            f = open(f"/proc/{d}/stat").read()
        except OSError:
            continue
        fields = f[f.rindex(")") + 2:].split()
        every[d] = (f[f.index("(") + 1:f.rindex(")")], (int(fields[11]) + int(fields[12])) / HZ)
    me = os.times()  # this poller's s2dctl children (reaped: in children_*)
    return {"t": time.time(), "procs": procs, "busy": busy / HZ, "steal": steal / HZ,
            "irq": irq / HZ,
            "total": total / HZ, "every": every,
            "poller": me.user + me.system + me.children_user + me.children_system}

def cpu_delta(a, b):
    wall = b["t"] - a["t"]
    per = {n: (b["procs"][n] - a["procs"][n]) / wall
           for n in b["procs"] if n in a["procs"]}
    mine = set(str(p) for p in pids().values())
    others = {}
    for pid, (comm, t) in b["every"].items():
        if pid in mine or pid == str(os.getpid()):
            continue
        if comm == "storaged":
            comm = "storaged of other runs"
        used = t - a["every"].get(pid, (comm, 0.0))[1]
        others[comm] = others.get(comm, 0.0) + used / wall
    top = sorted(others.items(), key=lambda x: -x[1])[:4]
    return {"wall_s": wall, "storaged_cores": per,
            "storaged_total_cores": sum(per.values()),
            "machine_busy_cores": (b["busy"] - a["busy"]) / wall,
            "steal_cores": (b["steal"] - a["steal"]) / wall,
            "irq_cores": (b["irq"] - a["irq"]) / wall,
            "poller_cores": (b["poller"] - a["poller"]) / wall,
            "others_top": [[c, round(x, 3)] for c, x in top if x >= 0.01]}

def cmd_victim(excluded):
    nodes = ctl("node", "list")
    cands = [n for n in nodes if n["name"] != "n1" and n["name"] not in excluded
             and n["state"] == "up"]
    best = max(cands, key=lambda n: (n["slab_copies"], n["name"]))
    print(best["name"][1:], best["slab_copies"])

def cmd_wait_up(count, timeout):
    deadline = time.time() + float(timeout)
    while True:
        try:
            nodes = ctl("node", "list")
            up = [n for n in nodes if n["state"] == "up"]
            if len(up) >= int(count):
                return
        except Exception as e:
            nodes = str(e)
        if time.time() > deadline:
            sys.exit(f"fewer than {count} nodes up after {timeout} s: {nodes}")
        time.sleep(0.5)

def cmd_wait_idle(timeout):
    """Until the volume needs no repair and no node has it attached."""
    deadline = time.time() + float(timeout)
    while True:
        try:
            r = ctl("repair", "status", VOL)
            v = ctl("volume", "show", VOL)
            if r["state"] == "done" and not v.get("attached_to"):
                return
            last = (r["state"], v.get("attached_to"))
        except Exception as e:
            last = str(e)
        if time.time() > deadline:
            print(f"warning: volume not idle after {timeout} s: {last}", file=sys.stderr)
            return
        time.sleep(0.5)

def cmd_wait_rebuild(phase, t_kill_ms):
    """Polls repair status after a kill until the rebuild ran and is done."""
    t_kill = int(t_kill_ms) / 1000
    start_timeout, stall_timeout = 180, 180
    overall = 900 + 120 * int(os.environ["DATA_GIB"])
    trace, seen_other, seen_run, runs, prev = [], False, None, 0, None
    snap_kill, snap_run, snap_done = cpu_snap(), None, None
    last_done, last_progress, final, errors = None, time.time(), None, 0
    while True:
        t = time.time()
        try:
            r = ctl("repair", "status", VOL)
        except Exception as e:
            errors += 1
            trace.append({"t": t, "error": str(e)})
            if errors > 20:
                sys.exit(f"repair status keeps failing: {e}")
            time.sleep(0.5)
            continue
        trace.append({"t": t, **r})
        st = r["state"]
        if st != "done":
            seen_other = True
        if st == "running":
            if prev != "running":
                runs += 1
            if seen_run is None:
                seen_run, snap_run = t, cpu_snap()
        if r["done_bytes"] != last_done:
            last_done, last_progress = r["done_bytes"], t
        if st == "done" and seen_other:
            final, snap_done = r, cpu_snap()
            break
        if seen_run is None and t - t_kill > start_timeout:
            sys.exit(f"the rebuild did not start within {start_timeout} s of the kill: {r}")
        if seen_run is not None and st == "running" and t - last_progress > stall_timeout:
            sys.exit(f"the rebuild made no progress for {stall_timeout} s: {r}")
        if t - t_kill > overall:
            sys.exit(f"the rebuild did not finish within {overall} s of the kill: {r}")
        prev = st
        time.sleep(0.5)
    res = {"phase": phase, "t_kill": t_kill, "t_running_seen": seen_run,
           "t_done_seen": final and trace[-1]["t"], "runs": runs, "final": final,
           "cpu_kill_to_done": cpu_delta(snap_kill, snap_done),
           "cpu_running": cpu_delta(snap_run, snap_done) if snap_run else None}
    res.update(log_times(t_kill, res["t_done_seen"] + 2))
    json.dump(res, open(os.path.join(OUT, f"rebuild-{phase}.json"), "w"), indent=1)
    json.dump(trace, open(os.path.join(OUT, f"trace-{phase}.json"), "w"), indent=1)

TS = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+)Z\s+(\w+)\s+(.*)$")

def log_times(after, before):
    """First 'resync started' and last 'resync complete' of VOL in the node
    logs between two times, the slabs finished, and resyncs that stopped."""
    started, complete, finished, stopped, node = None, None, 0, [], None
    for i in range(1, 6):
        path = os.path.join(DIR, f"n{i}.log")
        if not os.path.exists(path):
            continue
        for line in open(path, errors="replace"):
            m = TS.match(line)
            if not m or f"volume={VOL}" not in line:
                continue
            t = datetime.datetime.strptime(m.group(1)[:26], "%Y-%m-%dT%H:%M:%S.%f") \
                .replace(tzinfo=datetime.timezone.utc).timestamp()
            if not after <= t <= before:
                continue
            msg = m.group(3)
            if "resync started" in msg and (started is None or t < started):
                started, node = t, f"n{i}"
            elif "resync complete" in msg and (complete is None or t > complete):
                complete = t
            elif "resync finished: copies current" in msg:
                finished += 1
            elif "resync stopped" in msg:
                stopped.append((t, line.strip()))
    return {"log_started": started, "log_complete": complete, "log_node": node,
            "slabs_finished": finished, "resync_stopped": stopped}

def lat(path, t0, t1):
    """Completion latencies (ns) of the I/Os that completed in [t0, t1] (s)."""
    vals = []
    for line in open(path):
        f = line.split(",")
        t = int(f[0]) / 1000
        if t0 <= t <= t1:
            vals.append(int(f[1]))
    vals.sort()
    n = len(vals)
    pct = lambda p: vals[max(0, math.ceil(p / 100 * n) - 1)] / 1e3 if n else float("nan")
    return {"n": n, "iops": n / max(t1 - t0, 1e-9), "p50_us": pct(50), "p99_us": pct(99),
            "p999_us": pct(99.9), "max_us": vals[-1] / 1e3 if n else float("nan"),
            "secs": t1 - t0}

def fio_job(path):
    text = open(path).read()  # after SIGINT fio puts "terminating on signal" first
    return json.loads(text[text.index("{"):])["jobs"][0]

def fio_side(path):
    j = fio_job(path)
    s = j["write"] if j["write"]["io_bytes"] > 0 else j["read"]
    return j, s

def cmd_summary():
    v = dict(l.rstrip("\n").split("=", 1) for l in open(os.path.join(OUT, "vars")))
    data_gib = int(v["DATA_GIB"])
    seq = {}
    for k in ["write-qd8", "read-qd8", "write-qd1", "read-qd1"]:
        seq[k] = fio_side(os.path.join(OUT, f"seq-{k}.json"))[1]["bw_bytes"] / 1e6
    W, R = seq["write-qd8"], seq["read-qd8"]
    _, fill = fio_side(os.path.join(OUT, "fill.json"))
    L = lambda name: os.path.join(OUT, f"{name}_clat.1.log")
    bj, bs = fio_side(os.path.join(OUT, "baseline.json"))
    # Baseline: all its I/Os but the first second (attach, first allocations).
    bt = [int(l.split(",")[0]) / 1000 for l in open(L("baseline"))]
    base = lat(L("baseline"), bt[0] + 1, bt[-1]) if bt else None
    p = {ph: json.load(open(os.path.join(OUT, f"rebuild-{ph}.json"))) for ph in "AB"}

    def window(r):
        s = r["log_started"] or r["t_running_seen"]
        e = r["log_complete"] or r["t_done_seen"]
        src = "node log" if r["log_started"] and r["log_complete"] else "status polls (0.5 s)"
        return s, e, src

    out = []
    w = out.append
    w("")
    w("=" * 78)
    w(f"SUMMARY  s2d rebuild benchmark (issue 7)   {v['DATE']}")
    w("=" * 78)
    w(f"binary    target/release/storaged built {v['BUILT']}; checkout at HEAD {v['COMMIT']}"
      f" with {v['DIRTY']} uncommitted files under crates/ proto/ now")
    w(f"setup     5 storaged nodes on 127.0.0.1, one sparse {v['DISK_GIB']} GiB disk file each,")
    w(f"          extent {v['EXTENT_SIZE']}, --down-after 2s --rebuild-after 5s,")
    w(f"          --repair-bandwidth {v['REPAIR_BANDWIDTH'] or 'unset (no limit)'}; {v['NPROC']} CPUs shared by all nodes and fio")
    w(f"          (and by whatever else runs on the machine); dir {v['DIR']} ({v['FSTYPE']}, {v['DEVICE']})")
    w(f"data      mirror-3 volume of {data_gib} GiB (issue asks 20 GiB), filled with fio data via NBD on n1:")
    w(f"          {fill['bw_bytes']/1e6:.0f} MB/s client writes ({3*fill['bw_bytes']/1e6:.0f} MB/s to disk with 3 copies)")
    w("disk      fio, O_DIRECT, 1 MiB blocks, io_uring, a %s GiB file next to the node disks:" % v["SEQ_GIB"])
    w(f"          seq write {W:.0f} MB/s, seq read {R:.0f} MB/s at QD8;"
      f" {seq['write-qd1']:.0f} / {seq['read-qd1']:.0f} MB/s at QD1")
    w("          All node disks are files on this one device, so this is the aggregate disk")
    w("          bandwidth available on this machine. A rebuilt byte is read once (a surviving")
    w("          copy) and written once (the new copy) on it: at best a rebuild runs at")
    best = 1 / (1 / W + 1 / R)
    w(f"          1/(1/write + 1/read) = {best:.0f} MB/s (device fully busy).")
    res = {}
    for ph, label in [("A", "Phase A, no client load"), ("B", f"Phase B, client 4k randwrite QD{v['QD']} on n1")]:
        r = p[ph]
        s, e, src = window(r)
        f = r["final"]
        secs = e - s
        rate = f["copied_bytes"] / 1e6 / secs if secs > 0 else float("nan")
        util = rate * (1 / W + 1 / R)
        res[ph] = (rate, util, s, e)
        w("")
        w(f"{label}: killed {v['VICTIM_' + ph]} (held {v['VICTIM_' + ph + '_COPIES']} slab copies"
          f" = {int(v['VICTIM_' + ph + '_COPIES']) * int(v['EXTENT_BYTES']) / 2**30:.2f} GiB)")
        w(f"  rebuild ran on     {r['log_node'] or f['node'] or '?'}; {r['slabs_finished']} slabs made current,"
          f" {r['runs']} run(s) seen by the polls")
        w(f"  kill -> copy start {s - r['t_kill']:.1f} s (detection {v['DOWN_AFTER']} + --rebuild-after 5s + placement)")
        w(f"  rebuilt            {f['copied_bytes'] / 2**30:.2f} GiB copied ({f['copied_bytes']} B;"
          f" {f['done_bytes'] / 2**30:.2f} GiB compared of {f['total_bytes'] / 2**30:.2f} GiB)")
        w(f"  time               {secs:.1f} s, first 'resync started' to 'resync complete' ({src})")
        w(f"  throughput         {rate / 1e3:.3f} GB/s = {rate:.0f} MB/s")
        w(f"  / seq write QD8    {rate / W * 100:.0f} %   (rebuilt bytes per s / device write bandwidth)")
        w(f"  device utilisation {util * 100:.0f} %   (rate x (1/write + 1/read): read + write time per s)")
        c = r["cpu_running"] or r["cpu_kill_to_done"]
        per = " ".join(f"{n} {x:.2f}" for n, x in sorted(c["storaged_cores"].items()))
        w(f"  CPU while running  storaged {c['storaged_total_cores']:.2f} cores ({per});"
          f" {c['wall_s']:.1f} s")
        others = ", ".join(f"{n} {x:.2f}" for n, x in c["others_top"])
        w(f"  machine            busy {c['machine_busy_cores']:.2f} of {v['NPROC']} CPUs (of which irq+softirq"
          f" {c['irq_cores']:.2f}, charged to no process), steal {c['steal_cores']:.2f}")
        w(f"                     this script's status polls {c['poller_cores']:.2f}"
          + (f"; others: {others}" if others else ""))
        early = [l for t, l in r["resync_stopped"] if t < s]
        late = [l for t, l in r["resync_stopped"] if t >= s]
        if early:
            w(f"  {len(early)} resync(s) tried before the node was marked down stopped (expected:"
              " the killed node was a target)")
        if late:
            w(f"  NOTE: {len(late)} resync(s) stopped after the rebuild started and started over:")
            for l in late[:5]:
                w(f"    {l}")
    # Client latency.
    bp = fio_side(os.path.join(OUT, "baseline.json"))[1]["clat_ns"]["percentile"]["99.000000"] / 1e3
    _, ps = fio_side(os.path.join(OUT, "during.json"))
    rate_b, util_b, sB, eB = res["B"]
    rB = p["B"]
    lb = L("during")
    bt = [int(l.split(",")[0]) / 1000 for l in open(lb)]
    pre = lat(lb, bt[0] + 1, rB["t_kill"])
    fail = lat(lb, rB["t_kill"], sB)
    during = lat(lb, sB, eB)
    w("")
    w(f"Client 4k randwrite QD{v['QD']} via NBD on n1 (completion latency, from fio's per-I/O log):")
    hdr = f"  {'window':<44} {'I/Os':>7} {'IOPS':>7} {'p50 us':>8} {'p99 us':>9} {'p99.9 us':>9} {'max us':>9}"
    w(hdr)
    for name, x in [(f"baseline, 5 nodes up ({base['secs']:.0f} s)", base),
                    (f"phase B before the kill ({pre['secs']:.0f} s)", pre),
                    (f"kill -> rebuild start ({fail['secs']:.0f} s, node failure)", fail),
                    (f"during the rebuild ({during['secs']:.0f} s)", during)]:
        w(f"  {name:<44} {x['n']:>7} {x['iops']:>7.0f} {x['p50_us']:>8.0f} {x['p99_us']:>9.0f}"
          f" {x['p999_us']:>9.0f} {x['max_us']:>9.0f}")
    w(f"  (fio's own p99 of the whole baseline run: {bp:.0f} us)")
    ratio = during["p99_us"] / base["p99_us"]
    if during["n"] < 1000:
        w(f"  NOTE: only {during['n']} I/Os completed during the rebuild: the p99 is rough")
    ok_a = res["A"][1] >= 0.70
    ok_b = ratio <= 2.0
    w("")
    w("Targets (issue 7)")
    w(f"  rebuild >= 70 % of the disk bandwidth, no client load:   {res['A'][1]*100:.0f} % device utilisation"
      f" ({res['A'][0]/W*100:.0f} % of seq write)  -> {'MET' if ok_a else 'MISSED'}")
    w(f"  client p99 during rebuild <= 2x baseline:                {ratio:.2f}x"
      f" ({during['p99_us']:.0f} us vs {base['p99_us']:.0f} us)  -> {'MET' if ok_b else 'MISSED'}")
    w(f"  (cross-check against the phase-B window before the kill: {during['p99_us'] / pre['p99_us']:.2f}x;"
      f" client IOPS during the rebuild {during['iops'] / base['iops'] * 100:.0f} % of baseline)")
    w(f"  (with the client running, the rebuild ran at {rate_b:.0f} MB/s = {util_b*100:.0f} % device utilisation)")
    w(f"space     node disk files use {int(v['DISK_USED']) / 2**30:.1f} GiB after phase B"
      f" ({int(v['DISK_USED']) / 2**30 / data_gib:.2f} x the data)")
    w(f"verify    {v['VERIFY_RESULT']} (s2dctl volume verify after phase B)")
    w("=" * 78)
    print("\n".join(out))
    open(os.path.join(OUT, "summary.txt"), "w").write("\n".join(out) + "\n")

def cmd_client_errors(names):
    for n in names:
        j = fio_job(os.path.join(OUT, f"{n}.json"))
        if j["error"]:
            print(f"{n}: fio error {j['error']}")

if __name__ == "__main__":
    c, a = sys.argv[1], sys.argv[2:]
    {"victim": lambda: cmd_victim(a), "wait-up": lambda: cmd_wait_up(*a),
     "wait-idle": lambda: cmd_wait_idle(*a), "wait-rebuild": lambda: cmd_wait_rebuild(*a),
     "summary": cmd_summary, "client-errors": lambda: cmd_client_errors(a)}[c]()
PY
export BIN DIR VOL DATA_GIB
export EP1; EP1=$(grpc 1)
rb() { python3 "$DIR/rb.py" "$@"; }
jsonget() { python3 -c "import json,sys; print('%.0f' % (json.load(open(sys.argv[1]))$2))" "$1"; }

vars() { echo "$1=$2" >>"$OUT/vars"; }
: >"$OUT/vars"
vars DATA_GIB "$DATA_GIB"; vars QD "$QD"; vars SEQ_GIB "$SEQ_GIB"; vars DISK_GIB "$DISK_GIB"
vars EXTENT_SIZE "$EXTENT_SIZE"; vars REPAIR_BANDWIDTH "$REPAIR_BANDWIDTH"; vars DIR "$DIR"
vars FSTYPE "$FSTYPE"; vars NPROC "$(nproc)"; vars DOWN_AFTER 2s
vars DEVICE "$(df --output=source "$DIR" | tail -1)"
vars COMMIT "$(git rev-parse --short HEAD 2>/dev/null || echo '?')"
vars DATE "$(date -u +%Y-%m-%dT%H:%MZ)"
vars BUILT "$(date -u -r "$BIN/storaged" +%Y-%m-%dT%H:%MZ)"
vars DIRTY "$(git status --porcelain -- crates proto 2>/dev/null | wc -l)"
vars EXTENT_BYTES "$(python3 -c '
import re, sys
m = re.fullmatch(r"\s*(\d+)\s*([KMGT]?)(i?B)?\s*", sys.argv[1], re.I)
print(int(m.group(1)) * 1024 ** " KMGT".index((m.group(2) or " ").upper()))' "$EXTENT_SIZE")"

echo "== $DIR ($FSTYPE on $(df --output=source "$DIR" | tail -1)), DATA_GIB=$DATA_GIB, $(nproc) CPUs"
[ "$FSTYPE" = tmpfs ] && echo "warning: $DIR is tmpfs: O_DIRECT numbers mean nothing" >&2

# 1. The device's sequential bandwidth, right where the node disks will be.
echo "== fio: sequential O_DIRECT 1 MiB write/read of ${SEQ_GIB} GiB in $DIR"
for qd in 8 1; do
  for rw in write read; do
    fio --name="seq-$rw-qd$qd" --filename="$DIR/seq.dat" --size="$((SEQ_GIB << 30))" --rw="$rw" \
      --bs=1M --direct=1 --ioengine=io_uring --iodepth="$qd" --runtime=60 \
      --output-format=json --output="$OUT/seq-$rw-qd$qd.json"
    echo "   $rw QD$qd: $(jsonget "$OUT/seq-$rw-qd$qd.json" "['jobs'][0]['$rw']['bw_bytes']/1e6") MB/s"
  done
  rm -f "$DIR/seq.dat" # the write of the next QD allocates blocks afresh, as the rebuild does
done

# 2. The cluster and the data.
echo "== starting 5 nodes (disks ${DISK_GIB} GiB sparse, extent $EXTENT_SIZE)"
start_node 1
ctl cluster init --name rebuild-bench >/dev/null
for i in 2 3 4 5; do start_node "$i" --join "$(grpc 1)"; done
rb wait-up 5 60
ctl volume create "$VOL" --size "${DATA_GIB}GiB" --resiliency mirror-3 >/dev/null
URI="nbd://127.0.0.1:$(nbdport 1)/$VOL"
echo "== filling $VOL (${DATA_GIB} GiB mirror-3) through n1 with fio (1 MiB writes, QD8)"
fio --name=fill --ioengine=nbd --uri="$URI" --size="$DATA_BYTES" --rw=write --bs=1M \
  --iodepth=8 --output-format=json --output="$OUT/fill.json"
ctl volume show "$VOL" | grep -iE 'allocated|size' || true
rb wait-idle 30

client_args() { # name, extra fio args... -> ARGS
  local name=$1; shift
  ARGS=(--name="$name" --ioengine=nbd --uri="$URI" --size="$DATA_BYTES" --rw=randwrite --bs=4k
        --iodepth="$QD" --time_based --write_lat_log="$OUT/$name" --log_unix_epoch=1
        --output-format=json --output="$OUT/$name.json" "$@")
}

# 3. Baseline.
echo "== baseline: 4k randwrite QD$QD for ${RUNTIME} s through n1"
client_args baseline --runtime="$RUNTIME"
fio "${ARGS[@]}"
rb wait-idle 30

# 4. Phase A: lose a node, no client.
read -r VA VA_COPIES < <(rb victim)
[ -n "${VA:-}" ] || { echo "no node to kill" >&2; exit 1; }
vars VICTIM_A "n$VA"; vars VICTIM_A_COPIES "$VA_COPIES"
echo "== phase A: kill -9 n$VA ($VA_COPIES slab copies), no client load; waiting for the rebuild"
T=$(now_ms)
kill -9 "${NODE_PID[$VA]}"; wait "${NODE_PID[$VA]}" 2>/dev/null || true
unset "NODE_PID[$VA]"; write_pids
rb wait-rebuild A "$T"
ctl repair status "$VOL" | sed 's/^/   /'

# 5. Phase B: the node comes back (gives its replaced copies back), the
# client runs, another node goes.
echo "== phase B: restarting n$VA"
start_node "$VA"
rb wait-up 5 60
rb wait-idle 60
read -r VB VB_COPIES < <(rb victim "n$VA")
[ -n "${VB:-}" ] || { echo "no node to kill" >&2; exit 1; }
vars VICTIM_B "n$VB"; vars VICTIM_B_COPIES "$VB_COPIES"
echo "== phase B: client 4k randwrite QD$QD on n1; in ${WARMUP} s kill -9 n$VB ($VB_COPIES slab copies)"
client_args during --runtime=86400
fio "${ARGS[@]}" &
FIO_PID=$!
sleep "$WARMUP"
kill -0 "$FIO_PID" 2>/dev/null || { echo "the phase-B client fio ended early" >&2; exit 1; }
T=$(now_ms)
kill -9 "${NODE_PID[$VB]}"; wait "${NODE_PID[$VB]}" 2>/dev/null || true
unset "NODE_PID[$VB]"; write_pids
rb wait-rebuild B "$T"
ctl repair status "$VOL" | sed 's/^/   /'
if ! kill -0 "$FIO_PID" 2>/dev/null; then
  echo "the phase-B client fio ended before the rebuild did" >&2
fi
kill -INT "$FIO_PID" 2>/dev/null || true
FIO_RC=0; wait "$FIO_PID" || FIO_RC=$?
FIO_PID=
CLIENT_ERR=$(rb client-errors baseline during)
vars DISK_USED "$(du -c -B1 "$DIR"/n*/disk.img | tail -1 | cut -f1)"  # allocated, not apparent
VERIFY_ERR=
if [ "$VERIFY" = 1 ]; then
  echo "== s2dctl volume verify $VOL (every copy of every slab compared)"
  rb wait-idle 60
  if ! ctl volume verify "$VOL" >"$OUT/verify.txt" 2>&1; then
    VERIFY_ERR="volume verify failed: $(tail -5 "$OUT/verify.txt")"
  fi
  sed 's/^/   /' "$OUT/verify.txt" | tail -5
  vars VERIFY_RESULT "$([ -z "$VERIFY_ERR" ] && echo "every copy of every slab the same" || echo FAILED)"
else
  vars VERIFY_RESULT "skipped (VERIFY=0)"
fi
rb summary
if [ -n "$CLIENT_ERR" ]; then
  echo "client I/O failed: $CLIENT_ERR (fio exit $FIO_RC)" >&2
  exit 1
fi
if [ -n "$VERIFY_ERR" ]; then
  echo "$VERIFY_ERR" >&2
  exit 1
fi
STATUS=ok
