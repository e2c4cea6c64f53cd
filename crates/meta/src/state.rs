//! The replicated pool-metadata state machine.
//!
//! [`PoolState`] is what every node of a pool agrees on: nodes, disks, pool
//! settings, volumes with their slabs (replicas and epoch), volume attachments
//! and repair jobs. It changes only through [`Command`]s that Raft has
//! committed, applied with [`PoolState::apply`].
//!
//! Invariants:
//! - Apply is deterministic: it reads only the current state and the command.
//!   No clock, no randomness, no local disk; every map is a `BTreeMap`, so the
//!   encoded state is byte-identical on every replica that applied the same log.
//! - Commands carry decisions, not questions ("slab 7 of `db` goes to these
//!   extents at epoch 4"): placement runs once, on the proposer, and apply only
//!   validates it.
//! - An invalid command is rejected with a [`Rejection`] and leaves the state
//!   exactly as it was; apply never panics.
//! - Messages are hand-written `prost` derives (no `.proto`, no protoc); tags
//!   are part of the on-disk and wire format and must never be reused.

use std::collections::BTreeMap;

use prost::Message;

use crate::error::{Error, Result};

/// Lifecycle of a node in the pool.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum NodeState {
    /// Heartbeating and serving.
    Up = 0,
    /// Silent for longer than `down_after`; its replicas are not current.
    Down = 1,
    /// Drained on purpose; gets no new allocations.
    Maintenance = 2,
    /// Removed from the pool for good; terminal.
    Retired = 3,
}

/// Health of one disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum DiskState {
    /// Usable for new extents.
    Online = 0,
    /// Failed; its extents need repair.
    Failed = 1,
    /// Removed from the pool; terminal.
    Removed = 2,
    /// Being emptied on purpose (`pool remove-disk`): readable, no new
    /// extents; its copies move to other nodes, then it can be removed.
    Draining = 3,
}

/// Resiliency of a volume.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum Resiliency {
    /// One copy.
    Simple = 0,
    /// Two copies in different fault domains.
    TwoWayMirror = 1,
    /// Three copies in different fault domains.
    ThreeWayMirror = 2,
}

impl Resiliency {
    /// How many replicas one slab of this resiliency has.
    pub fn copies(self) -> usize {
        match self {
            Resiliency::Simple => 1,
            Resiliency::TwoWayMirror => 2,
            Resiliency::ThreeWayMirror => 3,
        }
    }
}

/// State of one replica of a slab.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum ReplicaState {
    /// Holds every acknowledged write of the slab's epoch.
    Current = 0,
    /// Missed writes; must not serve reads.
    Stale = 1,
    /// Being rebuilt by a repair job.
    Rebuilding = 2,
}

/// A member of the pool.
#[derive(Clone, PartialEq, Message)]
pub struct Node {
    /// Cluster-unique id (also the Raft id).
    #[prost(uint64, tag = "1")]
    pub id: u64,
    /// Address of the node's gRPC port, `host:port`.
    #[prost(string, tag = "2")]
    pub address: String,
    /// Fault-domain path from the outside in, e.g. `["site-a", "rack-3", "host-7"]`.
    #[prost(string, repeated, tag = "3")]
    pub fault_domain: Vec<String>,
    /// Lifecycle state.
    #[prost(enumeration = "NodeState", tag = "4")]
    pub state: i32,
    /// Operator-facing name; unique among non-retired nodes.
    #[prost(string, tag = "5")]
    pub name: String,
    /// Whether the node votes in Raft (false: learner, or retired).
    /// Changed only together with the Raft configuration (see `node`).
    #[prost(bool, tag = "6")]
    pub voter: bool,
    /// Address of the node's NBD server.
    #[prost(string, tag = "7")]
    pub nbd_address: String,
    /// Address of the node's iSCSI portal; empty: no iSCSI.
    #[prost(string, tag = "8")]
    pub iscsi_address: String,
    /// Address of the node's replication listener.
    #[prost(string, tag = "9")]
    pub replication_address: String,
    /// When the node was marked down (the leader's clock, ms since the Unix
    /// epoch); 0 while it is not down.
    #[prost(uint64, tag = "10")]
    pub down_since_ms: u64,
}

/// A disk of a node, carved into fixed-size extents.
#[derive(Clone, PartialEq, Message)]
pub struct Disk {
    /// Pool-unique id.
    #[prost(uint64, tag = "1")]
    pub id: u64,
    /// Node holding the disk.
    #[prost(uint64, tag = "2")]
    pub node: u64,
    /// Usable bytes.
    #[prost(uint64, tag = "3")]
    pub capacity_bytes: u64,
    /// Health.
    #[prost(enumeration = "DiskState", tag = "4")]
    pub state: i32,
    /// Extent numbers in use, sorted ascending, no duplicates.
    #[prost(uint64, repeated, tag = "5")]
    pub allocated_extents: Vec<u64>,
}

/// Pool-wide settings, fixed by `InitPool`.
#[derive(Clone, PartialEq, Message)]
pub struct PoolSettings {
    /// Human name of the pool.
    #[prost(string, tag = "1")]
    pub name: String,
    /// Extent (and slab) size in bytes; a power of two.
    #[prost(uint64, tag = "2")]
    pub extent_size_bytes: u64,
}

/// One copy of a slab: an extent on a disk of a node.
#[derive(Clone, PartialEq, Eq, Message)]
pub struct Replica {
    /// Node holding the disk.
    #[prost(uint64, tag = "1")]
    pub node: u64,
    /// Disk holding the extent.
    #[prost(uint64, tag = "2")]
    pub disk: u64,
    /// Extent number on the disk.
    #[prost(uint64, tag = "3")]
    pub extent: u64,
    /// Replica state.
    #[prost(enumeration = "ReplicaState", tag = "4")]
    pub state: i32,
}

/// A slab: one extent-sized piece of a volume, with its replicas.
#[derive(Clone, PartialEq, Message)]
pub struct Slab {
    /// Bumped by every change of the replica set; writes carry it to fence stale writers.
    #[prost(uint64, tag = "1")]
    pub epoch: u64,
    /// The replicas, in the proposer's order.
    #[prost(message, repeated, tag = "2")]
    pub replicas: Vec<Replica>,
    /// A copy is moving off this node (0: none): the slab holds one replica
    /// more than its resiliency's copies until the new copy is current,
    /// then the one on this node is dropped. Redundancy never dips.
    #[prost(uint64, tag = "3")]
    pub moving_from: u64,
}

