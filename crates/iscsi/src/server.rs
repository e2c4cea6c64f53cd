//! The accept loop: one task per connection, a cap on connections, and a
//! graceful shutdown that stops accepting, lets every connection finish
//! its running commands, and returns.
//!
//! Invariant: `serve` returns only after every connection task it started
//! has ended.

use std::sync::Arc;
use std::time::Duration;

use block_api::VolumeProvider;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::TargetConfig;
use crate::connection;
use crate::error::IscsiError;
use crate::registry::Registry;

/// Serve iSCSI on `listener` until `shutdown` is cancelled: every volume of
/// `provider` is a target `iqn.2026-01.io.s2d:<volume>` with the volume as
/// LUN 0. On shutdown, stops accepting, finishes in-flight commands on
/// every connection, closes them and returns.
pub async fn serve(
    listener: TcpListener,
    provider: Arc<dyn VolumeProvider>,
    config: TargetConfig,
    shutdown: CancellationToken,
) -> Result<(), IscsiError> {
    let config = Arc::new(config.validated());
    let registry = Arc::new(Registry::new(provider, config.clone()));
    let tracker = TaskTracker::new();
    let slots = Arc::new(Semaphore::new(config.max_connections));
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = listener.accept() => r,
        };
        let (sock, peer) = match accepted {
            Ok(x) => x,
            Err(e) => {
                // Out of descriptors and the like: back off, keep serving.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            tracing::warn!(%peer, "connection refused: too many connections");
            continue;
        };
        let registry = registry.clone();
        let token = shutdown.child_token();
        tracker.spawn(async move {
            let _permit = permit;
            match connection::run(sock, registry, token).await {
                Ok(()) => tracing::debug!(%peer, "connection ended"),
                Err(e) => tracing::info!(%peer, error = %e, "connection ended"),
            }
        });
    }
    tracker.close();
    tracker.wait().await;
    Ok(())
}
