//! Persistent reservation state (SPC-4 5.13) as plain data, and the
//! [`ReservationStore`] seam that keeps it: in memory today, in the cluster
//! metadata later so that registrations survive a restart and a move of the
//! volume to another node.
//!
//! Invariants: a [`PrState`] is only changed by the PERSISTENT RESERVE OUT
//! logic in `scsi::pr`, which saves it through the store before it takes
//! effect; the reservation holder, when there is one, is registered.

use std::collections::HashMap;
use std::sync::Mutex;

/// An initiator port as SCSI sees it over iSCSI: the initiator's name and
/// the session's ISID (`iqn...,i,0x<isid>`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct InitiatorPort {
    pub name: String,
    pub isid: [u8; 6],
}

impl InitiatorPort {
    /// The iSCSI initiator port name, `<name>,i,0x<isid hex>`.
    pub fn port_name(&self) -> String {
        let mut s = format!("{},i,0x", self.name);
        for b in self.isid {
            s.push_str(&format!("{b:02x}"));
        }
        s
    }
}

/// One registration: an I_T nexus and its key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registration {
    pub port: InitiatorPort,
    pub key: u64,
    /// The relative target port the registration was made through.
    pub target_port: u16,
    pub aptpl: bool,
}

/// Reservation types (SPC-4 table 213).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReservationType {
    WriteExclusive,
    ExclusiveAccess,
    WriteExclusiveRegistrantsOnly,
    ExclusiveAccessRegistrantsOnly,
    WriteExclusiveAllRegistrants,
    ExclusiveAccessAllRegistrants,
}

impl ReservationType {
    pub fn from_code(c: u8) -> Option<Self> {
        Some(match c {
            1 => Self::WriteExclusive,
            3 => Self::ExclusiveAccess,
            5 => Self::WriteExclusiveRegistrantsOnly,
            6 => Self::ExclusiveAccessRegistrantsOnly,
            7 => Self::WriteExclusiveAllRegistrants,
            8 => Self::ExclusiveAccessAllRegistrants,
            _ => return None,
        })
    }
    pub fn code(self) -> u8 {
        match self {
            Self::WriteExclusive => 1,
            Self::ExclusiveAccess => 3,
            Self::WriteExclusiveRegistrantsOnly => 5,
            Self::ExclusiveAccessRegistrantsOnly => 6,
            Self::WriteExclusiveAllRegistrants => 7,
            Self::ExclusiveAccessAllRegistrants => 8,
        }
    }
    /// Every registrant is a reservation holder.
    pub fn all_registrants(self) -> bool {
        matches!(
            self,
            Self::WriteExclusiveAllRegistrants | Self::ExclusiveAccessAllRegistrants
        )
    }
    /// Registrants (not only the holder) may access the medium.
    pub fn registrants_have_access(self) -> bool {
        !matches!(self, Self::WriteExclusive | Self::ExclusiveAccess)
    }
    /// Non-registrants may not even read.
    pub fn exclusive_access(self) -> bool {
        matches!(
            self,
            Self::ExclusiveAccess
                | Self::ExclusiveAccessRegistrantsOnly
                | Self::ExclusiveAccessAllRegistrants
        )
    }
}

/// The persistent reservation in effect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reservation {
    /// The holder (for all-registrants types, the one that reserved).
    pub holder: InitiatorPort,
    pub kind: ReservationType,
    pub key: u64,
}

/// Everything PERSISTENT RESERVE IN reports for one logical unit.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PrState {
    /// Bumped by every REGISTER, REGISTER AND IGNORE, CLEAR, PREEMPT.
    pub generation: u32,
    pub registrations: Vec<Registration>,
    pub reservation: Option<Reservation>,
}

impl PrState {
    pub fn registration(&self, port: &InitiatorPort) -> Option<&Registration> {
        self.registrations.iter().find(|r| &r.port == port)
    }

    /// Whether `port` holds the reservation.
    pub fn is_holder(&self, port: &InitiatorPort) -> bool {
        match &self.reservation {
            None => false,
            Some(r) if r.kind.all_registrants() => self.registration(port).is_some(),
            Some(r) => &r.holder == port,
        }
    }
}

/// Where PR state lives between commands and restarts.
#[async_trait::async_trait]
pub trait ReservationStore: Send + Sync + 'static {
    /// The state of `volume`, empty when it never had any.
    async fn load(&self, volume: &str) -> Result<PrState, String>;
    /// Replace the state of `volume`; the change takes effect only once this
    /// returned `Ok`.
    async fn save(&self, volume: &str, state: &PrState) -> Result<(), String>;
}

/// A [`ReservationStore`] in process memory (lost on restart).
#[derive(Debug, Default)]
pub struct MemoryReservationStore {
    states: Mutex<HashMap<String, PrState>>,
}

impl MemoryReservationStore {
    pub fn new() -> Self {
        Self::default()
    }
}

#[async_trait::async_trait]
impl ReservationStore for MemoryReservationStore {
    async fn load(&self, volume: &str) -> Result<PrState, String> {
        let g = self
            .states
            .lock()
            .map_err(|_| "reservation store poisoned".to_string())?;
        Ok(g.get(volume).cloned().unwrap_or_default())
    }
    async fn save(&self, volume: &str, state: &PrState) -> Result<(), String> {
        let mut g = self
            .states
            .lock()
            .map_err(|_| "reservation store poisoned".to_string())?;
        g.insert(volume.to_string(), state.clone());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_name_format() {
        let p = InitiatorPort {
            name: "iqn.x".into(),
            isid: [0x80, 0, 0x12, 0x34, 0, 1],
        };
        assert_eq!(p.port_name(), "iqn.x,i,0x800012340001");
    }

    #[tokio::test]
    async fn memory_store_round_trip() {
        let s = MemoryReservationStore::new();
        assert_eq!(s.load("v").await, Ok(PrState::default()));
        let st = PrState {
            generation: 3,
            ..Default::default()
        };
        s.save("v", &st).await.expect("save");
        assert_eq!(s.load("v").await, Ok(st));
    }
}
