//! Rebalance on a real local cluster: capacity added under existing data
//! (a node joining, `s2dctl pool add-disk` on a running node) gets copies
//! moved onto it until the disks' fill evens out, without redundancy ever
//! dipping; an added disk stays part of its node across restarts.

use harness::cluster::{Cluster, small_node};
use harness::nbd::NbdClient;
use serde_json::Value;
use std::collections::BTreeMap;
use std::time::Duration;

const MIB: u64 = 1 << 20;

fn block(k: u64) -> Vec<u8> {
    let mut b = vec![(k as u8) ^ 0x6b; MIB as usize];
    b[..8].copy_from_slice(&k.to_le_bytes());
    b
}

/// Writes `mib` MiB of `name` through node 1 and disconnects.
fn fill(c: &Cluster, name: &str, mib: u64) {
    let mut h = NbdClient::connect(c.node(1).nbd, name)
        .unwrap_or_else(|e| panic!("NBD open on node 1: {e}\n{}", c.logs(&[1])));
    for k in 0..mib {
        h.write(k * MIB, &block(k), false)
            .unwrap_or_else(|e| panic!("write MiB {k}: {e:?}"));
    }
    h.flush().expect("flush");
    h.disconnect();
}

/// Reads `mib` MiB of `name` back through node `i`.
fn check(c: &Cluster, i: usize, name: &str, mib: u64) {
    let mut h = NbdClient::connect(c.node(i).nbd, name)
        .unwrap_or_else(|e| panic!("NBD open on node {i}: {e}\n{}", c.logs(&[i])));
    for k in 0..mib {
        let got = h
            .read(k * MIB, MIB as u32)
            .unwrap_or_else(|e| panic!("read MiB {k}: {e:?}"));
        assert!(
            got == block(k),
            "MiB {k} of {name} reads wrong after the rebalance"
        );
    }
    h.disconnect();
}

/// Copies per disk path, from `pool status --json`, and whether every slab
/// of `name` has `copies` current copies and no move under way.
fn fill_and_settled(
    c: &Cluster,
    name: &str,
    copies: usize,
) -> Result<(BTreeMap<String, u64>, bool), String> {
    let p: Value = c.try_json(1, &["pool", "status"])?;
    let per_disk = p["disks"]
        .as_array()
        .ok_or("no disks in pool status")?
        .iter()
        .map(|d| {
            (
                d["path"].as_str().unwrap_or_default().to_string(),
                d["slab_copies"].as_u64().unwrap_or(0),
            )
        })
        .collect();
    let v: Value = c.try_json(1, &["volume", "show", name])?;
    let settled = v["slabs"].as_array().ok_or("no slabs")?.iter().all(|s| {
        let reps = s["replicas"].as_array().cloned().unwrap_or_default();
        reps.len() == copies && reps.iter().all(|r| r["state"] == "current")
    });
    Ok((per_disk, settled))
}

fn create(c: &Cluster, name: &str, size: &str, res: &str) {
    c.ctl_ok(
        1,
        &[
            "volume",
            "create",
            name,
            "--size",
            size,
            "--resiliency",
            res,
        ],
    );
}

#[test]
fn a_node_joining_under_data_gets_copies_until_the_fill_evens_out() {
    let mut c = Cluster::start_with(3, small_node());
    create(&c, "grow", "128MiB", "mirror-2");
    fill(&c, "grow", 128);
    let n4 = c.add_node();
    let new_disk = c.node(n4).disk_paths()[0].display().to_string();
    // 64 copies over 4 equal disks: 16 each, within 10 %: 15..=17.
    let (fill_now, _) = c.wait_for(
        "copies to move onto the new node",
        Duration::from_secs(90),
        |c| {
            let (fill, settled) = fill_and_settled(c, "grow", 2)?;
            let all_even = fill.values().all(|n| (14..=18).contains(n));
            if settled && all_even {
                Ok((fill, settled))
            } else {
                Err(format!("fill {fill:?}, settled {settled}"))
            }
        },
    );
    eprintln!("fill after the join: {fill_now:?}");
    assert!(fill_now[&new_disk] >= 14, "{fill_now:?}");
    let o = c.ctl(2, &["volume", "verify", "grow"]);
    assert!(
        o.status.success(),
        "verify after the rebalance: {}",
        String::from_utf8_lossy(&o.stdout)
    );
    c.wait_for("grow to be let go", Duration::from_secs(15), |c| {
        let v: Value = c.try_json(1, &["volume", "show", "grow"])?;
        match v["attached_to"].as_str().unwrap_or_default() {
            "" => Ok(()),
            a => Err(format!("attached to {a}")),
        }
    });
    check(&c, n4, "grow", 128);
}

#[test]
fn pool_add_disk_grows_a_running_node_takes_copies_and_stays_after_a_restart() {
    let mut c = Cluster::start_with(3, small_node());
    create(&c, "more", "96MiB", "mirror-2");
    fill(&c, "more", 96);
    let added = c.node(2).dir.path().join("added.img");
    let added_s = added.display().to_string();
    let out = c.ctl_ok(1, &["pool", "add-disk", "n2", &added_s]);
    assert!(
        out.contains("added to node n2"),
        "pool add-disk says what it did: {out}"
    );
    let o = c.ctl(1, &["pool", "add-disk", "n2", &added_s]);
    assert_eq!(
        o.status.code(),
        Some(1),
        "adding the same disk twice must fail: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    // 48 copies over 4 disks: 12 each; n2's two disks share its copies.
    let (fill_now, _) = c.wait_for(
        "copies to move onto the added disk",
        Duration::from_secs(90),
        |c| {
            let (fill, settled) = fill_and_settled(c, "more", 2)?;
            let on_added = fill.get(&added_s).copied().unwrap_or(0);
            if settled && on_added >= 8 {
                Ok((fill, settled))
            } else {
                Err(format!("fill {fill:?}, settled {settled}"))
            }
        },
    );
    eprintln!("fill after add-disk: {fill_now:?}");
    assert_eq!(c.stop(2), Some(0), "n2 stops cleanly");
    c.restart(2);
    c.wait_for(
        "n2 to come back with both disks",
        Duration::from_secs(20),
        |c| {
            let p: Value = c.try_json(1, &["pool", "status"])?;
            let d = p["disks"]
                .as_array()
                .and_then(|ds| ds.iter().find(|d| d["path"] == added_s.as_str()))
                .cloned()
                .ok_or("the added disk is not listed")?;
            if d["state"] == "online"
                && d["slab_copies"].as_u64() == fill_now.get(&added_s).copied()
            {
                Ok(())
            } else {
                Err(format!("{d}"))
            }
        },
    );
    let o = c.ctl(3, &["volume", "verify", "more"]);
    assert!(
        o.status.success(),
        "verify after the restart: {}",
        String::from_utf8_lossy(&o.stdout)
    );
    check(&c, 3, "more", 96);
}
