//! s2d's NBD front end: serves the volumes of a [`block_api::VolumeProvider`]
//! to NBD clients (qemu, the Linux kernel's nbd driver, libnbd tools).
//!
//! Protocol coverage: fixed newstyle handshake with `NO_ZEROES`; options
//! `GO`, `INFO`, `LIST`, `ABORT`, `EXPORT_NAME`, `STRUCTURED_REPLY`,
//! `LIST_META_CONTEXT` and `SET_META_CONTEXT` (`base:allocation`); commands
//! READ, WRITE, FLUSH, TRIM, WRITE_ZEROES (with `NO_HOLE` and `FAST_ZERO`),
//! BLOCK_STATUS, CACHE and DISC, with the FUA and DF flags; structured
//! replies with hole chunks for zero blocks. No TLS, no extended headers.
//!
//! Use (what `storaged` does):
//!
//! ```no_run
//! use std::sync::Arc;
//! use nbd_server::{CancellationToken, NbdServer, ServerConfig};
//!
//! async fn run(
//!     provider: Arc<dyn block_api::VolumeProvider>,
//!     shutdown: CancellationToken,
//! ) -> Result<(), nbd_server::NbdError> {
//!     let listener = tokio::net::TcpListener::bind("127.0.0.1:10809").await?;
//!     let server = NbdServer::new(provider, ServerConfig::default())?;
//!     let stats = server.stats(); // for metrics: stats.snapshot()
//!     // Returns after `shutdown` is cancelled and connections drained.
//!     server.serve(listener, shutdown).await
//! }
//! ```
//!
//! or simply [`serve`]`(listener, provider, shutdown)` with the defaults.
//!
//! Layout: [`proto`] holds the wire constants and encodings, `handshake`
//! the option haggling, `transmission` the request/reply engine and
//! `server` the accept loop and connection lifecycle.
//!
//! Invariants:
//! - Nothing a client sends makes the server panic, allocate without bound
//!   or touch data it was not asked to: malformed requests get NBD errors or
//!   a disconnect of that connection only.
//! - A reply is sent only after the volume call it reports finished, so
//!   every acknowledged write and flush carries the volume's guarantees
//!   (see `block_api`). `CAN_MULTI_CONN` holds because every connection to
//!   a volume shares the same [`block_api::BlockVolume`] and its flush.
//! - Export names are volume names; the empty name is the default export
//!   when exactly one volume is served.
//!
//! What lives elsewhere: volumes and their durability in `storaged`; the
//! seam in `block-api`.

mod config;
mod error;
mod handshake;
pub mod proto;
mod server;
mod stats;
mod transmission;

pub use config::ServerConfig;
pub use error::NbdError;
pub use server::{NbdServer, serve};
pub use stats::{ServerStats, StatsSnapshot};
pub use tokio_util::sync::CancellationToken;
