//! The volumes this node stores and serves: it starts, resizes and deletes
//! them as the cluster metadata says ([`Manager::sync`]) and hands them to
//! the front ends (it is the [`VolumeProvider`] the NBD and iSCSI servers
//! ask; [`Manager::record`] gives the iSCSI target each volume's block size
//! and CHAP settings at every login). The validation of names, sizes and
//! CHAP settings that every node applies before proposing a change is here
//! too.
//!
//! Crash safety of metadata and extents together:
//! - create: the metadata gains the volume; extents come later, on write.
//! - shrink and delete: the metadata changes first, then this node
//!   releases the extents past the end (or all of them) and the persistent-
//!   reservation file. An extent whose volume is gone, or that lies past
//!   its volume's end, after a crash is released at the next start, once
//!   the node has replayed its own Raft log; so is a reservation file whose
//!   volume is gone.
use crate::catalog::{Catalog, CatalogError, ChapCredentialRecord, ChapRecord, VolumeRecord};
use crate::mirror::{MirrorCluster, MirrorVolume};
use crate::volume::Volume;
use arc_swap::ArcSwap;
use block_api::{
    AlignedBuf, BLOCK_SIZE, BlockError, BlockRun, BlockVolume, VolumeProvider, VolumeSummary,
};
use extent_store::{ExtentAddr, ExtentOwner, Store, StoreError};
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::Weak;
use tokio::sync::Mutex;

/// Longest volume name (it is also an NBD export name and part of an IQN).
pub const VOLUME_NAME_MAX: usize = 64;
/// Largest volume: 1 PiB.
pub const VOLUME_SIZE_MAX: u64 = 1 << 50;
/// CHAP secret length in bytes: RFC 7143 12.1.3 wants at least 96 random
/// bits when the link is not encrypted, and Windows' initiator accepts 12
/// to 16 characters (libiscsi and qemu accept any length).
pub const CHAP_SECRET_MIN: usize = 12;
pub const CHAP_SECRET_MAX: usize = 16;
/// Longest CHAP name (a text value in a login PDU; Windows uses the
/// initiator's IQN, at most 223 bytes).
pub const CHAP_USER_MAX: usize = 223;

