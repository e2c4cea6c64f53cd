//! The replica side of mirrored volumes: this node's copies of other
//! volumes' slabs, served to the volume's coordinator over the replication
//! transport (and called directly by a coordinator on this node).
//!
//! A copy is found by (volume id, slab): the extent-store owner record of
//! the extent says which, so the index is rebuilt from the disks at start.
//!
//! Invariants:
//! - Every request names the slab epoch it was decided at. A request older
//!   than the newest epoch this node knows for the slab (from the applied
//!   metadata, or from a newer request) is refused with `StaleEpoch`: a
//!   coordinator fenced by a replica-set change or a takeover cannot write.
//! - An extent is released only when the metadata this node has applied
//!   says its volume was deleted (the volume's id is below the next id and
//!   the volume is gone), its slab lies past the volume's end, or the slab
//!   is recorded and no longer lists this node (its copy was rebuilt
//!   elsewhere); an extent of a volume or slab this node has not heard of
//!   yet is kept.
//! - A write with `fua` is durable on this node's disk before the reply.

use crate::meta_service::{MetaHandle, MetaView};
use block_api::BLOCK_SIZE;
use extent_store::{CsumEntry, ExtentAddr, ExtentOwner, Store, StoreError};
use replication::{ErrorCode, Handler, Request, Response};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

/// Disk ids in the cluster metadata: the node id, then the disk's index.
pub fn meta_disk_id(node: u64, index: usize) -> u64 {
    (node << 16) | index as u64
}

/// The opaque per-block value of a `Checksums` reply: 0 hole, 1 zero,
/// 2 << 32 | crc for data. Holes and zeros both read as zeros.
pub fn encode_csum(e: CsumEntry) -> u64 {
    match e {
        CsumEntry::Hole => 0,
        CsumEntry::Zero => 1,
        CsumEntry::Data(c) => (2 << 32) | u64::from(c),
    }
}

/// Whether two `Checksums` values read back as the same bytes.
pub fn same_content(a: u64, b: u64) -> bool {
    a == b || (a <= 1 && b <= 1)
}

fn err(code: ErrorCode, message: impl Into<String>) -> Response {
    Response::Error {
        code,
        message: message.into(),
    }
}

fn store_err(e: StoreError) -> Response {
    match e {
        StoreError::Checksum { .. } => err(ErrorCode::Checksum, e.to_string()),
        StoreError::Full { .. } => err(ErrorCode::Io, e.to_string()),
        e => err(ErrorCode::Io, e.to_string()),
    }
}

/// This node's copies of mirrored slabs.
pub struct ReplicaService {
    store: Arc<Store>,
    meta: MetaHandle,
    index: Mutex<HashMap<(u64, u64), ExtentAddr>>,
    /// The newest epoch seen in a request, per slab.
    seen: Mutex<HashMap<(u64, u64), u64>>,
    /// Serialises allocations, so two requests for one slab get one extent.
    allocating: tokio::sync::Mutex<()>,
}

impl ReplicaService {
    /// `copies`: the extents of mirrored volumes found on the disks.
    pub fn new(
        store: Arc<Store>,
        meta: MetaHandle,
        copies: Vec<(ExtentOwner, ExtentAddr)>,
    ) -> Arc<ReplicaService> {
        let index = copies
            .into_iter()
            .map(|(o, a)| ((o.volume_id, o.slab), a))
            .collect();
        Arc::new(ReplicaService {
            store,
            meta,
            index: Mutex::new(index),
            seen: Mutex::new(HashMap::new()),
            allocating: tokio::sync::Mutex::new(()),
        })
    }

