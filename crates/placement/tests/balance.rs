//! The balance and spread targets on a heterogeneous 16-node pool
//! (4 racks × 2 chassis, 4–8 disks per node, disks of 2 to 5 units):
//!
//! - filled to 90 % with mirror-3 and with parity-4+2 slabs, every disk's
//!   fill is within 5 % of the mean;
//! - after losing one node of 16, no node reads or writes more than 2× the
//!   average share of the rebuild;
//! - adding a node or draining one rebalances in the fewest moves and ends
//!   within the tolerance.
//!
//! Every step runs through the checking simulation (`common/sim.rs`).

mod common;

use common::check::{self, Standing};
use common::pools;
use common::sim::Sim;
use placement::{DomainLevel, NodeId, NodeState, RebalanceOptions, Resiliency, Topology, capacity};

/// Disk unit in extents: disks of 80 to 200 extents, 13,440 in the pool.
const SCALE: u64 = 40;

fn parity_4_2() -> Resiliency {
    Resiliency::parity(4, 2).expect("valid")
}

fn raw_fill(t: &Topology) -> f64 {
    let (used, cap) = check::all_disks(t)
        .iter()
        .filter_map(|l| t.disk(l.disk))
        .fold((0, 0), |(u, c), d| {
            (u + d.used_extents(), c + d.capacity_extents())
        });
    used as f64 / cap as f64
}

/// Allocate slabs of the given resiliencies in turn until the pool's raw
/// fill reaches `fill`.
fn fill_to(sim: &mut Sim, resiliencies: &[Resiliency], fill: f64) {
    let mut turn = 0;
    while raw_fill(&sim.topology) < fill {
        let r = resiliencies[turn % resiliencies.len()];
        assert!(
            sim.allocate(r, None),
            "pool refused {r} at {:.3}",
            raw_fill(&sim.topology)
        );
        turn += 1;
    }
    sim.check_accounting();
}

fn assert_balanced(sim: &Sim, limit: f64) {
    let worst = check::worst_relative_deviation(&sim.topology);
    assert!(
        worst <= limit,
        "a disk is {:.2} % away from the mean fill",
        worst * 100.0
    );
}

fn balance_at_90(resiliencies: &[Resiliency]) {
    let mut sim = Sim::new(pools::heterogeneous(16, SCALE));
    fill_to(&mut sim, resiliencies, 0.90);
    assert_balanced(&sim, 0.05);
    // The pool never had to give up the widest level on the way: 4 racks
    // for mirror-3, 8 chassis for parity-4+2.
    for slab in &sim.slabs {
        let nodes = check::nodes_of(&slab.extents);
        let level = if slab.resiliency == Resiliency::MIRROR_3 {
            DomainLevel::Rack
        } else {
            DomainLevel::Chassis
        };
        assert!(
            check::distinct_at(&sim.topology, &nodes, level),
            "slab {:?}",
            slab.id
        );
    }
}

#[test]
fn mirror_3_to_90_percent_every_disk_within_5_percent_of_mean() {
    balance_at_90(&[Resiliency::MIRROR_3]);
}

#[test]
fn parity_4_2_to_90_percent_every_disk_within_5_percent_of_mean() {
    balance_at_90(&[parity_4_2()]);
}

#[test]
fn mixed_mirror_3_and_parity_4_2_to_90_percent() {
    balance_at_90(&[Resiliency::MIRROR_3, parity_4_2()]);
}

