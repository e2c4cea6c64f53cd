//! The rules, restated independently of the crate's internals, from the
//! public model only: fault-domain keys from the paths, copy standing from
//! the node and disk states, balanced intervals from the documented formula.
#![allow(dead_code)]

use std::collections::BTreeSet;

use placement::{DiskState, DomainLevel, ExtentLocation, NodeId, NodeState, Slab, Topology};

/// What a node shares with others at `level`: the path components down to
/// it (omitted ones as `None`), or the node itself at the node level.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum DomainKey {
    Path(Vec<Option<String>>),
    Node(NodeId),
}

pub fn domain_key(t: &Topology, node: NodeId, level: DomainLevel) -> DomainKey {
    let n = t.node(node).expect("node exists");
    let fd = n.fault_domain();
    let parts = [fd.site(), fd.rack(), fd.chassis()];
    let depth = match level {
        DomainLevel::Site => 1,
        DomainLevel::Rack => 2,
        DomainLevel::Chassis => 3,
        DomainLevel::Node => return DomainKey::Node(node),
    };
    DomainKey::Path(
        parts[..depth]
            .iter()
            .map(|p| p.map(str::to_string))
            .collect(),
    )
}

/// Every node in `nodes` is in a different domain at `level`.
pub fn distinct_at(t: &Topology, nodes: &[NodeId], level: DomainLevel) -> bool {
    let keys: BTreeSet<DomainKey> = nodes.iter().map(|&n| domain_key(t, n, level)).collect();
    keys.len() == nodes.len()
}

/// The widest level at which `nodes` are pairwise distinct.
pub fn distinct_level(t: &Topology, nodes: &[NodeId]) -> Option<DomainLevel> {
    DomainLevel::ALL
        .into_iter()
        .find(|&level| distinct_at(t, nodes, level))
}

pub fn nodes_of(extents: &[ExtentLocation]) -> Vec<NodeId> {
    extents.iter().map(|e| e.node).collect()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Standing {
    Good,
    Leaving,
    Paused,
    Lost,
}

/// The documented standing of an extent at `location`.
pub fn standing(t: &Topology, location: ExtentLocation) -> Standing {
    let node = t.node(location.node).expect("node exists");
    let disk = node.disk(location.disk).expect("disk exists");
    if disk.state() == DiskState::Failed {
        return Standing::Lost;
    }
    match (node.state(), disk.state()) {
        (NodeState::Down, _) => Standing::Lost,
        (NodeState::Maintenance, _) => Standing::Paused,
        (NodeState::Retired, _) => Standing::Leaving,
        (NodeState::Up, DiskState::Healthy) => Standing::Good,
        (NodeState::Up, _) => Standing::Leaving,
    }
}

/// A disk that may take new extents (free space aside).
pub fn is_target(t: &Topology, location: ExtentLocation) -> bool {
    let node = t.node(location.node).expect("node exists");
    let disk = node.disk(location.disk).expect("disk exists");
    node.state() == NodeState::Up && disk.state() == DiskState::Healthy
}

/// Every disk location of the topology.
pub fn all_disks(t: &Topology) -> Vec<ExtentLocation> {
    t.nodes()
        .iter()
        .flat_map(|n| {
            n.disks().iter().map(|d| ExtentLocation {
                node: n.id(),
                disk: d.id(),
            })
        })
        .collect()
}

/// Up nodes with a healthy disk (available fault domains).
pub fn usable_nodes(t: &Topology) -> Vec<NodeId> {
    t.nodes()
        .iter()
        .filter(|n| {
            n.state() == NodeState::Up && n.disks().iter().any(|d| d.state() == DiskState::Healthy)
        })
        .map(|n| n.id())
        .collect()
}

/// Up nodes with a healthy disk that has a free extent.
pub fn nodes_with_space(t: &Topology) -> Vec<NodeId> {
    t.nodes()
        .iter()
        .filter(|n| {
            n.state() == NodeState::Up
                && n.disks()
                    .iter()
                    .any(|d| d.state() == DiskState::Healthy && d.free_extents() > 0)
        })
        .map(|n| n.id())
        .collect()
}

/// The widest level at which the nodes with space span `width` domains.
pub fn expected_level(t: &Topology, width: usize) -> Option<DomainLevel> {
    let nodes = nodes_with_space(t);
    DomainLevel::ALL.into_iter().find(|&level| {
        let keys: BTreeSet<DomainKey> = nodes.iter().map(|&n| domain_key(t, n, level)).collect();
        keys.len() >= width
    })
}

/// The balanced interval of a disk, per the rebalance docs: around
/// `capacity * used / total`, ± `tolerance_bp` of it, widened to the
/// integers around it when empty, clamped to the capacity.
pub fn balanced_interval(capacity: u64, used: u64, total: u64, tolerance_bp: u32) -> (u64, u64) {
    let ideal_times = |num: u128, den: u128| -> (u128, u128) {
        let x = capacity as u128 * used as u128 * num;
        let d = total.max(1) as u128 * den;
        (x, d)
    };
    let (lo_n, lo_d) = ideal_times(10_000 - tolerance_bp as u128, 10_000);
    let (hi_n, hi_d) = ideal_times(10_000 + tolerance_bp as u128, 10_000);
    let mut low = lo_n.div_ceil(lo_d);
    let mut high = hi_n / hi_d;
    if low > high {
        let (x, d) = ideal_times(1, 1);
        low = x / d;
        high = x.div_ceil(d);
    }
    (
        low.min(capacity as u128) as u64,
        high.min(capacity as u128) as u64,
    )
}

/// Extents of `slabs` on each disk location.
pub fn extents_on(slabs: &[Slab], location: ExtentLocation) -> usize {
    slabs
        .iter()
        .flat_map(|s| &s.extents)
        .filter(|&&e| e == location)
        .count()
}

/// The fill of every disk that takes new extents.
pub fn target_fills(t: &Topology) -> Vec<(ExtentLocation, f64)> {
    all_disks(t)
        .into_iter()
        .filter(|&l| is_target(t, l))
        .map(|l| {
            let d = t.disk(l.disk).expect("disk exists");
            (l, d.used_extents() as f64 / d.capacity_extents() as f64)
        })
        .collect()
}

/// Largest relative deviation of a disk's fill from the pool's mean fill
/// (used over capacity of all target disks).
pub fn worst_relative_deviation(t: &Topology) -> f64 {
    let disks: Vec<_> = all_disks(t)
        .into_iter()
        .filter(|&l| is_target(t, l))
        .filter_map(|l| t.disk(l.disk))
        .collect();
    let used: u64 = disks.iter().map(|d| d.used_extents()).sum();
    let cap: u64 = disks.iter().map(|d| d.capacity_extents()).sum();
    let mean = used as f64 / cap as f64;
    disks
        .iter()
        .map(|d| (d.used_extents() as f64 / d.capacity_extents() as f64 - mean).abs() / mean)
        .fold(0.0, f64::max)
}