/// Which node serves a volume now (one writer at a time).
#[derive(Clone, PartialEq, Message)]
pub struct Attachment {
    /// The serving node.
    #[prost(uint64, tag = "1")]
    pub node: u64,
    /// Bumped by every attach; lets the data path fence the previous writer.
    #[prost(uint64, tag = "2")]
    pub generation: u64,
}

/// A block volume.
#[derive(Clone, PartialEq, Message)]
pub struct Volume {
    /// Pool-unique name.
    #[prost(string, tag = "1")]
    pub name: String,
    /// Size in bytes; a multiple of the extent size.
    #[prost(uint64, tag = "2")]
    pub size_bytes: u64,
    /// Resiliency.
    #[prost(enumeration = "Resiliency", tag = "3")]
    pub resiliency: i32,
    /// Allocated slabs by slab number; unallocated slabs read as zeros.
    #[prost(btree_map = "uint64, message", tag = "4")]
    pub slabs: BTreeMap<u64, Slab>,
    /// The node serving the volume, if any.
    #[prost(message, optional, tag = "5")]
    pub attachment: Option<Attachment>,
    /// Generation of the last attachment (kept across detach so it only grows).
    #[prost(uint64, tag = "6")]
    pub last_generation: u64,
    /// Pool-unique id, assigned at apply; it marks the volume's extents on disk.
    #[prost(uint64, tag = "7")]
    pub id: u64,
    /// The node that stores and serves a `simple` volume.
    #[prost(uint64, tag = "8")]
    pub home_node: u64,
    /// Logical block size the iSCSI target reports: 512 or 4096.
    #[prost(uint32, tag = "9")]
    pub block_size: u32,
    /// iSCSI CHAP; none means no CHAP.
    #[prost(message, optional, tag = "10")]
    pub chap: Option<Chap>,
}

/// iSCSI CHAP credentials of a volume (secrets are part of the metadata).
#[derive(Clone, PartialEq, Eq, Message)]
pub struct Chap {
    /// What the initiator presents.
    #[prost(string, tag = "1")]
    pub user: String,
    /// Its secret.
    #[prost(string, tag = "2")]
    pub secret: String,
    /// Mutual CHAP: what the target presents (empty: one-way).
    #[prost(string, tag = "3")]
    pub target_user: String,
    /// Its secret.
    #[prost(string, tag = "4")]
    pub target_secret: String,
}

/// Rebuild of one replica of one slab.
#[derive(Clone, PartialEq, Message)]
pub struct RepairJob {
    /// Pool-unique id, chosen by the proposer.
    #[prost(uint64, tag = "1")]
    pub id: u64,
    /// Volume name.
    #[prost(string, tag = "2")]
    pub volume: String,
    /// Slab number.
    #[prost(uint64, tag = "3")]
    pub slab: u64,
    /// Index of the replica being rebuilt.
    #[prost(uint32, tag = "4")]
    pub replica: u32,
    /// The slab epoch the job was started at.
    #[prost(uint64, tag = "5")]
    pub epoch: u64,
}

/// The whole replicated state; a Raft snapshot's data is its prost encoding.
#[derive(Clone, PartialEq, Message)]
pub struct PoolState {
    /// Set once by `InitPool`.
    #[prost(message, optional, tag = "1")]
    pub settings: Option<PoolSettings>,
    /// Nodes by id.
    #[prost(btree_map = "uint64, message", tag = "2")]
    pub nodes: BTreeMap<u64, Node>,
    /// Disks by id.
    #[prost(btree_map = "uint64, message", tag = "3")]
    pub disks: BTreeMap<u64, Disk>,
    /// Volumes by name.
    #[prost(btree_map = "string, message", tag = "4")]
    pub volumes: BTreeMap<String, Volume>,
    /// Repair jobs by id.
    #[prost(btree_map = "uint64, message", tag = "5")]
    pub repairs: BTreeMap<u64, RepairJob>,
    /// Set once by `InitCluster`: the cluster's name; empty while the pool
    /// is a one-node cluster that no node may join.
    #[prost(string, tag = "6")]
    pub cluster_name: String,
    /// The id the next volume gets.
    #[prost(uint64, tag = "7")]
    pub next_volume_id: u64,
    /// Bumped when the pool's capacity changes under existing data (a disk
    /// added, a node joining with its disks) or an operator asks: the
    /// coordinators then even out fill by moving copies.
    #[prost(uint64, tag = "8")]
    pub rebalance_generation: u64,
}

/// A change to the pool state; the payload of one Raft entry.
#[derive(Clone, PartialEq, Message)]
pub struct Command {
    /// The change.
    #[prost(
        oneof = "Op",
        tags = "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21"
    )]
    pub op: Option<Op>,
}

