//! Placement's picture of the pool from the cluster metadata: nodes with
//! their fault domains and states, disks with capacity, the extents the
//! metadata records as used, and their states. New copies
//! (`grpc::mirror_nodes`) and rebalance moves (`mirror::rebalance`) are
//! planned on it.

use crate::meta_service::MetaView;
use meta::state::{DiskState, Node, NodeState};
use placement::{DiskId, DiskSpec, FaultDomain, NodeId, Topology};

/// The topology of the nodes `keep` accepts (retired nodes never), and
/// the ids of the nodes it holds. A node whose fault-domain path placement
/// refuses is left out, as are removed disks.
pub fn from_meta(
    view: &MetaView,
    keep: impl Fn(&Node) -> bool,
) -> Result<(Topology, Vec<u64>), String> {
    let es = view
        .state
        .settings
        .as_ref()
        .map_or(0, |s| s.extent_size_bytes);
    let mut topo = Topology::new(es).map_err(|e| e.to_string())?;
    let mut known = Vec::new();
    for n in view.state.nodes.values().filter(|n| keep(n)) {
        let state = match NodeState::try_from(n.state) {
            Ok(NodeState::Up) => placement::NodeState::Up,
            Ok(NodeState::Down) => placement::NodeState::Down,
            Ok(NodeState::Maintenance) => placement::NodeState::Maintenance,
            Ok(NodeState::Retired) | Err(_) => continue,
        };
        let path = if n.fault_domain.is_empty() {
            n.name.clone()
        } else {
            n.fault_domain.join("/")
        };
        let Ok(domain) = FaultDomain::parse(&path) else {
            continue;
        };
        if topo.add_node(NodeId(n.id as u32), domain, state).is_err() {
            continue;
        }
        known.push(n.id);
        for d in view.state.disks.values().filter(|d| d.node == n.id) {
            let state = match DiskState::try_from(d.state) {
                Ok(DiskState::Online) => placement::DiskState::Healthy,
                Ok(DiskState::Draining) => placement::DiskState::Retired,
                Ok(DiskState::Failed) => placement::DiskState::Failed,
                Ok(DiskState::Removed) | Err(_) => continue,
            };
            let total = d.capacity_bytes / es.max(1);
            let spec = DiskSpec {
                id: DiskId(u128::from(d.id)),
                capacity_extents: total,
                free_extents: total.saturating_sub(d.allocated_extents.len() as u64),
                state,
            };
            if let Err(e) = topo.add_disk(NodeId(n.id as u32), spec) {
                tracing::debug!(disk = d.id, error = %e, "disk left out of the placement picture");
            }
        }
    }
    Ok((topo, known))
}
