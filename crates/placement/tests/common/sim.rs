//! A simulated pool: a topology and its slabs, driven through allocations,
//! failures and plans, checking every documented guarantee at every step
//! (each decision is also made twice, to check determinism).
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};

use placement::{
    DiskState, DomainLevel, ExtentLocation, NodeId, PlacementError, RebalanceOptions,
    RebalancePlan, RebuildPlan, Resiliency, Slab, SlabId, Topology, allocate_slab, plan_rebalance,
    plan_rebuild,
};

use super::check::{self, Standing};

#[derive(Clone)]
pub struct Sim {
    pub topology: Topology,
    pub slabs: Vec<Slab>,
    next_slab: u64,
}

impl Sim {
    pub fn new(topology: Topology) -> Self {
        Self {
            topology,
            slabs: Vec::new(),
            next_slab: 0,
        }
    }

    /// Allocate one slab and check the layout, or check the refusal is the
    /// right one.
    pub fn allocate(&mut self, resiliency: Resiliency, prefer: Option<NodeId>) -> bool {
        let t = &self.topology;
        let result = allocate_slab(t, resiliency, prefer);
        assert_eq!(
            result,
            allocate_slab(t, resiliency, prefer),
            "deterministic"
        );
        let width = resiliency.width();
        let usable = check::usable_nodes(t).len();
        let with_space = check::nodes_with_space(t).len();
        let layout = match result {
            Err(PlacementError::NotEnoughFaultDomains {
                needed, available, ..
            }) => {
                assert_eq!((needed, available), (width, usable));
                assert!(usable < width, "refused with {usable} usable nodes");
                return false;
            }
            Err(PlacementError::PoolFull {
                extents,
                nodes,
                with_space: reported,
            }) => {
                assert_eq!((extents, nodes, reported), (width, width, with_space));
                assert!(usable >= width && with_space < width, "refused as full");
                return false;
            }
            Err(other) => panic!("unexpected refusal: {other}"),
            Ok(layout) => layout,
        };
        assert!(with_space >= width);
        assert_eq!(layout.resiliency, resiliency);
        assert_eq!(layout.extents.len(), width);
        for &e in &layout.extents {
            assert!(check::is_target(t, e), "{e:?} takes no new extents");
            let disk = t.disk(e.disk).expect("disk");
            assert!(disk.free_extents() > 0, "{e:?} is full");
        }
        let nodes = check::nodes_of(&layout.extents);
        assert!(
            check::distinct_at(t, &nodes, DomainLevel::Node),
            "two on a node"
        );
        assert!(
            check::distinct_at(t, &nodes, layout.level),
            "shared {:?}",
            layout.level
        );
        assert_eq!(
            Some(layout.level),
            check::expected_level(t, width),
            "not the widest level"
        );
        if let Some(p) = prefer
            && nodes.contains(&p)
        {
            assert_eq!(nodes[0], p, "local copy first");
        }
        self.topology.commit(&layout.extents).expect("commit");
        self.slabs.push(Slab {
            id: SlabId(self.next_slab),
            resiliency,
            extents: layout.extents,
        });
        self.next_slab += 1;
        true
    }

    /// Slab id to position in `slabs`.
    fn slab_index(&self) -> BTreeMap<SlabId, usize> {
        self.slabs
            .iter()
            .enumerate()
            .map(|(i, s)| (s.id, i))
            .collect()
    }

    /// Every disk's used count is the number of slab extents on it.
    pub fn check_accounting(&self) {
        let mut on: BTreeMap<ExtentLocation, u64> = BTreeMap::new();
        for slab in &self.slabs {
            assert_eq!(slab.extents.len(), slab.resiliency.width());
            assert!(
                check::distinct_at(
                    &self.topology,
                    &check::nodes_of(&slab.extents),
                    DomainLevel::Node
                ),
                "slab {:?} has two extents on one node",
                slab.id
            );
            for &e in &slab.extents {
                *on.entry(e).or_default() += 1;
            }
        }
        for location in check::all_disks(&self.topology) {
            let disk = self.topology.disk(location.disk).expect("disk");
            assert!(disk.free_extents() <= disk.capacity_extents());
            assert_eq!(
                disk.used_extents(),
                on.get(&location).copied().unwrap_or(0),
                "{location:?}: used count and extents disagree"
            );
        }
    }

