//! Scrub on a real local cluster: `s2dctl pool scrub` reads every
//! allocated block of every volume back against its checksum, repairs a
//! mirror copy's bad block from a good copy, and reports what no copy can
//! repair (a simple volume's bad block) with exit status 2.

use harness::cluster::{Cluster, small_node};
use harness::nbd::NbdClient;
use harness::ondisk::{find_block, flip_byte, read_block};
use serde_json::Value;
use std::path::PathBuf;
use std::process::Output;
use std::time::Duration;

const MIB: u64 = 1 << 20;

/// Every disk file of the cluster holding the 4 KiB `block`, with the
/// node index and the block's offset.
fn where_is(c: &Cluster, block: &[u8]) -> Vec<(usize, PathBuf, u64)> {
    let mut out = Vec::new();
    for i in c.all() {
        for d in c.node(i).disk_paths() {
            for at in find_block(&d, block) {
                out.push((i, d.clone(), at));
            }
        }
    }
    out
}

fn scrub_json(o: &Output) -> Vec<Value> {
    let v: Value = serde_json::from_slice(&o.stdout).unwrap_or_else(|e| {
        panic!(
            "pool scrub printed no JSON ({e}): {}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )
    });
    v["volumes"].as_array().cloned().unwrap_or_default()
}

fn of<'a>(vols: &'a [Value], name: &str) -> &'a Value {
    vols.iter()
        .find(|v| v["volume"] == name)
        .unwrap_or_else(|| panic!("no scrub of {name} in {vols:?}"))
}

fn count(v: &Value, key: &str) -> u64 {
    v[key].as_u64().unwrap_or(0)
}

/// Writes through the node that serves `name` (a simple volume's home,
/// else node 1) and disconnects.
fn write_and_detach(c: &mut Cluster, name: &str, writes: &[(u64, Vec<u8>)]) {
    let v: Value = c.ctl_json(1, &["volume", "show", name]);
    let home = v["node"].as_str().unwrap_or_default();
    let i = c.index_of_name(home).unwrap_or(1);
    let mut h = NbdClient::connect(c.node(i).nbd, name)
        .unwrap_or_else(|e| panic!("NBD open of {name} on node {i}: {e}\n{}", c.logs(&[i])));
    for (at, data) in writes {
        h.write(*at, data, false)
            .unwrap_or_else(|e| panic!("write at {at} of {name}: {e:?}"));
    }
    h.flush().expect("flush");
    h.disconnect();
}

#[test]
fn pool_scrub_repairs_a_bad_mirror_block_from_a_good_copy_and_reports_a_simple_volumes() {
    let mut c = Cluster::start_with(3, small_node());
    for (name, res) in [("m", "mirror-3"), ("plain", "simple")] {
        c.ctl_ok(
            1,
            &[
                "volume",
                "create",
                name,
                "--size",
                "16MiB",
                "--resiliency",
                res,
            ],
        );
    }
    let good = vec![0xc3u8; 4096];
    let lone = vec![0x5au8; 4096];
    write_and_detach(
        &mut c,
        "m",
        &[
            (4 * MIB, vec![0x3c; 2 * MIB as usize]),
            (5 * MIB, good.clone()),
        ],
    );
    write_and_detach(&mut c, "plain", &[(MIB, lone.clone())]);
    c.wait_for("m to be detached", Duration::from_secs(15), |c| {
        let v: Value = c.try_json(2, &["volume", "show", "m"])?;
        match v["attached_to"].as_str().unwrap_or_default() {
            "" => Ok(()),
            a => Err(format!("attached to {a}")),
        }
    });

    // One byte of node 2's copy of m, and one of plain's only copy, rot.
    let copies = where_is(&c, &good);
    assert_eq!(copies.len(), 3, "m's block is on 3 disks: {copies:?}");
    let (_, disk, at) = copies
        .iter()
        .find(|(n, _, _)| *n == 2)
        .cloned()
        .expect("a copy of m on node 2");
    flip_byte(&disk, at + 99);
    let lone_at = where_is(&c, &lone);
    assert_eq!(
        lone_at.len(),
        1,
        "plain's block is on one disk: {lone_at:?}"
    );
    flip_byte(&lone_at[0].1, lone_at[0].2 + 7);

    let o = c.ctl(3, &["--json", "pool", "scrub", "--wait"]);
    let vols = scrub_json(&o);
    eprintln!("first scrub: {vols:?}");
    assert_eq!(
        o.status.code(),
        Some(2),
        "a bad block no copy can repair must make pool scrub exit 2: {vols:?}"
    );
    let m = of(&vols, "m");
    assert_eq!(m["state"], "done", "{m}");
    assert_eq!(
        (
            count(m, "bad_blocks"),
            count(m, "repaired_blocks"),
            count(m, "unrepaired_blocks")
        ),
        (1, 1, 0),
        "m: one bad block found and repaired: {m}"
    );
    assert!(
        count(m, "checked_bytes") >= 4 * MIB
            && count(m, "checked_bytes") == count(m, "total_bytes"),
        "m was read whole: {m}"
    );
    assert_eq!(
        read_block(&disk, at),
        good,
        "node 2's copy was not rewritten"
    );
    let p = of(&vols, "plain");
    assert_eq!(
        (count(p, "bad_blocks"), count(p, "unrepaired_blocks")),
        (1, 1),
        "plain: its bad block is reported, it has no other copy: {p}"
    );
    let o = c.ctl(1, &["volume", "verify", "m"]);
    assert!(
        o.status.success(),
        "verify after the scrub: {}",
        String::from_utf8_lossy(&o.stdout)
    );

    // A second pass finds m clean; the status shows the last results.
    let o = c.ctl(1, &["--json", "pool", "scrub", "--wait"]);
    let vols = scrub_json(&o);
    assert_eq!(
        count(of(&vols, "m"), "bad_blocks"),
        0,
        "m after repair: {vols:?}"
    );
    assert_eq!(
        count(of(&vols, "plain"), "unrepaired_blocks"),
        1,
        "{vols:?}"
    );
    let o = c.ctl(2, &["pool", "scrub", "--status"]);
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        text.contains("1 bad or mismatched blocks found, 1 left unrepaired"),
        "pool scrub --status sums up the last scrubs: {text}"
    );
}
