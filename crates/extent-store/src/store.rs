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
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
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

/// Disks one store holds at most.
pub const DISKS_MAX: usize = 64;

/// The free extents of a disk, as a stack handing out low extents first
/// (keeps a young disk compact).
fn free_list(disk: &Disk) -> Vec<u32> {
    let mut f: Vec<u32> = disk
        .records()
        .iter()
        .enumerate()
        .filter(|(_, r)| matches!(r, Some(r) if r.owner.is_none()))
        .map(|(i, _)| i as u32)
        .collect();
    f.reverse();
    f
}

pub struct Store {
    /// The disks in `--disk` order, then those added while running
    /// ([`Store::add_disk`]); the first `count` slots are set, and a set
    /// slot never changes, so an [`ExtentAddr`] stays valid for good.
    slots: Box<[OnceLock<Arc<Disk>>]>,
    count: AtomicUsize,
    extent_size: u64,
    free: Mutex<Vec<Vec<u32>>>,
    /// Per disk: false once the pool stopped placing extents on it (it is
    /// draining or failed); its extents keep serving.
    accepting: Box<[AtomicBool]>,
    /// How disks are opened (and formatted), for disks added later.
    options: DiskOptions,
    /// One disk added at a time.
    adding: tokio::sync::Mutex<()>,
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
            free.push(free_list(&disk));
            disks.push(Arc::new(disk));
        }
        if disks.len() > DISKS_MAX {
            return Err(StoreError::Config(format!(
                "{} disks given; a node takes at most {DISKS_MAX}",
                disks.len()
            )));
        }
        let slots: Box<[OnceLock<Arc<Disk>>]> = (0..DISKS_MAX).map(|_| OnceLock::new()).collect();
        for (slot, d) in slots.iter().zip(&disks) {
            let _ = slot.set(d.clone());
        }
        Ok(Store {
            slots,
            count: AtomicUsize::new(disks.len()),
            accepting: (0..DISKS_MAX).map(|_| AtomicBool::new(true)).collect(),
            extent_size: cfg.extent_size,
            free: Mutex::new(free),
            options: opts,
            adding: tokio::sync::Mutex::new(()),
        })
    }

    /// Opens (formatting it when blank, creating a sparse file of the
    /// configured size when missing) one more disk into the running store
    /// and returns its index. Refused, changing nothing, for a disk of
    /// another pool, one already in the store, or another extent size.
    pub async fn add_disk(&self, path: &std::path::Path) -> Result<usize, StoreError> {
        let _one = self.adding.lock().await;
        let index = self.count.load(Ordering::Acquire);
        if index >= DISKS_MAX {
            return Err(StoreError::Config(format!(
                "the node has {index} disks, the most it can hold"
            )));
        }
        if let Some(d) = self.disks().iter().find(|d| d.path == path) {
            return Err(StoreError::DuplicateDisk {
                path: path.to_path_buf(),
                disk_id: d.sb.disk_id,
            });
        }
        let (disk, formatted) = Disk::open(path, &self.options).await?;
        if disk.sb.extent_size != self.extent_size {
            return Err(StoreError::ExtentSizeMismatch {
                path: path.to_path_buf(),
                disk: disk.sb.extent_size,
                pool: self.extent_size,
            });
        }
        if self.disks().iter().any(|d| d.sb.disk_id == disk.sb.disk_id) {
            return Err(StoreError::DuplicateDisk {
                path: path.to_path_buf(),
                disk_id: disk.sb.disk_id,
            });
        }
        let f = free_list(&disk);
        tracing::info!(disk = %path.display(), index, formatted, extents = disk.layout.extent_count, "disk added");
        // The free list first, then the slot, then the count: an allocation
        // sees the disk only once all three are there.
        self.free.lock().unwrap_or_else(|p| p.into_inner()).push(f);
        let _ = self.slots[index].set(Arc::new(disk));
        self.count.store(index + 1, Ordering::Release);
        Ok(index)
    }

    pub fn extent_size(&self) -> u64 {
        self.extent_size
    }

    /// The disk of an address this store handed out.
    pub fn disk(&self, addr: ExtentAddr) -> &Arc<Disk> {
        self.slot(addr.disk as usize)
    }

    fn slot(&self, i: usize) -> &Arc<Disk> {
        match self.slots.get(i).and_then(OnceLock::get) {
            Some(d) => d,
            // Addresses come from this store's own allocations and extent
            // tables, whose disks are never taken out.
            None => unreachable!("extent address of disk {i}, which this store does not hold"),
        }
    }

    /// The disks, in index order.
    pub fn disks(&self) -> Vec<Arc<Disk>> {
        (0..self.count.load(Ordering::Acquire))
            .map(|i| self.slot(i).clone())
            .collect()
    }

    /// Every owned extent with its owner, as recorded on disk.
    pub fn owned_extents(&self) -> Vec<(ExtentOwner, ExtentAddr)> {
        let mut out = Vec::new();
        for (d, disk) in self.disks().iter().enumerate() {
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
            tracing::info!(disk = %self.slot(disk).path.display(), accepting, "disk placement changed");
        }
    }

    /// Allocate an extent for `owner`, on the accepting disk with the
    /// largest share of free extents. Durable before it returns.
    pub async fn allocate(&self, owner: ExtentOwner) -> Result<ExtentAddr, StoreError> {
        let addr = {
            let mut free = self.free.lock().unwrap_or_else(|p| p.into_inner());
            let n = free.len().min(self.count.load(Ordering::Acquire));
            let best = (0..n)
                .filter(|&d| !free[d].is_empty() && self.accepting[d].load(Ordering::Relaxed))
                .max_by(|&a, &b| {
                    let fa = free[a].len() as u128 * self.slot(b).layout.extent_count as u128;
                    let fb = free[b].len() as u128 * self.slot(a).layout.extent_count as u128;
                    fa.cmp(&fb).then(b.cmp(&a))
                })
                .ok_or(StoreError::Full { disks: n })?;
            let extent = free[best].pop().ok_or(StoreError::Full { disks: n })?;
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
            .map(|d| self.slot(d as usize).sync())
            .collect();
        for r in futures::future::join_all(futs).await {
            r?;
        }
        Ok(())
    }

    pub async fn sync_all(&self) -> Result<(), StoreError> {
        self.sync_disks(0..self.count.load(Ordering::Acquire) as u16)
            .await
    }

    /// Flush every disk and clear its intent bits (clean shutdown).
    pub async fn close(&self) -> Result<(), StoreError> {
        for d in self.disks() {
            d.close().await?;
        }
        Ok(())
    }

    pub fn status(&self) -> Vec<DiskStatus> {
        let free = self.free.lock().unwrap_or_else(|p| p.into_inner());
        self.disks()
            .iter()
            .enumerate()
            .map(|(i, d)| {
                let quarantined = d.records().iter().filter(|r| r.is_none()).count() as u64;
                DiskStatus {
                    path: d.path.clone(),
                    disk_id: d.sb.disk_id,
                    capacity_bytes: d.layout.extent_count * d.layout.extent_size,
                    extents_total: d.layout.extent_count,
                    extents_free: free.get(i).map_or(0, |f| f.len() as u64),
                    extents_quarantined: quarantined,
                    engine: d.engine_kind(),
                }
            })
            .collect()
    }
}