    /// Plan a rebuild, check it against the rules, apply it.
    pub fn rebuild(&mut self) -> RebuildPlan {
        let plan = plan_rebuild(&self.topology, &self.slabs).expect("valid slabs");
        assert_eq!(
            plan,
            plan_rebuild(&self.topology, &self.slabs).expect("valid"),
            "deterministic"
        );
        self.check_rebuild(&plan);
        self.apply_rebuild(&plan);
        // Nothing more can be done right away.
        let again = plan_rebuild(&self.topology, &self.slabs).expect("valid slabs");
        assert!(
            again.tasks.is_empty(),
            "a second plan still has work: {:?}",
            again.tasks
        );
        plan
    }

    fn check_rebuild(&self, plan: &RebuildPlan) {
        let t = &self.topology;
        let by_id: BTreeMap<SlabId, &Slab> = self.slabs.iter().map(|s| (s.id, s)).collect();
        let waiting: BTreeSet<SlabId> = plan.waiting.iter().copied().collect();
        let lost: BTreeSet<SlabId> = plan.lost.iter().copied().collect();
        let tasks: BTreeMap<SlabId, _> = plan.tasks.iter().map(|task| (task.slab, task)).collect();
        let unplaced: BTreeMap<SlabId, _> = plan.unplaced.iter().map(|u| (u.slab, u)).collect();
        assert_eq!(tasks.len(), plan.tasks.len(), "one task per slab");
        let mut reads: BTreeMap<NodeId, u64> = BTreeMap::new();
        let mut writes: BTreeMap<NodeId, u64> = BTreeMap::new();
        for slab in &self.slabs {
            let standings: Vec<Standing> = slab
                .extents
                .iter()
                .map(|&e| check::standing(t, e))
                .collect();
            let count = |s: Standing| standings.iter().filter(|&&x| x == s).count();
            let (lost_n, leaving_n, paused_n) = (
                count(Standing::Lost),
                count(Standing::Leaving),
                count(Standing::Paused),
            );
            let readable = count(Standing::Good) + leaving_n;
            let need = slab.resiliency.data_extents();
            let id = slab.id;
            if lost_n + leaving_n == 0 {
                assert!(
                    !tasks.contains_key(&id) && !waiting.contains(&id) && !lost.contains(&id),
                    "slab {id:?} needs nothing"
                );
                continue;
            }
            if lost_n > 0 && readable < need {
                let expect_waiting = readable + paused_n >= need;
                assert_eq!(waiting.contains(&id), expect_waiting, "slab {id:?} waiting");
                assert_eq!(lost.contains(&id), !expect_waiting, "slab {id:?} lost");
                assert!(!tasks.contains_key(&id));
                continue;
            }
            assert!(!waiting.contains(&id) && !lost.contains(&id));
            let placed = tasks.get(&id).map_or(0, |task| task.targets.len());
            let missing = unplaced.get(&id).map_or(0, |u| u.shards.len());
            assert_eq!(
                placed + missing,
                lost_n + leaving_n,
                "slab {id:?}: every extent handled"
            );
            let Some(task) = tasks.get(&id) else { continue };
            // Sources: readable extents of this slab.
            for source in &task.sources {
                assert_eq!(slab.extents[source.shard as usize], source.location);
                assert!(matches!(
                    check::standing(t, source.location),
                    Standing::Good | Standing::Leaving
                ));
                *reads.entry(source.location.node).or_default() += 1;
            }
            let parity_copy = lost_n == 0 && slab.resiliency.is_parity();
            if parity_copy {
                let copied: Vec<u8> = task.targets.iter().map(|x| x.shard).collect();
                let read: Vec<u8> = task.sources.iter().map(|x| x.shard).collect();
                assert_eq!(copied, read, "leaving parity shards are copied");
            } else {
                assert_eq!(task.sources.len(), need, "slab {id:?} reads {need}");
            }
            // Targets: replace lost / leaving extents with new homes.
            let mut after = slab.extents.clone();
            for target in &task.targets {
                let shard = target.shard as usize;
                assert_eq!(slab.extents[shard], target.from);
                let s = check::standing(t, target.from);
                assert!(matches!(s, Standing::Lost | Standing::Leaving));
                assert_eq!(target.from_lost, s == Standing::Lost);
                assert!(
                    check::is_target(t, target.to),
                    "{:?} takes no extents",
                    target.to
                );
                after[shard] = target.to;
                *writes.entry(target.to.node).or_default() += 1;
            }
            if lost_n > 0 {
                // Lost extents are replaced before leaving ones.
                let first_leaving = task
                    .targets
                    .iter()
                    .position(|x| !x.from_lost)
                    .unwrap_or(task.targets.len());
                assert!(task.targets[first_leaving..].iter().all(|x| !x.from_lost));
            }
            // Every extent the slab names afterwards, unplaced ones included.
            let kept = check::nodes_of(&after);
            assert!(
                check::distinct_at(t, &kept, task.level),
                "slab {id:?} at {:?}",
                task.level
            );
        }
        for id in unplaced.keys() {
            assert!(by_id.contains_key(id));
        }
        let size = t.extent_size_bytes();
        for (node, traffic) in &plan.traffic {
            assert_eq!(
                traffic.read_bytes,
                reads.get(node).copied().unwrap_or(0) * size
            );
            assert_eq!(
                traffic.write_bytes,
                writes.get(node).copied().unwrap_or(0) * size
            );
        }
        let nodes_with_traffic: BTreeSet<NodeId> =
            reads.keys().chain(writes.keys()).copied().collect();
        assert_eq!(nodes_with_traffic.len(), plan.traffic.len());
    }