/// The kinds of change.
#[derive(Clone, PartialEq, prost::Oneof)]
pub enum Op {
    /// Fix the pool settings; only once.
    #[prost(message, tag = "1")]
    InitPool(PoolSettings),
    /// Add a node (state `up`).
    #[prost(message, tag = "2")]
    AddNode(AddNode),
    /// Change a node's state.
    #[prost(message, tag = "3")]
    SetNodeState(SetNodeState),
    /// Add a disk to a node.
    #[prost(message, tag = "4")]
    AddDisk(AddDisk),
    /// Change a disk's state.
    #[prost(message, tag = "5")]
    SetDiskState(SetDiskState),
    /// Create a volume.
    #[prost(message, tag = "6")]
    CreateVolume(CreateVolume),
    /// Grow a volume.
    #[prost(message, tag = "7")]
    ResizeVolume(ResizeVolume),
    /// Delete a detached volume, freeing its extents.
    #[prost(message, tag = "8")]
    DeleteVolume(DeleteVolume),
    /// Place (or re-place) a slab on the given extents.
    #[prost(message, tag = "9")]
    AllocateSlab(AllocateSlab),
    /// Change one replica's state, fenced by the slab epoch.
    #[prost(message, tag = "10")]
    SetReplicaState(SetReplicaState),
    /// Make a node the volume's single writer.
    #[prost(message, tag = "11")]
    AttachVolume(AttachVolume),
    /// Release the volume's writer.
    #[prost(message, tag = "12")]
    DetachVolume(DetachVolume),
    /// Start rebuilding a replica (marks it `rebuilding`).
    #[prost(message, tag = "13")]
    StartRepair(RepairJob),
    /// Finish a repair job (marks the replica `current`).
    #[prost(message, tag = "14")]
    FinishRepair(FinishRepair),
    /// Name the cluster and open it to joins; only once.
    #[prost(message, tag = "15")]
    InitCluster(InitCluster),
    /// Replace a volume's CHAP settings.
    #[prost(message, tag = "16")]
    SetVolumeChap(SetVolumeChap),
    /// Retire a node for good (with the Raft removal of the node).
    #[prost(message, tag = "17")]
    RetireNode(RetireNode),
    /// Make a learner a voter (with the Raft promotion of the node).
    #[prost(message, tag = "18")]
    PromoteNode(PromoteNode),
    /// Change the states of a slab's replicas and bump its epoch, fenced by
    /// the epoch (a replica marked stale, resyncing, or current again).
    #[prost(message, tag = "19")]
    ChangeReplicas(ChangeReplicas),
    /// A node's addresses as it started this time.
    #[prost(message, tag = "20")]
    UpdateNode(UpdateNode),
    /// Ask for a rebalance (bumps `rebalance_generation`).
    #[prost(message, tag = "21")]
    RequestRebalance(RequestRebalance),
}

/// Payload of [`Op::RequestRebalance`].
#[derive(Clone, PartialEq, Message)]
pub struct RequestRebalance {}

/// Payload of [`Op::UpdateNode`].
#[derive(Clone, PartialEq, Message)]
pub struct UpdateNode {
    /// Node id.
    #[prost(uint64, tag = "1")]
    pub node: u64,
    /// gRPC address; unique among non-retired nodes.
    #[prost(string, tag = "2")]
    pub address: String,
    /// NBD server.
    #[prost(string, tag = "3")]
    pub nbd_address: String,
    /// iSCSI portal; empty: none.
    #[prost(string, tag = "4")]
    pub iscsi_address: String,
    /// Replication listener.
    #[prost(string, tag = "5")]
    pub replication_address: String,
}

/// Payload of [`Op::ChangeReplicas`].
#[derive(Clone, PartialEq, Message)]
pub struct ChangeReplicas {
    /// Volume name.
    #[prost(string, tag = "1")]
    pub volume: String,
    /// Slab number.
    #[prost(uint64, tag = "2")]
    pub slab: u64,
    /// Must equal the slab's epoch; the slab moves to epoch + 1.
    #[prost(uint64, tag = "3")]
    pub epoch: u64,
    /// The new state of every replica, in replica order.
    #[prost(enumeration = "ReplicaState", repeated, tag = "4")]
    pub states: Vec<i32>,
    /// Empty, or per replica: where an unplaced replica (extent
    /// [`UNPLACED`]) now lives (disk id; `UNPLACED` leaves it as it is).
    #[prost(uint64, repeated, tag = "5")]
    pub disks: Vec<u64>,
    /// Empty, or per replica: the extent that goes with `disks`.
    #[prost(uint64, repeated, tag = "6")]
    pub extents: Vec<u64>,
}

/// The extent number of a replica that has no extent yet: a stale copy
/// recorded on a node that was down when its slab was placed. It gets an
/// extent when it is resynced.
pub const UNPLACED: u64 = u64::MAX;

/// At most this many non-retired nodes form a cluster.
pub const MAX_NODES: usize = 16;

/// Payload of [`Op::InitCluster`].
#[derive(Clone, PartialEq, Message)]
pub struct InitCluster {
    /// Non-empty cluster name.
    #[prost(string, tag = "1")]
    pub name: String,
}

/// Payload of [`Op::SetVolumeChap`].
#[derive(Clone, PartialEq, Message)]
pub struct SetVolumeChap {
    /// Volume name.
    #[prost(string, tag = "1")]
    pub volume: String,
    /// New settings; none turns CHAP off.
    #[prost(message, optional, tag = "2")]
    pub chap: Option<Chap>,
}

/// Payload of [`Op::RetireNode`].
#[derive(Clone, PartialEq, Message)]
pub struct RetireNode {
    /// Node id.
    #[prost(uint64, tag = "1")]
    pub node: u64,
}

/// Payload of [`Op::PromoteNode`].
#[derive(Clone, PartialEq, Message)]
pub struct PromoteNode {
    /// Node id of a learner.
    #[prost(uint64, tag = "1")]
    pub node: u64,
}

/// Payload of [`Op::AddNode`].
#[derive(Clone, PartialEq, Message)]
pub struct AddNode {
    /// New node id; non-zero, unused.
    #[prost(uint64, tag = "1")]
    pub id: u64,
    /// gRPC address; unique among non-retired nodes.
    #[prost(string, tag = "2")]
    pub address: String,
    /// Fault-domain path.
    #[prost(string, repeated, tag = "3")]
    pub fault_domain: Vec<String>,
    /// Name; unique among non-retired nodes.
    #[prost(string, tag = "4")]
    pub name: String,
    /// Joins as a voter (else as a learner).
    #[prost(bool, tag = "5")]
    pub voter: bool,
    /// Address of its NBD server.
    #[prost(string, tag = "6")]
    pub nbd_address: String,
    /// Address of its iSCSI portal; empty: no iSCSI.
    #[prost(string, tag = "7")]
    pub iscsi_address: String,
}

/// Payload of [`Op::SetNodeState`].
#[derive(Clone, PartialEq, Message)]
pub struct SetNodeState {
    /// Node id.
    #[prost(uint64, tag = "1")]
    pub node: u64,
    /// New state.
    #[prost(enumeration = "NodeState", tag = "2")]
    pub state: i32,
    /// The proposer's wall clock (ms since the Unix epoch) when it decided;
    /// recorded as the node's `down_since_ms` when the state is `down`.
    #[prost(uint64, tag = "3")]
    pub at_ms: u64,
}

