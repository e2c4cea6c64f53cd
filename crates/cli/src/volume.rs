//! Human output of volumes: the `volume list` table, `volume show` and
//! `volume verify`.

use crate::table::{Table, human, or_dash, pairs};
use s2d_proto::v1::{SlabInfo, VerifyVolumeResponse, Volume};
use std::collections::BTreeMap;
use std::fmt::Write;

/// Slabs `volume show` lists; the rest are in `--json`.
pub const SHOWN_SLABS: usize = 64;

/// off, one-way or mutual.
pub fn chap_mode(v: &Volume) -> &'static str {
    match (v.chap_enabled, v.mutual_chap) {
        (false, _) => "off",
        (true, false) => "one-way",
        (true, true) => "mutual",
    }
}

/// Whether `v` keeps copies of its slabs on several nodes.
fn mirrored(v: &Volume) -> bool {
    !v.slabs.is_empty() || v.resiliency.starts_with("mirror-")
}

/// Whether the allocation figures of `v` are known. A volume without a
/// node comes from a storaged that predates clusters: its figures are its
/// own and always known, like those of a mirrored volume (the cluster
/// metadata holds its slabs).
fn figures_known(v: &Volume) -> bool {
    mirrored(v) || v.node_reachable || v.node.is_empty()
}

/// The node that serves `v`, marked when it did not answer. A mirrored
/// volume has no home: its node is whichever has it attached, if any.
fn node_of(v: &Volume) -> String {
    if mirrored(v) {
        or_dash(if v.attached_to.is_empty() {
            &v.node
        } else {
            &v.attached_to
        })
    } else if v.node.is_empty() {
        "-".to_string()
    } else if v.node_reachable {
        v.node.clone()
    } else {
        format!("{} (unreachable)", v.node)
    }
}

pub fn volume_table(volumes: &[Volume]) -> Table {
    let mut t = Table::new(&[
        "NAME",
        "SIZE",
        "RESILIENCY",
        "NODE",
        "ALLOCATED",
        "BLOCK",
        "CHAP",
        "NBD",
    ]);
    for v in volumes {
        t.row(vec![
            v.name.clone(),
            human(v.size_bytes),
            v.resiliency.clone(),
            node_of(v),
            if figures_known(v) {
                human(v.allocated_bytes)
            } else {
                "unknown".to_string()
            },
            v.block_size_bytes.to_string(),
            chap_mode(v).to_string(),
            or_dash(&v.nbd_uri),
        ]);
    }
    t
}

pub fn render_volume(v: &Volume) -> String {
    let mut rows = vec![
        ("name", v.name.clone()),
        ("id", v.id.to_string()),
        (
            "size",
            format!("{} ({} bytes)", human(v.size_bytes), v.size_bytes),
        ),
        ("resiliency", v.resiliency.clone()),
        ("node", node_of(v)),
        (
            "allocated",
            if figures_known(v) {
                format!(
                    "{} ({} of {} slabs)",
                    human(v.allocated_bytes),
                    v.slabs_allocated,
                    v.slabs_total
                )
            } else {
                format!(
                    "unknown (node {} did not answer; {} slabs)",
                    v.node, v.slabs_total
                )
            },
        ),
        ("nbd", v.nbd_uri.clone()),
        (
            "block size",
            if v.block_size_bytes == 512 {
                "512 bytes (512e over 4 KiB physical blocks)".to_string()
            } else {
                format!("{} bytes", v.block_size_bytes)
            },
        ),
        ("iscsi", v.iscsi_target.clone()),
        (
            "iscsi uri",
            if v.iscsi_uri.is_empty() {
                "- (this node serves no iSCSI: storaged --iscsi-listen)".to_string()
            } else {
                v.iscsi_uri.clone()
            },
        ),
        ("chap", chap_mode(v).to_string()),
    ];
    if !mirrored(v) {
        return pairs(&rows);
    }
    rows.push(("attached to", or_dash(&v.attached_to)));
    if let Some(pct) = (v.resync_done_bytes * 100).checked_div(v.resync_total_bytes) {
        let state = if v.resync_done_bytes >= v.resync_total_bytes {
            "done"
        } else {
            "running"
        };
        rows.push((
            "resync",
            format!(
                "{} of {} ({pct}%, {state})",
                crate::table::human(v.resync_done_bytes),
                crate::table::human(v.resync_total_bytes)
            ),
        ));
    }
    let mut out = pairs(&rows);
    out.push('\n');
    if v.slabs.is_empty() {
        out.push_str("copies: none yet (no slab written)\n");
    } else {
        out.push_str(&copies_summary(&v.slabs));
        out.push_str(&slab_table(&v.slabs));
    }
    out
}

