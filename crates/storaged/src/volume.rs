//! The volume layer: maps volume byte ranges to slabs, allocates slabs on
//! first write (thin provisioning), and turns unaligned client requests
//! into block-aligned slab I/O by read-modify-write. A slab is either an
//! extent on this node (`simple` volumes) or a mirrored slab whose copies
//! live on several nodes (`crate::mirror`).
//!
//! Ownership: each volume has one coordinator task that owns the slab map
//! and is the only code that changes it (allocation, resize, delete). It
//! publishes an immutable snapshot ([`VolumeState`]) after each change;
//! the I/O paths read the snapshot and ask the coordinator, through a
//! bounded channel, only when a slab needs an extent.
//!
//! Invariants:
//! - An extent is released only while no I/O of the volume is in flight:
//!   I/O holds the read side of `gate`, shrink and delete hold the write
//!   side while the coordinator releases extents.
//! - Two read-modify-writes of the same 4 KiB block never interleave (the
//!   striped `rmw` locks), so unaligned writes to different bytes of one
//!   block both land.
//! - `flush` syncs every disk the volume ever wrote to, so a flush on one
//!   connection covers writes acknowledged on all connections.

use crate::mirror::MirrorVolume;
use arc_swap::ArcSwap;
use block_api::{AlignedBuf, BLOCK_SIZE, BlockError, BlockRun, BlockVolume};
use extent_store::{CsumEntry, ExtentAddr, ExtentOwner, Store, StoreError};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use tokio::sync::{RwLock, mpsc, oneshot};

const BS: u64 = BLOCK_SIZE as u64;
/// Stripes of the read-modify-write lock table.
const RMW_STRIPES: usize = 64;
/// Requests waiting for a volume's coordinator at most.
const COORD_QUEUE: usize = 64;
/// Blocks `block_status` inspects per call at most (the reply may cover less
/// than asked, as the protocol allows).
const STATUS_BLOCKS_MAX: u64 = 16 * 1024;
/// Disks a node may have: the touched-disk set is one u64.
pub const DISKS_MAX: usize = extent_store::store::DISKS_MAX;
const _: () = assert!(DISKS_MAX <= 64, "the touched-disk set is one u64");

/// Where a slab's data is.
#[derive(Debug, Clone, Copy)]
pub enum SlabRef {
    /// An extent on this node.
    Local(ExtentAddr),
    /// Copies on the nodes the metadata names (`crate::mirror`).
    Mirror,
}

/// What the I/O paths see of a volume: replaced whole on every change.
#[derive(Debug, Clone)]
pub struct VolumeState {
    pub size: u64,
    pub slabs: Vec<Option<SlabRef>>,
    pub deleted: bool,
}

impl VolumeState {
    pub fn allocated(&self) -> usize {
        self.slabs.iter().filter(|s| s.is_some()).count()
    }
}

enum CoordMsg {
    Allocate {
        slab: u64,
        reply: oneshot::Sender<Result<SlabRef, BlockError>>,
    },
    Resize {
        size: u64,
        reply: oneshot::Sender<Result<(), StoreError>>,
    },
    Delete {
        reply: oneshot::Sender<Result<(), StoreError>>,
    },
}

pub struct Volume {
    name: String,
    id: u64,
    extent_size: u64,
    store: Arc<Store>,
    state: Arc<ArcSwap<VolumeState>>,
    gate: RwLock<()>,
    /// Ranges a resync or scrub pauses (`crate::range_gate`).
    ranges: crate::range_gate::RangeGate,
    coord: mpsc::Sender<CoordMsg>,
    touched: AtomicU64,
    rmw: Vec<tokio::sync::Mutex<()>>,
    mirror: Option<Arc<MirrorVolume>>,
}

fn slab_count(size: u64, extent_size: u64) -> usize {
    size.div_ceil(extent_size) as usize
}

fn store_err(e: StoreError) -> BlockError {
    match e {
        StoreError::Checksum { disk_offset, .. } => BlockError::Checksum {
            offset: disk_offset,
        },
        e => BlockError::Io(e.to_string()),
    }
}

