//! Allocation of a new slab: which disks hold its extents.
//!
//! Job: given the topology and a resiliency, return `width` extent locations
//! on pairwise distinct fault domains, or say exactly why that is impossible.
//!
//! Guarantees:
//! - the extents are on distinct domains at [`SlabLayout::level`], the widest
//!   level at which the up nodes that have a free extent on a healthy disk
//!   span at least `width` domains (racks before chassis before nodes); they
//!   are always on distinct nodes;
//! - every chosen disk is healthy, on an up node, and has a free extent;
//! - capacity: if the pool could hold `n` more slabs at that level before
//!   this one, it can hold `n - 1` after it (the "tight domain" rule of
//!   `select::tight_domains`), so greedy balancing never strands free space
//!   that an optimal packing could have used;
//! - deterministic: the same topology and arguments give the same layout.
//!
//! Optimised: fill in proportion to capacity. Each extent goes to the disk
//! whose fill *after* taking it is lowest, subject to the domain rule, which
//! keeps every disk within about one extent of the same fill fraction.
//! Fills within 1/128 of each other count as a tie, broken by a hash of the
//! node and of the pool's state: a strict "emptiest first, lowest id on
//! ties" makes the same few nodes share slab after slab, so losing one of
//! them would load its few partners with the whole rebuild; breaking near
//! ties by hash spreads each node's partners over the cluster (declustering).
//!
//! Best effort: the preferred (local) node gets extent 0 when it has room and
//! its best disk is at most [`LOCAL_PREFERENCE_SLACK_BP`] fuller than the
//! fullest disk the plain greedy choice would use; otherwise balance wins.

use crate::error::PlacementError;
use crate::resiliency::Resiliency;
use crate::select::{Candidates, bit, jitter, node_keys, tight_domains, widest_level};
use crate::topology::{DomainLevel, ExtentLocation, NODES_MAX, NodeId, Topology};

/// How much fuller (in basis points of fill, 200 = 2 percentage points) the
/// preferred node's disk may be than the greedy choice and still get a copy.
pub const LOCAL_PREFERENCE_SLACK_BP: u64 = 200;

/// The extents chosen for a new slab, in shard order (copy 0 is on the
/// preferred node when it got one; for parity, shards `0..k` are data).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlabLayout {
    pub resiliency: Resiliency,
    /// The fault-domain level at which the extents are pairwise distinct.
    pub level: DomainLevel,
    pub extents: Vec<ExtentLocation>,
}