#[derive(Debug, thiserror::Error)]
pub enum ManagerError {
    #[error("volume {0} not found")]
    NotFound(String),
    #[error("volume name {0} is already taken")]
    NameTaken(String),
    #[error("bad volume name {name:?}: {why}")]
    BadName { name: String, why: &'static str },
    #[error("bad size {size}: {why}")]
    BadSize { size: u64, why: String },
    #[error("resiliency {resiliency} is not possible {why}")]
    Resiliency { resiliency: String, why: String },
    #[error("unknown resiliency {0:?}: use simple, mirror-2, mirror-3 or parity-K+M")]
    UnknownResiliency(String),
    #[error("pool full: {free} bytes free of {capacity}")]
    PoolFull { free: u64, capacity: u64 },
    #[error(
        "bad block size {0}: use 512 (512-byte logical blocks over 4 KiB physical) or 4096 (4 KiB native)"
    )]
    BadBlockSize(u32),
    #[error("bad CHAP settings: {0}")]
    BadChap(String),
    #[error(transparent)]
    Catalog(#[from] CatalogError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What `volume show` reports.
#[derive(Debug, Clone)]
pub struct VolumeInfo {
    pub record: VolumeRecord,
    pub slabs_allocated: u64,
    pub slabs_total: u64,
    pub allocated_bytes: u64,
}

pub struct Manager {
    data_dir: PathBuf,
    store: Arc<Store>,
    /// The catalog; holding this lock serialises every metadata change.
    catalog: Mutex<Catalog>,
    /// The catalog last saved, for readers that must not wait (the iSCSI
    /// login looks up CHAP and block size here). Replaced after each save.
    published: ArcSwap<Catalog>,
    volumes: std::sync::Mutex<BTreeMap<String, Arc<Volume>>>,
    /// Set once the node's mirror machinery runs (after start-up).
    cluster: std::sync::OnceLock<Arc<MirrorCluster>>,
    /// Mirrored volumes this node coordinates now, by name; an entry whose
    /// handles are all dropped is detached after a grace period.
    mirrors: std::sync::Mutex<HashMap<String, Weak<Attached>>>,
    resyncs: Arc<crate::resync::Running>,
    /// How far the last resync of each mirrored volume run here got; kept
    /// after the volume is let go, for `s2dctl repair status`.
    progress: std::sync::Mutex<HashMap<String, Arc<crate::resync::Progress>>>,
    /// Mirrored volumes whose last handle here was dropped (not crashed):
    /// re-attaching them needs no reconcile.
    released: std::sync::Mutex<std::collections::HashSet<String>>,
    /// When the last repair of a volume failed, to pace retries.
    repair_failed: std::sync::Mutex<HashMap<String, std::time::Instant>>,
    /// The scrubs run here and their last results.
    scrubs: crate::scrub::Scrubs,
    /// Per mirrored volume, the rebalance generation (see
    /// `PoolState::rebalance_generation`) this node finished for it.
    rebalanced: std::sync::Mutex<HashMap<String, u64>>,
    /// When this node started, for the first scrubs by schedule.
    started: std::time::Instant,
    /// One attach at a time, so two clients opening a volume at once do
    /// not both propose the attachment.
    attaching: Mutex<()>,
}

/// How long a failed repair waits before it starts over by itself.
const REPAIR_RETRY_AFTER: std::time::Duration = std::time::Duration::from_secs(2);
/// How long a mirrored volume stays attached after its last client left.
const DETACH_GRACE: std::time::Duration = std::time::Duration::from_secs(1);

pub fn validate_name(name: &str) -> Result<(), ManagerError> {
    let bad = |why| {
        Err(ManagerError::BadName {
            name: name.to_string(),
            why,
        })
    };
    if name.is_empty() || name.len() > VOLUME_NAME_MAX {
        return bad("must be 1 to 64 characters");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
    {
        return bad("use letters, digits, '-', '_' and '.' only");
    }
    if name.starts_with(['-', '.']) {
        return bad("must not start with '-' or '.'");
    }
    Ok(())
}

pub fn validate_size(size: u64) -> Result<(), ManagerError> {
    let why = if size == 0 {
        "a volume needs at least one 4 KiB block".to_string()
    } else if !size.is_multiple_of(BLOCK_SIZE as u64) {
        "must be a multiple of 4 KiB".to_string()
    } else if size > VOLUME_SIZE_MAX {
        "larger than the 1 PiB maximum".to_string()
    } else {
        return Ok(());
    };
    Err(ManagerError::BadSize { size, why })
}

pub fn validate_block_size(b: u32) -> Result<(), ManagerError> {
    match b {
        512 | 4096 => Ok(()),
        b => Err(ManagerError::BadBlockSize(b)),
    }
}

fn validate_chap_credential(which: &str, c: &ChapCredentialRecord) -> Result<(), ManagerError> {
    let bad = |why: String| Err(ManagerError::BadChap(why));
    let printable = |s: &str| s.bytes().all(|b| b.is_ascii_graphic());
    if c.user.is_empty() || c.user.len() > CHAP_USER_MAX {
        return bad(format!(
            "the {which} user must be 1 to {CHAP_USER_MAX} characters"
        ));
    }
    if !printable(&c.user) {
        return bad(format!(
            "the {which} user must be printable ASCII without spaces"
        ));
    }
    let n = c.secret.len();
    if !(CHAP_SECRET_MIN..=CHAP_SECRET_MAX).contains(&n) {
        return bad(format!(
            "the {which} secret is {n} bytes long; it must be {CHAP_SECRET_MIN} to {CHAP_SECRET_MAX} (RFC 7143 wants at least 96 bits, Windows initiators accept at most 16)"
        ));
    }
    if !printable(&c.secret) {
        return bad(format!(
            "the {which} secret must be printable ASCII without spaces"
        ));
    }
    Ok(())
}

pub fn validate_chap(c: &ChapRecord) -> Result<(), ManagerError> {
    validate_chap_credential("initiator", &c.initiator)?;
    if let Some(t) = &c.target {
        validate_chap_credential("target", t)?;
        if t.secret == c.initiator.secret {
            return Err(ManagerError::BadChap(
                "the target secret must differ from the initiator secret (RFC 7143 12.1.3)".into(),
            ));
        }
    }
    Ok(())
}

pub fn validate_resiliency(r: &str) -> Result<(), ManagerError> {
    match r {
        "simple" => Ok(()),
        "mirror-2" | "mirror-3" => Ok(()),
        r if r.starts_with("parity-") => Err(ManagerError::Resiliency {
            resiliency: r.into(),
            why: "yet: parity volumes need the erasure-coded data path, which this version does not have".into(),
        }),
        r => Err(ManagerError::UnknownResiliency(r.into())),
    }
}

impl Manager {
    /// Build the manager from the catalog and the store's extent tables,
    /// releasing extents no volume owns any more.
    /// `extents`: the extents on this node's disks that belong to its
    /// simple volumes (the caller sorts out mirror copies and orphans);
    /// `live`: ids of every volume in the metadata.
    pub async fn open(
        data_dir: PathBuf,
        catalog: Catalog,
        store: Arc<Store>,
        extents: Vec<(ExtentOwner, ExtentAddr)>,
        live: &[u64],
    ) -> Result<Manager, ManagerError> {
        let es = store.extent_size();
        let mut by_volume: HashMap<u64, Vec<(u64, ExtentAddr)>> = HashMap::new();
        let mut orphans = Vec::new();
        for (owner, addr) in extents {
            match catalog.volumes.iter().find(|v| v.id == owner.volume_id) {
                Some(v) if owner.slab < v.size.div_ceil(es) => {
                    by_volume.entry(v.id).or_default().push((owner.slab, addr))
                }
                _ => orphans.push(addr),
            }
        }
        for a in orphans {
            tracing::info!(?a, "releasing an extent left by a deleted or shrunk volume");
            store.release(a).await?;
        }
        crate::iscsi::prune_reservations(&data_dir, live);
        let mut volumes = BTreeMap::new();
        for v in &catalog.volumes {
            let extents = by_volume.remove(&v.id).unwrap_or_default();
            volumes.insert(
                v.name.clone(),
                Volume::start(v.name.clone(), v.id, v.size, store.clone(), extents),
            );
        }
        Ok(Manager {
            data_dir,
            store,
            published: ArcSwap::from_pointee(catalog.clone()),
            catalog: Mutex::new(catalog),
            volumes: std::sync::Mutex::new(volumes),
            cluster: std::sync::OnceLock::new(),
            mirrors: std::sync::Mutex::new(HashMap::new()),
            resyncs: Arc::default(),
            progress: Default::default(),
            released: Default::default(),
            repair_failed: Default::default(),
            scrubs: Default::default(),
            rebalanced: Default::default(),
            started: std::time::Instant::now(),
            attaching: Mutex::new(()),
        })
    }

    /// The node's mirror machinery, once it runs.
    pub fn cluster(&self) -> Option<Arc<MirrorCluster>> {
        self.cluster.get().cloned()
    }

    /// Hands the manager the node's mirror machinery.
    pub fn set_cluster(&self, c: Arc<MirrorCluster>) {
        if self.cluster.set(c).is_err() {
            tracing::error!("mirror machinery set twice; keeping the first");
        }
    }

    /// The handle of `name` if this node serves it now; a handle whose
    /// attachment was taken over is forgotten (its clients get EIO).
    fn attached(&self, name: &str) -> Option<Arc<Attached>> {
        let mut map = self.mirrors.lock().unwrap_or_else(|p| p.into_inner());
        let a = map.get(name).and_then(Weak::upgrade)?;
        let ours = self
            .cluster
            .get()
            .is_some_and(|c| a.mirror.is_ours(&c.meta.view()));
        if ours {
            Some(a)
        } else {
            map.remove(name);
            None
        }
    }

    /// Serves a mirrored volume from this node: records the attachment in
    /// the metadata (taking it over from a holder that is down), then
    /// starts the volume's coordinator here.
    async fn open_mirror(self: &Arc<Self>, name: &str) -> Result<Arc<dyn BlockVolume>, BlockError> {
        Ok(self.attach(name).await?)
    }

    async fn attach(self: &Arc<Self>, name: &str) -> Result<Arc<Attached>, BlockError> {
        if let Some(a) = self.attached(name) {
            return Ok(a);
        }
        let _one = self.attaching.lock().await;
        if let Some(a) = self.attached(name) {
            return Ok(a);
        }
        let c = self
            .cluster
            .get()
            .ok_or_else(|| BlockError::NotFound(name.to_string()))?
            .clone();
        let io = |e: crate::meta_service::MetaError| BlockError::Io(e.to_string());
        let view = c.meta.read().await.map_err(io)?;
        let v = view
            .state
            .volumes
            .get(name)
            .filter(|v| v.home_node == 0)
            .ok_or_else(|| BlockError::NotFound(name.to_string()))?;
        let attach = |takeover| {
            meta::state::Op::AttachVolume(meta::state::AttachVolume {
                volume: name.to_string(),
                node: c.this,
                takeover,
            })
        };
        // An attachment that is still there means the previous holder did
        // not let the volume go (it died, or this node restarted): writes it
        // had in flight may have reached some copies only.
        // The handle of the last client here went away cleanly (its flushes
        // and writes all ended): no writes can be half done.
        let released = self
            .released
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(name);
        let unclean = v
            .attachment
            .as_ref()
            .is_some_and(|a| a.node != c.this || !released);
        match &v.attachment {
            Some(a) if a.node == c.this => {}
            Some(a) => {
                let holder = view.state.nodes.get(&a.node);
                let gone = holder.is_none_or(|h| {
                    h.state == meta::state::NodeState::Down as i32
                        || h.state == meta::state::NodeState::Retired as i32
                });
                if !gone {
                    return Err(BlockError::Io(format!(
                        "volume {name} is served by node {}, which is up; disconnect its clients there first",
                        holder.map_or(String::new(), |h| h.name.clone())
                    )));
                }
                tracing::warn!(
                    volume = name,
                    holder = a.node,
                    "taking over a volume from a node that is down"
                );
                c.meta.propose(attach(true)).await.map_err(io)?;
            }
            None => {
                c.meta.propose(attach(false)).await.map_err(io)?;
            }
        }
        let view = c.meta.view();
        let v = view
            .state
            .volumes
            .get(name)
            .ok_or_else(|| BlockError::NotFound(name.to_string()))?;
        let copies = match meta::state::Resiliency::try_from(v.resiliency) {
            Ok(r) => r.copies(),
            Err(_) => return Err(BlockError::Io(format!("volume {name}: unknown resiliency"))),
        };
        let generation = v
            .attachment
            .as_ref()
            .filter(|a| a.node == c.this)
            .map(|a| a.generation)
            .ok_or_else(|| BlockError::Io(format!("volume {name}: attachment not recorded")))?;
        let mv = Arc::new(MirrorVolume::new(
            c.clone(),
            name.to_string(),
            v.id,
            copies,
            generation,
        ));
        if unclean {
            let fixed = mv.reconcile().await?;
            tracing::info!(
                volume = name,
                blocks = fixed,
                "copies reconciled after an unclean stop of the previous coordinator"
            );
        }
        let vol = Volume::start_mirror(
            name.to_string(),
            v.id,
            v.size_bytes,
            self.store.clone(),
            mv.clone(),
            v.slabs.keys().copied(),
        );
        let progress = self
            .progress
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(name.to_string())
            .or_default()
            .clone();
        let a = Arc::new(Attached {
            vol,
            mirror: mv,
            progress,
            manager: Arc::downgrade(self),
            node: c.this,
        });
        self.mirrors
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name.to_string(), Arc::downgrade(&a));
        tracing::info!(volume = name, "serving a mirrored volume from this node");
        Ok(a)
    }

    /// Starts a resync (after giving the copies of nodes down longer than
    /// `--rebuild-after` new places) of every mirrored volume that needs one
    /// and that this node should run: the volumes it serves, and unattached
    /// ones for which it is the lowest-numbered up node holding a current
    /// copy (it attaches them for the time of the resync).
    pub fn drive_resyncs(self: &Arc<Self>, view: &Arc<crate::meta_service::MetaView>) {
        let Some(c) = self.cluster.get() else { return };
        for v in view.state.volumes.values().filter(|v| v.home_node == 0) {
            let mut slabs = crate::resync::slabs_to_resync(view, &v.name);
            slabs.extend(crate::mirror::slabs_to_rebuild(
                view,
                &v.name,
                c.rebuild_after,
            ));
            slabs.extend(crate::mirror::slabs_to_move(view, &v.name));
            if let Some(slab) = self.rebalance_pending(view, v, c.this) {
                slabs.push(slab);
            }
            let Some(first) = slabs.first().and_then(|n| v.slabs.get(n)) else {
                continue;
            };
            if runner(view, v, Some(first)) != Some(c.this) {
                continue;
            }
            // A repair that just failed (a target not marked down yet)
            // waits a moment before it starts over.
            let failed_lately = self
                .repair_failed
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(&v.name)
                .is_some_and(|t| t.elapsed() < REPAIR_RETRY_AFTER);
            if !failed_lately {
                self.start_repair(&v.name, c.rebuild_after);
            }
        }
    }

    /// The first slab placement wants moved to even out fill, when a
    /// rebalance was asked for that this node has not finished for `v` and
    /// this node runs `v`'s repairs. A rebalance with nothing to move is
    /// finished here and then.
    fn rebalance_pending(
        &self,
        view: &crate::meta_service::MetaView,
        v: &meta::state::Volume,
        this: u64,
    ) -> Option<u64> {
        let generation = view.state.rebalance_generation;
        let done = |m: &Self| {
            m.rebalanced
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(&v.name)
                .copied()
                .unwrap_or(0)
        };
        if generation <= done(self) || runner(view, v, None) != Some(this) {
            return None;
        }
        let first = crate::mirror::rebalance::rebalance_moves(view, &v.name)
            .first()
            .map(|m| m.0);
        if first.is_none() {
            self.finish_rebalance(&v.name, generation);
        }
        first
    }

    fn finish_rebalance(&self, name: &str, generation: u64) {
        let mut r = self.rebalanced.lock().unwrap_or_else(|p| p.into_inner());
        if r.insert(name.to_string(), generation) != Some(generation) {
            tracing::info!(volume = name, generation, "rebalance of the volume done");
        }
    }

    /// Starts the moves of one rebalance pass of a volume this node
    /// serves; with no move left to start, the rebalance is done.
    async fn rebalance_pass(&self, mirror: &crate::mirror::MirrorVolume, name: &str) {
        let view = mirror.view();
        let generation = view.state.rebalance_generation;
        let done = self
            .rebalanced
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
            .copied()
            .unwrap_or(0);
        if generation <= done {
            return;
        }
        use crate::mirror::rebalance::{MOVES_PER_PASS, rebalance_moves};
        let mut started = 0;
        for (slab, from, to) in rebalance_moves(&view, name)
            .into_iter()
            .take(MOVES_PER_PASS)
        {
            match mirror.start_move_to(slab, from, to).await {
                Ok(true) => started += 1,
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(volume = name, slab, error = %e, "rebalance move not started");
                    return;
                }
            }
        }
        if started == 0 {
            self.finish_rebalance(name, generation);
        }
    }

    /// Starts the scrubs this node runs by schedule: each volume it is
    /// responsible for, `--scrub-interval` after its last scrub here (or
    /// after this node started).
    pub fn drive_scrubs(self: &Arc<Self>, view: &Arc<crate::meta_service::MetaView>) {
        let Some(c) = self.cluster.get() else { return };
        let Some(every) = c.scrub_interval else {
            return;
        };
        let now = crate::meta_service::unix_ms();
        for v in view.state.volumes.values() {
            if runner(view, v, None) != Some(c.this) {
                continue;
            }
            let due = match self.scrubs.last(&v.name) {
                Some(p) => {
                    let last = p.started_ms.load(std::sync::atomic::Ordering::Relaxed);
                    now.saturating_sub(last) >= every.as_millis() as u64
                }
                None => self.started.elapsed() >= every,
            };
            if due {
                tracing::info!(volume = %v.name, "scrub due by schedule");
                self.start_scrub(&v.name);
            }
        }
    }

    /// Scrubs volume `name` here, in the background (see `crate::scrub`);
    /// false when one runs already or the volume is unknown.
    pub fn start_scrub(self: &Arc<Self>, name: &str) -> bool {
        let Some(c) = self.cluster.get().cloned() else {
            return false;
        };
        let Some(simple) = c
            .meta
            .view()
            .state
            .volumes
            .get(name)
            .map(|v| v.home_node != 0)
        else {
            return false;
        };
        let Some((guard, progress)) = self.scrubs.begin(name) else {
            return false;
        };
        let m = self.clone();
        let name = name.to_string();
        tokio::spawn(async move {
            let _running = guard;
            use crate::scrub::{Target, scrub_volume};
            let r = if simple {
                match m.volume(&name) {
                    Ok(vol) => {
                        scrub_volume(&vol, Target::Local(&m.store), &progress, c.scrub_bandwidth)
                            .await
                    }
                    Err(e) => Err(BlockError::Io(e.to_string())),
                }
            } else {
                match m.attach(&name).await {
                    Ok(a) => {
                        scrub_volume(
                            &a.vol,
                            Target::Mirror(&a.mirror),
                            &progress,
                            c.scrub_bandwidth,
                        )
                        .await
                    }
                    Err(e) => Err(e),
                }
            };
            if let Err(e) = r {
                tracing::warn!(volume = %name, error = %e, "scrub stopped");
                progress.fail(e.to_string());
            }
        });
        true
    }

    /// The last scrub of `name` run on this node, as the API shows it.
    pub fn scrub_report(&self, name: &str, node: &str) -> Option<s2d_proto::v1::VolumeScrub> {
        self.scrubs.last(name).map(|p| p.report(name, node))
    }

    /// Runs the repair of a mirrored volume here, in the background:
    /// attaches it (unless it is attached here already), rebuilds the
    /// copies of nodes down longer than `rebuild_after`, resyncs stale
    /// copies. False when one is running already.
    pub fn start_repair(self: &Arc<Self>, name: &str, rebuild_after: std::time::Duration) -> bool {
        let Some(c) = self.cluster.get().cloned() else {
            return false;
        };
        let Some(guard) = self.resyncs.start(name) else {
            return false;
        };
        let m = self.clone();
        let name = name.to_string();
        tokio::spawn(async move {
            let _running = guard;
            let a = match m.attach(&name).await {
                Ok(a) => a,
                Err(e) => {
                    tracing::debug!(volume = %name, error = %e, "repair not started");
                    return;
                }
            };
            m.rebalance_pass(&a.mirror, &name).await;
            let view = c.meta.view();
            let r = crate::resync::resync_volume(
                &a.vol,
                &a.mirror,
                &a.progress,
                &view,
                rebuild_after,
                c.repair_bandwidth,
            )
            .await;
            match r {
                Ok(0) => {}
                Ok(n) => tracing::info!(volume = %name, slabs = n, "resync complete"),
                Err(e) => {
                    tracing::warn!(volume = %name, error = %e, "resync stopped; it starts over later");
                    m.repair_failed
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(name.clone(), std::time::Instant::now());
                }
            }
        });
        true
    }

    /// Releases the attachment of `name` if no client has it open.
    async fn detach_if_idle(&self, name: &str, node: u64) {
        tokio::time::sleep(DETACH_GRACE).await;
        // Under the attach lock: a client opening the volume now either
        // finds the attachment still here (and keeps it), or waits until it
        // is released and attaches afresh; never a detach landing after it.
        let _one = self.attaching.lock().await;
        if self.attached(name).is_some() {
            return;
        }
        let Some(c) = self.cluster.get() else { return };
        let op = meta::state::Op::DetachVolume(meta::state::DetachVolume {
            volume: name.to_string(),
            node,
        });
        match c.meta.propose(op).await {
            Ok(_) => tracing::info!(volume = name, "mirrored volume detached"),
            Err(e) => tracing::debug!(volume = name, error = %e, "detach not recorded"),
        }
    }

    /// Applies size changes and deletions to the mirrored volumes this
    /// node coordinates.
    pub async fn sync_mirrors(&self, state: &meta::state::PoolState) {
        let open: Vec<(String, Arc<Attached>)> = self
            .mirrors
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter_map(|(n, w)| w.upgrade().map(|a| (n.clone(), a)))
            .collect();
        for (name, a) in open {
            match state.volumes.get(&name) {
                Some(v) if v.id == a.vol.id() => {
                    if v.size_bytes != a.vol.size()
                        && let Err(e) = a.vol.resize(v.size_bytes).await
                    {
                        tracing::error!(volume = %name, error = %e, "resizing failed");
                    }
                }
                _ => {
                    if let Err(e) = a.vol.delete().await {
                        tracing::debug!(volume = %name, error = %e, "closing a deleted volume");
                    }
                    self.mirrors
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .remove(&name);
                }
            }
        }
    }

    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    pub fn data_dir(&self) -> &std::path::Path {
        &self.data_dir
    }

    /// The catalog record of `name` as last saved, without waiting for a
    /// metadata change in progress.
    pub fn record(&self, name: &str) -> Option<VolumeRecord> {
        self.published.load().find(name).cloned().or_else(|| {
            let c = self.cluster.get()?;
            let view = c.meta.view();
            view.state
                .volumes
                .get(name)
                .filter(|v| v.home_node == 0)
                .map(record_from_meta)
        })
    }

    fn volume(&self, name: &str) -> Result<Arc<Volume>, ManagerError> {
        self.volumes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
            .cloned()
            .ok_or_else(|| ManagerError::NotFound(name.to_string()))
    }

    /// The id of this node's local pool of disks (written in their superblocks).
    pub fn pool_id(&self) -> String {
        self.published.load().pool_id.to_string()
    }

    /// Make this node's volumes what the cluster metadata says they are:
    /// start new ones, resize changed ones, delete (and release the
    /// extents of) those that are gone. Idempotent; one call at a time.
    pub async fn sync(&self, records: Vec<VolumeRecord>) {
        let mut cat = self.catalog.lock().await;
        for old in &cat.volumes {
            if records.iter().any(|r| r.id == old.id) {
                continue;
            }
            let vol = self
                .volumes
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&old.name);
            if let Some(v) = vol
                && let Err(e) = v.delete().await
            {
                // Its extents are released at the next start instead.
                tracing::error!(volume = %old.name, error = %e, "releasing a deleted volume's extents failed");
            }
            crate::iscsi::remove_reservations(&self.data_dir, old.id);
            tracing::info!(volume = %old.name, "volume deleted");
        }
        for r in &records {
            match cat.volumes.iter().find(|o| o.id == r.id) {
                None => {
                    let vol =
                        Volume::start(r.name.clone(), r.id, r.size, self.store.clone(), Vec::new());
                    self.volumes
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(r.name.clone(), vol);
                    tracing::info!(volume = %r.name, size = r.size, "volume created");
                }
                Some(o) if o.size != r.size => {
                    if let Ok(vol) = self.volume(&r.name) {
                        match vol.resize(r.size).await {
                            Ok(()) => {
                                tracing::info!(volume = %r.name, size = r.size, "volume resized")
                            }
                            Err(e) => {
                                tracing::error!(volume = %r.name, error = %e, "resizing failed")
                            }
                        }
                    }
                }
                Some(_) => {}
            }
        }
        let mut next = cat.clone();
        next.volumes = records;
        self.published.store(Arc::new(next.clone()));
        *cat = next;
    }

    /// Local allocation of `name`, if this node serves it.
    pub fn show(&self, name: &str) -> Result<VolumeInfo, ManagerError> {
        let rec = self
            .record(name)
            .ok_or_else(|| ManagerError::NotFound(name.into()))?;
        let st = self.volume(name)?.state();
        let es = self.store.extent_size();
        Ok(VolumeInfo {
            slabs_allocated: st.allocated() as u64,
            slabs_total: st.slabs.len() as u64,
            allocated_bytes: st.allocated() as u64 * es,
            record: rec,
        })
    }

    /// The allocation of every volume this node serves.
    pub async fn allocations(&self) -> Vec<s2d_proto::v1::VolumeAllocation> {
        let names: Vec<String> = self
            .catalog
            .lock()
            .await
            .volumes
            .iter()
            .map(|v| v.name.clone())
            .collect();
        let mut out: Vec<s2d_proto::v1::VolumeAllocation> = names
            .iter()
            .filter_map(|n| self.show(n).ok())
            .map(|i| s2d_proto::v1::VolumeAllocation {
                name: i.record.name,
                slabs_allocated: i.slabs_allocated,
                slabs_total: i.slabs_total,
                allocated_bytes: i.allocated_bytes,
                ..Default::default()
            })
            .collect();
        let progress: Vec<(String, Arc<crate::resync::Progress>)> = self
            .progress
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(n, p)| (n.clone(), p.clone()))
            .collect();
        for (name, p) in progress {
            let (done, total) = p.get();
            if total == 0 {
                continue;
            }
            use std::sync::atomic::Ordering::Relaxed;
            out.push(s2d_proto::v1::VolumeAllocation {
                name,
                resync_done_bytes: done,
                resync_total_bytes: total,
                resync_copied_bytes: p.copied.load(Relaxed),
                resync_started_ms: p.started_ms.load(Relaxed),
                resync_running: p.running.load(Relaxed),
                resync_finished_ms: p.finished_ms.load(Relaxed),
                ..Default::default()
            });
        }
        // The scrubs run here: with the volume's entry when it has one.
        for name in self.scrubs.names() {
            let report = self.scrub_report(&name, "");
            match out.iter_mut().find(|a| a.name == name) {
                Some(a) => a.scrub = report,
                None => out.push(s2d_proto::v1::VolumeAllocation {
                    name,
                    scrub: report,
                    ..Default::default()
                }),
            }
        }
        out
    }
}

