//! Rebalance: after capacity is added under existing data (a disk added,
//! a node joining) or an operator asks (`s2dctl pool rebalance`), copies
//! move so that every disk's fill comes within a tolerance of the pool
//! mean. The placement crate plans the fewest moves
//! (`placement::plan_rebalance`); each coordinator carries out those of
//! its own volume's slabs, a few per pass, with the move protocol of
//! `super::moves` (one extra copy until the new one is current), so
//! redundancy never dips.
//!
//! Slabs whose copies are not all placed and current, or that move
//! already, are not moved (they count toward fill all the same).

use crate::meta_service::MetaView;
use meta::state::{ReplicaState, Resiliency, UNPLACED};
use placement::{DiskId, ExtentLocation, NodeId, RebalanceOptions, Slab, SlabId};

/// Every disk within ±10 % of the mean fill: coarser than placement's
/// default, so small pools are not churned over an extent or two.
pub const TOLERANCE_BP: u32 = 1000;
/// Moves one pass of a volume starts at most (each holds an extra extent
/// until it finishes).
pub const MOVES_PER_PASS: usize = 8;

/// The moves placement plans now for the slabs of volume `name`, as
/// (slab, from node, to node), in the plan's order.
pub fn rebalance_moves(view: &MetaView, name: &str) -> Vec<(u64, u64, u64)> {
    let (topo, known) = match crate::topology::from_meta(view, |_| true) {
        Ok(t) => t,
        Err(e) => {
            tracing::debug!(error = %e, "no placement picture for a rebalance");
            return Vec::new();
        }
    };
    let usable_disk = |id: u64| {
        view.state
            .disks
            .get(&id)
            .is_some_and(|d| d.state != meta::state::DiskState::Removed as i32)
    };
    let mut slabs = Vec::new();
    let mut index = Vec::new();
    for v in view.state.volumes.values().filter(|v| v.home_node == 0) {
        let Ok(copies) = Resiliency::try_from(v.resiliency).map(|r| r.copies()) else {
            continue;
        };
        let Ok(resiliency) = placement::Resiliency::mirror(copies) else {
            continue;
        };
        for (n, s) in &v.slabs {
            let movable = s.moving_from == 0
                && s.replicas.len() == copies
                && s.replicas.iter().all(|r| {
                    r.extent != UNPLACED
                        && r.state == ReplicaState::Current as i32
                        && known.contains(&r.node)
                        && usable_disk(r.disk)
                });
            if !movable {
                continue;
            }
            slabs.push(Slab {
                id: SlabId(index.len() as u64),
                resiliency,
                extents: s
                    .replicas
                    .iter()
                    .map(|r| ExtentLocation {
                        node: NodeId(r.node as u32),
                        disk: DiskId(u128::from(r.disk)),
                    })
                    .collect(),
            });
            index.push((v.name == name, *n));
        }
    }
    let options = RebalanceOptions {
        tolerance_bp: TOLERANCE_BP,
    };
    match placement::plan_rebalance(&topo, &slabs, options) {
        Ok(plan) => plan
            .moves
            .iter()
            .filter_map(|m| {
                let (ours, slab) = *index.get(m.slab.0 as usize)?;
                ours.then_some((slab, u64::from(m.from.node.0), u64::from(m.to.node.0)))
            })
            .collect(),
        Err(e) => {
            tracing::debug!(error = %e, "placement refused to plan a rebalance");
            Vec::new()
        }
    }
}
