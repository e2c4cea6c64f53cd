//! One formatted disk: its superblocks, extent table, checksum area and
//! write-intent bits, and block-aligned I/O on its extents.
//!
//! A `Disk` is the single owner of its file. Every data read is verified
//! against the block checksums; every data write records new checksums; the
//! durability protocol (write-intent bits, see [`crate::format`]) makes a
//! crash at any point recoverable without false checksum errors.
//!
//! Offsets given to the I/O methods are relative to an extent and must be
//! block-aligned (the volume layer does read-modify-write for unaligned
//! client requests).

use crate::engine::{EngineChoice, IoEngine};
use crate::error::StoreError;
use crate::format::{
    CsumEntry, ExtentOwner, ExtentRecord, INTENT_BYTES_PER_EXTENT, Layout, RECORD_BYTES,
    SB_A_OFFSET, SB_B_OFFSET, SlotContent, Superblock,
};
use crate::{FORMAT_VERSION, crc32c};
use block_api::{AlignedBuf, BLOCK_SIZE};
use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use uuid::Uuid;

const BS: u64 = BLOCK_SIZE as u64;

/// How to treat a disk when opening it.
#[derive(Debug, Clone)]
pub struct DiskOptions {
    pub pool_id: Uuid,
    pub node_id: Uuid,
    /// Size of the sparse file created when the path does not exist.
    pub create_size: Option<u64>,
    /// Extent size used when formatting a blank disk.
    pub extent_size: u64,
    pub engine: EngineChoice,
}

/// Per-region bookkeeping of the write-intent protocol (regions whose bit
/// is set on disk).
#[derive(Debug, Default, Clone, Copy)]
struct RegionState {
    inflight: u32,
    /// Flush generation in which the last write to the region completed.
    last_gen: u64,
}

struct IntentState {
    /// In-memory image of the on-disk intent area.
    bits: Vec<u8>,
    /// Regions whose bit is set, by global region index.
    regions: HashMap<u64, RegionState>,
    /// Current flush generation.
    generation: u64,
}

/// An open, formatted disk.
pub struct Disk {
    pub path: PathBuf,
    pub sb: Superblock,
    pub layout: Layout,
    file: File,
    engine: IoEngine,
    /// The checksum area, memory-mapped from a buffered descriptor. Entries
    /// are read and written as atomics through `csum_ptr`.
    _csum_map: memmap2::MmapMut,
    csum_ptr: *const AtomicU64,
    csum_len: usize,
    records: Mutex<Vec<Option<ExtentRecord>>>,
    /// Serialises extent-table writes (each is A, sync, B, sync).
    table_io: tokio::sync::Mutex<()>,
    /// Write-intent bookkeeping; held only briefly, never across I/O.
    intent: Mutex<IntentState>,
    /// Serialises writes of the intent area, so an older image never
    /// lands after a newer one.
    intent_io: tokio::sync::Mutex<()>,
    /// I/O errors (but for a full filesystem) and checksum failures since
    /// the disk was opened.
    errors: AtomicU64,
}

// SAFETY: csum_ptr points into _csum_map, which lives as long as the Disk and
// is only accessed through atomics.
unsafe impl Send for Disk {}
// SAFETY: as above.
unsafe impl Sync for Disk {}

fn io_err(path: &Path, what: &str, e: std::io::Error) -> StoreError {
    StoreError::Io {
        path: path.to_path_buf(),
        what: what.to_string(),
        source: e,
    }
}

