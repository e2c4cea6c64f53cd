//! The seam between a coordinator and the network: [`Transport`] sends one
//! request to one peer and waits for its reply; [`Handler`] is what a node
//! runs for each request it receives. `storaged` implements `Handler` over
//! its extent store and calls a `Transport`; [`crate::TcpTransport`] and
//! [`crate::serve`] are the TCP pair, [`MemTransport`] an in-process one for
//! tests.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use async_trait::async_trait;
use futures::FutureExt;

use crate::message::{ErrorCode, Request, Response};

/// Why a call got no reply. A reply that reports a failure
/// ([`Response::Error`]) is not a `TransportError`: the peer answered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TransportError {
    /// No reply within the call's timeout (which covers waiting for a
    /// connection, for an in-flight slot, for the send and for the reply).
    /// The request may or may not have been carried out.
    #[error("no reply within the timeout")]
    Timeout,
    /// The peer could not be reached, or the connection carrying the
    /// request failed before the reply came. The request may or may not
    /// have been carried out (unless it was never sent: see the message).
    #[error("peer unreachable: {0}")]
    Unreachable(String),
    /// The request was invalid (never sent), or the peer broke the
    /// protocol (a corrupt frame, a reply that does not fit the request).
    #[error("protocol error: {0}")]
    Protocol(String),
    /// The transport has been shut down.
    #[error("transport closed")]
    Closed,
}

/// Sends replica requests to peer nodes.
///
/// Semantics every implementation keeps (the conformance tests in
/// `crates/replication/tests/conformance.rs` check them):
/// - `call` returns within `timeout` (plus scheduling noise), whatever the
///   peer does; every wait inside it (connecting, an in-flight slot,
///   sending, the reply) counts toward that one deadline.
/// - The reply returned is the reply to this request (never to another
///   one in flight), and it fits the request
///   ([`Request::reply_shape`](crate::Request::reply_shape)); otherwise
///   the call fails with [`TransportError::Protocol`].
/// - An invalid request ([`Request::validate`](crate::Request::validate))
///   is refused with `Protocol` and never sent.
/// - When the link to the peer fails, calls in flight on it fail at once
///   with [`TransportError::Unreachable`], not at their timeout; later calls
///   reconnect (with back-off) without the caller doing anything. While the
///   peer cannot be reached (its last connect attempt failed and the
///   back-off has not passed) calls fail at once with `Unreachable` rather
///   than wait; a call waits through at most one connect attempt.
/// - Requests are not retried: after `Timeout` or `Unreachable` the caller
///   does not know whether a write landed and decides itself (the epoch
///   fences a late one).
///
/// What an RDMA implementation must provide to stand in for TCP:
/// - reliable, ordered delivery of each request and its reply, matched by a
///   request id (an RC queue pair per connection gives this; several queue
///   pairs per peer play the part of `connections_per_peer`);
/// - payloads ([`block_api::AlignedBuf`]) in registered memory: register
///   the buffer pool's regions once and post `Write` data and `Data`
///   replies from, and receive them into, `AlignedBuf`s without a copy;
///   the frame header (kind, ids, lengths, CRC) may travel as an inline
///   send and the payload by RDMA READ/WRITE;
/// - the same CRC32C end-to-end check of header and payload, the same
///   limits ([`crate::FRAME_PAYLOAD_MAX`]) and the same bounded number of
///   requests in flight per connection (credits);
/// - the same timeout and error meanings as above: a completion error or a
///   broken queue pair fails the calls in flight on it with `Unreachable`.
#[async_trait]
pub trait Transport: Send + Sync + 'static {
    async fn call(
        &self,
        peer: SocketAddr,
        req: Request,
        timeout: Duration,
    ) -> Result<Response, TransportError>;
}

