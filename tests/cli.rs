//! s2dctl against a real storaged: the volume lifecycle, pool status,
//! --json output, and one clear line with exit status 1 on every error.

use harness::{Node, NodeOptions};

fn err_line(node: &Node, args: &[&str]) -> String {
    let o = node.ctl(args);
    assert_eq!(
        o.status.code(),
        Some(1),
        "s2dctl {args:?} should fail with exit 1"
    );
    let e = String::from_utf8_lossy(&o.stderr).into_owned();
    assert_eq!(
        e.trim_end().lines().count(),
        1,
        "error for {args:?} is not one line: {e:?}"
    );
    e
}

#[test]
fn volume_lifecycle_through_s2dctl() {
    let node = Node::start(NodeOptions::default());
    let out = node.ctl_ok(&["volume", "create", "vm1", "--size", "1GiB"]);
    assert!(
        out.contains(&node.uri("vm1")),
        "create does not print the NBD URI: {out}"
    );
    node.create_volume("vm2", "64MiB");

    let list = node.ctl_ok(&["volume", "list"]);
    assert!(list.starts_with("NAME"), "list has no header: {list}");
    assert!(
        list.contains("vm1") && list.contains("vm2"),
        "list misses volumes: {list}"
    );

    let json: serde_json::Value = serde_json::from_str(&node.ctl_ok(&["--json", "volume", "list"]))
        .expect("list --json is JSON");
    let arr = json.as_array().expect("list --json is an array");
    assert_eq!(arr.len(), 2);
    assert_eq!(arr[0]["name"], "vm1");
    assert_eq!(arr[0]["size_bytes"], 1u64 << 30);
    assert_eq!(arr[0]["resiliency"], "simple");

    let show: serde_json::Value =
        serde_json::from_str(&node.ctl_ok(&["volume", "show", "vm2", "--json"]))
            .expect("show --json");
    assert_eq!(show["size_bytes"], 64u64 << 20);
    assert_eq!(
        show["allocated_bytes"], 0,
        "a new thin volume holds no extents"
    );

    node.ctl_ok(&["volume", "resize", "vm2", "--size", "128MiB"]);
    let show: serde_json::Value =
        serde_json::from_str(&node.ctl_ok(&["--json", "volume", "show", "vm2"]))
            .expect("show --json");
    assert_eq!(show["size_bytes"], 128u64 << 20, "resize did not take");

    node.ctl_ok(&["volume", "delete", "vm2"]);
    let list = node.ctl_ok(&["volume", "list"]);
    assert!(!list.contains("vm2"), "deleted volume still listed: {list}");

    let pool: serde_json::Value =
        serde_json::from_str(&node.ctl_ok(&["--json", "pool", "status"])).expect("pool --json");
    let disks = pool["disks"].as_array().expect("disks");
    assert_eq!(disks.len(), 2);
    let cap = pool["capacity_bytes"].as_u64().expect("capacity");
    let used = pool["used_bytes"].as_u64().expect("used");
    let free = pool["free_bytes"].as_u64().expect("free");
    assert!(
        cap > 400 << 20 && cap <= 512 << 20,
        "capacity {cap} of two 256 MiB disks"
    );
    assert_eq!(used + free, cap);
    let human = node.ctl_ok(&["pool", "status"]);
    assert!(
        human.contains("capacity") && human.contains("disk0.img"),
        "pool status table: {human}"
    );
}

#[test]
fn every_error_is_one_clear_line_and_exit_1() {
    let node = Node::start(NodeOptions::default());
    node.create_volume("taken", "16MiB");
    assert!(err_line(&node, &["volume", "show", "nope"]).contains("volume nope not found"));
    assert!(err_line(&node, &["volume", "delete", "nope"]).contains("not found"));
    assert!(err_line(&node, &["volume", "resize", "nope", "--size", "1GiB"]).contains("not found"));
    assert!(
        err_line(&node, &["volume", "create", "taken", "--size", "1GiB"]).contains("already taken")
    );
    assert!(err_line(&node, &["volume", "create", "x", "--size", "lots"]).contains("bad size"));
    assert!(err_line(&node, &["volume", "create", "x", "--size", "0"]).contains("bad size"));
    assert!(
        err_line(&node, &["volume", "create", "x", "--size", "1000"]).contains("multiple of 4 KiB")
    );
    assert!(
        err_line(&node, &["volume", "create", "bad/name", "--size", "1GiB"])
            .contains("bad volume name")
    );
    assert!(
        err_line(
            &node,
            &[
                "volume",
                "create",
                "m",
                "--size",
                "1GiB",
                "--resiliency",
                "mirror-3"
            ]
        )
        .contains("not possible")
    );
    assert!(
        err_line(
            &node,
            &[
                "volume",
                "create",
                "m",
                "--size",
                "1GiB",
                "--resiliency",
                "raid5"
            ]
        )
        .contains("unknown resiliency")
    );
    // Nothing of the failed creates exists.
    let list = node.ctl_ok(&["volume", "list"]);
    assert_eq!(
        list.lines().count(),
        2,
        "failed creates left volumes behind: {list}"
    );
    // A node that is not there.
    let o = std::process::Command::new(harness::bin_dir().join("s2dctl"))
        .args([
            "--endpoint",
            &format!("127.0.0.1:{}", harness::free_port()),
            "volume",
            "list",
        ])
        .output()
        .expect("run s2dctl");
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("cannot reach storaged"));
}

