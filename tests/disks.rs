//! Disks: corruption is caught and named, the second superblock takes
//! over, foreign or damaged disks are refused, config files are validated.

use harness::nbd::{NbdClient, NbdError};
use harness::{Node, NodeOptions, bin_dir};
use std::os::unix::fs::FileExt;
use std::path::Path;

fn find(path: &Path, needle: &[u8]) -> Option<u64> {
    let data = std::fs::read(path).expect("read disk file");
    data.windows(needle.len())
        .position(|w| w == needle)
        .map(|p| p as u64)
}

fn flip(path: &Path, at: u64) {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .expect("open disk");
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, at).expect("read byte");
    b[0] ^= 0x5a;
    f.write_all_at(&b, at).expect("write byte");
    f.sync_all().expect("sync");
}

fn check(disk: &Path) -> (i32, String) {
    let o = std::process::Command::new(bin_dir().join("storaged"))
        .args(["check", "--disk"])
        .arg(disk)
        .output()
        .expect("run storaged check");
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stdout).into_owned(),
    )
}

#[test]
fn a_flipped_data_byte_fails_the_read_and_check_names_the_block() {
    let mut node = Node::start(NodeOptions {
        disks: 1,
        ..NodeOptions::default()
    });
    node.create_volume("v", "16MiB");
    let mut good = vec![0u8; 4096];
    let mut victim = vec![0u8; 4096];
    for (i, b) in good.iter_mut().enumerate() {
        *b = (i % 251) as u8;
    }
    for (i, b) in victim.iter_mut().enumerate() {
        *b = (i % 241) as u8 ^ 0xc5;
    }
    let mut c = NbdClient::connect(node.nbd, "v").expect("connect");
    c.write(0, &good, false).expect("write");
    c.write(4096 * 5, &victim, false).expect("write");
    c.flush().expect("flush");
    drop(c);
    assert_eq!(node.stop(), Some(0));
    let disk = node.disk_paths()[0].clone();
    let at = find(&disk, &victim).expect("victim block on disk");
    assert_eq!(at % 4096, 0, "data blocks are 4 KiB aligned on disk");
    flip(&disk, at + 1234);

    let (code, out) = check(&disk);
    assert_eq!(code, 1, "check must fail on a bad block: {out}");
    assert!(
        out.contains(&format!("BAD BLOCK extent 0 block 5 disk offset {at}")),
        "check output: {out}"
    );
    assert!(out.contains("1 bad blocks"), "{out}");

    node.restart();
    let mut c = NbdClient::connect(node.nbd, "v").expect("connect");
    match c.read(4096 * 5, 4096) {
        Err(NbdError::Server(5)) => {}
        other => panic!("reading the corrupted block must be EIO, got {other:?}"),
    }
    match c.read(0, 64 * 1024) {
        Err(NbdError::Server(5)) => {}
        other => panic!(
            "a read covering the corrupted block must be EIO, got {:?}",
            other.map(|v| v.len())
        ),
    }
    assert_eq!(c.read(0, 4096).expect("good block still reads"), good);
    assert!(
        node.log_text().contains("checksum mismatch"),
        "the bad block is not logged"
    );
}

#[test]
fn a_damaged_first_superblock_falls_back_to_the_second() {
    let mut node = Node::start(NodeOptions {
        disks: 1,
        ..NodeOptions::default()
    });
    node.create_volume("v", "16MiB");
    let mut c = NbdClient::connect(node.nbd, "v").expect("connect");
    c.write(0, &[0x77; 4096], true).expect("write");
    drop(c);
    assert_eq!(node.stop(), Some(0));
    let disk = node.disk_paths()[0].clone();
    flip(&disk, 20);
    let (_, out) = check(&disk);
    assert!(
        out.contains("first superblock damaged"),
        "check does not report the damaged superblock: {out}"
    );
    node.restart();
    assert!(
        node.log_text().contains("first superblock is damaged"),
        "fallback is not logged"
    );
    let mut c = NbdClient::connect(node.nbd, "v").expect("connect");
    assert_eq!(c.read(0, 4096).expect("read"), vec![0x77; 4096]);
    // The first copy was rewritten from the second.
    assert_eq!(node.stop(), Some(0));
    let (code, out) = check(&disk);
    assert_eq!(code, 0, "{out}");
    assert!(
        !out.contains("superblock damaged"),
        "first superblock not repaired: {out}"
    );
}

