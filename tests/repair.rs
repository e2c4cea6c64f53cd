//! Repair of mirrored volumes on a real local cluster: copies on a node
//! that stays down past `--rebuild-after` are rebuilt on other nodes from
//! the surviving copies, `s2dctl health` says what is wrong meanwhile, and
//! the returning node gives its now unused copies back.

use harness::NodeOptions;
use harness::cluster::{Cluster, small_node};
use harness::nbd::NbdClient;
use serde_json::Value;
use std::time::Duration;

const MIB: u64 = 1 << 20;

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

/// Every (slab, node name, state) of a volume, from `volume show --json`.
fn copies(c: &Cluster, i: usize, name: &str) -> Result<Vec<(u64, String, String)>, String> {
    let v: Value = c.try_json(i, &["volume", "show", name])?;
    let mut out = Vec::new();
    for s in v["slabs"].as_array().ok_or("no slabs in volume show")? {
        let slab = s["slab"].as_u64().ok_or("slab without a number")?;
        for r in s["replicas"].as_array().ok_or("slab without replicas")? {
            out.push((
                slab,
                r["node"].as_str().unwrap_or_default().to_string(),
                r["state"].as_str().unwrap_or_default().to_string(),
            ));
        }
    }
    Ok(out)
}

fn health(c: &Cluster, i: usize) -> (Option<i32>, String) {
    let o = c.ctl(i, &["health"]);
    (
        o.status.code(),
        String::from_utf8_lossy(&o.stdout).into_owned(),
    )
}