    fn apply_rebuild(&mut self, plan: &RebuildPlan) {
        let index = self.slab_index();
        for task in &plan.tasks {
            let slab = &mut self.slabs[index[&task.slab]];
            for target in &task.targets {
                self.topology
                    .take_extent(target.to)
                    .expect("target within capacity");
                slab.extents[target.shard as usize] = target.to;
                self.topology
                    .release_extent(target.from)
                    .expect("release replaced");
            }
        }
        self.check_accounting();
        // Unplaced extents had no home: every node with room already holds a
        // kept extent of that slab.
        let t = &self.topology;
        for u in &plan.unplaced {
            let slab = &self.slabs[index[&u.slab]];
            let holding: BTreeSet<NodeId> = slab
                .extents
                .iter()
                .enumerate()
                .filter(|(shard, _)| !u.shards.contains(&(*shard as u8)))
                .map(|(_, e)| e.node)
                .collect();
            for node in check::nodes_with_space(t) {
                assert!(
                    holding.contains(&node),
                    "slab {:?} left unplaced ({}) but node {node:?} has room",
                    u.slab,
                    u.reason
                );
            }
        }
        // Every other slab is back to full redundancy.
        let left: BTreeSet<SlabId> = plan
            .waiting
            .iter()
            .chain(&plan.lost)
            .copied()
            .chain(plan.unplaced.iter().map(|u| u.slab))
            .collect();
        for slab in &self.slabs {
            if left.contains(&slab.id) {
                continue;
            }
            for &e in &slab.extents {
                let s = check::standing(t, e);
                assert!(
                    matches!(s, Standing::Good | Standing::Paused),
                    "slab {:?}: {s:?}",
                    slab.id
                );
            }
        }
    }

