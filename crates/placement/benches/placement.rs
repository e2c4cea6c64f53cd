//! The targets, each under 1 s on the project's 2-core machine:
//! allocating 1,000,000 slabs in a 16-node pool, planning the rebuild of a
//! lost node of a 16-node pool holding 1,000,000 slabs, and planning the
//! rebalance after adding a node to it.

use std::hint::black_box;
use std::time::Duration;

use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use placement::{
    NodeId, NodeState, RebalanceOptions, Resiliency, Topology, allocate_slab, plan_rebalance,
    plan_rebuild,
};

#[path = "../tests/common/pools.rs"]
mod pools;

const SLABS: u64 = 1_000_000;
/// Disk unit in extents: the 16-node pool holds 6.7 M extents, so
/// 1 M mirror-3 slabs fill it to 45 % and 1 M parity-4+2 slabs to 89 %.
const SCALE: u64 = 20_000;

fn parity_4_2() -> Resiliency {
    Resiliency::parity(4, 2).expect("valid")
}

fn allocate(c: &mut Criterion) {
    let mut group = c.benchmark_group("allocate");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(10));
    let empty = pools::heterogeneous(16, SCALE);
    for (name, resiliency) in [
        ("mirror-3", Resiliency::MIRROR_3),
        ("parity-4+2", parity_4_2()),
    ] {
        group.bench_function(format!("1M slabs {name} in 16 nodes"), |b| {
            b.iter_batched(
                || empty.clone(),
                |mut pool: Topology| {
                    for _ in 0..SLABS {
                        let layout = allocate_slab(&pool, resiliency, None).expect("room");
                        pool.commit(&layout.extents).expect("commit");
                    }
                    pool
                },
                BatchSize::PerIteration,
            );
        });
    }
    group.finish();
}

fn rebuild(c: &mut Criterion) {
    let mut group = c.benchmark_group("rebuild");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(10));
    for (name, resiliency) in [
        ("mirror-3", Resiliency::MIRROR_3),
        ("parity-4+2", parity_4_2()),
    ] {
        let mut pool = pools::heterogeneous(16, SCALE);
        let slabs = pools::fill(&mut pool, resiliency, SLABS, 0);
        pool.set_node_state(NodeId(5), NodeState::Down)
            .expect("node 5");
        group.bench_function(format!("lose 1 of 16 nodes, 1M slabs {name}"), |b| {
            b.iter(|| plan_rebuild(black_box(&pool), black_box(&slabs)).expect("plan"));
        });
    }
    group.finish();
}

fn rebalance(c: &mut Criterion) {
    let mut group = c.benchmark_group("rebalance");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(10));
    let mut pool = pools::heterogeneous(15, SCALE);
    let slabs = pools::fill(&mut pool, Resiliency::MIRROR_3, SLABS, 0);
    pools::add_node(&mut pool, 15, SCALE);
    let options = RebalanceOptions::default();
    group.bench_function("add 16th node, 1M slabs mirror-3", |b| {
        b.iter(|| plan_rebalance(black_box(&pool), black_box(&slabs), options).expect("plan"));
    });
    group.finish();
}

criterion_group!(benches, allocate, rebuild, rebalance);
criterion_main!(benches);
