//! Human output of `pool status`: totals, nodes, disks, usable capacity.

use crate::table::{Table, human, or_dash};
use crate::{explain, print_as};
use s2d_proto::v1::pool_service_client::PoolServiceClient;
use s2d_proto::v1::{
    Disk, NodePool, PoolStatusResponse, ScrubRequest, ScrubResponse, UsableCapacity, VolumeScrub,
};
use std::fmt::Write;
use std::time::Duration;
use tonic::transport::Channel;

/// How often `pool scrub --wait` looks again.
const SCRUB_POLL: Duration = Duration::from_millis(500);

/// `pool remove-disk`: one line saying what happens now.
pub fn render_removed(d: &Disk) -> String {
    if d.slab_copies == 0 {
        format!(
            "disk {} of node {} is {}: it holds no mirror copies; no new extents go to it\n",
            d.path,
            or_dash(&d.node),
            or_dash(&d.state)
        )
    } else {
        format!(
            "disk {} of node {} is {}: its {} mirror copies move to other nodes (`pool status` shows how many are left); no new extents go to it\n",
            d.path,
            or_dash(&d.node),
            or_dash(&d.state),
            d.slab_copies
        )
    }
}

/// `pool scrub [--wait | --status]`. Exits 2 when a scrub found what it
/// could not repair, failed, or (with --wait) some volume was not scrubbed.
pub async fn run_scrub(
    mut c: PoolServiceClient<Channel>,
    ep: &str,
    json: bool,
    wait: bool,
    status: bool,
) -> anyhow::Result<()> {
    let mut r = if status {
        c.scrub_status(ScrubRequest {}).await
    } else {
        c.scrub(ScrubRequest {}).await
    }
    .map_err(|s| explain(ep, s))?
    .into_inner();
    if wait {
        // A scrub counts once it started no earlier than this request was
        // answered (minus a little clock skew between nodes).
        let since: std::collections::HashMap<String, u64> = r
            .volumes
            .iter()
            .map(|v| (v.volume.clone(), v.started_ms))
            .collect();
        loop {
            let pending = r.volumes.iter().any(|v| {
                v.state == "running"
                    || (v.state != "failed"
                        && v.started_ms < since.get(&v.volume).copied().unwrap_or(0))
            });
            if !pending {
                break;
            }
            tokio::time::sleep(SCRUB_POLL).await;
            r = c
                .scrub_status(ScrubRequest {})
                .await
                .map_err(|s| explain(ep, s))?
                .into_inner();
        }
    }
    print_as(json, &r, |r| print!("{}", render_scrubs(r)))?;
    if scrub_problems(&r, wait) {
        std::process::exit(2);
    }
    Ok(())
}

/// Whether a scrub report shows something an operator must look at.
fn scrub_problems(r: &ScrubResponse, finished: bool) -> bool {
    r.volumes.iter().any(|v| {
        v.unrepaired_blocks > 0
            || !v.error.is_empty()
            || v.state == "failed"
            || (finished && v.state == "never")
    })
}

fn render_scrubs(r: &ScrubResponse) -> String {
    if r.volumes.is_empty() {
        return "no volumes to scrub\n".into();
    }
    let mut t = Table::new(&[
        "VOLUME",
        "STATE",
        "NODE",
        "CHECKED",
        "BAD",
        "MISMATCHED",
        "REPAIRED",
        "UNREPAIRED",
        "ERROR",
    ]);
    for v in &r.volumes {
        t.row(vec![
            v.volume.clone(),
            v.state.clone(),
            or_dash(&v.node),
            checked(v),
            v.bad_blocks.to_string(),
            v.mismatched_blocks.to_string(),
            v.repaired_blocks.to_string(),
            v.unrepaired_blocks.to_string(),
            or_dash(&v.error),
        ]);
    }
    let mut out = t.render();
    let found: u64 = r
        .volumes
        .iter()
        .map(|v| v.bad_blocks + v.mismatched_blocks)
        .sum();
    let left: u64 = r.volumes.iter().map(|v| v.unrepaired_blocks).sum();
    let _ = writeln!(
        out,
        "\n{found} bad or mismatched blocks found, {left} left unrepaired (counts in 4 KiB blocks)"
    );
    out
}

fn checked(v: &VolumeScrub) -> String {
    if v.state == "never" {
        return "-".into();
    }
    format!("{} of {}", human(v.checked_bytes), human(v.total_bytes))
}

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
        "DISK", "NODE", "STATE", "CAPACITY", "USED", "FREE", "EXTENTS", "COPIES", "ENGINE",
    ]);
    for d in &p.disks {
        t.row(vec![
            d.path.clone(),
            or_dash(&d.node),
            or_dash(&d.state),
            human(d.capacity_bytes),
            human(d.used_bytes),
            human(d.free_bytes),
            format!("{}/{} free", d.extents_free, d.extents_total),
            d.slab_copies.to_string(),
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

    #[test]
    fn scrub_report_counts_findings_and_flags_what_is_left() {
        let mut v = VolumeScrub {
            volume: "db".into(),
            state: "done".into(),
            node: "n1".into(),
            checked_bytes: 8 << 20,
            total_bytes: 8 << 20,
            bad_blocks: 2,
            mismatched_blocks: 1,
            repaired_blocks: 3,
            ..Default::default()
        };
        let r = ScrubResponse {
            volumes: vec![v.clone()],
        };
        let s = render_scrubs(&r);
        assert!(s.starts_with("VOLUME"), "{s}");
        assert!(s.contains("db "), "{s}");
        assert!(s.contains("8.0 MiB of 8.0 MiB"), "{s}");
        assert!(
            s.ends_with(
                "3 bad or mismatched blocks found, 0 left unrepaired (counts in 4 KiB blocks)\n"
            ),
            "{s}"
        );
        assert!(!scrub_problems(&r, true), "all repaired is no problem");
        v.unrepaired_blocks = 1;
        assert!(scrub_problems(
            &ScrubResponse {
                volumes: vec![v.clone()]
            },
            false
        ));
        v.unrepaired_blocks = 0;
        v.state = "never".into();
        let never = ScrubResponse { volumes: vec![v] };
        assert!(
            !scrub_problems(&never, false),
            "--status: never scrubbed is not an error"
        );
        assert!(
            scrub_problems(&never, true),
            "--wait: a volume left unscrubbed is"
        );
    }

    #[test]
    fn removed_disk_says_where_its_copies_go() {
        let mut d = Disk {
            path: "/d/b.img".into(),
            node: "n2".into(),
            state: "draining".into(),
            slab_copies: 4,
            ..Default::default()
        };
        assert_eq!(
            render_removed(&d),
            "disk /d/b.img of node n2 is draining: its 4 mirror copies move to other nodes (`pool status` shows how many are left); no new extents go to it\n"
        );
        d.slab_copies = 0;
        assert!(render_removed(&d).contains("holds no mirror copies"));
    }

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
        assert!(!s.contains("\nNODE "), "{s}");
        assert!(s.contains("\nDISK "), "{s}");
    }
}
