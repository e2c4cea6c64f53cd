//! Counters of the server, shared by every connection.
//!
//! Relaxed atomics: each counter is exact on its own, a snapshot is not a
//! consistent cut across counters. Names follow the project's metric style
//! (`_total` for counters, `_bytes` for sizes).

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

#[derive(Debug, Default)]
pub struct ServerStats {
    connections_total: AtomicU64,
    connections_active: AtomicU64,
    connections_refused_total: AtomicU64,
    handshakes_failed_total: AtomicU64,
    protocol_errors_total: AtomicU64,
    requests_total: AtomicU64,
    request_errors_total: AtomicU64,
    read_bytes_total: AtomicU64,
    written_bytes_total: AtomicU64,
}

/// A copy of the counters at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StatsSnapshot {
    pub connections_total: u64,
    pub connections_active: u64,
    pub connections_refused_total: u64,
    pub handshakes_failed_total: u64,
    pub protocol_errors_total: u64,
    pub requests_total: u64,
    pub request_errors_total: u64,
    pub read_bytes_total: u64,
    pub written_bytes_total: u64,
}

impl ServerStats {
    pub fn snapshot(&self) -> StatsSnapshot {
        StatsSnapshot {
            connections_total: self.connections_total.load(Relaxed),
            connections_active: self.connections_active.load(Relaxed),
            connections_refused_total: self.connections_refused_total.load(Relaxed),
            handshakes_failed_total: self.handshakes_failed_total.load(Relaxed),
            protocol_errors_total: self.protocol_errors_total.load(Relaxed),
            requests_total: self.requests_total.load(Relaxed),
            request_errors_total: self.request_errors_total.load(Relaxed),
            read_bytes_total: self.read_bytes_total.load(Relaxed),
            written_bytes_total: self.written_bytes_total.load(Relaxed),
        }
    }

    pub(crate) fn connection_opened(&self) {
        self.connections_total.fetch_add(1, Relaxed);
        self.connections_active.fetch_add(1, Relaxed);
    }

    pub(crate) fn connection_closed(&self) {
        self.connections_active.fetch_sub(1, Relaxed);
    }

    pub(crate) fn connection_refused(&self) {
        self.connections_refused_total.fetch_add(1, Relaxed);
    }

    pub(crate) fn handshake_failed(&self) {
        self.handshakes_failed_total.fetch_add(1, Relaxed);
    }

    pub(crate) fn protocol_error(&self) {
        self.protocol_errors_total.fetch_add(1, Relaxed);
    }

    pub(crate) fn request(&self) {
        self.requests_total.fetch_add(1, Relaxed);
    }

    pub(crate) fn request_error(&self) {
        self.request_errors_total.fetch_add(1, Relaxed);
    }

    pub(crate) fn read_bytes(&self, n: u64) {
        self.read_bytes_total.fetch_add(n, Relaxed);
    }

    pub(crate) fn written_bytes(&self, n: u64) {
        self.written_bytes_total.fetch_add(n, Relaxed);
    }
}
