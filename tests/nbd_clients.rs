//! Real NBD clients against a real storaged, with both I/O engines:
//! qemu-io (patterns, unaligned too), qemu-img convert + compare, nbdinfo,
//! nbdcopy, fio's nbd engine with verification, and hostile input.

use harness::{Node, NodeOptions, have, run, run_ok};
use std::io::Write;

fn node(engine: &'static str) -> Node {
    Node::start(NodeOptions {
        io_engine: engine,
        ..NodeOptions::default()
    })
}

fn qemu_io(node: &Node, vol: &str, cmds: &[&str]) -> String {
    let uri = node.uri(vol);
    let mut args = vec!["-f", "raw", &uri];
    for c in cmds {
        args.push("-c");
        args.push(c);
    }
    let out = run_ok("qemu-io", &args);
    assert!(
        !out.contains("Pattern verification failed"),
        "qemu-io pattern mismatch:\n{out}"
    );
    out
}

fn qemu_io_patterns(engine: &'static str) {
    if !have("qemu-io") {
        return;
    }
    let n = node(engine);
    n.create_volume("vol", "64MiB");
    qemu_io(
        &n,
        "vol",
        &[
            "write -P 0xa1 0 64k",
            "write -P 0xb2 1000 5000",
            "write -P 0xc3 4095 2",
            // Across the 4 MiB extent boundary.
            "write -P 0xd4 4190000 20000",
            "read -P 0xa1 0 1000",
            "read -P 0xb2 1000 3095",
            "read -P 0xc3 4095 2",
            "read -P 0xb2 4097 1903",
            "read -P 0xa1 6000 59536",
            "read -P 0xd4 4190000 20000",
            "read -P 0 5000000 100000",
        ],
    );
    // After a reconnect the data is the same.
    qemu_io(
        &n,
        "vol",
        &["read -P 0xd4 4190000 20000", "read -P 0xc3 4095 2"],
    );
}

#[test]
fn qemu_io_patterns_unaligned_and_across_extents_uring() {
    qemu_io_patterns("uring");
}

#[test]
fn qemu_io_patterns_unaligned_and_across_extents_sync_engine() {
    qemu_io_patterns("sync");
}

fn convert_and_compare(engine: &'static str) {
    if !have("qemu-img") {
        return;
    }
    let n = node(engine);
    n.create_volume("img", "64MiB");
    let src = n.dir.path().join("random.raw");
    let mut f = std::fs::File::create(&src).expect("create image");
    let mut state = 0x1234_5678_9abc_def0u64;
    let mut buf = vec![0u8; 1 << 20];
    for mb in 0..64 {
        for chunk in buf.chunks_mut(8) {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            chunk.copy_from_slice(&state.to_le_bytes());
        }
        // Leave some zero megabytes so the image has holes to find.
        if mb % 9 == 4 {
            f.write_all(&vec![0u8; 1 << 20]).expect("write");
        } else {
            f.write_all(&buf).expect("write");
        }
    }
    drop(f);
    let src = src.to_str().expect("path");
    let uri = n.uri("img");
    run_ok(
        "qemu-img",
        &["convert", "-n", "-f", "raw", "-O", "raw", src, &uri],
    );
    let out = run_ok(
        "qemu-img",
        &["compare", "-f", "raw", "-F", "raw", src, &uri],
    );
    assert!(
        out.contains("Images are identical"),
        "qemu-img compare: {out}"
    );
}

#[test]
fn qemu_img_convert_64mib_random_image_then_compare_uring() {
    convert_and_compare("uring");
}

#[test]
fn qemu_img_convert_64mib_random_image_then_compare_sync_engine() {
    convert_and_compare("sync");
}

#[test]
fn nbdinfo_lists_capabilities_and_map_shows_trimmed_holes() {
    if !have("nbdinfo") || !have("qemu-io") {
        return;
    }
    let n = node("auto");
    n.create_volume("caps", "64MiB");
    n.create_volume("other", "16MiB");
    let info = run_ok("nbdinfo", &[&n.uri("caps")]);
    for cap in [
        "can_flush: true",
        "can_fua: true",
        "can_trim: true",
        "can_zero: true",
        "can_fast_zero: true",
        "can_multi_conn: true",
        "can_cache: true",
        "base:allocation",
        "block_size_preferred: 4096",
        "export-size: 67108864",
    ] {
        assert!(info.contains(cap), "nbdinfo does not list {cap}:\n{info}");
    }
    let list = run_ok("nbdinfo", &["--list", &format!("nbd://{}", n.nbd)]);
    assert!(
        list.contains("export=\"caps\"") && list.contains("export=\"other\""),
        "--list: {list}"
    );

    qemu_io(
        &n,
        "caps",
        &["write -P 0x11 0 1M", "discard 256k 512k", "write -z 8M 1M"],
    );
    let map = run_ok("nbdinfo", &["--map", &n.uri("caps")]);
    // Expect: data [0,256k), hole [256k,768k), data [768k,1M), then zeros.
    let rows: Vec<Vec<&str>> = map
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(rows[0][..3], ["0", "262144", "0"], "map:\n{map}");
    assert_eq!(
        rows[1][..3],
        ["262144", "524288", "3"],
        "trimmed range is not a hole:\n{map}"
    );
    assert_eq!(rows[2][..3], ["786432", "262144", "0"], "map:\n{map}");
    qemu_io(
        &n,
        "caps",
        &[
            "read -P 0x11 0 256k",
            "read -P 0 256k 512k",
            "read -P 0x11 768k 256k",
            "read -P 0 8M 1M",
        ],
    );
}