/// Choose the extents of a new slab of `resiliency`, preferring
/// `prefer_node` (the node serving the volume) for one of them.
///
/// Does not change the topology: commit the result with
/// [`Topology::commit`] once it is agreed (Raft), so the next call sees the
/// extents as taken.
pub fn allocate_slab(
    topology: &Topology,
    resiliency: Resiliency,
    prefer_node: Option<NodeId>,
) -> Result<SlabLayout, PlacementError> {
    let width = resiliency.width();
    let prefer = match prefer_node {
        Some(id) => Some(
            topology
                .node_index(id)
                .ok_or(PlacementError::UnknownNode(id))?,
        ),
        None => None,
    };
    let nodes = topology.nodes();
    let usable = nodes.iter().filter(|n| n.is_usable_domain()).count();
    if usable < width {
        return Err(PlacementError::NotEnoughFaultDomains {
            resiliency,
            needed: width,
            available: usable,
        });
    }
    let with_space: u32 = nodes
        .iter()
        .enumerate()
        .filter(|(_, n)| n.best_disk().is_some())
        .fold(0, |acc, (i, _)| acc | (1 << i));
    if (with_space.count_ones() as usize) < width {
        return Err(PlacementError::PoolFull {
            extents: width,
            nodes: width,
            with_space: with_space.count_ones() as usize,
        });
    }
    // Node level always qualifies: `with_space` nodes are distinct nodes.
    let level = widest_level(topology, with_space, width).unwrap_or(DomainLevel::Node);

    let mut domain_free = [0u64; NODES_MAX];
    for node in nodes {
        domain_free[node.domain(level) as usize] += node.allocatable_free_extents();
    }
    let (must_tight, tight) = tight_domains(&domain_free, width);

    let seed = topology.seed();
    let keys = node_keys(topology, |_, node| {
        node.best_score()
            .map(|score| score.saturating_add(jitter(seed, node.id())))
    });
    let candidates = Candidates::new(topology, level, &keys);
    let exact_fill = |ni: usize| {
        let node = &nodes[ni];
        node.best_disk()
            .map(|d| node.disks()[d].fill_after_one_more())
    };
    let mut chosen = greedy(&candidates, 0, must_tight, tight, width)?;

    if let Some(p) = prefer {
        if let Some(at) = chosen.iter().position(|&ni| ni == p) {
            chosen[..=at].rotate_right(1);
        } else {
            // The local node may take a tight domain's place, or a free one
            // if the tight domains still fit in the other extents.
            let p_domain = bit(candidates.domain(p));
            let p_tight = tight & p_domain != 0;
            let still_fits = p_tight || must_tight < width;
            let worst = chosen.iter().filter_map(|&ni| exact_fill(ni)).max();
            let local = exact_fill(p);
            if let (true, Some(local), Some(worst)) = (still_fits, local, worst)
                && local.at_most_plus(worst, LOCAL_PREFERENCE_SLACK_BP)
            {
                let must = must_tight - usize::from(p_tight && must_tight > 0);
                let mut rest = greedy(&candidates, p_domain, must, tight, width - 1)?;
                rest.insert(0, p);
                chosen = rest;
            }
        }
    }

    let extents = chosen
        .iter()
        .map(|&ni| {
            // Every chosen node had a key, i.e. a best disk.
            let di = nodes[ni].best_disk().unwrap_or(0);
            topology.location(ni, di)
        })
        .collect();
    Ok(SlabLayout {
        resiliency,
        level,
        extents,
    })
}

