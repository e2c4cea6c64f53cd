//! The coordinator side of a mirrored volume's slab I/O: every write goes
//! to all current replicas in parallel (the local one directly, the others
//! over the replication transport), reads go to one current copy.
//!
//! The replica set and epoch of a slab are read from the applied metadata
//! at each request, so a change committed through Raft (a replica marked
//! stale, a resync finished, a takeover) applies to the next request.
//!
//! Invariants:
//! - A write is acknowledged only when every current replica acknowledged
//!   it, or when the replicas that failed have been marked stale through
//!   Raft (epoch + 1) and at least the write quorum of current replicas
//!   (2 of 3, 1 of 2) acknowledged it. Otherwise it fails with an I/O
//!   error.
//! - A replica that answers `StaleEpoch` means this node's view is old: the
//!   request is retried at the newer epoch, never counted as a failure.
//! - A flush reaches every node holding a current replica; a node that does
//!   not confirm it has its replicas marked stale before the flush is
//!   acknowledged.
//! - A read that finds a bad checksum is answered from another current
//!   copy, and the good data is written over the bad copy.

pub mod moves;
pub mod rebalance;
pub mod scrub;

pub use moves::slabs_to_move;

use crate::meta_service::{MetaError, MetaHandle, MetaView};
use crate::replica::ReplicaService;
use block_api::{AlignedBuf, BlockError};
use extent_store::CsumEntry;
use meta::state::{AllocateSlab, ChangeReplicas, NodeState, Op, Replica, ReplicaState, UNPLACED};
use replication::{ErrorCode, Request, Response, Transport};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

/// How long a replica may take to answer one request.
pub const REPLICA_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a slab change may wait for a leader to commit it.
const COMMIT_PATIENCE: Duration = Duration::from_secs(15);
/// Retries of a request whose epoch turned out old.
const EPOCH_RETRIES: usize = 5;

/// What every mirrored volume on this node shares.
pub struct MirrorCluster {
    pub this: u64,
    pub meta: MetaHandle,
    pub transport: Arc<dyn Transport>,
    pub local: Arc<ReplicaService>,
    /// A copy on a node down this long is replaced by one on another node.
    pub rebuild_after: Duration,
    /// Bytes per second a resync on this node may copy (None: no limit).
    pub repair_bandwidth: Option<u64>,
    /// How often a volume is scrubbed by itself (None: only on request).
    pub scrub_interval: Option<std::time::Duration>,
    /// Bytes per second a scrub on this node may read (None: no limit).
    pub scrub_bandwidth: Option<u64>,
}

/// Whether node `id` has been down (or is retired, or gone) long enough for
/// its copies to be rebuilt elsewhere.
pub fn lost_node(view: &MetaView, id: u64, rebuild_after: Duration) -> bool {
    match view.state.nodes.get(&id) {
        None => true,
        Some(n) if n.state == NodeState::Retired as i32 => true,
        Some(n) if n.state == NodeState::Down as i32 => {
            n.down_since_ms > 0
                && crate::meta_service::unix_ms().saturating_sub(n.down_since_ms)
                    >= rebuild_after.as_millis() as u64
        }
        Some(_) => false,
    }
}

/// Whether a copy is lost: its node is (see [`lost_node`]), or its disk
/// failed.
pub fn lost_copy(view: &MetaView, r: &Replica, rebuild_after: Duration) -> bool {
    let disk_failed = r.extent != UNPLACED
        && view
            .state
            .disks
            .get(&r.disk)
            .is_some_and(|d| d.state == meta::state::DiskState::Failed as i32);
    disk_failed || lost_node(view, r.node, rebuild_after)
}

/// Slabs of `name` with a lost copy (see [`lost_copy`]).
pub fn slabs_to_rebuild(view: &MetaView, name: &str, rebuild_after: Duration) -> Vec<u64> {
    let Some(v) = view.state.volumes.get(name) else {
        return Vec::new();
    };
    v.slabs
        .iter()
        .filter(|(_, s)| s.replicas.iter().any(|r| lost_copy(view, r, rebuild_after)))
        .map(|(n, _)| *n)
        .collect()
}

/// The copies among `targets` that are still resyncing; an error when
/// none is (they went stale meanwhile).
fn resyncing<'a>(
    s: &'a SlabView,
    slab: u64,
    targets: &[usize],
) -> Result<Vec<&'a Rep>, BlockError> {
    let reps: Vec<&Rep> = targets
        .iter()
        .filter_map(|t| s.reps.get(*t))
        .filter(|r| r.state == ReplicaState::Rebuilding)
        .collect();
    if reps.is_empty() {
        return Err(io(format!("slab {slab}: the resyncing copies went stale")));
    }
    Ok(reps)
}

/// One replica as a request sees it.
#[derive(Clone, Debug)]
struct Rep {
    index: usize,
    node: u64,
    address: Option<SocketAddr>,
    state: ReplicaState,
    /// No extent yet (see `meta::state::UNPLACED`).
    unplaced: bool,
}

/// A slab as a request sees it.
#[derive(Clone, Debug)]
struct SlabView {
    epoch: u64,
    reps: Vec<Rep>,
}

impl SlabView {
    fn current(&self) -> impl Iterator<Item = &Rep> {
        self.reps
            .iter()
            .filter(|r| r.state == ReplicaState::Current)
    }
}

