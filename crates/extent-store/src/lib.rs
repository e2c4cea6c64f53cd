//! The extent store: s2d's on-disk format and everything a node does with
//! its local disks.
//!
//! - [`format`]: the bytes on disk (superblocks, extent table, checksum
//!   entries, write-intent bits) and their invariants.
//! - [`engine`]: where I/O runs (io_uring thread or sync thread pool).
//! - [`disk`]: one formatted disk, block-aligned verified I/O on extents.
//! - [`store`]: all disks of a node as one set of extents, allocation.
//! - [`check`]: the offline verifier behind `storaged check`.
//!
//! What lives elsewhere: which volume offsets map to which extents and the
//! read-modify-write of unaligned requests are the volume layer's
//! (storaged); where extents go across nodes is the placement crate's.

pub mod check;
pub mod disk;
pub mod engine;
pub mod error;
pub mod format;
pub mod metrics;
pub mod store;

pub use engine::{EngineChoice, EngineKind};
pub use error::StoreError;
pub use format::{CsumEntry, ExtentOwner, FORMAT_VERSION};
pub use store::{DiskStatus, ExtentAddr, Store, StoreConfig};

/// CRC32C (Castagnoli), the checksum of every 4 KiB block and of every
/// metadata record. Hardware-accelerated through crc-fast.
pub fn crc32c(data: &[u8]) -> u32 {
    crc_fast::checksum(crc_fast::CrcAlgorithm::Crc32Iscsi, data) as u32
}

#[cfg(test)]
mod tests {
    #[test]
    fn crc32c_matches_the_standard_check_value() {
        // The CRC-32C check value of "123456789" (RFC 3720 appendix B.4).
        assert_eq!(super::crc32c(b"123456789"), 0xe306_9283);
    }
}