/// `copies: X current, Y stale, Z resyncing`, over every slab; a state
/// this s2dctl does not know is counted by its own name.
fn copies_summary(slabs: &[SlabInfo]) -> String {
    let mut other: BTreeMap<&str, usize> = BTreeMap::new();
    let mut known = [("current", 0usize), ("stale", 0), ("resyncing", 0)];
    for r in slabs.iter().flat_map(|s| &s.replicas) {
        match known.iter_mut().find(|(k, _)| *k == r.state) {
            Some((_, n)) => *n += 1,
            None => *other.entry(r.state.as_str()).or_default() += 1,
        }
    }
    let parts: Vec<String> = known
        .into_iter()
        .chain(other)
        .map(|(state, n)| format!("{n} {}", or_dash(state)))
        .collect();
    format!("copies: {}\n", parts.join(", "))
}

/// SLAB, EPOCH and COPIES (`n1:current n2:stale`) by slab, the first
/// [`SHOWN_SLABS`] of them.
fn slab_table(slabs: &[SlabInfo]) -> String {
    let mut sorted: Vec<&SlabInfo> = slabs.iter().collect();
    sorted.sort_by_key(|s| s.slab);
    let mut t = Table::new(&["SLAB", "EPOCH", "COPIES"]);
    for s in sorted.iter().take(SHOWN_SLABS) {
        let copies: Vec<String> = s
            .replicas
            .iter()
            .map(|r| format!("{}:{}", or_dash(&r.node), or_dash(&r.state)))
            .collect();
        t.row(vec![
            s.slab.to_string(),
            s.epoch.to_string(),
            or_dash(&copies.join(" ")),
        ]);
    }
    let mut out = t.render();
    if sorted.len() > SHOWN_SLABS {
        let more = sorted.len() - SHOWN_SLABS;
        let _ = writeln!(
            out,
            "... {more} more slab{} (--json for all)",
            plural(more as u64)
        );
    }
    out
}

fn plural(n: u64) -> &'static str {
    if n == 1 { "" } else { "s" }
}

/// What `volume verify` prints on stdout, and the one line it fails with
/// (exit status 1) when the copies differ or some could not be compared.
pub struct Verdict {
    pub report: String,
    pub failure: Option<String>,
}