    /// Plan a rebalance, check it, apply it move by move.
    pub fn rebalance(&mut self, options: RebalanceOptions) -> RebalancePlan {
        let plan = plan_rebalance(&self.topology, &self.slabs, options).expect("valid");
        assert_eq!(
            plan,
            plan_rebalance(&self.topology, &self.slabs, options).expect("valid"),
            "deterministic"
        );
        let skipped: BTreeSet<SlabId> = self
            .slabs
            .iter()
            .filter(|s| {
                s.extents
                    .iter()
                    .any(|&e| check::standing(&self.topology, e) == Standing::Lost)
            })
            .map(|s| s.id)
            .collect();
        assert_eq!(
            plan.skipped.iter().copied().collect::<BTreeSet<_>>(),
            skipped
        );
        let bounds = self.balanced_bounds(options.tolerance_bp, &skipped);
        let index = self.slab_index();
        for m in &plan.moves {
            assert!(!skipped.contains(&m.slab), "moved a degraded slab");
            let slab = &mut self.slabs[index[&m.slab]];
            assert_eq!(
                slab.extents[m.shard as usize], m.from,
                "moves from where it is"
            );
            let s = check::standing(&self.topology, m.from);
            assert!(
                matches!(s, Standing::Good | Standing::Leaving),
                "reads a readable extent"
            );
            assert!(check::is_target(&self.topology, m.to));
            let before = check::distinct_level(&self.topology, &check::nodes_of(&slab.extents))
                .expect("distinct nodes");
            // Add the new extent first: it must fit.
            self.topology
                .take_extent(m.to)
                .expect("move target within capacity");
            let (low, high) = bounds[&m.to];
            let used = self.topology.disk(m.to.disk).expect("disk").used_extents();
            assert!(used <= high.max(low), "move overfills {:?}", m.to);
            slab.extents[m.shard as usize] = m.to;
            assert!(
                check::distinct_at(&self.topology, &check::nodes_of(&slab.extents), before),
                "move lowers slab {:?} below {before:?}",
                m.slab
            );
            self.topology
                .release_extent(m.from)
                .expect("remove the old extent");
        }
        self.check_accounting();
        if plan.balanced {
            // Exactly the lower bound unless the domain rule forced a
            // detour (each detour lowers E or F with one or two moves); how
            // close to the true minimum that is, the oracle test checks.
            let moves = plan.moves.len() as u64;
            assert!(
                (plan.moves_lower_bound..=4 * plan.moves_lower_bound).contains(&moves),
                "{moves} moves for a lower bound of {}",
                plan.moves_lower_bound
            );
            for (location, (low, high)) in &bounds {
                let used = self
                    .topology
                    .disk(location.disk)
                    .expect("disk")
                    .used_extents();
                assert!(
                    (*low..=*high).contains(&used),
                    "{location:?}: {used} not in {low}..={high}"
                );
            }
            for slab in &self.slabs {
                if skipped.contains(&slab.id) {
                    continue;
                }
                for &e in &slab.extents {
                    assert_ne!(
                        check::standing(&self.topology, e),
                        Standing::Leaving,
                        "drained"
                    );
                }
            }
        } else {
            assert!(plan.moves.len() as u64 <= 4 * plan.moves_lower_bound);
        }
        plan
    }

    /// The balanced interval of every target disk, per the documented rule.
    pub fn balanced_bounds(
        &self,
        tolerance_bp: u32,
        skipped: &BTreeSet<SlabId>,
    ) -> BTreeMap<ExtentLocation, (u64, u64)> {
        let t = &self.topology;
        let targets: Vec<ExtentLocation> = check::all_disks(t)
            .into_iter()
            .filter(|&l| check::is_target(t, l))
            .collect();
        let mut used: u64 = targets
            .iter()
            .map(|l| t.disk(l.disk).expect("disk").used_extents())
            .sum();
        for slab in &self.slabs {
            if skipped.contains(&slab.id) {
                continue;
            }
            used += slab
                .extents
                .iter()
                .filter(|&&e| check::standing(t, e) == Standing::Leaving)
                .count() as u64;
        }
        let capacity: u64 = targets
            .iter()
            .map(|l| t.disk(l.disk).expect("disk").capacity_extents())
            .sum();
        targets
            .into_iter()
            .map(|l| {
                let cap = t.disk(l.disk).expect("disk").capacity_extents();
                (
                    l,
                    check::balanced_interval(cap, used, capacity, tolerance_bp),
                )
            })
            .collect()
    }

    /// Mark a disk failed (e.g. from a proptest index).
    pub fn disk_state(&mut self, pick: usize, state: DiskState) {
        let disks = check::all_disks(&self.topology);
        if disks.is_empty() {
            return;
        }
        let disk = disks[pick % disks.len()].disk;
        self.topology
            .set_disk_state(disk, state)
            .expect("disk exists");
    }
}