/// Payload of [`Op::AddDisk`].
#[derive(Clone, PartialEq, Message)]
pub struct AddDisk {
    /// New disk id; unused.
    #[prost(uint64, tag = "1")]
    pub id: u64,
    /// Owning node; must exist and not be retired.
    #[prost(uint64, tag = "2")]
    pub node: u64,
    /// Usable bytes; at least one extent.
    #[prost(uint64, tag = "3")]
    pub capacity_bytes: u64,
}

/// Payload of [`Op::SetDiskState`].
#[derive(Clone, PartialEq, Message)]
pub struct SetDiskState {
    /// Disk id.
    #[prost(uint64, tag = "1")]
    pub disk: u64,
    /// New state.
    #[prost(enumeration = "DiskState", tag = "2")]
    pub state: i32,
}

/// Payload of [`Op::CreateVolume`].
#[derive(Clone, PartialEq, Message)]
pub struct CreateVolume {
    /// Unused, non-empty name.
    #[prost(string, tag = "1")]
    pub name: String,
    /// Non-zero multiple of 4 KiB.
    #[prost(uint64, tag = "2")]
    pub size_bytes: u64,
    /// Resiliency.
    #[prost(enumeration = "Resiliency", tag = "3")]
    pub resiliency: i32,
    /// Node that stores and serves it (0: none chosen, e.g. for mirrors).
    #[prost(uint64, tag = "4")]
    pub home_node: u64,
    /// 512 or 4096; 0 means 512.
    #[prost(uint32, tag = "5")]
    pub block_size: u32,
    /// iSCSI CHAP.
    #[prost(message, optional, tag = "6")]
    pub chap: Option<Chap>,
}

/// Payload of [`Op::ResizeVolume`].
#[derive(Clone, PartialEq, Message)]
pub struct ResizeVolume {
    /// Volume name.
    #[prost(string, tag = "1")]
    pub name: String,
    /// New size: a non-zero multiple of 4 KiB; shrinking frees the slabs past the end.
    #[prost(uint64, tag = "2")]
    pub size_bytes: u64,
}

/// Payload of [`Op::DeleteVolume`].
#[derive(Clone, PartialEq, Message)]
pub struct DeleteVolume {
    /// Volume name.
    #[prost(string, tag = "1")]
    pub name: String,
}

/// Payload of [`Op::AllocateSlab`].
#[derive(Clone, PartialEq, Message)]
pub struct AllocateSlab {
    /// Volume name.
    #[prost(string, tag = "1")]
    pub volume: String,
    /// Slab number, below size / extent size.
    #[prost(uint64, tag = "2")]
    pub slab: u64,
    /// Exactly `resiliency.copies()` replicas (one more while a copy moves,
    /// see `moving_from`) on distinct nodes; new ones on free extents of
    /// online disks of up nodes, kept ones (same disk and extent as before)
    /// wherever they are.
    #[prost(message, repeated, tag = "3")]
    pub replicas: Vec<Replica>,
    /// Greater than the slab's current epoch (any value > 0 for a new slab).
    #[prost(uint64, tag = "4")]
    pub epoch: u64,
    /// The node a copy moves off (0: none); one of the replicas' nodes.
    #[prost(uint64, tag = "5")]
    pub moving_from: u64,
}

/// Payload of [`Op::SetReplicaState`].
#[derive(Clone, PartialEq, Message)]
pub struct SetReplicaState {
    /// Volume name.
    #[prost(string, tag = "1")]
    pub volume: String,
    /// Slab number.
    #[prost(uint64, tag = "2")]
    pub slab: u64,
    /// Replica index within the slab.
    #[prost(uint32, tag = "3")]
    pub replica: u32,
    /// Must equal the slab's epoch, or the decision is stale.
    #[prost(uint64, tag = "4")]
    pub epoch: u64,
    /// New state.
    #[prost(enumeration = "ReplicaState", tag = "5")]
    pub state: i32,
}

/// Payload of [`Op::AttachVolume`].
#[derive(Clone, PartialEq, Message)]
pub struct AttachVolume {
    /// Volume name.
    #[prost(string, tag = "1")]
    pub volume: String,
    /// Node that will serve it; must be up.
    #[prost(uint64, tag = "2")]
    pub node: u64,
    /// Take the volume over from a holder that is down (or retired); every
    /// slab's epoch is bumped so the old holder's writes are refused.
    #[prost(bool, tag = "3")]
    pub takeover: bool,
}

/// Payload of [`Op::DetachVolume`].
#[derive(Clone, PartialEq, Message)]
pub struct DetachVolume {
    /// Volume name.
    #[prost(string, tag = "1")]
    pub volume: String,
    /// The node currently attached.
    #[prost(uint64, tag = "2")]
    pub node: u64,
}

/// Payload of [`Op::FinishRepair`].
#[derive(Clone, PartialEq, Message)]
pub struct FinishRepair {
    /// Repair job id.
    #[prost(uint64, tag = "1")]
    pub id: u64,
}

/// Why a command was rejected. The state is unchanged when this is returned.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    /// The entry carried no operation, or an enum value this version does not know.
    #[error("malformed command: {0}")]
    Malformed(String),
    /// The pool is not initialised yet (or was already).
    #[error("pool {0}")]
    PoolInit(&'static str),
    /// A referenced object does not exist.
    #[error("{kind} {id} not found")]
    NotFound {
        /// Object kind.
        kind: &'static str,
        /// Its id or name.
        id: String,
    },
    /// The id or name is already taken.
    #[error("{kind} {id} already exists")]
    Exists {
        /// Object kind.
        kind: &'static str,
        /// Its id or name.
        id: String,
    },
    /// The command is well-formed but not allowed in the current state.
    #[error("{0}")]
    Invalid(String),
}

/// What applying one command did.
pub type ApplyResult = std::result::Result<(), Rejection>;

/// Largest volume: 1 PiB.
pub const VOLUME_SIZE_MAX: u64 = 1 << 50;

