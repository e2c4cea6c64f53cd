//! Rebalance plans: the fewest extent moves that bring every disk's fill
//! within a tolerance of the pool mean, and drain leaving hardware.
//!
//! Job: after a node or disk is added (it is empty) or drained (its node is
//! retired, or the disk retired or failing), list moves that even out fill,
//! each of which keeps the slab's redundancy.
//!
//! The target: with `U` extents to hold on the healthy disks of up nodes,
//! whose capacity is `C`, a disk of capacity `c` should hold `c * U / C`
//! (the mean fill); it is balanced when it holds between
//! `ceil(c * U / C * (1 - t))` and `floor(c * U / C * (1 + t))` extents, `t`
//! being [`RebalanceOptions::tolerance_bp`] (relative to the mean; the
//! interval is widened to the integers around `c * U / C` when it holds none).
//! Leaving disks should hold nothing. Disks on nodes that are down or in
//! maintenance, and failed disks, are left alone.
//!
//! Optimised: the number of moves. Let `E` be the extents above the upper
//! bounds (every extent on a leaving disk counts) and `F` the extents missing
//! below the lower bounds. One move changes one disk by −1 and another by +1,
//! so no plan can use fewer than `max(E, F)` moves
//! ([`RebalancePlan::moves_lower_bound`]). The greedy takes each move from
//! an over-full disk (leaving disks first, then the fullest) to an
//! under-full one (the emptiest), so every such move lowers `max(E, F)` by
//! one: **a plan made only of such moves has exactly the lower bound of
//! moves, which is minimal.**
//!
//! When the domain rule leaves an over-full disk no such move, the planner
//! tries, in order: a re-route (an augmenting path through earlier moves of
//! the plan: send an earlier move elsewhere so that this extent can take its
//! place; same number of moves), then a move that only lowers `E` or only
//! lowers `F`, then an eviction (another extent makes room first: two
//! moves). Each of these still makes progress, so a plan has at most
//! `2 * (E + F)` moves, and it can exceed the minimum. Measured against an
//! exhaustive search on 50,000 random small clusters (`tests/oracle.rs`):
//! 99.3 % of the plans that reach balance are exactly minimal, none uses
//! more than twice the minimum, and the plan gives up on 0.04 % of the cases
//! the search can balance.
//!
//! Guarantees: a move never lowers the level at which its slab's extents are
//! distinct (so never puts two on one node), never fills a disk above its
//! upper bound or capacity, counting every earlier move of the plan when run
//! in order, and reads from the extent it replaces, which stays until the
//! new one is current: redundancy never drops during a move. Deterministic.
//!
//! Best effort: the domain rule can forbid every move out of an over-full
//! disk (e.g. three nodes holding mirror-3: no extent may change node). Such
//! a disk is given up on, the plan ends with [`RebalancePlan::balanced`]
//! false, and the moves it does list are still each useful. The searches for
//! re-routes and evictions stop after a fixed budget of checks, so a stuck
//! disk in a large pool costs milliseconds, not minutes. Slabs with a lost
//! extent are not moved at all (rebuild them first); they are listed in
//! [`RebalancePlan::skipped`].

use std::cell::Cell;
use std::collections::BTreeMap;

use crate::error::PlacementError;
use crate::fill::Fill;
use crate::select::distinct_level;
use crate::slab::{Loc, Slab, SlabTable};
use crate::topology::{CopyState, DomainLevel, ExtentLocation, NodeId, SlabId, Topology};
use crate::traffic::{NodeTraffic, TrafficCounter};

/// The default tolerance: every disk within 5 % of the mean fill.
pub const REBALANCE_TOLERANCE_BP_DEFAULT: u32 = 500;

/// How close to the mean a rebalance brings every disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RebalanceOptions {
    /// Allowed deviation from the mean fill, relative to it, in basis points
    /// (500 = every disk's fill within ±5 % of the mean). At most 10,000.
    pub tolerance_bp: u32,
}

