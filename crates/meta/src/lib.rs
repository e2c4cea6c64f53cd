//! `meta`: the pool metadata of s2d, kept consistent by Raft.
//!
//! Layers, bottom up:
//! - [`state`]: the deterministic replicated state machine (nodes, disks, pool
//!   settings, volumes, slabs, attachments, repair jobs) and the commands that
//!   change it, serialised with prost.
//! - [`storage`]: the Raft log, hard state, conf state and snapshot persisted
//!   in redb; implements [`raft::Storage`].
//! - [`node`]: the Raft node driver around raft-rs's `RawNode`: proposals with
//!   a reply once applied, one `on_ready` in raft-rs's documented order,
//!   snapshots and log compaction, ReadIndex reads.
//!
//! The driver is transport-agnostic: it takes incoming messages through
//! `step` and hands outgoing ones back; storaged's gRPC layer (or a test
//! router) moves them between nodes.
//!
//! Why redb for the log store: it is pure Rust (no C++ toolchain, unlike
//! RocksDB), maintained, has ACID transactions with a durable commit, so one
//! `Ready` (entries + hard state + snapshot) is persisted atomically, and its
//! ordered `u64` keys make log ranges, truncation and compaction simple range
//! operations. The log of pool metadata is small (kilobytes per operation,
//! compacted by snapshots), so its write amplification is irrelevant here.

pub mod error;
pub mod node;
pub mod state;
pub mod storage;

pub use error::{Error, Result};

/// The raft-rs and protobuf versions the driver speaks, for transports that
/// move [`raft::eraftpb::Message`]s.
pub use {protobuf, raft};