fn start_fails(node: &Node) -> String {
    let o = node.command().output().expect("run storaged");
    assert_eq!(o.status.code(), Some(1), "storaged should refuse to start");
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn disks_with_bad_superblocks_or_of_another_pool_are_refused_by_name() {
    let mut a = Node::start(NodeOptions {
        disks: 1,
        ..NodeOptions::default()
    });
    assert_eq!(a.stop(), Some(0));
    let disk = a.disk_paths()[0].clone();
    // Both superblocks damaged.
    flip(&disk, 20);
    flip(&disk, 512 * 1024 + 20);
    let err = start_fails(&a);
    assert!(
        err.contains(disk.to_str().expect("path")) && err.contains("bad superblock"),
        "{err}"
    );

    // A file that is not an s2d disk.
    let b = Node::start(NodeOptions {
        disks: 1,
        ..NodeOptions::default()
    });
    let mut b = b;
    assert_eq!(b.stop(), Some(0));
    let bdisk = b.disk_paths()[0].clone();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&bdisk)
        .expect("open");
    f.write_all_at(b"\x7fELF not a disk of ours", 0)
        .expect("write");
    f.write_all_at(b"random bytes", 512 * 1024).expect("write");
    drop(f);
    let err = start_fails(&b);
    assert!(
        err.contains(bdisk.to_str().expect("path")) && err.contains("no s2d magic"),
        "{err}"
    );

    // A healthy disk of another pool.
    let mut c = Node::start(NodeOptions {
        disks: 1,
        ..NodeOptions::default()
    });
    assert_eq!(c.stop(), Some(0));
    let foreign = c.disk_paths()[0].clone();
    let d = Node::start(NodeOptions {
        disks: 1,
        ..NodeOptions::default()
    });
    let mut cmd = d.command();
    cmd.arg("--disk").arg(&foreign);
    let mut d = d;
    d.stop();
    let o = cmd.output().expect("run storaged");
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains(foreign.to_str().expect("path")) && err.contains("belongs to pool"),
        "{err}"
    );
}

#[test]
fn storaged_starts_from_a_toml_config_and_refuses_a_bad_one() {
    let dir = tempfile::tempdir_in("/var/tmp").expect("tempdir");
    let grpc = harness::free_port();
    let nbd = harness::free_port();
    let cfg = dir.path().join("storaged.toml");
    std::fs::write(
        &cfg,
        format!(
            "data-dir = \"{d}/data\"\nlisten = \"127.0.0.1:{grpc}\"\nnbd-listen = \"127.0.0.1:{nbd}\"\ndisks = [\"{d}/a.img\"]\ndisk-size = \"128MiB\"\nextent-size = \"4MiB\"\nio-engine = \"sync\"\n",
            d = dir.path().display()
        ),
    )
    .expect("write config");
    let mut child = std::process::Command::new(bin_dir().join("storaged"))
        .arg("--config")
        .arg(&cfg)
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", nbd)).is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "storaged from config did not start"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let out = std::process::Command::new(bin_dir().join("s2dctl"))
        .args([
            "--endpoint",
            &format!("127.0.0.1:{grpc}"),
            "--json",
            "pool",
            "status",
        ])
        .output()
        .expect("s2dctl");
    let _ = child.kill();
    let _ = child.wait();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("pool status json");
    assert_eq!(v["extent_size_bytes"], 4u64 << 20);
    assert_eq!(
        v["disks"][0]["io_engine"], "sync",
        "io-engine from the config file not used"
    );

    std::fs::write(
        &cfg,
        "data-dir = \"/x\"\ndisks = [\"/y\"]\ndisk-size = \"huge\"\n",
    )
    .expect("write");
    let o = std::process::Command::new(bin_dir().join("storaged"))
        .arg("--config")
        .arg(&cfg)
        .output()
        .expect("run");
    assert_eq!(o.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("bad disk size"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
}

#[test]
fn a_disk_in_use_by_a_running_storaged_is_refused() {
    let a = Node::start(NodeOptions {
        disks: 1,
        ..NodeOptions::default()
    });
    let b = Node::start(NodeOptions {
        disks: 1,
        ..NodeOptions::default()
    });
    let mut b = b;
    b.stop();
    let mut cmd = b.command();
    cmd.arg("--disk").arg(&a.disk_paths()[0]);
    let o = cmd.output().expect("run storaged");
    assert_eq!(
        o.status.code(),
        Some(1),
        "a second storaged must not open a disk in use"
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("in use by another process"), "{err}");
}
