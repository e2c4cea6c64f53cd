//! The crate's error type.
//!
//! Invariant: every failure that input, disk or network can cause surfaces as
//! an [`Error`]; nothing in `meta` panics on such input.

/// Everything that can go wrong in `meta`.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The embedded store (redb) failed: open, transaction, table or commit.
    #[error("metadata store: {0}")]
    Store(#[from] redb::Error),
    /// raft-rs refused an operation (e.g. a proposal dropped because there is no leader).
    #[error("raft: {0}")]
    Raft(#[from] raft::Error),
    /// A stored or received protobuf (raft entry, snapshot, hard state) did not decode.
    #[error("corrupt raft record {what}: {source}")]
    RaftCodec {
        /// Which record failed.
        what: &'static str,
        /// The protobuf error.
        source: protobuf::ProtobufError,
    },
    /// A state snapshot or command did not decode with prost.
    #[error("corrupt {what}: {source}")]
    Decode {
        /// Which message failed.
        what: &'static str,
        /// The prost error.
        source: prost::DecodeError,
    },
    /// The node driver stopped before the request completed.
    #[error("metadata node shut down before the request completed")]
    Shutdown,
}

impl Error {
    pub(crate) fn raft_codec(what: &'static str) -> impl FnOnce(protobuf::ProtobufError) -> Error {
        move |source| Error::RaftCodec { what, source }
    }
}

/// Convenience alias.
pub type Result<T, E = Error> = std::result::Result<T, E>;
