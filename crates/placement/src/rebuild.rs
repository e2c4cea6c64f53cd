//! Rebuild plans: new homes for every extent that is lost (down node, failed
//! disk) or leaving (retired node, retired or failing disk).
//!
//! Job: for each slab with such extents, choose where the replacements go and
//! what to read to fill them, spreading both over the whole cluster, and say
//! how many bytes every node reads and writes.
//!
//! Guarantees:
//! - a slab's extents after its task are on pairwise distinct domains at
//!   [`RebuildTask::level`], the widest level at which that is possible given
//!   the extents it keeps; always at least on distinct nodes;
//! - no target disk is over capacity, counting every task of the plan;
//! - every target is a healthy disk on an up node; kept extents (good ones,
//!   and those on nodes in maintenance) never move;
//! - a slab is rebuilt only from extents that are readable now: one copy for
//!   a mirror, any `k` shards for parity-k+m; a slab with too few is listed
//!   as [`RebuildPlan::waiting`] (enough will be readable once nodes in
//!   maintenance return) or [`RebuildPlan::lost`] (they never will);
//! - a leaving extent is replaced before it is removed
//!   ([`ShardTarget::from_lost`] is false): redundancy never drops;
//! - deterministic, slabs are handled in input order.
//!
//! Optimised (greedy, one slab at a time): targets go to the disk with the
//! lowest fill after the write (near ties broken by a hash of the slab, as in
//! [`crate::allocate`]), among nodes that have received fewer than 1.5× the
//! average number of writes (a soft cap: when no such node is allowed by the
//! domain rule, the cap is ignored); sources go to the
//! readable copy whose node has read least so far, preferring good copies to
//! leaving ones. Every surviving node therefore reads and writes a similar
//! share: declustered, many-to-many rebuild.
//!
//! Best effort: when no target keeps the domain rule for every extent of a
//! slab, as many as possible are placed (lost extents first) and the rest are
//! listed in [`RebuildPlan::unplaced`] with the reason. A parity slab whose
//! only problem is leaving shards copies each of them directly (one read
//! each, on the leaving node) instead of reconstructing from `k` shards.

use std::collections::BTreeMap;

use crate::error::PlacementError;
use crate::select::{Candidates, KEY_BITS, Mask, bit, distinct_level, jitter, node_keys};
use crate::slab::{Loc, Slab, SlabTable};
use crate::topology::{CopyState, DomainLevel, ExtentLocation, NodeId, SlabId, Topology};
use crate::traffic::{NodeTraffic, TrafficCounter};

/// One extent to read, by shard index and location.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShardSource {
    pub shard: u8,
    pub location: ExtentLocation,
}

/// One extent to recreate at `to`, replacing the one at `from`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShardTarget {
    pub shard: u8,
    pub from: ExtentLocation,
    pub to: ExtentLocation,
    /// `from` is gone (down node, failed disk). Otherwise it is leaving: keep
    /// it until the new extent is current, then remove it.
    pub from_lost: bool,
}

/// The work for one slab: read `sources` (one copy of a mirror, `k` shards of
/// a parity slab to reconstruct from, or the leaving shards themselves to
/// copy), write every target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RebuildTask {
    pub slab: SlabId,
    /// The level at which the slab's extents are distinct once the task is
    /// done.
    pub level: DomainLevel,
    pub sources: Vec<ShardSource>,
    pub targets: Vec<ShardTarget>,
}

/// Extents of a slab that have no home that keeps the domain rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unplaced {
    pub slab: SlabId,
    pub shards: Vec<u8>,
    pub reason: PlacementError,
}

/// What a rebuild must do, and what it cannot.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RebuildPlan {
    pub tasks: Vec<RebuildTask>,
    /// Too few readable extents now; enough once nodes in maintenance are
    /// back. Nothing to do until then.
    pub waiting: Vec<SlabId>,
    /// More extents lost than the resiliency tolerates: data loss.
    pub lost: Vec<SlabId>,
    pub unplaced: Vec<Unplaced>,
    /// Bytes each node reads and writes for the tasks.
    pub traffic: BTreeMap<NodeId, NodeTraffic>,
}