fn check_volume_size(size: u64) -> ApplyResult {
    if size == 0 || !size.is_multiple_of(4096) || size > VOLUME_SIZE_MAX {
        return Err(invalid(format!(
            "volume size {size} is not a non-zero multiple of 4096 of at most 1 PiB"
        )));
    }
    Ok(())
}

fn not_found(kind: &'static str, id: impl ToString) -> Rejection {
    Rejection::NotFound {
        kind,
        id: id.to_string(),
    }
}

fn exists(kind: &'static str, id: impl ToString) -> Rejection {
    Rejection::Exists {
        kind,
        id: id.to_string(),
    }
}

fn invalid(msg: impl Into<String>) -> Rejection {
    Rejection::Invalid(msg.into())
}

fn node_state(v: i32) -> std::result::Result<NodeState, Rejection> {
    NodeState::try_from(v).map_err(|_| Rejection::Malformed(format!("node state {v}")))
}

fn disk_state(v: i32) -> std::result::Result<DiskState, Rejection> {
    DiskState::try_from(v).map_err(|_| Rejection::Malformed(format!("disk state {v}")))
}

fn replica_state(v: i32) -> std::result::Result<ReplicaState, Rejection> {
    ReplicaState::try_from(v).map_err(|_| Rejection::Malformed(format!("replica state {v}")))
}

fn resiliency(v: i32) -> std::result::Result<Resiliency, Rejection> {
    Resiliency::try_from(v).map_err(|_| Rejection::Malformed(format!("resiliency {v}")))
}

impl Command {
    /// Wraps an operation.
    pub fn new(op: Op) -> Self {
        Command { op: Some(op) }
    }

    /// Decodes a command from a Raft entry's data.
    pub fn decode_from(data: &[u8]) -> Result<Self> {
        Command::decode(data).map_err(|source| Error::Decode {
            what: "command",
            source,
        })
    }
}

impl PoolState {
    /// Decodes a state from a snapshot's data (empty data is the empty state).
    pub fn decode_from(data: &[u8]) -> Result<Self> {
        PoolState::decode(data).map_err(|source| Error::Decode {
            what: "pool state snapshot",
            source,
        })
    }

    /// Applies one committed command. On `Err` the state is unchanged.
    ///
    /// Every check runs before the first mutation, so a rejection never leaves
    /// a half-applied command behind.
    pub fn apply(&mut self, cmd: &Command) -> ApplyResult {
        let Some(op) = &cmd.op else {
            return Err(Rejection::Malformed("no operation".into()));
        };
        match op {
            Op::InitPool(s) => self.init_pool(s),
            Op::AddNode(c) => self.add_node(c),
            Op::SetNodeState(c) => self.set_node_state(c),
            Op::AddDisk(c) => self.add_disk(c),
            Op::SetDiskState(c) => self.set_disk_state(c),
            Op::CreateVolume(c) => self.create_volume(c),
            Op::ResizeVolume(c) => self.resize_volume(c),
            Op::DeleteVolume(c) => self.delete_volume(c),
            Op::AllocateSlab(c) => self.allocate_slab(c),
            Op::SetReplicaState(c) => self.set_replica_state(c),
            Op::AttachVolume(c) => self.attach_volume(c),
            Op::DetachVolume(c) => self.detach_volume(c),
            Op::StartRepair(c) => self.start_repair(c),
            Op::FinishRepair(c) => self.finish_repair(c),
            Op::InitCluster(c) => self.init_cluster(c),
            Op::SetVolumeChap(c) => self.set_volume_chap(c),
            Op::RetireNode(c) => self.retire_node(c),
            Op::PromoteNode(c) => self.promote_node(c),
            Op::ChangeReplicas(c) => self.change_replicas(c),
            Op::UpdateNode(c) => self.update_node(c),
            Op::RequestRebalance(_) => {
                self.extent_size()?;
                self.rebalance_generation += 1;
                Ok(())
            }
        }
    }

    fn extent_size(&self) -> std::result::Result<u64, Rejection> {
        self.settings
            .as_ref()
            .map(|s| s.extent_size_bytes)
            .ok_or(Rejection::PoolInit("not initialised"))
    }

    fn init_pool(&mut self, s: &PoolSettings) -> ApplyResult {
        if self.settings.is_some() {
            return Err(Rejection::PoolInit("already initialised"));
        }
        if !s.extent_size_bytes.is_power_of_two() || s.extent_size_bytes < 4096 {
            return Err(invalid(format!(
                "extent size {} is not a power of two of at least 4096",
                s.extent_size_bytes
            )));
        }
        self.settings = Some(s.clone());
        Ok(())
    }

    fn add_node(&mut self, c: &AddNode) -> ApplyResult {
        if c.id == 0 {
            return Err(invalid("node id 0 is reserved"));
        }
        if self.nodes.contains_key(&c.id) {
            return Err(exists("node", c.id));
        }
        if c.address.is_empty() {
            return Err(invalid("node address is empty"));
        }
        let live: Vec<&Node> = self
            .nodes
            .values()
            .filter(|n| n.state != NodeState::Retired as i32)
            .collect();
        if live.iter().any(|n| n.address == c.address) {
            return Err(exists("node address", &c.address));
        }
        if !c.name.is_empty() && live.iter().any(|n| n.name == c.name) {
            return Err(exists("node name", &c.name));
        }
        if live.len() >= MAX_NODES {
            return Err(invalid(format!(
                "the cluster already has {} nodes, the most it can hold",
                live.len()
            )));
        }
        self.nodes.insert(
            c.id,
            Node {
                id: c.id,
                address: c.address.clone(),
                fault_domain: c.fault_domain.clone(),
                state: NodeState::Up as i32,
                name: if c.name.is_empty() {
                    format!("node-{}", c.id)
                } else {
                    c.name.clone()
                },
                voter: c.voter,
                nbd_address: c.nbd_address.clone(),
                iscsi_address: c.iscsi_address.clone(),
                replication_address: String::new(),
                down_since_ms: 0,
            },
        );
        Ok(())
    }

    fn init_cluster(&mut self, c: &InitCluster) -> ApplyResult {
        self.extent_size()?;
        if !self.cluster_name.is_empty() {
            return Err(invalid(format!(
                "cluster {} is already initialised",
                self.cluster_name
            )));
        }
        if c.name.is_empty() {
            return Err(invalid("cluster name is empty"));
        }
        self.cluster_name = c.name.clone();
        Ok(())
    }

