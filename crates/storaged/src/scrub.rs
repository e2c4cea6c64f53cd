//! Scrub: a throttled pass over every allocated block of a volume that
//! verifies the data against its stored checksums and, for mirrored
//! volumes, compares the copies; what another copy can repair is repaired
//! (`crate::mirror::scrub`). A simple volume has no other copy: its bad
//! blocks are reported, never silently rewritten.
//!
//! Each node runs the scrubs of the volumes it is responsible for (a simple
//! volume's home node; a mirrored volume's coordinator, see
//! `Manager::runner`): by itself every `--scrub-interval`, or now through
//! `s2dctl pool scrub`. The last result of each volume is kept in memory on
//! the node that ran it and gathered from every node for `pool scrub`.
//!
//! Invariants: a range is scrubbed with client I/O to it paused, so a
//! client write never races the comparison; the pass reads at most
//! `--scrub-bandwidth` bytes per second on average; one scrub per volume
//! at a time.

use crate::mirror::MirrorVolume;
use crate::mirror::scrub::Findings;
use crate::volume::{SlabRef, Volume};
use block_api::{BLOCK_SIZE, BlockError, BlockVolume};
use extent_store::Store;
use s2d_proto::v1::VolumeScrub;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};

/// Bytes scrubbed per step with client I/O to them paused.
pub const STEP: u64 = 1 << 20;

/// How far a volume's scrub is and what it found.
#[derive(Default, Debug)]
pub struct ScrubProgress {
    pub checked: AtomicU64,
    pub total: AtomicU64,
    pub bad: AtomicU64,
    pub mismatched: AtomicU64,
    pub repaired: AtomicU64,
    pub unrepaired: AtomicU64,
    pub started_ms: AtomicU64,
    pub finished_ms: AtomicU64,
    pub running: AtomicBool,
    pub error: Mutex<String>,
}

impl ScrubProgress {
    fn reset(&self, total: u64) {
        for a in [
            &self.checked,
            &self.bad,
            &self.mismatched,
            &self.repaired,
            &self.unrepaired,
            &self.finished_ms,
        ] {
            a.store(0, Relaxed);
        }
        self.total.store(total, Relaxed);
        self.started_ms
            .store(crate::meta_service::unix_ms(), Relaxed);
        self.running.store(true, Relaxed);
        self.set_error(String::new());
    }

    /// Records a scrub that could not run or stopped early.
    pub fn fail(&self, e: String) {
        self.set_error(e);
        if self.finished_ms.load(Relaxed) == 0 {
            self.finished_ms
                .store(crate::meta_service::unix_ms(), Relaxed);
        }
        self.running.store(false, Relaxed);
    }

    fn set_error(&self, e: String) {
        *self.error.lock().unwrap_or_else(|p| p.into_inner()) = e;
    }

    fn add(&self, f: Findings) {
        self.bad.fetch_add(f.bad, Relaxed);
        self.mismatched.fetch_add(f.mismatched, Relaxed);
        self.repaired.fetch_add(f.repaired, Relaxed);
        self.unrepaired.fetch_add(f.unrepaired, Relaxed);
    }

    /// The API's view of it.
    pub fn report(&self, volume: &str, node: &str) -> VolumeScrub {
        let running = self.running.load(Relaxed);
        VolumeScrub {
            volume: volume.to_string(),
            state: if running { "running" } else { "done" }.into(),
            node: node.to_string(),
            checked_bytes: self.checked.load(Relaxed),
            total_bytes: self.total.load(Relaxed),
            bad_blocks: self.bad.load(Relaxed),
            mismatched_blocks: self.mismatched.load(Relaxed),
            repaired_blocks: self.repaired.load(Relaxed),
            unrepaired_blocks: self.unrepaired.load(Relaxed),
            started_ms: self.started_ms.load(Relaxed),
            finished_ms: self.finished_ms.load(Relaxed),
            error: self.error.lock().unwrap_or_else(|p| p.into_inner()).clone(),
        }
    }
}

