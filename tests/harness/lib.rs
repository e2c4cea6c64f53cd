//! Test harness: starts real `storaged` processes on 127.0.0.1 with disks
//! as files on ext4 (/var/tmp), runs `s2dctl` and the real NBD and iSCSI
//! clients against them, and speaks raw NBD or iSCSI where a test must
//! control every byte.
//!
//! The binaries come from the same target directory as the test (build
//! them first: `cargo build --bins`), or from `S2D_BIN_DIR`.

pub mod cluster;
pub mod iscsi;
pub mod nbd;
pub mod netns;
pub mod ondisk;

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

/// Directory holding storaged and s2dctl.
pub fn bin_dir() -> PathBuf {
    if let Ok(d) = std::env::var("S2D_BIN_DIR") {
        return PathBuf::from(d);
    }
    let exe = std::env::current_exe().expect("current exe");
    // target/<profile>/deps/<test> -> target/<profile>
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target dir")
        .to_path_buf();
    assert!(
        dir.join("storaged").exists() && dir.join("s2dctl").exists(),
        "storaged/s2dctl not built in {}: run `cargo build --bins` first",
        dir.display()
    );
    dir
}

/// A port that is free now, below the kernel's ephemeral range (32768 and
/// up), so that no outgoing connection (of this or another test's nodes)
/// takes it as its source port before the node binds it. Each test process
/// starts at its own place in 20000..32000 and counts up.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    const LOW: u32 = 20_000;
    const SPAN: u32 = 12_000;
    static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);
    let _ = NEXT.compare_exchange(
        u32::MAX,
        (std::process::id().wrapping_mul(397)) % SPAN,
        Ordering::SeqCst,
        Ordering::SeqCst,
    );
    for _ in 0..SPAN {
        let port = (LOW + NEXT.fetch_add(1, Ordering::SeqCst) % SPAN) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port in 20000..32000 on 127.0.0.1");
}

/// Whether an external client program is installed. CI installs all of
/// them; a missing one is reported loudly and the check is skipped.
pub fn have(program: &str) -> bool {
    let found = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {program}"))
        .stdout(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !found {
        eprintln!(
            "!!! {program} is not installed: this check is SKIPPED (CI installs it via .ci/run)"
        );
    }
    found
}

/// Options of one storaged node.
#[derive(Clone, Debug)]
pub struct NodeOptions {
    pub disks: usize,
    pub disk_size: &'static str,
    pub extent_size: &'static str,
    pub io_engine: &'static str,
    /// Serve iSCSI too (`--iscsi-listen` on a free port).
    pub iscsi: bool,
    /// `--name` (storaged's default: its --listen address).
    pub name: Option<String>,
    /// `--fault-domain` (storaged's default: the name).
    pub fault_domain: Option<String>,
    /// `--join`: the gRPC address of a member of a running cluster.
    pub join: Option<SocketAddr>,
    /// `--down-after`, e.g. "1s" (storaged's default: 10s).
    pub down_after: Option<&'static str>,
    /// `--rebuild-after`, e.g. "3s" (storaged's default: 5m).
    pub rebuild_after: Option<&'static str>,
    /// `--repair-bandwidth`, e.g. "4MiB" (storaged's default: no limit).
    pub repair_bandwidth: Option<&'static str>,
    /// `--meta-snapshot-every`: Raft entries between metadata snapshots.
    pub meta_snapshot_every: Option<u64>,
    /// RUST_LOG of the process (default "info").
    pub rust_log: Option<&'static str>,
    /// More flags, e.g. `["--disk-error-limit", "4"]`.
    pub extra_args: Vec<&'static str>,
}

impl Default for NodeOptions {
    fn default() -> Self {
        NodeOptions {
            disks: 2,
            disk_size: "256MiB",
            extent_size: "4MiB",
            io_engine: "auto",
            iscsi: false,
            name: None,
            fault_domain: None,
            join: None,
            down_after: None,
            rebuild_after: None,
            repair_bandwidth: None,
            meta_snapshot_every: None,
            rust_log: None,
            extra_args: Vec::new(),
        }
    }
}

/// One storaged process with its own data dir, disks and ports.
pub struct Node {
    pub dir: tempfile::TempDir,
    pub grpc: SocketAddr,
    pub nbd: SocketAddr,
    /// The iSCSI portal, when `NodeOptions::iscsi` asked for one.
    pub iscsi: Option<SocketAddr>,
    pub opts: NodeOptions,
    child: Option<Child>,
    log: PathBuf,
}

/// Why a storaged process did not come up.
#[derive(Debug)]
pub enum StartFailure {
    /// It exited before its ports accepted.
    Exited { status: ExitStatus, log: String },
    /// Its ports did not accept within the deadline (it is still running).
    Timeout { log: String },
}

impl std::fmt::Display for StartFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StartFailure::Exited { status, log } => {
                write!(f, "storaged exited during start ({status}); log:\n{log}")
            }
            StartFailure::Timeout { log } => {
                write!(f, "storaged did not start in 30 s; log:\n{log}")
            }
        }
    }
}

