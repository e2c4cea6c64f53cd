//! storaged's iSCSI front end: serves every volume of the node's
//! [`Manager`] through the `iscsi-target` crate (target
//! `iqn.2026-01.io.s2d:<volume>`, LUN 0), feeding it from the catalog:
//! - CHAP per volume, looked up at every login, so `s2dctl volume
//!   set-chap` applies to the next login without a restart;
//! - the logical block size per volume (512e or 4 KiB native);
//! - persistent reservations kept in files under the data dir
//!   ([`FileReservationStore`]), so registrations and the reservation
//!   survive a restart of storaged.
//!
//! Reservation files: `DATA_DIR/reservations/vol-<id>.json`, one per
//! volume that ever had reservation state, named by the volume id (ids are
//! never reused, so a file can never be mistaken for a later volume of the
//! same name). Each is replaced crash-safely (temporary file, fsync,
//! rename, fsync of the directory) before the change takes effect, as the
//! `ReservationStore` contract asks. The manager removes a volume's file
//! after deleting the volume and removes files of unknown volumes at start.
//! With the cluster metadata issue this state moves into the metadata
//! store, so it also follows a volume to another node.

use crate::manager::Manager;
use iscsi_target::{
    ChapCredential, ChapSecrets, InitiatorPort, IscsiError, LogicalBlockSize, PrState,
    Registration, Reservation, ReservationStore, ReservationType, TargetConfig,
};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Directory of the reservation files, under the data dir.
pub const RESERVATIONS_DIR: &str = "reservations";
/// Version of the reservation file format.
const PR_FILE_VERSION: u32 = 1;

/// Start serving iSCSI on `listener`: the returned task ends after
/// `shutdown` is cancelled and in-flight commands finished. Fails at once
/// when the reservation directory cannot be created.
pub fn spawn(
    listener: TcpListener,
    manager: Arc<Manager>,
    shutdown: CancellationToken,
) -> Result<JoinHandle<Result<(), IscsiError>>, IscsiError> {
    let config = target_config(&manager)?;
    Ok(tokio::spawn(iscsi_target::serve(
        listener,
        Arc::new(crate::manager::Provider(manager)),
        config,
        shutdown,
    )))
}

/// The target configuration of this node: CHAP and block size from the
/// catalog, reservations in the data dir, default limits.
pub fn target_config(manager: &Arc<Manager>) -> Result<TargetConfig, IscsiError> {
    let chap_manager = manager.clone();
    let block_manager = manager.clone();
    let id_manager = manager.clone();
    let reservations = FileReservationStore::open(manager.data_dir(), move |name: &str| {
        id_manager.record(name).map(|r| r.id)
    })
    .map_err(IscsiError::Reservations)?;
    Ok(TargetConfig {
        chap: Arc::new(move |volume: &str| {
            let chap = chap_manager.record(volume)?.chap?;
            Some(ChapSecrets {
                initiator: ChapCredential::new(chap.initiator.user, chap.initiator.secret),
                target: chap.target.map(|t| ChapCredential::new(t.user, t.secret)),
            })
        }),
        block_size: Arc::new(move |volume: &str| {
            match block_manager.record(volume).map(|r| r.logical_block_size) {
                Some(4096) => LogicalBlockSize::Native4096,
                _ => LogicalBlockSize::Emulated512,
            }
        }),
        reservations: Arc::new(reservations),
        ..TargetConfig::default()
    })
}

fn reservations_dir(data_dir: &Path) -> PathBuf {
    data_dir.join(RESERVATIONS_DIR)
}

fn reservation_file(dir: &Path, volume_id: u64) -> PathBuf {
    dir.join(format!("vol-{volume_id}.json"))
}

