//! Random topologies (1–16 nodes, 1–8 disks each, mixed sizes, nested fault
//! domains) driven through random sequences of allocations, failures,
//! additions, drains, rebuilds and rebalances. After every step the
//! simulation checks every guarantee the crate documents (see
//! `common/sim.rs`): fault domains distinct at the widest level possible,
//! no disk over capacity, plans that restore full redundancy whenever the
//! topology allows, moves that never lower redundancy, determinism.

mod common;

use common::check;
use common::sim::Sim;
use placement::{
    DiskId, DiskSpec, DiskState, FaultDomain, NODES_MAX, NodeId, NodeState, RebalanceOptions,
    Resiliency, Topology,
};
use proptest::prelude::*;
use proptest::test_runner::FileFailurePersistence;

fn resiliencies() -> Vec<Resiliency> {
    [
        "simple",
        "mirror-2",
        "mirror-3",
        "parity-2+1",
        "parity-3+2",
        "parity-4+2",
    ]
    .iter()
    .map(|s| s.parse().expect("valid"))
    .collect()
}

#[derive(Debug, Clone)]
struct NodeSpec {
    /// Depth of the path (1 = node only … 4 = site/rack/chassis/node) and
    /// the indices of its site, rack and chassis names.
    depth: usize,
    names: [u8; 3],
    disks: Vec<u64>,
}

fn node_spec() -> impl Strategy<Value = NodeSpec> {
    (
        1usize..=4,
        (0u8..2, 0u8..4, 0u8..2),
        prop::collection::vec(prop_oneof![1u64..=4, 5u64..=12, 13u64..=40], 1..=8),
    )
        .prop_map(|(depth, (s, r, c), disks)| NodeSpec {
            depth,
            names: [s, r, c],
            disks,
        })
}

#[derive(Debug, Clone)]
enum Op {
    Allocate {
        resiliency: usize,
        prefer: Option<usize>,
        count: u8,
    },
    FailDisk(usize),
    FailingDisk(usize),
    RetireDisk(usize),
    NodeState(usize, NodeState),
    AddNode(NodeSpec),
    /// Retire a node and rebalance it away (a drain).
    Drain(usize),
    Rebuild,
    Rebalance(u32),
}

fn op() -> impl Strategy<Value = Op> {
    let state = prop_oneof![
        Just(NodeState::Up),
        Just(NodeState::Down),
        Just(NodeState::Maintenance),
        Just(NodeState::Retired),
    ];
    prop_oneof![
        6 => (0usize..6, prop::option::of(0usize..16), 1u8..=20).prop_map(|(r, p, c)| Op::Allocate {
            resiliency: r,
            prefer: p,
            count: c
        }),
        1 => any::<usize>().prop_map(Op::FailDisk),
        1 => any::<usize>().prop_map(Op::FailingDisk),
        1 => any::<usize>().prop_map(Op::RetireDisk),
        2 => (any::<usize>(), state).prop_map(|(n, s)| Op::NodeState(n, s)),
        1 => node_spec().prop_map(Op::AddNode),
        1 => any::<usize>().prop_map(Op::Drain),
        2 => Just(Op::Rebuild),
        2 => prop_oneof![Just(0u32), Just(500u32), Just(2000u32)].prop_map(Op::Rebalance),
    ]
}

struct World {
    sim: Sim,
    next_node: u32,
    next_disk: u128,
}

impl World {
    fn new(nodes: &[NodeSpec]) -> Self {
        let mut world = Self {
            sim: Sim::new(Topology::new(1 << 20).expect("extent size")),
            next_node: 0,
            next_disk: 0,
        };
        for spec in nodes {
            world.add_node(spec);
        }
        world
    }

    fn add_node(&mut self, spec: &NodeSpec) {
        let t = &mut self.sim.topology;
        let id = NodeId(self.next_node);
        self.next_node += 1;
        let [s, r, c] = spec.names;
        let parts = [
            format!("s{s}"),
            format!("r{r}"),
            format!("c{c}"),
            format!("n{}", id.0),
        ];
        let path = parts[4 - spec.depth..].join("/");
        let domain = FaultDomain::parse(&path).expect("valid path");
        if t.node_count() >= NODES_MAX {
            let err = t
                .add_node(id, domain, NodeState::Up)
                .expect_err("17th node");
            assert_eq!(err.code(), "S2D:Placement:TooManyNodes");
            return;
        }
        t.add_node(id, domain, NodeState::Up)
            .expect("room for a node");
        for &capacity in &spec.disks {
            let disk = DiskId(self.next_disk);
            self.next_disk += 1;
            t.add_disk(id, DiskSpec::empty(disk, capacity))
                .expect("disk");
        }
    }