impl Node {
    pub fn start(opts: NodeOptions) -> Node {
        let mut n = Node::new(opts);
        n.restart();
        n
    }

    /// A node with its data dir and ports chosen, not started yet (start
    /// it with `restart` or `try_restart`).
    pub fn new(opts: NodeOptions) -> Node {
        let dir = tempfile::tempdir_in("/var/tmp").expect("tempdir on ext4 (/var/tmp)");
        let grpc: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
        let nbd: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
        let iscsi = opts
            .iscsi
            .then(|| format!("127.0.0.1:{}", free_port()).parse().expect("addr"));
        let log = dir.path().join("storaged.log");
        Node {
            dir,
            grpc,
            nbd,
            iscsi,
            opts,
            child: None,
            log,
        }
    }

    pub fn disk_paths(&self) -> Vec<PathBuf> {
        (0..self.opts.disks)
            .map(|i| self.dir.path().join(format!("disk{i}.img")))
            .collect()
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// The storaged command line of this node.
    pub fn command(&self) -> Command {
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
        if let Some(a) = self.iscsi {
            c.arg("--iscsi-listen").arg(a.to_string());
        }
        if let Some(n) = &self.opts.name {
            c.arg("--name").arg(n);
        }
        if let Some(f) = &self.opts.fault_domain {
            c.arg("--fault-domain").arg(f);
        }
        if let Some(j) = self.opts.join {
            c.arg("--join").arg(j.to_string());
        }
        if let Some(r) = self.opts.rebuild_after {
            c.arg("--rebuild-after").arg(r);
        }
        if let Some(b) = self.opts.repair_bandwidth {
            c.arg("--repair-bandwidth").arg(b);
        }
        if let Some(d) = self.opts.down_after {
            c.arg("--down-after").arg(d);
        }
        if let Some(n) = self.opts.meta_snapshot_every {
            c.arg("--meta-snapshot-every").arg(n.to_string());
        }
        c.args(&self.opts.extra_args);
        c
    }

    /// (Re)start the process and wait until all its ports accept.
    pub fn restart(&mut self) {
        if let Err(e) = self.try_restart() {
            panic!("{e}");
        }
    }

    /// (Re)start the process and wait until all its ports accept; a
    /// process that exits first (e.g. a refused join) is an error, not a
    /// panic.
    pub fn try_restart(&mut self) -> Result<(), StartFailure> {
        self.spawn();
        self.wait_ready()
    }

    /// Start the process without waiting for its ports (see `wait_ready`),
    /// so several nodes that need each other can start together.
    pub fn spawn(&mut self) {
        assert!(self.child.is_none(), "node already running");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("log file");
        let child = self
            .command()
            .env("RUST_LOG", self.opts.rust_log.unwrap_or("info"))
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("spawn storaged");
        self.child = Some(child);
    }

    /// Wait up to 30 s until all ports of the spawned process accept.
    pub fn wait_ready(&mut self) -> Result<(), StartFailure> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(c) = self.child.as_mut()
                && let Ok(Some(status)) = c.try_wait()
            {
                self.child = None;
                return Err(StartFailure::Exited {
                    status,
                    log: self.log_text(),
                });
            }
            if TcpStream::connect(self.grpc).is_ok()
                && TcpStream::connect(self.nbd).is_ok()
                && self.iscsi.is_none_or(|a| TcpStream::connect(a).is_ok())
            {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(StartFailure::Timeout {
                    log: self.log_text(),
                });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Whether the process was started and has not exited.
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// The last `n` lines of the node's log.
    pub fn log_tail(&self, n: usize) -> String {
        let text = self.log_text();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Send `sig` (e.g. `libc::SIGSTOP`, `libc::SIGCONT`) to the running
    /// process; panics when it is not running.
    pub fn signal(&self, sig: i32) {
        let pid = self.pid().expect("node is not running") as i32;
        // SAFETY: signalling our own child, which has not been reaped.
        let r = unsafe { libc::kill(pid, sig) };
        assert_eq!(
            r,
            0,
            "kill({pid}, {sig}): {}",
            std::io::Error::last_os_error()
        );
    }

    /// kill -9, as a crash or power cut of the process.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait; returns the exit code.
    pub fn stop(&mut self) -> Option<i32> {
        let mut c = self.child.take()?;
        // SAFETY: signalling our own child.
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(st)) = c.try_wait() {
                return st.code();
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                panic!(
                    "storaged did not stop within 30 s of SIGTERM; log:\n{}",
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Run s2dctl against this node.
    pub fn ctl(&self, args: &[&str]) -> Output {
        Command::new(bin_dir().join("s2dctl"))
            .arg("--endpoint")
            .arg(self.grpc.to_string())
            .args(args)
            .output()
            .expect("run s2dctl")
    }

    /// Run s2dctl and require success; returns stdout.
    pub fn ctl_ok(&self, args: &[&str]) -> String {
        let o = self.ctl(args);
        assert!(
            o.status.success(),
            "s2dctl {args:?} failed: {}\n{}",
            String::from_utf8_lossy(&o.stderr),
            String::from_utf8_lossy(&o.stdout)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    pub fn create_volume(&self, name: &str, size: &str) {
        self.ctl_ok(&["volume", "create", name, "--size", size]);
    }

    pub fn uri(&self, volume: &str) -> String {
        format!("nbd://{}/{}", self.nbd, volume)
    }

    /// The iSCSI portal; panics when the node was started without iSCSI.
    pub fn iscsi_addr(&self) -> SocketAddr {
        self.iscsi
            .expect("node started without iSCSI (NodeOptions::iscsi)")
    }

    /// The libiscsi/qemu URL of `volume`'s LUN 0, with CHAP credentials
    /// when `chap` gives (user, secret).
    pub fn iscsi_url(&self, volume: &str, chap: Option<(&str, &str)>) -> String {
        let auth = chap.map_or(String::new(), |(u, s)| format!("{u}%{s}@"));
        format!(
            "iscsi://{auth}{}/{}/0",
            self.iscsi_addr(),
            iscsi::target_iqn(volume)
        )
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Run a program, returning its output (panics if it cannot start).
pub fn run(program: &str, args: &[&str]) -> Output {
    Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"))
}

/// Run a program and require success; returns stdout.
pub fn run_ok(program: &str, args: &[&str]) -> String {
    let o = run(program, args);
    assert!(
        o.status.success(),
        "{program} {args:?} failed ({}):\nstdout: {}\nstderr: {}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// CRC32C, as the store computes it.
pub fn crc32c(data: &[u8]) -> u32 {
    crc_fast::checksum(crc_fast::CrcAlgorithm::Crc32Iscsi, data) as u32
}