/// The volume id a reservation file belongs to, from its name.
fn volume_id_of_file(name: &str) -> Option<u64> {
    name.strip_prefix("vol-")?
        .strip_suffix(".json")?
        .parse()
        .ok()
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

/// Remove the reservation file of a deleted volume. A failure is logged,
/// not returned: the volume is already gone, and the file is removed again
/// at the next start.
pub fn remove_reservations(data_dir: &Path, volume_id: u64) {
    let dir = reservations_dir(data_dir);
    let path = reservation_file(&dir, volume_id);
    match std::fs::remove_file(&path) {
        Ok(()) => {
            if let Err(e) = sync_dir(&dir) {
                tracing::warn!(path = %dir.display(), error = %e, "cannot sync the reservations directory");
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "cannot remove the reservation file of a deleted volume")
        }
    }
}

/// Remove reservation files whose volume is not in `live` (left by a crash
/// between a delete's catalog change and the file's removal).
pub fn prune_reservations(data_dir: &Path, live: &[u64]) {
    let Ok(entries) = std::fs::read_dir(reservations_dir(data_dir)) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(id) = name.to_str().and_then(volume_id_of_file) else {
            continue;
        };
        if !live.contains(&id) {
            tracing::info!(
                volume_id = id,
                "removing the reservation file of a deleted volume"
            );
            remove_reservations(data_dir, id);
        }
    }
}

/// Name-to-id lookup of the volumes the store keeps state for.
type VolumeIdLookup = dyn Fn(&str) -> Option<u64> + Send + Sync;

/// A [`ReservationStore`] keeping each volume's [`PrState`] in a file
/// under `DATA_DIR/reservations` (see the module docs).
pub struct FileReservationStore {
    dir: PathBuf,
    volume_id: Box<VolumeIdLookup>,
}

impl FileReservationStore {
    /// The store under `data_dir`, creating its directory; `volume_id`
    /// names the id of a live volume.
    pub fn open(
        data_dir: &Path,
        volume_id: impl Fn(&str) -> Option<u64> + Send + Sync + 'static,
    ) -> Result<FileReservationStore, String> {
        let dir = reservations_dir(data_dir);
        if !dir.is_dir() {
            std::fs::create_dir_all(&dir)
                .and_then(|()| sync_dir(data_dir))
                .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        }
        Ok(FileReservationStore {
            dir,
            volume_id: Box::new(volume_id),
        })
    }

    fn id(&self, volume: &str) -> Result<u64, String> {
        (self.volume_id)(volume).ok_or_else(|| format!("volume {volume} not found"))
    }
}

#[async_trait::async_trait]
impl ReservationStore for FileReservationStore {
    async fn load(&self, volume: &str) -> Result<PrState, String> {
        let id = self.id(volume)?;
        let path = reservation_file(&self.dir, id);
        tokio::task::spawn_blocking(move || read_state(&path, id))
            .await
            .map_err(|e| format!("reservation load task failed: {e}"))?
    }

    async fn save(&self, volume: &str, state: &PrState) -> Result<(), String> {
        let id = self.id(volume)?;
        let text = serde_json::to_vec_pretty(&PrFile::new(id, state))
            .map_err(|e| format!("cannot encode reservations of {volume}: {e}"))?;
        let dir = self.dir.clone();
        tokio::task::spawn_blocking(move || write_state(&dir, id, &text))
            .await
            .map_err(|e| format!("reservation save task failed: {e}"))?
    }
}

fn read_state(path: &Path, volume_id: u64) -> Result<PrState, String> {
    let text = match std::fs::read(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(PrState::default()),
        Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
    };
    let damaged = |why: String| {
        tracing::error!(path = %path.display(), %why, "reservation file is damaged; the volume's target refuses logins until it is fixed");
        format!("reservation file {} is damaged: {why}", path.display())
    };
    let file: PrFile = serde_json::from_slice(&text).map_err(|e| damaged(e.to_string()))?;
    if file.version != PR_FILE_VERSION {
        return Err(damaged(format!(
            "version {} (this build reads {PR_FILE_VERSION})",
            file.version
        )));
    }
    if file.volume_id != volume_id {
        return Err(damaged(format!(
            "it belongs to volume id {}, not {volume_id}",
            file.volume_id
        )));
    }
    file.into_state().map_err(damaged)
}