/// How long to wait for a disk held by another process (for example one
/// that was just killed and whose last writes are still in flight).
const DISK_LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// Take an exclusive `flock` on the disk. The lock belongs to the open file
/// description, and a killed process's in-flight I/O keeps that alive until
/// the I/O completes; so holding it means no other process uses the disk
/// and no write of a dead predecessor can still land after our recovery.
async fn lock_disk(file: &File, path: &Path) -> Result<(), StoreError> {
    let deadline = std::time::Instant::now() + DISK_LOCK_WAIT;
    loop {
        // SAFETY: flock on an fd we own.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
            return Ok(());
        }
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EWOULDBLOCK) {
            return Err(io_err(path, "lock disk", e));
        }
        if std::time::Instant::now() > deadline {
            return Err(StoreError::Config(format!(
                "disk {} is in use by another process (waited {DISK_LOCK_WAIT:?} for its lock)",
                path.display()
            )));
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// Size in bytes of a file or block device.
fn device_size(f: &File) -> std::io::Result<u64> {
    use std::io::{Seek, SeekFrom};
    let mut f = f;
    f.seek(SeekFrom::End(0))
}

/// Read both superblock slots of a file (buffered, not O_DIRECT).
pub(crate) fn read_slots(f: &File) -> std::io::Result<(SlotContent, SlotContent)> {
    let mut a = vec![0u8; BLOCK_SIZE];
    let mut b = vec![0u8; BLOCK_SIZE];
    f.read_exact_at(&mut a, SB_A_OFFSET)?;
    f.read_exact_at(&mut b, SB_B_OFFSET)?;
    Ok((Superblock::decode(&a), Superblock::decode(&b)))
}

/// Pick the superblock from the two slots, or say why the disk is refused.
/// Returns the superblock and whether the other slot needs rewriting.
pub(crate) fn choose_superblock(
    path: &Path,
    a: SlotContent,
    b: SlotContent,
) -> Result<Option<(Superblock, bool)>, StoreError> {
    match (a, b) {
        (SlotContent::Blank, SlotContent::Blank) => Ok(None),
        (SlotContent::Valid(a), SlotContent::Valid(b)) => {
            let differ = a != b;
            Ok(Some((a, differ)))
        }
        (SlotContent::Valid(a), other) => {
            tracing::warn!(disk = %path.display(), second = ?other, "second superblock is damaged; rewriting it from the first");
            Ok(Some((a, true)))
        }
        (other, SlotContent::Valid(b)) => {
            tracing::warn!(disk = %path.display(), first = ?other, "first superblock is damaged; using the second and rewriting the first");
            Ok(Some((b, true)))
        }
        (a, b) => Err(StoreError::BadSuperblock {
            path: path.to_path_buf(),
            reason: format!(
                "first copy: {}; second copy: {}",
                describe(&a),
                describe(&b)
            ),
        }),
    }
}

fn describe(s: &SlotContent) -> String {
    match s {
        SlotContent::Blank => "blank".into(),
        SlotContent::Valid(_) => "valid".into(),
        SlotContent::Invalid(why) => why.clone(),
    }
}

/// Pick the valid record with the higher sequence of the two table copies.
pub(crate) fn merge_records(
    a: Option<ExtentRecord>,
    b: Option<ExtentRecord>,
) -> Option<ExtentRecord> {
    match (a, b) {
        (Some(a), Some(b)) => Some(if b.seq > a.seq { b } else { a }),
        (a, b) => a.or(b),
    }
}

impl Disk {
    /// Open the disk at `path`, creating and formatting it if it is blank.
    /// Returns the disk and whether it was formatted now.
    pub async fn open(path: &Path, opts: &DiskOptions) -> Result<(Disk, bool), StoreError> {
        if !path.exists() {
            let size = opts.create_size.ok_or_else(|| {
                StoreError::Config(format!(
                    "disk {} does not exist and no --disk-size was given to create it",
                    path.display()
                ))
            })?;
            let f = File::create_new(path).map_err(|e| io_err(path, "create disk file", e))?;
            f.set_len(size)
                .map_err(|e| io_err(path, "size disk file", e))?;
            f.sync_all()
                .map_err(|e| io_err(path, "sync new disk file", e))?;
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(path)
            .map_err(|e| io_err(path, "open disk with O_DIRECT", e))?;
        lock_disk(&file, path).await?;
        let buffered = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|e| io_err(path, "open disk", e))?;
        let size = device_size(&buffered).map_err(|e| io_err(path, "size disk", e))?;
        if size < 2 * crate::format::HEADER_BYTES {
            return Err(StoreError::Config(format!(
                "disk {} is too small ({size} bytes)",
                path.display()
            )));
        }
        let (a, b) = read_slots(&buffered).map_err(|e| io_err(path, "read superblocks", e))?;
        let name = path
            .file_name()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        let engine =
            IoEngine::start(opts.engine, &name).map_err(|e| io_err(path, "start I/O engine", e))?;
        let mut formatted = false;
        let (sb, rewrite) = match choose_superblock(path, a, b)? {
            Some(x) => x,
            None => {
                formatted = true;
                let layout = Layout::compute(size, opts.extent_size)?;
                let sb = Superblock {
                    version: FORMAT_VERSION,
                    pool_id: opts.pool_id,
                    disk_id: Uuid::new_v4(),
                    node_id: opts.node_id,
                    disk_size: size,
                    extent_size: opts.extent_size,
                    extent_count: layout.extent_count,
                };
                format_areas(&file, &engine, path, &layout).await?;
                (sb, true)
            }
        };
        if sb.pool_id != opts.pool_id {
            return Err(StoreError::ForeignPool {
                path: path.to_path_buf(),
                disk_pool: sb.pool_id,
                our_pool: opts.pool_id,
            });
        }
        if sb.disk_size > size {
            return Err(StoreError::BadSuperblock {
                path: path.to_path_buf(),
                reason: format!(
                    "formatted for {} bytes but only {size} are there",
                    sb.disk_size
                ),
            });
        }
        let layout = Layout::compute(sb.disk_size, sb.extent_size)?;
        if layout.extent_count != sb.extent_count {
            return Err(StoreError::BadSuperblock {
                path: path.to_path_buf(),
                reason: format!(
                    "extent count {} does not match its geometry",
                    sb.extent_count
                ),
            });
        }
        if rewrite {
            write_superblocks(&file, &engine, path, &sb).await?;
        }
        let records = load_records(&file, &engine, path, &layout).await?;
        // SAFETY: the mapped range lies inside the file; we are its only user
        // (the pool's data dir lock keeps other storaged processes away).
        let map = unsafe {
            memmap2::MmapOptions::new()
                .offset(layout.csum)
                .len(layout.csum_bytes as usize)
                .map_mut(&buffered)
        }
        .map_err(|e| io_err(path, "map checksum area", e))?;
        let csum_len = layout.csum_bytes as usize / 8;
        let (r, bits) = engine
            .read_exact(
                file.as_raw_fd(),
                layout.intent,
                AlignedBuf::zeroed(layout.intent_bytes as usize),
            )
            .await;
        r.map_err(|e| io_err(path, "read intent bits", e))?;
        // Taken after the last await: a raw pointer may not live across one
        // (the future must stay Send).
        let csum_ptr = map.as_ptr() as *const AtomicU64;
        let disk = Disk {
            path: path.to_path_buf(),
            sb,
            layout,
            file,
            engine,
            _csum_map: map,
            csum_ptr,
            csum_len,
            records: Mutex::new(records),
            table_io: tokio::sync::Mutex::new(()),
            intent_io: tokio::sync::Mutex::new(()),
            errors: AtomicU64::new(0),
            intent: Mutex::new(IntentState {
                bits: bits.to_vec(),
                regions: HashMap::new(),
                generation: 1,
            }),
        };
        disk.recover_intents().await?;
        Ok((disk, formatted))
    }

    fn fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    pub fn engine_kind(&self) -> crate::engine::EngineKind {
        self.engine.kind()
    }

    fn io(&self, what: &str, e: std::io::Error) -> StoreError {
        // A full filesystem under a disk file (or a quota) is no fault of
        // the disk: it is not counted toward failing it.
        let full = matches!(e.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT));
        if !full {
            self.errors.fetch_add(1, Ordering::Relaxed);
        }
        io_err(&self.path, what, e)
    }

    /// I/O errors and checksum failures since the disk was opened.
    pub fn errors(&self) -> u64 {
        self.errors.load(Ordering::Relaxed)
    }

    /// Snapshot of the extent table: `None` for a record damaged in both copies.
    pub fn records(&self) -> Vec<Option<ExtentRecord>> {
        self.records
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn entry(&self, extent: u32, block: u64) -> &AtomicU64 {
        let i = extent as usize * self.layout.blocks_per_extent() as usize + block as usize;
        assert!(i < self.csum_len, "checksum entry {i} out of range");
        // SAFETY: i < csum_len; the mapping lives as long as self.
        unsafe { &*self.csum_ptr.add(i) }
    }

    pub fn csum_entry(&self, extent: u32, block: u64) -> CsumEntry {
        CsumEntry::from_raw(self.entry(extent, block).load(Ordering::Acquire))
    }

    fn set_entry(&self, extent: u32, block: u64, e: CsumEntry) {
        self.entry(extent, block)
            .store(e.to_raw(), Ordering::Release);
    }

    fn check_range(&self, extent: u32, off: u64, len: u64) {
        assert!(
            (extent as u64) < self.layout.extent_count
                && off.is_multiple_of(BS)
                && len.is_multiple_of(BS)
                && off + len <= self.layout.extent_size,
            "extent I/O out of range: extent {extent} [{off}, +{len})"
        );
    }

    /// Record the owner of `extent` durably (table A, sync, table B, sync).
    pub async fn set_owner(
        &self,
        extent: u32,
        owner: Option<ExtentOwner>,
    ) -> Result<(), StoreError> {
        let _io = self.table_io.lock().await;
        if owner.is_some() {
            // A reused extent must not show its previous owner's blocks.
            for b in 0..self.layout.blocks_per_extent() {
                self.set_entry(extent, b, CsumEntry::Hole);
            }
        }
        let (block_index, image) = {
            let mut recs = self.records.lock().unwrap_or_else(|p| p.into_inner());
            let seq = recs.iter().flatten().map(|r| r.seq).max().unwrap_or(0) + 1;
            recs[extent as usize] = Some(ExtentRecord { seq, owner });
            let per_block = BS / RECORD_BYTES;
            let first = (extent as u64 / per_block) * per_block;
            let mut image = AlignedBuf::zeroed(BLOCK_SIZE);
            for i in 0..per_block {
                let idx = (first + i) as usize;
                if idx >= recs.len() {
                    break;
                }
                // A record damaged in both copies is left as is on disk
                // (zeros here would mark it free).
                let rec = recs[idx].unwrap_or(ExtentRecord {
                    seq: 0,
                    owner: None,
                });
                let at = (i * RECORD_BYTES) as usize;
                image[at..at + RECORD_BYTES as usize].copy_from_slice(&rec.encode());
            }
            (first / per_block, image)
        };
        let mut image = image;
        for table in [self.layout.table_a, self.layout.table_b] {
            let (r, img) = self
                .engine
                .write_all(self.fd(), table + block_index * BS, image)
                .await;
            image = img;
            r.map_err(|e| self.io("write extent table", e))?;
            // The sync also makes the zeroed checksum entries durable.
            self.engine
                .datasync(self.fd())
                .await
                .map_err(|e| self.io("sync extent table", e))?;
        }
        if owner.is_none() {
            self.give_back(extent).await;
        }
        Ok(())
    }

    /// Gives a free extent's space back to the filesystem under a disk
    /// file (a hole punched over its data), so thin disk files do not keep
    /// what the pool released. Best effort: a block device, or a
    /// filesystem without hole punching, keeps the space.
    async fn give_back(&self, extent: u32) {
        if !self.file.metadata().is_ok_and(|m| m.is_file()) {
            return;
        }
        let fd = self.fd();
        let off = self.layout.extent_offset(extent) as libc::off_t;
        let len = self.layout.extent_size as libc::off_t;
        // The descriptor stays open: the store holds this disk, and the
        // caller awaits the call.
        let r = tokio::task::spawn_blocking(move || {
            // SAFETY: fallocate on our own open descriptor; it only frees
            // the blocks of the range, which no extent owns now.
            let rc = unsafe {
                libc::fallocate(
                    fd,
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                    off,
                    len,
                )
            };
            if rc == 0 {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            }
        })
        .await;
        if let Ok(Err(e)) = r {
            tracing::debug!(disk = %self.path.display(), extent, error = %e, "could not give a free extent's space back");
        }
    }

    fn region_of(&self, extent: u32, off: u64) -> u64 {
        extent as u64 * self.layout.regions_per_extent() + off / self.layout.region_bytes()
    }

    fn intent_state(&self) -> std::sync::MutexGuard<'_, IntentState> {
        self.intent.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Mark the regions of `[off, off+len)` as having a write in flight,
    /// setting and syncing their intent bits first when they are clear.
    ///
    /// Invariant: a region is in `regions` only once its bit is durable, so
    /// the common case (every region already marked) takes one short lock
    /// and no I/O.
    async fn begin_write(&self, extent: u32, off: u64, len: u64) -> Result<(), StoreError> {
        let first = self.region_of(extent, off);
        let last = self.region_of(extent, off + len - 1);
        if self.enter_marked(first, last) {
            return Ok(());
        }
        let _io = self.intent_io.lock().await;
        let image = {
            let mut st = self.intent_state();
            let mut blocks: Option<(u64, u64)> = None;
            for r in first..=last {
                if st.regions.contains_key(&r) {
                    continue;
                }
                let (byte, mask) = self.intent_bit(r);
                st.bits[byte as usize] |= mask;
                let blk = byte / BS;
                blocks = Some(match blocks {
                    None => (blk, blk),
                    Some((a, b)) => (a.min(blk), b.max(blk)),
                });
            }
            blocks.map(|(a, b)| (a, image_of(&st, a, b)))
        };
        if let Some((at, image)) = image {
            self.persist_intent_image(at, image, true).await?;
        }
        let mut st = self.intent_state();
        for r in first..=last {
            st.regions.entry(r).or_default().inflight += 1;
        }
        Ok(())
    }

    /// Count a write in flight in regions whose bits are already durable;
    /// false (and nothing counted) if any of them is not marked yet.
    fn enter_marked(&self, first: u64, last: u64) -> bool {
        let mut st = self.intent_state();
        if !(first..=last).all(|r| st.regions.contains_key(&r)) {
            return false;
        }
        for r in first..=last {
            if let Some(s) = st.regions.get_mut(&r) {
                s.inflight += 1;
            }
        }
        true
    }

    /// Byte offset in the intent area and bit mask of a global region
    /// index (`extent * regions_per_extent + region in extent`).
    fn intent_bit(&self, region: u64) -> (u64, u8) {
        let per_extent = self.layout.regions_per_extent();
        let local = region % per_extent;
        (
            (region / per_extent) * INTENT_BYTES_PER_EXTENT + local / 8,
            1 << (local % 8),
        )
    }

    /// Write an image of intent blocks starting at block `first`.
    async fn persist_intent_image(
        &self,
        first: u64,
        image: AlignedBuf,
        sync: bool,
    ) -> Result<(), StoreError> {
        let (r, _) = self
            .engine
            .write_all(self.fd(), self.layout.intent + first * BS, image)
            .await;
        r.map_err(|e| self.io("write intent bits", e))?;
        if sync {
            self.engine
                .datasync(self.fd())
                .await
                .map_err(|e| self.io("sync intent bits", e))?;
        }
        Ok(())
    }

    fn end_write(&self, extent: u32, off: u64, len: u64) {
        let first = self.region_of(extent, off);
        let last = self.region_of(extent, off + len - 1);
        let mut st = self.intent_state();
        let generation = st.generation;
        for r in first..=last {
            if let Some(s) = st.regions.get_mut(&r) {
                s.inflight = s.inflight.saturating_sub(1);
                s.last_gen = generation;
            }
        }
    }

    /// Read `len` bytes at `off` of `extent`, verified against checksums.
    /// Holes and zero blocks read as zeros without touching the data area.
    pub async fn read(&self, extent: u32, off: u64, len: u64) -> Result<AlignedBuf, StoreError> {
        self.check_range(extent, off, len);
        let first = off / BS;
        let n = len / BS;
        let mut attempt = 0;
        loop {
            let entries: Vec<CsumEntry> = (first..first + n)
                .map(|b| self.csum_entry(extent, b))
                .collect();
            if entries.iter().all(|e| !matches!(e, CsumEntry::Data(_))) {
                return Ok(AlignedBuf::zeroed(len as usize));
            }
            // Every byte is overwritten: by the read, then zeros for blocks
            // without data.
            let mut buf = AlignedBuf::for_overwrite(len as usize);
            let (r, b) = self
                .engine
                .read_exact(self.fd(), self.layout.extent_offset(extent) + off, buf)
                .await;
            buf = b;
            r.map_err(|e| self.io("read data", e))?;
            let mut bad = None;
            for (i, e) in entries.iter().enumerate() {
                let blk = &mut buf[i * BLOCK_SIZE..(i + 1) * BLOCK_SIZE];
                match e {
                    CsumEntry::Data(c) => {
                        if crc32c(blk) != *c {
                            bad = Some(first + i as u64);
                            break;
                        }
                    }
                    _ => blk.fill(0),
                }
            }
            match bad {
                None => return Ok(buf),
                // A write to the same block may have landed between reading
                // the entry and the data: look once more before failing.
                Some(_) if attempt == 0 => {
                    attempt += 1;
                    tokio::time::sleep(std::time::Duration::from_millis(2)).await;
                }
                Some(block) => {
                    crate::metrics::CHECKSUM_ERRORS.fetch_add(1, Ordering::Relaxed);
                    self.errors.fetch_add(1, Ordering::Relaxed);
                    let disk_offset = self.layout.extent_offset(extent) + block * BS;
                    tracing::error!(disk = %self.path.display(), extent, block, disk_offset, "checksum mismatch on read");
                    return Err(StoreError::Checksum {
                        path: self.path.clone(),
                        extent,
                        block,
                        disk_offset,
                    });
                }
            }
        }
    }

    /// Write `data` at `off` of `extent`; with `fua` it is durable on return.
    pub async fn write(
        &self,
        extent: u32,
        off: u64,
        data: AlignedBuf,
        fua: bool,
    ) -> Result<(), StoreError> {
        let len = data.len() as u64;
        self.check_range(extent, off, len);
        let crcs: Vec<u32> = data.chunks(BLOCK_SIZE).map(crc32c).collect();
        self.begin_write(extent, off, len).await?;
        let (r, _) = self
            .engine
            .write_all(self.fd(), self.layout.extent_offset(extent) + off, data)
            .await;
        if r.is_ok() {
            let first = off / BS;
            for (i, c) in crcs.iter().enumerate() {
                self.set_entry(extent, first + i as u64, CsumEntry::Data(*c));
            }
        }
        self.end_write(extent, off, len);
        r.map_err(|e| self.io("write data", e))?;
        if fua {
            self.sync().await?;
        }
        Ok(())
    }

    /// Make whole blocks read as zeros: `Hole` releases them, `Zero` keeps
    /// them allocated. Durable at the next sync.
    pub fn set_blocks(&self, extent: u32, off: u64, len: u64, state: CsumEntry) {
        self.check_range(extent, off, len);
        assert!(
            !matches!(state, CsumEntry::Data(_)),
            "set_blocks takes Hole or Zero"
        );
        for b in off / BS..(off + len) / BS {
            self.set_entry(extent, b, state);
        }
    }

    /// Make every completed write durable, then clear the intent bits of
    /// regions that stayed idle for a whole flush interval.
    pub async fn sync(&self) -> Result<(), StoreError> {
        let g0 = {
            let mut st = self.intent_state();
            st.generation += 1;
            st.generation - 1
        };
        self.engine
            .datasync(self.fd())
            .await
            .map_err(|e| self.io("fdatasync", e))?;
        let _io = self.intent_io.lock().await;
        let (lo, image) = {
            let mut st = self.intent_state();
            let idle: Vec<u64> = st
                .regions
                .iter()
                .filter(|(_, s)| s.inflight == 0 && s.last_gen < g0)
                .map(|(r, _)| *r)
                .collect();
            if idle.is_empty() {
                return Ok(());
            }
            let (mut lo, mut hi) = (u64::MAX, 0);
            for r in &idle {
                st.regions.remove(r);
                let (byte, mask) = self.intent_bit(*r);
                st.bits[byte as usize] &= !mask;
                lo = lo.min(byte / BS);
                hi = hi.max(byte / BS);
            }
            (lo, image_of(&st, lo, hi))
        };
        // No sync needed: a lost clear only means extra work after a crash.
        self.persist_intent_image(lo, image, false).await
    }

    /// Flush everything and clear every intent bit (clean shutdown).
    pub async fn close(&self) -> Result<(), StoreError> {
        self.engine
            .datasync(self.fd())
            .await
            .map_err(|e| self.io("fdatasync", e))?;
        let _io = self.intent_io.lock().await;
        let image = {
            let mut st = self.intent_state();
            if st.regions.values().any(|s| s.inflight > 0) {
                return Ok(());
            }
            st.regions.clear();
            st.bits.fill(0);
            image_of(&st, 0, self.layout.intent_bytes / BS - 1)
        };
        self.persist_intent_image(0, image, true).await
    }

    /// After an unclean stop: recompute the checksums of every region whose
    /// intent bit is set from the data on disk, then clear the bits.
    async fn recover_intents(&self) -> Result<(), StoreError> {
        let owned: Vec<bool> = self
            .records()
            .iter()
            .map(|r| r.is_none_or(|r| r.owner.is_some()))
            .collect();
        let bits = self.intent_state().bits.clone();
        if bits.iter().all(|&b| b == 0) {
            return Ok(());
        }
        let per_extent = self.layout.regions_per_extent();
        let region_bytes = self.layout.region_bytes();
        let mut recovered = 0u64;
        for (extent, used) in owned.iter().enumerate() {
            if !used {
                continue;
            }
            for r in 0..per_extent {
                let (byte, mask) = self.intent_bit(extent as u64 * per_extent + r);
                if bits[byte as usize] & mask == 0 {
                    continue;
                }
                let off = r * region_bytes;
                let len = region_bytes.min(self.layout.extent_size - off);
                let (res, data) = self
                    .engine
                    .read_exact(
                        self.fd(),
                        self.layout.extent_offset(extent as u32) + off,
                        AlignedBuf::zeroed(len as usize),
                    )
                    .await;
                res.map_err(|e| self.io("read region for recovery", e))?;
                for (i, blk) in data.chunks(BLOCK_SIZE).enumerate() {
                    let b = off / BS + i as u64;
                    if let CsumEntry::Data(_) = self.csum_entry(extent as u32, b) {
                        self.set_entry(extent as u32, b, CsumEntry::Data(crc32c(blk)));
                    }
                }
                tracing::info!(disk = %self.path.display(), extent, region = r, "recomputing checksums of a region written at the crash");
                recovered += 1;
            }
        }
        tracing::info!(disk = %self.path.display(), regions = recovered, "recomputed checksums of regions written at the last unclean stop");
        self.close().await
    }
}

/// A copy of intent blocks `first..=last` for writing.
fn image_of(st: &IntentState, first: u64, last: u64) -> AlignedBuf {
    AlignedBuf::from_slice(&st.bits[(first * BS) as usize..((last + 1) * BS) as usize])
}

/// Zero the extent tables and intent area of a disk being formatted.
async fn format_areas(
    file: &File,
    engine: &IoEngine,
    path: &Path,
    layout: &Layout,
) -> Result<(), StoreError> {
    const CHUNK: u64 = 1 << 20;
    let mut off = layout.table_a;
    let end = layout.csum;
    while off < end {
        let n = CHUNK.min(end - off);
        let (r, _) = engine
            .write_all(file.as_raw_fd(), off, AlignedBuf::zeroed(n as usize))
            .await;
        r.map_err(|e| io_err(path, "zero metadata area", e))?;
        off += n;
    }
    Ok(())
}

async fn write_superblocks(
    file: &File,
    engine: &IoEngine,
    path: &Path,
    sb: &Superblock,
) -> Result<(), StoreError> {
    let image = sb.encode();
    for at in [SB_A_OFFSET, SB_B_OFFSET] {
        let (r, _) = engine
            .write_all(file.as_raw_fd(), at, AlignedBuf::from_slice(&image))
            .await;
        r.map_err(|e| io_err(path, "write superblock", e))?;
        engine
            .datasync(file.as_raw_fd())
            .await
            .map_err(|e| io_err(path, "sync superblock", e))?;
    }
    Ok(())
}

async fn load_records(
    file: &File,
    engine: &IoEngine,
    path: &Path,
    layout: &Layout,
) -> Result<Vec<Option<ExtentRecord>>, StoreError> {
    let mut tables = Vec::new();
    for at in [layout.table_a, layout.table_b] {
        let (r, buf) = engine
            .read_exact(
                file.as_raw_fd(),
                at,
                AlignedBuf::zeroed(layout.table_bytes as usize),
            )
            .await;
        r.map_err(|e| io_err(path, "read extent table", e))?;
        tables.push(buf);
    }
    let mut out = Vec::with_capacity(layout.extent_count as usize);
    for i in 0..layout.extent_count as usize {
        let at = i * RECORD_BYTES as usize;
        let a = ExtentRecord::decode(&tables[0][at..]);
        let b = ExtentRecord::decode(&tables[1][at..]);
        let rec = merge_records(a, b);
        if rec.is_none() {
            tracing::error!(disk = %path.display(), extent = i, "extent record damaged in both table copies; extent quarantined");
        }
        out.push(rec);
    }
    Ok(out)
}
