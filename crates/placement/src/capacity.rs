//! Capacity: how much volume data the pool can hold per resiliency, keeping
//! a reserve to rebuild after losing its largest node.
//!
//! Job: the numbers `pool status` shows.
//!
//! Model: only healthy disks on up nodes count. The reserve is the
//! allocatable capacity of the largest node, held back in proportion to each
//! node's capacity (when the pool has more nodes than the resiliency needs
//! fault domains; with exactly as many, a lost node could not be rebuilt
//! anyway and nothing is held back). A slab needs `width` extents on `width`
//! distinct nodes, so the number of slabs that fit in per-node room `a[n]` is
//! the largest `s` with `sum(min(a[n], s)) >= width * s`; that is exact, and
//! the allocator reaches it (see [`crate::allocate`]).
//!
//! Best effort: the bound is computed at the node level. When the allocator
//! separates slabs at a wider level (racks), racks of unequal size can make
//! it fall back to node-level separation before the pool is full; the number
//! here counts those slabs too. The allocator itself does not enforce the
//! reserve: the daemon decides what to promise (thin provisioning).

use crate::resiliency::Resiliency;
use crate::select::slabs_max;
use crate::topology::Topology;

/// Capacity of the pool for one resiliency, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capacity {
    pub resiliency: Resiliency,
    /// Capacity of the healthy disks of up nodes.
    pub raw_bytes: u64,
    /// Free space on those disks.
    pub raw_free_bytes: u64,
    /// Raw space held back to rebuild the largest node.
    pub reserve_bytes: u64,
    /// Volume data the pool holds when every slab has this resiliency,
    /// keeping the reserve.
    pub usable_bytes: u64,
    /// Volume data that still fits now, keeping the reserve.
    pub usable_free_bytes: u64,
}

/// Usable capacity of the pool for `resiliency`.
pub fn capacity(topology: &Topology, resiliency: Resiliency) -> Capacity {
    let width = resiliency.width();
    let nodes: Vec<(u64, u64)> = topology
        .nodes()
        .iter()
        .map(|n| {
            (
                n.allocatable_capacity_extents(),
                n.allocatable_free_extents(),
            )
        })
        .filter(|&(cap, _)| cap > 0)
        .collect();
    let raw: u64 = nodes.iter().map(|&(cap, _)| cap).sum();
    let raw_free: u64 = nodes.iter().map(|&(_, free)| free).sum();
    let reserve = if nodes.len() > width {
        nodes.iter().map(|&(cap, _)| cap).max().unwrap_or(0)
    } else {
        0
    };
    let share = |cap: u64| -> u64 {
        // ceil(reserve * cap / raw); raw > 0 whenever a node is listed.
        (reserve as u128 * cap as u128).div_ceil(raw.max(1) as u128) as u64
    };
    let room_total: Vec<u64> = nodes
        .iter()
        .map(|&(cap, _)| cap.saturating_sub(share(cap)))
        .collect();
    let room_free: Vec<u64> = nodes
        .iter()
        .map(|&(cap, free)| free.saturating_sub(share(cap)))
        .collect();
    let size = topology.extent_size_bytes();
    let data_bytes = |slabs: u64| {
        slabs
            .saturating_mul(resiliency.data_extents() as u64)
            .saturating_mul(size)
    };
    Capacity {
        resiliency,
        raw_bytes: raw.saturating_mul(size),
        raw_free_bytes: raw_free.saturating_mul(size),
        reserve_bytes: reserve.saturating_mul(size),
        usable_bytes: data_bytes(slabs_max(&room_total, width)),
        usable_free_bytes: data_bytes(slabs_max(&room_free, width)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(caps: &[u64]) -> Topology {
        let mut t = Topology::new(1 << 30).expect("topology");
        for (i, &cap) in caps.iter().enumerate() {
            crate::testing::add_node(&mut t, i as u32, &format!("n{i}"), &[cap]);
        }
        t
    }

    #[test]
    fn four_equal_nodes() {
        let t = pool(&[100, 100, 100, 100]);
        let gib = 1u64 << 30;
        let c = capacity(&t, Resiliency::MIRROR_3);
        assert_eq!(c.raw_bytes, 400 * gib);
        assert_eq!(c.reserve_bytes, 100 * gib);
        // 300 extents of room over 4 nodes, 3 per slab: 100 slabs of 1 GiB.
        assert_eq!(c.usable_bytes, 100 * gib);
        assert_eq!(c.usable_free_bytes, 100 * gib);
        let c = capacity(&t, Resiliency::parity(2, 1).expect("r"));
        assert_eq!(c.usable_bytes, 200 * gib);
        // parity-2+2 needs all four nodes: no reserve is useful.
        let c = capacity(&t, Resiliency::parity(2, 2).expect("r"));
        assert_eq!(c.reserve_bytes, 0);
        assert_eq!(c.usable_bytes, 200 * gib);
    }

    #[test]
    fn a_dominant_node_cannot_be_filled() {
        // mirror-2 over 1000 + 10 + 10: at most 20 slabs (each needs a second
        // node), whatever the raw total.
        let t = pool(&[1000, 10, 10]);
        let c = capacity(&t, Resiliency::MIRROR_2);
        assert!(c.usable_bytes <= 20 * (1 << 30));
        let none = capacity(&pool(&[]), Resiliency::MIRROR_2);
        assert_eq!((none.raw_bytes, none.usable_bytes), (0, 0));
    }
}