/// What a node does with each request it receives. Called concurrently for
/// requests of one connection and of many; the reply goes back to the
/// caller whatever it is (an error is a [`Response::Error`]).
///
/// A handler must finish: the server waits for in-flight handlers at
/// shutdown (up to its grace period). A panicking handler is answered with
/// an `Io` error and logged.
#[async_trait]
pub trait Handler: Send + Sync + 'static {
    async fn handle(&self, peer: SocketAddr, req: Request) -> Response;
}

#[async_trait]
impl<T: Transport + ?Sized> Transport for Arc<T> {
    async fn call(
        &self,
        peer: SocketAddr,
        req: Request,
        timeout: Duration,
    ) -> Result<Response, TransportError> {
        (**self).call(peer, req, timeout).await
    }
}

/// An in-process transport: each "peer" address maps to a [`Handler`]
/// called directly, with the same validation, reply-shape check and
/// timeout as the TCP transport. For tests of the layers above (the volume
/// coordinator) without sockets. Calls to an unregistered address fail
/// with `Unreachable`.
#[derive(Default)]
pub struct MemTransport {
    peers: RwLock<HashMap<SocketAddr, Arc<dyn Handler>>>,
    /// The address handlers see as the caller's.
    local: Option<SocketAddr>,
}

impl MemTransport {
    /// An empty transport; handlers see `local` as the caller's address
    /// (`0.0.0.0:0` when `None`).
    pub fn new(local: Option<SocketAddr>) -> Self {
        MemTransport {
            peers: RwLock::new(HashMap::new()),
            local,
        }
    }

    /// Route calls for `peer` to `handler` (replacing any earlier one).
    pub fn add_peer(&self, peer: SocketAddr, handler: Arc<dyn Handler>) {
        self.peers
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(peer, handler);
    }

    /// Make `peer` unreachable.
    pub fn remove_peer(&self, peer: SocketAddr) {
        self.peers
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&peer);
    }
}

#[async_trait]
impl Transport for MemTransport {
    async fn call(
        &self,
        peer: SocketAddr,
        req: Request,
        timeout: Duration,
    ) -> Result<Response, TransportError> {
        req.validate()
            .map_err(|e| TransportError::Protocol(format!("request not sent: {e}")))?;
        let handler = self
            .peers
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&peer)
            .cloned()
            .ok_or_else(|| TransportError::Unreachable(format!("{peer}: no such peer")))?;
        let shape = req.reply_shape();
        let from = self.local.unwrap_or(SocketAddr::from(([0, 0, 0, 0], 0)));
        // A spawned task, as over a network: the handler runs to completion
        // even when the caller gives up.
        let task = tokio::spawn(async move { run_handler(&*handler, from, req).await });
        let resp = match tokio::time::timeout(timeout, task).await {
            Err(_) => return Err(TransportError::Timeout),
            Ok(Err(e)) => {
                return Err(TransportError::Unreachable(format!(
                    "{peer}: handler failed: {e}"
                )));
            }
            Ok(Ok(resp)) => resp,
        };
        shape
            .check(&resp)
            .map_err(|e| TransportError::Protocol(format!("{peer}: {e}")))?;
        Ok(resp)
    }
}

/// Run `handler` as a server does: a panic, or a reply that does not fit
/// the request, becomes an `Io` error reply (and an error in the log).
pub(crate) async fn run_handler(handler: &dyn Handler, peer: SocketAddr, req: Request) -> Response {
    let shape = req.reply_shape();
    let name = req.name();
    match std::panic::AssertUnwindSafe(handler.handle(peer, req))
        .catch_unwind()
        .await
    {
        Ok(resp) => match shape.check(&resp) {
            Ok(()) => resp,
            Err(e) => {
                tracing::error!(%peer, "replication handler's reply to {name} does not fit: {e}");
                Response::error(ErrorCode::Io, format!("internal error: {e}"))
            }
        },
        Err(_) => {
            tracing::error!(%peer, "replication handler panicked on {name}");
            Response::error(
                ErrorCode::Io,
                format!("internal error: handler panicked on {name}"),
            )
        }
    }
}