    fn extent(&self, volume: u64, slab: u64) -> Option<ExtentAddr> {
        self.index
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&(volume, slab))
            .copied()
    }

    /// Bytes per extent (and slab).
    pub fn extent_size(&self) -> u64 {
        self.store.extent_size()
    }

    /// Refuses a request older than the newest epoch known for its slab.
    fn check_epoch(&self, volume: u64, slab: u64, epoch: u64) -> Result<(), Response> {
        let view = self.meta.view();
        let in_meta = view
            .state
            .volumes
            .values()
            .find(|v| v.id == volume)
            .and_then(|v| v.slabs.get(&slab))
            .map_or(0, |s| s.epoch);
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        let known = seen.get(&(volume, slab)).copied().unwrap_or(0).max(in_meta);
        if epoch < known {
            return Err(err(
                ErrorCode::StaleEpoch { current: known },
                format!(
                    "slab {slab} of volume {volume} is at epoch {known}, the request at {epoch}"
                ),
            ));
        }
        seen.insert((volume, slab), epoch);
        Ok(())
    }

    fn range(&self, offset: u64, len: u64) -> Result<(), Response> {
        let es = self.store.extent_size();
        let bs = BLOCK_SIZE as u64;
        if !offset.is_multiple_of(bs) || !len.is_multiple_of(bs) || len == 0 {
            return Err(err(
                ErrorCode::BadRequest,
                format!("range {offset}+{len} is not 4 KiB aligned"),
            ));
        }
        match offset.checked_add(len) {
            Some(end) if end <= es => Ok(()),
            _ => Err(err(
                ErrorCode::BadRequest,
                format!("range {offset}+{len} is past the extent's end ({es})"),
            )),
        }
    }

    fn located(
        &self,
        volume: u64,
        slab: u64,
        epoch: u64,
        offset: u64,
        len: u64,
    ) -> Result<ExtentAddr, Response> {
        self.check_epoch(volume, slab, epoch)?;
        self.range(offset, len)?;
        self.extent(volume, slab).ok_or_else(|| {
            err(
                ErrorCode::NotFound,
                format!("no copy of slab {slab} of volume {volume} on this node"),
            )
        })
    }

    async fn allocate(&self, volume: u64, slab: u64, epoch: u64) -> Response {
        if let Err(r) = self.check_epoch(volume, slab, epoch) {
            return r;
        }
        let _one = self.allocating.lock().await;
        let addr = match self.extent(volume, slab) {
            Some(a) => a,
            None => {
                let owner = ExtentOwner {
                    volume_id: volume,
                    slab,
                    shard: 0,
                    epoch,
                };
                match self.store.allocate(owner).await {
                    Ok(a) => {
                        self.index
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .insert((volume, slab), a);
                        a
                    }
                    Err(e) => return store_err(e),
                }
            }
        };
        Response::Allocated {
            disk: u32::from(addr.disk),
            extent: u64::from(addr.extent),
        }
    }

    async fn release(&self, volume: u64, slab: u64) -> Response {
        let addr = self
            .index
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&(volume, slab));
        if let Some(a) = addr
            && let Err(e) = self.store.release(a).await
        {
            return store_err(e);
        }
        Response::Ok
    }

    /// Releases the copies the applied metadata says are gone.
    pub async fn collect_garbage(&self, view: &MetaView) {
        let es = self.store.extent_size();
        let by_id: HashMap<u64, &meta::state::Volume> =
            view.state.volumes.values().map(|v| (v.id, v)).collect();
        let keys: Vec<(u64, u64)> = self
            .index
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .copied()
            .collect();
        for (volume, slab) in keys {
            let gone = match by_id.get(&volume) {
                None => volume < view.state.next_volume_id,
                Some(v) if slab >= v.size_bytes.div_ceil(es) => true,
                // The slab's copies moved to other nodes (a rebuild).
                Some(v) => v
                    .slabs
                    .get(&slab)
                    .is_some_and(|s| !s.replicas.iter().any(|r| r.node == view.this)),
            };
            if gone {
                tracing::info!(volume, slab, "releasing the copy of a deleted slab");
                if let Response::Error { message, .. } = self.release(volume, slab).await {
                    tracing::error!(volume, slab, error = %message, "releasing a copy failed");
                }
            }
        }
    }

    /// Serves one request (from a peer, or from a coordinator on this node).
    pub async fn serve(&self, req: Request) -> Response {
        match req {
            Request::Allocate {
                volume,
                slab,
                epoch,
            } => self.allocate(volume, slab, epoch).await,
            Request::Write {
                volume,
                slab,
                epoch,
                offset,
                data,
                fua,
            } => match self.located(volume, slab, epoch, offset, data.len() as u64) {
                Err(r) => r,
                Ok(a) => match self.store.write(a, offset, data, fua).await {
                    Ok(()) => Response::Ok,
                    Err(e) => store_err(e),
                },
            },
            Request::Read {
                volume,
                slab,
                epoch,
                offset,
                len,
            } => match self.located(volume, slab, epoch, offset, u64::from(len)) {
                Err(r) => r,
                Ok(a) => match self.store.read(a, offset, u64::from(len)).await {
                    Ok(b) => Response::Data(b),
                    Err(e) => store_err(e),
                },
            },
            Request::WriteZeroes {
                volume,
                slab,
                epoch,
                offset,
                len,
            } => self.set_blocks(volume, slab, epoch, offset, len, CsumEntry::Zero),
            Request::Trim {
                volume,
                slab,
                epoch,
                offset,
                len,
            } => self.set_blocks(volume, slab, epoch, offset, len, CsumEntry::Hole),
            Request::Flush => match self.store.sync_all().await {
                Ok(()) => Response::Ok,
                Err(e) => store_err(e),
            },
            Request::Checksums {
                volume,
                slab,
                epoch,
                offset,
                blocks,
            } => {
                let len = u64::from(blocks) * BLOCK_SIZE as u64;
                match self.located(volume, slab, epoch, offset, len) {
                    Err(r) => r,
                    Ok(a) => Response::Checksums(
                        self.store
                            .block_states(a, offset, len)
                            .into_iter()
                            .map(encode_csum)
                            .collect(),
                    ),
                }
            }
            Request::Release { volume, slab } => self.release(volume, slab).await,
        }
    }

    fn set_blocks(
        &self,
        volume: u64,
        slab: u64,
        epoch: u64,
        offset: u64,
        len: u64,
        state: CsumEntry,
    ) -> Response {
        match self.located(volume, slab, epoch, offset, len) {
            Err(r) => r,
            Ok(a) => {
                self.store.set_blocks(a, offset, len, state);
                Response::Ok
            }
        }
    }
}

/// The replication transport's view of this node.
pub struct ReplicaHandler(pub Arc<ReplicaService>);

#[async_trait::async_trait]
impl Handler for ReplicaHandler {
    async fn handle(&self, _peer: SocketAddr, req: Request) -> Response {
        self.0.serve(req).await
    }
}
