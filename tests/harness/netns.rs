//! A cluster whose nodes can really be cut off the network and really run
//! out of disk space: each storaged runs in a network namespace of its own
//! and keeps its disk files on a small ext4 filesystem of its own (a
//! loop-mounted image). Used by the chaos suite (`tests/chaos.rs`); needs
//! root, `ip` (iproute2: netns, veth, bridge), `losetup`/`mount -o loop`
//! and `mkfs.ext4`. A missing piece fails the setup with a message that
//! names it.
//!
//! Per run (names carry the test process's pid, so runs never share them):
//!
//! ```text
//! root namespace (s2dctl, the test's NBD clients)
//!   bridge s2c<pid>c  10.R.1.1/24   cluster network: gRPC, Raft, replication
//!   bridge s2c<pid>k  10.R.2.1/24   client network: NBD
//!   blackhole 10.R.0.0/16 (proto 250, metric <pid>): nothing sent to these
//!     addresses ever leaves the machine, even while the bridges go away
//! namespace s2d-chaos-<pid>-n<i> (node i, 1-based)
//!   lo up
//!   veth "cluster" 10.R.1.(10+i)  (host end s2c<pid>c<i> on the cluster bridge)
//!       --listen :7001, replication on the same IP
//!   veth "client"  10.R.2.(10+i)  (host end s2c<pid>k<i> on the client bridge)
//!       --nbd-listen :10809
//! /var/tmp/s2d-chaos-<pid>/n<i>/
//!   data/  storaged.log             on /var/tmp
//!   fs.img (320 MiB ext4, -m 0) loop-mounted on disks/, holding disk0.img
//! ```
//!
//! `R` is the first of 200..=249 (from the pid on) that no address or route
//! of the machine uses.
//!
//! - A partition sets the host end of a node's cluster veth down (and, for
//!   `Cut::All`, its client veth): the node keeps running and keeps its
//!   sockets, every packet to and from it on that network is dropped
//!   (established connections stall, new ones time out), as with a pulled
//!   cable. Healing sets the link up again.
//! - A full disk: `fill_disk` fallocates a filler file over every free
//!   block of the node's filesystem, so a write into a block of the sparse
//!   disk file that was never written fails with ENOSPC (overwrites still
//!   succeed, as on a thin-provisioned LUN that ran out of space);
//!   `free_disk` deletes the filler and syncs the filesystem.
//!
//! Clean-up: `Drop` kills the nodes, then removes links, bridges,
//! namespaces, mounts, the route and the run's directory, also when the
//! test panics. The storaged processes die with the thread that started
//! them (`PR_SET_PDEATHSIG`). Leftovers of a run whose process is gone
//! (kill -9 of the test) are removed at the next setup.

use crate::cluster::{json_list, members_agree, node_name, poll_until};
use crate::{NodeOptions, bin_dir};
use serde_json::Value;
use std::fs::File;
use std::net::{SocketAddr, TcpStream};
use std::os::unix::io::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The gRPC port of every node (each has its own namespace).
pub const GRPC_PORT: u16 = 7001;
/// The NBD port of every node.
pub const NBD_PORT: u16 = 10809;
/// Size of each node's filesystem image (sparse on /var/tmp).
const FS_BYTES: u64 = 320 << 20;
/// `proto` of the run's blackhole route, to find it again.
const ROUTE_PROTO: &str = "250";
const LOG_TAIL: usize = 40;

fn ns_name(pid: u32, i: usize) -> String {
    format!("s2d-chaos-{pid}-n{i}")
}

fn run_dir(pid: u32) -> PathBuf {
    PathBuf::from(format!("/var/tmp/s2d-chaos-{pid}"))
}

fn out_text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
    .trim_end()
    .to_string()
}

/// Run a system command; Err(its output) when it fails or cannot start.
fn sh(program: &str, args: &[&str]) -> Result<String, String> {
    let o = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run {program}: {e}"))?;
    if o.status.success() {
        Ok(String::from_utf8_lossy(&o.stdout).into_owned())
    } else {
        Err(format!(
            "`{program} {}` failed ({}): {}",
            args.join(" "),
            o.status,
            out_text(&o)
        ))
    }
}

/// `sh`, panicking with `why` (what the suite needs it for) on failure.
fn must(program: &str, args: &[&str], why: &str) -> String {
    sh(program, args).unwrap_or_else(|e| {
        panic!(
            "chaos network/disk setup: {e}\n{why} (the chaos suite runs as root with iproute2, \
             loop devices and mkfs.ext4, as CI does)"
        )
    })
}