/// One piece of a request that falls into a single slab.
#[derive(Debug, Clone, Copy)]
struct Piece {
    slab: u64,
    /// Offset inside the slab's extent.
    off: u64,
    len: u64,
    /// Offset of the piece from the start of the request.
    at: u64,
}

impl Volume {
    /// Start a volume with its coordinator task; `extents` are the extents
    /// the store holds for it (from the disks' extent tables).
    pub fn start(
        name: String,
        id: u64,
        size: u64,
        store: Arc<Store>,
        extents: Vec<(u64, ExtentAddr)>,
    ) -> Arc<Volume> {
        let extent_size = store.extent_size();
        let mut slabs = vec![None; slab_count(size, extent_size)];
        for (slab, addr) in extents {
            if let Some(s) = slabs.get_mut(slab as usize) {
                *s = Some(SlabRef::Local(addr));
            }
        }
        Self::start_with(name, id, size, store, slabs, None)
    }

    /// Start a mirrored volume; `allocated` are the slabs the metadata has.
    pub fn start_mirror(
        name: String,
        id: u64,
        size: u64,
        store: Arc<Store>,
        mirror: Arc<MirrorVolume>,
        allocated: impl IntoIterator<Item = u64>,
    ) -> Arc<Volume> {
        let mut slabs = vec![None; slab_count(size, store.extent_size())];
        for slab in allocated {
            if let Some(s) = slabs.get_mut(slab as usize) {
                *s = Some(SlabRef::Mirror);
            }
        }
        Self::start_with(name, id, size, store, slabs, Some(mirror))
    }

    fn start_with(
        name: String,
        id: u64,
        size: u64,
        store: Arc<Store>,
        slabs: Vec<Option<SlabRef>>,
        mirror: Option<Arc<MirrorVolume>>,
    ) -> Arc<Volume> {
        let extent_size = store.extent_size();
        let touched = slabs.iter().flatten().fold(0u64, |m, s| match s {
            SlabRef::Local(a) => m | 1 << a.disk,
            SlabRef::Mirror => m,
        });
        let state = Arc::new(ArcSwap::from_pointee(VolumeState {
            size,
            slabs,
            deleted: false,
        }));
        let (tx, rx) = mpsc::channel(COORD_QUEUE);
        tokio::spawn(coordinator(
            id,
            name.clone(),
            store.clone(),
            state.clone(),
            mirror.clone(),
            rx,
        ));
        Arc::new(Volume {
            name,
            id,
            extent_size,
            store,
            state,
            gate: RwLock::new(()),
            ranges: Default::default(),
            coord: tx,
            touched: AtomicU64::new(touched),
            rmw: (0..RMW_STRIPES)
                .map(|_| tokio::sync::Mutex::new(()))
                .collect(),
            mirror,
        })
    }

    pub fn id(&self) -> u64 {
        self.id
    }

