//! Accepting connections and running each one: handshake, then transmission.
//!
//! Invariants:
//! - At most `connections_max` connections are served at once; one more is
//!   accepted and closed at once, so the listen backlog never fills.
//! - A failing connection (protocol violation, timeout, I/O error) is
//!   logged and counted, and affects no other connection.
//! - After shutdown is cancelled no connection is accepted; live
//!   connections stop reading requests, get `shutdown_grace` to finish the
//!   ones in flight and write their replies, and are then cut. [`serve`]
//!   returns only when every connection task has ended.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use block_api::VolumeProvider;
use tokio::io::{AsyncRead, AsyncWrite, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::handshake::{self, Outcome};
use crate::{NbdError, ServerConfig, ServerStats, transmission};

/// Socket read buffer: several pipelined 4 KiB writes per system call.
const READ_BUFFER_BYTES: usize = 128 << 10;
/// Pause after a failed `accept` (e.g. out of file descriptors).
const ACCEPT_RETRY: Duration = Duration::from_millis(50);

/// An NBD server for the volumes of one [`VolumeProvider`]. Cheap to clone:
/// clones share the provider, the configuration and the counters.
#[derive(Clone)]
pub struct NbdServer {
    inner: Arc<Inner>,
}

struct Inner {
    provider: Arc<dyn VolumeProvider>,
    config: ServerConfig,
    stats: Arc<ServerStats>,
    /// Payload bytes in flight over all connections.
    inflight_bytes: Arc<Semaphore>,
}

/// Serve `provider`'s volumes on `listener` with the default configuration
/// until `shutdown` is cancelled and every connection has finished.
pub async fn serve(
    listener: TcpListener,
    provider: Arc<dyn VolumeProvider>,
    shutdown: CancellationToken,
) -> Result<(), NbdError> {
    NbdServer::new(provider, ServerConfig::default())?
        .serve(listener, shutdown)
        .await
}

impl NbdServer {
    pub fn new(provider: Arc<dyn VolumeProvider>, config: ServerConfig) -> Result<Self, NbdError> {
        config.validate()?;
        let stats = Arc::new(ServerStats::default());
        let inflight_bytes = Arc::new(Semaphore::new(config.server_inflight_bytes_max));
        let inner = Inner {
            provider,
            config,
            stats,
            inflight_bytes,
        };
        Ok(NbdServer {
            inner: Arc::new(inner),
        })
    }

    /// The counters of every connection this server ran.
    pub fn stats(&self) -> Arc<ServerStats> {
        Arc::clone(&self.inner.stats)
    }

    pub fn config(&self) -> &ServerConfig {
        &self.inner.config
    }

    /// Accept and serve connections until `shutdown` is cancelled, then let
    /// live connections drain (see the module doc) and return.
    pub async fn serve(
        &self,
        listener: TcpListener,
        shutdown: CancellationToken,
    ) -> Result<(), NbdError> {
        let slots = Arc::new(Semaphore::new(self.inner.config.connections_max));
        let mut connections = JoinSet::new();
        tracing::info!(addr = ?listener.local_addr().ok(), "NBD server listening");
        loop {
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                Some(done) = connections.join_next(), if !connections.is_empty() => {
                    log_join(done);
                }
                accepted = listener.accept() => match accepted {
                    Ok((stream, peer)) => {
                        let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
                            self.inner.stats.connection_refused();
                            tracing::warn!(%peer, "refusing connection: connections_max reached");
                            continue;
                        };
                        let server = self.clone();
                        let token = shutdown.clone();
                        let span = tracing::info_span!("nbd", %peer);
                        connections.spawn(
                            async move {
                                server.run_tcp(stream, peer, token).await;
                                drop(slot);
                            }
                            .instrument(span),
                        );
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(ACCEPT_RETRY).await;
                    }
                },
            }
        }
        drop(listener);
        let grace = self.inner.config.shutdown_grace;
        tracing::info!(connections = connections.len(), "NBD server shutting down");
        let drained = tokio::time::timeout(grace, async {
            while let Some(done) = connections.join_next().await {
                log_join(done);
            }
        })
        .await;
        if drained.is_err() {
            tracing::warn!(
                connections = connections.len(),
                ?grace,
                "connections did not finish in time after shutdown; cutting them"
            );
            connections.shutdown().await;
        }
        Ok(())
    }

    async fn run_tcp(&self, stream: TcpStream, peer: SocketAddr, shutdown: CancellationToken) {
        tracing::debug!(%peer, "connection accepted");
        match self.handle_connection(stream, shutdown).await {
            Ok(()) => tracing::debug!("connection closed"),
            Err(e) => tracing::info!(error = %e, "connection ended with an error"),
        }
    }

    /// Serve one TCP connection from handshake to disconnect.
    pub async fn handle_connection(
        &self,
        stream: TcpStream,
        shutdown: CancellationToken,
    ) -> Result<(), NbdError> {
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!(error = %e, "could not set TCP_NODELAY");
        }
        let (reader, writer) = stream.into_split();
        self.handle_stream(reader, writer, shutdown).await
    }

    /// Serve one connection given as its two halves (a TCP or Unix socket,
    /// or an in-memory pipe in tests). Returns `Ok` when the client
    /// disconnected cleanly or the server shut down.
    pub async fn handle_stream<R, W>(
        &self,
        reader: R,
        mut writer: W,
        shutdown: CancellationToken,
    ) -> Result<(), NbdError>
    where
        R: AsyncRead + Unpin + Send,
        W: AsyncWrite + Unpin + Send + 'static,
    {
        let inner = &*self.inner;
        let _active = ActiveConnection::new(&inner.stats);
        let mut rd = BufReader::with_capacity(READ_BUFFER_BYTES, reader);
        let negotiated = match handshake::negotiate(
            &mut rd,
            &mut writer,
            &*inner.provider,
            inner.config.handshake_timeout,
            &shutdown,
        )
        .await
        {
            Ok(Outcome::Transmission(negotiated)) => negotiated,
            Ok(Outcome::Closed) => return Ok(()),
            Err(e) => {
                inner.stats.handshake_failed();
                return Err(e);
            }
        };
        tracing::debug!(
            volume = negotiated.volume.name(),
            structured = negotiated.structured,
            base_allocation = negotiated.base_allocation,
            "entering transmission"
        );
        transmission::run(
            &mut rd,
            writer,
            negotiated,
            &inner.config,
            &inner.inflight_bytes,
            &shutdown,
            &inner.stats,
        )
        .await
    }
}

