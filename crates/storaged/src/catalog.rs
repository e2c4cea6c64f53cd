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

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use uuid::Uuid;

pub const CATALOG_FILE: &str = "catalog.json";
pub const CATALOG_VERSION: u32 = 1;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeRecord {
    pub id: u64,
    pub name: String,
    pub size: u64,
    pub resiliency: String,
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
            let mut f = std::fs::File::create(&tmp).map_err(|e| io("create temporary file", e))?;
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
        });
        c.save(dir.path()).expect("save");
        c.next_volume_id = 2;
        c.save(dir.path()).expect("save again");
        assert_eq!(Catalog::load(dir.path()).expect("load"), Some(c));
        assert!(
            !dir.path().join("catalog.json.tmp").exists(),
            "temporary file left behind"
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