#[test]
fn nbdcopy_round_trips_a_volume() {
    if !have("nbdcopy") {
        return;
    }
    let n = node("auto");
    n.create_volume("copy", "32MiB");
    let src = n.dir.path().join("src.raw");
    let data: Vec<u8> = (0..32u32 << 20)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    std::fs::write(&src, &data).expect("write source");
    let back = n.dir.path().join("back.raw");
    run_ok("nbdcopy", &[src.to_str().expect("path"), &n.uri("copy")]);
    run_ok("nbdcopy", &[&n.uri("copy"), back.to_str().expect("path")]);
    assert!(
        std::fs::read(&back).expect("read back") == data,
        "nbdcopy out differs from what went in"
    );
}

#[test]
fn fio_nbd_engine_random_writes_verify_crc32c() {
    if !have("fio") {
        return;
    }
    let n = node("auto");
    n.create_volume("fio", "64MiB");
    let out = run(
        "fio",
        &[
            "--name=verify",
            "--ioengine=nbd",
            &format!("--uri={}", n.uri("fio")),
            "--rw=randwrite",
            "--bs=4k",
            "--bssplit=4k/50:16k/30:64k/20",
            "--iodepth=16",
            "--size=32M",
            "--verify=crc32c",
            "--verify_fatal=1",
            "--do_verify=1",
            "--verify_state_save=0",
        ],
    );
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "fio failed:\n{text}");
    assert!(!text.contains("verify: bad"), "fio found bad data:\n{text}");
    assert!(text.contains("err= 0"), "fio reported errors:\n{text}");
}

#[test]
fn hostile_clients_do_not_disturb_the_server_or_acknowledged_data() {
    let n = node("auto");
    n.create_volume("safe", "16MiB");
    let mut good = harness::nbd::NbdClient::connect(n.nbd, "safe").expect("connect");
    good.write(0, &[0x42; 8192], false).expect("write");
    good.flush().expect("flush");

    // Garbage instead of a handshake.
    let mut s = std::net::TcpStream::connect(n.nbd).expect("connect");
    let _ = s.write_all(b"GET / HTTP/1.1\r\n\r\n\x00\x01\x02garbage");
    drop(s);
    // Unknown export.
    assert!(
        harness::nbd::NbdClient::connect(n.nbd, "nope").is_err(),
        "unknown export must be refused"
    );
    // Requests past the end, unknown commands, oversized lengths.
    let mut bad = harness::nbd::NbdClient::connect(n.nbd, "safe").expect("connect");
    let e = bad
        .raw_request(harness::nbd::CMD_READ, 0, 16 << 20, 4096, &[])
        .expect("reply");
    assert_ne!(e, 0, "a read past the end must fail");
    let e = bad
        .raw_request(
            harness::nbd::CMD_WRITE,
            0,
            (16 << 20) - 100,
            200,
            &[0xee; 200],
        )
        .expect("reply");
    assert_ne!(e, 0, "a write past the end must fail");
    let e = bad.raw_request(77, 0, 0, 0, &[]).expect("reply");
    assert_eq!(e, 22, "an unknown command must be EINVAL");
    // A header announcing a 1 GiB write, then a disconnect mid-payload.
    let mut hdr = Vec::new();
    hdr.extend_from_slice(&0x2560_9513u32.to_be_bytes());
    hdr.extend_from_slice(&0u16.to_be_bytes());
    hdr.extend_from_slice(&1u16.to_be_bytes());
    hdr.extend_from_slice(&9u64.to_be_bytes());
    hdr.extend_from_slice(&0u64.to_be_bytes());
    hdr.extend_from_slice(&(1u32 << 30).to_be_bytes());
    let _ = bad.send_raw(&hdr);
    let _ = bad.send_raw(&[0xff; 1000]);
    drop(bad);
    // Random bytes after a good handshake.
    let mut junk = harness::nbd::NbdClient::connect(n.nbd, "safe").expect("connect");
    let noise: Vec<u8> = (0..4096u32)
        .map(|i| (i.wrapping_mul(7919) >> 3) as u8)
        .collect();
    let _ = junk.send_raw(&noise);
    drop(junk);

    // The well-behaved client is unaffected and its data intact.
    assert_eq!(
        good.read(0, 8192).expect("read"),
        vec![0x42; 8192],
        "acknowledged data changed"
    );
    good.write(8192, &[0x43; 4096], true)
        .expect("write after the hostile clients");
    let mut fresh = harness::nbd::NbdClient::connect(n.nbd, "safe").expect("server still accepts");
    assert_eq!(fresh.read(8192, 4096).expect("read"), vec![0x43; 4096]);
}
