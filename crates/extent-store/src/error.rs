//! Errors of the extent store. Every message names the disk it concerns.

use std::path::PathBuf;
use uuid::Uuid;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("disk {}: {what}: {source}", path.display())]
    Io {
        path: PathBuf,
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("disk {} has a bad superblock and is refused: {reason}", path.display())]
    BadSuperblock { path: PathBuf, reason: String },
    #[error("disk {} belongs to pool {disk_pool}, not to this node's pool {our_pool}; refused", path.display())]
    ForeignPool {
        path: PathBuf,
        disk_pool: Uuid,
        our_pool: Uuid,
    },
    #[error("disk {} is listed twice (disk id {disk_id})", path.display())]
    DuplicateDisk { path: PathBuf, disk_id: Uuid },
    #[error("disk {} was formatted with {disk} byte extents, the pool uses {pool}", path.display())]
    ExtentSizeMismatch { path: PathBuf, disk: u64, pool: u64 },
    #[error("checksum mismatch on disk {} extent {extent} block {block} (disk offset {disk_offset})", path.display())]
    Checksum {
        path: PathBuf,
        extent: u32,
        block: u64,
        disk_offset: u64,
    },
    #[error("pool full: no free extent on any of {disks} disks")]
    Full { disks: usize },
    #[error("{0}")]
    Config(String),
}