impl RebuildPlan {
    pub fn read_bytes(&self) -> u64 {
        self.traffic.values().map(|t| t.read_bytes).sum()
    }

    pub fn write_bytes(&self) -> u64 {
        self.traffic.values().map(|t| t.write_bytes).sum()
    }

    /// True when the plan restores every slab to full redundancy.
    pub fn is_complete(&self) -> bool {
        self.waiting.is_empty() && self.lost.is_empty() && self.unplaced.is_empty()
    }
}

/// Plan the rebuild of every lost or leaving extent of `slabs`.
///
/// `slabs` is every slab of the pool (only those with lost or leaving
/// extents produce work; the others are read to validate them). The
/// topology's free counts must include the extents of `slabs`.
pub fn plan_rebuild(topology: &Topology, slabs: &[Slab]) -> Result<RebuildPlan, PlacementError> {
    let table = SlabTable::resolve(topology, slabs)?;
    let mut work = Vec::new();
    let mut writes_needed: u64 = 0;
    for (si, _) in slabs.iter().enumerate() {
        let replace = table
            .extents(si)
            .iter()
            .filter(|loc| !topology.copy_state(loc.node(), loc.disk()).is_kept())
            .count();
        if replace > 0 {
            work.push(si);
            writes_needed += replace as u64;
        }
    }
    let targets = topology
        .nodes()
        .iter()
        .filter(|n| n.best_disk().is_some())
        .count()
        .max(1) as u64;
    let mut planner = Planner {
        ledger: topology.clone(),
        traffic: TrafficCounter::default(),
        write_cap: (3 * writes_needed).div_ceil(2 * targets).max(1),
        plan: RebuildPlan::default(),
    };
    for si in work {
        planner.plan_slab(&slabs[si], table.extents(si));
    }
    let Planner {
        traffic, mut plan, ..
    } = planner;
    plan.traffic = traffic.into_map(topology);
    Ok(plan)
}

struct Planner {
    /// The topology with every target of the plan so far taken.
    ledger: Topology,
    traffic: TrafficCounter,
    /// Soft cap on extents written per node (1.5× the average).
    write_cap: u64,
    plan: RebuildPlan,
}

