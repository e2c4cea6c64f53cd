//! Existing slabs, as the planners receive them, and their resolved form.
//!
//! Job: validate the caller's slabs against the topology once, and turn every
//! extent location into compact topology indices that the rebuild and
//! rebalance planners read and update millions of times.
//!
//! Invariants of a resolved [`SlabTable`]: every slab has exactly
//! `resiliency.width()` extents, every extent names a disk that exists on the
//! node it claims, and no two extents of one slab share a node (placement
//! never creates such a slab; one given to it is refused as corrupt).

use crate::error::PlacementError;
use crate::resiliency::Resiliency;
use crate::select::{Mask, bit};
use crate::topology::{ExtentLocation, SlabId, Topology};

/// The most slabs one plan takes (one pool's slabs; 2^32 - 1 slabs of even
/// 4 MiB extents are 16 PiB).
pub const SLABS_MAX: usize = u32::MAX as usize;

/// A slab that exists: its resiliency and where each extent (shard `i` at
/// index `i`) lives now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Slab {
    pub id: SlabId,
    pub resiliency: Resiliency,
    pub extents: Vec<ExtentLocation>,
}

/// An extent's node and disk, as indices into the topology.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Loc {
    pub node: u8,
    pub disk: u16,
}

impl Loc {
    pub(crate) fn node(self) -> usize {
        self.node as usize
    }

    pub(crate) fn disk(self) -> usize {
        self.disk as usize
    }
}

/// Every slab's extents as topology indices, in one flat array.
pub(crate) struct SlabTable {
    /// `starts[i]..starts[i + 1]` are slab `i`'s extents in `locs`.
    starts: Vec<usize>,
    locs: Vec<Loc>,
}

impl SlabTable {
    pub(crate) fn resolve(topology: &Topology, slabs: &[Slab]) -> Result<Self, PlacementError> {
        // Planners index slabs with a u32.
        if let Some(slab) = slabs.get(SLABS_MAX) {
            return Err(PlacementError::InvalidSlab {
                slab: slab.id,
                reason: format!("a plan takes at most {SLABS_MAX} slabs"),
            });
        }
        let total: usize = slabs.iter().map(|s| s.extents.len()).sum();
        let mut starts = Vec::with_capacity(slabs.len() + 1);
        let mut locs = Vec::with_capacity(total);
        for slab in slabs {
            starts.push(locs.len());
            if slab.extents.len() != slab.resiliency.width() {
                return Err(PlacementError::InvalidSlab {
                    slab: slab.id,
                    reason: format!(
                        "{} has {} extents, not {}",
                        slab.resiliency,
                        slab.extents.len(),
                        slab.resiliency.width()
                    ),
                });
            }
            let mut nodes: Mask = 0;
            for &location in &slab.extents {
                let (ni, di) =
                    topology
                        .locate(location)
                        .map_err(|e| PlacementError::InvalidSlab {
                            slab: slab.id,
                            reason: e.to_string(),
                        })?;
                if nodes & bit(ni as u8) != 0 {
                    return Err(PlacementError::InvalidSlab {
                        slab: slab.id,
                        reason: format!("two extents on node {}", location.node),
                    });
                }
                nodes |= bit(ni as u8);
                locs.push(Loc {
                    node: ni as u8,
                    disk: di as u16,
                });
            }
        }
        starts.push(locs.len());
        Ok(Self { starts, locs })
    }

    pub(crate) fn extents(&self, slab: usize) -> &[Loc] {
        &self.locs[self.starts[slab]..self.starts[slab + 1]]
    }

    pub(crate) fn set(&mut self, slab: usize, shard: usize, loc: Loc) {
        self.locs[self.starts[slab] + shard] = loc;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::flat_pool;
    use crate::topology::{DiskId, NodeId};

    #[test]
    fn corrupt_slabs_are_refused_with_the_slab_id() {
        let t = flat_pool(1 << 20, 3, 2, 10);
        let at = |node: u32, disk: u128| ExtentLocation {
            node: NodeId(node),
            disk: DiskId(disk),
        };
        let slab = |extents: Vec<ExtentLocation>| Slab {
            id: SlabId(7),
            resiliency: Resiliency::MIRROR_2,
            extents,
        };
        let good = slab(vec![at(0, 0), at(1, 100)]);
        let table = SlabTable::resolve(&t, std::slice::from_ref(&good)).expect("valid");
        assert_eq!(table.extents(0).len(), 2);
        for (bad, why) in [
            (slab(vec![at(0, 0)]), "has 1 extents"),
            (slab(vec![at(0, 0), at(0, 1)]), "two extents on node 0"),
            (slab(vec![at(0, 0), at(1, 999)]), "not in the topology"),
            (
                slab(vec![at(0, 0), at(2, 100)]),
                "is on node 1, not on node 2",
            ),
        ] {
            let err = SlabTable::resolve(&t, &[good.clone(), bad])
                .err()
                .expect("refused");
            assert_eq!(err.code(), "S2D:Placement:InvalidSlab");
            let text = err.to_string();
            assert!(text.starts_with("slab 7: ") && text.contains(why), "{text}");
        }
    }
}