fn pid_alive(pid: u32) -> bool {
    // SAFETY: signal 0 only checks that the process exists.
    let r = unsafe { libc::kill(pid as i32, 0) };
    r == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// The pid in a name `prefix<digits><rest>`.
fn pid_in(name: &str, prefix: &str) -> Option<u32> {
    let rest = name.strip_prefix(prefix)?;
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// Mount points under `dir` (from /proc/self/mountinfo), deepest first.
fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut v: Vec<PathBuf> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(PathBuf::from)
        .filter(|p| p.starts_with(dir))
        .collect();
    v.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    v
}

/// Kill every process in namespace `ns` (kill -9, then wait a little for
/// them to go).
fn kill_ns_pids(ns: &str) {
    let Ok(pids) = sh("ip", &["netns", "pids", ns]) else {
        return;
    };
    for p in pids
        .split_whitespace()
        .filter_map(|p| p.parse::<i32>().ok())
    {
        // SAFETY: killing a leftover process of our own test run.
        unsafe { libc::kill(p, libc::SIGKILL) };
    }
    let end = Instant::now() + Duration::from_secs(5);
    while Instant::now() < end
        && sh("ip", &["netns", "pids", ns]).is_ok_and(|p| !p.trim().is_empty())
    {
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Remove what a run of `pid` set up (namespaces, links, route, mounts,
/// directory), ignoring what is not there.
fn teardown(pid: u32) {
    let nss = sh("ip", &["netns", "list"]).unwrap_or_default();
    let prefix = format!("s2d-chaos-{pid}-n");
    let ours: Vec<String> = nss
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(&prefix))
        .map(str::to_string)
        .collect();
    for ns in &ours {
        kill_ns_pids(ns);
    }
    let links = sh("ip", &["-o", "link", "show"]).unwrap_or_default();
    let lp = format!("s2c{pid}");
    for l in links.lines() {
        let Some(name) = l.split(": ").nth(1) else {
            continue;
        };
        let name = name.split('@').next().unwrap_or(name);
        if name.starts_with(&lp) && pid_in(name, "s2c") == Some(pid) {
            let _ = sh("ip", &["link", "del", name]);
        }
    }
    for ns in &ours {
        let _ = sh("ip", &["netns", "del", ns]);
    }
    let dir = run_dir(pid);
    for m in mounts_under(&dir) {
        if let Err(e) = sh("umount", &[&m.to_string_lossy()]) {
            eprintln!("chaos teardown: {e}; unmounting lazily");
            let _ = sh("umount", &["-l", &m.to_string_lossy()]);
        }
    }
    // mount -o loop sets autoclear; this only catches a loop device left
    // behind by an interrupted mount.
    for i in 1..=16 {
        let img = dir.join(format!("n{i}/fs.img"));
        if let Ok(l) = sh("losetup", &["-j", &img.to_string_lossy()]) {
            for dev in l.lines().filter_map(|l| l.split(':').next()) {
                let _ = sh("losetup", &["-d", dev]);
            }
        }
    }
    if dir.exists()
        && mounts_under(&dir).is_empty()
        && let Err(e) = std::fs::remove_dir_all(&dir)
    {
        eprintln!("chaos teardown: remove {}: {e}", dir.display());
    }
    // The route goes last: until here it keeps stray packets on the machine.
    let routes = sh(
        "ip",
        &[
            "-4",
            "route",
            "show",
            "type",
            "blackhole",
            "proto",
            ROUTE_PROTO,
        ],
    )
    .unwrap_or_default();
    for r in routes.lines() {
        let w: Vec<&str> = r.split_whitespace().collect();
        let metric = w
            .iter()
            .position(|x| *x == "metric")
            .and_then(|k| w.get(k + 1))
            .and_then(|m| m.parse::<u32>().ok());
        // "blackhole 10.R.0.0/16 metric PID" (proto is the filter)
        if metric == Some(pid)
            && let Some(net) = w.iter().find(|x| x.contains('/'))
        {
            let m = pid.to_string();
            let _ = sh(
                "ip",
                &[
                    "route",
                    "del",
                    "blackhole",
                    net,
                    "proto",
                    ROUTE_PROTO,
                    "metric",
                    &m,
                ],
            );
        }
    }
}

/// Pids of earlier runs whose process is gone but whose namespaces, links,
/// routes or directories are still there.
fn dead_runs() -> Vec<u32> {
    let mut pids = Vec::new();
    for l in sh("ip", &["netns", "list"]).unwrap_or_default().lines() {
        pids.extend(pid_in(l, "s2d-chaos-"));
    }
    for l in sh("ip", &["-o", "link", "show"])
        .unwrap_or_default()
        .lines()
    {
        if let Some(name) = l.split(": ").nth(1) {
            pids.extend(pid_in(name, "s2c"));
        }
    }
    for r in sh(
        "ip",
        &[
            "-4",
            "route",
            "show",
            "type",
            "blackhole",
            "proto",
            ROUTE_PROTO,
        ],
    )
    .unwrap_or_default()
    .lines()
    {
        let w: Vec<&str> = r.split_whitespace().collect();
        if let Some(k) = w.iter().position(|x| *x == "metric") {
            pids.extend(w.get(k + 1).and_then(|m| m.parse::<u32>().ok()));
        }
    }
    if let Ok(rd) = std::fs::read_dir("/var/tmp") {
        for e in rd.flatten() {
            pids.extend(pid_in(&e.file_name().to_string_lossy(), "s2d-chaos-"));
        }
    }
    pids.sort_unstable();
    pids.dedup();
    let me = std::process::id();
    pids.retain(|&p| p != me && !pid_alive(p));
    pids
}

/// An exclusive lock on a file while a run picks its subnet.
struct SetupLock(File);

impl SetupLock {
    fn take() -> SetupLock {
        let f = File::create("/var/tmp/s2d-chaos-net.lock").expect("create setup lock file");
        // SAFETY: flock on our own descriptor.
        let r = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) };
        assert_eq!(r, 0, "flock: {}", std::io::Error::last_os_error());
        SetupLock(f)
    }
}

impl Drop for SetupLock {
    fn drop(&mut self) {
        // SAFETY: unlocking our own descriptor.
        unsafe { libc::flock(self.0.as_raw_fd(), libc::LOCK_UN) };
    }
}

/// What a partition cuts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cut {
    /// The cluster network only: the node's NBD clients still reach it, its
    /// peers and s2dctl do not (a storage network failing on its own).
    Cluster,
    /// Both networks: nothing reaches the node.
    All,
}