/// `count` nodes on distinct domains (none in `taken`), lowest key first,
/// the first `must_tight` of them from the `tight` domains.
fn greedy(
    candidates: &Candidates<'_>,
    mut taken: u32,
    must_tight: usize,
    tight: u32,
    count: usize,
) -> Result<Vec<usize>, PlacementError> {
    let mut chosen = Vec::with_capacity(count);
    for i in 0..count {
        let restrict = if i < must_tight { !tight } else { 0 };
        let ni = candidates.pick(taken | restrict).ok_or(
            // Unreachable after the checks in `allocate_slab` (enough domains
            // with space exist); reported rather than panicking.
            PlacementError::PoolFull {
                extents: count,
                nodes: count,
                with_space: chosen.len(),
            },
        )?;
        taken |= bit(candidates.domain(ni));
        chosen.push(ni);
    }
    Ok(chosen)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topology::{DiskId, DiskSpec, FaultDomain, NodeState};

    fn pool(paths: &[&str], capacity: u64) -> Topology {
        let mut t = Topology::new(1 << 20).expect("topology");
        for (i, path) in paths.iter().enumerate() {
            crate::testing::add_node(&mut t, i as u32, path, &[capacity]);
        }
        t
    }

    #[test]
    fn says_why_it_cannot() {
        let mut t = pool(&["a", "b", "c"], 1);
        t.set_node_state(NodeId(2), NodeState::Down).expect("state");
        let err = allocate_slab(&t, Resiliency::MIRROR_3, None).expect_err("2 up");
        assert_eq!(err.to_string(), "mirror-3 needs 3 fault domains, 2 are up");
        t.set_node_state(NodeId(2), NodeState::Up).expect("state");
        let layout = allocate_slab(&t, Resiliency::MIRROR_3, None).expect("fits");
        t.commit(&layout.extents).expect("commit");
        t.release_extent(layout.extents[0]).expect("release");
        let err = allocate_slab(&t, Resiliency::MIRROR_3, None).expect_err("full");
        assert_eq!(
            err.to_string(),
            "pool full: need 3 extents on 3 nodes, only 1 node has free space"
        );
        let err = allocate_slab(&t, Resiliency::SIMPLE, Some(NodeId(9))).expect_err("unknown");
        assert_eq!(err, PlacementError::UnknownNode(NodeId(9)));
    }

    #[test]
    fn racks_before_nodes() {
        let t = pool(&["r1/c1/a", "r1/c2/b", "r2/c1/c", "r2/c1/d", "r3/c1/e"], 10);
        let layout = allocate_slab(&t, Resiliency::MIRROR_3, None).expect("fits");
        assert_eq!(layout.level, DomainLevel::Rack);
        let racks: Vec<_> = layout
            .extents
            .iter()
            .map(|e| {
                t.node(e.node)
                    .and_then(|n| n.fault_domain().rack().map(str::to_string))
            })
            .collect();
        assert_eq!(racks.len(), 3);
        assert!(racks[0] != racks[1] && racks[1] != racks[2] && racks[0] != racks[2]);
        // parity-2+2 cannot spread over 3 racks, but over 4 chassis.
        let layout = allocate_slab(&t, Resiliency::parity(2, 2).expect("r"), None).expect("fits");
        assert_eq!(layout.level, DomainLevel::Chassis);
        // parity-3+2 needs all 5 nodes.
        let layout = allocate_slab(&t, Resiliency::parity(3, 2).expect("r"), None).expect("fits");
        assert_eq!(layout.level, DomainLevel::Node);
    }

    #[test]
    fn prefers_the_local_node_while_balance_allows() {
        // 1,000-extent disks: the 2 % slack is 20 extents.
        let mut t = pool(&["a", "b", "c", "d"], 1000);
        let used = |t: &Topology, i: u32| {
            t.node(NodeId(i))
                .map_or(0, |n| n.capacity_extents() - n.allocatable_free_extents())
        };
        let mut local = 0;
        for round in 0..300 {
            let layout = allocate_slab(&t, Resiliency::MIRROR_2, Some(NodeId(3))).expect("fits");
            let again = allocate_slab(&t, Resiliency::MIRROR_2, Some(NodeId(3))).expect("fits");
            assert_eq!(layout, again, "deterministic");
            if layout.extents.iter().any(|e| e.node == NodeId(3)) {
                assert_eq!(layout.extents[0].node, NodeId(3), "local copy first");
                local += 1;
            }
            if round < 20 {
                assert_eq!(layout.extents[0].node, NodeId(3), "round {round}");
            }
            t.commit(&layout.extents).expect("commit");
            let others = (0..3).map(|i| used(&t, i)).max().unwrap_or(0);
            assert!(used(&t, 3) <= others + 21, "local node ran ahead");
        }
        assert!(local < 300, "balance must win eventually");
        assert!(local > 150, "the local node got {local} of 300");
    }

    #[test]
    fn a_dominant_node_is_used_in_every_slab_when_space_is_tight() {
        // a has as much room as b and c together: every mirror-2 slab must
        // use a, or the pool strands space. A pure fill greedy would pair b
        // with c first (both emptier) and fit one slab fewer.
        let mut t = Topology::new(1).expect("topology");
        for (i, cap, used) in [(0u32, 10u64, 5u64), (1, 2, 0), (2, 2, 0)] {
            t.add_node(
                NodeId(i),
                FaultDomain::parse(&format!("n{i}")).expect("p"),
                NodeState::Up,
            )
            .expect("node");
            let mut spec = DiskSpec::empty(DiskId(i as u128), cap);
            spec.free_extents = cap - used;
            t.add_disk(NodeId(i), spec).expect("disk");
        }
        let mut placed = 0;
        while let Ok(layout) = allocate_slab(&t, Resiliency::MIRROR_2, None) {
            t.commit(&layout.extents).expect("commit");
            placed += 1;
        }
        assert_eq!(placed, 4);
    }
}
