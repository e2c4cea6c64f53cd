//! `s2dctl cluster ...` and `s2dctl node ...`: the ClusterService.

use crate::table::{Table, human, or_dash, pairs};
use crate::{explain, print_as, print_json};
use clap::Subcommand;
use s2d_proto::v1::cluster_service_client::ClusterServiceClient;
use s2d_proto::v1::{
    ClusterStatus, ClusterStatusRequest, InitClusterRequest, ListNodesRequest, Node, NodeRequest,
};
use tonic::transport::Channel;

#[derive(Subcommand, Debug)]
pub enum ClusterCmd {
    /// Open this node's one-node cluster to joins (storaged --join).
    Init {
        /// Human name of the cluster [default: s2d].
        #[arg(long)]
        name: Option<String>,
    },
    /// Raft leader, term and members, as the node asked sees them.
    Status,
}

#[derive(Subcommand, Debug)]
pub enum NodeCmd {
    /// The cluster's nodes: address, fault domain, state, role, capacity.
    List,
    /// Place no new volumes on a node.
    Drain {
        /// Node name, gRPC address or numeric id.
        node: String,
    },
    /// Remove a node from the cluster for good (a learner replaces a
    /// voter).
    Retire {
        /// Node name, gRPC address or numeric id.
        node: String,
    },
}

pub async fn run_cluster(cmd: ClusterCmd, ch: Channel, ep: &str, json: bool) -> anyhow::Result<()> {
    let mut c = ClusterServiceClient::new(ch);
    match cmd {
        ClusterCmd::Init { name } => {
            let s = c
                .init_cluster(InitClusterRequest {
                    name: name.unwrap_or_default(),
                })
                .await
                .map_err(|s| explain(ep, s))?
                .into_inner();
            print_as(json, &s, |s| {
                print!(
                    "initialized cluster {}\n\n{}",
                    or_dash(&s.name),
                    render_status(s)
                )
            })
        }
        ClusterCmd::Status => {
            let s = c
                .cluster_status(ClusterStatusRequest {})
                .await
                .map_err(|s| explain(ep, s))?
                .into_inner();
            print_as(json, &s, |s| print!("{}", render_status(s)))
        }
    }
}

pub async fn run_node(cmd: NodeCmd, ch: Channel, ep: &str, json: bool) -> anyhow::Result<()> {
    let mut c = ClusterServiceClient::new(ch);
    let n = match cmd {
        NodeCmd::List => {
            let l = c
                .list_nodes(ListNodesRequest {})
                .await
                .map_err(|s| explain(ep, s))?
                .into_inner();
            // Like `volume list`: the list itself, not its envelope.
            return if json {
                print_json(&l.nodes)
            } else {
                node_table(&l.nodes).print();
                Ok(())
            };
        }
        NodeCmd::Drain { node } => c.drain_node(NodeRequest { node }).await,
        NodeCmd::Retire { node } => c.retire_node(NodeRequest { node }).await,
    }
    .map_err(|s| explain(ep, s))?
    .into_inner();
    print_as(json, &n, |n| print!("{}", render_changed(n)))
}

/// `name (id N)`, or `id N` without a name.
fn node_ref(name: &str, id: u64) -> String {
    if name.is_empty() {
        format!("id {id}")
    } else {
        format!("{name} (id {id})")
    }
}

/// `s2dctl health`: the state, then what is wrong and what is being repaired.
pub fn render_health(h: &s2d_proto::v1::HealthResponse) -> String {
    let mut out = format!("pool {}\n", h.state);
    for p in &h.problems {
        out.push_str(&format!("  problem: {p}\n"));
    }
    for r in &h.repairs {
        out.push_str(&format!("  repair:  {r}\n"));
    }
    out
}

pub fn render_status(s: &ClusterStatus) -> String {
    let name_of = |id: u64| {
        s.nodes
            .iter()
            .find(|n| n.id == id)
            .map_or("", |n| n.name.as_str())
    };
    let mut rows = vec![
        ("name", or_dash(&s.name)),
        (
            "initialized",
            if s.initialized {
                "yes".to_string()
            } else {
                "no (s2dctl cluster init opens it to joins)".to_string()
            },
        ),
    ];
    if s.this_node_id != 0 {
        rows.push((
            "this node",
            node_ref(name_of(s.this_node_id), s.this_node_id),
        ));
    }
    let leader = match (s.leader_id, s.leader_name.as_str()) {
        (0, _) => "none".to_string(),
        (id, "") => node_ref(name_of(id), id),
        (id, name) => node_ref(name, id),
    };
    rows.extend([
        ("leader", leader),
        ("term", s.term.to_string()),
        ("applied index", s.applied_index.to_string()),
        ("voters", s.voters.to_string()),
        ("learners", s.learners.to_string()),
    ]);
    if s.extent_size_bytes != 0 {
        rows.push(("extent", human(s.extent_size_bytes)));
    }
    let mut out = pairs(&rows);
    if !s.nodes.is_empty() {
        out.push('\n');
        out.push_str(&node_table(&s.nodes).render());
    }
    out
}

pub fn node_table(nodes: &[Node]) -> Table {
    let mut t = Table::new(&[
        "ID",
        "NAME",
        "ADDRESS",
        "NBD",
        "FAULT DOMAIN",
        "STATE",
        "ROLE",
        "DISKS",
        "CAPACITY",
        "COPIES",
    ]);
    for n in nodes {
        let mut role = or_dash(&n.role);
        if n.leader {
            role.push_str(" (leader)");
        }
        t.row(vec![
            n.id.to_string(),
            or_dash(&n.name),
            or_dash(&n.address),
            or_dash(&n.nbd_address),
            or_dash(&n.fault_domain),
            or_dash(&n.state),
            role,
            n.disks.to_string(),
            human(n.capacity_bytes),
            n.slab_copies.to_string(),
        ]);
    }
    t
}