/// The namespaces, links, route and filesystems of one run (see the
/// module doc). Dropping it removes them.
pub struct ChaosNet {
    pid: u32,
    /// The second byte of the run's addresses, 10.R.x.y.
    pub subnet: u8,
}

impl ChaosNet {
    /// Set up the networks and filesystems of `nodes` nodes.
    pub fn create(nodes: usize) -> ChaosNet {
        assert!((1..=16).contains(&nodes), "1 to 16 nodes");
        // SAFETY: geteuid has no preconditions.
        let root = unsafe { libc::geteuid() } == 0;
        assert!(
            root,
            "the chaos suite must run as root: it puts every node in a network namespace \
             and its disk on a loop-mounted filesystem (CI runs as root)"
        );
        let _lock = SetupLock::take();
        for pid in dead_runs() {
            eprintln!("chaos setup: removing leftovers of an earlier run (pid {pid})");
            teardown(pid);
        }
        let pid = std::process::id();
        // A panic below drops `net`, which removes what was made so far.
        let mut net = ChaosNet { pid, subnet: 0 };
        let used = format!(
            "{}\n{}",
            must("ip", &["-o", "-4", "addr", "show"], "list addresses"),
            must(
                "ip",
                &["-4", "route", "show", "table", "all"],
                "list routes"
            )
        );
        net.subnet = (0..50u32)
            .map(|k| (200 + (pid + k) % 50) as u8)
            .find(|r| !used.contains(&format!("10.{r}.")))
            .expect("no free 10.R.0.0/16 (R in 200..=249) for the chaos networks");
        let r = net.subnet;
        let m = pid.to_string();
        must(
            "ip",
            &[
                "route",
                "add",
                "blackhole",
                &format!("10.{r}.0.0/16"),
                "proto",
                ROUTE_PROTO,
                "metric",
                &m,
            ],
            "a blackhole route for the run's addresses",
        );
        for (b, k) in [("c", 1), ("k", 2)] {
            let br = format!("s2c{pid}{b}");
            must(
                "ip",
                &["link", "add", &br, "type", "bridge"],
                "a bridge (ip link add type bridge)",
            );
            must(
                "ip",
                &["addr", "add", &format!("10.{r}.{k}.1/24"), "dev", &br],
                "an address on the bridge",
            );
            must("ip", &["link", "set", &br, "up"], "bridge up");
        }
        for i in 1..=nodes {
            let ns = ns_name(pid, i);
            must(
                "ip",
                &["netns", "add", &ns],
                "a network namespace (ip netns add)",
            );
            must(
                "ip",
                &["-n", &ns, "link", "set", "lo", "up"],
                "lo up in the namespace",
            );
            for (b, k, inner) in [("c", 1, "cluster"), ("k", 2, "client")] {
                let host = format!("s2c{pid}{b}{i}");
                must(
                    "ip",
                    &[
                        "link", "add", &host, "type", "veth", "peer", "name", inner, "netns", &ns,
                    ],
                    "a veth pair into the namespace",
                );
                must(
                    "ip",
                    &[
                        "link",
                        "set",
                        &host,
                        "master",
                        &format!("s2c{pid}{b}"),
                        "up",
                    ],
                    "the veth's host end on the bridge",
                );
                must(
                    "ip",
                    &[
                        "-n",
                        &ns,
                        "addr",
                        "add",
                        &format!("10.{r}.{k}.{}/24", 10 + i),
                        "dev",
                        inner,
                    ],
                    "the node's address",
                );
                must(
                    "ip",
                    &["-n", &ns, "link", "set", inner, "up"],
                    "the veth's namespace end up",
                );
            }
            net.make_fs(i);
        }
        net
    }

