//! What the embedding daemon configures: the advertised portal, per-volume
//! CHAP and logical block size lookups, the reservation store, and the
//! limits (negotiation offers, command window, transfer size, timeouts).
//!
//! Invariants: lookups are called at each login, so a change (for example
//! `s2dctl volume set-chap`) applies to the next login without a restart;
//! [`TargetConfig::validated`] keeps every limit inside what RFC 7143 and
//! our buffers allow.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::chap::ChapSecrets;
use crate::params::ParamLimits;
use crate::reservation::{MemoryReservationStore, ReservationStore};

/// The IQN prefix of every s2d target; the volume name follows it.
pub const IQN_PREFIX: &str = "iqn.2026-01.io.s2d:";

/// The target name of a volume.
pub fn target_iqn(volume: &str) -> String {
    format!("{IQN_PREFIX}{volume}")
}

/// The volume a target name designates, if it is one of ours.
pub fn volume_of_iqn(iqn: &str) -> Option<&str> {
    iqn.strip_prefix(IQN_PREFIX).filter(|v| !v.is_empty())
}

/// Per-target CHAP lookup supplied by the daemon.
pub trait ChapConfig: Send + Sync + 'static {
    /// The CHAP credentials required to log in to `volume`'s target, or
    /// `None` when the target needs no authentication.
    fn secrets(&self, volume: &str) -> Option<ChapSecrets>;
}

impl<F> ChapConfig for F
where
    F: Fn(&str) -> Option<ChapSecrets> + Send + Sync + 'static,
{
    fn secrets(&self, volume: &str) -> Option<ChapSecrets> {
        self(volume)
    }
}

/// The logical block size a volume is served with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogicalBlockSize {
    /// 512-byte logical blocks over 4 KiB physical blocks (what most
    /// hypervisors and Windows expect).
    #[default]
    Emulated512,
    /// 4 KiB logical and physical blocks.
    Native4096,
}

impl LogicalBlockSize {
    pub fn bytes(self) -> u32 {
        match self {
            Self::Emulated512 => 512,
            Self::Native4096 => 4096,
        }
    }
    /// log2(logical blocks per physical block), as READ CAPACITY(16) reports.
    pub fn per_physical_exponent(self) -> u8 {
        match self {
            Self::Emulated512 => 3,
            Self::Native4096 => 0,
        }
    }
}

/// Per-volume block size lookup supplied by the daemon.
pub type BlockSizeLookup = Arc<dyn Fn(&str) -> LogicalBlockSize + Send + Sync>;

/// Configuration of [`serve`](crate::serve).
#[derive(Clone)]
pub struct TargetConfig {
    /// Address advertised in SendTargets; by default the local address the
    /// discovery connection arrived on.
    pub portal: Option<SocketAddr>,
    /// CHAP per target (volume).
    pub chap: Arc<dyn ChapConfig>,
    /// CHAP for discovery sessions; `None` admits any initiator.
    pub discovery_chap: Option<ChapSecrets>,
    pub block_size: BlockSizeLookup,
    pub reservations: Arc<dyn ReservationStore>,
    /// Negotiation offers (segment and burst lengths, digests).
    pub limits: ParamLimits,
    /// Commands a session may have outstanding (the CmdSN window).
    pub cmd_window: u32,
    /// Largest SCSI transfer of one command (reported in the block limits
    /// VPD page; larger commands are refused).
    pub max_transfer_bytes: u32,
    /// Most buffer bytes (write data being collected, read data being
    /// produced) one connection may hold; a command past it gets TASK SET
    /// FULL and is retried by the initiator.
    pub inflight_bytes_max: u64,
    /// Most connections served at once; more are refused at accept.
    pub max_connections: usize,
    /// Time allowed for a whole login.
    pub login_timeout: Duration,
    /// Idle time after which the target pings the initiator (NOP-In).
    pub nop_interval: Duration,
    /// Time the initiator has to answer a ping before the connection drops.
    pub nop_timeout: Duration,
}

impl std::fmt::Debug for TargetConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TargetConfig")
            .field("portal", &self.portal)
            .field("limits", &self.limits)
            .field("cmd_window", &self.cmd_window)
            .field("max_transfer_bytes", &self.max_transfer_bytes)
            .field("max_connections", &self.max_connections)
            .finish_non_exhaustive()
    }
}

impl Default for TargetConfig {
    fn default() -> Self {
        TargetConfig {
            portal: None,
            chap: Arc::new(|_: &str| None),
            discovery_chap: None,
            block_size: Arc::new(|_: &str| LogicalBlockSize::Emulated512),
            reservations: Arc::new(MemoryReservationStore::new()),
            limits: ParamLimits::default(),
            cmd_window: 64,
            max_transfer_bytes: 4 * 1024 * 1024,
            inflight_bytes_max: 64 * 1024 * 1024,
            max_connections: 256,
            login_timeout: Duration::from_secs(30),
            nop_interval: Duration::from_secs(30),
            nop_timeout: Duration::from_secs(30),
        }
    }
}

impl TargetConfig {
    /// A copy with every limit clamped into its legal range.
    pub fn validated(mut self) -> Self {
        let l = &mut self.limits;
        l.max_recv_data_segment_len = l.max_recv_data_segment_len.clamp(512, (1 << 24) - 1);
        l.max_burst_len = l.max_burst_len.clamp(512, (1 << 24) - 1);
        l.first_burst_len = l.first_burst_len.clamp(512, l.max_burst_len);
        l.max_outstanding_r2t = l.max_outstanding_r2t.clamp(1, 16);
        self.cmd_window = self.cmd_window.clamp(1, 1024);
        self.max_transfer_bytes = self.max_transfer_bytes.clamp(64 * 1024, 64 * 1024 * 1024);
        self.max_connections = self.max_connections.max(1);
        self.inflight_bytes_max = self.inflight_bytes_max.max(crate::scsi::TRANSFER_BYTES_MAX);
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iqn_round_trip() {
        assert_eq!(target_iqn("vol1"), "iqn.2026-01.io.s2d:vol1");
        assert_eq!(volume_of_iqn("iqn.2026-01.io.s2d:vol1"), Some("vol1"));
        assert_eq!(volume_of_iqn("iqn.2026-01.io.s2d:"), None);
        assert_eq!(volume_of_iqn("iqn.other:vol1"), None);
    }
}