impl Planner {
    fn plan_slab(&mut self, slab: &Slab, locs: &[Loc]) {
        let states: Vec<CopyState> = locs
            .iter()
            .map(|loc| self.ledger.copy_state(loc.node(), loc.disk()))
            .collect();
        let shards_where = |wanted: fn(CopyState) -> bool| -> Vec<usize> {
            (0..states.len()).filter(|&s| wanted(states[s])).collect()
        };
        let lost = shards_where(|c| c == CopyState::Lost);
        let leaving = shards_where(|c| c == CopyState::Leaving);
        let paused = shards_where(|c| c == CopyState::Paused).len();
        let readable = shards_where(CopyState::is_readable);
        let kept = shards_where(CopyState::is_kept);
        let need = slab.resiliency.extents_to_rebuild();
        if !lost.is_empty() && readable.len() < need {
            if readable.len() + paused >= need {
                self.plan.waiting.push(slab.id);
            } else {
                self.plan.lost.push(slab.id);
            }
            return;
        }
        // Lost extents first: they are the ones redundancy is missing.
        let replace: Vec<usize> = lost.iter().chain(&leaving).copied().collect();
        let homes = self.find_homes(slab.id.0, locs, &states, &replace);
        let placed: Vec<(usize, usize)> = replace
            .iter()
            .zip(&homes)
            .filter_map(|(&shard, home)| home.map(|ni| (shard, ni)))
            .collect();
        let unplaced: Vec<usize> = replace
            .iter()
            .zip(&homes)
            .filter(|(_, home)| home.is_none())
            .map(|(&shard, _)| shard)
            .collect();
        if !unplaced.is_empty() {
            let homes: Vec<usize> = placed.iter().map(|&(_, ni)| ni).collect();
            let reason = self.why_unplaced(slab, locs, &kept, &unplaced, &homes);
            self.plan.unplaced.push(Unplaced {
                slab: slab.id,
                shards: unplaced.iter().map(|&s| s as u8).collect(),
                reason,
            });
        }
        if placed.is_empty() {
            return;
        }
        // The extents the slab names once the task is done.
        let after = kept
            .iter()
            .chain(&unplaced)
            .map(|&s| locs[s].node())
            .chain(placed.iter().map(|&(_, ni)| ni));
        let level = distinct_level(&self.ledger, after).unwrap_or(DomainLevel::Node);

        let sources: Vec<usize> = if lost.is_empty() && slab.resiliency.is_parity() {
            placed.iter().map(|&(shard, _)| shard).collect()
        } else {
            self.choose_sources(locs, &readable, need)
        };
        let mut targets = Vec::with_capacity(placed.len());
        for &(shard, ni) in &placed {
            // Each home came from a node with a best disk.
            let di = self.ledger.nodes()[ni].best_disk().unwrap_or(0);
            if self.ledger.take_at(ni, di).is_err() {
                // Unreachable: the best disk has a free extent.
                continue;
            }
            self.traffic.write(ni);
            let from = locs[shard];
            targets.push(ShardTarget {
                shard: shard as u8,
                from: self.ledger.location(from.node(), from.disk()),
                to: self.ledger.location(ni, di),
                from_lost: states[shard] == CopyState::Lost,
            });
        }
        let sources = sources
            .into_iter()
            .map(|shard| {
                let loc = locs[shard];
                self.traffic.read(loc.node());
                ShardSource {
                    shard: shard as u8,
                    location: self.ledger.location(loc.node(), loc.disk()),
                }
            })
            .collect();
        self.plan.tasks.push(RebuildTask {
            slab: slab.id,
            level,
            sources,
            targets,
        });
    }

    /// A node for each of the `replace` extents, or `None` where there is
    /// none.
    ///
    /// First all of them at once, on domains distinct from each other and
    /// from the kept extents, at the widest level where that works. If no
    /// level works, one at a time (lost extents first), each on a domain
    /// distinct from everything the slab names at that moment (an extent not
    /// yet replaced, lost or leaving, still counts: an unplaced one stays in
    /// the slab's record; the replacement of an extent may take its own
    /// domain), repeating while that places more: a replaced extent frees
    /// its domain for the others.
    fn find_homes(
        &self,
        seed: u64,
        locs: &[Loc],
        states: &[CopyState],
        replace: &[usize],
    ) -> Vec<Option<usize>> {
        let nodes = self.ledger.nodes();
        // Nodes over the write cap come after every node under it.
        let keys = node_keys(&self.ledger, |ni, node| {
            node.best_score().map(|score| {
                let over_cap = u64::from(self.traffic.writes(ni) >= self.write_cap);
                (over_cap << (KEY_BITS - 1)) | score.saturating_add(jitter(seed, node.id()))
            })
        });
        // The domains of `members` at `level`, if pairwise distinct.
        let domains =
            |level: DomainLevel, members: &mut dyn Iterator<Item = usize>| -> Option<Mask> {
                let mut taken: Mask = 0;
                for ni in members {
                    let b = bit(nodes[ni].domain(level));
                    if taken & b != 0 {
                        return None;
                    }
                    taken |= b;
                }
                Some(taken)
            };
        let kept = || {
            (0..locs.len())
                .filter(|&s| states[s].is_kept())
                .map(|s| locs[s].node())
        };
        for level in DomainLevel::ALL {
            let Some(taken) = domains(level, &mut kept()) else {
                continue;
            };
            let candidates = Candidates::new(&self.ledger, level, &keys);
            if let Some(all) = candidates.pick_many(taken, replace.len()) {
                return all.into_iter().map(Some).collect();
            }
        }
        let by_level = DomainLevel::ALL.map(|level| Candidates::new(&self.ledger, level, &keys));
        let mut homes: Vec<Option<usize>> = vec![None; replace.len()];
        for _pass in 0..replace.len() {
            let mut progress = false;
            for i in 0..replace.len() {
                if homes[i].is_some() {
                    continue;
                }
                // Extents not replaced (yet) keep their node, even lost
                // ones: the slab's record still names it.
                let unreplaced = (0..replace.len())
                    .filter(|&j| j != i && homes[j].is_none())
                    .map(|j| locs[replace[j]].node());
                let members: Vec<usize> = kept()
                    .chain(unreplaced)
                    .chain(homes.iter().flatten().copied())
                    .collect();
                for level in DomainLevel::ALL {
                    let Some(taken) = domains(level, &mut members.iter().copied()) else {
                        continue;
                    };
                    if let Some(ni) = by_level[level.index()].pick(taken) {
                        homes[i] = Some(ni);
                        progress = true;
                        break;
                    }
                }
            }
            if !progress {
                break;
            }
        }
        homes
    }

