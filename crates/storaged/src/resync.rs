//! Resync of mirrored slabs: a copy marked stale (its node missed writes)
//! whose node is up again is brought back to current by copying the slab
//! from a current copy, while the volume keeps serving.
//!
//! Protocol for one slab, run by the node that coordinates the volume
//! ([`SLABS_AT_ONCE`] slabs at a time):
//! 1. Through Raft, the stale copies on up nodes become `resyncing`
//!    (epoch + 1). From then on every client write goes to them too (their
//!    failures mark them stale again) but they serve no reads and do not
//!    count toward the write quorum.
//! 2. The slab is compared chunk by chunk (1 MiB) with a current copy
//!    through the per-block checksums both sides store, and only the blocks
//!    that differ are copied: what the copy missed while it was stale (all
//!    of it for a copy that never had an extent). Each chunk is handled
//!    with client I/O to that chunk paused (`crate::range_gate`), so no client write to it can
//!    land between the read of the source and the write of the copy. Holes
//!    stay holes, zeros stay zeros.
//! 3. Through Raft, the copies become `current` (epoch + 1).
//!
//! Comparing costs 8 bytes per 4 KiB block from each side (a 256 MiB slab:
//! 512 KiB), not a read of the slab. A copy whose stored checksums match
//! but whose data rotted on disk is not found this way; reads and
//! `volume verify` find that. A resync that stops half way (the coordinator
//! died) leaves `resyncing` copies, which the next resync starts over,
//! again copying only what differs.

use crate::meta_service::MetaView;
use crate::mirror::MirrorVolume;
use crate::volume::Volume;
use block_api::{BlockError, BlockVolume};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// Slabs of one volume resynced at the same time.
pub const SLABS_AT_ONCE: usize = 4;
/// Bytes copied per step with client I/O to them paused (while clients
/// are idle; see `crate::activity`).
pub const CHUNK: u64 = 4 << 20;

/// How far the resyncs of one volume are: bytes compared of the slabs to
/// resync, and bytes that had to be copied.
#[derive(Default, Debug)]
pub struct Progress {
    pub done: AtomicU64,
    pub total: AtomicU64,
    pub copied: AtomicU64,
    /// When the last resync started (ms since the Unix epoch).
    pub started_ms: AtomicU64,
    /// When it ended (0 while it runs).
    pub finished_ms: AtomicU64,
    pub running: std::sync::atomic::AtomicBool,
}

impl Progress {
    pub fn get(&self) -> (u64, u64) {
        (
            self.done.load(Ordering::Relaxed),
            self.total.load(Ordering::Relaxed),
        )
    }
}

/// Marks a progress running until dropped.
struct RunningMark<'a>(&'a Progress);

impl Drop for RunningMark<'_> {
    fn drop(&mut self) {
        self.0
            .finished_ms
            .store(crate::meta_service::unix_ms(), Ordering::Relaxed);
        self.0.running.store(false, Ordering::Relaxed);
    }
}

/// Slabs of `name` with a stale or resyncing copy on a node that is up.
pub fn slabs_to_resync(view: &MetaView, name: &str) -> Vec<u64> {
    use meta::state::{NodeState, ReplicaState};
    let Some(v) = view.state.volumes.get(name) else {
        return Vec::new();
    };
    v.slabs
        .iter()
        .filter(|(_, s)| {
            s.replicas.iter().any(|r| {
                r.state != ReplicaState::Current as i32
                    && view
                        .state
                        .nodes
                        .get(&r.node)
                        .is_some_and(|n| n.state == NodeState::Up as i32)
            })
        })
        .map(|(n, _)| *n)
        .collect()
}