impl Default for RebalanceOptions {
    fn default() -> Self {
        Self {
            tolerance_bp: REBALANCE_TOLERANCE_BP_DEFAULT,
        }
    }
}

/// Move one extent: create shard `shard` of `slab` at `to` by copying it from
/// `from`, make the new extent current, then remove `from`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Move {
    pub slab: SlabId,
    pub shard: u8,
    pub from: ExtentLocation,
    pub to: ExtentLocation,
}

/// The moves of a rebalance, in the order they were planned (running them in
/// that order keeps every disk within capacity at every step).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RebalancePlan {
    pub moves: Vec<Move>,
    /// No plan reaching balance can have fewer moves than this.
    pub moves_lower_bound: u64,
    /// Every disk ends within the tolerance and leaving disks end empty.
    pub balanced: bool,
    /// Slabs with a lost extent, left for the rebuild to repair first.
    pub skipped: Vec<SlabId>,
    /// Bytes each node reads and writes for the moves.
    pub traffic: BTreeMap<NodeId, NodeTraffic>,
}

/// Plan the moves that bring every healthy disk within the tolerance of the
/// mean fill and empty every leaving disk.
pub fn plan_rebalance(
    topology: &Topology,
    slabs: &[Slab],
    options: RebalanceOptions,
) -> Result<RebalancePlan, PlacementError> {
    if options.tolerance_bp > 10_000 {
        return Err(PlacementError::InvalidTolerance {
            tolerance_bp: options.tolerance_bp,
        });
    }
    let table = SlabTable::resolve(topology, slabs)?;
    let mut balancer = Balancer::new(topology, table, slabs, options.tolerance_bp);
    let moves_lower_bound = balancer.excess_total.max(balancer.deficit_total);
    // Every round either moves (lowering E or F by one) or gives up on a
    // disk, so this bound is never reached; it keeps the loop finite.
    let rounds_max =
        balancer.excess_total + balancer.deficit_total + balancer.slots.len() as u64 + 1;
    for _ in 0..rounds_max {
        if !balancer.step() {
            break;
        }
    }
    let balanced = balancer.excess_total == 0 && balancer.deficit_total == 0;
    let Balancer {
        moves,
        skipped,
        traffic,
        ..
    } = balancer;
    Ok(RebalancePlan {
        moves,
        moves_lower_bound,
        balanced,
        skipped,
        traffic: traffic.into_map(topology),
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    /// Healthy disk on an up node: holds its share.
    Target,
    /// Readable but leaving: holds nothing.
    Leaving,
    /// Unavailable now: neither gives nor takes.
    Fixed,
}

struct Slot {
    node: usize,
    disk: usize,
    role: Role,
    capacity: u64,
    /// Extents on the disk: all used ones for a target, the movable ones for
    /// a leaving disk.
    count: u64,
    low: u64,
    high: u64,
    /// Movable extents here: (slab index, shard).
    residents: Vec<(u32, u8)>,
    /// `residents[..skip]` could not move to a recent first-choice target;
    /// the quick search starts after them (the full search does not), so a
    /// long run of extents that cannot move is not rescanned on every move.
    skip: usize,
    /// No move out of this disk is possible in a mode: given up on (per
    /// [`Mode`]).
    stuck: [bool; 3],
    /// An extent has left this disk in the plan (its count never grew
    /// since).
    gave: bool,
    /// Indices of the planned moves whose extent arrived here and is still
    /// here.
    arrivals: Vec<usize>,
}

impl Slot {
    fn excess(&self) -> u64 {
        match self.role {
            Role::Leaving => self.count,
            Role::Target => self.count.saturating_sub(self.high),
            Role::Fixed => 0,
        }
    }

    fn deficit(&self) -> u64 {
        match self.role {
            Role::Target => self.low.saturating_sub(self.count),
            Role::Leaving | Role::Fixed => 0,
        }
    }
}

/// Marks a slab level not computed yet.
const UNKNOWN: u8 = u8::MAX;

/// What a move must achieve, given the totals `E` (extents above upper
/// bounds) and `F` (extents missing below lower bounds).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// From an over-full disk to an under-full one: lowers `E` and `F`.
    Both = 0,
    /// From an over-full disk to any disk below its upper bound: lowers `E`.
    Excess = 1,
    /// From any disk above its lower bound to an under-full one: lowers `F`.
    Deficit = 2,
}

/// A planned move in slot terms, parallel to [`Balancer::moves`].
#[derive(Clone, Copy)]
struct Planned {
    resident: (u32, u8),
    to: usize,
}

/// How many `may_move` checks one search for a re-route or an eviction may
/// spend before the disk is given up on: keeps a stuck disk in a large pool
/// from costing more than a millisecond or so.
const REROUTE_CHECKS_MAX: usize = 5_000;

/// How many extents one re-route search may visit from one source extent.
const REROUTE_STEPS_MAX: usize = 64;

struct Balancer<'a> {
    topology: &'a Topology,
    slabs: &'a [Slab],
    table: SlabTable,
    slots: Vec<Slot>,
    excess_total: u64,
    deficit_total: u64,
    moves: Vec<Move>,
    planned: Vec<Planned>,
    /// Planned moves per slab index.
    moves_of_slab: Vec<u16>,
    /// Per slab index, the index of the level at which its extents are
    /// distinct now, computed on first use (`UNKNOWN` until then, and again
    /// after one of its extents moves).
    levels: Vec<Cell<u8>>,
    skipped: Vec<SlabId>,
    traffic: TrafficCounter,
}