    fn live_node(&self, id: u64) -> std::result::Result<&Node, Rejection> {
        let node = self.nodes.get(&id).ok_or(not_found("node", id))?;
        if node.state == NodeState::Retired as i32 {
            return Err(invalid(format!("node {} is retired", node.name)));
        }
        Ok(node)
    }

    fn retire_node(&mut self, c: &RetireNode) -> ApplyResult {
        let node = self.live_node(c.node)?;
        if let Some(v) = self.volumes.values().find(|v| v.home_node == c.node) {
            return Err(invalid(format!(
                "node {} still serves volume {}; delete or move it first",
                node.name, v.name
            )));
        }
        if let Some(node) = self.nodes.get_mut(&c.node) {
            node.state = NodeState::Retired as i32;
            node.voter = false;
        }
        Ok(())
    }

    fn promote_node(&mut self, c: &PromoteNode) -> ApplyResult {
        let node = self.live_node(c.node)?;
        if node.voter {
            return Err(invalid(format!("node {} is already a voter", node.name)));
        }
        if let Some(node) = self.nodes.get_mut(&c.node) {
            node.voter = true;
        }
        Ok(())
    }

    fn set_volume_chap(&mut self, c: &SetVolumeChap) -> ApplyResult {
        let vol = self
            .volumes
            .get_mut(&c.volume)
            .ok_or(not_found("volume", &c.volume))?;
        vol.chap = c.chap.clone();
        Ok(())
    }

    fn set_node_state(&mut self, c: &SetNodeState) -> ApplyResult {
        let state = node_state(c.state)?;
        if state == NodeState::Retired {
            return Err(invalid("retire a node with RetireNode"));
        }
        let node = self
            .nodes
            .get_mut(&c.node)
            .ok_or(not_found("node", c.node))?;
        if node.state == NodeState::Retired as i32 {
            return Err(invalid(format!("node {} is retired", c.node)));
        }
        node.down_since_ms = match state {
            NodeState::Down if node.state == NodeState::Down as i32 => node.down_since_ms,
            NodeState::Down => c.at_ms,
            _ => 0,
        };
        node.state = state as i32;
        Ok(())
    }

    fn add_disk(&mut self, c: &AddDisk) -> ApplyResult {
        let extent = self.extent_size()?;
        if self.disks.contains_key(&c.id) {
            return Err(exists("disk", c.id));
        }
        let node = self.nodes.get(&c.node).ok_or(not_found("node", c.node))?;
        if node.state == NodeState::Retired as i32 {
            return Err(invalid(format!("node {} is retired", c.node)));
        }
        if c.capacity_bytes < extent {
            return Err(invalid(format!(
                "disk capacity {} is smaller than one extent ({extent})",
                c.capacity_bytes
            )));
        }
        self.disks.insert(
            c.id,
            Disk {
                id: c.id,
                node: c.node,
                capacity_bytes: c.capacity_bytes,
                state: DiskState::Online as i32,
                allocated_extents: Vec::new(),
            },
        );
        // New capacity under existing data: even out fill.
        if self.volumes.values().any(|v| !v.slabs.is_empty()) {
            self.rebalance_generation += 1;
        }
        Ok(())
    }

    fn set_disk_state(&mut self, c: &SetDiskState) -> ApplyResult {
        let state = disk_state(c.state)?;
        let disk = self
            .disks
            .get_mut(&c.disk)
            .ok_or(not_found("disk", c.disk))?;
        if disk.state == DiskState::Removed as i32 {
            return Err(invalid(format!("disk {} is removed", c.disk)));
        }
        disk.state = state as i32;
        Ok(())
    }

    fn create_volume(&mut self, c: &CreateVolume) -> ApplyResult {
        self.extent_size()?;
        let res = resiliency(c.resiliency)?;
        if c.name.is_empty() {
            return Err(invalid("volume name is empty"));
        }
        if self.volumes.contains_key(&c.name) {
            return Err(exists("volume", &c.name));
        }
        check_volume_size(c.size_bytes)?;
        let block_size = match c.block_size {
            0 => 512,
            b @ (512 | 4096) => b,
            b => return Err(invalid(format!("block size {b} is not 512 or 4096"))),
        };
        if c.home_node != 0 {
            let node = self.live_node(c.home_node)?;
            if node.state != NodeState::Up as i32 {
                return Err(invalid(format!("node {} is not up", node.name)));
            }
        }
        let id = self.next_volume_id.max(1);
        self.next_volume_id = id + 1;
        self.volumes.insert(
            c.name.clone(),
            Volume {
                name: c.name.clone(),
                size_bytes: c.size_bytes,
                resiliency: res as i32,
                slabs: BTreeMap::new(),
                attachment: None,
                last_generation: 0,
                id,
                home_node: c.home_node,
                block_size,
                chap: c.chap.clone(),
            },
        );
        Ok(())
    }

    fn resize_volume(&mut self, c: &ResizeVolume) -> ApplyResult {
        let extent = self.extent_size()?;
        let vol = self
            .volumes
            .get_mut(&c.name)
            .ok_or(not_found("volume", &c.name))?;
        check_volume_size(c.size_bytes)?;
        let keep = c.size_bytes.div_ceil(extent);
        let dropped: Vec<Replica> = vol
            .slabs
            .range(keep..)
            .flat_map(|(_, s)| s.replicas.clone())
            .collect();
        vol.slabs.retain(|n, _| *n < keep);
        vol.size_bytes = c.size_bytes;
        self.free_extents(&dropped);
        Ok(())
    }

    fn delete_volume(&mut self, c: &DeleteVolume) -> ApplyResult {
        let vol = self
            .volumes
            .get(&c.name)
            .ok_or(not_found("volume", &c.name))?;
        if let Some(a) = &vol.attachment {
            return Err(invalid(format!(
                "volume {} is attached to node {}",
                c.name, a.node
            )));
        }
        if self.repairs.values().any(|j| j.volume == c.name) {
            return Err(invalid(format!("volume {} has repair jobs", c.name)));
        }
        if let Some(vol) = self.volumes.remove(&c.name) {
            for slab in vol.slabs.values() {
                self.free_extents(&slab.replicas);
            }
        }
        Ok(())
    }

