//! Human output of volumes: the `volume list` table and `volume show`.

use crate::table::{Table, human, or_dash, pairs};
use s2d_proto::v1::Volume;

/// off, one-way or mutual.
pub fn chap_mode(v: &Volume) -> &'static str {
    match (v.chap_enabled, v.mutual_chap) {
        (false, _) => "off",
        (true, false) => "one-way",
        (true, true) => "mutual",
    }
}

/// Whether the allocation figures of `v` are known. A volume without a
/// node comes from a storaged that predates clusters: its figures are its
/// own and always known.
fn figures_known(v: &Volume) -> bool {
    v.node_reachable || v.node.is_empty()
}

/// The node that serves `v`, marked when it did not answer.
fn node_of(v: &Volume) -> String {
    if v.node.is_empty() {
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
    pairs(&[
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
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vol(node: &str, reachable: bool) -> Volume {
        Volume {
            name: "v1".into(),
            id: 7,
            size_bytes: 10 << 30,
            resiliency: "mirror-2".into(),
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
        let s = volume_table(&[vol("b", true)]).render();
        let row = s.lines().nth(1).unwrap();
        assert!(s.lines().next().unwrap().contains("NODE"), "{s}");
        assert!(row.contains(" b "), "{row}");
        assert!(row.contains("2.0 GiB"), "{row}");
    }

    #[test]
    fn unreachable_node_makes_allocation_unknown() {
        let s = volume_table(&[vol("b", false)]).render();
        let row = s.lines().nth(1).unwrap();
        assert!(row.contains("b (unreachable)"), "{row}");
        assert!(row.contains("unknown"), "{row}");
        assert!(!row.contains("2.0 GiB"), "{row}");

        let s = render_volume(&vol("b", false));
        assert!(s.contains("\nnode        b (unreachable)\n"), "{s}");
        assert!(
            s.contains("\nallocated   unknown (node b did not answer"),
            "{s}"
        );
    }

    #[test]
    fn volume_without_node_keeps_its_figures() {
        let s = render_volume(&vol("", false));
        assert!(s.contains("\nnode        -\n"), "{s}");
        assert!(s.contains("\nallocated   2.0 GiB (2 of 10 slabs)\n"), "{s}");
    }
}