fn write_state(dir: &Path, volume_id: u64, text: &[u8]) -> Result<(), String> {
    use std::io::Write;
    let path = reservation_file(dir, volume_id);
    let tmp = path.with_extension("json.tmp");
    let fail = |what: &str, e: std::io::Error| format!("{what} {}: {e}", path.display());
    {
        let mut f = std::fs::File::create(&tmp)
            .map_err(|e| fail("cannot create a temporary file for", e))?;
        f.write_all(text).map_err(|e| fail("cannot write", e))?;
        f.sync_all().map_err(|e| fail("cannot sync", e))?;
    }
    std::fs::rename(&tmp, &path).map_err(|e| fail("cannot rename over", e))?;
    sync_dir(dir).map_err(|e| fail("cannot sync the directory of", e))
}

/// The on-disk form of one volume's [`PrState`], independent of the
/// target crate's types so the format changes only on purpose.
#[derive(Debug, Serialize, Deserialize)]
struct PrFile {
    version: u32,
    volume_id: u64,
    generation: u32,
    registrations: Vec<RegistrationRecord>,
    reservation: Option<ReservationRecord>,
}

#[derive(Debug, Serialize, Deserialize)]
struct PortRecord {
    /// The initiator's iSCSI name.
    name: String,
    /// The session's ISID, 12 hex digits.
    isid: String,
}

#[derive(Debug, Serialize, Deserialize)]
struct RegistrationRecord {
    port: PortRecord,
    key: u64,
    target_port: u16,
    aptpl: bool,
}

#[derive(Debug, Serialize, Deserialize)]
struct ReservationRecord {
    holder: PortRecord,
    /// SPC-4 reservation type code.
    kind: u8,
    key: u64,
}

impl PortRecord {
    fn new(p: &InitiatorPort) -> PortRecord {
        PortRecord {
            name: p.name.clone(),
            isid: p.isid.iter().map(|b| format!("{b:02x}")).collect(),
        }
    }

    fn into_port(self) -> Result<InitiatorPort, String> {
        let bad = || format!("bad ISID {:?}", self.isid);
        if self.isid.len() != 12 || !self.isid.is_ascii() {
            return Err(bad());
        }
        let mut isid = [0u8; 6];
        for (i, b) in isid.iter_mut().enumerate() {
            let hex = self.isid.get(2 * i..2 * i + 2).ok_or_else(bad)?;
            *b = u8::from_str_radix(hex, 16).map_err(|_| bad())?;
        }
        Ok(InitiatorPort {
            name: self.name,
            isid,
        })
    }
}

impl PrFile {
    fn new(volume_id: u64, st: &PrState) -> PrFile {
        PrFile {
            version: PR_FILE_VERSION,
            volume_id,
            generation: st.generation,
            registrations: st
                .registrations
                .iter()
                .map(|r| RegistrationRecord {
                    port: PortRecord::new(&r.port),
                    key: r.key,
                    target_port: r.target_port,
                    aptpl: r.aptpl,
                })
                .collect(),
            reservation: st.reservation.as_ref().map(|r| ReservationRecord {
                holder: PortRecord::new(&r.holder),
                kind: r.kind.code(),
                key: r.key,
            }),
        }
    }

