//! Real NBD clients (qemu-io, qemu-img, nbdinfo, nbdcopy, fio) against the
//! server running in this test process on an in-memory volume.
//!
//! A test whose client binary is missing says so loudly on stderr and
//! passes; CI installs all of them (qemu-utils, libnbd-bin, fio).

mod common;

use std::process::Output;
use std::sync::Arc;

use common::*;
use tokio::process::Command;

const SIZE: u64 = 64 << 20;

async fn server() -> (TestServer, Arc<MemVolume>) {
    let vol = MemVolume::new("vol", SIZE);
    let other = MemVolume::new("other", 1 << 20);
    let srv = TestServer::start(vec![Arc::clone(&vol), other], Default::default()).await;
    (srv, vol)
}

/// Whether `bin` can be run; prints a loud notice when it cannot.
fn have(bin: &str) -> bool {
    let found = std::process::Command::new(bin)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        eprintln!(
            "!!!!! SKIPPED: `{bin}` is not installed; this real-client test did not run !!!!!"
        );
    }
    found
}

/// Run a client to completion (bounded), asserting it succeeded.
async fn run(bin: &str, args: &[&str]) -> String {
    let out = run_raw(bin, args).await;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "`{bin} {}` failed ({}):\nstdout: {stdout}\nstderr: {}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

async fn run_raw(bin: &str, args: &[&str]) -> Output {
    let child = Command::new(bin).args(args).kill_on_drop(true).output();
    tokio::time::timeout(std::time::Duration::from_secs(30), child)
        .await
        .unwrap_or_else(|_| panic!("`{bin}` did not finish in 30 s"))
        .unwrap_or_else(|e| panic!("cannot run `{bin}`: {e}"))
}

/// Data with a hole in the middle: 1 MiB data, 2 MiB zeros, 1 MiB data.
fn sparse_image() -> Vec<u8> {
    let mut img = pattern(0x11, 4 << 20);
    img[1 << 20..3 << 20].fill(0);
    img
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_io_writes_and_verifies_unaligned_patterns() {
    if !have("qemu-io") {
        return;
    }
    let (srv, vol) = server().await;
    let url = srv.url("vol");
    let out = run(
        "qemu-io",
        &[
            "-f",
            "raw",
            &url,
            "-c",
            "write -P 0xab 1000 5000",
            "-c",
            "read -P 0xab 1000 5000",
            "-c",
            "write -P 0xcd 65536 131072",
            "-c",
            "discard 65536 65536",
            "-c",
            "read -P 0 65536 65536",
            "-c",
            "read -P 0xcd 131072 65536",
            "-c",
            "flush",
        ],
    )
    .await;
    assert!(
        !out.contains("verification failed"),
        "qemu-io saw wrong data:\n{out}"
    );
    assert_eq!(
        vol.contents(1000, 5000),
        vec![0xab; 5000],
        "volume holds qemu-io's write"
    );
    assert_eq!(
        vol.contents(999, 1),
        vec![0],
        "byte before the write untouched"
    );
    assert!(!vol.is_allocated(16), "discarded block was released");
    assert!(
        vol.flushes.load(std::sync::atomic::Ordering::SeqCst) >= 1,
        "flush reached the volume"
    );
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdinfo_lists_exports_and_every_capability() {
    if !have("nbdinfo") {
        return;
    }
    let (srv, _vol) = server().await;
    let list = run("nbdinfo", &["--list", &format!("nbd://{}", srv.addr)]).await;
    for export in ["export=\"vol\"", "export=\"other\""] {
        assert!(
            list.contains(export),
            "nbdinfo --list misses {export}:\n{list}"
        );
    }
    let info = run("nbdinfo", &[&srv.url("vol")]).await;
    for line in [
        "export-size: 67108864",
        "base:allocation",
        "can_flush: true",
        "can_fua: true",
        "can_trim: true",
        "can_zero: true",
        "can_fast_zero: true",
        "can_cache: true",
        "can_df: true",
        "can_multi_conn: true",
        "is_read_only: false",
        "block_size_minimum: 1",
        "block_size_preferred: 4096",
        "block_size_maximum: 33554432",
        "structured",
    ] {
        assert!(
            info.contains(line),
            "nbdinfo does not report `{line}`:\n{info}"
        );
    }
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdinfo_map_shows_a_trimmed_range_as_a_hole() {
    if !have("nbdinfo") || !have("qemu-io") {
        return;
    }
    let (srv, vol) = server().await;
    vol.fill(0, &pattern(1, 1 << 20));
    run(
        "qemu-io",
        &["-f", "raw", &srv.url("vol"), "-c", "discard 262144 262144"],
    )
    .await;
    let map = run("nbdinfo", &["--map", &srv.url("vol")]).await;
    let rows: Vec<(u64, u64, String)> = map
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let num = |i: usize| {
                f[i].parse::<u64>()
                    .unwrap_or_else(|_| panic!("bad row {l:?}"))
            };
            (num(0), num(1), f[3..].join(" "))
        })
        .collect();
    let expect = vec![
        (0, 262144, "data".to_string()),
        (262144, 262144, "hole,zero".to_string()),
        (524288, 524288, "data".to_string()),
        (1 << 20, SIZE - (1 << 20), "hole,zero".to_string()),
    ];
    assert_eq!(rows, expect, "nbdinfo --map after a trim:\n{map}");
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdcopy_copies_a_sparse_image_in_and_out_exactly() {
    if !have("nbdcopy") {
        return;
    }
    let (srv, vol) = server().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let src = dir.path().join("src.img");
    let dst = dir.path().join("dst.img");
    let img = sparse_image();
    std::fs::write(&src, &img).expect("write source image");
    let (src_s, dst_s) = (src.to_string_lossy(), dst.to_string_lossy());
    // nbdcopy only writes as much as the source holds; the export is larger.
    run("nbdcopy", &[&src_s, &srv.url("vol")]).await;
    assert!(
        vol.contents(0, img.len()) == img,
        "volume differs from the image copied in"
    );
    std::fs::write(&dst, []).expect("create destination");
    run("nbdcopy", &[&srv.url("vol"), &dst_s]).await;
    let out = std::fs::read(&dst).expect("read copied image");
    assert_eq!(
        out.len() as u64,
        SIZE,
        "copied-out image has the export's size"
    );
    assert!(
        out[..img.len()] == img[..],
        "image copied out differs from the one copied in"
    );
    assert!(
        out[img.len()..].iter().all(|&b| b == 0),
        "tail of the export must read as zeros"
    );
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_img_converts_to_and_from_the_export() {
    if !have("qemu-img") {
        return;
    }
    let (srv, vol) = server().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let src = dir.path().join("src.raw");
    let dst = dir.path().join("dst.raw");
    let mut img = sparse_image();
    img.resize(SIZE as usize, 0);
    std::fs::write(&src, &img).expect("write source image");
    let (src_s, dst_s) = (src.to_string_lossy(), dst.to_string_lossy());
    run(
        "qemu-img",
        &[
            "convert",
            "-n",
            "-f",
            "raw",
            "-O",
            "raw",
            &src_s,
            &srv.url("vol"),
        ],
    )
    .await;
    assert!(
        vol.contents(0, img.len()) == img,
        "volume differs from the converted image"
    );
    run(
        "qemu-img",
        &["convert", "-f", "raw", "-O", "raw", &srv.url("vol"), &dst_s],
    )
    .await;
    let out = std::fs::read(&dst).expect("read converted image");
    assert!(out == img, "image converted out of the export differs");
    let map = run(
        "qemu-img",
        &["map", "-f", "raw", "--output=json", &srv.url("vol")],
    )
    .await;
    assert!(
        map.contains("\"zero\": true"),
        "qemu-img map sees no zero range:\n{map}"
    );
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fio_random_writes_at_queue_depth_32_verify() {
    if !have("fio") {
        return;
    }
    let engines = run_raw("fio", &["--enghelp"]).await;
    if !String::from_utf8_lossy(&engines.stdout).contains("nbd") {
        eprintln!("!!!!! SKIPPED: this fio has no nbd engine; the fio test did not run !!!!!");
        return;
    }
    let (srv, _vol) = server().await;
    let out = run(
        "fio",
        &[
            "--name=verify",
            "--ioengine=nbd",
            &format!("--uri={}", srv.url("vol")),
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=32",
            "--size=8m",
            "--verify=crc32c",
            "--do_verify=1",
            "--verify_fatal=1",
            // No verify-state file in the working directory.
            "--verify_state_save=0",
        ],
    )
    .await;
    assert!(
        !out.contains("verify: bad"),
        "fio found corrupted blocks:\n{out}"
    );
    assert!(out.contains("err= 0"), "fio reported errors:\n{out}");
    srv.stop().await;
}