fn log_join(done: Result<(), tokio::task::JoinError>) {
    if let Err(e) = done
        && e.is_panic()
    {
        tracing::error!(error = %e, "NBD connection task panicked");
    }
}

/// Keeps `connections_active` right however a connection ends.
struct ActiveConnection<'a>(&'a ServerStats);

impl<'a> ActiveConnection<'a> {
    fn new(stats: &'a ServerStats) -> Self {
        stats.connection_opened();
        ActiveConnection(stats)
    }
}

impl Drop for ActiveConnection<'_> {
    fn drop(&mut self) {
        self.0.connection_closed();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_send<T: Send>(_: &T) {}

    /// `storaged` spawns these futures on a multi-threaded runtime.
    #[test]
    fn server_futures_are_send() {
        struct NoVolumes;
        #[async_trait::async_trait]
        impl VolumeProvider for NoVolumes {
            async fn list(&self) -> Vec<block_api::VolumeSummary> {
                Vec::new()
            }
            async fn open(
                &self,
                name: &str,
            ) -> Result<Arc<dyn block_api::BlockVolume>, block_api::BlockError> {
                Err(block_api::BlockError::NotFound(name.to_owned()))
            }
        }
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build();
        let rt = rt.expect("runtime");
        rt.block_on(async {
            let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
            let fut = serve(listener, Arc::new(NoVolumes), CancellationToken::new());
            assert_send(&fut);
            let server = NbdServer::new(Arc::new(NoVolumes), ServerConfig::default());
            let server = server.expect("valid config");
            let (a, b) = tokio::io::duplex(64);
            let fut = server.handle_stream(a, b, CancellationToken::new());
            assert_send(&fut);
        });
    }
}