    fn into_state(self) -> Result<PrState, String> {
        let registrations = self
            .registrations
            .into_iter()
            .map(|r| {
                Ok(Registration {
                    port: r.port.into_port()?,
                    key: r.key,
                    target_port: r.target_port,
                    aptpl: r.aptpl,
                })
            })
            .collect::<Result<Vec<_>, String>>()?;
        let reservation = match self.reservation {
            None => None,
            Some(r) => Some(Reservation {
                holder: r.holder.into_port()?,
                kind: ReservationType::from_code(r.kind)
                    .ok_or_else(|| format!("unknown reservation type {}", r.kind))?,
                key: r.key,
            }),
        };
        Ok(PrState {
            generation: self.generation,
            registrations,
            reservation,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn port(name: &str, last: u8) -> InitiatorPort {
        InitiatorPort {
            name: name.into(),
            isid: [0x80, 0x12, 0x34, 0x56, 0, last],
        }
    }

    fn sample() -> PrState {
        let a = port("iqn.2026-01.test:a", 1);
        let b = port("iqn.2026-01.test:b", 2);
        PrState {
            generation: 7,
            registrations: vec![
                Registration {
                    port: a.clone(),
                    key: 0xdead_beef_0000_0001,
                    target_port: 1,
                    aptpl: true,
                },
                Registration {
                    port: b,
                    key: u64::MAX,
                    target_port: 1,
                    aptpl: false,
                },
            ],
            reservation: Some(Reservation {
                holder: a,
                kind: ReservationType::WriteExclusiveRegistrantsOnly,
                key: 0xdead_beef_0000_0001,
            }),
        }
    }

    fn store(dir: &Path) -> FileReservationStore {
        FileReservationStore::open(dir, |name: &str| match name {
            "vol" => Some(3),
            "other" => Some(4),
            _ => None,
        })
        .expect("open store")
    }

    #[tokio::test]
    async fn reservations_survive_a_new_store_on_the_same_data_dir() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = store(dir.path());
        assert_eq!(
            s.load("vol").await,
            Ok(PrState::default()),
            "a volume without a file has no reservations"
        );
        s.save("vol", &sample()).await.expect("save");
        drop(s);
        let s = store(dir.path());
        assert_eq!(
            s.load("vol").await,
            Ok(sample()),
            "the state read back differs from the state saved"
        );
        assert_eq!(
            s.load("other").await,
            Ok(PrState::default()),
            "another volume must not see this volume's reservations"
        );
        let tmp = reservation_file(&reservations_dir(dir.path()), 3).with_extension("json.tmp");
        assert!(!tmp.exists(), "temporary file left behind");
        assert!(
            s.save("gone", &sample()).await.is_err(),
            "saving for a volume that does not exist must fail"
        );
    }

    #[tokio::test]
    async fn deleted_volumes_lose_their_file_and_start_up_prunes_strays() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = store(dir.path());
        s.save("vol", &sample()).await.expect("save vol");
        s.save("other", &sample()).await.expect("save other");
        let rdir = reservations_dir(dir.path());
        remove_reservations(dir.path(), 3);
        assert!(
            !reservation_file(&rdir, 3).exists(),
            "file of deleted volume 3 kept"
        );
        remove_reservations(dir.path(), 3); // a second removal is not an error
        std::fs::write(rdir.join("notes.txt"), b"x").expect("write");
        prune_reservations(dir.path(), &[]);
        assert!(
            !reservation_file(&rdir, 4).exists(),
            "stray file of volume 4 kept"
        );
        assert!(
            rdir.join("notes.txt").exists(),
            "prune removed a file it does not own"
        );
    }

    #[tokio::test]
    async fn a_damaged_or_foreign_file_is_an_error_not_an_empty_state() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = store(dir.path());
        let rdir = reservations_dir(dir.path());
        std::fs::write(reservation_file(&rdir, 3), b"{ not json").expect("write");
        let e = s.load("vol").await.expect_err("damaged file accepted");
        assert!(e.contains("damaged"), "{e}");
        let foreign = serde_json::to_vec(&PrFile::new(9, &sample())).expect("encode");
        std::fs::write(reservation_file(&rdir, 3), foreign).expect("write");
        let e = s
            .load("vol")
            .await
            .expect_err("file of another volume accepted");
        assert!(e.contains("volume id 9"), "{e}");
        let mut bad = PrFile::new(3, &sample());
        bad.registrations[0].port.isid = "80zz".into();
        std::fs::write(
            reservation_file(&rdir, 3),
            serde_json::to_vec(&bad).expect("encode"),
        )
        .expect("write");
        let e = s.load("vol").await.expect_err("bad ISID accepted");
        assert!(e.contains("ISID"), "{e}");
    }

    #[test]
    fn file_names_map_to_volume_ids() {
        assert_eq!(volume_id_of_file("vol-12.json"), Some(12));
        assert_eq!(volume_id_of_file("vol-12.json.tmp"), None);
        assert_eq!(volume_id_of_file("vol-x.json"), None);
        assert_eq!(volume_id_of_file("catalog.json"), None);
    }
}
