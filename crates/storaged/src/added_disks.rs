//! Disks added to a running node (`s2dctl pool add-disk`): opened into the
//! store, recorded in the cluster metadata, and remembered in the data
//! directory (`added-disks`, one path per line) so that the next start
//! opens them too, after the `--disk` ones, at the same indices.
//!
//! Invariant: a disk's index on its node (and so its metadata id,
//! `replica::meta_disk_id`) never changes, as long as the `--disk` list
//! stays as it was; new disks are always appended.

use crate::manager::Manager;
use crate::meta_service::MetaHandle;
use anyhow::Context;
use std::path::{Path, PathBuf};

const FILE: &str = "added-disks";

/// The disks added at run time on earlier starts, in the order added.
pub fn load(data_dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let path = data_dir.join(FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) => Ok(text
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(PathBuf::from)
            .collect()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
}

/// The `--disk` list followed by the added disks it does not name already.
pub fn with_added(disks: &[PathBuf], added: Vec<PathBuf>) -> Vec<PathBuf> {
    let mut all = disks.to_vec();
    for a in added {
        if !all.contains(&a) {
            all.push(a);
        }
    }
    all
}

/// Opens `path` into this node's store, remembers it, and records it in the
/// cluster; returns its index on the node.
pub async fn add(manager: &Manager, meta: &MetaHandle, path: &Path) -> anyhow::Result<usize> {
    let path = if path.is_absolute() {
        path.to_path_buf()
    } else {
        anyhow::bail!("disk path {} is not absolute", path.display());
    };
    let index = manager.store().add_disk(&path).await?;
    let mut all = load(manager.data_dir())?;
    all.push(path.clone());
    let text: String = all.iter().map(|p| format!("{}\n", p.display())).collect();
    crate::write_durably(manager.data_dir(), FILE, text.as_bytes())?;
    let capacity = manager
        .store()
        .status()
        .get(index)
        .map_or(0, |d| d.capacity_bytes);
    let this = meta.view().this;
    meta.propose(meta::state::Op::AddDisk(meta::state::AddDisk {
        id: crate::replica::meta_disk_id(this, index),
        node: this,
        capacity_bytes: capacity,
    }))
    .await
    .with_context(|| {
        format!(
            "disk {} is open but not recorded in the cluster yet; the node records it at its next start",
            path.display()
        )
    })?;
    Ok(index)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn added_disks_follow_the_disk_list_once() {
        let a = PathBuf::from("/d/a");
        let b = PathBuf::from("/d/b");
        let c = PathBuf::from("/d/c");
        assert_eq!(
            with_added(&[a.clone(), b.clone()], vec![c.clone(), b.clone()]),
            vec![a, b, c]
        );
    }

    #[test]
    fn the_added_list_survives_a_restart() {
        let dir = tempfile::tempdir_in("/var/tmp").expect("tempdir");
        assert!(load(dir.path()).expect("no file yet").is_empty());
        crate::write_durably(dir.path(), FILE, b"/d/x\n/d/y\n").expect("write");
        assert_eq!(
            load(dir.path()).expect("load"),
            vec![PathBuf::from("/d/x"), PathBuf::from("/d/y")]
        );
    }
}