/// The slab I/O of one mirrored volume.
pub struct MirrorVolume {
    cluster: Arc<MirrorCluster>,
    name: String,
    id: u64,
    copies: usize,
    /// The attachment generation this node serves the volume under; when
    /// the metadata shows another, the volume was taken over and this node
    /// must not touch it any more.
    generation: u64,
    /// Slabs where a write failed below the write quorum: it may have
    /// reached some copies only, so they are reconciled before the slab
    /// serves again.
    unsettled: std::sync::Mutex<std::collections::BTreeSet<u64>>,
}

fn io(msg: impl Into<String>) -> BlockError {
    BlockError::Io(msg.into())
}

/// What a replica did with one request.
enum Outcome {
    Done(Response),
    Stale,
    /// The copy's data failed its checksum.
    BadData(String),
    Failed(String),
}

impl MirrorVolume {
    pub fn new(
        cluster: Arc<MirrorCluster>,
        name: String,
        id: u64,
        copies: usize,
        generation: u64,
    ) -> MirrorVolume {
        MirrorVolume {
            cluster,
            name,
            id,
            copies,
            generation,
            unsettled: Default::default(),
        }
    }

    /// Replicas that must acknowledge a write when others failed.
    fn write_quorum(&self) -> usize {
        self.copies.div_ceil(2).max(1)
    }

    fn slab_view(&self, view: &MetaView, slab: u64) -> Option<SlabView> {
        let v = view.state.volumes.get(&self.name)?;
        if v.id != self.id {
            return None;
        }
        let s = v.slabs.get(&slab)?;
        Some(SlabView {
            epoch: s.epoch,
            reps: s
                .replicas
                .iter()
                .enumerate()
                .map(|(index, r)| Rep {
                    index,
                    node: r.node,
                    address: view
                        .state
                        .nodes
                        .get(&r.node)
                        .and_then(|n| n.replication_address.parse().ok()),
                    state: ReplicaState::try_from(r.state).unwrap_or(ReplicaState::Stale),
                    unplaced: r.extent == UNPLACED,
                })
                .collect(),
        })
    }

    /// The applied metadata now.
    pub fn view(&self) -> Arc<MetaView> {
        self.cluster.meta.view()
    }

    /// Bytes per slab.
    pub fn extent_size(&self) -> u64 {
        self.cluster.local.extent_size()
    }

    /// Replaces the copies of a slab that live on lost nodes with new,
    /// still empty, stale copies on other up nodes (placement's choice),
    /// through Raft at epoch + 1; a resync then fills them. Returns whether
    /// it changed the slab.
    pub async fn replace_lost(
        &self,
        slab: u64,
        rebuild_after: Duration,
    ) -> Result<bool, BlockError> {
        for _ in 0..EPOCH_RETRIES {
            let view = self.cluster.meta.view();
            let Some(v) = view.state.volumes.get(&self.name) else {
                return Ok(false);
            };
            let Some(old) = v.slabs.get(&slab) else {
                return Ok(false);
            };
            let lost = |r: &Replica| lost_copy(&view, r, rebuild_after);
            if !old.replicas.iter().any(lost) {
                return Ok(false);
            }
            let kept: Vec<Replica> = old.replicas.iter().filter(|r| !lost(r)).cloned().collect();
            if !kept.iter().any(|r| r.state == ReplicaState::Current as i32) {
                return Err(io(format!(
                    "slab {slab} of {}: no current copy left to rebuild from",
                    self.name
                )));
            }
            // A move under way keeps its extra copy unless it was the lost one.
            let moving_kept =
                old.moving_from != 0 && kept.iter().any(|r| r.node == old.moving_from);
            let want = self.copies + usize::from(moving_kept);
            let mut chosen: Vec<u64> = kept.iter().map(|r| r.node).collect();
            let preferred = crate::grpc::mirror_nodes(&view, self.copies, self.cluster.this)
                .unwrap_or_default()
                .into_iter()
                .map(|(n, _)| n);
            let others = view
                .state
                .nodes
                .values()
                .filter(|n| n.state == NodeState::Up as i32 && !n.replication_address.is_empty())
                .map(|n| n.id);
            let mut replicas = kept.clone();
            for n in preferred.chain(others) {
                if replicas.len() >= want {
                    break;
                }
                if chosen.contains(&n) {
                    continue;
                }
                chosen.push(n);
                replicas.push(Replica {
                    node: n,
                    disk: 0,
                    extent: UNPLACED,
                    state: ReplicaState::Stale as i32,
                });
            }
            if replicas.len() < want {
                // Not enough nodes: keep the lost copies' places for now.
                return Ok(false);
            }
            tracing::warn!(
                volume = %self.name,
                slab,
                lost = ?old.replicas.iter().filter(|r| lost(r)).map(|r| r.node).collect::<Vec<_>>(),
                new = ?replicas.iter().filter(|r| r.extent == UNPLACED).map(|r| r.node).collect::<Vec<_>>(),
                "rebuilding copies of lost nodes elsewhere"
            );
            match self
                .commit(Op::AllocateSlab(AllocateSlab {
                    volume: self.name.clone(),
                    slab,
                    replicas,
                    epoch: old.epoch + 1,
                    moving_from: if moving_kept { old.moving_from } else { 0 },
                }))
                .await
            {
                Ok(_) => return Ok(true),
                Err(MetaError::Rejected(r)) => {
                    tracing::debug!(volume = %self.name, slab, reason = %r, "replacement refused; looking again");
                    self.newer_than(old.epoch, slab).await;
                }
                Err(e) => return Err(Self::meta_err(e)),
            }
        }
        Err(io(format!(
            "slab {slab} of {} kept changing epoch",
            self.name
        )))
    }

