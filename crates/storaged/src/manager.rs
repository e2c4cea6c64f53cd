//! The node's volumes: create, list, resize, delete, set CHAP, and hand
//! them to the front ends (it is the [`VolumeProvider`] the NBD and iSCSI
//! servers ask; [`Manager::record`] gives the iSCSI target each volume's
//! block size and CHAP settings at every login).
//!
//! Crash safety of the catalog and extents together:
//! - create: the catalog gains the volume; extents come later, on write.
//! - shrink: the catalog shrinks first, then extents past the end are
//!   released; delete: the catalog loses the volume first, then its extents
//!   and its persistent-reservation file are released. An extent whose
//!   volume is gone or that lies past its volume's end after a crash is
//!   released at the next start, and so is a reservation file whose volume
//!   is gone.

use crate::catalog::{
    Catalog, CatalogError, ChapCredentialRecord, ChapRecord, DEFAULT_LOGICAL_BLOCK_SIZE,
    VolumeRecord,
};
use crate::volume::Volume;
use arc_swap::ArcSwap;
use block_api::{BLOCK_SIZE, BlockError, BlockVolume, VolumeProvider, VolumeSummary};
use extent_store::{ExtentAddr, Store, StoreError};
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
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
    #[error(
        "resiliency {0} is not possible here: this node stores simple volumes only (mirrors and parity need a cluster)"
    )]
    Resiliency(String),
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

/// Settings of a new volume beyond its name, size and resiliency.
#[derive(Debug, Clone)]
pub struct VolumeOptions {
    /// Logical block size the iSCSI target reports: 512 or 4096.
    pub logical_block_size: u32,
    pub chap: Option<ChapRecord>,
}

impl Default for VolumeOptions {
    fn default() -> Self {
        VolumeOptions {
            logical_block_size: DEFAULT_LOGICAL_BLOCK_SIZE,
            chap: None,
        }
    }
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
}