#[test]
fn copies_of_a_node_down_past_rebuild_after_are_rebuilt_elsewhere_and_the_node_gives_its_back() {
    let mut c = Cluster::start_with(
        4,
        NodeOptions {
            down_after: Some("1s"),
            rebuild_after: Some("3s"),
            ..small_node()
        },
    );
    c.ctl_ok(
        1,
        &[
            "volume",
            "create",
            "r",
            "--size",
            "32MiB",
            "--resiliency",
            "mirror-3",
        ],
    );
    let pattern = |k: u64| vec![(0x30 + k) as u8; MIB as usize];
    {
        let mut h = NbdClient::connect(c.node(1).nbd, "r")
            .unwrap_or_else(|e| panic!("NBD open on node 1: {e}\n{}", c.logs(&[1])));
        for k in 0..12 {
            h.write(k * MIB, &pattern(k), false)
                .unwrap_or_else(|e| panic!("write {k} MiB on node 1: {e:?}"));
        }
        h.flush().expect("flush on node 1");
        h.disconnect();
    }
    let (code, text) = health(&c, 1);
    assert_eq!(code, Some(0), "a fresh cluster should be healthy: {text}");

    // A node (not node 1) that holds copies goes away for good.
    let before = copies(&c, 1, "r").expect("volume show");
    let victim_name = before
        .iter()
        .map(|(_, n, _)| n.clone())
        .find(|n| n != "n1")
        .expect("a copy on a node other than n1");
    let victim = c.index_of_name(&victim_name).expect("victim index");
    let held = before.iter().filter(|(_, n, _)| *n == victim_name).count();
    c.kill9(victim);

    c.wait_for("health to report the node down", secs(10), |c| {
        let (code, text) = health(c, 1);
        if code == Some(2) && text.contains(&format!("node {victim_name} is down")) {
            Ok(())
        } else {
            Err(format!("exit {code:?}: {text}"))
        }
    });
    let t0 = std::time::Instant::now();
    c.wait_for("the lost copies to be rebuilt elsewhere", secs(40), |c| {
        let now = copies(c, 1, "r")?;
        let on_victim = now.iter().filter(|(_, n, _)| *n == victim_name).count();
        let not_current = now.iter().filter(|(_, _, s)| s != "current").count();
        if on_victim == 0 && not_current == 0 && now.len() == before.len() {
            Ok(())
        } else {
            Err(format!(
                "{on_victim} copies still on {victim_name}, {not_current} not current: {now:?}"
            ))
        }
    });
    eprintln!(
        "{held} copies of {victim_name} rebuilt on other nodes, {:?} after health saw it down",
        t0.elapsed()
    );
    let after = copies(&c, 1, "r").expect("volume show");
    for slab in after.iter().map(|(s, _, _)| *s) {
        let mut nodes: Vec<&String> = after
            .iter()
            .filter(|(s, _, _)| *s == slab)
            .map(|(_, n, _)| n)
            .collect();
        let n = nodes.len();
        nodes.sort();
        nodes.dedup();
        assert_eq!(
            nodes.len(),
            n,
            "slab {slab} has two copies on one node: {after:?}"
        );
        assert_eq!(n, 3, "slab {slab} does not have 3 copies: {after:?}");
    }
    let o = c.ctl(2, &["volume", "verify", "r"]);
    assert!(
        o.status.success(),
        "verify after the rebuild: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    let reader = if victim == 2 { 3 } else { 2 };
    // The node that ran the rebuild served the volume meanwhile; it lets go
    // a moment after.
    c.wait_for("the rebuilding node to let the volume go", secs(10), |c| {
        let v: Value = c.try_json(1, &["volume", "show", "r"])?;
        match v["attached_to"].as_str() {
            Some("") | None => Ok(()),
            Some(n) => Err(format!("attached to {n}")),
        }
    });
    {
        let mut h = NbdClient::connect(c.node(reader).nbd, "r")
            .unwrap_or_else(|e| panic!("NBD open on node {reader}: {e}"));
        for k in 0..12 {
            let got = h
                .read(k * MIB, MIB as u32)
                .unwrap_or_else(|e| panic!("read {k} MiB on node {reader}: {e:?}"));
            assert!(got == pattern(k), "MiB {k} reads wrong after the rebuild");
        }
        h.disconnect();
    }

    // The node comes back: it holds no copy any more and frees its extents.
    c.restart(victim);
    c.wait_for("the returned node to give its copies back", secs(20), |c| {
        let p: Value = c.try_json(1, &["pool", "status"])?;
        let used = p["nodes"]
            .as_array()
            .and_then(|ns| ns.iter().find(|n| n["name"] == victim_name.as_str()))
            .and_then(|n| n["used_bytes"].as_u64())
            .ok_or("no used_bytes for the node")?;
        if used == 0 {
            Ok(())
        } else {
            Err(format!("{victim_name} still uses {used} bytes"))
        }
    });
    c.wait_for("health to be back to healthy", secs(15), |c| {
        let (code, text) = health(c, 1);
        if code == Some(0) && text.starts_with("pool healthy") {
            Ok(())
        } else {
            Err(format!("exit {code:?}: {text}"))
        }
    });
}

#[test]
fn repair_start_rebuilds_a_down_nodes_copies_now_and_repair_status_follows_it() {
    let mut c = Cluster::start_with(
        4,
        NodeOptions {
            down_after: Some("1s"),
            rebuild_after: Some("10m"),
            ..small_node()
        },
    );
    c.ctl_ok(
        1,
        &[
            "volume",
            "create",
            "q",
            "--size",
            "16MiB",
            "--resiliency",
            "mirror-2",
        ],
    );
    {
        let mut h = NbdClient::connect(c.node(1).nbd, "q")
            .unwrap_or_else(|e| panic!("NBD open on node 1: {e}\n{}", c.logs(&[1])));
        for k in 0..8 {
            h.write(k * MIB, &[0x70 + k as u8; MIB as usize], false)
                .unwrap_or_else(|e| panic!("write: {e:?}"));
        }
        h.flush().expect("flush");
        h.disconnect();
    }
    let list = c.ctl_ok(1, &["repair", "list"]);
    assert!(
        list.contains("no repairs"),
        "a healthy volume lists no repair: {list}"
    );
    let before = copies(&c, 1, "q").expect("volume show");
    let victim_name = before
        .iter()
        .map(|(_, n, _)| n.clone())
        .find(|n| n != "n1")
        .expect("a copy off node 1");
    let victim = c.index_of_name(&victim_name).expect("victim index");
    c.kill9(victim);
    c.wait_for("the victim to be down", secs(10), |c| {
        let (code, text) = health(c, 1);
        if text.contains(&format!("node {victim_name} is down")) {
            Ok(())
        } else {
            Err(format!("exit {code:?}: {text}"))
        }
    });
    // Nothing happens by itself before --rebuild-after (10 min)...
    std::thread::sleep(secs(3));
    let v: Value = c.ctl_json(1, &["repair", "status", "q"]);
    assert_eq!(v["state"], "waiting", "before repair start: {v}");
    assert!(
        v["waiting_for"]
            .as_str()
            .unwrap_or_default()
            .contains(&victim_name),
        "the repair should say it waits for {victim_name}: {v}"
    );
    // ...until an operator asks.
    let started = c.ctl_ok(1, &["repair", "start", "--volume", "q"]);
    assert!(
        started.contains('q'),
        "repair start lists the volume: {started}"
    );
    c.wait_for("the repair to finish", secs(30), |c| {
        let v: Value = c.try_json(1, &["repair", "status", "q"])?;
        let now = copies(c, 1, "q")?;
        let on_victim = now.iter().filter(|(_, n, _)| *n == victim_name).count();
        let all_current = now.iter().all(|(_, _, s)| s == "current");
        if v["state"] == "done" && on_victim == 0 && all_current {
            Ok(())
        } else {
            Err(format!("status {v}, copies {now:?}"))
        }
    });
    let v: Value = c.ctl_json(1, &["repair", "status", "q"]);
    assert!(
        v["copied_bytes"].as_u64().unwrap_or(0) > 0 && v["done_bytes"] == v["total_bytes"],
        "the finished repair reports what it did: {v}"
    );
    std::thread::sleep(Duration::from_millis(1500));
    let later: Value = c.ctl_json(1, &["repair", "status", "q"]);
    assert_eq!(
        later["rate_bytes_per_sec"], v["rate_bytes_per_sec"],
        "a finished repair's rate is over its run and stays put: {v} then {later}"
    );
    let o = c.ctl(1, &["volume", "verify", "q"]);
    assert!(
        o.status.success(),
        "verify after repair start: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

#[test]
fn a_rebuild_copies_no_faster_than_the_repair_bandwidth() {
    let mut c = Cluster::start_with(
        3,
        NodeOptions {
            down_after: Some("1s"),
            rebuild_after: Some("10m"),
            repair_bandwidth: Some("4MiB"),
            ..small_node()
        },
    );
    c.ctl_ok(
        1,
        &[
            "volume",
            "create",
            "t",
            "--size",
            "16MiB",
            "--resiliency",
            "mirror-2",
        ],
    );
    {
        let mut h = NbdClient::connect(c.node(1).nbd, "t")
            .unwrap_or_else(|e| panic!("NBD open on node 1: {e}\n{}", c.logs(&[1])));
        for k in 0..12 {
            h.write(k * MIB, &[0x21 + k as u8; MIB as usize], false)
                .unwrap_or_else(|e| panic!("write: {e:?}"));
        }
        h.flush().expect("flush");
        h.disconnect();
    }
    let before = copies(&c, 1, "t").expect("volume show");
    let victim_name = before
        .iter()
        .map(|(_, n, _)| n.clone())
        .find(|n| n != "n1")
        .expect("a copy off node 1");
    let moved = before.iter().filter(|(_, n, _)| *n == victim_name).count() as u64;
    let victim = c.index_of_name(&victim_name).expect("victim index");
    c.kill9(victim);
    c.wait_for("the victim to be down", secs(10), |c| {
        let (_, text) = health(c, 1);
        if text.contains(&format!("node {victim_name} is down")) {
            Ok(())
        } else {
            Err(text)
        }
    });
    let t0 = std::time::Instant::now();
    c.ctl_ok(1, &["repair", "start", "--volume", "t"]);
    c.wait_for("the throttled repair to finish", secs(60), |c| {
        let v: Value = c.try_json(1, &["repair", "status", "t"])?;
        if v["state"] == "done" && v["copied_bytes"].as_u64().unwrap_or(0) > 0 {
            Ok(())
        } else {
            Err(v.to_string())
        }
    });
    let took = t0.elapsed();
    let v: Value = c.ctl_json(1, &["repair", "status", "t"]);
    let copied = v["copied_bytes"].as_u64().unwrap_or(0);
    // At 4 MiB/s the copied bytes take copied / 4 MiB seconds at least (the
    // resync sleeps after each chunk until the rate allows it).
    let floor = Duration::from_secs_f64(copied as f64 / (4.0 * MIB as f64))
        .saturating_sub(Duration::from_millis(250));
    eprintln!("{moved} slabs, {copied} bytes rebuilt in {took:?} at a 4 MiB/s limit");
    assert!(
        copied >= 4 * MIB,
        "a rebuild copies at least one slab's data: {v}"
    );
    assert!(
        took >= floor,
        "{copied} bytes were rebuilt in {took:?}, faster than 4 MiB/s allows ({floor:?})"
    );
}

/// A 4 KiB block tagged with `TAG` and its number.
fn tagged(k: u64) -> Vec<u8> {
    let mut b = vec![(k as u8) ^ 0xa5; 4096];
    b[..8].copy_from_slice(TAG);
    b[8..16].copy_from_slice(&k.to_le_bytes());
    b
}

const TAG: &[u8; 8] = b"S2DFAILD";

#[test]
fn a_disk_with_too_many_checksum_failures_is_failed_and_its_copies_rebuilt_elsewhere() {
    let mut c = Cluster::start_with(
        4,
        NodeOptions {
            extra_args: vec!["--disk-error-limit", "4"],
            ..small_node()
        },
    );
    c.ctl_ok(
        1,
        &[
            "volume",
            "create",
            "f",
            "--size",
            "16MiB",
            "--resiliency",
            "mirror-2",
        ],
    );
    let blocks = 2048; // 8 MiB
    {
        let mut h = NbdClient::connect(c.node(1).nbd, "f")
            .unwrap_or_else(|e| panic!("NBD open on node 1: {e}\n{}", c.logs(&[1])));
        for chunk in 0..blocks / 256 {
            let data: Vec<u8> = (chunk * 256..(chunk + 1) * 256).flat_map(tagged).collect();
            h.write(chunk * MIB, &data, false)
                .unwrap_or_else(|e| panic!("write MiB {chunk}: {e:?}"));
        }
        h.flush().expect("flush");
        h.disconnect();
    }
    // Rot 8 blocks of the copies on a node other than node 1.
    let victim = (2..=4)
        .find(|i| {
            c.node(*i)
                .disk_paths()
                .iter()
                .any(|d| !harness::ondisk::find_tagged_blocks(d, TAG).is_empty())
        })
        .expect("a node other than n1 holds copies");
    let victim_name = harness::cluster::node_name(victim);
    let disk = c.node(victim).disk_paths()[0].clone();
    let held = harness::ondisk::find_tagged_blocks(&disk, TAG);
    assert!(
        held.len() >= 8,
        "the victim's disk holds copies: {}",
        held.len()
    );
    for (at, _) in held.iter().step_by(held.len() / 8).take(8) {
        harness::ondisk::flip_byte(&disk, at + 100);
    }

    // The scrub reads every copy: it repairs the blocks, and the disk's
    // checksum failures pass the limit of 4.
    let o = c.ctl(1, &["--json", "pool", "scrub", "--wait"]);
    let report = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(
        o.status.success(),
        "the scrub repaired everything: {report}"
    );
    c.wait_for(
        "the failed disk's copies to be rebuilt on other nodes",
        secs(60),
        |c| {
            let p: Value = c.try_json(1, &["pool", "status"])?;
            let d = p["disks"]
                .as_array()
                .and_then(|ds| {
                    ds.iter()
                        .find(|d| d["path"] == disk.display().to_string().as_str())
                })
                .cloned()
                .ok_or("the disk is not listed")?;
            let now = copies(c, 1, "f")?;
            let on_victim = now.iter().filter(|(_, n, _)| *n == victim_name).count();
            let all_current = now.iter().all(|(_, _, s)| s == "current");
            if d["state"] == "failed" && on_victim == 0 && all_current {
                Ok(())
            } else {
                Err(format!("disk {d}; copies {now:?}"))
            }
        },
    );
    let (code, text) = health(&c, 2);
    assert!(
        code == Some(2) && text.contains("failed") && text.contains(&victim_name),
        "health names the failed disk until it is replaced: {text}"
    );
    let o = c.ctl(2, &["volume", "verify", "f"]);
    assert!(
        o.status.success(),
        "verify after the rebuild: {}",
        String::from_utf8_lossy(&o.stdout)
    );
    c.wait_for("f to be let go", secs(15), |c| {
        let v: Value = c.try_json(1, &["volume", "show", "f"])?;
        match v["attached_to"].as_str().unwrap_or_default() {
            "" => Ok(()),
            a => Err(format!("attached to {a}")),
        }
    });
    let reader = if victim == 3 { 4 } else { 3 };
    let mut h = NbdClient::connect(c.node(reader).nbd, "f")
        .unwrap_or_else(|e| panic!("NBD open on node {reader}: {e}"));
    for chunk in 0..blocks / 256 {
        let want: Vec<u8> = (chunk * 256..(chunk + 1) * 256).flat_map(tagged).collect();
        let got = h
            .read(chunk * MIB, MIB as u32)
            .unwrap_or_else(|e| panic!("read MiB {chunk}: {e:?}"));
        assert!(got == want, "MiB {chunk} reads wrong after the disk failed");
    }
    h.disconnect();
}