/// The node-local record of a volume in the cluster metadata.
/// The node that runs the repairs and scrubs of volume `v`: a simple
/// volume's home node; for a mirrored volume the node serving it, or when
/// none does (or its node is down), the lowest-numbered live node holding
/// a current copy of `slab` (default: the volume's first slab). A draining
/// node is alive: it serves until its copies have moved.
pub fn runner(
    view: &crate::meta_service::MetaView,
    v: &meta::state::Volume,
    slab: Option<&meta::state::Slab>,
) -> Option<u64> {
    use meta::state::{NodeState, ReplicaState};
    if v.home_node != 0 {
        return Some(v.home_node);
    }
    let alive = |node: u64| {
        view.state.nodes.get(&node).is_some_and(|n| {
            n.state == NodeState::Up as i32 || n.state == NodeState::Maintenance as i32
        })
    };
    match &v.attachment {
        Some(a) if alive(a.node) => Some(a.node),
        _ => slab
            .or_else(|| v.slabs.values().next())?
            .replicas
            .iter()
            .filter(|r| r.state == ReplicaState::Current as i32 && alive(r.node))
            .map(|r| r.node)
            .min(),
    }
}

pub fn record_from_meta(v: &meta::state::Volume) -> VolumeRecord {
    let cred = |user: &str, secret: &str| ChapCredentialRecord {
        user: user.into(),
        secret: secret.into(),
    };
    VolumeRecord {
        id: v.id,
        name: v.name.clone(),
        size: v.size_bytes,
        resiliency: resiliency_name(v.resiliency).into(),
        logical_block_size: v.block_size,
        chap: v.chap.as_ref().map(|c| ChapRecord {
            initiator: cred(&c.user, &c.secret),
            target: (!c.target_user.is_empty()).then(|| cred(&c.target_user, &c.target_secret)),
        }),
    }
}

