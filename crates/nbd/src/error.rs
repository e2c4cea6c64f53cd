//! The crate's error type: why a connection or the server stopped.
//!
//! Errors a client can cause in the transmission phase (bad range, unknown
//! command, volume errors) are not here: they become NBD error replies and
//! the connection goes on. What is here ends a connection, or (for
//! [`NbdError::Config`]) keeps the server from starting.

use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum NbdError {
    #[error("socket I/O failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("client sent magic {magic:#x} where the {expected} magic belongs")]
    BadMagic { expected: &'static str, magic: u64 },
    #[error("client sent unknown handshake flags {0:#x}")]
    UnknownClientFlags(u32),
    #[error("handshake stalled for more than {0:?}")]
    HandshakeTimeout(Duration),
    #[error("NBD_OPT_EXPORT_NAME for export {name:?} failed: {reason}")]
    ExportNameRefused { name: String, reason: String },
    #[error("invalid server configuration: {0}")]
    Config(String),
    #[error("connection task failed: {0}")]
    Task(String),
}
