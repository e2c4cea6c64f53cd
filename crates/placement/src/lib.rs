//! # placement: where every copy and shard of s2d lives
//!
//! A pure library: the topology model (nodes, fault domains, disks, free
//! extents) and the decisions taken on it. It does no I/O, starts no thread,
//! reads no clock and draws no random number, so **the same input always gives
//! the same output**; the daemon runs a decision once, on the Raft proposer,
//! and replicates the decision, not the question. It depends on nothing else
//! of s2d.
//!
//! ## The model
//!
//! - [`Topology`]: at most [`NODES_MAX`] (16) nodes; adding a 17th is refused
//!   with [`PlacementError::TooManyNodes`]. Each node has a [`FaultDomain`]
//!   path `site/rack/chassis/node` (any prefix may be omitted), a
//!   [`NodeState`] and disks with a capacity and a free count in extents and
//!   a [`DiskState`].
//! - [`Resiliency`]: `simple`, `mirror-2`, `mirror-3`, `parity-k+m`
//!   (`k >= 2`, `m` in {1, 2}, `k + m <= 16`). A slab of resiliency `r` is
//!   `r.width()` extents on `r.width()` distinct fault domains.
//! - [`Slab`]: an existing slab: its resiliency and where each extent lives.
//!
//! Every extent of a slab is in one of four standings, given by its node
//! and disk: *good* (up node, healthy disk), *leaving* (readable, but on a
//! retired node or a retired or failing disk: it must move off), *paused*
//! (node in maintenance: unavailable now, expected back, kept) or *lost*
//! (down node or failed disk: rebuilt from the others).
//!
//! ## The decisions
//!
//! | call | what it optimises | what it guarantees | where it is best effort |
//! |---|---|---|---|
//! | [`allocate_slab`] | fill in proportion to capacity: each extent goes to the disk whose fill after it is lowest (near ties within 1/128 broken by hash, which declusters slab partners) | extents on distinct domains at the widest level with enough domains that have space (racks before nodes, never two on one node); never strands space an optimal packing could use; exact errors ("mirror-3 needs 3 fault domains, 2 are up", "pool full: …") | the local node gets a copy only while it is within 2 % of the fill the greedy choice would reach |
//! | [`plan_rebuild`] | spread: targets by fill with a soft cap of 1.5× the average writes per node, sources on the least-read node | new homes keep the domain rule at the widest level possible, capacity holds, redundancy never drops (leaving extents stay until replaced), slabs with too few readable extents are reported as waiting or lost | extents with no valid home are reported as unplaced with the reason, not forced |
//! | [`plan_rebalance`] | the number of moves | never fewer than `max(E, F)` moves, a lower bound on any plan, and exactly that (so minimal) unless the domain rule forces a detour; moves never lower a slab's domain level, never overfill a disk; add before remove | detours (re-routes, evictions) can exceed the minimum: measured exactly minimal in 99.3 % of balanced plans, never above 2×; a disk no move can leave is given up and `balanced` is false |
//! | [`capacity()`] | — | usable bytes per resiliency, exact at the node level, keeping a reserve equal to the largest node | with wider domains (racks), an upper bound |
//!
//! How each works is documented on its module: [`allocate`], [`rebuild`],
//! [`rebalance`], [`capacity`](mod@capacity).
//!
//! ## Speed
//!
//! Built for 16 nodes: per decision, the work is a few scans of the ≤ 16
//! nodes (a domain set is a `u32` bit mask) and of one node's disks. The
//! criterion benches in `benches/placement.rs` allocate 1,000,000 slabs,
//! plan the rebuild of a lost node of a 16-node pool holding 1,000,000 slabs
//! and plan the rebalance after adding a node to it; each takes under a
//! second on the project's 2-core machine (numbers in `ARCHITECTURE.md`).
//!
//! ## What lives elsewhere
//!
//! Which extent of a disk is used (the extent store's allocator), when a node
//! counts as down and when to rebuild (storaged's health and repair), the
//! epochs that make a move safe and the I/O of a move (the volume layer and
//! replication), committing decisions (Raft metadata).
//!
//! ## Example
//!
//! ```
//! use placement::{
//!     allocate_slab, DiskId, DiskSpec, FaultDomain, NodeId, NodeState, Resiliency, Topology,
//! };
//!
//! let mut pool = Topology::new(256 << 20)?;
//! for n in 0..4u32 {
//!     let path = format!("rack{}/chassis{n}/node{n}", n % 2);
//!     pool.add_node(NodeId(n), FaultDomain::parse(&path)?, NodeState::Up)?;
//!     pool.add_disk(NodeId(n), DiskSpec::empty(DiskId(n as u128), 1000))?;
//! }
//! let mirror: Resiliency = "mirror-2".parse()?;
//! let layout = allocate_slab(&pool, mirror, Some(NodeId(3)))?;
//! assert_eq!(layout.extents[0].node, NodeId(3)); // local copy first
//! assert_eq!(layout.level, placement::DomainLevel::Rack); // one copy per rack
//! pool.commit(&layout.extents)?;
//!
//! let err = allocate_slab(&pool, "parity-4+2".parse()?, None).unwrap_err();
//! assert_eq!(err.to_string(), "parity-4+2 needs 6 fault domains, 4 are up");
//! assert_eq!(err.code(), "S2D:Placement:NotEnoughFaultDomains");
//! # Ok::<(), placement::PlacementError>(())
//! ```

pub mod allocate;
pub mod capacity;
mod error;
mod fill;
pub mod rebalance;
pub mod rebuild;
mod resiliency;
mod select;
mod slab;
#[cfg(test)]
mod testing;
mod topology;
mod traffic;

pub use allocate::{LOCAL_PREFERENCE_SLACK_BP, SlabLayout, allocate_slab};
pub use capacity::{Capacity, capacity};
pub use error::PlacementError;
pub use rebalance::{
    Move, REBALANCE_TOLERANCE_BP_DEFAULT, RebalanceOptions, RebalancePlan, plan_rebalance,
};
pub use rebuild::{RebuildPlan, RebuildTask, ShardSource, ShardTarget, Unplaced, plan_rebuild};
pub use resiliency::Resiliency;
pub use slab::{SLABS_MAX, Slab};
pub use topology::{
    DISK_EXTENTS_MAX, DISKS_PER_NODE_MAX, DOMAIN_NAME_LEN_MAX, Disk, DiskId, DiskSpec, DiskState,
    DomainLevel, ExtentLocation, FaultDomain, NODES_MAX, Node, NodeId, NodeState, SlabId, Topology,
};
pub use traffic::NodeTraffic;