    fn node_dir(&self, i: usize) -> PathBuf {
        run_dir(self.pid).join(format!("n{i}"))
    }

    /// Where node `i`'s disk files live (its own filesystem).
    pub fn disk_dir(&self, i: usize) -> PathBuf {
        self.node_dir(i).join("disks")
    }

    fn make_fs(&mut self, i: usize) {
        let dir = self.node_dir(i);
        std::fs::create_dir_all(dir.join("data")).expect("create node dir");
        std::fs::create_dir_all(self.disk_dir(i)).expect("create mount point");
        let img = dir.join("fs.img");
        File::create(&img)
            .and_then(|f| f.set_len(FS_BYTES))
            .expect("create filesystem image");
        let img = img.to_string_lossy().into_owned();
        must(
            "mkfs.ext4",
            &[
                "-q",
                "-F",
                "-m",
                "0",
                "-N",
                "256",
                "-E",
                "lazy_itable_init=0,lazy_journal_init=0",
                &img,
            ],
            "an ext4 filesystem for the node's disk",
        );
        must("losetup", &["-f"], "a free loop device (losetup -f)");
        must(
            "mount",
            &["-o", "loop", &img, &self.disk_dir(i).to_string_lossy()],
            "a loop mount of the node's filesystem",
        );
    }

    /// Node `i`'s address on the cluster network.
    pub fn cluster_ip(&self, i: usize) -> String {
        format!("10.{}.1.{}", self.subnet, 10 + i)
    }

    /// Node `i`'s address on the client network.
    pub fn client_ip(&self, i: usize) -> String {
        format!("10.{}.2.{}", self.subnet, 10 + i)
    }

    fn set_link(&self, i: usize, which: &str, up: bool) -> Result<(), String> {
        let link = format!("s2c{}{which}{i}", self.pid);
        sh(
            "ip",
            &["link", "set", &link, if up { "up" } else { "down" }],
        )
        .map(|_| ())
    }

    /// Cut node `i` off (see `Cut`).
    pub fn partition(&self, i: usize, cut: Cut) -> Result<(), String> {
        self.set_link(i, "c", false)?;
        if cut == Cut::All {
            self.set_link(i, "k", false)?;
        }
        Ok(())
    }

    /// Undo `partition`.
    pub fn heal(&self, i: usize) -> Result<(), String> {
        self.set_link(i, "c", true)?;
        self.set_link(i, "k", true)
    }