    /// Step 1 of a resync (see `crate::resync`): the stale copies on up
    /// nodes become resyncing. Returns their replica indices, or `None`
    /// when there is nothing to resync.
    pub async fn begin_resync(&self, slab: u64) -> Result<Option<Vec<usize>>, BlockError> {
        for _ in 0..EPOCH_RETRIES {
            let view = self.cluster.meta.view();
            let Some(s) = self.slab_view(&view, slab) else {
                return Ok(None);
            };
            let up = |node: u64| {
                view.state
                    .nodes
                    .get(&node)
                    .is_some_and(|n| n.state == meta::state::NodeState::Up as i32)
            };
            let targets: Vec<usize> = s
                .reps
                .iter()
                .filter(|r| r.state != ReplicaState::Current && up(r.node))
                .map(|r| r.index)
                .collect();
            if targets.is_empty() || s.current().next().is_none() {
                return Ok(None);
            }
            let mut disks = vec![UNPLACED; s.reps.len()];
            let mut extents = vec![UNPLACED; s.reps.len()];
            for &t in &targets {
                let req = Request::Allocate {
                    volume: self.id,
                    slab,
                    epoch: s.epoch,
                };
                let r = &s.reps[t];
                match self.call(r, req).await {
                    Outcome::Done(Response::Allocated { disk, extent }) => {
                        if r.unplaced {
                            disks[t] = crate::replica::meta_disk_id(r.node, disk as usize);
                            extents[t] = extent;
                        }
                    }
                    Outcome::Stale => break,
                    Outcome::Done(_) => return Err(io("unexpected reply to Allocate")),
                    Outcome::Failed(m) | Outcome::BadData(m) => {
                        return Err(io(format!("resync target: {m}")));
                    }
                }
            }
            let placing = extents.iter().any(|e| *e != UNPLACED);
            let (disks, extents) = if placing {
                (disks, extents)
            } else {
                (Vec::new(), Vec::new())
            };
            let states = s
                .reps
                .iter()
                .map(|r| {
                    if targets.contains(&r.index) {
                        ReplicaState::Rebuilding as i32
                    } else {
                        r.state as i32
                    }
                })
                .collect();
            match self
                .change_placing(slab, s.epoch, states, disks, extents)
                .await
            {
                Ok(true) => return Ok(Some(targets)),
                Ok(false) => continue,
                Err(e) => return Err(e),
            }
        }
        Err(io(format!(
            "slab {slab} of {} kept changing epoch",
            self.name
        )))
    }

    /// Step 2 of a resync: makes `[offset, offset + len)` of the resyncing
    /// copies equal to a current copy's, copying only the blocks whose
    /// checksums differ; returns the bytes copied. The caller pauses the
    /// volume's I/O around it.
    pub async fn copy_range(
        &self,
        slab: u64,
        offset: u64,
        len: u64,
        targets: &[usize],
    ) -> Result<u64, BlockError> {
        let bs = block_api::BLOCK_SIZE as u64;
        let view = self.cluster.meta.view();
        let s = self.resync_view(&view, slab)?;
        let dst = resyncing(&s, slab, targets)?;
        let order = self.read_order(&s);
        let src = order
            .first()
            .ok_or_else(|| io(format!("slab {slab}: no current copy to resync from")))?;
        let blocks = (len / bs) as u32;
        let sums = self
            .checksums(src, slab, s.epoch, offset, blocks, "resync source")
            .await?;
        // Only the blocks where a copy differs from the source travel: what
        // the copy missed while it was stale (a fresh copy: everything the
        // source holds).
        let mut copied = 0u64;
        for d in dst {
            let theirs = self
                .checksums(d, slab, s.epoch, offset, blocks, "resync target")
                .await?;
            copied += bs
                * self
                    .copy_differing(src, &sums, d, &theirs, slab, s.epoch, offset)
                    .await?;
        }
        Ok(copied)
    }

    /// Makes copy `dst` equal to `src` over the blocks whose checksums
    /// (`theirs` against `base`, from `offset` on) differ, a run of blocks
    /// of one kind at a time; returns the blocks copied.
    #[allow(clippy::too_many_arguments)]
    async fn copy_differing(
        &self,
        src: &Rep,
        base: &[u64],
        dst: &Rep,
        theirs: &[u64],
        slab: u64,
        epoch: u64,
        offset: u64,
    ) -> Result<u64, BlockError> {
        let bs = block_api::BLOCK_SIZE as u64;
        let differs = |k: usize| {
            theirs
                .get(k)
                .is_none_or(|x| !crate::replica::same_content(*x, base[k]))
        };
        let mut copied = 0;
        let mut i = 0;
        while i < base.len() {
            if !differs(i) {
                i += 1;
                continue;
            }
            let kind = base[i].min(2);
            let mut j = i + 1;
            while j < base.len() && differs(j) && base[j].min(2) == kind {
                j += 1;
            }
            let (at, n) = (offset + i as u64 * bs, (j - i) as u64 * bs);
            self.copy_run(src, &[dst], slab, epoch, at, n, kind).await?;
            copied += (j - i) as u64;
            i = j;
        }
        Ok(copied)
    }