/// The balanced interval of a disk of `capacity` when `used` of `total`
/// capacity is in use and the tolerance is `tolerance_bp` of the mean.
fn bounds(capacity: u64, used: u64, total: u64, tolerance_bp: u32) -> (u64, u64) {
    let share = capacity as u128 * used as u128;
    let total = (total as u128).max(1);
    let scale = 10_000u128;
    let t = tolerance_bp as u128;
    let mut low = (share * (scale - t)).div_ceil(total * scale);
    let mut high = share * (scale + t) / (total * scale);
    if low > high {
        low = share / total;
        high = share.div_ceil(total);
    }
    let cap = capacity as u128;
    (low.min(cap) as u64, high.min(cap) as u64)
}

impl<'a> Balancer<'a> {
    fn new(topology: &'a Topology, table: SlabTable, slabs: &'a [Slab], tolerance_bp: u32) -> Self {
        let mut slots = Vec::new();
        let mut slot_of = Vec::with_capacity(topology.node_count());
        for (ni, node) in topology.nodes().iter().enumerate() {
            slot_of.push(slots.len());
            for (di, disk) in node.disks().iter().enumerate() {
                let role = if topology.is_target(ni, di) {
                    Role::Target
                } else if topology.copy_state(ni, di) == CopyState::Leaving {
                    Role::Leaving
                } else {
                    Role::Fixed
                };
                slots.push(Slot {
                    node: ni,
                    disk: di,
                    role,
                    capacity: disk.capacity_extents(),
                    count: if role == Role::Target {
                        disk.used_extents()
                    } else {
                        0
                    },
                    low: 0,
                    high: 0,
                    residents: Vec::new(),
                    skip: 0,
                    stuck: [false; 3],
                    gave: false,
                    arrivals: Vec::new(),
                });
            }
        }
        let mut skipped = Vec::new();
        for (si, slab) in slabs.iter().enumerate() {
            let locs = table.extents(si);
            if locs
                .iter()
                .any(|l| topology.copy_state(l.node(), l.disk()) == CopyState::Lost)
            {
                skipped.push(slab.id);
                continue;
            }
            for (shard, loc) in locs.iter().enumerate() {
                let slot = &mut slots[slot_of[loc.node()] + loc.disk()];
                match slot.role {
                    Role::Target => slot.residents.push((si as u32, shard as u8)),
                    Role::Leaving => {
                        slot.residents.push((si as u32, shard as u8));
                        slot.count += 1;
                    }
                    Role::Fixed => {}
                }
            }
        }
        let used: u64 = slots
            .iter()
            .filter(|s| s.role != Role::Fixed)
            .map(|s| s.count)
            .sum();
        let capacity: u64 = slots
            .iter()
            .filter(|s| s.role == Role::Target)
            .map(|s| s.capacity)
            .sum();
        for slot in slots.iter_mut().filter(|s| s.role == Role::Target) {
            (slot.low, slot.high) = bounds(slot.capacity, used, capacity, tolerance_bp);
        }
        let excess_total = slots.iter().map(Slot::excess).sum();
        let deficit_total = slots.iter().map(Slot::deficit).sum();
        Self {
            topology,
            slabs,
            table,
            slots,
            excess_total,
            deficit_total,
            moves: Vec::new(),
            planned: Vec::new(),
            moves_of_slab: vec![0; slabs.len()],
            levels: vec![Cell::new(UNKNOWN); slabs.len()],
            skipped,
            traffic: TrafficCounter::default(),
        }
    }