    /// Allocate every free block of node `i`'s filesystem to a filler file;
    /// returns the bytes it took.
    pub fn fill_disk(&self, i: usize) -> Result<u64, String> {
        let path = self.disk_dir(i).join("filler");
        let f = File::create(&path).map_err(|e| format!("create {}: {e}", path.display()))?;
        let (mut off, mut chunk) = (0i64, 1i64 << 30);
        while chunk >= 4096 {
            // SAFETY: fallocate on our own descriptor.
            let r = unsafe { libc::fallocate(f.as_raw_fd(), 0, off, chunk) };
            if r == 0 {
                off += chunk;
                continue;
            }
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::ENOSPC) {
                return Err(format!("fallocate {}: {e}", path.display()));
            }
            chunk /= 2;
        }
        f.sync_all().map_err(|e| format!("fsync filler: {e}"))?;
        Ok(off as u64)
    }

    /// Bytes of node `i`'s filesystem a file can still get (`f_bavail`:
    /// ext4 keeps a few MiB of its own for metadata, which writes of file
    /// data cannot use).
    pub fn disk_free(&self, i: usize) -> u64 {
        let p =
            std::ffi::CString::new(self.disk_dir(i).to_string_lossy().as_bytes()).expect("path");
        // SAFETY: statvfs into a zeroed struct we own.
        let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
        let r = unsafe { libc::statvfs(p.as_ptr(), &mut s) };
        assert_eq!(r, 0, "statvfs: {}", std::io::Error::last_os_error());
        s.f_bavail as u64 * s.f_frsize as u64
    }

    /// Delete node `i`'s filler and sync the filesystem, so the freed
    /// blocks can be allocated again at once.
    pub fn free_disk(&self, i: usize) -> Result<(), String> {
        let dir = self.disk_dir(i);
        std::fs::remove_file(dir.join("filler")).map_err(|e| format!("remove filler: {e}"))?;
        let d = File::open(&dir).map_err(|e| format!("open {}: {e}", dir.display()))?;
        // SAFETY: syncfs on our own descriptor.
        let r = unsafe { libc::syncfs(d.as_raw_fd()) };
        if r != 0 {
            return Err(format!("syncfs: {}", std::io::Error::last_os_error()));
        }
        Ok(())
    }
}

impl Drop for ChaosNet {
    fn drop(&mut self) {
        teardown(self.pid);
    }
}

/// Why a node did not come up.
fn start_failure(exited: Option<std::process::ExitStatus>, log: String) -> String {
    match exited {
        Some(st) => format!("storaged exited during start ({st}); log:\n{log}"),
        None => format!("storaged did not start in 30 s; log:\n{log}"),
    }
}

/// One storaged in its namespace.
pub struct NetNode {
    pub index: usize,
    pub grpc: SocketAddr,
    pub nbd: SocketAddr,
    pub opts: NodeOptions,
    ns: String,
    dir: PathBuf,
    disk_dir: PathBuf,
    child: Option<Child>,
}