/// The metadata form of CHAP settings.
pub fn chap_to_meta(c: &ChapRecord) -> meta::state::Chap {
    meta::state::Chap {
        user: c.initiator.user.clone(),
        secret: c.initiator.secret.clone(),
        target_user: c.target.as_ref().map_or(String::new(), |t| t.user.clone()),
        target_secret: c
            .target
            .as_ref()
            .map_or(String::new(), |t| t.secret.clone()),
    }
}

/// The CLI name of a metadata resiliency.
pub fn resiliency_name(r: i32) -> &'static str {
    use meta::state::Resiliency;
    match Resiliency::try_from(r) {
        Ok(Resiliency::Simple) => "simple",
        Ok(Resiliency::TwoWayMirror) => "mirror-2",
        Ok(Resiliency::ThreeWayMirror) => "mirror-3",
        Err(_) => "unknown",
    }
}

/// The volumes of `state` that node `node` stores and serves.
pub fn local_records(state: &meta::state::PoolState, node: u64) -> Vec<VolumeRecord> {
    state
        .volumes
        .values()
        .filter(|v| v.home_node == node)
        .map(record_from_meta)
        .collect()
}

/// A client's handle on a mirrored volume this node coordinates; when the
/// last one is dropped, the attachment is released after a grace period.
pub struct Attached {
    vol: Arc<Volume>,
    mirror: Arc<MirrorVolume>,
    progress: Arc<crate::resync::Progress>,
    manager: Weak<Manager>,
    node: u64,
}

