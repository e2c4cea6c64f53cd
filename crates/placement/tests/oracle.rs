//! Naive exhaustive oracles on small clusters (2–4 nodes, at most 6 disks of
//! 1–4 extents, a handful of slabs):
//!
//! - rebalance: a breadth-first search over every sequence of valid single
//!   extent moves finds the true fewest moves that reach balance. The lower
//!   bound must never exceed it; a balanced plan may use at most twice as
//!   many moves; and over 2,000 seeded cases the plan must be exactly
//!   minimal in 98 % of those it balances and miss at most 1 % of the
//!   balances the search finds;
//! - allocation: every multiset of valid placements is tried; greedy
//!   allocation must place as many slabs as the best packing, with its
//!   fullest disk no fuller than the best packing's fullest disk plus one
//!   extent of the smallest disk.

mod common;

use std::collections::{BTreeSet, HashSet};

use common::check::{self, Standing};
use common::sim::Sim;
use placement::{
    DiskId, DiskSpec, DiskState, DomainLevel, ExtentLocation, FaultDomain, NodeId, NodeState,
    RebalanceOptions, Resiliency, Topology, allocate_slab,
};
use proptest::prelude::*;
use proptest::test_runner::FileFailurePersistence;

const DISKS_MAX: usize = 6;

#[derive(Debug, Clone)]
struct Small {
    /// Per node: chassis name index (when `nested`) and disk capacities.
    nodes: Vec<(u8, Vec<u64>)>,
    nested: bool,
}

fn small() -> impl Strategy<Value = Small> {
    (
        prop::collection::vec((0u8..2, prop::collection::vec(1u64..=4, 1..=2)), 2..=4),
        any::<bool>(),
    )
        .prop_map(|(nodes, nested)| Small {
            nodes: at_most_disks_max(nodes),
            nested,
        })
}

fn build(spec: &Small) -> Topology {
    let mut t = Topology::new(1 << 20).expect("extent size");
    let mut disk = 0u128;
    for (i, (chassis, caps)) in spec.nodes.iter().enumerate() {
        let id = NodeId(i as u32);
        let path = if spec.nested {
            format!("c{chassis}/n{i}")
        } else {
            format!("n{i}")
        };
        t.add_node(id, FaultDomain::parse(&path).expect("path"), NodeState::Up)
            .expect("node");
        for &cap in caps {
            t.add_disk(id, DiskSpec::empty(DiskId(disk), cap))
                .expect("disk");
            disk += 1;
        }
    }
    t
}

fn resiliency(i: usize) -> Resiliency {
    ["simple", "mirror-2", "mirror-3", "parity-2+1"][i % 4]
        .parse()
        .expect("valid")
}

#[derive(Debug, Clone)]
enum Change {
    None,
    AddNode(u8, Vec<u64>),
    RetireNode(usize),
    RetireDisk(usize),
}

fn change() -> impl Strategy<Value = Change> {
    prop_oneof![
        Just(Change::None),
        (0u8..2, prop::collection::vec(1u64..=4, 1..=2)).prop_map(|(c, d)| Change::AddNode(c, d)),
        any::<usize>().prop_map(Change::RetireNode),
        any::<usize>().prop_map(Change::RetireDisk),
    ]
}

