//! Raft storage persisted in redb: log entries, hard state, conf state and the
//! latest snapshot. Implements [`raft::Storage`].
//!
//! Layout (one redb file per node):
//! - table `raft_entries`: log index (`u64`) → protobuf-encoded `eraftpb::Entry`;
//! - table `raft_meta`: `"hard_state"`, `"conf_state"`, `"snapshot"` → protobuf bytes.
//!
//! Invariants:
//! - The log holds exactly the indices `first_index()..=last_index()`, with
//!   `first_index() == snapshot index + 1`; the entry at the snapshot index is
//!   represented only by the snapshot's (index, term).
//! - Every mutation ([`RedbStorage::persist`], [`RedbStorage::compact_to`],
//!   [`RedbStorage::set_conf_state`], [`RedbStorage::bootstrap`]) is one redb
//!   write transaction with redb's default durable commit: after it returns,
//!   the change survives a crash, and a crash before leaves the old state whole.
//! - The in-memory copies (hard state, conf state, snapshot, last index) are
//!   updated only after the transaction committed.

use std::path::Path;

use raft::eraftpb::{ConfState, Entry, HardState, Snapshot, SnapshotMetadata};
use raft::{GetEntriesContext, RaftState, StorageError};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use crate::error::{Error, Result};

const ENTRIES: TableDefinition<u64, &[u8]> = TableDefinition::new("raft_entries");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("raft_meta");
const HARD_STATE: &str = "hard_state";
const CONF_STATE: &str = "conf_state";
const SNAPSHOT: &str = "snapshot";

/// Raft log store of one node, backed by a redb file.
pub struct RedbStorage {
    db: Database,
    hard_state: HardState,
    conf_state: ConfState,
    snapshot: Snapshot,
    last_index: u64,
}

fn store_err(e: impl Into<redb::Error>) -> Error {
    Error::Store(e.into())
}

/// Converts one of our errors into the form `raft::Storage` must return.
fn to_raft(e: Error) -> raft::Error {
    raft::Error::Store(StorageError::Other(Box::new(e)))
}

fn encode<M: protobuf::Message>(m: &M, what: &'static str) -> Result<Vec<u8>> {
    m.write_to_bytes().map_err(Error::raft_codec(what))
}

fn decode<M: protobuf::Message>(bytes: &[u8], what: &'static str) -> Result<M> {
    M::parse_from_bytes(bytes).map_err(Error::raft_codec(what))
}

impl RedbStorage {
    /// Opens (creating if needed) the store at `path` and loads its state.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let db = Database::create(path).map_err(store_err)?;
        let txn = db.begin_write().map_err(store_err)?;
        // Create both tables so that read transactions always find them.
        txn.open_table(ENTRIES).map_err(store_err)?;
        txn.open_table(META).map_err(store_err)?;
        txn.commit().map_err(store_err)?;