impl Drop for Attached {
    fn drop(&mut self) {
        let (Some(m), Ok(rt)) = (
            self.manager.upgrade(),
            tokio::runtime::Handle::try_current(),
        ) else {
            return;
        };
        let name = self.vol.name().to_string();
        m.released
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name.clone());
        let node = self.node;
        rt.spawn(async move { m.detach_if_idle(&name, node).await });
    }
}

#[async_trait::async_trait]
impl BlockVolume for Attached {
    fn name(&self) -> &str {
        self.vol.name()
    }
    fn size(&self) -> u64 {
        self.vol.size()
    }
    async fn read(&self, offset: u64, len: usize) -> Result<AlignedBuf, BlockError> {
        self.vol.read(offset, len).await
    }
    async fn write(&self, offset: u64, data: AlignedBuf, fua: bool) -> Result<(), BlockError> {
        self.vol.write(offset, data, fua).await
    }
    async fn flush(&self) -> Result<(), BlockError> {
        self.vol.flush().await
    }
    async fn trim(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        self.vol.trim(offset, len).await
    }
    async fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        may_unmap: bool,
        fua: bool,
    ) -> Result<(), BlockError> {
        self.vol.write_zeroes(offset, len, may_unmap, fua).await
    }
    async fn block_status(&self, offset: u64, len: u64) -> Result<Vec<BlockRun>, BlockError> {
        self.vol.block_status(offset, len).await
    }
}