/// The fewest valid single-extent moves from the simulation's current state
/// to a balanced one, searching up to `depth_max` moves.
fn fewest_moves(sim: &Sim, tolerance_bp: u32, depth_max: usize) -> Option<usize> {
    let t = &sim.topology;
    let bounds = sim.balanced_bounds(tolerance_bp, &BTreeSet::new());
    let disks = check::all_disks(t);
    let capacity: Vec<u64> = disks
        .iter()
        .map(|l| t.disk(l.disk).expect("disk").capacity_extents())
        .collect();
    let target: Vec<bool> = disks.iter().map(|&l| check::is_target(t, l)).collect();
    let leaving: Vec<bool> = disks
        .iter()
        .map(|&l| check::standing(t, l) == Standing::Leaving)
        .collect();
    let index = |l: ExtentLocation| disks.iter().position(|&d| d == l).expect("known disk");
    // State: the disk index of every extent, slab by slab.
    let widths: Vec<usize> = sim.slabs.iter().map(|s| s.extents.len()).collect();
    let start: Vec<usize> = sim
        .slabs
        .iter()
        .flat_map(|s| s.extents.iter().map(|&e| index(e)))
        .collect();
    let balanced = |state: &[usize]| {
        let mut used = vec![0u64; disks.len()];
        for &d in state {
            used[d] += 1;
        }
        (0..disks.len()).all(|d| {
            if leaving[d] {
                used[d] == 0
            } else if let Some(&(low, high)) = bounds.get(&disks[d]) {
                (low..=high).contains(&used[d])
            } else {
                true
            }
        })
    };
    let nodes_of = |state: &[usize], slab: usize| -> Vec<NodeId> {
        let start: usize = widths[..slab].iter().sum();
        state[start..start + widths[slab]]
            .iter()
            .map(|&d| disks[d].node)
            .collect()
    };
    let mut seen: HashSet<Vec<usize>> = HashSet::from([start.clone()]);
    let mut frontier = vec![start];
    for depth in 0..=depth_max {
        if frontier.iter().any(|s| balanced(s)) {
            return Some(depth);
        }
        if depth == depth_max {
            break;
        }
        let mut next = Vec::new();
        for state in &frontier {
            let mut used = vec![0u64; disks.len()];
            for &d in state {
                used[d] += 1;
            }
            let mut extent = 0;
            for (slab, &width) in widths.iter().enumerate() {
                let before =
                    check::distinct_level(t, &nodes_of(state, slab)).unwrap_or(DomainLevel::Node);
                for _ in 0..width {
                    for to in 0..disks.len() {
                        if to == state[extent] || !target[to] || used[to] >= capacity[to] {
                            continue;
                        }
                        let mut moved = state.clone();
                        moved[extent] = to;
                        if !check::distinct_at(t, &nodes_of(&moved, slab), before) {
                            continue;
                        }
                        if seen.insert(moved.clone()) {
                            next.push(moved);
                        }
                    }
                    extent += 1;
                }
            }
        }
        frontier = next;
    }
    None
}

/// Every way to place one slab of `width` extents on distinct nodes (flat
/// topology): sets of disk indices.
fn placements(t: &Topology, width: usize) -> Vec<Vec<usize>> {
    let disks = check::all_disks(t);
    let mut out = Vec::new();
    fn extend(
        disks: &[ExtentLocation],
        width: usize,
        from: usize,
        current: &mut Vec<usize>,
        out: &mut Vec<Vec<usize>>,
    ) {
        if current.len() == width {
            out.push(current.clone());
            return;
        }
        for d in from..disks.len() {
            if current.iter().all(|&c| disks[c].node != disks[d].node) {
                current.push(d);
                extend(disks, width, d + 1, current, out);
                current.pop();
            }
        }
    }
    extend(&disks, width, 0, &mut Vec::new(), &mut out);
    out
}

/// For `slabs` slabs of `width`: the most that fit, and among packings of
/// that many, the lowest possible fill of the fullest disk.
fn best_packing(t: &Topology, width: usize, slabs: usize) -> (usize, f64) {
    let disks = check::all_disks(t);
    let capacity: Vec<u64> = disks
        .iter()
        .map(|l| t.disk(l.disk).expect("disk").capacity_extents())
        .collect();
    let options = placements(t, width);
    let mut level: HashSet<Vec<u64>> = HashSet::from([vec![0; disks.len()]]);
    let mut placed = 0;
    while placed < slabs {
        let mut next = HashSet::new();
        for used in &level {
            for option in &options {
                if option.iter().all(|&d| used[d] < capacity[d]) {
                    let mut after = used.clone();
                    for &d in option {
                        after[d] += 1;
                    }
                    next.insert(after);
                }
            }
        }
        if next.is_empty() {
            break;
        }
        level = next;
        placed += 1;
    }
    let fullest = |used: &Vec<u64>| {
        used.iter()
            .zip(&capacity)
            .map(|(&u, &c)| u as f64 / c as f64)
            .fold(0.0, f64::max)
    };
    let best = level.iter().map(fullest).fold(f64::INFINITY, f64::min);
    (placed, best)
}