    /// The per-block checksums of a range of one copy; `what` names the
    /// copy in errors.
    async fn checksums(
        &self,
        rep: &Rep,
        slab: u64,
        epoch: u64,
        offset: u64,
        blocks: u32,
        what: &str,
    ) -> Result<Vec<u64>, BlockError> {
        let req = Request::Checksums {
            volume: self.id,
            slab,
            epoch,
            offset,
            blocks,
        };
        match self.call(rep, req).await {
            Outcome::Done(Response::Checksums(v)) => Ok(v),
            Outcome::Failed(m) | Outcome::BadData(m) => Err(io(format!("{what}: {m}"))),
            _ => Err(io(format!("{what}: unexpected reply"))),
        }
    }

    /// Copies `[at, at + n)` of a slab from `src` to `dst`: the data when
    /// `kind` is 2, else a hole (0) or zeros (1) like the source's blocks.
    #[allow(clippy::too_many_arguments)]
    async fn copy_run(
        &self,
        src: &Rep,
        dst: &[&Rep],
        slab: u64,
        epoch: u64,
        at: u64,
        n: u64,
        kind: u64,
    ) -> Result<(), BlockError> {
        let data = if kind == 2 {
            match self
                .call(
                    src,
                    Request::Read {
                        volume: self.id,
                        slab,
                        epoch,
                        offset: at,
                        len: n as u32,
                    },
                )
                .await
            {
                Outcome::Done(Response::Data(b)) => Some(b),
                Outcome::Failed(m) | Outcome::BadData(m) => {
                    return Err(io(format!("copy source: {m}")));
                }
                _ => return Err(io("copy source: unexpected reply")),
            }
        } else {
            None
        };
        for d in dst {
            let req = match (&data, kind) {
                (Some(b), _) => Request::Write {
                    volume: self.id,
                    slab,
                    epoch,
                    offset: at,
                    data: AlignedBuf::from_slice(b),
                    fua: false,
                },
                (None, 0) => Request::Trim {
                    volume: self.id,
                    slab,
                    epoch,
                    offset: at,
                    len: n,
                },
                (None, _) => Request::WriteZeroes {
                    volume: self.id,
                    slab,
                    epoch,
                    offset: at,
                    len: n,
                },
            };
            match self.call(d, req).await {
                Outcome::Done(_) => {}
                Outcome::Stale => return Err(io("copy: the slab changed epoch")),
                Outcome::Failed(m) | Outcome::BadData(m) => {
                    return Err(io(format!("copy target: {m}")));
                }
            }
        }
        Ok(())
    }

    /// Makes the current copies of every slab agree, before a node serves
    /// a volume whose previous coordinator stopped without letting it go:
    /// writes it had in flight may have reached some copies only. Where
    /// copies differ, this node's copy (or the first current one) wins, as
    /// any outcome of a write nobody acknowledged is allowed. Copies that
    /// do not answer are marked stale (their node may hold such writes too;
    /// a resync brings them back). Returns the blocks it rewrote.
    pub async fn reconcile(&self) -> Result<u64, BlockError> {
        let view = self.cluster.meta.view();
        let slabs: Vec<u64> = view
            .state
            .volumes
            .get(&self.name)
            .map(|v| v.slabs.keys().copied().collect())
            .unwrap_or_default();
        let mut fixed = 0;
        // Nodes found out of reach are not asked again for the next slabs
        // (each ask would wait out its deadline).
        let mut unreachable = std::collections::BTreeSet::new();
        for slab in slabs {
            fixed += self.reconcile_slab(slab, &mut unreachable).await?;
        }
        Ok(fixed)
    }

    /// Reconciles one slab; `gone` holds the nodes found out of reach so
    /// far (and gains those found now): their copies are marked stale
    /// without asking them.
    async fn reconcile_slab(
        &self,
        slab: u64,
        gone: &mut std::collections::BTreeSet<u64>,
    ) -> Result<u64, BlockError> {
        let bs = block_api::BLOCK_SIZE as u64;
        let es = self.extent_size();
        let chunk = crate::resync::CHUNK;
        let mut fixed = 0;
        let mut off = 0;
        let mut tries = 0;
        while off < es {
            tries += 1;
            if tries > 64 * EPOCH_RETRIES {
                return Err(io(format!(
                    "slab {slab}: copies kept changing during reconcile"
                )));
            }
            let view = self.cluster.meta.view();
            let Some(s) = self.slab_view(&view, slab) else {
                return Ok(fixed);
            };
            let len = chunk.min(es - off);
            let mut sums = Vec::new();
            let mut unreachable = Vec::new();
            let mut stale = false;
            let down = |node: u64| {
                view.state
                    .nodes
                    .get(&node)
                    .is_none_or(|n| n.state == NodeState::Down as i32)
            };
            let mut asks = Vec::new();
            for r in self.read_order(&s) {
                if gone.contains(&r.node) || down(r.node) {
                    unreachable.push((r.node, "node out of reach".to_string()));
                    continue;
                }
                let req = Request::Checksums {
                    volume: self.id,
                    slab,
                    epoch: s.epoch,
                    offset: off,
                    blocks: (len / bs) as u32,
                };
                asks.push(async move {
                    let o = self.call(&r, req).await;
                    (r, o)
                });
            }
            // All copies at once: one that does not answer costs one
            // deadline, not one per copy.
            for (r, o) in futures::future::join_all(asks).await {
                match o {
                    Outcome::Done(Response::Checksums(v)) => sums.push((r, v)),
                    Outcome::Stale => stale = true,
                    Outcome::Done(_) => unreachable.push((r.node, "unexpected reply".to_string())),
                    Outcome::BadData(m) => unreachable.push((r.node, m)),
                    Outcome::Failed(m) => {
                        gone.insert(r.node);
                        unreachable.push((r.node, m));
                    }
                }
            }
            if stale {
                self.newer_than(s.epoch, slab).await;
                continue;
            }
            if !unreachable.is_empty() {
                if sums.is_empty() {
                    return Err(io(format!(
                        "slab {slab} of {}: no current copy answers",
                        self.name
                    )));
                }
                tracing::warn!(volume = %self.name, slab, copies = ?unreachable, "copies out of reach after a takeover; marking them stale");
                self.mark_nodes_stale(slab, &unreachable).await?;
                continue;
            }
            let Some(((src, base), rest)) = sums.split_first() else {
                return Ok(fixed);
            };
            for (r, v) in rest {
                fixed += self
                    .copy_differing(src, base, r, v, slab, s.epoch, off)
                    .await?;
            }
            off += len;
        }
        Ok(fixed)
    }