/// A node after `node drain` or `node retire`: one line, then its row.
fn render_changed(n: &Node) -> String {
    let why = if n.state == "draining" {
        let mut w = format!(
            ": no new volumes are placed on it; its {} slab copies move to other nodes (`node list` shows how many are left)",
            n.slab_copies
        );
        if n.simple_volumes > 0 {
            w.push_str(&format!(
                "; its {} simple volume(s) have no other copy and stay",
                n.simple_volumes
            ));
        }
        w
    } else {
        String::new()
    };
    format!(
        "node {} is {}{why}\n\n{}",
        node_ref(&n.name, n.id),
        or_dash(&n.state),
        node_table(std::slice::from_ref(n)).render()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(id: u64, name: &str, role: &str, leader: bool) -> Node {
        Node {
            id,
            name: name.into(),
            address: format!("10.0.0.{id}:7001"),
            fault_domain: format!("rack-{id}"),
            state: "up".into(),
            role: role.into(),
            leader,
            disks: 2,
            capacity_bytes: 4 << 40,
            nbd_address: format!("10.0.0.{id}:10809"),
            ..Default::default()
        }
    }

    #[test]
    fn health_lists_problems_and_repairs() {
        let h = s2d_proto::v1::HealthResponse {
            state: "repairing".into(),
            problems: vec!["node n3 is down for 12 s".into()],
            repairs: vec!["volume m: 2 copies resyncing".into()],
        };
        assert_eq!(
            render_health(&h),
            "pool repairing\n  problem: node n3 is down for 12 s\n  repair:  volume m: 2 copies resyncing\n"
        );
        let ok = s2d_proto::v1::HealthResponse {
            state: "healthy".into(),
            ..Default::default()
        };
        assert_eq!(render_health(&ok), "pool healthy\n");
    }

    fn status() -> ClusterStatus {
        ClusterStatus {
            name: "prod".into(),
            initialized: true,
            this_node_id: 2,
            leader_id: 1,
            leader_name: "a".into(),
            term: 3,
            applied_index: 42,
            voters: 2,
            learners: 0,
            nodes: vec![node(1, "a", "voter", true), node(2, "b", "voter", false)],
            extent_size_bytes: 1 << 30,
        }
    }

    #[test]
    fn status_names_leader_and_this_node() {
        let s = render_status(&status());
        assert!(
            s.starts_with(
                "name           prod\n\
                 initialized    yes\n\
                 this node      b (id 2)\n\
                 leader         a (id 1)\n\
                 term           3\n\
                 applied index  42\n\
                 voters         2\n\
                 learners       0\n\
                 extent         1.0 GiB\n\
                 \n\
                 ID  NAME"
            ),
            "{s}"
        );
        assert_eq!(s.lines().filter(|l| l.contains("10.0.0.")).count(), 2);
    }

    #[test]
    fn status_without_leader_or_init() {
        let mut st = status();
        st.leader_id = 0;
        st.leader_name.clear();
        st.initialized = false;
        st.name.clear();
        let s = render_status(&st);
        assert!(s.contains("\nleader         none\n"), "{s}");
        assert!(s.starts_with("name           -\n"), "{s}");
        assert!(s.contains("initialized    no (s2dctl cluster init"), "{s}");
    }

    #[test]
    fn leader_name_falls_back_to_the_member_list() {
        let mut st = status();
        st.leader_name.clear();
        assert!(render_status(&st).contains("\nleader         a (id 1)\n"));
        st.leader_id = 9;
        assert!(render_status(&st).contains("\nleader         id 9\n"));
    }

    #[test]
    fn node_table_marks_the_leader_and_fills_blanks() {
        let mut learner = node(3, "c", "learner", false);
        learner.fault_domain.clear();
        let s = node_table(&[node(1, "a", "voter", true), learner]).render();
        let lines: Vec<&str> = s.lines().collect();
        assert_eq!(
            lines[0],
            "ID  NAME  ADDRESS        NBD             FAULT DOMAIN  STATE  ROLE            DISKS  CAPACITY  COPIES"
        );
        assert_eq!(
            lines[1],
            "1   a     10.0.0.1:7001  10.0.0.1:10809  rack-1        up     voter (leader)  2      4.0 TiB   0"
        );
        assert_eq!(
            lines[2],
            "3   c     10.0.0.3:7001  10.0.0.3:10809  -             up     learner         2      4.0 TiB   0"
        );
    }

    #[test]
    fn drained_node_says_what_draining_means() {
        let mut n = node(2, "b", "voter", false);
        n.state = "draining".into();
        n.slab_copies = 7;
        let s = render_changed(&n);
        assert!(
            s.starts_with("node b (id 2) is draining: no new volumes are placed on it; its 7 slab copies move to other nodes (`node list` shows how many are left)\n\nID"),
            "{s}"
        );
        n.simple_volumes = 1;
        assert!(
            render_changed(&n).contains("; its 1 simple volume(s) have no other copy and stay\n"),
            "{s}"
        );
        n.state = "retired".into();
        n.role = "none".into();
        let s = render_changed(&n);
        assert!(s.starts_with("node b (id 2) is retired\n\n"), "{s}");
        assert_eq!(s.lines().count(), 4);
    }
}
