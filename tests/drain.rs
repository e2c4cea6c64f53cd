//! Draining a node on a real local cluster: `s2dctl node drain` moves every
//! copy the node holds to other nodes while clients keep writing, each slab
//! keeping all its current copies at every moment, after which the node
//! can be retired with nothing lost.

use harness::NodeOptions;
use harness::cluster::{Cluster, small_node};
use harness::nbd::NbdClient;
use serde_json::Value;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;

/// Every slab of a volume with its copies as (node name, state), from
/// `volume show --json`.
fn slabs(
    c: &Cluster,
    i: usize,
    name: &str,
) -> Result<BTreeMap<u64, Vec<(String, String)>>, String> {
    let v: Value = c.try_json(i, &["volume", "show", name])?;
    let mut out = BTreeMap::new();
    for s in v["slabs"].as_array().ok_or("no slabs in volume show")? {
        let slab = s["slab"].as_u64().ok_or("slab without a number")?;
        let reps = s["replicas"]
            .as_array()
            .ok_or("slab without replicas")?
            .iter()
            .map(|r| {
                (
                    r["node"].as_str().unwrap_or_default().to_string(),
                    r["state"].as_str().unwrap_or_default().to_string(),
                )
            })
            .collect();
        out.insert(slab, reps);
    }
    Ok(out)
}

fn block(k: u64, round: u64) -> Vec<u8> {
    let mut b = vec![(k as u8).wrapping_mul(31) ^ round as u8; MIB as usize];
    b[..16].copy_from_slice(&[k.to_le_bytes(), round.to_le_bytes()].concat());
    b
}