    /// Opens a repair session that pauses client I/O one range at a time
    /// (`crate::range_gate`) rather than the whole volume.
    pub async fn repair_session(&self) -> crate::range_gate::Session<'_> {
        self.ranges.session(&self.gate).await
    }

    fn mirror(&self) -> Result<&MirrorVolume, BlockError> {
        self.mirror
            .as_deref()
            .ok_or_else(|| BlockError::Io(format!("volume {} has no mirror", self.name)))
    }

    pub fn state(&self) -> Arc<VolumeState> {
        self.state.load_full()
    }

    async fn ask<T>(&self, msg: impl FnOnce(oneshot::Sender<T>) -> CoordMsg) -> Option<T> {
        let (tx, rx) = oneshot::channel();
        self.coord.send(msg(tx)).await.ok()?;
        rx.await.ok()
    }

    /// Change the size. Shrinking releases the extents past the new end and
    /// trims the blocks past it in the last slab, after in-flight I/O ends.
    pub async fn resize(&self, size: u64) -> Result<(), StoreError> {
        let _drain = self.gate.write().await;
        self.ask(|reply| CoordMsg::Resize { size, reply })
            .await
            .unwrap_or_else(|| {
                Err(StoreError::Config(format!(
                    "volume {} is shut down",
                    self.name
                )))
            })
    }

    /// Release every extent; the volume answers every later request with
    /// an error.
    pub async fn delete(&self) -> Result<(), StoreError> {
        let _drain = self.gate.write().await;
        self.ask(|reply| CoordMsg::Delete { reply })
            .await
            .unwrap_or_else(|| {
                Err(StoreError::Config(format!(
                    "volume {} is shut down",
                    self.name
                )))
            })
    }

    fn check(&self, st: &VolumeState, offset: u64, len: u64) -> Result<(), BlockError> {
        if st.deleted {
            return Err(BlockError::Gone(self.name.clone()));
        }
        match offset.checked_add(len) {
            Some(end) if end <= st.size => Ok(()),
            _ => Err(BlockError::OutOfRange {
                offset,
                len,
                size: st.size,
            }),
        }
    }

    fn pieces(&self, offset: u64, len: u64) -> Vec<Piece> {
        let mut out = Vec::new();
        let mut pos = offset;
        let end = offset + len;
        while pos < end {
            let slab = pos / self.extent_size;
            let off = pos % self.extent_size;
            let n = (self.extent_size - off).min(end - pos);
            out.push(Piece {
                slab,
                off,
                len: n,
                at: pos - offset,
            });
            pos += n;
        }
        out
    }

    async fn extent_for_write(&self, st: &VolumeState, slab: u64) -> Result<SlabRef, BlockError> {
        if let Some(Some(a)) = st.slabs.get(slab as usize) {
            return Ok(*a);
        }
        self.ask(|reply| CoordMsg::Allocate { slab, reply })
            .await
            .unwrap_or_else(|| Err(BlockError::Gone(self.name.clone())))
    }

    fn touch(&self, slab: SlabRef) {
        if let SlabRef::Local(addr) = slab {
            self.touched.fetch_or(1 << addr.disk, Ordering::Relaxed);
        }
    }

    async fn read_slab(
        &self,
        r: SlabRef,
        slab: u64,
        off: u64,
        len: u64,
    ) -> Result<AlignedBuf, BlockError> {
        match r {
            SlabRef::Local(a) => self.store.read(a, off, len).await.map_err(store_err),
            SlabRef::Mirror => self.mirror()?.read(slab, off, len).await,
        }
    }

    async fn write_slab(
        &self,
        r: SlabRef,
        slab: u64,
        off: u64,
        data: AlignedBuf,
    ) -> Result<(), BlockError> {
        self.touch(r);
        match r {
            SlabRef::Local(a) => self
                .store
                .write(a, off, data, false)
                .await
                .map_err(store_err),
            SlabRef::Mirror => self.mirror()?.write(slab, off, data, false).await,
        }
    }

    fn touched_disks(&self) -> impl Iterator<Item = u16> {
        let m = self.touched.load(Ordering::Acquire);
        (0..64u16).filter(move |d| m & (1 << d) != 0)
    }

    async fn sync(&self) -> Result<(), BlockError> {
        if let Some(m) = &self.mirror {
            return m.flush().await;
        }
        self.store
            .sync_disks(self.touched_disks())
            .await
            .map_err(store_err)
    }

    /// Read a block-aligned range.
    async fn read_aligned(
        &self,
        st: &VolumeState,
        offset: u64,
        len: u64,
    ) -> Result<AlignedBuf, BlockError> {
        let pieces = self.pieces(offset, len);
        if let [p] = pieces[..] {
            return match st.slabs[p.slab as usize] {
                Some(r) => self.read_slab(r, p.slab, p.off, p.len).await,
                None => Ok(AlignedBuf::zeroed(len as usize)),
            };
        }
        let reads = pieces.iter().map(|p| async move {
            match st.slabs[p.slab as usize] {
                Some(r) => self.read_slab(r, p.slab, p.off, p.len).await.map(Some),
                None => Ok(None),
            }
        });
        let results = futures::future::join_all(reads).await;
        let mut out = AlignedBuf::zeroed(len as usize);
        for (p, r) in pieces.iter().zip(results) {
            if let Some(buf) = r? {
                out[p.at as usize..(p.at + p.len) as usize].copy_from_slice(&buf);
            }
        }
        Ok(out)
    }

    /// Write a block-aligned buffer.
    async fn write_aligned(
        &self,
        st: &VolumeState,
        offset: u64,
        data: AlignedBuf,
        fua: bool,
    ) -> Result<(), BlockError> {
        let pieces = self.pieces(offset, data.len() as u64);
        if let [p] = pieces[..] {
            let a = self.extent_for_write(st, p.slab).await?;
            self.write_slab(a, p.slab, p.off, data).await?;
        } else {
            let writes = pieces.iter().map(|p| {
                let buf = AlignedBuf::from_slice(&data[p.at as usize..(p.at + p.len) as usize]);
                async move {
                    let a = self.extent_for_write(st, p.slab).await?;
                    self.write_slab(a, p.slab, p.off, buf).await
                }
            });
            for r in futures::future::join_all(writes).await {
                r?;
            }
        }
        if fua { self.sync().await } else { Ok(()) }
    }

    /// Write at any offset: partial blocks at the edges are merged with the
    /// current contents under the block's RMW lock.
    async fn write_any(
        &self,
        st: &VolumeState,
        offset: u64,
        data: &[u8],
        fua: bool,
    ) -> Result<(), BlockError> {
        let end = offset + data.len() as u64;
        let a0 = offset / BS * BS;
        let a1 = end.div_ceil(BS) * BS;
        let head = !offset.is_multiple_of(BS);
        let tail = !end.is_multiple_of(BS);
        let mut stripes = vec![];
        if head {
            stripes.push((a0 / BS) as usize % RMW_STRIPES);
        }
        if tail {
            stripes.push(((a1 - BS) / BS) as usize % RMW_STRIPES);
        }
        stripes.sort_unstable();
        stripes.dedup();
        let mut guards = Vec::with_capacity(2);
        for s in stripes {
            guards.push(self.rmw[s].lock().await);
        }
        let mut buf = AlignedBuf::zeroed((a1 - a0) as usize);
        if head {
            let b = self.read_aligned(st, a0, BS).await?;
            buf[..BLOCK_SIZE].copy_from_slice(&b);
        }
        if tail && (a1 - BS > a0 || !head) {
            let b = self.read_aligned(st, a1 - BS, BS).await?;
            let n = buf.len();
            buf[n - BLOCK_SIZE..].copy_from_slice(&b);
        }
        let at = (offset - a0) as usize;
        buf[at..at + data.len()].copy_from_slice(data);
        self.write_aligned(st, a0, buf, fua).await
    }

    /// Make `[offset, offset+len)` read as zeros: whole blocks change state
    /// (hole or allocated-zero), partial edge blocks are zeroed in place.
    async fn zero_range(
        &self,
        st: &VolumeState,
        offset: u64,
        len: u64,
        state: CsumEntry,
        fua: bool,
    ) -> Result<(), BlockError> {
        let end = offset + len;
        let w0 = offset.div_ceil(BS) * BS;
        let w1 = end / BS * BS;
        if w0 >= w1 {
            // No whole block: zero the bytes in place.
            return self
                .write_any(st, offset, &vec![0u8; len as usize], fua)
                .await;
        }
        if offset < w0 {
            self.write_any(st, offset, &vec![0u8; (w0 - offset) as usize], false)
                .await?;
        }
        if w1 < end {
            self.write_any(st, w1, &vec![0u8; (end - w1) as usize], false)
                .await?;
        }
        for p in self.pieces(w0, w1 - w0) {
            let r = match (st.slabs[p.slab as usize], state) {
                (Some(a), _) => a,
                // A hole in an unallocated slab is already there.
                (None, CsumEntry::Hole) => continue,
                (None, _) => self.extent_for_write(st, p.slab).await?,
            };
            self.touch(r);
            match r {
                SlabRef::Local(addr) => self.store.set_blocks(addr, p.off, p.len, state),
                SlabRef::Mirror => {
                    self.mirror()?
                        .set_blocks(p.slab, p.off, p.len, state)
                        .await?
                }
            }
        }
        if fua { self.sync().await } else { Ok(()) }
    }
}

