//! The one error type of the erasure crate.
//!
//! Every refusal names the shard or buffer at fault and the numbers that did
//! not fit, so a log line is enough to see which caller got the stripe wrong.
//! A call that returns an error has changed none of its output buffers.

use std::fmt;

/// Which kind of shard an index or count refers to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShardKind {
    /// One of the `k` data shards.
    Data,
    /// One of the `m` parity shards.
    Parity,
    /// Any of the `k + m` shards of a stripe, data first.
    Any,
}

impl fmt::Display for ShardKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ShardKind::Data => "data",
            ShardKind::Parity => "parity",
            ShardKind::Any => "stripe",
        })
    }
}

/// One buffer handed to a call, for error messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Buffer {
    /// Data shard `i` (`0..k`).
    Data(usize),
    /// Parity shard `i` (`0..m`).
    Parity(usize),
    /// The old bytes of a read-modify-write.
    Old,
    /// The new bytes of a read-modify-write.
    New,
    /// The delta (old XOR new) of a read-modify-write.
    Delta,
}

impl fmt::Display for Buffer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Buffer::Data(i) => write!(f, "data shard {i}"),
            Buffer::Parity(i) => write!(f, "parity shard {i}"),
            Buffer::Old => f.write_str("old data"),
            Buffer::New => f.write_str("new data"),
            Buffer::Delta => f.write_str("delta"),
        }
    }
}

/// Why an erasure-coding call was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ErasureError {
    /// The code's geometry is outside what s2d supports
    /// (`k >= 2`, `m` in {1, 2}, `k + m <= 16`).
    #[error("unsupported erasure geometry {data}+{parity}: {reason}")]
    BadGeometry {
        /// `k`, the data shards asked for.
        data: usize,
        /// `m`, the parity shards asked for.
        parity: usize,
        /// What is wrong with it.
        reason: &'static str,
    },

    /// A call was handed the wrong number of shards.
    #[error("expected {expected} {kind} shards, got {got}")]
    ShardCount {
        /// Which shards were counted.
        kind: ShardKind,
        /// How many the code has.
        expected: usize,
        /// How many the caller passed.
        got: usize,
    },

    /// A buffer's length differs from the others of the same call. All
    /// buffers of one call cover the same byte range of their shards.
    #[error("shard size mismatch: {buffer} is {got} bytes, expected {expected}")]
    ShardSize {
        /// The buffer that does not match.
        buffer: Buffer,
        /// The length of the first buffer of the call.
        expected: usize,
        /// Its length.
        got: usize,
    },

    /// Fewer than `k` shards are present: the stripe cannot be rebuilt.
    #[error(
        "too many shards missing: {present} of {total} present, {needed} needed to reconstruct"
    )]
    TooFewShards {
        /// Shards present.
        present: usize,
        /// Shards needed (`k`).
        needed: usize,
        /// Shards of a stripe (`k + m`).
        total: usize,
    },

    /// A shard index past the end of the code.
    #[error("{kind} shard index {index} out of range: the code has {count}")]
    IndexOutOfRange {
        /// Which shards the index counts.
        kind: ShardKind,
        /// The index passed.
        index: usize,
        /// How many shards of that kind there are.
        count: usize,
    },

    /// The coding library refused a call that passed this crate's checks.
    /// Not expected to happen: it would be a bug here or in the library.
    #[error("erasure coding backend failed: {0}")]
    Backend(String),
}