        let txn = db.begin_read().map_err(store_err)?;
        let meta = txn.open_table(META).map_err(store_err)?;
        let load = |key: &str| -> Result<Option<Vec<u8>>> {
            Ok(meta
                .get(key)
                .map_err(store_err)?
                .map(|v| v.value().to_vec()))
        };
        let hard_state = match load(HARD_STATE)? {
            Some(b) => decode(&b, "hard state")?,
            None => HardState::default(),
        };
        let conf_state = match load(CONF_STATE)? {
            Some(b) => decode(&b, "conf state")?,
            None => ConfState::default(),
        };
        let snapshot: Snapshot = match load(SNAPSHOT)? {
            Some(b) => decode(&b, "snapshot")?,
            None => Snapshot::default(),
        };
        let entries = txn.open_table(ENTRIES).map_err(store_err)?;
        let last_entry = entries.last().map_err(store_err)?.map(|(k, _)| k.value());
        let last_index = last_entry.unwrap_or(0).max(snapshot.get_metadata().index);
        drop(entries);
        drop(meta);
        drop(txn);
        Ok(RedbStorage {
            db,
            hard_state,
            conf_state,
            snapshot,
            last_index,
        })
    }

    /// Whether the store holds a Raft configuration (bootstrapped or received).
    pub fn is_initialised(&self) -> bool {
        !self.conf_state.voters.is_empty() || self.snapshot.get_metadata().index > 0
    }

    /// Makes a fresh store the member of a new cluster with these voters: a
    /// snapshot at index 1, term 1 holding `initial_state` (as raft-rs's
    /// `MemStorage::initialize_with_conf_state` does, so that every node starts
    /// from the same configuration without conf-change entries).
    pub fn bootstrap(&mut self, voters: &[u64], initial_state: Vec<u8>) -> Result<()> {
        let cs = ConfState {
            voters: voters.to_vec(),
            ..Default::default()
        };
        let mut snap = Snapshot {
            data: initial_state.into(),
            ..Default::default()
        };
        let md = snap.mut_metadata();
        md.index = 1;
        md.term = 1;
        md.set_conf_state(cs);
        self.persist(&[], None, Some(&snap))
    }

    /// The latest snapshot's metadata.
    pub fn snapshot_metadata(&self) -> &SnapshotMetadata {
        self.snapshot.get_metadata()
    }

    /// The latest snapshot (metadata and state-machine data).
    pub fn latest_snapshot(&self) -> &Snapshot {
        &self.snapshot
    }

    /// The persisted hard state.
    pub fn hard_state(&self) -> &HardState {
        &self.hard_state
    }

    /// Persists one `Ready` in one transaction: install `snapshot` (dropping
    /// the whole log, as the snapshot supersedes it), append `entries`
    /// (truncating any conflicting suffix first), then store `hard_state`.
    pub fn persist(
        &mut self,
        entries: &[Entry],
        hard_state: Option<&HardState>,
        snapshot: Option<&Snapshot>,
    ) -> Result<()> {
        if entries.is_empty() && hard_state.is_none() && snapshot.is_none() {
            return Ok(());
        }
        let mut new_hs = hard_state
            .cloned()
            .unwrap_or_else(|| self.hard_state.clone());
        let mut new_cs = self.conf_state.clone();
        let mut new_last = self.last_index;
        let txn = self.db.begin_write().map_err(store_err)?;
        {
            let mut table = txn.open_table(ENTRIES).map_err(store_err)?;
            let mut meta = txn.open_table(META).map_err(store_err)?;
            if let Some(snap) = snapshot {
                let md = snap.get_metadata();
                table.retain(|_, _| false).map_err(store_err)?;
                meta.insert(SNAPSHOT, encode(snap, "snapshot")?.as_slice())
                    .map_err(store_err)?;
                new_cs = md.get_conf_state().clone();
                meta.insert(CONF_STATE, encode(&new_cs, "conf state")?.as_slice())
                    .map_err(store_err)?;
                if hard_state.is_none() {
                    new_hs.term = new_hs.term.max(md.term);
                    new_hs.commit = md.index;
                }
                new_last = md.index;
            }
            if let Some(first) = entries.first() {
                let floor = snapshot.map_or(self.snapshot.get_metadata().index, |s| {
                    s.get_metadata().index
                });
                if first.index <= floor {
                    return Err(to_store_invariant(format!(
                        "append at {} would overwrite compacted log up to {floor}",
                        first.index
                    )));
                }
                if first.index > new_last + 1 {
                    return Err(to_store_invariant(format!(
                        "append at {} leaves a gap after {new_last}",
                        first.index
                    )));
                }
                table
                    .retain_in(first.index.., |_, _| false)
                    .map_err(store_err)?;
                for e in entries {
                    table
                        .insert(e.index, encode(e, "entry")?.as_slice())
                        .map_err(store_err)?;
                }
                new_last = entries.last().map_or(new_last, |e| e.index);
            }
            if hard_state.is_some() || snapshot.is_some() {
                meta.insert(HARD_STATE, encode(&new_hs, "hard state")?.as_slice())
                    .map_err(store_err)?;
            }
        }
        txn.commit().map_err(store_err)?;
        if let Some(snap) = snapshot {
            self.snapshot = snap.clone();
        }
        self.hard_state = new_hs;
        self.conf_state = new_cs;
        self.last_index = new_last;
        Ok(())
    }

    /// Persists a new conf state (after a conf change was applied).
    pub fn set_conf_state(&mut self, cs: ConfState) -> Result<()> {
        let txn = self.db.begin_write().map_err(store_err)?;
        {
            let mut meta = txn.open_table(META).map_err(store_err)?;
            meta.insert(CONF_STATE, encode(&cs, "conf state")?.as_slice())
                .map_err(store_err)?;
        }
        txn.commit().map_err(store_err)?;
        self.conf_state = cs;
        Ok(())
    }

    /// Takes a snapshot at `index` (which the caller has applied) holding
    /// `data`, and compacts the log up to and including `index`.
    pub fn compact_to(&mut self, index: u64, data: Vec<u8>) -> Result<()> {
        let current = self.snapshot.get_metadata().index;
        if index <= current {
            return Ok(());
        }
        if index > self.last_index || index > self.hard_state.commit {
            return Err(to_store_invariant(format!(
                "compaction to {index} beyond commit {} / last {}",
                self.hard_state.commit, self.last_index
            )));
        }
        let term = raft::Storage::term(self, index).map_err(Error::Raft)?;
        let mut snap = Snapshot {
            data: data.into(),
            ..Default::default()
        };
        let md = snap.mut_metadata();
        md.index = index;
        md.term = term;
        md.set_conf_state(self.conf_state.clone());
        let txn = self.db.begin_write().map_err(store_err)?;
        {
            let mut table = txn.open_table(ENTRIES).map_err(store_err)?;
            table.retain_in(..=index, |_, _| false).map_err(store_err)?;
            let mut meta = txn.open_table(META).map_err(store_err)?;
            meta.insert(SNAPSHOT, encode(&snap, "snapshot")?.as_slice())
                .map_err(store_err)?;
        }
        txn.commit().map_err(store_err)?;
        self.snapshot = snap;
        Ok(())
    }

    fn first(&self) -> u64 {
        self.snapshot.get_metadata().index + 1
    }

    fn read_entries(&self, low: u64, high: u64) -> Result<Vec<Entry>> {
        let txn = self.db.begin_read().map_err(store_err)?;
        let table = txn.open_table(ENTRIES).map_err(store_err)?;
        let mut out = Vec::with_capacity((high - low) as usize);
        for item in table.range(low..high).map_err(store_err)? {
            let (_, v) = item.map_err(store_err)?;
            out.push(decode::<Entry>(v.value(), "entry")?);
        }
        if out.len() as u64 != high - low {
            return Err(to_store_invariant(format!(
                "log has a hole in {low}..{high}: {} entries found",
                out.len()
            )));
        }
        Ok(out)
    }
}

