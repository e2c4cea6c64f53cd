//! The targets this process serves: one shared [`LogicalUnit`] per volume
//! with at least one session, and the table of live sessions used for
//! session reinstatement (RFC 7143 6.3.5: a login with the ISID of a live
//! session replaces it).
//!
//! Invariants: at most one `LogicalUnit` exists per volume at a time, so
//! every session of a target sees the same reservations and mode pages; a
//! session is in the table from its full-feature login until its connection
//! ends.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

use block_api::{BlockError, VolumeProvider};
use tokio_util::sync::CancellationToken;

use crate::config::TargetConfig;
use crate::reservation::InitiatorPort;
use crate::scsi::lu::LogicalUnit;

type SessionKey = (InitiatorPort, String);

pub struct Registry {
    pub provider: Arc<dyn VolumeProvider>,
    pub config: Arc<TargetConfig>,
    lus: Mutex<HashMap<String, Weak<LogicalUnit>>>,
    sessions: Mutex<HashMap<SessionKey, (u64, CancellationToken)>>,
    next_session: AtomicU64,
}

/// A session's entry in the registry; removes itself when dropped.
pub struct SessionGuard {
    registry: Arc<Registry>,
    key: SessionKey,
    pub id: u64,
    pub cancel: CancellationToken,
}

impl Drop for SessionGuard {
    fn drop(&mut self) {
        let mut g = self
            .registry
            .sessions
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if g.get(&self.key).is_some_and(|(id, _)| *id == self.id) {
            g.remove(&self.key);
        }
    }
}

impl Registry {
    pub fn new(provider: Arc<dyn VolumeProvider>, config: Arc<TargetConfig>) -> Self {
        Registry {
            provider,
            config,
            lus: Mutex::new(HashMap::new()),
            sessions: Mutex::new(HashMap::new()),
            next_session: AtomicU64::new(1),
        }
    }

    /// The logical unit of `volume`, opening the volume on first use.
    pub async fn logical_unit(&self, volume: &str) -> Result<Arc<LogicalUnit>, BlockError> {
        if let Some(lu) = self.lookup(volume) {
            return Ok(lu);
        }
        let vol = self.provider.open(volume).await?;
        let pr = self
            .config
            .reservations
            .load(volume)
            .await
            .map_err(BlockError::Io)?;
        let block = (self.config.block_size)(volume);
        let lu = Arc::new(LogicalUnit::new(
            vol,
            block,
            self.config.max_transfer_bytes,
            self.config.reservations.clone(),
            pr,
        ));
        let mut g = self.lus.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(existing) = g.get(volume).and_then(Weak::upgrade) {
            return Ok(existing);
        }
        g.retain(|_, w| w.strong_count() > 0);
        g.insert(volume.to_string(), Arc::downgrade(&lu));
        Ok(lu)
    }

    fn lookup(&self, volume: &str) -> Option<Arc<LogicalUnit>> {
        let g = self.lus.lock().unwrap_or_else(|e| e.into_inner());
        g.get(volume).and_then(Weak::upgrade)
    }

    /// Enter a new session, cancelling a live one with the same initiator
    /// port and target (reinstatement).
    pub fn register_session(
        self: &Arc<Self>,
        port: InitiatorPort,
        target: String,
        parent: &CancellationToken,
    ) -> SessionGuard {
        let id = self.next_session.fetch_add(1, Ordering::Relaxed);
        let cancel = parent.child_token();
        let key = (port, target);
        let mut g = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, old)) = g.insert(key.clone(), (id, cancel.clone())) {
            tracing::info!(initiator = %key.0.port_name(), target = %key.1, "session reinstated");
            old.cancel();
        }
        SessionGuard {
            registry: self.clone(),
            key,
            id,
            cancel,
        }
    }

    /// A TSIH for a new session (never 0).
    pub fn tsih(&self, id: u64) -> u16 {
        (id % 0xfffe) as u16 + 1
    }
}
