//! Errors of the placement crate: one enum, a clear message per refusal and a
//! stable code per variant.
//!
//! Invariant: every variant has exactly one code in [`PlacementError::CODES`],
//! and a code never changes meaning once released (`s2dctl` maps codes to exit
//! statuses, operators search logs for them). A test fails when the list and
//! the enum drift apart.

use crate::resiliency::Resiliency;
use crate::topology::{DISKS_PER_NODE_MAX, DiskId, NODES_MAX, NodeId, SlabId};

/// Why placement refused a request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PlacementError {
    /// A cluster holds at most [`NODES_MAX`] nodes.
    #[error(
        "cluster already has {max} nodes, the most a cluster may have: node {node} is refused",
        max = NODES_MAX
    )]
    TooManyNodes { node: NodeId },

    /// A node holds at most [`DISKS_PER_NODE_MAX`] disks.
    #[error(
        "node {node} already has {max} disks, the most a node may have: disk {disk} is refused",
        max = DISKS_PER_NODE_MAX
    )]
    TooManyDisks { node: NodeId, disk: DiskId },

    #[error("node {0} is already in the topology")]
    DuplicateNode(NodeId),

    #[error("disk {0} is already in the topology")]
    DuplicateDisk(DiskId),

    #[error("node {0} is not in the topology")]
    UnknownNode(NodeId),

    #[error("disk {0} is not in the topology")]
    UnknownDisk(DiskId),

    #[error("disk {disk} is on node {actual}, not on node {claimed}")]
    WrongNode {
        disk: DiskId,
        claimed: NodeId,
        actual: NodeId,
    },

    #[error("invalid fault domain {path:?}: {reason}")]
    InvalidFaultDomain { path: String, reason: &'static str },

    #[error("invalid resiliency {input:?}: {reason}")]
    InvalidResiliency { input: String, reason: String },

    #[error("invalid disk {disk}: {reason}")]
    InvalidDisk { disk: DiskId, reason: String },

    #[error("invalid extent size: must be at least 1 byte")]
    InvalidExtentSize,

    #[error("invalid rebalance tolerance {tolerance_bp} bp: must be at most 10000 (100 %)")]
    InvalidTolerance { tolerance_bp: u32 },

    /// Fewer usable fault domains (up nodes with a healthy disk) than the
    /// resiliency needs, whatever the free space.
    #[error(
        "{resiliency} needs {needed} fault domains, {}",
        count_phrase(*available, "is up", "are up")
    )]
    NotEnoughFaultDomains {
        resiliency: Resiliency,
        needed: usize,
        available: usize,
    },

    /// Enough nodes are up, but too few of them have a free extent.
    #[error(
        "pool full: need {} on {}, only {}",
        count_phrase(*extents, "extent", "extents"),
        count_phrase(*nodes, "node", "nodes"),
        count_phrase(*with_space, "node has free space", "nodes have free space")
    )]
    PoolFull {
        extents: usize,
        nodes: usize,
        with_space: usize,
    },

    #[error("disk {disk} has no free extent")]
    DiskFull { disk: DiskId },

    #[error("disk {disk} has no extent in use to release")]
    DiskEmpty { disk: DiskId },

    #[error("slab {slab}: {reason}")]
    InvalidSlab { slab: SlabId, reason: String },
}

fn count_phrase(n: usize, one: &str, many: &str) -> String {
    if n == 1 {
        format!("{n} {one}")
    } else {
        format!("{n} {many}")
    }
}

