//! A logical unit: one volume as SCSI sees it, shared by every session
//! logged in to its target. Holds the state SCSI keeps per LU: RESERVE(6)
//! holder, mode page settings, the persistent reservation cache and the
//! locks that serialise PR changes and COMPARE AND WRITE.
//!
//! Invariants: the PR cache equals what the [`ReservationStore`] last saved
//! (it is replaced only after a successful save, under `pr_write`); the
//! identifiers (NAA, serial) depend only on the volume name, so they are
//! stable across restarts and nodes.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, RwLock};

use block_api::BlockVolume;

use super::sense::Sense;
use crate::config::{LogicalBlockSize, target_iqn};
use crate::reservation::{InitiatorPort, PrState, ReservationStore};

/// Most unit attention conditions queued per I_T nexus.
const UA_QUEUE_MAX: usize = 4;

/// Changeable mode page settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModeState {
    /// Caching page WCE: when clear, every write is sent with FUA.
    pub wce: bool,
    /// Control page D_SENSE: descriptor-format sense data.
    pub d_sense: bool,
    /// Control page SWP: software write protect.
    pub swp: bool,
}

impl Default for ModeState {
    fn default() -> Self {
        ModeState {
            wce: true,
            d_sense: false,
            swp: false,
        }
    }
}

#[derive(Debug, Default)]
struct LuState {
    reserve6: Option<InitiatorPort>,
    mode: ModeState,
    /// Logged-in I_T nexuses and their session counts.
    nexuses: HashMap<InitiatorPort, usize>,
    /// Pending unit attention conditions per nexus.
    ua: HashMap<InitiatorPort, VecDeque<Sense>>,
}

pub struct LogicalUnit {
    pub volume: Arc<dyn BlockVolume>,
    pub name: String,
    pub block: LogicalBlockSize,
    pub max_transfer_bytes: u32,
    /// NAA locally assigned identifier (type 3) derived from the name.
    pub naa: u64,
    state: Mutex<LuState>,
    pr: RwLock<PrState>,
    /// Serialises PERSISTENT RESERVE OUT (load-modify-save).
    pub pr_write: tokio::sync::Mutex<()>,
    /// Serialises COMPARE AND WRITE so the compare and the write are atomic
    /// with respect to each other.
    pub caw: tokio::sync::Mutex<()>,
    pub store: Arc<dyn ReservationStore>,
}

/// FNV-1a, 64 bits: a stable hash (unlike `DefaultHasher`) for identifiers.
fn fnv1a(data: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in data {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

impl LogicalUnit {
    pub fn new(
        volume: Arc<dyn BlockVolume>,
        block: LogicalBlockSize,
        max_transfer_bytes: u32,
        store: Arc<dyn ReservationStore>,
        pr: PrState,
    ) -> Self {
        let name = volume.name().to_string();
        let naa = 0x3 << 60 | (fnv1a(name.as_bytes()) & 0x0fff_ffff_ffff_ffff);
        LogicalUnit {
            volume,
            name,
            block,
            max_transfer_bytes,
            naa,
            state: Mutex::new(LuState::default()),
            pr: RwLock::new(pr),
            pr_write: tokio::sync::Mutex::new(()),
            caw: tokio::sync::Mutex::new(()),
            store,
        }
    }

    pub fn block_size(&self) -> u32 {
        self.block.bytes()
    }

    /// Number of logical blocks now.
    pub fn blocks(&self) -> u64 {
        self.volume.size() / u64::from(self.block_size())
    }

    pub fn iqn(&self) -> String {
        target_iqn(&self.name)
    }

    /// Unit serial number (VPD 0x80): the NAA identifier in hex.
    pub fn serial(&self) -> String {
        format!("{:016x}", self.naa)
    }

    fn with_state<R>(&self, f: impl FnOnce(&mut LuState) -> R) -> R {
        // A poisoned lock only means a panic elsewhere mid-update of plain
        // flags; the flags themselves are always valid.
        let mut g = self.state.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut g)
    }

    pub fn mode(&self) -> ModeState {
        self.with_state(|s| s.mode)
    }

    pub fn set_mode(&self, m: ModeState) {
        self.with_state(|s| s.mode = m)
    }

    pub fn reserve6_holder(&self) -> Option<InitiatorPort> {
        self.with_state(|s| s.reserve6.clone())
    }

    /// RESERVE(6): Ok when free or already ours.
    pub fn reserve6(&self, port: &InitiatorPort) -> bool {
        self.with_state(|s| match &s.reserve6 {
            Some(h) if h != port => false,
            _ => {
                s.reserve6 = Some(port.clone());
                true
            }
        })
    }

    /// RELEASE(6): releases only our own reservation.
    pub fn release6(&self, port: &InitiatorPort) {
        self.with_state(|s| {
            if s.reserve6.as_ref() == Some(port) {
                s.reserve6 = None;
            }
        })
    }

    /// A session of `port` reached full feature phase.
    pub fn nexus_joined(&self, port: &InitiatorPort) {
        self.with_state(|s| *s.nexuses.entry(port.clone()).or_default() += 1)
    }

    /// A session of `port` ended (logout, connection loss): with the last
    /// one the I_T nexus is gone, and its RESERVE(6) and unit attentions
    /// with it.
    pub fn nexus_lost(&self, port: &InitiatorPort) {
        let gone = self.with_state(|s| {
            let n = s.nexuses.entry(port.clone()).or_default();
            *n = n.saturating_sub(1);
            if *n == 0 {
                s.nexuses.remove(port);
                s.ua.remove(port);
                true
            } else {
                false
            }
        });
        if gone {
            self.release6(port);
        }
    }

    /// LUN reset / target reset: SPC-2 reservations and mode settings go
    /// back to their defaults (persistent reservations stay) and every
    /// logged-in nexus gets a unit attention.
    pub fn reset(&self) {
        self.with_state(|s| {
            s.reserve6 = None;
            s.mode = ModeState::default();
            let ua = Sense::reset_occurred();
            let ports: Vec<InitiatorPort> = s.nexuses.keys().cloned().collect();
            for p in ports {
                let q = s.ua.entry(p).or_default();
                if q.len() < UA_QUEUE_MAX && !q.contains(&ua) {
                    q.push_back(ua);
                }
            }
        })
    }

    /// Take the oldest unit attention pending for `port`.
    pub fn take_unit_attention(&self, port: &InitiatorPort) -> Option<Sense> {
        self.with_state(|s| {
            let q = s.ua.get_mut(port)?;
            let ua = q.pop_front();
            if q.is_empty() {
                s.ua.remove(port);
            }
            ua
        })
    }

    pub fn pr(&self) -> PrState {
        self.pr.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn with_pr<R>(&self, f: impl FnOnce(&PrState) -> R) -> R {
        f(&self.pr.read().unwrap_or_else(|e| e.into_inner()))
    }

    /// Install a state the store has saved. Call only under `pr_write`.
    pub fn set_pr(&self, st: PrState) {
        *self.pr.write().unwrap_or_else(|e| e.into_inner()) = st;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv_is_stable() {
        // Fixed vector: the identifier must never change between releases.
        assert_eq!(fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
    }
}