#[test]
fn a_full_pool_refuses_writes_and_creates_with_clear_errors() {
    // One 64 MiB disk holds 14 extents of 4 MiB after metadata.
    let node = Node::start(NodeOptions {
        disks: 1,
        disk_size: "64MiB",
        ..NodeOptions::default()
    });
    node.create_volume("big", "1GiB");
    let mut c = harness::nbd::NbdClient::connect(node.nbd, "big").expect("connect");
    let block = vec![0x5au8; 4096];
    let mut failed_at = None;
    for slab in 0..64u64 {
        if let Err(e) = c.write(slab * (4 << 20), &block, false) {
            failed_at = Some((slab, e));
            break;
        }
    }
    let (slab, e) = failed_at.expect("writes beyond the pool's capacity must fail");
    assert!(
        matches!(e, harness::nbd::NbdError::Server(28)),
        "expected ENOSPC, got {e:?}"
    );
    // What was written before the pool filled is intact.
    for s in 0..slab {
        assert_eq!(
            c.read(s * (4 << 20), 4096).expect("read"),
            block,
            "slab {s} lost after ENOSPC"
        );
    }
    assert!(err_line(&node, &["volume", "create", "more", "--size", "1GiB"]).contains("pool full"));
}

#[test]
fn sigterm_stops_cleanly_with_exit_0() {
    let mut node = Node::start(NodeOptions::default());
    node.create_volume("v", "64MiB");
    let mut c = harness::nbd::NbdClient::connect(node.nbd, "v").expect("connect");
    c.write(0, &[7u8; 8192], false).expect("write");
    assert_eq!(
        node.stop(),
        Some(0),
        "storaged did not exit 0 on SIGTERM; log:\n{}",
        node.log_text()
    );
    // A clean stop leaves no write-intent bits.
    for d in node.disk_paths() {
        let out = harness::run_ok(
            harness::bin_dir().join("storaged").to_str().expect("path"),
            &["check", "--disk", d.to_str().expect("path")],
        );
        assert!(!out.contains("not stopped cleanly"), "{out}");
        assert!(out.contains("0 bad blocks"), "{out}");
    }
    node.restart();
    let mut c = harness::nbd::NbdClient::connect(node.nbd, "v").expect("connect after restart");
    assert_eq!(
        c.read(0, 8192).expect("read"),
        vec![7u8; 8192],
        "data lost across a clean restart"
    );
}

/// A data dir written by the single-node version has its volumes only in
/// `catalog.json`: the first start of the cluster version must carry them
/// into the Raft metadata with their ids, so their extents (and data) stay.
#[test]
fn a_single_node_catalog_is_carried_into_the_cluster_metadata() {
    if !harness::have("qemu-io") {
        eprintln!("skipping: qemu-io is missing (apt-get install qemu-utils)");
        return;
    }
    let mut node = Node::start(NodeOptions::default());
    node.create_volume("old", "64MiB");
    harness::run_ok(
        "qemu-io",
        &["-f", "raw", "-c", "write -P 0x3c 0 1M", &node.uri("old")],
    );
    let shown: serde_json::Value =
        serde_json::from_str(&node.ctl_ok(&["--json", "volume", "show", "old"]))
            .expect("volume show --json");
    let id = shown["id"].as_u64().expect("volume id");
    assert_eq!(node.stop(), Some(0), "clean stop");

    // Turn the data dir into what the single-node version left: the volume
    // in catalog.json, no Raft store, no node id.
    let data = node.data_dir();
    let path = data.join("catalog.json");
    let mut cat: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).expect("read catalog"))
            .expect("catalog is JSON");
    cat["volumes"] = serde_json::json!([{
        "id": id, "name": "old", "size": 64u64 << 20,
        "resiliency": "simple", "logical_block_size": 512
    }]);
    cat["next_volume_id"] = serde_json::json!(id + 1);
    std::fs::write(&path, serde_json::to_vec(&cat).expect("encode")).expect("write catalog");
    std::fs::remove_file(data.join("meta.redb")).expect("remove the Raft store");
    std::fs::remove_file(data.join("node-id")).expect("remove the node id");

    node.restart();
    let listed = node.ctl_ok(&["volume", "list"]);
    assert!(listed.contains("old"), "carried volume missing: {listed}");
    let shown: serde_json::Value =
        serde_json::from_str(&node.ctl_ok(&["--json", "volume", "show", "old"]))
            .expect("volume show --json");
    assert_eq!(shown["id"].as_u64(), Some(id), "the volume keeps its id");
    harness::run_ok(
        "qemu-io",
        &["-f", "raw", "-c", "read -P 0x3c 0 1M", &node.uri("old")],
    );
    node.create_volume("new", "64MiB");
    let shown: serde_json::Value =
        serde_json::from_str(&node.ctl_ok(&["--json", "volume", "show", "new"]))
            .expect("volume show --json");
    assert!(
        shown["id"].as_u64() > Some(id),
        "a new volume must not reuse a carried id: {shown}"
    );
    let cat: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).expect("read catalog"))
            .expect("catalog is JSON");
    assert_eq!(
        cat["volumes"].as_array().map(Vec::len),
        Some(0),
        "catalog.json no longer lists volumes: {cat}"
    );
}
