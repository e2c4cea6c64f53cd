//! Fixtures for the unit tests (compiled for tests only).

use crate::allocate::allocate_slab;
use crate::resiliency::Resiliency;
use crate::slab::Slab;
use crate::topology::{DiskId, DiskSpec, FaultDomain, NodeId, NodeState, SlabId, Topology};

/// Add up node `n` at fault-domain `path`, with one empty healthy disk per
/// capacity (disk ids `n * 100 + i`).
pub(crate) fn add_node(t: &mut Topology, n: u32, path: &str, capacities: &[u64]) {
    let id = NodeId(n);
    let domain = FaultDomain::parse(path).expect("valid path");
    t.add_node(id, domain, NodeState::Up).expect("node");
    for (i, &capacity) in capacities.iter().enumerate() {
        let disk = DiskId(u128::from(n) * 100 + i as u128);
        t.add_disk(id, DiskSpec::empty(disk, capacity))
            .expect("disk");
    }
}

/// Nodes `n0..` (flat: each its own domain), each with `disks` disks of
/// `capacity` extents.
pub(crate) fn flat_pool(extent_size: u64, nodes: u32, disks: usize, capacity: u64) -> Topology {
    let mut t = Topology::new(extent_size).expect("extent size");
    for n in 0..nodes {
        add_node(&mut t, n, &format!("n{n}"), &vec![capacity; disks]);
    }
    t
}

/// Allocate and commit `count` slabs of `resiliency`, ids from 0.
pub(crate) fn fill(t: &mut Topology, resiliency: Resiliency, count: u64) -> Vec<Slab> {
    (0..count)
        .map(|i| {
            let layout = allocate_slab(t, resiliency, None).expect("fits");
            t.commit(&layout.extents).expect("commit");
            Slab {
                id: SlabId(i),
                resiliency,
                extents: layout.extents,
            }
        })
        .collect()
}