    /// Plan one move, or give up on one source disk. False when there is
    /// nothing left to do or nothing more that can be done.
    fn step(&mut self) -> bool {
        let (over, under) = (self.excess_total > 0, self.deficit_total > 0);
        // Preferred mode first; the others are fallbacks once every source
        // of the preferred one is given up on.
        let modes: &[Mode] = match (over, under) {
            (false, false) => return false,
            (true, true) => &[Mode::Both, Mode::Excess, Mode::Deficit],
            (true, false) => &[Mode::Excess],
            (false, true) => &[Mode::Deficit],
        };
        let Some((mode, source)) = modes
            .iter()
            .find_map(|&mode| self.best_source(mode).map(|s| (mode, s)))
        else {
            return false;
        };
        let Some(first_choice) = self.best_target(mode) else {
            self.slots[source].stuck[mode as usize] = true;
            return true;
        };
        let quick = self.quick_move_from(source, first_choice);
        let found = quick.or_else(|| {
            self.slots[source].skip = 0;
            self.any_move_from(source, mode)
        });
        match found {
            Some((pos, target)) => self.apply(source, pos, target),
            None => {
                if let Some(chain) = self.find_reroute(source, mode) {
                    for &(earlier, to) in &chain.reroutes {
                        self.reroute(earlier, to);
                    }
                    self.apply(source, chain.pos, chain.via);
                } else if let Some(f) = self.find_eviction(source, mode) {
                    self.apply(f.via, f.other, f.to);
                    self.apply(source, f.pos, f.via);
                } else {
                    self.slots[source].stuck[mode as usize] = true;
                }
            }
        }
        true
    }

    /// The source of the next move in `mode`: leaving disks first, then the
    /// fullest.
    fn best_source(&self, mode: Mode) -> Option<usize> {
        self.slots
            .iter()
            .enumerate()
            .filter(|(_, s)| !s.stuck[mode as usize] && !s.residents.is_empty())
            .filter(|(_, s)| match mode {
                Mode::Both | Mode::Excess => s.excess() > 0,
                Mode::Deficit => s.role == Role::Target && s.count > s.low,
            })
            .max_by(|(i, a), (j, b)| {
                let ka = (a.role == Role::Leaving, Fill::new(a.count, a.capacity));
                let kb = (b.role == Role::Leaving, Fill::new(b.count, b.capacity));
                // Ties go to the lower index, as everywhere else.
                ka.cmp(&kb).then(j.cmp(i))
            })
            .map(|(i, _)| i)
    }

    /// Whether `slot` may receive an extent in `mode`.
    fn takes(slot: &Slot, mode: Mode) -> bool {
        slot.role == Role::Target
            && slot.count < slot.capacity
            && match mode {
                Mode::Both | Mode::Deficit => slot.count < slot.low,
                Mode::Excess => slot.count < slot.high,
            }
    }