fn validate_name(name: &str) -> Result<(), ManagerError> {
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

fn validate_size(size: u64) -> Result<(), ManagerError> {
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

fn validate_block_size(b: u32) -> Result<(), ManagerError> {
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

fn validate_chap(c: &ChapRecord) -> Result<(), ManagerError> {
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

fn validate_resiliency(r: &str) -> Result<(), ManagerError> {
    match r {
        "simple" => Ok(()),
        "mirror-2" | "mirror-3" => Err(ManagerError::Resiliency(r.into())),
        r if r.starts_with("parity-") => Err(ManagerError::Resiliency(r.into())),
        r => Err(ManagerError::UnknownResiliency(r.into())),
    }
}

impl Manager {
    /// Build the manager from the catalog and the store's extent tables,
    /// releasing extents no volume owns any more.
    pub async fn open(
        data_dir: PathBuf,
        catalog: Catalog,
        store: Arc<Store>,
    ) -> Result<Manager, ManagerError> {
        let es = store.extent_size();
        let mut by_volume: HashMap<u64, Vec<(u64, ExtentAddr)>> = HashMap::new();
        let mut orphans = Vec::new();
        for (owner, addr) in store.owned_extents() {
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
        let live: Vec<u64> = catalog.volumes.iter().map(|v| v.id).collect();
        crate::iscsi::prune_reservations(&data_dir, &live);
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
        })
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
        self.published.load().find(name).cloned()
    }

    /// Save `next` crash-safely, then make it the catalog in effect.
    fn commit(&self, cat: &mut Catalog, next: Catalog) -> Result<(), ManagerError> {
        next.save(&self.data_dir)?;
        self.published.store(Arc::new(next.clone()));
        *cat = next;
        Ok(())
    }

    fn volume(&self, name: &str) -> Result<Arc<Volume>, ManagerError> {
        self.volumes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
            .cloned()
            .ok_or_else(|| ManagerError::NotFound(name.to_string()))
    }

    fn free_bytes(&self) -> (u64, u64) {
        let es = self.store.extent_size();
        self.store.status().iter().fold((0, 0), |(f, c), d| {
            (f + d.extents_free * es, c + d.capacity_bytes)
        })
    }

    pub async fn create(
        &self,
        name: &str,
        size: u64,
        resiliency: &str,
        options: VolumeOptions,
    ) -> Result<VolumeInfo, ManagerError> {
        validate_name(name)?;
        validate_size(size)?;
        validate_resiliency(resiliency)?;
        validate_block_size(options.logical_block_size)?;
        if let Some(c) = &options.chap {
            validate_chap(c)?;
        }
        let mut cat = self.catalog.lock().await;
        if cat.find(name).is_some() {
            return Err(ManagerError::NameTaken(name.into()));
        }
        let (free, capacity) = self.free_bytes();
        if free == 0 {
            return Err(ManagerError::PoolFull { free, capacity });
        }
        let mut next = cat.clone();
        let rec = VolumeRecord {
            id: next.next_volume_id,
            name: name.into(),
            size,
            resiliency: resiliency.into(),
            logical_block_size: options.logical_block_size,
            chap: options.chap,
        };
        next.next_volume_id += 1;
        next.volumes.push(rec.clone());
        self.commit(&mut cat, next)?;
        let vol = Volume::start(
            rec.name.clone(),
            rec.id,
            size,
            self.store.clone(),
            Vec::new(),
        );
        self.volumes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name.into(), vol);
        drop(cat);
        self.show(name).await
    }

    pub async fn list(&self) -> Vec<VolumeInfo> {
        let names: Vec<String> = self
            .catalog
            .lock()
            .await
            .volumes
            .iter()
            .map(|v| v.name.clone())
            .collect();
        let mut out = Vec::new();
        for n in names {
            if let Ok(i) = self.show(&n).await {
                out.push(i);
            }
        }
        out.sort_by(|a, b| a.record.name.cmp(&b.record.name));
        out
    }

    pub async fn show(&self, name: &str) -> Result<VolumeInfo, ManagerError> {
        let rec = self
            .catalog
            .lock()
            .await
            .find(name)
            .cloned()
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

    pub async fn resize(&self, name: &str, size: u64) -> Result<VolumeInfo, ManagerError> {
        validate_size(size)?;
        let mut cat = self.catalog.lock().await;
        let vol = self.volume(name)?;
        let mut next = cat.clone();
        let Some(rec) = next.volumes.iter_mut().find(|v| v.name == name) else {
            return Err(ManagerError::NotFound(name.into()));
        };
        if size > rec.size {
            let (free, capacity) = self.free_bytes();
            if free == 0 {
                return Err(ManagerError::PoolFull { free, capacity });
            }
        }
        rec.size = size;
        self.commit(&mut cat, next)?;
        vol.resize(size).await?;
        drop(cat);
        self.show(name).await
    }

    /// Replace the CHAP settings of `name` (`None`: no CHAP); the iSCSI
    /// target applies them at the next login.
    pub async fn set_chap(
        &self,
        name: &str,
        chap: Option<ChapRecord>,
    ) -> Result<VolumeInfo, ManagerError> {
        if let Some(c) = &chap {
            validate_chap(c)?;
        }
        let mut cat = self.catalog.lock().await;
        let mut next = cat.clone();
        let Some(rec) = next.volumes.iter_mut().find(|v| v.name == name) else {
            return Err(ManagerError::NotFound(name.into()));
        };
        rec.chap = chap;
        self.commit(&mut cat, next)?;
        drop(cat);
        self.show(name).await
    }

    pub async fn delete(&self, name: &str) -> Result<(), ManagerError> {
        let mut cat = self.catalog.lock().await;
        let vol = self.volume(name)?;
        let id = cat
            .find(name)
            .map(|r| r.id)
            .ok_or_else(|| ManagerError::NotFound(name.into()))?;
        let mut next = cat.clone();
        next.volumes.retain(|v| v.name != name);
        self.commit(&mut cat, next)?;
        self.volumes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(name);
        vol.delete().await?;
        crate::iscsi::remove_reservations(&self.data_dir, id);
        Ok(())
    }

    pub async fn catalog(&self) -> Catalog {
        self.catalog.lock().await.clone()
    }
}

#[async_trait::async_trait]
impl VolumeProvider for Manager {
    async fn list(&self) -> Vec<VolumeSummary> {
        let vols = self
            .volumes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        vols.values()
            .map(|v| VolumeSummary {
                name: v.name().to_string(),
                size: v.size(),
            })
            .collect()
    }

    async fn open(&self, name: &str) -> Result<Arc<dyn BlockVolume>, BlockError> {
        match self.volume(name) {
            Ok(v) => Ok(v),
            Err(_) => Err(BlockError::NotFound(name.to_string())),
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
        assert!(matches!(
            validate_resiliency("mirror-3"),
            Err(ManagerError::Resiliency(_))
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
