//! Human output of `pool status`: totals, nodes, disks, usable capacity.

use crate::table::{Table, human, or_dash};
use s2d_proto::v1::{NodePool, PoolStatusResponse, UsableCapacity};
use std::fmt::Write;

pub fn render_pool(p: &PoolStatusResponse) -> String {
    let mut out = String::new();
    // Writing to a String cannot fail.
    let _ = writeln!(out, "pool      {}", p.pool_id);
    let _ = writeln!(out, "node      {}", p.node_id);
    let _ = writeln!(out, "extent    {}", human(p.extent_size_bytes));
    let _ = writeln!(
        out,
        "capacity  {}   used {}   free {}   provisioned {} in {} volumes",
        human(p.capacity_bytes),
        human(p.used_bytes),
        human(p.free_bytes),
        human(p.provisioned_bytes),
        p.volumes
    );
    let unreachable: Vec<&str> = p
        .nodes
        .iter()
        .filter(|n| !n.reachable)
        .map(|n| n.name.as_str())
        .collect();
    if !unreachable.is_empty() {
        let _ = writeln!(
            out,
            "          (sums over {} of {} nodes; unreachable: {})",
            p.nodes.len() - unreachable.len(),
            p.nodes.len(),
            unreachable.join(", ")
        );
    }
    if !p.nodes.is_empty() {
        out.push('\n');
        out.push_str(&node_table(&p.nodes).render());
    }
    out.push('\n');
    out.push_str(&disk_table(p).render());
    if !p.usable.is_empty() {
        out.push_str("\nusable capacity\n");
        out.push_str(&usable_table(&p.usable).render());
    }
    out
}

fn node_table(nodes: &[NodePool]) -> Table {
    let mut t = Table::new(&["NODE", "ID", "STATE", "DISKS", "CAPACITY", "USED", "FREE"]);
    for n in nodes {
        let figures = if n.reachable {
            vec![
                n.disks.to_string(),
                human(n.capacity_bytes),
                human(n.used_bytes),
                human(n.free_bytes),
            ]
        } else {
            vec![
                "-".to_string(),
                "unreachable".to_string(),
                "-".to_string(),
                "-".to_string(),
            ]
        };
        let mut row = vec![or_dash(&n.name), n.id.to_string(), or_dash(&n.state)];
        row.extend(figures);
        t.row(row);
    }
    t
}

fn disk_table(p: &PoolStatusResponse) -> Table {
    let mut t = Table::new(&[
        "DISK", "NODE", "CAPACITY", "USED", "FREE", "EXTENTS", "ENGINE",
    ]);
    for d in &p.disks {
        t.row(vec![
            d.path.clone(),
            or_dash(&d.node),
            human(d.capacity_bytes),
            human(d.used_bytes),
            human(d.free_bytes),
            format!("{}/{} free", d.extents_free, d.extents_total),
            d.io_engine.clone(),
        ]);
    }
    t
}

fn usable_table(usable: &[UsableCapacity]) -> Table {
    let mut t = Table::new(&["RESILIENCY", "USABLE"]);
    for u in usable {
        let bytes = if u.bytes == 0 && !u.note.is_empty() {
            format!("none: {}", u.note)
        } else {
            human(u.bytes)
        };
        t.row(vec![u.resiliency.clone(), bytes]);
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;
    use s2d_proto::v1::Disk;

    fn status() -> PoolStatusResponse {
        PoolStatusResponse {
            pool_id: "p1".into(),
            node_id: "1".into(),
            extent_size_bytes: 1 << 30,
            capacity_bytes: 100 << 30,
            used_bytes: 10 << 30,
            free_bytes: 90 << 30,
            provisioned_bytes: 50 << 30,
            volumes: 2,
            disks: vec![Disk {
                path: "/dev/sdb".into(),
                node: "a".into(),
                capacity_bytes: 100 << 30,
                used_bytes: 10 << 30,
                free_bytes: 90 << 30,
                extents_total: 100,
                extents_free: 90,
                io_engine: "io_uring".into(),
                ..Default::default()
            }],
            nodes: vec![
                NodePool {
                    id: 1,
                    name: "a".into(),
                    state: "up".into(),
                    reachable: true,
                    capacity_bytes: 100 << 30,
                    used_bytes: 10 << 30,
                    free_bytes: 90 << 30,
                    disks: 1,
                },
                NodePool {
                    id: 2,
                    name: "b".into(),
                    state: "down".into(),
                    reachable: false,
                    ..Default::default()
                },
            ],
            usable: vec![
                UsableCapacity {
                    resiliency: "simple".into(),
                    bytes: 90 << 30,
                    note: String::new(),
                },
                UsableCapacity {
                    resiliency: "mirror-2".into(),
                    bytes: 0,
                    note: "needs 2 fault domains, 1 reachable".into(),
                },
            ],
        }
    }

    #[test]
    fn unreachable_node_shows_no_figures() {
        let s = render_pool(&status());
        let row = s.lines().find(|l| l.starts_with("b ")).expect(&s);
        assert!(row.contains("unreachable"), "{row}");
        // No size at all, not even "0 B".
        assert!(!row.contains("iB") && !row.contains(" B"), "{row}");
        let row = s.lines().find(|l| l.starts_with("a ")).expect(&s);
        assert!(row.contains("100.0 GiB"), "{row}");
        assert!(
            s.contains("(sums over 1 of 2 nodes; unreachable: b)"),
            "{s}"
        );
    }

    #[test]
    fn disks_name_their_node() {
        let s = render_pool(&status());
        let header = s.lines().find(|l| l.starts_with("DISK")).expect(&s);
        assert!(header.starts_with("DISK      NODE"), "{header}");
        let row = s.lines().find(|l| l.starts_with("/dev/sdb")).expect(&s);
        assert!(row.starts_with("/dev/sdb  a "), "{row}");
    }

    #[test]
    fn usable_capacity_shows_bytes_or_why_not() {
        let s = render_pool(&status());
        let usable = s.split("usable capacity\n").nth(1).expect(&s);
        assert_eq!(
            usable,
            "RESILIENCY  USABLE\n\
             simple      90.0 GiB\n\
             mirror-2    none: needs 2 fault domains, 1 reachable\n"
        );
    }

    #[test]
    fn single_node_status_has_no_node_sections() {
        let mut p = status();
        p.nodes.clear();
        p.usable.clear();
        let s = render_pool(&p);
        assert!(!s.contains("unreachable"), "{s}");
        assert!(!s.contains("usable capacity"), "{s}");
        assert!(!s.contains("STATE"), "{s}");
    }
}