    fn target_key(slot: &Slot) -> Fill {
        Fill::after_one_more(slot.count, slot.capacity)
    }

    /// The emptiest disk that may receive an extent in `mode`.
    fn best_target(&self, mode: Mode) -> Option<usize> {
        let mut best: Option<(Fill, usize)> = None;
        for (i, slot) in self.slots.iter().enumerate() {
            if !Self::takes(slot, mode) {
                continue;
            }
            let key = Self::target_key(slot);
            if best.is_none_or(|(b, _)| key < b) {
                best = Some((key, i));
            }
        }
        best.map(|(_, i)| i)
    }

    /// The disks that may receive an extent in `mode`, emptiest first.
    fn targets(&self, mode: Mode) -> Vec<usize> {
        let mut targets: Vec<(Fill, usize)> = self
            .slots
            .iter()
            .enumerate()
            .filter(|(_, s)| Self::takes(s, mode))
            .map(|(i, s)| (Self::target_key(s), i))
            .collect();
        targets.sort();
        targets.into_iter().map(|(_, i)| i).collect()
    }

    /// A resident of `source` that may move to `target`, scanning from the
    /// skip mark and advancing it past those that may not.
    fn quick_move_from(&mut self, source: usize, target: usize) -> Option<(usize, usize)> {
        let slot = &self.slots[source];
        let (start, len) = (slot.skip, slot.residents.len());
        for pos in start..len {
            if self.may_move(self.slots[source].residents[pos], target) {
                return Some((pos, target));
            }
            self.slots[source].skip = pos + 1;
        }
        None
    }

    /// Any (resident position, target) pair out of `source` in `mode`,
    /// trying targets emptiest first.
    fn any_move_from(&self, source: usize, mode: Mode) -> Option<(usize, usize)> {
        let targets = self.targets(mode);
        let residents = &self.slots[source].residents;
        (0..residents.len()).find_map(|pos| {
            targets
                .iter()
                .find(|&&t| self.may_move(residents[pos], t))
                .map(|&t| (pos, t))
        })
    }

    /// When no extent of `source` may go to any disk that takes extents now:
    /// an extent of `source` that may go to a disk `via` where an earlier
    /// move of the plan put an extent, which may instead go to a disk that
    /// takes extents now, or in turn to a disk where another earlier move
    /// put an extent, and so on (breadth first). Re-routing those earlier
    /// moves and moving into `via` has the effect of a direct move, with the
    /// same number of moves: an augmenting path of a matching.
    ///
    /// Only earlier moves of slabs that move nothing else (each slab once in
    /// the path), onto disks that never gave an extent, are re-routed, so
    /// every step of the plan still keeps capacities and domains when run in
    /// order.
    fn find_reroute(&self, source: usize, mode: Mode) -> Option<Chain> {
        let fresh_taker: Vec<bool> = self
            .slots
            .iter()
            .map(|s| Self::takes(s, mode) && !s.gave)
            .collect();
        if !fresh_taker.contains(&true) {
            return None;
        }
        /// An extent that needs a new disk in the search.
        struct Step {
            extent: (u32, u8),
            /// The earlier move that put it where it is (none for the
            /// source's extent).
            earlier: usize,
            /// The step whose extent takes its place.
            parent: usize,
            /// Where it is now.
            at: usize,
        }
        let mut checks = 0usize;
        for (pos, &first) in self.slots[source].residents.iter().enumerate() {
            let mut steps = vec![Step {
                extent: first,
                earlier: usize::MAX,
                parent: usize::MAX,
                at: source,
            }];
            let mut visited = vec![false; self.slots.len()];
            visited[source] = true;
            let mut head = 0;
            while head < steps.len() && steps.len() <= REROUTE_STEPS_MAX {
                let extent = steps[head].extent;
                for (disk, slot) in self.slots.iter().enumerate() {
                    if visited[disk] || slot.role != Role::Target {
                        continue;
                    }
                    checks += 1;
                    if checks > REROUTE_CHECKS_MAX {
                        return None;
                    }
                    if !self.may_move(extent, disk) {
                        continue;
                    }
                    if head > 0 && fresh_taker[disk] {
                        // Found: walk back to the source's extent.
                        let mut reroutes = Vec::new();
                        let (mut step, mut to) = (head, disk);
                        while step != 0 {
                            reroutes.push((steps[step].earlier, to));
                            to = steps[step].at;
                            step = steps[step].parent;
                        }
                        return Some(Chain {
                            pos,
                            via: to,
                            reroutes,
                        });
                    }
                    if head > 0 && slot.gave {
                        continue;
                    }
                    visited[disk] = true;
                    for &earlier in &slot.arrivals {
                        let moved = self.planned[earlier].resident;
                        let mut in_path = false;
                        let mut step = head;
                        while step != usize::MAX {
                            in_path |= steps[step].extent.0 == moved.0;
                            step = steps[step].parent;
                        }
                        if !in_path && self.moves_of_slab[moved.0 as usize] == 1 {
                            steps.push(Step {
                                extent: moved,
                                earlier,
                                parent: head,
                                at: disk,
                            });
                        }
                    }
                }
                head += 1;
            }
        }
        None
    }