#[derive(Debug, Clone)]
struct RebalanceCase {
    spec: Small,
    allocations: Vec<usize>,
    change: Change,
    tolerance_bp: u32,
}

fn rebalance_case() -> impl Strategy<Value = RebalanceCase> {
    (
        small(),
        prop::collection::vec(0usize..3, 1..=4),
        change(),
        prop_oneof![Just(0u32), Just(1000u32), Just(3000u32)],
    )
        .prop_map(|(spec, allocations, change, tolerance_bp)| RebalanceCase {
            spec,
            allocations,
            change,
            tolerance_bp,
        })
}

struct Outcome {
    balanced: bool,
    moves: usize,
    bound: usize,
    /// The true fewest moves to balance, if at most `max(2 * bound, moves)`
    /// (and 8).
    fewest: Option<usize>,
}

/// Allocate a few slabs, change the topology, plan a rebalance (checked
/// and applied by the simulation) and search for the true fewest moves.
fn run_rebalance_case(case: &RebalanceCase) -> Outcome {
    let spec = &case.spec;
    let mut sim = Sim::new(build(spec));
    let mut extents = 0;
    for &r in &case.allocations {
        let r = resiliency(r);
        if extents + r.width() > 6 || !sim.allocate(r, None) {
            break;
        }
        extents += r.width();
    }
    match &case.change {
        Change::None => {}
        Change::AddNode(chassis, caps) => {
            let disks = check::all_disks(&sim.topology).len();
            let id = NodeId(sim.topology.node_count() as u32);
            let path = if spec.nested {
                format!("c{chassis}/n{}", id.0)
            } else {
                format!("n{}", id.0)
            };
            let domain = FaultDomain::parse(&path).expect("path");
            sim.topology
                .add_node(id, domain, NodeState::Up)
                .expect("node");
            for (i, &cap) in caps
                .iter()
                .enumerate()
                .take(DISKS_MAX.saturating_sub(disks))
            {
                let disk = DiskSpec::empty(DiskId(100 + i as u128), cap);
                sim.topology.add_disk(id, disk).expect("disk");
            }
        }
        Change::RetireNode(pick) => {
            let nodes = sim.topology.nodes();
            let id = nodes[pick % nodes.len()].id();
            sim.topology
                .set_node_state(id, NodeState::Retired)
                .expect("node");
        }
        Change::RetireDisk(pick) => {
            let disks = check::all_disks(&sim.topology);
            let disk = disks[pick % disks.len()].disk;
            sim.topology
                .set_disk_state(disk, DiskState::Retired)
                .expect("disk");
        }
    }
    let before = sim.clone();
    // Plan, check every rule and apply (see common/sim.rs).
    let plan = sim.rebalance(RebalanceOptions {
        tolerance_bp: case.tolerance_bp,
    });
    let bound = plan.moves_lower_bound as usize;
    let moves = plan.moves.len();
    // Search at least as deep as the plan went, so a balanced plan is always
    // compared with the true minimum.
    let depth = (2 * bound).max(moves).min(8);
    Outcome {
        balanced: plan.balanced,
        moves,
        bound,
        fewest: fewest_moves(&before, case.tolerance_bp, depth),
    }
}