#[async_trait::async_trait]
impl BlockVolume for Volume {
    fn name(&self) -> &str {
        &self.name
    }

    fn size(&self) -> u64 {
        self.state.load().size
    }

    async fn read(&self, offset: u64, len: usize) -> Result<AlignedBuf, BlockError> {
        let _io = self.gate.read().await;
        let _range = self.ranges.enter(offset, len as u64).await;
        crate::activity::touch();
        let st = self.state.load_full();
        self.check(&st, offset, len as u64)?;
        if len == 0 {
            return Ok(AlignedBuf::zeroed(0));
        }
        let end = offset + len as u64;
        if offset.is_multiple_of(BS) && end.is_multiple_of(BS) {
            return self.read_aligned(&st, offset, len as u64).await;
        }
        let a0 = offset / BS * BS;
        let a1 = end.div_ceil(BS) * BS;
        let b = self.read_aligned(&st, a0, a1 - a0).await?;
        let at = (offset - a0) as usize;
        Ok(AlignedBuf::from_slice(&b[at..at + len]))
    }

    async fn write(&self, offset: u64, data: AlignedBuf, fua: bool) -> Result<(), BlockError> {
        let _io = self.gate.read().await;
        let _range = self.ranges.enter(offset, data.len() as u64).await;
        crate::activity::touch();
        let st = self.state.load_full();
        self.check(&st, offset, data.len() as u64)?;
        if data.is_empty() {
            return if fua { self.sync().await } else { Ok(()) };
        }
        if offset.is_multiple_of(BS) && data.len().is_multiple_of(BLOCK_SIZE) {
            self.write_aligned(&st, offset, data, fua).await
        } else {
            self.write_any(&st, offset, &data, fua).await
        }
    }