impl NetNode {
    pub fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.join("storaged.log")
    }

    pub fn disk_paths(&self) -> Vec<PathBuf> {
        (0..self.opts.disks)
            .map(|i| self.disk_dir.join(format!("disk{i}.img")))
            .collect()
    }

    fn command(&self) -> Command {
        let mut c = Command::new(bin_dir().join("storaged"));
        c.arg("--data-dir")
            .arg(self.data_dir())
            .arg("--listen")
            .arg(self.grpc.to_string())
            .arg("--nbd-listen")
            .arg(self.nbd.to_string())
            .arg("--disk-size")
            .arg(self.opts.disk_size)
            .arg("--extent-size")
            .arg(self.opts.extent_size)
            .arg("--io-engine")
            .arg(self.opts.io_engine);
        for d in self.disk_paths() {
            c.arg("--disk").arg(d);
        }
        if let Some(n) = &self.opts.name {
            c.arg("--name").arg(n);
        }
        if let Some(j) = self.opts.join {
            c.arg("--join").arg(j.to_string());
        }
        if let Some(d) = self.opts.down_after {
            c.arg("--down-after").arg(d);
        }
        if let Some(r) = self.opts.rebuild_after {
            c.arg("--rebuild-after").arg(r);
        }
        if let Some(b) = self.opts.repair_bandwidth {
            c.arg("--repair-bandwidth").arg(b);
        }
        c.args(&self.opts.extra_args);
        c
    }

    /// Start the process in its namespace without waiting.
    pub fn spawn(&mut self) {
        assert!(self.child.is_none(), "node already running");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("log file");
        let ns = File::open(format!("/run/netns/{}", self.ns))
            .unwrap_or_else(|e| panic!("open /run/netns/{}: {e}", self.ns));
        let fd = ns.as_raw_fd();
        let mut cmd = self.command();
        cmd.env("RUST_LOG", self.opts.rust_log.unwrap_or("info"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log);
        // SAFETY: only async-signal-safe calls between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // Die with the test (its thread), never outlive it.
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().expect("spawn storaged in its namespace");
        drop(ns);
        self.child = Some(child);
    }

    /// Wait up to 30 s until its gRPC and NBD ports accept (from the root
    /// namespace).
    pub fn wait_ready(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(30);
        let t = Duration::from_millis(500);
        loop {
            if let Some(c) = self.child.as_mut()
                && let Ok(Some(status)) = c.try_wait()
            {
                self.child = None;
                return Err(start_failure(Some(status), self.log_text()));
            }
            if TcpStream::connect_timeout(&self.grpc, t).is_ok()
                && TcpStream::connect_timeout(&self.nbd, t).is_ok()
            {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(start_failure(None, self.log_text()));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// (Re)start the process and wait until its ports accept.
    pub fn try_restart(&mut self) -> Result<(), String> {
        self.spawn();
        self.wait_ready()
    }

    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn signal(&self, sig: i32) {
        let pid = self.pid().expect("node is not running") as i32;
        // SAFETY: signalling our own child, not reaped yet.
        let r = unsafe { libc::kill(pid, sig) };
        assert_eq!(
            r,
            0,
            "kill({pid}, {sig}): {}",
            std::io::Error::last_os_error()
        );
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    pub fn log_tail(&self, n: usize) -> String {
        let text = self.log_text();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// Run s2dctl (from the root namespace) against this node.
    pub fn ctl(&self, args: &[&str]) -> Output {
        Command::new(bin_dir().join("s2dctl"))
            .arg("--endpoint")
            .arg(self.grpc.to_string())
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run s2dctl")
    }
}

impl Drop for NetNode {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A cluster of `NetNode`s, formed like `cluster::Cluster` (node 1 runs
/// `cluster init`, the others join it one after another, named n1, n2...).
pub struct NetCluster {
    // Declared first, dropped first: the processes die before their
    // namespaces and filesystems go.
    nodes: Vec<NetNode>,
    pub net: ChaosNet,
}

impl NetCluster {
    /// `n` nodes built from `template` (name and join set per node), joined
    /// and with a leader.
    pub fn start(n: usize, template: NodeOptions) -> NetCluster {
        let net = ChaosNet::create(n);
        let nodes = (1..=n)
            .map(|i| {
                let grpc: SocketAddr = format!("{}:{GRPC_PORT}", net.cluster_ip(i))
                    .parse()
                    .expect("addr");
                let nbd: SocketAddr = format!("{}:{NBD_PORT}", net.client_ip(i))
                    .parse()
                    .expect("addr");
                NetNode {
                    index: i,
                    grpc,
                    nbd,
                    opts: NodeOptions {
                        name: Some(node_name(i)),
                        join: None,
                        ..template.clone()
                    },
                    ns: ns_name(net.pid, i),
                    dir: net.node_dir(i),
                    disk_dir: net.disk_dir(i),
                    child: None,
                }
            })
            .collect();
        let mut c = NetCluster { nodes, net };
        if let Err(e) = c.nodes[0].try_restart() {
            panic!("node 1 did not start: {e}");
        }
        let mut tries = 0;
        c.wait_for("cluster init on node 1", Duration::from_secs(10), |c| {
            tries += 1;
            let o = c.ctl(1, &["cluster", "init", "--name", "chaos"]);
            if o.status.success() {
                Ok(())
            } else {
                let e = out_text(&o);
                eprintln!("cluster init on node 1 failed (try {tries}): {e}");
                Err(e)
            }
        });
        let first = c.nodes[0].grpc;
        for i in 2..=n {
            c.nodes[i - 1].opts.join = Some(first);
            if let Err(e) = c.nodes[i - 1].try_restart() {
                panic!(
                    "node {i} did not join the cluster: {e}\n{}",
                    c.logs(&c.all())
                );
            }
        }
        c.wait_members(n);
        c
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    pub fn all(&self) -> Vec<usize> {
        (1..=self.nodes.len()).collect()
    }

    pub fn node(&self, i: usize) -> &NetNode {
        assert!((1..=self.nodes.len()).contains(&i), "no node {i}");
        &self.nodes[i - 1]
    }

    pub fn node_mut(&mut self, i: usize) -> &mut NetNode {
        assert!((1..=self.nodes.len()).contains(&i), "no node {i}");
        &mut self.nodes[i - 1]
    }

    pub fn live(&mut self) -> Vec<usize> {
        (1..=self.nodes.len())
            .filter(|&i| self.nodes[i - 1].is_running())
            .collect()
    }

    pub fn ctl(&self, i: usize, args: &[&str]) -> Output {
        self.node(i).ctl(args)
    }

    pub fn ctl_ok(&self, i: usize, args: &[&str]) -> String {
        let o = self.ctl(i, args);
        if !o.status.success() {
            panic!(
                "s2dctl {args:?} on node {i} failed ({}): {}\n{}",
                o.status,
                out_text(&o),
                self.logs(&[i])
            );
        }
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    /// `s2dctl --json ARGS` on node `i`: the parsed output, or the error.
    pub fn try_json(&self, i: usize, args: &[&str]) -> Result<Value, String> {
        let mut a = vec!["--json"];
        a.extend_from_slice(args);
        let o = self.ctl(i, &a);
        if !o.status.success() {
            return Err(format!(
                "s2dctl {a:?} on node {i}: {} ({})",
                out_text(&o),
                o.status
            ));
        }
        serde_json::from_slice(&o.stdout).map_err(|e| {
            format!(
                "s2dctl {a:?} on node {i} printed no JSON ({e}): {}",
                String::from_utf8_lossy(&o.stdout)
            )
        })
    }

    pub fn status(&self, i: usize) -> Result<Value, String> {
        self.try_json(i, &["cluster", "status"])
    }

    fn index_of(&self, node: &Value) -> Option<usize> {
        let addr = node["address"].as_str().unwrap_or_default();
        let name = node["name"].as_str().unwrap_or_default();
        self.nodes
            .iter()
            .position(|n| n.grpc.to_string() == addr || n.opts.name.as_deref() == Some(name))
            .map(|p| p + 1)
    }

    /// The leader as node `i` sees it.
    pub fn leader_seen_by(&self, i: usize) -> Result<usize, String> {
        let s = self.status(i)?;
        let id = s["leader_id"].as_u64().unwrap_or(0);
        if id == 0 {
            return Err(format!("node {i} knows no leader: {s}"));
        }
        json_list(&s["nodes"], "nodes")
            .iter()
            .find(|n| n["id"].as_u64() == Some(id))
            .and_then(|n| self.index_of(n))
            .ok_or_else(|| format!("node {i}: leader id {id} is none of ours: {s}"))
    }

    /// Wait until every running node sees `n` members and the same leader.
    pub fn wait_members(&mut self, n: usize) {
        self.wait_for(
            &format!("every live node to see {n} members and one leader"),
            Duration::from_secs(30),
            |c| {
                let live = c.live();
                members_agree(&live, n, |i| c.status(i), |i| c.leader_seen_by(i))
            },
        )
    }

    /// Poll `f` until Ok or `timeout`; then panic with the logs.
    pub fn wait_for<T>(
        &mut self,
        what: &str,
        timeout: Duration,
        f: impl FnMut(&mut NetCluster) -> Result<T, String>,
    ) -> T {
        poll_until(self, what, timeout, f, |c| c.logs(&c.all()))
    }

    /// The tails of the logs of the nodes `which`.
    pub fn logs(&self, which: &[usize]) -> String {
        let mut s = String::new();
        for &i in which {
            if let Some(n) = self.nodes.get(i.wrapping_sub(1)) {
                s.push_str(&format!(
                    "---- node {i} ({}, {}, namespace {}) log tail ----\n{}\n",
                    node_name(i),
                    n.grpc,
                    n.ns,
                    n.log_tail(LOG_TAIL)
                ));
            }
        }
        s
    }

    pub fn kill9(&mut self, i: usize) {
        self.node_mut(i).kill9();
    }

    /// SIGSTOP node `i` (a hung node).
    pub fn pause(&mut self, i: usize) {
        self.node(i).signal(libc::SIGSTOP);
    }

    pub fn resume(&mut self, i: usize) {
        self.node(i).signal(libc::SIGCONT);
    }

    pub fn partition(&self, i: usize, cut: Cut) -> Result<(), String> {
        self.node(i);
        self.net.partition(i, cut)
    }

    pub fn heal(&self, i: usize) -> Result<(), String> {
        self.node(i);
        self.net.heal(i)
    }
}