    /// The slab during its resync.
    fn resync_view(&self, view: &MetaView, slab: u64) -> Result<SlabView, BlockError> {
        self.slab_view(view, slab)
            .ok_or_else(|| io(format!("slab {slab} vanished during resync")))
    }

    /// Step 3 of a resync: the copies, made durable, become current.
    pub async fn finish_resync(&self, slab: u64, targets: &[usize]) -> Result<(), BlockError> {
        for _ in 0..EPOCH_RETRIES {
            let view = self.cluster.meta.view();
            let s = self.resync_view(&view, slab)?;
            let done = resyncing(&s, slab, targets)?;
            for r in &done {
                match self.call(r, Request::Flush).await {
                    Outcome::Done(_) => {}
                    Outcome::Stale => return Err(io("resync: the slab changed epoch")),
                    Outcome::Failed(m) | Outcome::BadData(m) => {
                        return Err(io(format!("resync target: {m}")));
                    }
                }
            }
            let states = s
                .reps
                .iter()
                .map(|r| {
                    if done.iter().any(|d| d.index == r.index) {
                        ReplicaState::Current as i32
                    } else {
                        r.state as i32
                    }
                })
                .collect();
            match self.change(slab, s.epoch, states).await {
                Ok(true) => return Ok(()),
                Ok(false) => continue,
                Err(e) => return Err(e),
            }
        }
        Err(io(format!(
            "slab {slab} of {} kept changing epoch",
            self.name
        )))
    }

    /// Proposes new replica states at `epoch`: true when committed, false
    /// when the slab changed meanwhile.
    async fn change(&self, slab: u64, epoch: u64, states: Vec<i32>) -> Result<bool, BlockError> {
        self.change_placing(slab, epoch, states, Vec::new(), Vec::new())
            .await
    }

    async fn change_placing(
        &self,
        slab: u64,
        epoch: u64,
        states: Vec<i32>,
        disks: Vec<u64>,
        extents: Vec<u64>,
    ) -> Result<bool, BlockError> {
        match self
            .commit(Op::ChangeReplicas(ChangeReplicas {
                volume: self.name.clone(),
                slab,
                epoch,
                states,
                disks,
                extents,
            }))
            .await
        {
            Ok(_) => Ok(true),
            Err(MetaError::Rejected(_)) => Ok(false),
            Err(e) => Err(Self::meta_err(e)),
        }
    }

    /// Whether this node still serves the volume under its attachment.
    pub fn is_ours(&self, view: &MetaView) -> bool {
        self.still_ours(view).is_ok()
    }

    /// Fails when the volume is no longer attached to this node under the
    /// generation it was opened with (another node took it over).
    fn still_ours(&self, view: &MetaView) -> Result<(), BlockError> {
        let a = view
            .state
            .volumes
            .get(&self.name)
            .filter(|v| v.id == self.id)
            .and_then(|v| v.attachment.as_ref());
        match a {
            Some(a) if a.node == self.cluster.this && a.generation == self.generation => Ok(()),
            Some(a) => Err(io(format!(
                "volume {} was taken over by node {}; this node no longer serves it",
                self.name, a.node
            ))),
            None => Err(io(format!(
                "volume {} is no longer attached to this node",
                self.name
            ))),
        }
    }