    fn node_at(&self, pick: usize) -> Option<NodeId> {
        let nodes = self.sim.topology.nodes();
        (!nodes.is_empty()).then(|| nodes[pick % nodes.len()].id())
    }

    fn run(&mut self, op: &Op) {
        let resiliencies = resiliencies();
        match op {
            Op::Allocate {
                resiliency,
                prefer,
                count,
            } => {
                let r = resiliencies[resiliency % resiliencies.len()];
                let prefer = prefer.and_then(|p| self.node_at(p));
                for _ in 0..*count {
                    if !self.sim.allocate(r, prefer) {
                        break;
                    }
                }
            }
            Op::FailDisk(pick) => self.sim.disk_state(*pick, DiskState::Failed),
            Op::FailingDisk(pick) => self.sim.disk_state(*pick, DiskState::Failing),
            Op::RetireDisk(pick) => self.sim.disk_state(*pick, DiskState::Retired),
            Op::NodeState(pick, state) => {
                if let Some(id) = self.node_at(*pick) {
                    self.sim.topology.set_node_state(id, *state).expect("node");
                }
            }
            Op::AddNode(spec) => {
                self.add_node(spec);
                self.sim.rebalance(RebalanceOptions::default());
            }
            Op::Drain(pick) => {
                if let Some(id) = self.node_at(*pick) {
                    self.sim
                        .topology
                        .set_node_state(id, NodeState::Retired)
                        .expect("node");
                    let plan = self.sim.rebalance(RebalanceOptions::default());
                    if plan.balanced && plan.skipped.is_empty() {
                        let left = self
                            .sim
                            .slabs
                            .iter()
                            .flat_map(|s| &s.extents)
                            .filter(|e| e.node == id)
                            .count();
                        assert_eq!(left, 0, "drained node still holds extents");
                    }
                }
            }
            Op::Rebuild => {
                self.sim.rebuild();
            }
            Op::Rebalance(tolerance_bp) => {
                self.sim.rebalance(RebalanceOptions {
                    tolerance_bp: *tolerance_bp,
                });
            }
        }
        self.sim.check_accounting();
    }
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: common::cases(256),
        failure_persistence: Some(Box::new(FileFailurePersistence::WithSource("proptest-regressions"))),
        max_shrink_iters: 2000,
        ..ProptestConfig::default()
    })]

    #[test]
    fn random_sequences_keep_every_invariant(
        nodes in prop::collection::vec(node_spec(), 1..=16),
        ops in prop::collection::vec(op(), 1..40),
    ) {
        let mut world = World::new(&nodes);
        for op in &ops {
            world.run(op);
        }
    }

    /// With every node up and healthy, filling the pool up to refusal keeps
    /// slabs at the widest level and the pool accounting exact; a rebuild
    /// after losing one node then restores full redundancy whenever enough
    /// nodes with room remain.
    #[test]
    fn fill_then_lose_a_node(
        nodes in prop::collection::vec(node_spec(), 3..=16),
        resiliency in 0usize..6,
        lose in any::<usize>(),
    ) {
        let mut world = World::new(&nodes);
        let r = resiliencies()[resiliency];
        let mut placed = 0;
        while placed < 400 && world.sim.allocate(r, None) {
            placed += 1;
        }
        if let Some(id) = world.node_at(lose) {
            world.sim.topology.set_node_state(id, NodeState::Down).expect("node");
            let plan = world.sim.rebuild();
            prop_assert!(plan.waiting.is_empty());
            let on_lost_node = world
                .sim
                .slabs
                .iter()
                .filter(|s| plan.lost.contains(&s.id))
                .all(|s| s.extents.iter().any(|e| e.node == id));
            prop_assert!(on_lost_node);
            if r.failures_tolerated() >= 1 {
                prop_assert!(plan.lost.is_empty(), "one lost node loses no data");
            }
            if check::nodes_with_space(&world.sim.topology).len() > r.width() + 1 {
                // Plenty of nodes with room: room for every extent? Not
                // necessarily (disks can be tiny), but never for none.
                prop_assert!(plan.tasks.len() + plan.unplaced.len() + plan.lost.len() > 0 || placed == 0
                    || world.sim.slabs.iter().all(|s| s.extents.iter().all(|e| e.node != id)));
            }
        }
    }
}