    /// `need` readable shards, those on the nodes that have read least so far
    /// first, good extents before leaving ones.
    fn choose_sources(&self, locs: &[Loc], readable: &[usize], need: usize) -> Vec<usize> {
        let mut ranked: Vec<(bool, u64, usize, usize)> = readable
            .iter()
            .map(|&s| {
                let loc = locs[s];
                let leaving = self.ledger.copy_state(loc.node(), loc.disk()) == CopyState::Leaving;
                (leaving, self.traffic.reads(loc.node()), loc.node(), s)
            })
            .collect();
        ranked.sort_unstable();
        ranked.into_iter().take(need).map(|(.., s)| s).collect()
    }

    /// Why the `unplaced` extents of a slab found no home: too few usable
    /// nodes besides those holding the slab, or too few with room.
    fn why_unplaced(
        &self,
        slab: &Slab,
        locs: &[Loc],
        kept: &[usize],
        unplaced: &[usize],
        homes: &[usize],
    ) -> PlacementError {
        let nodes = self.ledger.nodes();
        let holding: Mask = kept
            .iter()
            .chain(unplaced)
            .map(|&s| bit(locs[s].node() as u8))
            .chain(homes.iter().map(|&ni| bit(ni as u8)))
            .fold(0, |a, b| a | b);
        let others = nodes
            .iter()
            .enumerate()
            .filter(|&(i, n)| holding & bit(i as u8) == 0 && n.is_usable_domain());
        let width = slab.resiliency.width();
        let available = kept.len() + homes.len() + others.clone().count();
        if available < width {
            return PlacementError::NotEnoughFaultDomains {
                resiliency: slab.resiliency,
                needed: width,
                available,
            };
        }
        PlacementError::PoolFull {
            extents: unplaced.len(),
            nodes: unplaced.len(),
            with_space: others.filter(|(_, n)| n.best_disk().is_some()).count(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resiliency::Resiliency;
    use crate::testing::fill;
    use crate::topology::{DiskId, DiskState, NodeState};

    fn pool(nodes: u32, disks: usize, capacity: u64) -> Topology {
        crate::testing::flat_pool(4 << 20, nodes, disks, capacity)
    }

    #[test]
    fn nothing_to_do_on_a_healthy_pool() {
        let mut t = pool(4, 2, 50);
        let slabs = fill(&mut t, Resiliency::MIRROR_3, 30);
        let plan = plan_rebuild(&t, &slabs).expect("plan");
        assert_eq!(plan, RebuildPlan::default());
        assert!(plan.is_complete());
    }

    #[test]
    fn a_lost_node_is_rebuilt_from_survivors_onto_other_nodes() {
        let mut t = pool(5, 2, 50);
        let slabs = fill(&mut t, Resiliency::MIRROR_3, 40);
        t.set_node_state(NodeId(2), NodeState::Down).expect("down");
        let plan = plan_rebuild(&t, &slabs).expect("plan");
        assert!(plan.is_complete(), "{plan:?}");
        let affected = slabs
            .iter()
            .filter(|s| s.extents.iter().any(|e| e.node == NodeId(2)))
            .count();
        assert_eq!(plan.tasks.len(), affected);
        for task in &plan.tasks {
            assert_eq!(task.sources.len(), 1);
            assert_eq!(task.targets.len(), 1);
            let target = task.targets[0];
            assert!(target.from_lost);
            assert_eq!(target.from.node, NodeId(2));
            assert_ne!(target.to.node, NodeId(2));
            assert_ne!(task.sources[0].location.node, NodeId(2));
            let slab = &slabs[task.slab.0 as usize];
            assert!(slab.extents.iter().all(|e| e.node != target.to.node));
        }
        assert_eq!(plan.write_bytes(), affected as u64 * (4 << 20));
        assert_eq!(plan.read_bytes(), affected as u64 * (4 << 20));
        assert_eq!(
            plan,
            plan_rebuild(&t, &slabs).expect("plan"),
            "deterministic"
        );
    }

    #[test]
    fn parity_reconstructs_from_k_shards_and_copies_leaving_ones() {
        let mut t = pool(7, 1, 40);
        let r = Resiliency::parity(4, 2).expect("r");
        let slabs = fill(&mut t, r, 20);
        t.set_node_state(NodeId(0), NodeState::Down).expect("down");
        let plan = plan_rebuild(&t, &slabs).expect("plan");
        assert!(plan.is_complete(), "{plan:?}");
        assert!(plan.tasks.iter().all(|task| task.sources.len() == 4));

        t.set_node_state(NodeId(0), NodeState::Up).expect("up");
        t.set_disk_state(DiskId(100), DiskState::Retired)
            .expect("retire");
        let plan = plan_rebuild(&t, &slabs).expect("plan");
        assert!(plan.is_complete(), "{plan:?}");
        for task in &plan.tasks {
            assert_eq!(task.sources.len(), 1);
            assert_eq!(task.sources[0].location.disk, DiskId(100));
            assert!(!task.targets[0].from_lost);
        }
    }

    #[test]
    fn too_many_losses_and_waiting_for_maintenance() {
        let mut t = pool(3, 1, 10);
        let slabs = fill(&mut t, Resiliency::MIRROR_2, 3);
        // Mirror-2 on 3 nodes: lose two nodes and slabs on both are gone.
        t.set_node_state(NodeId(0), NodeState::Down).expect("down");
        t.set_node_state(NodeId(1), NodeState::Maintenance)
            .expect("maint");
        let plan = plan_rebuild(&t, &slabs).expect("plan");
        let on = |s: &Slab, n: u32| s.extents.iter().any(|e| e.node == NodeId(n));
        for slab in &slabs {
            if on(slab, 0) && on(slab, 1) {
                assert!(plan.waiting.contains(&slab.id));
            }
        }
        t.set_node_state(NodeId(1), NodeState::Down).expect("down");
        let plan = plan_rebuild(&t, &slabs).expect("plan");
        for slab in &slabs {
            if on(slab, 0) && on(slab, 1) {
                assert!(plan.lost.contains(&slab.id));
            }
        }
    }

    #[test]
    fn no_room_is_reported_not_forced() {
        let mut t = pool(3, 1, 10);
        let slabs = fill(&mut t, Resiliency::MIRROR_3, 2);
        t.set_node_state(NodeId(1), NodeState::Down).expect("down");
        let plan = plan_rebuild(&t, &slabs).expect("plan");
        assert!(plan.tasks.is_empty());
        assert_eq!(plan.unplaced.len(), 2);
        assert_eq!(
            plan.unplaced[0].reason.to_string(),
            "mirror-3 needs 3 fault domains, 2 are up"
        );
    }
}