fn to_store_invariant(msg: String) -> Error {
    Error::Store(redb::Error::Io(std::io::Error::new(
        std::io::ErrorKind::InvalidData,
        msg,
    )))
}

impl raft::Storage for RedbStorage {
    fn initial_state(&self) -> raft::Result<RaftState> {
        Ok(RaftState::new(
            self.hard_state.clone(),
            self.conf_state.clone(),
        ))
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        _context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        if low < self.first() {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if high > self.last_index + 1 || low > high {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        let mut ents = self.read_entries(low, high).map_err(to_raft)?;
        raft::util::limit_size(&mut ents, max_size.into());
        Ok(ents)
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        let md = self.snapshot.get_metadata();
        if idx == md.index {
            return Ok(md.term);
        }
        if idx < self.first() {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if idx > self.last_index {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        let e = self.read_entries(idx, idx + 1).map_err(to_raft)?;
        e.first()
            .map(|e| e.term)
            .ok_or(raft::Error::Store(StorageError::Unavailable))
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(self.first())
    }

    fn last_index(&self) -> raft::Result<u64> {
        Ok(self.last_index)
    }

    fn snapshot(&self, request_index: u64, _to: u64) -> raft::Result<Snapshot> {
        if self.snapshot.get_metadata().index < request_index {
            return Err(raft::Error::Store(
                StorageError::SnapshotTemporarilyUnavailable,
            ));
        }
        Ok(self.snapshot.clone())
    }
}