/// Resyncs every slab of `vol` that needs it; returns how many it
/// finished.
pub async fn resync_volume(
    vol: &Volume,
    mirror: &MirrorVolume,
    progress: &Progress,
    view: &MetaView,
    rebuild_after: std::time::Duration,
    bandwidth: Option<u64>,
) -> Result<usize, BlockError> {
    // First give the copies of lost nodes new places: they become stale
    // copies that the resync below fills.
    for slab in crate::mirror::slabs_to_rebuild(view, vol.name(), rebuild_after) {
        mirror.replace_lost(slab, rebuild_after).await?;
    }
    // Copies leaving a draining node or disk: drop those whose new copy is
    // current, give the others a new (stale) copy that the resync fills.
    for slab in crate::mirror::slabs_to_move(&mirror.view(), vol.name()) {
        if !mirror.finish_move(slab).await? {
            mirror.start_move(slab).await?;
        }
    }
    let view = mirror.view();
    let slabs = slabs_to_resync(&view, vol.name());
    if slabs.is_empty() {
        return Ok(0);
    }
    let es = mirror.extent_size();
    progress.done.store(0, Ordering::Relaxed);
    progress.copied.store(0, Ordering::Relaxed);
    progress
        .started_ms
        .store(crate::meta_service::unix_ms(), Ordering::Relaxed);
    progress.finished_ms.store(0, Ordering::Relaxed);
    progress.running.store(true, Ordering::Relaxed);
    let _mark = RunningMark(progress);
    let started = std::time::Instant::now();
    progress
        .total
        .store(slabs.len() as u64 * es, Ordering::Relaxed);
    let session = vol.repair_session().await;
    let one = |slab: u64| {
        let session = &session;
        async move {
            let Some(targets) = mirror.begin_resync(slab).await? else {
                progress.done.fetch_add(es, Ordering::Relaxed);
                return Ok::<usize, BlockError>(0);
            };
            tracing::info!(volume = %vol.name(), slab, copies = ?targets, "resync started");
            let mut off = 0;
            while off < es {
                // Small steps, one at a time on the node, with pauses while
                // clients are busy.
                let _slot = crate::activity::busy_slot().await;
                let (step, breather) = crate::activity::repair_step(CHUNK);
                let len = step.min(es - off);
                {
                    let _paused = session.pause(slab * es + off, len).await;
                    let n = mirror.copy_range(slab, off, len, &targets).await?;
                    progress.copied.fetch_add(n, Ordering::Relaxed);
                }
                if !breather.is_zero() {
                    tokio::time::sleep(breather).await;
                }
                // Throttle: hold the copy rate at the node's repair bandwidth.
                if let Some(bps) = bandwidth.filter(|b| *b > 0) {
                    let copied = progress.copied.load(Ordering::Relaxed);
                    let due = std::time::Duration::from_secs_f64(copied as f64 / bps as f64);
                    if let Some(wait) = due.checked_sub(started.elapsed()) {
                        tokio::time::sleep(wait).await;
                    }
                }
                off += len;
                progress.done.fetch_add(len, Ordering::Relaxed);
            }
            mirror.finish_resync(slab, &targets).await?;
            mirror.finish_move(slab).await?;
            tracing::info!(
                volume = %vol.name(),
                slab,
                copied_bytes = progress.copied.load(Ordering::Relaxed),
                "resync finished: copies current"
            );
            Ok(1)
        }
    };
    // Several slabs at once: each chunk is a few round trips between
    // nodes, so one slab at a time leaves the disks and network idle.
    use futures::StreamExt;
    let mut runs = futures::stream::iter(slabs)
        .map(one)
        .buffer_unordered(SLABS_AT_ONCE);
    let mut finished = 0;
    while let Some(r) = runs.next().await {
        finished += r?;
    }
    Ok(finished)
}

/// Keeps one resync per volume running at a time.
#[derive(Default)]
pub struct Running {
    names: std::sync::Mutex<std::collections::HashSet<String>>,
}

impl Running {
    /// Marks `name` running; false if it already was.
    pub fn start(self: &Arc<Self>, name: &str) -> Option<RunningGuard> {
        let mut n = self.names.lock().unwrap_or_else(|p| p.into_inner());
        n.insert(name.to_string()).then(|| RunningGuard {
            running: self.clone(),
            name: name.to_string(),
        })
    }
}

/// Clears the running mark when dropped.
pub struct RunningGuard {
    running: Arc<Running>,
    name: String,
}

impl Drop for RunningGuard {
    fn drop(&mut self) {
        self.running
            .names
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.name);
    }
}