    fn free_extents(&mut self, replicas: &[Replica]) {
        for r in replicas {
            if let Some(disk) = self.disks.get_mut(&r.disk)
                && let Ok(pos) = disk.allocated_extents.binary_search(&r.extent)
            {
                disk.allocated_extents.remove(pos);
            }
        }
    }

    fn allocate_slab(&mut self, c: &AllocateSlab) -> ApplyResult {
        let extent_size = self.extent_size()?;
        let vol = self
            .volumes
            .get(&c.volume)
            .ok_or(not_found("volume", &c.volume))?;
        let res = resiliency(vol.resiliency)?;
        if c.slab >= vol.size_bytes.div_ceil(extent_size) {
            return Err(invalid(format!(
                "slab {} is beyond the end of volume {}",
                c.slab, c.volume
            )));
        }
        let old = vol.slabs.get(&c.slab);
        let old_epoch = old.map_or(0, |s| s.epoch);
        if c.epoch <= old_epoch {
            return Err(invalid(format!(
                "epoch {} is not newer than slab epoch {old_epoch}",
                c.epoch
            )));
        }
        let want = res.copies() + usize::from(c.moving_from != 0);
        if c.replicas.len() != want {
            return Err(invalid(format!(
                "{:?} needs {} replicas{}, got {}",
                res,
                want,
                if c.moving_from != 0 {
                    " while a copy moves"
                } else {
                    ""
                },
                c.replicas.len()
            )));
        }
        if c.moving_from != 0 && !c.replicas.iter().any(|r| r.node == c.moving_from) {
            return Err(invalid(format!(
                "the copy moves off node {}, which holds none",
                c.moving_from
            )));
        }
        let mut seen_nodes = Vec::new();
        for r in &c.replicas {
            replica_state(r.state)?;
            if seen_nodes.contains(&r.node) {
                return Err(invalid(format!("two replicas on node {}", r.node)));
            }
            seen_nodes.push(r.node);
            let node = self.nodes.get(&r.node).ok_or(not_found("node", r.node))?;
            if r.extent == UNPLACED {
                if r.state != ReplicaState::Stale as i32 || node.state == NodeState::Retired as i32
                {
                    return Err(invalid(format!(
                        "only a stale copy on a non-retired node may be unplaced (node {})",
                        r.node
                    )));
                }
                continue;
            }
            // A copy the slab keeps (same place as before) stays wherever it
            // is: on a draining node or disk, or a node down for a while.
            let kept = old.is_some_and(|s| {
                s.replicas
                    .iter()
                    .any(|o| o.node == r.node && o.disk == r.disk && o.extent == r.extent)
            });
            if kept {
                continue;
            }
            if node.state != NodeState::Up as i32 {
                return Err(invalid(format!("node {} is not up", r.node)));
            }
            let disk = self.disks.get(&r.disk).ok_or(not_found("disk", r.disk))?;
            if disk.node != r.node {
                return Err(invalid(format!(
                    "disk {} is not on node {}",
                    r.disk, r.node
                )));
            }
            if disk.state != DiskState::Online as i32 {
                return Err(invalid(format!("disk {} is not online", r.disk)));
            }
            if r.extent >= disk.capacity_bytes / extent_size {
                return Err(invalid(format!(
                    "extent {} is beyond the end of disk {}",
                    r.extent, r.disk
                )));
            }
            if disk.allocated_extents.binary_search(&r.extent).is_ok() {
                return Err(invalid(format!(
                    "extent {} of disk {} is in use",
                    r.extent, r.disk
                )));
            }
        }
        // All checks passed: free the old extents, take the new ones.
        let old_replicas = old.map(|s| s.replicas.clone()).unwrap_or_default();
        self.free_extents(&old_replicas);
        for r in c.replicas.iter().filter(|r| r.extent != UNPLACED) {
            if let Some(disk) = self.disks.get_mut(&r.disk)
                && let Err(pos) = disk.allocated_extents.binary_search(&r.extent)
            {
                disk.allocated_extents.insert(pos, r.extent);
            }
        }
        if let Some(vol) = self.volumes.get_mut(&c.volume) {
            vol.slabs.insert(
                c.slab,
                Slab {
                    epoch: c.epoch,
                    replicas: c.replicas.clone(),
                    moving_from: c.moving_from,
                },
            );
        }
        Ok(())
    }

    fn slab_mut(&mut self, volume: &str, slab: u64) -> std::result::Result<&mut Slab, Rejection> {
        self.volumes
            .get_mut(volume)
            .ok_or(not_found("volume", volume))?
            .slabs
            .get_mut(&slab)
            .ok_or(not_found("slab", format!("{volume}/{slab}")))
    }

    fn set_replica_state(&mut self, c: &SetReplicaState) -> ApplyResult {
        let state = replica_state(c.state)?;
        let slab = self.slab_mut(&c.volume, c.slab)?;
        if slab.epoch != c.epoch {
            return Err(invalid(format!(
                "stale epoch {} (slab is at {})",
                c.epoch, slab.epoch
            )));
        }
        let replica = slab
            .replicas
            .get_mut(c.replica as usize)
            .ok_or(not_found("replica", c.replica))?;
        replica.state = state as i32;
        Ok(())
    }

    fn attach_volume(&mut self, c: &AttachVolume) -> ApplyResult {
        let node = self.nodes.get(&c.node).ok_or(not_found("node", c.node))?;
        if node.state != NodeState::Up as i32 && node.state != NodeState::Maintenance as i32 {
            return Err(invalid(format!("node {} is not up", node.name)));
        }
        let holder_gone = |n: u64| {
            self.nodes.get(&n).is_none_or(|h| {
                h.state == NodeState::Down as i32 || h.state == NodeState::Retired as i32
            })
        };
        let vol = self
            .volumes
            .get(&c.volume)
            .ok_or(not_found("volume", &c.volume))?;
        let takeover = match &vol.attachment {
            None => false,
            Some(a) if c.takeover && holder_gone(a.node) => true,
            Some(a) => {
                let holder = self
                    .nodes
                    .get(&a.node)
                    .map_or(String::new(), |n| n.name.clone());
                return Err(invalid(format!(
                    "volume {} is attached to node {holder}, which is up; detach it there first",
                    c.volume
                )));
            }
        };
        let Some(vol) = self.volumes.get_mut(&c.volume) else {
            return Err(not_found("volume", &c.volume));
        };
        if takeover {
            for slab in vol.slabs.values_mut() {
                slab.epoch += 1;
            }
        }
        vol.last_generation += 1;
        vol.attachment = Some(Attachment {
            node: c.node,
            generation: vol.last_generation,
        });
        Ok(())
    }