    /// The last resort before giving up on `source`: an extent of `source`
    /// that may go to a disk `via` within its bounds, if another extent of
    /// `via` may make room by moving to a disk that takes extents now. Two
    /// moves instead of one, the only way forward when the domain rule pins
    /// extents (e.g. a slab whose other copies leave it a single node,
    /// already full).
    fn find_eviction(&self, source: usize, mode: Mode) -> Option<Found> {
        let takers = self.targets(mode);
        if takers.is_empty() {
            return None;
        }
        let mut checks = 0usize;
        let residents = &self.slots[source].residents;
        for (pos, &resident) in residents.iter().enumerate() {
            for (via, slot) in self.slots.iter().enumerate() {
                // `via` ends with the count it has now: it must be in bounds.
                let usable = slot.role == Role::Target
                    && slot.count <= slot.high
                    && !slot.residents.is_empty();
                if via == source || !usable {
                    continue;
                }
                checks += 1;
                if checks > REROUTE_CHECKS_MAX {
                    return None;
                }
                if !self.may_move(resident, via) {
                    continue;
                }
                for (other_at, &other) in slot.residents.iter().enumerate() {
                    if other.0 == resident.0 {
                        continue;
                    }
                    for &to in &takers {
                        checks += 1;
                        if to != via && self.may_move(other, to) {
                            return Some(Found {
                                pos,
                                via,
                                other: other_at,
                                to,
                            });
                        }
                    }
                    if checks > REROUTE_CHECKS_MAX {
                        return None;
                    }
                }
            }
        }
        None
    }

    /// Send the extent of planned move `earlier` to `to` instead.
    fn reroute(&mut self, earlier: usize, to: usize) {
        let Planned { resident, to: via } = self.planned[earlier];
        let Some(pos) = self.slots[via]
            .residents
            .iter()
            .position(|&r| r == resident)
        else {
            // Unreachable: `arrivals` only lists extents still there.
            return;
        };
        self.relocate(via, pos, to);
        self.slots[via].arrivals.retain(|&m| m != earlier);
        self.slots[to].arrivals.push(earlier);
        self.planned[earlier].to = to;
        self.traffic.unwrite(self.slots[via].node);
        self.traffic.write(self.slots[to].node);
        self.moves[earlier].to = self
            .topology
            .location(self.slots[to].node, self.slots[to].disk);
    }

