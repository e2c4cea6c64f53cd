//! Deterministic pools shared by the integration tests and the benches
//! (which include this file with `#[path]`).
#![allow(dead_code)]

use placement::{
    DiskId, DiskSpec, FaultDomain, NodeId, NodeState, Resiliency, Slab, SlabId, Topology,
    allocate_slab,
};

/// Extent size of the test pools (the small one the tests use).
pub const EXTENT_BYTES: u64 = 4 << 20;

/// Relative disk sizes of node `n`: 4 to 8 disks of 2 to 5 units, so that
/// nodes differ by 2× (14 to 28 units) and disks by 2.5×, while the two nodes
/// of a chassis (`n` and `n + 8`) complement each other: every chassis holds
/// 12–13 % and every rack 24–26 % of a 16-node pool (under the 1/6 and 1/3
/// that parity-4+2 and mirror-3 need to balance, even after losing a node).
pub fn disk_units(n: u32) -> Vec<u64> {
    let base = 4 + ((n % 8) * 3) % 5;
    let count = if n < 8 { base } else { 12 - base };
    (0..count).map(|d| 2 + u64::from((n + 3 * d) % 4)).collect()
}

/// `site1/rack{n % 4}/chassis{(n / 4) % 2}/node{n}`: 4 racks of 2 chassis.
pub fn path(n: u32) -> String {
    format!("site1/rack{}/chassis{}/node{n}", n % 4, (n / 4) % 2)
}

/// Add node `n` of the heterogeneous layout, with disks of `units * scale`
/// extents.
pub fn add_node(t: &mut Topology, n: u32, scale: u64) {
    let id = NodeId(n);
    let domain = FaultDomain::parse(&path(n)).expect("valid path");
    t.add_node(id, domain, NodeState::Up).expect("node fits");
    for (d, units) in disk_units(n).into_iter().enumerate() {
        let disk = DiskId(u128::from(n) * 1000 + d as u128);
        t.add_disk(id, DiskSpec::empty(disk, units * scale))
            .expect("disk fits");
    }
}

/// Nodes `0..nodes` of the heterogeneous layout.
pub fn heterogeneous(nodes: u32, scale: u64) -> Topology {
    let mut t = Topology::new(EXTENT_BYTES).expect("extent size");
    for n in 0..nodes {
        add_node(&mut t, n, scale);
    }
    t
}

/// Allocate and commit `count` slabs of `resiliency`, ids from `first_id`.
pub fn fill(t: &mut Topology, resiliency: Resiliency, count: u64, first_id: u64) -> Vec<Slab> {
    (0..count)
        .map(|i| {
            let layout = allocate_slab(t, resiliency, None).expect("pool has room");
            t.commit(&layout.extents).expect("commit");
            Slab {
                id: SlabId(first_id + i),
                resiliency,
                extents: layout.extents,
            }
        })
        .collect()
}