#[test]
fn drain_moves_every_copy_off_the_node_while_writes_go_on_and_redundancy_never_dips() {
    let mut c = Cluster::start_with(
        4,
        NodeOptions {
            down_after: Some("2s"),
            ..small_node()
        },
    );
    c.ctl_ok(
        1,
        &[
            "volume",
            "create",
            "d",
            "--size",
            "32MiB",
            "--resiliency",
            "mirror-3",
        ],
    );
    // What each MiB should hold: the round of its last acknowledged write.
    let mut latest: BTreeMap<u64, u64> = BTreeMap::new();
    let mut h = NbdClient::connect(c.node(1).nbd, "d")
        .unwrap_or_else(|e| panic!("NBD open on node 1: {e}\n{}", c.logs(&[1])));
    for k in 0..24 {
        h.write(k * MIB, &block(k, 0), false)
            .unwrap_or_else(|e| panic!("write {k} MiB on node 1: {e:?}"));
        latest.insert(k, 0);
    }
    h.flush().expect("flush on node 1");

    let before = slabs(&c, 1, "d").expect("volume show");
    let victim_name = before
        .values()
        .flatten()
        .map(|(n, _)| n.clone())
        .find(|n| n != "n1")
        .expect("a copy on a node other than n1");
    let victim = c.index_of_name(&victim_name).expect("victim index");
    let out = c.ctl_ok(1, &["node", "drain", &victim_name]);
    assert!(
        out.contains("is draining") && out.contains("move to other nodes"),
        "node drain says what happens: {out}"
    );

    // Client writes go on (to old and new slabs) while the copies move;
    // every look at the volume must show each slab with its 3 copies
    // current, counting the leaving one until its successor is current.
    let t0 = Instant::now();
    let mut round = 1;
    let mut looks = 0;
    loop {
        for k in [round % 24, (round * 7) % 24] {
            h.write(k * MIB, &block(k, round), false)
                .unwrap_or_else(|e| {
                    panic!("write {k} MiB during the drain: {e:?}\n{}", c.logs(&[1]))
                });
            latest.insert(k, round);
        }
        round += 1;
        let now = slabs(&c, 1, "d").expect("volume show during the drain");
        looks += 1;
        for (slab, reps) in &now {
            let current = reps.iter().filter(|(_, s)| s == "current").count();
            assert!(
                current >= 3 || !before.contains_key(slab) && current >= 2,
                "slab {slab} has only {current} current copies during the drain: {reps:?}"
            );
        }
        let on_victim = now
            .values()
            .flatten()
            .filter(|(n, _)| *n == victim_name)
            .count();
        let settled = now
            .values()
            .all(|r| r.len() == 3 && r.iter().all(|(_, s)| s == "current"));
        if on_victim == 0 && settled {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "the drain did not finish in 60 s: {on_victim} copies left on {victim_name}: {now:?}\n{}",
            c.logs(&[1, victim])
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!(
        "drained {victim_name} in {:?} ({looks} looks, {round} write rounds)",
        t0.elapsed()
    );
    h.flush().expect("flush after the drain");
    h.disconnect();

    let nodes = c.node_list(1).expect("node list");
    let v = nodes
        .iter()
        .find(|n| n["name"] == victim_name.as_str())
        .expect("the drained node is listed");
    assert_eq!(v["state"], "draining", "{v}");
    assert_eq!(
        v["slab_copies"].as_u64().unwrap_or(u64::MAX),
        0,
        "node list shows no copy left on the drained node: {v}"
    );
    for (slab, reps) in slabs(&c, 1, "d").expect("volume show") {
        let mut names: Vec<&String> = reps.iter().map(|(n, _)| n).collect();
        names.sort();
        names.dedup();
        assert_eq!(
            names.len(),
            3,
            "slab {slab} has two copies on one node: {reps:?}"
        );
    }
    let o = c.ctl(2, &["volume", "verify", "d"]);
    assert!(
        o.status.success(),
        "verify after the drain: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );

    // Nothing depends on the node any more: retire it and stop it.
    c.ctl_ok(1, &["node", "retire", &victim_name]);
    c.kill9(victim);
    let reader = if victim == 3 { 2 } else { 3 };
    c.wait_for(
        "node 1 to let the volume go",
        Duration::from_secs(10),
        |c| {
            let v: Value = c.try_json(reader, &["volume", "show", "d"])?;
            match v["attached_to"].as_str() {
                Some("") | None => Ok(()),
                Some(n) => Err(format!("attached to {n}")),
            }
        },
    );
    let mut r = NbdClient::connect(c.node(reader).nbd, "d")
        .unwrap_or_else(|e| panic!("NBD open on node {reader}: {e}"));
    for (k, round) in &latest {
        let got = r
            .read(k * MIB, MIB as u32)
            .unwrap_or_else(|e| panic!("read {k} MiB on node {reader}: {e:?}"));
        assert!(
            got == block(*k, *round),
            "MiB {k} does not read back its last write (round {round}) after the drain"
        );
    }
    r.disconnect();
    c.wait_for("health to be healthy", Duration::from_secs(15), |c| {
        let o = c.ctl(reader, &["health"]);
        let text = String::from_utf8_lossy(&o.stdout).into_owned();
        if o.status.code() == Some(0) {
            Ok(())
        } else {
            Err(text)
        }
    });
}

/// The disks of the pool as `pool status --json` lists them.
fn pool_disks(c: &Cluster, i: usize) -> Result<Vec<Value>, String> {
    let p: Value = c.try_json(i, &["pool", "status"])?;
    Ok(p["disks"].as_array().cloned().unwrap_or_default())
}

#[test]
fn remove_disk_moves_its_copies_to_other_nodes_and_takes_no_new_extents() {
    // Two disks per node: a disk can go while its node stays.
    let mut c = Cluster::start_with(
        4,
        NodeOptions {
            disks: 2,
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
            "64MiB",
            "--resiliency",
            "mirror-2",
        ],
    );
    let mut h = NbdClient::connect(c.node(1).nbd, "r")
        .unwrap_or_else(|e| panic!("NBD open on node 1: {e}\n{}", c.logs(&[1])));
    for k in 0..24 {
        h.write(k * MIB, &block(k, 0), false)
            .unwrap_or_else(|e| panic!("write {k} MiB: {e:?}"));
    }
    h.flush().expect("flush");
    let disks = pool_disks(&c, 1).expect("pool status");
    let victim = disks
        .iter()
        .filter(|d| d["node"] != "n1")
        .max_by_key(|d| d["slab_copies"].as_u64().unwrap_or(0))
        .cloned()
        .expect("a disk off node 1");
    let (node, path) = (
        victim["node"].as_str().unwrap_or_default().to_string(),
        victim["path"].as_str().unwrap_or_default().to_string(),
    );
    assert!(
        victim["slab_copies"].as_u64().unwrap_or(0) > 0,
        "the chosen disk holds copies: {victim}"
    );
    let out = c.ctl_ok(1, &["pool", "remove-disk", &node, &path]);
    assert!(
        out.contains("is draining") && out.contains("move to other nodes"),
        "remove-disk says what happens: {out}"
    );
    c.wait_for(
        "the removed disk's copies to move to other nodes",
        Duration::from_secs(60),
        |c| {
            let d = pool_disks(c, 1)?
                .into_iter()
                .find(|d| d["path"] == path.as_str())
                .ok_or("the disk vanished from pool status")?;
            let now = slabs(c, 1, "r")?;
            let settled = now
                .values()
                .all(|r| r.len() == 2 && r.iter().all(|(_, s)| s == "current"));
            if d["state"] == "draining" && d["slab_copies"] == 0 && settled {
                Ok(())
            } else {
                Err(format!("disk {d}; slabs {now:?}"))
            }
        },
    );
    // New slabs avoid the disk.
    for k in 24..64 {
        h.write(k * MIB, &block(k, 1), false)
            .unwrap_or_else(|e| panic!("write {k} MiB after the removal: {e:?}"));
    }
    h.flush().expect("flush");
    h.disconnect();
    let d = pool_disks(&c, 2)
        .expect("pool status")
        .into_iter()
        .find(|d| d["path"] == path.as_str())
        .expect("the removed disk is listed");
    assert_eq!(
        d["slab_copies"], 0,
        "a new slab went to the removed disk: {d}"
    );
    let o = c.ctl(2, &["volume", "verify", "r"]);
    assert!(
        o.status.success(),
        "verify after remove-disk: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

#[test]
fn remove_disk_is_refused_when_its_copies_have_nowhere_to_go() {
    // mirror-3 on three nodes: every node holds a copy of every slab.
    let c = Cluster::start_with(3, small_node());
    c.ctl_ok(
        1,
        &[
            "volume",
            "create",
            "full",
            "--size",
            "16MiB",
            "--resiliency",
            "mirror-3",
        ],
    );
    let mut h = NbdClient::connect(c.node(1).nbd, "full")
        .unwrap_or_else(|e| panic!("NBD open on node 1: {e}\n{}", c.logs(&[1])));
    h.write(0, &block(0, 0), false).expect("write");
    h.flush().expect("flush");
    h.disconnect();
    let disks = pool_disks(&c, 1).expect("pool status");
    let d = disks
        .iter()
        .find(|d| d["node"] == "n2" && d["slab_copies"].as_u64().unwrap_or(0) > 0)
        .expect("a disk of n2 with a copy");
    let path = d["path"].as_str().unwrap_or_default();
    let o = c.ctl(1, &["pool", "remove-disk", "n2", path]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "remove-disk must fail: {err}");
    assert!(
        err.contains("no node to move to") && err.lines().count() == 1,
        "one clear line says why: {err}"
    );
    let after = pool_disks(&c, 1).expect("pool status");
    let d = after
        .iter()
        .find(|d| d["path"] == path)
        .expect("the disk is still listed");
    assert_eq!(
        d["state"], "online",
        "a refused removal changes nothing: {d}"
    );
    let o = c.ctl(1, &["pool", "remove-disk", "n2", "/no/such/disk"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        o.status.code() == Some(1) && err.contains("has no disk") && err.contains(path),
        "an unknown disk is named with the node's real disks: {err}"
    );
}