    /// Moving this shard to `target` keeps its slab distinct at the level it
    /// is distinct at now.
    fn may_move(&self, (slab, shard): (u32, u8), target: usize) -> bool {
        let locs = self.table.extents(slab as usize);
        let nodes = self.topology.nodes();
        let cached = &self.levels[slab as usize];
        let level = match DomainLevel::ALL.get(cached.get() as usize) {
            Some(&level) => level,
            None => {
                let level = distinct_level(self.topology, locs.iter().map(|l| l.node()))
                    .unwrap_or(DomainLevel::Node);
                cached.set(level.index() as u8);
                level
            }
        };
        let domain = nodes[self.slots[target].node].domain(level);
        locs.iter()
            .enumerate()
            .all(|(i, l)| i == shard as usize || nodes[l.node()].domain(level) != domain)
    }

    /// Move the resident at `pos` of `source` to `target`, keeping counts,
    /// totals, residents and the slab table right.
    fn relocate(&mut self, source: usize, pos: usize, target: usize) -> (u32, u8) {
        for i in [source, target] {
            self.excess_total -= self.slots[i].excess();
            self.deficit_total -= self.slots[i].deficit();
        }
        // The last resident takes `pos`; it was not skipped (pos >= skip) or
        // the skip mark is reset below.
        let (slab, shard) = self.slots[source].residents.swap_remove(pos);
        let from = &mut self.slots[source];
        from.skip = from.skip.min(pos).min(from.residents.len());
        from.count -= 1;
        let to = &mut self.slots[target];
        to.count += 1;
        to.residents.push((slab, shard));
        for i in [source, target] {
            self.excess_total += self.slots[i].excess();
            self.deficit_total += self.slots[i].deficit();
        }
        self.levels[slab as usize].set(UNKNOWN);
        let to = &self.slots[target];
        self.table.set(
            slab as usize,
            shard as usize,
            Loc {
                node: to.node as u8,
                disk: to.disk as u16,
            },
        );
        (slab, shard)
    }

    /// Plan a new move of the resident at `pos` of `source` to `target`.
    fn apply(&mut self, source: usize, pos: usize, target: usize) {
        let resident = self.relocate(source, pos, target);
        self.slots[source].gave = true;
        self.slots[target].arrivals.push(self.moves.len());
        self.moves_of_slab[resident.0 as usize] =
            self.moves_of_slab[resident.0 as usize].saturating_add(1);
        let (from, to) = (&self.slots[source], &self.slots[target]);
        self.traffic.read(from.node);
        self.traffic.write(to.node);
        self.planned.push(Planned {
            resident,
            to: target,
        });
        self.moves.push(Move {
            slab: self.slabs[resident.0 as usize].id,
            shard: resident.1,
            from: self.topology.location(from.node, from.disk),
            to: self.topology.location(to.node, to.disk),
        });
    }
}

/// An eviction found by [`Balancer::find_eviction`].
struct Found {
    /// Position of the extent to move among the source's residents.
    pos: usize,
    /// Where it goes.
    via: usize,
    /// Position of the extent that makes room among `via`'s residents.
    other: usize,
    /// Where that extent goes.
    to: usize,
}

/// A re-route path found by [`Balancer::find_reroute`].
struct Chain {
    /// Position of the extent to move among the source's residents.
    pos: usize,
    /// Where it goes.
    via: usize,
    /// (earlier move, its new target), to apply in this order.
    reroutes: Vec<(usize, usize)>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resiliency::Resiliency;
    use crate::testing::{fill, flat_pool};
    use crate::topology::{DiskId, DiskSpec, NodeState};

    fn add_node(t: &mut Topology, n: u32, disks: usize, capacity: u64) {
        crate::testing::add_node(t, n, &format!("n{n}"), &vec![capacity; disks]);
    }

    fn filled(nodes: u32, r: Resiliency, count: u64) -> (Topology, Vec<Slab>) {
        let mut t = flat_pool(1 << 20, nodes, 2, 100);
        let slabs = fill(&mut t, r, count);
        (t, slabs)
    }

