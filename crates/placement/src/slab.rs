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