fn rebuild_spread(resiliency: Resiliency) {
    let mut sim = Sim::new(pools::heterogeneous(16, SCALE));
    fill_to(&mut sim, &[resiliency], 0.60);
    let lost = NodeId(5);
    sim.topology
        .set_node_state(lost, NodeState::Down)
        .expect("node 5");
    let plan = sim.rebuild();
    assert!(plan.is_complete(), "{:?}", plan.unplaced);
    let survivors = 15u64;
    let reads: Vec<u64> = plan.traffic.values().map(|t| t.read_bytes).collect();
    let writes: Vec<u64> = plan.traffic.values().map(|t| t.write_bytes).collect();
    let (read_total, write_total) = (plan.read_bytes(), plan.write_bytes());
    assert!(read_total > 0 && write_total > 0);
    assert!(
        !plan.traffic.contains_key(&lost),
        "the lost node does nothing"
    );
    assert_eq!(plan.traffic.len(), 15, "every survivor takes part");
    let read_max = reads.iter().copied().max().unwrap_or(0);
    let write_max = writes.iter().copied().max().unwrap_or(0);
    assert!(
        read_max * survivors <= 2 * read_total,
        "a node reads {:.2}× the average share",
        (read_max * survivors) as f64 / read_total as f64
    );
    assert!(
        write_max * survivors <= 2 * write_total,
        "a node writes {:.2}× the average share",
        (write_max * survivors) as f64 / write_total as f64
    );
    // The survivors stay balanced after the rebuild.
    assert_balanced(&sim, 0.05);
    for slab in &sim.slabs {
        assert!(slab.extents.iter().all(|e| e.node != lost));
    }
}

#[test]
fn rebuild_after_losing_1_of_16_nodes_is_spread_mirror_3() {
    rebuild_spread(Resiliency::MIRROR_3);
}

#[test]
fn rebuild_after_losing_1_of_16_nodes_is_spread_parity_4_2() {
    rebuild_spread(parity_4_2());
}

#[test]
fn adding_a_node_rebalances_in_the_fewest_moves() {
    let mut sim = Sim::new(pools::heterogeneous(15, SCALE));
    fill_to(&mut sim, &[Resiliency::MIRROR_3, parity_4_2()], 0.80);
    pools::add_node(&mut sim.topology, 15, SCALE);
    let plan = sim.rebalance(RebalanceOptions::default());
    assert!(plan.balanced);
    assert_eq!(plan.moves.len() as u64, plan.moves_lower_bound);
    assert!(plan.moves.iter().all(|m| m.to.node == NodeId(15)));
    assert_balanced(&sim, 0.05);
    // A second plan has nothing to do.
    let again = sim.rebalance(RebalanceOptions::default());
    assert!(again.moves.is_empty() && again.balanced);
}

#[test]
fn draining_a_node_empties_it_and_keeps_balance() {
    let mut sim = Sim::new(pools::heterogeneous(16, SCALE));
    fill_to(&mut sim, &[Resiliency::MIRROR_3, parity_4_2()], 0.60);
    let drained = NodeId(6);
    sim.topology
        .set_node_state(drained, NodeState::Retired)
        .expect("node 6");
    let plan = sim.rebalance(RebalanceOptions::default());
    assert!(plan.balanced);
    assert_eq!(plan.moves.len() as u64, plan.moves_lower_bound);
    for slab in &sim.slabs {
        for &e in &slab.extents {
            assert_ne!(e.node, drained);
            assert_eq!(check::standing(&sim.topology, e), Standing::Good);
        }
    }
    assert_balanced(&sim, 0.05);
    sim.topology
        .remove_node(drained)
        .expect("empty node removed");
}

#[test]
fn capacity_is_what_the_allocator_can_place() {
    // No reserve kept by the allocator: fill a flat pool with mirror-2 until
    // it refuses, and compare with the capacity computed up front.
    let mut t = Topology::new(pools::EXTENT_BYTES).expect("extent size");
    for n in 0..5 {
        pools::add_node(&mut t, n, 3);
    }
    for n in 0..5 {
        let flat = placement::FaultDomain::parse(&format!("node{n}")).expect("path");
        t.set_fault_domain(NodeId(n), flat).expect("node");
    }
    let before = capacity(&t, Resiliency::MIRROR_2);
    let mut sim = Sim::new(t);
    let mut placed = 0u64;
    while sim.allocate(Resiliency::MIRROR_2, None) {
        placed += 1;
    }
    let raw = before.raw_bytes / pools::EXTENT_BYTES;
    assert_eq!(placed, raw / 2, "every extent used");
    assert!(before.usable_bytes <= placed * pools::EXTENT_BYTES);
    assert!(before.reserve_bytes > 0);
    let after = capacity(&sim.topology, Resiliency::MIRROR_2);
    assert!(
        after.raw_free_bytes <= pools::EXTENT_BYTES,
        "at most one odd extent left"
    );
    assert_eq!(after.usable_free_bytes, 0);
}