/// The front ends' way to the volumes: this node's simple volumes, and
/// every mirrored volume (served from here once a client opens it).
pub struct Provider(pub Arc<Manager>);

#[async_trait::async_trait]
impl VolumeProvider for Provider {
    async fn list(&self) -> Vec<VolumeSummary> {
        let m = &self.0;
        let vols = m.volumes.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let mut out: Vec<VolumeSummary> = vols
            .values()
            .map(|v| VolumeSummary {
                name: v.name().to_string(),
                size: v.size(),
            })
            .collect();
        if let Some(c) = m.cluster.get() {
            out.extend(
                c.meta
                    .view()
                    .state
                    .volumes
                    .values()
                    .filter(|v| v.home_node == 0)
                    .map(|v| VolumeSummary {
                        name: v.name.clone(),
                        size: v.size_bytes,
                    }),
            );
        }
        out
    }

    async fn open(&self, name: &str) -> Result<Arc<dyn BlockVolume>, BlockError> {
        match self.0.volume(name) {
            Ok(v) => Ok(v),
            Err(_) => self.0.open_mirror(name).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_sizes_and_resiliencies_are_validated() {
        assert!(validate_name("vm-disk_1.raw").is_ok());
        for bad in ["", "-x", ".x", "a/b", "a b", &"x".repeat(65)] {
            assert!(validate_name(bad).is_err(), "{bad:?} accepted");
        }
        assert!(validate_size(4096).is_ok());
        for bad in [0, 1000, VOLUME_SIZE_MAX + 4096] {
            assert!(validate_size(bad).is_err(), "{bad} accepted");
        }
        assert!(validate_resiliency("simple").is_ok());
        assert!(validate_resiliency("mirror-3").is_ok());
        assert!(matches!(
            validate_resiliency("parity-2+1"),
            Err(ManagerError::Resiliency { .. })
        ));
        assert!(matches!(
            validate_resiliency("raid5"),
            Err(ManagerError::UnknownResiliency(_))
        ));
        assert!(validate_block_size(512).is_ok() && validate_block_size(4096).is_ok());
        for bad in [0, 1024, 520, 8192] {
            assert!(
                matches!(validate_block_size(bad), Err(ManagerError::BadBlockSize(_))),
                "block size {bad} accepted"
            );
        }
    }

    fn cred(user: &str, secret: &str) -> ChapCredentialRecord {
        ChapCredentialRecord {
            user: user.into(),
            secret: secret.into(),
        }
    }

    #[test]
    fn chap_settings_are_validated_with_a_reason() {
        let ok = ChapRecord {
            initiator: cred("iqn.1991-05.com.microsoft:host1", "twelve-chars"),
            target: Some(cred("s2d", "sixteen-chars-ok")),
        };
        assert!(validate_chap(&ok).is_ok(), "a valid mutual setting refused");
        let cases = [
            (cred("alice", "short"), None, "12 to 16"),
            (cred("alice", "seventeen-chars-x"), None, "12 to 16"),
            (cred("", "alice-secret-1"), None, "user must be"),
            (cred("al ice", "alice-secret-1"), None, "printable"),
            (cred("alice", "alice secret 1"), None, "printable"),
            (
                cred("alice", "alice-secret-1"),
                Some(cred("s2d", "alice-secret-1")),
                "must differ",
            ),
            (
                cred("alice", "alice-secret-1"),
                Some(cred("s2d", "tiny")),
                "target secret",
            ),
        ];
        for (initiator, target, want) in cases {
            let c = ChapRecord { initiator, target };
            match validate_chap(&c) {
                Err(ManagerError::BadChap(why)) => {
                    assert!(why.contains(want), "{c:?}: reason {why:?} lacks {want:?}")
                }
                other => panic!("{c:?} should be refused ({want}), got {other:?}"),
            }
        }
    }
}