impl PlacementError {
    /// Every code [`PlacementError::code`] can return, in declaration order.
    pub const CODES: &'static [&'static str] = &[
        "S2D:Placement:TooManyNodes",
        "S2D:Placement:TooManyDisks",
        "S2D:Placement:DuplicateNode",
        "S2D:Placement:DuplicateDisk",
        "S2D:Placement:UnknownNode",
        "S2D:Placement:UnknownDisk",
        "S2D:Placement:WrongNode",
        "S2D:Placement:InvalidFaultDomain",
        "S2D:Placement:InvalidResiliency",
        "S2D:Placement:InvalidDisk",
        "S2D:Placement:InvalidExtentSize",
        "S2D:Placement:InvalidTolerance",
        "S2D:Placement:NotEnoughFaultDomains",
        "S2D:Placement:PoolFull",
        "S2D:Placement:DiskFull",
        "S2D:Placement:DiskEmpty",
        "S2D:Placement:InvalidSlab",
    ];

    /// The stable, operator-facing code of this error, such as
    /// `S2D:Placement:NotEnoughFaultDomains`.
    pub fn code(&self) -> &'static str {
        match self {
            Self::TooManyNodes { .. } => "S2D:Placement:TooManyNodes",
            Self::TooManyDisks { .. } => "S2D:Placement:TooManyDisks",
            Self::DuplicateNode(_) => "S2D:Placement:DuplicateNode",
            Self::DuplicateDisk(_) => "S2D:Placement:DuplicateDisk",
            Self::UnknownNode(_) => "S2D:Placement:UnknownNode",
            Self::UnknownDisk(_) => "S2D:Placement:UnknownDisk",
            Self::WrongNode { .. } => "S2D:Placement:WrongNode",
            Self::InvalidFaultDomain { .. } => "S2D:Placement:InvalidFaultDomain",
            Self::InvalidResiliency { .. } => "S2D:Placement:InvalidResiliency",
            Self::InvalidDisk { .. } => "S2D:Placement:InvalidDisk",
            Self::InvalidExtentSize => "S2D:Placement:InvalidExtentSize",
            Self::InvalidTolerance { .. } => "S2D:Placement:InvalidTolerance",
            Self::NotEnoughFaultDomains { .. } => "S2D:Placement:NotEnoughFaultDomains",
            Self::PoolFull { .. } => "S2D:Placement:PoolFull",
            Self::DiskFull { .. } => "S2D:Placement:DiskFull",
            Self::DiskEmpty { .. } => "S2D:Placement:DiskEmpty",
            Self::InvalidSlab { .. } => "S2D:Placement:InvalidSlab",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    /// One value of every variant; the match in `code` is exhaustive, so a new
    /// variant must get a code, and this list must grow with it.
    fn one_of_each() -> Vec<PlacementError> {
        vec![
            PlacementError::TooManyNodes { node: NodeId(17) },
            PlacementError::TooManyDisks {
                node: NodeId(1),
                disk: DiskId(9),
            },
            PlacementError::DuplicateNode(NodeId(1)),
            PlacementError::DuplicateDisk(DiskId(1)),
            PlacementError::UnknownNode(NodeId(1)),
            PlacementError::UnknownDisk(DiskId(1)),
            PlacementError::WrongNode {
                disk: DiskId(1),
                claimed: NodeId(1),
                actual: NodeId(2),
            },
            PlacementError::InvalidFaultDomain {
                path: String::new(),
                reason: "empty",
            },
            PlacementError::InvalidResiliency {
                input: "x".into(),
                reason: "y".into(),
            },
            PlacementError::InvalidDisk {
                disk: DiskId(1),
                reason: "z".into(),
            },
            PlacementError::InvalidExtentSize,
            PlacementError::InvalidTolerance {
                tolerance_bp: 10_001,
            },
            PlacementError::NotEnoughFaultDomains {
                resiliency: Resiliency::MIRROR_3,
                needed: 3,
                available: 2,
            },
            PlacementError::PoolFull {
                extents: 3,
                nodes: 3,
                with_space: 2,
            },
            PlacementError::DiskFull { disk: DiskId(1) },
            PlacementError::DiskEmpty { disk: DiskId(1) },
            PlacementError::InvalidSlab {
                slab: SlabId(1),
                reason: "r".into(),
            },
        ]
    }

    #[test]
    fn codes_list_matches_the_enum() {
        let produced: Vec<&str> = one_of_each().iter().map(PlacementError::code).collect();
        assert_eq!(produced, PlacementError::CODES, "CODES is stale");
        let unique: BTreeSet<&str> = produced.iter().copied().collect();
        assert_eq!(unique.len(), produced.len(), "codes must be unique");
    }

    #[test]
    fn messages_read_as_the_issue_asks() {
        let e = PlacementError::NotEnoughFaultDomains {
            resiliency: Resiliency::MIRROR_3,
            needed: 3,
            available: 2,
        };
        assert_eq!(e.to_string(), "mirror-3 needs 3 fault domains, 2 are up");
        let e = PlacementError::NotEnoughFaultDomains {
            resiliency: Resiliency::MIRROR_2,
            needed: 2,
            available: 1,
        };
        assert_eq!(e.to_string(), "mirror-2 needs 2 fault domains, 1 is up");
        let e = PlacementError::PoolFull {
            extents: 3,
            nodes: 3,
            with_space: 2,
        };
        assert_eq!(
            e.to_string(),
            "pool full: need 3 extents on 3 nodes, only 2 nodes have free space"
        );
        let e = PlacementError::PoolFull {
            extents: 2,
            nodes: 2,
            with_space: 1,
        };
        assert_eq!(
            e.to_string(),
            "pool full: need 2 extents on 2 nodes, only 1 node has free space"
        );
        let e = PlacementError::TooManyNodes { node: NodeId(17) };
        assert_eq!(
            e.to_string(),
            "cluster already has 16 nodes, the most a cluster may have: node 17 is refused"
        );
    }
}