    /// Reconciles the slab first if a write failed on it below quorum.
    async fn settle(&self, slab: u64) -> Result<(), BlockError> {
        let due = self
            .unsettled
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(&slab);
        if !due {
            return Ok(());
        }
        let fixed = self.reconcile_slab(slab, &mut Default::default()).await?;
        tracing::info!(volume = %self.name, slab, blocks = fixed, "copies reconciled after a write failed below quorum");
        self.unsettled
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&slab);
        Ok(())
    }

    /// Whether the metadata has this slab.
    pub fn allocated(&self, slab: u64) -> bool {
        self.slab_view(&self.cluster.meta.view(), slab).is_some()
    }

    async fn call(&self, rep: &Rep, req: Request) -> Outcome {
        let resp = if rep.node == self.cluster.this {
            self.cluster.local.serve(req).await
        } else {
            let Some(addr) = rep.address else {
                return Outcome::Failed(format!("node {} has no replication address", rep.node));
            };
            match self
                .cluster
                .transport
                .call(addr, req, REPLICA_TIMEOUT)
                .await
            {
                Ok(r) => r,
                Err(e) => return Outcome::Failed(format!("node {}: {e}", rep.node)),
            }
        };
        match resp {
            Response::Error {
                code: ErrorCode::StaleEpoch { .. },
                ..
            } => Outcome::Stale,
            Response::Error {
                code: ErrorCode::Checksum,
                message,
            } => Outcome::BadData(format!("node {}: {message}", rep.node)),
            Response::Error { message, .. } => {
                Outcome::Failed(format!("node {}: {message}", rep.node))
            }
            r => Outcome::Done(r),
        }
    }

    /// Proposes a change of the volume's slabs; when the cluster has no
    /// leader or the commit times out (the leader died with the proposal),
    /// proposes again until a new leader commits it or 15 s pass. A change
    /// that committed twice is refused the second time (its epoch moved):
    /// callers check the slab again on `Rejected`.
    async fn commit(&self, op: Op) -> Result<Arc<MetaView>, MetaError> {
        let deadline = tokio::time::Instant::now() + COMMIT_PATIENCE;
        loop {
            match self.cluster.meta.propose(op.clone()).await {
                Err(MetaError::NoLeader { .. } | MetaError::Timeout(_))
                    if tokio::time::Instant::now() < deadline =>
                {
                    tracing::info!(volume = %self.name, "no leader to record a slab change; retrying");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                r => return r,
            }
        }
    }

    fn meta_err(e: MetaError) -> BlockError {
        io(format!("cannot record a replica failure: {e}"))
    }

    /// Places a new slab: placement picks the nodes (this one first when it
    /// can), each allocates an extent, Raft records them. With nodes down,
    /// the slab is placed on fewer nodes (at least the write quorum) and the
    /// missing copies are recorded stale and unplaced on other nodes, to be
    /// filled by a resync when those nodes are back.
    pub async fn allocate(&self, slab: u64) -> Result<(), BlockError> {
        let view = self
            .cluster
            .meta
            .read()
            .await
            .map_err(|e| io(e.to_string()))?;
        if self.slab_view(&view, slab).is_some() {
            return Ok(());
        }
        let mut want = self.copies;
        let nodes = loop {
            match crate::grpc::mirror_nodes(&view, want, self.cluster.this) {
                Ok(n) => break n,
                Err(_) if want > self.write_quorum() => want -= 1,
                Err(e) => {
                    return Err(io(format!(
                        "cannot place slab {slab} of {}: {e}",
                        self.name
                    )));
                }
            }
        };
        let asks = nodes.iter().enumerate().map(|(index, (node, address))| {
            let rep = Rep {
                index,
                node: *node,
                address: *address,
                state: ReplicaState::Current,
                unplaced: false,
            };
            async move {
                let req = Request::Allocate {
                    volume: self.id,
                    slab,
                    epoch: 1,
                };
                (rep.node, self.call(&rep, req).await)
            }
        });
        let mut replicas = Vec::with_capacity(self.copies);
        let mut unplaced = Vec::new();
        let mut full = false;
        for (node, outcome) in futures::future::join_all(asks).await {
            match outcome {
                Outcome::Done(Response::Allocated { disk, extent }) => replicas.push(Replica {
                    node,
                    disk: crate::replica::meta_disk_id(node, disk as usize),
                    extent,
                    state: ReplicaState::Current as i32,
                }),
                Outcome::Failed(m) | Outcome::BadData(m) => {
                    full |= m.contains("full");
                    tracing::warn!(volume = %self.name, slab, node, error = %m, "copy not placed; recorded stale");
                    unplaced.push(node);
                }
                _ => unplaced.push(node),
            }
        }
        if replicas.len() < self.write_quorum() {
            return Err(if full {
                BlockError::NoSpace {
                    volume: self.name.clone(),
                }
            } else {
                io(format!(
                    "cannot place slab {slab} of {}: only {} of {} copies could be allocated",
                    self.name,
                    replicas.len(),
                    self.copies
                ))
            });
        }
        // The missing copies: stale placeholders on nodes that have none.
        let others: Vec<u64> = view
            .state
            .nodes
            .values()
            .filter(|n| {
                n.state != NodeState::Retired as i32 && n.state != NodeState::Maintenance as i32
            })
            .map(|n| n.id)
            .filter(|id| !nodes.iter().any(|(n, _)| n == id))
            .collect();
        for node in unplaced.into_iter().chain(others) {
            if replicas.len() >= self.copies {
                break;
            }
            replicas.push(Replica {
                node,
                disk: 0,
                extent: UNPLACED,
                state: ReplicaState::Stale as i32,
            });
        }
        let r = self
            .commit(Op::AllocateSlab(AllocateSlab {
                volume: self.name.clone(),
                slab,
                replicas,
                epoch: 1,
                moving_from: 0,
            }))
            .await;
        match r {
            Ok(_) => Ok(()),
            // Another request placed it first: use that.
            Err(_) if self.allocated(slab) => Ok(()),
            Err(e) => Err(io(format!("cannot record slab {slab}: {e}"))),
        }
    }

    /// Sends `make(epoch)` to every current (and resyncing) replica and
    /// applies the write rule of the module doc.
    async fn fan_out(&self, slab: u64, make: impl Fn(u64) -> Request) -> Result<(), BlockError> {
        self.settle(slab).await?;
        for _ in 0..EPOCH_RETRIES {
            let view = self.cluster.meta.view();
            self.still_ours(&view)?;
            let s = self
                .slab_view(&view, slab)
                .ok_or_else(|| io(format!("slab {slab} of {} is not allocated", self.name)))?;
            let targets: Vec<&Rep> = s
                .reps
                .iter()
                .filter(|r| r.state != ReplicaState::Stale)
                .collect();
            let outcomes =
                futures::future::join_all(targets.iter().map(|r| self.call(r, make(s.epoch))))
                    .await;
            if outcomes.iter().any(|o| matches!(o, Outcome::Stale)) {
                self.newer_than(s.epoch, slab).await;
                continue;
            }
            let mut acked_current = 0;
            let mut failed = Vec::new();
            for (r, o) in targets.iter().zip(&outcomes) {
                match o {
                    Outcome::Done(_) if r.state == ReplicaState::Current => acked_current += 1,
                    Outcome::Done(_) => {}
                    Outcome::Failed(m) | Outcome::BadData(m) => failed.push((r.index, m.clone())),
                    Outcome::Stale => {}
                }
            }
            if failed.is_empty() {
                return Ok(());
            }
            if acked_current < self.write_quorum() {
                self.unsettled
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(slab);
                return Err(io(format!(
                    "write quorum lost on slab {slab} of {}: {acked_current} of {} replicas acknowledged ({})",
                    self.name,
                    self.copies,
                    failed
                        .iter()
                        .map(|f| f.1.as_str())
                        .collect::<Vec<_>>()
                        .join("; ")
                )));
            }
            let states = s
                .reps
                .iter()
                .map(|r| {
                    if failed.iter().any(|f| f.0 == r.index) {
                        ReplicaState::Stale as i32
                    } else {
                        r.state as i32
                    }
                })
                .collect();
            tracing::warn!(volume = %self.name, slab, failed = ?failed, "marking replicas stale");
            if self.change(slab, s.epoch, states).await? {
                return Ok(());
            }
            // The slab changed meanwhile: fine if the failed replicas are
            // stale now, else decide again.
            let view = self.cluster.meta.view();
            if let Some(now) = self.slab_view(&view, slab)
                && failed.iter().all(|f| {
                    now.reps
                        .get(f.0)
                        .is_none_or(|r| r.state == ReplicaState::Stale)
                })
            {
                return Ok(());
            }
        }
        Err(io(format!(
            "slab {slab} of {} kept changing epoch; giving up",
            self.name
        )))
    }

    /// Waits (briefly) until the applied metadata has a newer epoch for
    /// the slab than `epoch`.
    async fn newer_than(&self, epoch: u64, slab: u64) {
        let mut rx = self.cluster.meta.subscribe();
        let _ = tokio::time::timeout(
            Duration::from_secs(1),
            rx.wait_for(|v| self.slab_view(v, slab).is_some_and(|s| s.epoch > epoch)),
        )
        .await;
    }

    pub async fn write(
        &self,
        slab: u64,
        offset: u64,
        data: AlignedBuf,
        fua: bool,
    ) -> Result<(), BlockError> {
        for (i, part) in data.chunks(replication::WRITE_DATA_MAX).enumerate() {
            let at = offset + (i * replication::WRITE_DATA_MAX) as u64;
            self.fan_out(slab, |epoch| Request::Write {
                volume: self.id,
                slab,
                epoch,
                offset: at,
                data: AlignedBuf::from_slice(part),
                fua,
            })
            .await?;
        }
        Ok(())
    }

    pub async fn set_blocks(
        &self,
        slab: u64,
        offset: u64,
        len: u64,
        state: CsumEntry,
    ) -> Result<(), BlockError> {
        self.fan_out(slab, |epoch| match state {
            CsumEntry::Hole => Request::Trim {
                volume: self.id,
                slab,
                epoch,
                offset,
                len,
            },
            _ => Request::WriteZeroes {
                volume: self.id,
                slab,
                epoch,
                offset,
                len,
            },
        })
        .await
    }

    /// Current replicas, this node's first.
    fn read_order(&self, s: &SlabView) -> Vec<Rep> {
        let mut reps: Vec<Rep> = s.current().cloned().collect();
        reps.sort_by_key(|r| r.node != self.cluster.this);
        reps
    }

    pub async fn read(&self, slab: u64, offset: u64, len: u64) -> Result<AlignedBuf, BlockError> {
        let max = u64::from(replication::READ_LEN_MAX);
        if len <= max {
            return self.read_part(slab, offset, len).await;
        }
        let mut out = AlignedBuf::zeroed(len as usize);
        let mut at = 0;
        while at < len {
            let n = max.min(len - at);
            let b = self.read_part(slab, offset + at, n).await?;
            out[at as usize..(at + n) as usize].copy_from_slice(&b);
            at += n;
        }
        Ok(out)
    }

    async fn read_part(&self, slab: u64, offset: u64, len: u64) -> Result<AlignedBuf, BlockError> {
        self.settle(slab).await?;
        for _ in 0..EPOCH_RETRIES {
            let view = self.cluster.meta.view();
            self.still_ours(&view)?;
            let s = self
                .slab_view(&view, slab)
                .ok_or_else(|| io(format!("slab {slab} of {} is not allocated", self.name)))?;
            let mut bad = Vec::new();
            let mut errors = Vec::new();
            let mut stale = false;
            for r in self.read_order(&s) {
                let req = Request::Read {
                    volume: self.id,
                    slab,
                    epoch: s.epoch,
                    offset,
                    len: len as u32,
                };
                match self.call(&r, req).await {
                    Outcome::Done(Response::Data(buf)) => {
                        for b in bad {
                            self.repair(&s, &b, slab, offset, &buf).await;
                        }
                        return Ok(buf);
                    }
                    Outcome::Done(_) => errors.push(format!("node {}: unexpected reply", r.node)),
                    Outcome::Stale => {
                        stale = true;
                        break;
                    }
                    Outcome::BadData(m) => {
                        tracing::warn!(volume = %self.name, slab, node = r.node, "bad copy; reading another");
                        bad.push(r.clone());
                        errors.push(m);
                    }
                    Outcome::Failed(m) => errors.push(m),
                }
            }
            if stale {
                self.newer_than(s.epoch, slab).await;
                continue;
            }
            return Err(io(format!(
                "no current copy of slab {slab} of {} could be read: {}",
                self.name,
                errors.join("; ")
            )));
        }
        Err(io(format!(
            "slab {slab} of {} kept changing epoch",
            self.name
        )))
    }

    /// Writes good data over a copy whose checksum failed.
    async fn repair(&self, s: &SlabView, rep: &Rep, slab: u64, offset: u64, good: &[u8]) {
        let req = Request::Write {
            volume: self.id,
            slab,
            epoch: s.epoch,
            offset,
            data: AlignedBuf::from_slice(good),
            fua: true,
        };
        match self.call(rep, req).await {
            Outcome::Done(_) => {
                tracing::info!(volume = %self.name, slab, node = rep.node, offset, "repaired a bad copy from a good one")
            }
            _ => {
                tracing::warn!(volume = %self.name, slab, node = rep.node, "repairing a bad copy failed")
            }
        }
    }

    /// Per-block states of a range, from one current copy.
    pub async fn block_states(
        &self,
        slab: u64,
        offset: u64,
        blocks: u64,
    ) -> Result<Vec<CsumEntry>, BlockError> {
        let view = self.cluster.meta.view();
        let s = self
            .slab_view(&view, slab)
            .ok_or_else(|| io(format!("slab {slab} of {} is not allocated", self.name)))?;
        let mut last = String::new();
        for r in self.read_order(&s) {
            let req = Request::Checksums {
                volume: self.id,
                slab,
                epoch: s.epoch,
                offset,
                blocks: blocks as u32,
            };
            match self.call(&r, req).await {
                Outcome::Done(Response::Checksums(v)) => {
                    return Ok(v
                        .into_iter()
                        .map(|c| match c {
                            0 => CsumEntry::Hole,
                            1 => CsumEntry::Zero,
                            c => CsumEntry::Data(c as u32),
                        })
                        .collect());
                }
                Outcome::Failed(m) | Outcome::BadData(m) => last = m,
                _ => {}
            }
        }
        Err(io(format!("no copy answered for slab {slab}: {last}")))
    }

    /// Makes every acknowledged write durable on every current replica.
    pub async fn flush(&self) -> Result<(), BlockError> {
        let view = self.cluster.meta.view();
        self.still_ours(&view)?;
        let Some(v) = view.state.volumes.get(&self.name) else {
            return Err(BlockError::Gone(self.name.clone()));
        };
        let mut nodes: Vec<u64> = v
            .slabs
            .values()
            .flat_map(|s| s.replicas.iter())
            .filter(|r| r.state != ReplicaState::Stale as i32)
            .map(|r| r.node)
            .collect();
        nodes.sort_unstable();
        nodes.dedup();
        let flushes = nodes.iter().map(|&node| {
            let rep = Rep {
                index: 0,
                node,
                address: view
                    .state
                    .nodes
                    .get(&node)
                    .and_then(|n| n.replication_address.parse().ok()),
                state: ReplicaState::Current,
                unplaced: false,
            };
            async move { (node, self.call(&rep, Request::Flush).await) }
        });
        let failed: Vec<(u64, String)> = futures::future::join_all(flushes)
            .await
            .into_iter()
            .filter_map(|(n, o)| match o {
                Outcome::Done(_) => None,
                Outcome::Stale => Some((n, "stale".into())),
                Outcome::Failed(m) | Outcome::BadData(m) => Some((n, m)),
            })
            .collect();
        if failed.is_empty() {
            return Ok(());
        }
        // The nodes that missed the flush must not stay current.
        let slabs: Vec<u64> = v.slabs.keys().copied().collect();
        for slab in slabs {
            self.mark_nodes_stale(slab, &failed).await?;
        }
        Ok(())
    }

    async fn mark_nodes_stale(
        &self,
        slab: u64,
        failed: &[(u64, String)],
    ) -> Result<(), BlockError> {
        for _ in 0..EPOCH_RETRIES {
            let view = self.cluster.meta.view();
            let Some(s) = self.slab_view(&view, slab) else {
                return Ok(());
            };
            let hit = |r: &Rep| failed.iter().any(|f| f.0 == r.node);
            if !s
                .reps
                .iter()
                .any(|r| hit(r) && r.state != ReplicaState::Stale)
            {
                return Ok(());
            }
            let left = s.current().filter(|r| !hit(r)).count();
            if left < self.write_quorum() {
                return Err(io(format!(
                    "flush quorum lost on slab {slab} of {}: {left} of {} replicas confirmed",
                    self.name, self.copies
                )));
            }
            let states = s
                .reps
                .iter()
                .map(|r| {
                    if hit(r) {
                        ReplicaState::Stale as i32
                    } else {
                        r.state as i32
                    }
                })
                .collect();
            if self.change(slab, s.epoch, states).await? {
                return Ok(());
            }
        }
        Err(io(format!(
            "slab {slab} of {} kept changing epoch",
            self.name
        )))
    }
}