/// Where the scrub of a volume reads.
pub enum Target<'a> {
    /// A simple volume: its extents on this node's disks.
    Local(&'a Store),
    /// A mirrored volume: its copies, through the coordinator.
    Mirror(&'a MirrorVolume),
}

/// Scrubs every allocated slab of `vol`, recording what it finds in
/// `progress`; `bandwidth` caps the bytes read per second.
pub async fn scrub_volume(
    vol: &Volume,
    target: Target<'_>,
    progress: &ScrubProgress,
    bandwidth: Option<u64>,
) -> Result<(), BlockError> {
    let slabs: Vec<(u64, Option<SlabRef>)> = match &target {
        Target::Local(_) => vol
            .state()
            .slabs
            .iter()
            .enumerate()
            .filter_map(|(i, s)| s.map(|s| (i as u64, Some(s))))
            .collect(),
        Target::Mirror(m) => m
            .view()
            .state
            .volumes
            .get(vol.name())
            .map(|v| v.slabs.keys().map(|k| (*k, None)).collect())
            .unwrap_or_default(),
    };
    let es = match &target {
        Target::Local(s) => s.extent_size(),
        Target::Mirror(m) => m.extent_size(),
    };
    progress.reset(slabs.len() as u64 * es);
    let started = std::time::Instant::now();
    let session = vol.repair_session().await;
    let r = async {
        for (slab, at) in slabs {
            let mut off = 0;
            while off < es {
                let len = STEP.min(es - off);
                let found = {
                    let _paused = session.pause(slab * es + off, len).await;
                    match (&target, at) {
                        (Target::Local(store), Some(SlabRef::Local(addr))) => {
                            scrub_local(store, addr, off, len).await
                        }
                        (Target::Mirror(m), _) => m.scrub_range(slab, off, len).await?,
                        _ => Findings::default(),
                    }
                };
                progress.add(found);
                off += len;
                let checked = progress.checked.fetch_add(len, Relaxed) + len;
                if let Some(bps) = bandwidth.filter(|b| *b > 0) {
                    let due = std::time::Duration::from_secs_f64(checked as f64 / bps as f64);
                    if let Some(wait) = due.checked_sub(started.elapsed()) {
                        tokio::time::sleep(wait).await;
                    }
                }
            }
        }
        Ok::<(), BlockError>(())
    }
    .await;
    if let Err(e) = &r {
        progress.set_error(e.to_string());
    }
    progress
        .finished_ms
        .store(crate::meta_service::unix_ms(), Relaxed);
    progress.running.store(false, Relaxed);
    let p = progress.report(vol.name(), "");
    tracing::info!(
        volume = %vol.name(),
        checked_bytes = p.checked_bytes,
        bad_blocks = p.bad_blocks,
        mismatched_blocks = p.mismatched_blocks,
        repaired_blocks = p.repaired_blocks,
        unrepaired_blocks = p.unrepaired_blocks,
        error = %p.error,
        "scrub finished"
    );
    r
}

/// Reads a range of a local extent back against its checksums; on a
/// failure, block by block to count the bad ones (nothing can repair them).
async fn scrub_local(
    store: &Store,
    addr: extent_store::ExtentAddr,
    off: u64,
    len: u64,
) -> Findings {
    let bs = BLOCK_SIZE as u64;
    if store.read(addr, off, len).await.is_ok() {
        return Findings::default();
    }
    let mut f = Findings::default();
    for k in 0..len / bs {
        if let Err(e) = store.read(addr, off + k * bs, bs).await {
            tracing::error!(error = %e, "scrub: bad block in a simple volume; it has no other copy");
            f.bad += 1;
            f.unrepaired += 1;
        }
    }
    f
}

/// Keeps one scrub per volume running at a time, and the last result of
/// each.
#[derive(Default)]
pub struct Scrubs {
    running: std::sync::Arc<crate::resync::Running>,
    last: Mutex<std::collections::HashMap<String, std::sync::Arc<ScrubProgress>>>,
}

impl Scrubs {
    /// Marks `name` running and gives its progress; `None` when a scrub of
    /// it runs already.
    pub fn begin(
        &self,
        name: &str,
    ) -> Option<(crate::resync::RunningGuard, std::sync::Arc<ScrubProgress>)> {
        let guard = self.running.start(name)?;
        let p = self
            .last
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(name.to_string())
            .or_default()
            .clone();
        p.reset(0);
        Some((guard, p))
    }

    /// The volumes scrubbed here.
    pub fn names(&self) -> Vec<String> {
        self.last
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .cloned()
            .collect()
    }

    /// The last scrub of `name` run here, if any.
    pub fn last(&self, name: &str) -> Option<std::sync::Arc<ScrubProgress>> {
        self.last
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
            .cloned()
    }
}