pub fn verify_verdict(r: &VerifyVolumeResponse) -> Verdict {
    let mut report = String::new();
    for d in &r.differences {
        let detail = if d.detail.is_empty() {
            String::new()
        } else {
            format!(" ({})", d.detail)
        };
        let _ = writeln!(
            report,
            "slab {} offset {}: {}{detail}",
            d.slab,
            d.offset,
            if d.blocks == 1 {
                "1 block differs".to_string()
            } else {
                format!("{} blocks differ", d.blocks)
            }
        );
    }
    for s in &r.skipped {
        let _ = writeln!(report, "skipped: {s}");
    }
    let slabs_differing = r
        .differences
        .iter()
        .map(|d| d.slab)
        .collect::<std::collections::BTreeSet<_>>()
        .len() as u64;
    let skipped = r.skipped.len() as u64;
    let differ = format!(
        "copies differ in {slabs_differing} slab{}",
        plural(slabs_differing)
    );
    let uncompared = format!(
        "{skipped} cop{} could not be compared",
        if skipped == 1 { "y" } else { "ies" }
    );
    let compared = format!(
        "volume {}: {} slab{}, {} block{} compared",
        r.name,
        r.slabs_checked,
        plural(r.slabs_checked),
        r.blocks_checked,
        plural(r.blocks_checked)
    );
    let failure = match (slabs_differing, skipped) {
        (0, 0) if r.identical => {
            let _ = writeln!(report, "{compared}: copies identical");
            None
        }
        (0, 0) => {
            // Not identical, yet nothing named: trust the verdict.
            let _ = writeln!(report, "{compared}: copies DIFFER");
            Some("copies differ".to_string())
        }
        (0, _) => {
            let _ = writeln!(report, "{compared}: no difference found, {uncompared}");
            Some(uncompared)
        }
        (_, 0) => {
            let _ = writeln!(
                report,
                "volume {}: copies DIFFER in {slabs_differing} slab{}",
                r.name,
                plural(slabs_differing)
            );
            Some(differ)
        }
        (_, _) => {
            let _ = writeln!(
                report,
                "volume {}: copies DIFFER in {slabs_differing} slab{}; {uncompared}",
                r.name,
                plural(slabs_differing)
            );
            Some(format!("{differ}; {uncompared}"))
        }
    };
    Verdict {
        report,
        failure: failure.map(|f| format!("volume {}: {f}", r.name)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use s2d_proto::v1::{SlabDifference, SlabReplica};

    /// A volume stored on one node (no slab copies).
    fn simple(node: &str, reachable: bool) -> Volume {
        Volume {
            name: "v1".into(),
            id: 7,
            size_bytes: 10 << 30,
            resiliency: "simple".into(),
            allocated_bytes: 2 << 30,
            slabs_allocated: 2,
            slabs_total: 10,
            nbd_uri: "nbd://10.0.0.2:10809/v1".into(),
            block_size_bytes: 512,
            node: node.into(),
            node_reachable: reachable,
            ..Default::default()
        }
    }

    #[test]
    fn list_shows_node_and_allocation() {
        let s = volume_table(&[simple("b", true)]).render();
        let row = s.lines().nth(1).unwrap();
        assert!(s.lines().next().unwrap().contains("NODE"), "{s}");
        assert!(row.contains(" b "), "{row}");
        assert!(row.contains("2.0 GiB"), "{row}");
    }

    #[test]
    fn unreachable_node_makes_allocation_unknown() {
        let s = volume_table(&[simple("b", false)]).render();
        let row = s.lines().nth(1).unwrap();
        assert!(row.contains("b (unreachable)"), "{row}");
        assert!(row.contains("unknown"), "{row}");
        assert!(!row.contains("2.0 GiB"), "{row}");

        let s = render_volume(&simple("b", false));
        assert!(s.contains("\nnode        b (unreachable)\n"), "{s}");
        assert!(
            s.contains("\nallocated   unknown (node b did not answer"),
            "{s}"
        );
    }

    #[test]
    fn volume_without_node_keeps_its_figures() {
        let s = render_volume(&simple("", false));
        assert!(s.contains("\nnode        -\n"), "{s}");
        assert!(s.contains("\nallocated   2.0 GiB (2 of 10 slabs)\n"), "{s}");
    }

    #[test]
    fn resync_progress_shows_in_volume_show() {
        let mut v = Volume {
            name: "m".into(),
            resiliency: "mirror-3".into(),
            attached_to: "n1".into(),
            resync_done_bytes: 32 << 20,
            resync_total_bytes: 128 << 20,
            ..Default::default()
        };
        let s = render_volume(&v);
        assert!(
            s.contains("resync       32.0 MiB of 128.0 MiB (25%, running)"),
            "{s}"
        );
        v.resync_done_bytes = 128 << 20;
        assert!(render_volume(&v).contains("(100%, done)"));
        v.resync_total_bytes = 0;
        assert!(
            !render_volume(&v).contains("resync"),
            "no line without a resync"
        );
    }

    fn slab(n: u64, epoch: u64, copies: &[(&str, &str)]) -> SlabInfo {
        SlabInfo {
            slab: n,
            epoch,
            replicas: copies
                .iter()
                .map(|(node, state)| SlabReplica {
                    node: node.to_string(),
                    state: state.to_string(),
                })
                .collect(),
        }
    }

    fn mirror(attached: &str, slabs: Vec<SlabInfo>) -> Volume {
        Volume {
            node: attached.into(),
            node_reachable: true,
            attached_to: attached.into(),
            slabs,
            resiliency: "mirror-3".into(),
            ..simple("", true)
        }
    }

    #[test]
    fn simple_volume_prints_no_copies() {
        let s = render_volume(&simple("b", true));
        assert!(s.starts_with("name        v1\n"), "{s}");
        assert!(s.ends_with("\nchap        off\n"), "{s}");
        assert!(!s.contains("attached") && !s.contains("copies"), "{s}");
    }

    #[test]
    fn mirrored_volume_shows_slab_copies_by_slab() {
        let v = mirror(
            "n1",
            vec![
                slab(
                    4,
                    2,
                    &[("n1", "current"), ("n2", "current"), ("n3", "stale")],
                ),
                slab(0, 1, &[("n1", "current"), ("n2", "resyncing")]),
            ],
        );
        let s = render_volume(&v);
        assert!(s.starts_with("name         v1\n"), "{s}");
        let tail = s.split("\nchap         off\n").nth(1).expect(&s);
        assert_eq!(
            tail,
            "attached to  n1\n\
             \n\
             copies: 3 current, 1 stale, 1 resyncing\n\
             SLAB  EPOCH  COPIES\n\
             0     1      n1:current n2:resyncing\n\
             4     2      n1:current n2:current n3:stale\n"
        );
        assert!(s.contains("\nnode         n1\n"), "{s}");
    }

    #[test]
    fn unknown_copy_states_are_counted_by_name() {
        let v = mirror(
            "",
            vec![slab(0, 1, &[("n1", "current"), ("n2", "unknown")])],
        );
        let s = render_volume(&v);
        assert!(
            s.contains("\ncopies: 1 current, 0 stale, 0 resyncing, 1 unknown\n"),
            "{s}"
        );
        assert!(s.contains("\nattached to  -\n"), "{s}");
    }

    #[test]
    fn many_slabs_are_cut_at_64() {
        let slabs = (0..100u64)
            .rev()
            .map(|n| slab(n, 1, &[("n1", "current"), ("n2", "current")]))
            .collect();
        let s = render_volume(&mirror("n1", slabs));
        assert!(
            s.contains("copies: 200 current, 0 stale, 0 resyncing\n"),
            "{s}"
        );
        let rows: Vec<&str> = s
            .lines()
            .skip_while(|l| !l.starts_with("SLAB"))
            .skip(1)
            .collect();
        assert_eq!(rows.len(), SHOWN_SLABS + 1, "{s}");
        assert!(rows[0].starts_with("0 "), "{s}");
        assert!(rows[SHOWN_SLABS - 1].starts_with("63 "), "{s}");
        assert_eq!(rows[SHOWN_SLABS], "... 36 more slabs (--json for all)");
    }

    #[test]
    fn mirrored_volume_without_slabs_says_so() {
        let s = render_volume(&mirror("n2", vec![]));
        assert!(
            s.ends_with("attached to  n2\n\ncopies: none yet (no slab written)\n"),
            "{s}"
        );
    }

    #[test]
    fn list_shows_where_a_mirror_is_attached_or_a_dash() {
        let mut detached = mirror("", vec![slab(0, 1, &[("n1", "current")])]);
        detached.name = "m2".into();
        // Not even a server that says the (absent) node did not answer
        // makes it "unreachable".
        detached.node_reachable = false;
        let mut unwritten = simple("", false);
        unwritten.resiliency = "mirror-3".into();
        unwritten.name = "m3".into();
        // attached_to wins; `node` is the fallback of an older server.
        let mut only_node = mirror("", vec![]);
        only_node.name = "m4".into();
        only_node.node = "n2".into();
        only_node.node_reachable = false;
        let s = volume_table(&[mirror("n1", vec![]), detached, unwritten, only_node]).render();
        let lines: Vec<&str> = s.lines().collect();
        let node_col = lines[0].find("NODE").unwrap();
        let node = |l: &str| l[node_col..].split(' ').next().unwrap().to_string();
        assert_eq!(node(lines[1]), "n1", "{s}");
        assert_eq!(node(lines[2]), "-", "{s}");
        assert_eq!(node(lines[3]), "-", "{s}");
        assert_eq!(node(lines[4]), "n2", "{s}");
        assert!(!s.contains("unreachable") && !s.contains("unknown"), "{s}");
    }

    fn verify(differences: Vec<SlabDifference>, skipped: &[&str]) -> VerifyVolumeResponse {
        VerifyVolumeResponse {
            name: "m1".into(),
            slabs_checked: 3,
            blocks_checked: 786432,
            identical: differences.is_empty(),
            differences,
            skipped: skipped.iter().map(|s| s.to_string()).collect(),
        }
    }

    fn diff(slab: u64, offset: u64, blocks: u64) -> SlabDifference {
        SlabDifference {
            slab,
            offset,
            blocks,
            detail: "copies on n1 and n2 differ".into(),
        }
    }

    #[test]
    fn identical_copies_pass() {
        let v = verify_verdict(&verify(vec![], &[]));
        assert_eq!(
            v.report,
            "volume m1: 3 slabs, 786432 blocks compared: copies identical\n"
        );
        assert!(v.failure.is_none());
    }

    #[test]
    fn differences_are_listed_and_fail() {
        let v = verify_verdict(&verify(vec![diff(0, 8192, 3), diff(5, 0, 1)], &[]));
        assert_eq!(
            v.report,
            "slab 0 offset 8192: 3 blocks differ (copies on n1 and n2 differ)\n\
             slab 5 offset 0: 1 block differs (copies on n1 and n2 differ)\n\
             volume m1: copies DIFFER in 2 slabs\n"
        );
        assert_eq!(
            v.failure.as_deref(),
            Some("volume m1: copies differ in 2 slabs")
        );
    }

    #[test]
    fn skipped_copies_fail_even_when_the_rest_match() {
        let v = verify_verdict(&verify(vec![], &["slab 2: copy on n3 is not current"]));
        assert_eq!(
            v.report,
            "skipped: slab 2: copy on n3 is not current\n\
             volume m1: 3 slabs, 786432 blocks compared: no difference found, \
             1 copy could not be compared\n"
        );
        assert_eq!(
            v.failure.as_deref(),
            Some("volume m1: 1 copy could not be compared")
        );

        let v = verify_verdict(&verify(vec![diff(1, 0, 2)], &["a", "b"]));
        assert!(
            v.report.ends_with(
                "skipped: b\nvolume m1: copies DIFFER in 1 slab; 2 copies could not be compared\n"
            ),
            "{}",
            v.report
        );
        assert_eq!(
            v.failure.as_deref(),
            Some("volume m1: copies differ in 1 slab; 2 copies could not be compared")
        );
    }

    #[test]
    fn not_identical_without_details_still_fails() {
        let mut r = verify(vec![], &[]);
        r.identical = false;
        let v = verify_verdict(&r);
        assert!(
            v.report.ends_with("compared: copies DIFFER\n"),
            "{}",
            v.report
        );
        assert_eq!(v.failure.as_deref(), Some("volume m1: copies differ"));
    }
}