    async fn flush(&self) -> Result<(), BlockError> {
        let _io = self.gate.read().await;
        if self.state.load().deleted {
            return Err(BlockError::Gone(self.name.clone()));
        }
        self.sync().await
    }

    async fn trim(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        let _io = self.gate.read().await;
        let _range = self.ranges.enter(offset, len).await;
        let st = self.state.load_full();
        self.check(&st, offset, len)?;
        if len == 0 {
            return Ok(());
        }
        self.zero_range(&st, offset, len, CsumEntry::Hole, false)
            .await
    }

    async fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        may_unmap: bool,
        fua: bool,
    ) -> Result<(), BlockError> {
        let _io = self.gate.read().await;
        let _range = self.ranges.enter(offset, len).await;
        let st = self.state.load_full();
        self.check(&st, offset, len)?;
        if len == 0 {
            return Ok(());
        }
        let state = if may_unmap {
            CsumEntry::Hole
        } else {
            CsumEntry::Zero
        };
        self.zero_range(&st, offset, len, state, fua).await
    }

    async fn block_status(&self, offset: u64, len: u64) -> Result<Vec<BlockRun>, BlockError> {
        let _io = self.gate.read().await;
        let st = self.state.load_full();
        self.check(&st, offset, len)?;
        let mut runs: Vec<BlockRun> = Vec::new();
        let mut push = |len: u64, hole: bool, zero: bool| match runs.last_mut() {
            Some(r) if r.hole == hole && r.zero == zero => r.len += len,
            _ => runs.push(BlockRun { len, hole, zero }),
        };
        let end = offset + len;
        let mut pos = offset;
        let mut inspected = 0u64;
        while pos < end && inspected < STATUS_BLOCKS_MAX {
            let slab = pos / self.extent_size;
            let slab_end = ((slab + 1) * self.extent_size).min(end);
            match st.slabs[slab as usize] {
                None => {
                    push(slab_end - pos, true, true);
                    pos = slab_end;
                }
                Some(r) => {
                    let off = pos % self.extent_size;
                    let base = pos / BS * BS;
                    let blocks =
                        ((slab_end - base).div_ceil(BS)).min(STATUS_BLOCKS_MAX - inspected);
                    let states = match r {
                        SlabRef::Local(addr) => {
                            self.store.block_states(addr, off / BS * BS, blocks * BS)
                        }
                        SlabRef::Mirror => {
                            self.mirror()?
                                .block_states(slab, off / BS * BS, blocks)
                                .await?
                        }
                    };
                    inspected += states.len() as u64;
                    for (i, s) in states.iter().enumerate() {
                        let b_start = (base + i as u64 * BS).max(pos);
                        let b_end = (base + (i as u64 + 1) * BS).min(slab_end);
                        if b_start >= b_end {
                            break;
                        }
                        let (hole, zero) = match s {
                            CsumEntry::Hole => (true, true),
                            CsumEntry::Zero => (false, true),
                            CsumEntry::Data(_) => (false, false),
                        };
                        push(b_end - b_start, hole, zero);
                        pos = b_end;
                    }
                }
            }
        }
        Ok(runs)
    }
}

