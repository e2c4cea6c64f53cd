//! Limits and timeouts of the server, with their defaults.
//!
//! Invariant (checked by [`ServerConfig::validate`]): a connection can
//! always admit one request of the largest payload, so
//! `server_inflight_bytes_max >= inflight_bytes_max >= PAYLOAD_MAX` and
//! `inflight_requests_max >= 1`.

use std::time::Duration;

use crate::NbdError;
use crate::proto::PAYLOAD_MAX;

#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// A handshake step (the client flags, or one option) that takes longer
    /// than this drops the connection.
    pub handshake_timeout: Duration,
    /// Requests one connection may have between being read and their reply
    /// being written; further requests are not read until one completes.
    pub inflight_requests_max: usize,
    /// READ and WRITE payload bytes one connection may hold at once.
    pub inflight_bytes_max: usize,
    /// The same, for all connections of the server together: bounds the
    /// server's memory however many clients connect.
    pub server_inflight_bytes_max: usize,
    /// Connections served at once; more are accepted and closed at once.
    pub connections_max: usize,
    /// After shutdown, how long connections get to finish in-flight
    /// requests and send their replies before they are cut.
    pub shutdown_grace: Duration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            handshake_timeout: Duration::from_secs(30),
            inflight_requests_max: 256,
            inflight_bytes_max: 2 * PAYLOAD_MAX as usize,
            server_inflight_bytes_max: 32 * PAYLOAD_MAX as usize,
            connections_max: 1024,
            shutdown_grace: Duration::from_secs(30),
        }
    }
}

impl ServerConfig {
    pub fn validate(&self) -> Result<(), NbdError> {
        if self.inflight_requests_max == 0 {
            return Err(NbdError::Config(
                "inflight_requests_max must be at least 1".into(),
            ));
        }
        // Semaphore permits are u32 in tokio's acquire_many.
        if self.inflight_requests_max > u32::MAX as usize
            || self.server_inflight_bytes_max > u32::MAX as usize
        {
            return Err(NbdError::Config(
                "in-flight limits must fit in 32 bits".into(),
            ));
        }
        if self.inflight_bytes_max < PAYLOAD_MAX as usize {
            return Err(NbdError::Config(format!(
                "inflight_bytes_max {} is below the largest payload {PAYLOAD_MAX}",
                self.inflight_bytes_max
            )));
        }
        if self.server_inflight_bytes_max < self.inflight_bytes_max {
            return Err(NbdError::Config(format!(
                "server_inflight_bytes_max {} is below inflight_bytes_max {}",
                self.server_inflight_bytes_max, self.inflight_bytes_max
            )));
        }
        if self.connections_max == 0 {
            return Err(NbdError::Config(
                "connections_max must be at least 1".into(),
            ));
        }
        if self.handshake_timeout.is_zero() {
            return Err(NbdError::Config(
                "handshake_timeout must be positive".into(),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_config_is_valid() {
        ServerConfig::default()
            .validate()
            .expect("defaults must validate");
    }

    #[test]
    fn byte_limit_below_one_payload_is_refused() {
        let cfg = ServerConfig {
            inflight_bytes_max: 4096,
            ..ServerConfig::default()
        };
        assert!(matches!(cfg.validate(), Err(NbdError::Config(_))));
    }
}
