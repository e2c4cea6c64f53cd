//! s2d's iSCSI target: serves every volume of a [`block_api::VolumeProvider`]
//! to iSCSI initiators (Hyper-V, Windows, Linux open-iscsi, qemu, libiscsi)
//! per RFC 7143, with the SBC-3/SPC-4 command set a hypervisor uses.
//!
//! - One target per volume, `iqn.2026-01.io.s2d:<volume>`, LUN 0 = the
//!   volume; SendTargets discovery lists them all.
//! - Login with parameter negotiation, CHAP (one-way, mutual) per target via
//!   [`ChapConfig`], error recovery level 0, one connection per session,
//!   several sessions per target.
//! - 512-byte logical blocks over 4 KiB physical by default, 4 KiB native
//!   per volume via [`TargetConfig::block_size`].
//! - Persistent reservations kept behind [`ReservationStore`].
//!
//! Layers, each a module with one job: `pdu` (header fields) and `wire`
//! (framing, digests) → `text`, `params`, `chap`, `login` → `connection`
//! (full feature phase) and `writer` (sending) → `scsi` (the device server,
//! transport independent) → `block_api`. Invariants every layer keeps:
//! nothing an initiator sends can panic the target or make it allocate past
//! a negotiated or configured limit; a protocol error ends only its own
//! connection; nothing is acknowledged before the volume acknowledged it.
//!
//! What lives elsewhere: the volumes themselves (`storaged`), the daemon
//! flag `--iscsi-listen` and `s2dctl volume set-chap` (which feed
//! [`TargetConfig`]).

pub mod chap;
pub mod config;
mod connection;
mod discovery;
mod error;
mod login;
pub mod params;
pub mod pdu;
mod registry;
pub mod reservation;
pub mod scsi;
mod server;
pub mod text;
pub mod wire;
mod writer;

pub use chap::{ChapCredential, ChapSecrets};
pub use config::{
    BlockSizeLookup, ChapConfig, IQN_PREFIX, LogicalBlockSize, TargetConfig, target_iqn,
    volume_of_iqn,
};
pub use error::IscsiError;
pub use params::ParamLimits;
pub use reservation::{
    InitiatorPort, MemoryReservationStore, PrState, Registration, Reservation, ReservationStore,
    ReservationType,
};
pub use server::serve;
