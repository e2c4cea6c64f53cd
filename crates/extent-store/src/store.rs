//! All disks of one node as one set of extents.
//!
//! The store opens (and formats when blank) every disk it is given, checks
//! they all belong to this node's pool and share its extent size, and hands
//! out extents. An extent's owner is durable on disk before
//! [`Store::allocate`] returns, so volume metadata survives a crash at any
//! point: on restart the owners are read back from the extent tables.
//!
//! Invariant: an extent is in exactly one of: the free lists, owned (in a
//! disk's table), or quarantined (its record is damaged in both copies).

use crate::disk::{Disk, DiskOptions};
use crate::engine::{EngineChoice, EngineKind};
use crate::error::StoreError;
use crate::format::{CsumEntry, ExtentOwner};
use block_api::AlignedBuf;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use uuid::Uuid;

/// Where an extent lives on this node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ExtentAddr {
    /// Index into the store's disks (the order of `--disk` flags).
    pub disk: u16,
    pub extent: u32,
}

#[derive(Debug, Clone)]
pub struct StoreConfig {
    pub pool_id: Uuid,
    pub node_id: Uuid,
    pub disks: Vec<PathBuf>,
    pub create_size: Option<u64>,
    pub extent_size: u64,
    pub engine: EngineChoice,
}

/// Capacity and use of one disk, for `pool status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskStatus {
    pub path: PathBuf,
    pub disk_id: Uuid,
    pub capacity_bytes: u64,
    pub extents_total: u64,
    pub extents_free: u64,
    pub extents_quarantined: u64,
    pub engine: EngineKind,
}

pub struct Store {
    disks: Vec<Arc<Disk>>,
    extent_size: u64,
    free: Mutex<Vec<Vec<u32>>>,
    /// Per disk: false once the pool stopped placing extents on it (it is
    /// draining or failed); its extents keep serving.
    accepting: Vec<AtomicBool>,
}

impl Store {
    /// Open every disk of `cfg`, formatting blank ones into the pool.
    pub async fn open(cfg: &StoreConfig) -> Result<Store, StoreError> {
        if cfg.disks.is_empty() {
            return Err(StoreError::Config(
                "no disks given (use --disk PATH)".into(),
            ));
        }
        let opts = DiskOptions {
            pool_id: cfg.pool_id,
            node_id: cfg.node_id,
            create_size: cfg.create_size,
            extent_size: cfg.extent_size,
            engine: cfg.engine,
        };
        let mut disks: Vec<Arc<Disk>> = Vec::new();
        let mut free = Vec::new();
        for path in &cfg.disks {
            let (disk, formatted) = Disk::open(path, &opts).await?;
            if formatted {
                tracing::info!(disk = %path.display(), extents = disk.layout.extent_count, "formatted blank disk");
            }
            if disk.sb.extent_size != cfg.extent_size {
                return Err(StoreError::ExtentSizeMismatch {
                    path: path.clone(),
                    disk: disk.sb.extent_size,
                    pool: cfg.extent_size,
                });
            }
            if disks.iter().any(|d| d.sb.disk_id == disk.sb.disk_id) {
                return Err(StoreError::DuplicateDisk {
                    path: path.clone(),
                    disk_id: disk.sb.disk_id,
                });
            }
            // Hand out low extents first: keeps a young disk compact.
            let mut f: Vec<u32> = disk
                .records()
                .iter()
                .enumerate()
                .filter(|(_, r)| matches!(r, Some(r) if r.owner.is_none()))
                .map(|(i, _)| i as u32)
                .collect();
            f.reverse();
            free.push(f);
            disks.push(Arc::new(disk));
        }
        Ok(Store {
            accepting: disks.iter().map(|_| AtomicBool::new(true)).collect(),
            disks,
            extent_size: cfg.extent_size,
            free: Mutex::new(free),
        })
    }

    pub fn extent_size(&self) -> u64 {
        self.extent_size
    }

    pub fn disk(&self, addr: ExtentAddr) -> &Arc<Disk> {
        &self.disks[addr.disk as usize]
    }

    pub fn disks(&self) -> &[Arc<Disk>] {
        &self.disks
    }

    /// Every owned extent with its owner, as recorded on disk.
    pub fn owned_extents(&self) -> Vec<(ExtentOwner, ExtentAddr)> {
        let mut out = Vec::new();
        for (d, disk) in self.disks.iter().enumerate() {
            for (e, r) in disk.records().iter().enumerate() {
                if let Some(owner) = r.and_then(|r| r.owner) {
                    out.push((
                        owner,
                        ExtentAddr {
                            disk: d as u16,
                            extent: e as u32,
                        },
                    ));
                }
            }
        }
        out
    }