/// The coordinator task: the only writer of a volume's slab map.
async fn coordinator(
    id: u64,
    name: String,
    store: Arc<Store>,
    state: Arc<ArcSwap<VolumeState>>,
    mirror: Option<Arc<MirrorVolume>>,
    mut rx: mpsc::Receiver<CoordMsg>,
) {
    let extent_size = store.extent_size();
    let mut cur = (*state.load_full()).clone();
    while let Some(msg) = rx.recv().await {
        match msg {
            CoordMsg::Allocate { slab, reply } => {
                let r = match cur.slabs.get(slab as usize) {
                    _ if cur.deleted => Err(BlockError::Gone(name.clone())),
                    None => Err(BlockError::OutOfRange {
                        offset: slab * extent_size,
                        len: 0,
                        size: cur.size,
                    }),
                    Some(Some(a)) => Ok(*a),
                    Some(None) if mirror.is_some() => {
                        let m = mirror.as_deref();
                        match m.map(|m| m.allocate(slab)) {
                            Some(f) => match f.await {
                                Ok(()) => {
                                    cur.slabs[slab as usize] = Some(SlabRef::Mirror);
                                    state.store(Arc::new(cur.clone()));
                                    Ok(SlabRef::Mirror)
                                }
                                Err(e) => Err(e),
                            },
                            None => Err(BlockError::Gone(name.clone())),
                        }
                    }
                    Some(None) => {
                        let owner = ExtentOwner {
                            volume_id: id,
                            slab,
                            shard: 0,
                            epoch: 1,
                        };
                        match store.allocate(owner).await {
                            Ok(a) => {
                                cur.slabs[slab as usize] = Some(SlabRef::Local(a));
                                state.store(Arc::new(cur.clone()));
                                Ok(SlabRef::Local(a))
                            }
                            Err(StoreError::Full { .. }) => Err(BlockError::NoSpace {
                                volume: name.clone(),
                            }),
                            Err(e) => Err(store_err(e)),
                        }
                    }
                };
                let _ = reply.send(r);
            }
            CoordMsg::Resize { size, reply } => {
                let r = resize(&store, &mut cur, size).await;
                state.store(Arc::new(cur.clone()));
                let _ = reply.send(r);
            }
            CoordMsg::Delete { reply } => {
                cur.deleted = true;
                state.store(Arc::new(cur.clone()));
                let mut r = Ok(());
                // Copies of mirrored slabs are released by the nodes that
                // hold them, when they see the volume gone.
                for a in cur.slabs.iter().flatten().filter_map(|s| match s {
                    SlabRef::Local(a) => Some(*a),
                    SlabRef::Mirror => None,
                }) {
                    if let Err(e) = store.release(a).await {
                        tracing::error!(volume = %name, error = %e, "could not release an extent; it is released at the next start");
                        r = Err(e);
                    }
                }
                let _ = reply.send(r);
                return;
            }
        }
    }
}

async fn resize(store: &Store, cur: &mut VolumeState, size: u64) -> Result<(), StoreError> {
    let extent_size = store.extent_size();
    let n = slab_count(size, extent_size);
    if size < cur.size {
        // Blocks past the new end in the last kept slab must read as zeros
        // if the volume grows again.
        if !size.is_multiple_of(extent_size)
            && let Some(Some(SlabRef::Local(a))) = cur.slabs.get(n - 1)
        {
            let off = size % extent_size;
            store.set_blocks(*a, off, extent_size - off, CsumEntry::Hole);
        }
        cur.size = size;
        for s in cur.slabs.drain(n..).flatten() {
            if let SlabRef::Local(a) = s {
                store.release(a).await?;
            }
        }
    } else {
        cur.size = size;
        cur.slabs.resize(n, None);
    }
    Ok(())
}
