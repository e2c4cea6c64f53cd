//! The seam between s2d's front ends (NBD, iSCSI) and the volume layer.
//!
//! A front end speaks a wire protocol and turns each request into a call on a
//! [`BlockVolume`]; it never knows how or where the bytes are stored. The
//! volume layer in `storaged` implements these traits for local (`simple`)
//! volumes today and mirrored / parity volumes later, so the front ends gain
//! every layout without change.
//!
//! Invariants every implementation keeps:
//! - Byte offsets and lengths may be unaligned; the volume handles
//!   read-modify-write itself. `offset + len` past [`BlockVolume::size`] is
//!   [`BlockError::OutOfRange`] and changes nothing.
//! - A write that returned `Ok` is durable once a later [`BlockVolume::flush`]
//!   returned `Ok` (on any connection: flush covers every write acknowledged
//!   before it started), or at once when it was sent with `fua`.
//! - Reads never return data whose checksum failed: that is
//!   [`BlockError::Checksum`].

mod aligned;

pub use aligned::AlignedBuf;

use std::sync::Arc;

/// Size of the checksummed block, the unit of allocation inside an extent.
pub const BLOCK_SIZE: usize = 4096;

/// Errors a volume reports to a front end. Each maps to one protocol error
/// code (NBD errno, SCSI sense), see [`BlockError::errno`].
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    #[error("request [{offset}, +{len}) is past the end of the volume ({size} bytes)")]
    OutOfRange { offset: u64, len: u64, size: u64 },
    /// Data failed its checksum; `offset` locates the bad block (the
    /// store's disk offset, as `storaged check` reports it).
    #[error("checksum mismatch at disk offset {offset}")]
    Checksum { offset: u64 },
    #[error("pool is full: no free extent for volume {volume}")]
    NoSpace { volume: String },
    #[error("volume {0} not found")]
    NotFound(String),
    #[error("volume {0} is being deleted or shut down")]
    Gone(String),
    #[error("I/O error: {0}")]
    Io(String),
}

impl BlockError {
    /// The Linux errno a front end should report for this error.
    pub fn errno(&self) -> i32 {
        match self {
            BlockError::OutOfRange { .. } => 22,                  // EINVAL
            BlockError::Checksum { .. } | BlockError::Io(_) => 5, // EIO
            BlockError::NoSpace { .. } => 28,                     // ENOSPC
            BlockError::NotFound(_) | BlockError::Gone(_) => 5,
        }
    }
}

/// One run of blocks with the same allocation state, as reported by
/// [`BlockVolume::block_status`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockRun {
    pub len: u64,
    /// No storage is allocated for the run (it was never written or was trimmed).
    pub hole: bool,
    /// The run reads as zeros.
    pub zero: bool,
}

/// A virtual disk as a front end sees it.
#[async_trait::async_trait]
pub trait BlockVolume: Send + Sync + 'static {
    /// Name of the volume (the NBD export name, the iSCSI target suffix).
    fn name(&self) -> &str;
    /// Current size in bytes (a multiple of [`BLOCK_SIZE`]).
    fn size(&self) -> u64;
    /// Read `len` bytes at `offset`.
    async fn read(&self, offset: u64, len: usize) -> Result<AlignedBuf, BlockError>;
    /// Write `data` at `offset`; with `fua` it is durable before returning.
    async fn write(&self, offset: u64, data: AlignedBuf, fua: bool) -> Result<(), BlockError>;
    /// Make every write acknowledged before this call durable.
    async fn flush(&self) -> Result<(), BlockError>;
    /// Discard a range: whole blocks inside it are released and read as
    /// zeros; partial blocks at the edges are zeroed in place.
    async fn trim(&self, offset: u64, len: u64) -> Result<(), BlockError>;
    /// Make a range read as zeros. With `may_unmap` whole blocks are released
    /// (like trim); without it they stay allocated.
    async fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        may_unmap: bool,
        fua: bool,
    ) -> Result<(), BlockError>;
    /// Allocation state of `[offset, offset + len)`, as consecutive runs that
    /// cover at least the first byte and at most the whole range.
    async fn block_status(&self, offset: u64, len: u64) -> Result<Vec<BlockRun>, BlockError>;
}

/// Summary of a volume a front end may serve, for discovery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeSummary {
    pub name: String,
    pub size: u64,
}

/// The set of volumes this node can serve.
#[async_trait::async_trait]
pub trait VolumeProvider: Send + Sync + 'static {
    /// Volumes available for export, sorted by name.
    async fn list(&self) -> Vec<VolumeSummary>;
    /// Open a volume for I/O by name.
    async fn open(&self, name: &str) -> Result<Arc<dyn BlockVolume>, BlockError>;
}