/// The stated bound, measured: over 2,000 random small cases (fixed seed),
/// the plan must be exactly minimal in at least 98 % of the cases it
/// balances, and give up on at most 1 % of the cases where the exhaustive
/// search balances within twice the lower bound.
#[test]
fn rebalance_is_almost_always_minimal() {
    use proptest::strategy::ValueTree;
    use proptest::test_runner::{RngAlgorithm, TestRng, TestRunner};
    let rng = TestRng::deterministic_rng(RngAlgorithm::ChaCha);
    let mut runner = TestRunner::new_with_rng(ProptestConfig::default(), rng);
    let strategy = rebalance_case();
    let (mut balanced, mut minimal, mut reachable, mut missed) = (0, 0, 0, 0);
    let cases = common::cases(2000);
    for _ in 0..cases {
        let case = strategy.new_tree(&mut runner).expect("case").current();
        let outcome = run_rebalance_case(&case);
        if outcome.balanced && outcome.moves > 0 {
            balanced += 1;
            minimal += usize::from(Some(outcome.moves) == outcome.fewest);
        }
        if outcome.fewest.is_some_and(|f| f > 0) {
            reachable += 1;
            missed += usize::from(!outcome.balanced);
        }
    }
    eprintln!(
        "rebalance over {cases} cases: {minimal} of {balanced} balancing plans exactly minimal, \
         {missed} of {reachable} reachable balances missed"
    );
    assert!(
        minimal * 100 >= balanced * 99,
        "{minimal} of {balanced} minimal"
    );
    assert!(missed * 100 <= reachable, "{missed} of {reachable} missed");
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: common::cases(128),
        failure_persistence: Some(Box::new(FileFailurePersistence::WithSource("proptest-regressions"))),
        ..ProptestConfig::default()
    })]

    #[test]
    fn rebalance_against_the_exhaustive_fewest_moves(case in rebalance_case()) {
        let outcome = run_rebalance_case(&case);
        if let Some(fewest) = outcome.fewest {
            prop_assert!(
                fewest >= outcome.bound,
                "lower bound {} above the true minimum {fewest}",
                outcome.bound
            );
        }
        if outcome.balanced {
            let fewest = outcome.fewest.unwrap_or(usize::MAX);
            prop_assert!(
                outcome.moves <= 2 * fewest,
                "{} moves where {fewest} suffice",
                outcome.moves
            );
        }
    }

    #[test]
    fn allocation_balance_matches_the_best_packing(
        caps in prop::collection::vec(prop::collection::vec(1u64..=4, 1..=2), 2..=4),
        r in 0usize..4,
        slabs in 1usize..=5,
    ) {
        let nodes = at_most_disks_max(caps.into_iter().map(|c| (0, c)).collect());
        let spec = Small { nodes, nested: false };
        let t = build(&spec);
        let r = resiliency(r);
        let (most, best_fullest) = best_packing(&t, r.width(), slabs);
        let mut greedy = t.clone();
        let mut placed = 0;
        while placed < slabs {
            match allocate_slab(&greedy, r, None) {
                Ok(layout) => greedy.commit(&layout.extents).expect("commit"),
                Err(_) => break,
            }
            placed += 1;
        }
        prop_assert_eq!(placed, most, "greedy placed fewer slabs than fit");
        let disks = check::all_disks(&greedy);
        let fills: Vec<(f64, u64)> = disks
            .iter()
            .filter_map(|l| greedy.disk(l.disk))
            .map(|d| (d.used_extents() as f64 / d.capacity_extents() as f64, d.capacity_extents()))
            .collect();
        let fullest = fills.iter().map(|f| f.0).fold(0.0, f64::max);
        let smallest = fills.iter().map(|f| f.1).min().unwrap_or(1);
        prop_assert!(
            fullest <= best_fullest + 1.0 / smallest as f64 + 1e-9,
            "greedy fullest {fullest:.3} vs best {best_fullest:.3}"
        );
    }
}

/// Keep the search space small: at most `DISKS_MAX` disks (and at least
/// one per node).
fn at_most_disks_max(mut nodes: Vec<(u8, Vec<u64>)>) -> Vec<(u8, Vec<u64>)> {
    let mut disks = 0;
    for (_, caps) in &mut nodes {
        caps.truncate(DISKS_MAX.saturating_sub(disks).max(1));
        disks += caps.len();
    }
    nodes
}