    #[test]
    fn bounds_bracket_the_mean() {
        // 1,000 of 4,000 used: mean 25 %; a 100-extent disk should hold 25.
        assert_eq!(bounds(100, 1000, 4000, 0), (25, 25));
        assert_eq!(bounds(100, 1000, 4000, 1000), (23, 27));
        // 12.5 is not an integer: widened to 12..=13.
        assert_eq!(bounds(50, 1000, 4000, 0), (12, 13));
        assert_eq!(bounds(100, 0, 4000, 500), (0, 0));
    }

    #[test]
    fn a_balanced_pool_needs_no_move() {
        let (t, slabs) = filled(4, Resiliency::MIRROR_2, 200);
        let plan = plan_rebalance(&t, &slabs, RebalanceOptions::default()).expect("plan");
        assert!(plan.balanced);
        assert!(plan.moves.is_empty());
        assert_eq!(plan.moves_lower_bound, 0);
    }

    #[test]
    fn a_new_node_gets_its_share_in_the_fewest_moves() {
        let (mut t, slabs) = filled(4, Resiliency::MIRROR_2, 300);
        add_node(&mut t, 4, 2, 100);
        let plan = plan_rebalance(&t, &slabs, RebalanceOptions::default()).expect("plan");
        assert!(plan.balanced);
        assert_eq!(plan.moves.len() as u64, plan.moves_lower_bound);
        // 600 extents over 1,000: 60 per new disk, at least 57 with 5 %.
        assert_eq!(plan.moves.len(), 2 * 57);
        assert!(plan.moves.iter().all(|m| m.to.node == NodeId(4)));
        let again = plan_rebalance(&t, &slabs, RebalanceOptions::default()).expect("plan");
        assert_eq!(plan, again, "deterministic");
    }

    #[test]
    fn a_drained_node_ends_empty() {
        let (mut t, slabs) = filled(5, Resiliency::MIRROR_3, 200);
        t.set_node_state(NodeId(1), NodeState::Retired)
            .expect("retire");
        let plan = plan_rebalance(&t, &slabs, RebalanceOptions::default()).expect("plan");
        assert!(plan.balanced);
        let on_node_1 = slabs
            .iter()
            .flat_map(|s| &s.extents)
            .filter(|e| e.node == NodeId(1))
            .count();
        let off = plan
            .moves
            .iter()
            .filter(|m| m.from.node == NodeId(1))
            .count();
        assert_eq!(off, on_node_1);
        assert!(plan.moves.iter().all(|m| m.to.node != NodeId(1)));
    }

    #[test]
    fn mirror_3_on_3_nodes_cannot_change_node() {
        let (mut t, slabs) = filled(3, Resiliency::MIRROR_3, 60);
        add_node(&mut t, 3, 1, 100);
        // A fourth node can take one copy of each slab: balance is reachable.
        let plan = plan_rebalance(&t, &slabs, RebalanceOptions::default()).expect("plan");
        assert!(plan.balanced);
        // Without it, a new empty disk on node 0 only takes moves from node 0.
        let (mut t, slabs) = filled(3, Resiliency::MIRROR_3, 60);
        t.add_disk(NodeId(0), DiskSpec::empty(DiskId(999), 100))
            .expect("disk");
        let plan = plan_rebalance(&t, &slabs, RebalanceOptions::default()).expect("plan");
        assert!(
            plan.moves
                .iter()
                .all(|m| m.from.node == NodeId(0) && m.to.node == NodeId(0))
        );
        assert!(!plan.balanced, "nodes 1 and 2 stay fuller than the mean");
    }

    #[test]
    fn tolerance_is_checked() {
        let (t, slabs) = filled(3, Resiliency::MIRROR_2, 3);
        let err = plan_rebalance(
            &t,
            &slabs,
            RebalanceOptions {
                tolerance_bp: 10_001,
            },
        )
        .expect_err("too loose");
        assert_eq!(err.code(), "S2D:Placement:InvalidTolerance");
    }
}