    /// Whether new extents may go to disk `disk` (index in `--disk` order).
    /// A disk that stops accepting keeps serving the extents it holds.
    pub fn set_accepting(&self, disk: usize, accepting: bool) {
        if let Some(a) = self.accepting.get(disk)
            && a.swap(accepting, Ordering::Relaxed) != accepting
        {
            tracing::info!(disk = %self.disks[disk].path.display(), accepting, "disk placement changed");
        }
    }

    /// Allocate an extent for `owner`, on the accepting disk with the
    /// largest share of free extents. Durable before it returns.
    pub async fn allocate(&self, owner: ExtentOwner) -> Result<ExtentAddr, StoreError> {
        let addr = {
            let mut free = self.free.lock().unwrap_or_else(|p| p.into_inner());
            let best = (0..self.disks.len())
                .filter(|&d| !free[d].is_empty() && self.accepting[d].load(Ordering::Relaxed))
                .max_by(|&a, &b| {
                    let fa = free[a].len() as u128 * self.disks[b].layout.extent_count as u128;
                    let fb = free[b].len() as u128 * self.disks[a].layout.extent_count as u128;
                    fa.cmp(&fb).then(b.cmp(&a))
                })
                .ok_or(StoreError::Full {
                    disks: self.disks.len(),
                })?;
            let extent = free[best].pop().ok_or(StoreError::Full {
                disks: self.disks.len(),
            })?;
            ExtentAddr {
                disk: best as u16,
                extent,
            }
        };
        if let Err(e) = self.disk(addr).set_owner(addr.extent, Some(owner)).await {
            self.return_free(addr);
            return Err(e);
        }
        Ok(addr)
    }

    fn return_free(&self, addr: ExtentAddr) {
        let mut free = self.free.lock().unwrap_or_else(|p| p.into_inner());
        free[addr.disk as usize].push(addr.extent);
    }

    /// Release an extent (durably) and make it allocatable again.
    pub async fn release(&self, addr: ExtentAddr) -> Result<(), StoreError> {
        self.disk(addr).set_owner(addr.extent, None).await?;
        self.return_free(addr);
        Ok(())
    }

    pub async fn read(
        &self,
        addr: ExtentAddr,
        off: u64,
        len: u64,
    ) -> Result<AlignedBuf, StoreError> {
        self.disk(addr).read(addr.extent, off, len).await
    }

    pub async fn write(
        &self,
        addr: ExtentAddr,
        off: u64,
        data: AlignedBuf,
        fua: bool,
    ) -> Result<(), StoreError> {
        self.disk(addr).write(addr.extent, off, data, fua).await
    }

    pub fn set_blocks(&self, addr: ExtentAddr, off: u64, len: u64, state: CsumEntry) {
        self.disk(addr).set_blocks(addr.extent, off, len, state)
    }

    /// Per-block state of `[off, off+len)` of an extent.
    pub fn block_states(&self, addr: ExtentAddr, off: u64, len: u64) -> Vec<CsumEntry> {
        let bs = block_api::BLOCK_SIZE as u64;
        let d = self.disk(addr);
        (off / bs..(off + len).div_ceil(bs))
            .map(|b| d.csum_entry(addr.extent, b))
            .collect()
    }

    /// Make every completed write on the given disks durable.
    pub async fn sync_disks(&self, disks: impl IntoIterator<Item = u16>) -> Result<(), StoreError> {
        let futs: Vec<_> = disks
            .into_iter()
            .map(|d| self.disks[d as usize].sync())
            .collect();
        for r in futures::future::join_all(futs).await {
            r?;
        }
        Ok(())
    }

    pub async fn sync_all(&self) -> Result<(), StoreError> {
        self.sync_disks(0..self.disks.len() as u16).await
    }

    /// Flush every disk and clear its intent bits (clean shutdown).
    pub async fn close(&self) -> Result<(), StoreError> {
        for d in &self.disks {
            d.close().await?;
        }
        Ok(())
    }

    pub fn status(&self) -> Vec<DiskStatus> {
        let free = self.free.lock().unwrap_or_else(|p| p.into_inner());
        self.disks
            .iter()
            .enumerate()
            .map(|(i, d)| {
                let quarantined = d.records().iter().filter(|r| r.is_none()).count() as u64;
                DiskStatus {
                    path: d.path.clone(),
                    disk_id: d.sb.disk_id,
                    capacity_bytes: d.layout.extent_count * d.layout.extent_size,
                    extents_total: d.layout.extent_count,
                    extents_free: free[i].len() as u64,
                    extents_quarantined: quarantined,
                    engine: d.engine_kind(),
                }
            })
            .collect()
    }
}
