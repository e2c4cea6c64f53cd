//! The node's catalog: pool identity and the list of volumes, in
//! `DATA_DIR/catalog.json`.
//!
//! Which extents hold which volume is not here: that is recorded on the
//! disks themselves (the extent tables). The catalog only names volumes.
//!
//! Invariant: the file on disk is always a complete catalog, old or new.
//! Every change is written to a temporary file, synced, renamed over the
//! old one, and the directory is synced (crash-safe replace).
//! Volume ids are never reused (`next_volume_id` only grows), so extents
//! of a deleted volume can never be mistaken for a new volume's.
//! The file holds iSCSI CHAP secrets, so it is readable by its owner only
//! (mode 0600). Fields added after version 1 carry `#[serde(default)]`, so
//! catalogs written before them still load.

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use uuid::Uuid;

pub const CATALOG_FILE: &str = "catalog.json";
pub const CATALOG_VERSION: u32 = 1;

/// Logical block size of a volume created before the setting existed.
pub const DEFAULT_LOGICAL_BLOCK_SIZE: u32 = 512;

fn default_logical_block_size() -> u32 {
    DEFAULT_LOGICAL_BLOCK_SIZE
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeRecord {
    pub id: u64,
    pub name: String,
    pub size: u64,
    pub resiliency: String,
    /// Logical block size the iSCSI target reports: 512 (512e over 4 KiB
    /// physical) or 4096 (native). Fixed at creation.
    #[serde(default = "default_logical_block_size")]
    pub logical_block_size: u32,
    /// iSCSI CHAP credentials; `None`: logins need no authentication.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chap: Option<ChapRecord>,
}

/// One CHAP name and secret.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChapCredentialRecord {
    pub user: String,
    pub secret: String,
}

impl std::fmt::Debug for ChapCredentialRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "ChapCredentialRecord {{ user: {:?}, secret: <{} bytes> }}",
            self.user,
            self.secret.len()
        )
    }
}

/// The CHAP settings of a volume's iSCSI target.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChapRecord {
    /// What the initiator must present.
    pub initiator: ChapCredentialRecord,
    /// Mutual CHAP: how the target answers the initiator's challenge.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<ChapCredentialRecord>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Catalog {
    pub version: u32,
    pub pool_id: Uuid,
    pub node_id: Uuid,
    pub extent_size: u64,
    pub next_volume_id: u64,
    pub volumes: Vec<VolumeRecord>,
}

#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error("catalog {}: {what}: {source}", path.display())]
    Io {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("catalog {} is damaged: {reason}", path.display())]
    Damaged { path: PathBuf, reason: String },
}

impl Catalog {
    pub fn new(extent_size: u64) -> Catalog {
        Catalog {
            version: CATALOG_VERSION,
            pool_id: Uuid::new_v4(),
            node_id: Uuid::new_v4(),
            extent_size,
            next_volume_id: 1,
            volumes: Vec::new(),
        }
    }

    /// Load the catalog of `dir`, or `None` when the directory has none yet.
    pub fn load(dir: &Path) -> Result<Option<Catalog>, CatalogError> {
        let path = dir.join(CATALOG_FILE);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => {
                return Err(CatalogError::Io {
                    path,
                    what: "read",
                    source: e,
                });
            }
        };
        let c: Catalog = serde_json::from_str(&text).map_err(|e| CatalogError::Damaged {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        if c.version != CATALOG_VERSION {
            return Err(CatalogError::Damaged {
                path,
                reason: format!("version {} (this build reads {CATALOG_VERSION})", c.version),
            });
        }
        Ok(Some(c))
    }

    /// Replace the catalog of `dir` with `self`, crash-safely.
    pub fn save(&self, dir: &Path) -> Result<(), CatalogError> {
        let path = dir.join(CATALOG_FILE);
        let tmp = dir.join(format!("{CATALOG_FILE}.tmp"));
        let io = |what, source| CatalogError::Io {
            path: path.clone(),
            what,
            source,
        };
        let text =
            serde_json::to_vec_pretty(self).map_err(|e| io("encode", std::io::Error::other(e)))?;
        {
            use std::io::Write;
            use std::os::unix::fs::OpenOptionsExt;
            // Owner only: the catalog holds CHAP secrets.
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)
                .map_err(|e| io("create temporary file", e))?;
            f.write_all(&text).map_err(|e| io("write", e))?;
            f.sync_all().map_err(|e| io("sync", e))?;
        }
        std::fs::rename(&tmp, &path).map_err(|e| io("rename", e))?;
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| io("sync directory", e))?;
        Ok(())
    }

    pub fn find(&self, name: &str) -> Option<&VolumeRecord> {
        self.volumes.iter().find(|v| v.name == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn catalog_round_trips_and_replaces_atomically() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert_eq!(Catalog::load(dir.path()).expect("load empty"), None);
        let mut c = Catalog::new(4 << 20);
        c.volumes.push(VolumeRecord {
            id: 1,
            name: "a".into(),
            size: 1 << 30,
            resiliency: "simple".into(),
            logical_block_size: 4096,
            chap: Some(ChapRecord {
                initiator: ChapCredentialRecord {
                    user: "alice".into(),
                    secret: "alice-secret-1".into(),
                },
                target: None,
            }),
        });
        c.save(dir.path()).expect("save");
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join(CATALOG_FILE))
            .expect("stat catalog")
            .permissions()
            .mode();
        assert_eq!(
            mode & 0o077,
            0,
            "the catalog holds CHAP secrets but is readable by others (mode {mode:o})"
        );
        c.next_volume_id = 2;
        c.save(dir.path()).expect("save again");
        assert_eq!(Catalog::load(dir.path()).expect("load"), Some(c));
        assert!(
            !dir.path().join("catalog.json.tmp").exists(),
            "temporary file left behind"
        );
    }

    #[test]
    fn a_catalog_written_before_block_size_and_chap_still_loads() {
        let dir = tempfile::tempdir().expect("tempdir");
        let old = r#"{"version":1,"pool_id":"6f1b8a3e-6a55-4f43-9b8e-0c1d2e3f4a5b",
            "node_id":"0a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d","extent_size":4194304,
            "next_volume_id":2,"volumes":[{"id":1,"name":"old","size":1048576,
            "resiliency":"simple"}]}"#;
        std::fs::write(dir.path().join(CATALOG_FILE), old).expect("write");
        let c = Catalog::load(dir.path())
            .expect("an old catalog must load")
            .expect("catalog present");
        let v = c.find("old").expect("volume kept");
        assert_eq!(
            v.logical_block_size, DEFAULT_LOGICAL_BLOCK_SIZE,
            "an old volume must keep being served with 512-byte blocks"
        );
        assert_eq!(v.chap, None, "an old volume has no CHAP");
    }

    #[test]
    fn secrets_never_show_in_debug_output() {
        let r = ChapCredentialRecord {
            user: "alice".into(),
            secret: "alice-secret-1".into(),
        };
        let d = format!("{r:?}");
        assert!(
            !d.contains("alice-secret-1"),
            "Debug output leaks the secret: {d}"
        );
    }

    #[test]
    fn a_damaged_catalog_is_an_error_not_an_empty_pool() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join(CATALOG_FILE), b"{ not json").expect("write");
        let e = Catalog::load(dir.path()).unwrap_err();
        assert!(e.to_string().contains("damaged"), "{e}");
    }
}