    fn detach_volume(&mut self, c: &DetachVolume) -> ApplyResult {
        let vol = self
            .volumes
            .get_mut(&c.volume)
            .ok_or(not_found("volume", &c.volume))?;
        match &vol.attachment {
            Some(a) if a.node == c.node => {
                vol.attachment = None;
                Ok(())
            }
            Some(a) => Err(invalid(format!(
                "volume {} is attached to node {}, not {}",
                c.volume, a.node, c.node
            ))),
            None => Err(invalid(format!("volume {} is not attached", c.volume))),
        }
    }

    fn update_node(&mut self, c: &UpdateNode) -> ApplyResult {
        self.live_node(c.node)?;
        if c.address.is_empty() {
            return Err(invalid("node address is empty"));
        }
        if let Some(other) = self.nodes.values().find(|n| {
            n.id != c.node && n.address == c.address && n.state != NodeState::Retired as i32
        }) {
            return Err(invalid(format!(
                "address {} is node {}'s",
                c.address, other.name
            )));
        }
        if let Some(n) = self.nodes.get_mut(&c.node) {
            n.address = c.address.clone();
            n.nbd_address = c.nbd_address.clone();
            n.iscsi_address = c.iscsi_address.clone();
            n.replication_address = c.replication_address.clone();
        }
        Ok(())
    }

    fn change_replicas(&mut self, c: &ChangeReplicas) -> ApplyResult {
        let mut states = Vec::with_capacity(c.states.len());
        for s in &c.states {
            states.push(replica_state(*s)?);
        }
        let slab = self.slab_mut(&c.volume, c.slab)?;
        if slab.epoch != c.epoch {
            return Err(invalid(format!(
                "stale epoch {} (slab is at {})",
                c.epoch, slab.epoch
            )));
        }
        if states.len() != slab.replicas.len() {
            return Err(invalid(format!(
                "{} replica states for a slab of {} replicas",
                states.len(),
                slab.replicas.len()
            )));
        }
        if !states.contains(&ReplicaState::Current) {
            return Err(invalid("a slab must keep at least one current replica"));
        }
        let placing = !c.disks.is_empty() || !c.extents.is_empty();
        if placing && (c.disks.len() != states.len() || c.extents.len() != states.len()) {
            return Err(invalid("disks and extents must name every replica"));
        }
        let replicas = slab.replicas.clone();
        let mut placed = Vec::new();
        for (i, r) in replicas.iter().enumerate() {
            let (disk_id, extent) = match (c.disks.get(i), c.extents.get(i)) {
                (Some(d), Some(e)) if *e != UNPLACED => (*d, *e),
                _ => {
                    if r.extent == UNPLACED && states[i] != ReplicaState::Stale {
                        return Err(invalid(format!(
                            "replica {i} has no extent; it must be placed before it serves"
                        )));
                    }
                    continue;
                }
            };
            if r.extent != UNPLACED {
                return Err(invalid(format!("replica {i} already has an extent")));
            }
            let es = self.extent_size()?;
            let disk = self.disks.get(&disk_id).ok_or(not_found("disk", disk_id))?;
            if disk.node != r.node || disk.state != DiskState::Online as i32 {
                return Err(invalid(format!(
                    "disk {disk_id} is not an online disk of node {}",
                    r.node
                )));
            }
            if extent >= disk.capacity_bytes / es
                || disk.allocated_extents.binary_search(&extent).is_ok()
            {
                return Err(invalid(format!(
                    "extent {extent} of disk {disk_id} is not free"
                )));
            }
            placed.push((i, disk_id, extent));
        }
        for (_, d, e) in &placed {
            if let Some(disk) = self.disks.get_mut(d)
                && let Err(pos) = disk.allocated_extents.binary_search(e)
            {
                disk.allocated_extents.insert(pos, *e);
            }
        }
        let slab = self.slab_mut(&c.volume, c.slab)?;
        for (i, d, e) in placed {
            if let Some(r) = slab.replicas.get_mut(i) {
                r.disk = d;
                r.extent = e;
            }
        }
        for (r, s) in slab.replicas.iter_mut().zip(states) {
            r.state = s as i32;
        }
        slab.epoch += 1;
        Ok(())
    }

    fn start_repair(&mut self, c: &RepairJob) -> ApplyResult {
        if self.repairs.contains_key(&c.id) {
            return Err(exists("repair job", c.id));
        }
        if self
            .repairs
            .values()
            .any(|j| j.volume == c.volume && j.slab == c.slab && j.replica == c.replica)
        {
            return Err(invalid(format!(
                "replica {} of {}/{} is already being repaired",
                c.replica, c.volume, c.slab
            )));
        }
        self.set_replica_state(&SetReplicaState {
            volume: c.volume.clone(),
            slab: c.slab,
            replica: c.replica,
            epoch: c.epoch,
            state: ReplicaState::Rebuilding as i32,
        })?;
        self.repairs.insert(c.id, c.clone());
        Ok(())
    }

    fn finish_repair(&mut self, c: &FinishRepair) -> ApplyResult {
        let job = self
            .repairs
            .get(&c.id)
            .ok_or(not_found("repair job", c.id))?
            .clone();
        self.set_replica_state(&SetReplicaState {
            volume: job.volume.clone(),
            slab: job.slab,
            replica: job.replica,
            epoch: job.epoch,
            state: ReplicaState::Current as i32,
        })?;
        self.repairs.remove(&c.id);
        Ok(())
    }
}
