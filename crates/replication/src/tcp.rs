//! The TCP implementation of [`Transport`] ([`TcpTransport`], the client
//! side) and the replica server ([`serve`]).
//!
//! Client: each peer gets `connections_per_peer` connection slots. A slot
//! is run by one supervisor task that connects on demand, publishes the
//! slot's state (idle, connecting, up, down until a retry time) and
//! reconnects with exponential back-off after a failure. A live connection
//! has one writer task (fed by a bounded channel, gathering bursts of
//! frames into few system calls) and one reader task (matching replies to
//! callers by request id). A call picks an up connection round-robin,
//! preferring one with a free in-flight slot.
//!
//! Invariants:
//! - At most `inflight_per_connection` calls are in flight per connection
//!   (a semaphore permit per call, held until its reply or its end); a call
//!   waits for a permit within its own deadline.
//! - Every wait of a call (connection, permit, channel, reply) is bounded
//!   by the call's deadline; connecting by `connect_timeout`; every socket
//!   write of one frame by `write_timeout`; the rest of a frame, once its
//!   first byte arrived, by `frame_timeout`.
//! - When a connection fails (I/O error, end of stream, corrupt frame,
//!   stalled write), every call in flight on it is answered at once with
//!   `Unreachable` (or `Protocol` for a corrupt stream), its permits are
//!   closed, and the slot is down until its back-off passes. A call that
//!   had not yet handed its request to the connection tries another one.
//! - A reply is delivered only to the call with its request id on its
//!   connection, and only if it fits the request; late replies (after a
//!   timeout) are dropped.
//! - Supervisors connect only when calls want a connection, so a peer that
//!   left the cluster costs nothing once calls to it stop.
//!
//! Server: one task per connection reads frames, runs each request's
//! handler in its own task (at most `inflight_per_connection` at once; past
//! that it stops reading, which pushes back through TCP), and a writer
//! sends replies as they complete. A malformed frame closes that connection
//! only (logged); replies of requests already running are still sent. On
//! shutdown it stops accepting and reading, gives running handlers
//! `shutdown_grace` to finish and their replies `write_timeout` to go out,
//! then closes.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, Semaphore, mpsc, oneshot, watch};
use tokio::task::JoinSet;
use tokio::time::{Instant, timeout, timeout_at};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::frame::{Frame, FrameError, FrameReader, FrameWriter, Message, MessageRef};
use crate::message::{ReplyShape, Request, Response};
use crate::transport::{Handler, Transport, TransportError, run_handler};

/// Frames a writer takes from its channel per burst.
const WRITE_BATCH_MAX: usize = 64;
/// Pause after a failed `accept` (e.g. out of file descriptors).
const ACCEPT_RETRY: Duration = Duration::from_millis(50);

/// A configuration value out of range.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid replication transport configuration: {0}")]
pub struct InvalidConfig(pub String);

/// Client settings of [`TcpTransport`].
#[derive(Debug, Clone)]
pub struct TcpConfig {
    /// Connections kept to each peer.
    pub connections_per_peer: usize,
    /// Calls in flight per connection; more wait (within their timeout).
    pub inflight_per_connection: usize,
    /// Longest wait for one TCP connect.
    pub connect_timeout: Duration,
    /// Wait before the first reconnect after a failure; doubled after each
    /// further failure up to `reconnect_backoff_max`, back to the minimum
    /// once a connection stayed up for `reconnect_backoff_max`.
    pub reconnect_backoff_min: Duration,
    pub reconnect_backoff_max: Duration,
    /// Longest wait for the rest of a reply frame once it has started.
    pub frame_timeout: Duration,
    /// Longest wait to hand one frame (up to 8 MiB) to the socket; a
    /// connection that stalls longer is closed.
    pub write_timeout: Duration,
}

impl Default for TcpConfig {
    fn default() -> Self {
        TcpConfig {
            connections_per_peer: 2,
            inflight_per_connection: 128,
            connect_timeout: Duration::from_secs(2),
            reconnect_backoff_min: Duration::from_millis(50),
            reconnect_backoff_max: Duration::from_secs(2),
            frame_timeout: Duration::from_secs(10),
            write_timeout: Duration::from_secs(10),
        }
    }
}

impl TcpConfig {
    pub fn validate(&self) -> Result<(), InvalidConfig> {
        let bad = |s: &str| Err(InvalidConfig(s.to_owned()));
        if !(1..=64).contains(&self.connections_per_peer) {
            return bad("connections_per_peer must be in 1..=64");
        }
        if !(1..=Semaphore::MAX_PERMITS).contains(&self.inflight_per_connection) {
            return bad("inflight_per_connection must be at least 1");
        }
        if self.reconnect_backoff_min.is_zero()
            || self.reconnect_backoff_min > self.reconnect_backoff_max
        {
            return bad("need 0 < reconnect_backoff_min <= reconnect_backoff_max");
        }
        if self.connect_timeout.is_zero()
            || self.frame_timeout.is_zero()
            || self.write_timeout.is_zero()
        {
            return bad("timeouts must be non-zero");
        }
        Ok(())
    }
}

/// Server settings of [`serve_with_config`].
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Requests handled at once per connection; the server stops reading a
    /// connection while this many are running.
    pub inflight_per_connection: usize,
    /// Connections served at once; more are accepted and closed at once.
    pub connections_max: usize,
    /// Longest wait for the rest of a request frame once it has started.
    pub frame_timeout: Duration,
    /// Longest wait to hand one reply frame to the socket.
    pub write_timeout: Duration,
    /// After shutdown, how long running handlers may take before they are
    /// cancelled.
    pub shutdown_grace: Duration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            inflight_per_connection: 128,
            connections_max: 1024,
            frame_timeout: Duration::from_secs(10),
            write_timeout: Duration::from_secs(10),
            shutdown_grace: Duration::from_secs(10),
        }
    }
}

impl ServerConfig {
    pub fn validate(&self) -> Result<(), InvalidConfig> {
        let bad = |s: &str| Err(InvalidConfig(s.to_owned()));
        if !(1..=Semaphore::MAX_PERMITS).contains(&self.inflight_per_connection) {
            return bad("inflight_per_connection must be at least 1");
        }
        if !(1..=Semaphore::MAX_PERMITS).contains(&self.connections_max) {
            return bad("connections_max must be at least 1");
        }
        if self.frame_timeout.is_zero() || self.write_timeout.is_zero() {
            return bad("timeouts must be non-zero");
        }
        Ok(())
    }
}

// ---------------------------------------------------------------- client

/// The TCP [`Transport`]. Cheap to share behind an `Arc`; dropping it (or
/// [`TcpTransport::close`]) closes every connection and fails the calls in
/// flight with [`TransportError::Closed`]. Must be used inside a tokio
/// runtime (it spawns its connection tasks there).
pub struct TcpTransport {
    config: TcpConfig,
    peers: Mutex<HashMap<SocketAddr, Arc<Peer>>>,
    closed: CancellationToken,
}

impl TcpTransport {
    /// A transport with `config`.
    ///
    /// # Panics
    /// When `config` is invalid ([`TcpConfig::validate`]); a configuration
    /// that comes from an operator goes through [`TcpTransport::try_new`].
    pub fn new(config: TcpConfig) -> Self {
        match Self::try_new(config) {
            Ok(t) => t,
            Err(e) => panic!("{e}"),
        }
    }

    /// A transport with `config`, or why `config` is invalid.
    pub fn try_new(config: TcpConfig) -> Result<Self, InvalidConfig> {
        config.validate()?;
        Ok(TcpTransport {
            config,
            peers: Mutex::new(HashMap::new()),
            closed: CancellationToken::new(),
        })
    }

    pub fn config(&self) -> &TcpConfig {
        &self.config
    }

    /// Close the connections to `peer` and forget it: calls in flight to it
    /// fail with `Unreachable`; a later call connects afresh. For a peer
    /// the cluster declared down or removed.
    pub fn disconnect(&self, peer: SocketAddr) {
        let removed = self
            .peers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&peer);
        if let Some(p) = removed {
            p.close(TransportError::Unreachable(format!(
                "{peer}: disconnected by the caller"
            )));
        }
    }

    /// Close every connection; calls in flight and later calls fail with
    /// [`TransportError::Closed`].
    pub fn close(&self) {
        self.closed.cancel();
        let peers: Vec<_> = self
            .peers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .drain()
            .map(|(_, p)| p)
            .collect();
        for p in peers {
            p.close(TransportError::Closed);
        }
    }

    fn peer(&self, addr: SocketAddr) -> Arc<Peer> {
        let mut peers = self.peers.lock().unwrap_or_else(PoisonError::into_inner);
        Arc::clone(
            peers
                .entry(addr)
                .or_insert_with(|| Peer::start(addr, &self.config, &self.closed)),
        )
    }

    async fn call_inner(
        &self,
        addr: SocketAddr,
        req: Request,
        deadline: Instant,
    ) -> Result<Response, TransportError> {
        let shape = req.reply_shape();
        let peer = self.peer(addr);
        let mut req = Some(req);
        loop {
            let conn = peer.connection(deadline).await?;
            let permit =
                match timeout_at(deadline, Arc::clone(&conn.inflight).acquire_owned()).await {
                    Err(_) => return Err(TransportError::Timeout),
                    // Closed: the connection failed while we waited; its
                    // request never left, so try another.
                    Ok(Err(_)) => continue,
                    Ok(Ok(permit)) => permit,
                };
            let request_id = conn.next_id.fetch_add(1, Ordering::Relaxed);
            let (reply_tx, reply_rx) = oneshot::channel();
            if !conn.register(request_id, shape, reply_tx) {
                continue;
            }
            let registered = Registered {
                conn: &conn,
                request_id,
            };
            let Some(out) = req.take() else {
                return Err(TransportError::Protocol(
                    "internal error: request already sent".into(),
                ));
            };
            match timeout_at(
                deadline,
                conn.sender.send(Outgoing {
                    request_id,
                    req: out,
                }),
            )
            .await
            {
                Err(_) => return Err(TransportError::Timeout),
                Ok(Err(mpsc::error::SendError(back))) => {
                    // The writer is gone: the request was never sent.
                    req = Some(back.req);
                    continue;
                }
                Ok(Ok(())) => {}
            }
            let reply = timeout_at(deadline, reply_rx).await;
            drop(registered);
            drop(permit);
            return match reply {
                Err(_) => Err(TransportError::Timeout),
                Ok(Err(_)) => Err(TransportError::Unreachable(format!(
                    "{addr}: connection dropped the call"
                ))),
                Ok(Ok(result)) => result,
            };
        }
    }
}

impl Drop for TcpTransport {
    fn drop(&mut self) {
        self.close();
    }
}

#[async_trait]
impl Transport for TcpTransport {
    async fn call(
        &self,
        peer: SocketAddr,
        req: Request,
        timeout: Duration,
    ) -> Result<Response, TransportError> {
        if self.closed.is_cancelled() {
            return Err(TransportError::Closed);
        }
        req.validate()
            .map_err(|e| TransportError::Protocol(format!("request not sent: {e}")))?;
        let deadline = Instant::now() + timeout;
        self.call_inner(peer, req, deadline).await
    }
}

/// A call's entry in its connection's pending map; removed when the call
/// ends however it ends (reply, timeout, or the caller dropping the call).
struct Registered<'a> {
    conn: &'a Conn,
    request_id: u64,
}

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        self.conn.unregister(self.request_id);
    }
}

/// The connection slots to one peer.
struct Peer {
    slots: Vec<Arc<Slot>>,
    next: AtomicUsize,
    /// Stops this peer's supervisors (child of the transport's token).
    closed: CancellationToken,
}

impl Peer {
    fn start(
        addr: SocketAddr,
        config: &TcpConfig,
        transport_closed: &CancellationToken,
    ) -> Arc<Peer> {
        let closed = transport_closed.child_token();
        let slots = (0..config.connections_per_peer)
            .map(|index| {
                let (state, _) = watch::channel(SlotState::Idle);
                let slot = Arc::new(Slot {
                    addr,
                    index,
                    state,
                    demand: Notify::new(),
                });
                let span = tracing::debug_span!("replication_conn", peer = %addr, slot = index);
                tokio::spawn(
                    supervise(Arc::clone(&slot), config.clone(), closed.clone()).instrument(span),
                );
                slot
            })
            .collect();
        Arc::new(Peer {
            slots,
            next: AtomicUsize::new(0),
            closed,
        })
    }

    /// Close every slot for good with `error`: calls in flight and calls
    /// still holding this peer get it.
    fn close(&self, error: TransportError) {
        for slot in &self.slots {
            let before = slot.publish(SlotState::Closed(error.clone()));
            if let SlotState::Up(conn) = before {
                conn.fail(error.clone());
            }
        }
        self.closed.cancel();
    }

    /// An up connection, round-robin, preferring one with a free in-flight
    /// slot; or wait (until `deadline`) for one slot to come up.
    async fn connection(&self, deadline: Instant) -> Result<Arc<Conn>, TransportError> {
        let n = self.slots.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed) % n;
        let now = Instant::now();
        let mut busy = None;
        let mut candidate = None;
        let mut backing_off = None;
        for i in 0..n {
            let slot = &self.slots[(start + i) % n];
            let state = slot.state.borrow().clone();
            match state {
                SlotState::Up(conn) if conn.alive() => {
                    if conn.inflight.available_permits() > 0 {
                        return Ok(conn);
                    }
                    busy.get_or_insert(conn);
                }
                SlotState::Closed(error) => return Err(error),
                SlotState::Down { error, retry_at } if retry_at > now => {
                    backing_off.get_or_insert(error);
                }
                state => {
                    slot.want(&state);
                    candidate.get_or_insert(slot);
                }
            }
        }
        if let Some(conn) = busy {
            return Ok(conn);
        }
        match (candidate, backing_off) {
            (Some(slot), _) => slot.wait_up(deadline).await,
            // Every slot failed its last attempt and is backing off: the
            // peer is unreachable now; say so at once.
            (None, Some(error)) => Err(TransportError::Unreachable(error)),
            (None, None) => Err(TransportError::Closed),
        }
    }
}

#[derive(Clone)]
enum SlotState {
    /// Never connected, or nobody wanted a connection since the last one.
    Idle,
    Connecting,
    Up(Arc<Conn>),
    /// The last attempt or connection failed; the next attempt is not
    /// before `retry_at`.
    Down {
        error: String,
        retry_at: Instant,
    },
    /// The peer was disconnected or the transport closed; final.
    Closed(TransportError),
}

struct Slot {
    addr: SocketAddr,
    index: usize,
    state: watch::Sender<SlotState>,
    /// Calls that want a connection wake the supervisor.
    demand: Notify,
}

impl Slot {
    /// Ask the supervisor to connect when the slot is idle or down.
    fn want(&self, state: &SlotState) {
        if matches!(state, SlotState::Idle | SlotState::Down { .. }) {
            self.demand.notify_one();
        }
    }

    /// Replace the state unless it is `Closed` (which is final); return
    /// the state before.
    fn publish(&self, state: SlotState) -> SlotState {
        let mut before = None;
        self.state.send_if_modified(|s| {
            if matches!(s, SlotState::Closed(_)) {
                return false;
            }
            before = Some(std::mem::replace(s, state));
            true
        });
        before.unwrap_or_else(|| SlotState::Closed(TransportError::Closed))
    }

    /// Wait for the slot's connection: through a connect attempt in
    /// progress or due, but not through a back-off: a slot whose last
    /// attempt failed answers `Unreachable` at once.
    async fn wait_up(&self, deadline: Instant) -> Result<Arc<Conn>, TransportError> {
        let mut rx = self.state.subscribe();
        loop {
            let state = rx.borrow_and_update().clone();
            match &state {
                SlotState::Up(conn) if conn.alive() => return Ok(Arc::clone(conn)),
                SlotState::Closed(error) => return Err(error.clone()),
                SlotState::Down { error, retry_at } if *retry_at > Instant::now() => {
                    return Err(TransportError::Unreachable(error.clone()));
                }
                _ => self.want(&state),
            }
            match timeout_at(deadline, rx.changed()).await {
                Err(_) => return Err(TransportError::Timeout),
                Ok(Err(_)) => return Err(TransportError::Closed),
                Ok(Ok(())) => {}
            }
        }
    }
}

/// Run one connection slot: connect when wanted, publish the state,
/// back off after failures. Ends when the peer or transport closes, with
/// the slot `Closed`.
async fn supervise(slot: Arc<Slot>, config: TcpConfig, closed: CancellationToken) {
    let addr = slot.addr;
    let mut backoff = config.reconnect_backoff_min;
    loop {
        tokio::select! {
            _ = closed.cancelled() => break,
            _ = slot.demand.notified() => {}
        }
        slot.publish(SlotState::Connecting);
        let connected = tokio::select! {
            _ = closed.cancelled() => break,
            c = timeout(config.connect_timeout, TcpStream::connect(addr)) => c,
        };
        let error = match connected {
            Ok(Ok(stream)) => {
                if let Err(e) = stream.set_nodelay(true) {
                    tracing::debug!(error = %e, "could not set TCP_NODELAY");
                }
                let conn = Conn::start(stream, addr, &config);
                tracing::debug!(conn = conn.serial, "connected");
                let since = Instant::now();
                slot.publish(SlotState::Up(Arc::clone(&conn)));
                let error = tokio::select! {
                    _ = closed.cancelled() => {
                        conn.fail(TransportError::Closed);
                        break;
                    }
                    _ = conn.dead.cancelled() => conn.failure(),
                };
                tracing::info!(conn = conn.serial, %error, "replication connection lost");
                if since.elapsed() >= config.reconnect_backoff_max {
                    // A connection that served well: reconnect at once
                    // (calls wait for that attempt) and reset the back-off.
                    backoff = config.reconnect_backoff_min;
                    slot.publish(SlotState::Down {
                        error,
                        retry_at: Instant::now(),
                    });
                    continue;
                }
                error
            }
            Ok(Err(e)) => format!("{addr}: connect failed: {e}"),
            Err(_) => format!(
                "{addr}: connect got no answer within {:?}",
                config.connect_timeout
            ),
        };
        tracing::debug!(%error, ?backoff, slot = slot.index, "slot down");
        let retry_at = Instant::now() + backoff;
        slot.publish(SlotState::Down { error, retry_at });
        backoff = (backoff * 2).min(config.reconnect_backoff_max);
        tokio::select! {
            _ = closed.cancelled() => break,
            _ = tokio::time::sleep_until(retry_at) => {}
        }
    }
    if let SlotState::Up(conn) = slot.publish(SlotState::Closed(TransportError::Closed)) {
        conn.fail(TransportError::Closed);
    }
}

/// A request on its way to the writer task.
struct Outgoing {
    request_id: u64,
    req: Request,
}

struct PendingCall {
    shape: ReplyShape,
    reply: oneshot::Sender<Result<Response, TransportError>>,
}

#[derive(Default)]
struct Pending {
    /// Set once, when the connection fails.
    failed: Option<TransportError>,
    calls: HashMap<u64, PendingCall>,
}

/// Serial numbers of client connections, for logs.
static CONN_SERIAL: AtomicU64 = AtomicU64::new(1);

/// One live client connection.
struct Conn {
    serial: u64,
    addr: SocketAddr,
    sender: mpsc::Sender<Outgoing>,
    pending: Mutex<Pending>,
    inflight: Arc<Semaphore>,
    next_id: AtomicU64,
    /// Cancelled when the connection fails; its tasks then end.
    dead: CancellationToken,
}

impl Conn {
    fn start(stream: TcpStream, addr: SocketAddr, config: &TcpConfig) -> Arc<Conn> {
        let (rd, wr) = stream.into_split();
        let (sender, receiver) = mpsc::channel(config.inflight_per_connection);
        let conn = Arc::new(Conn {
            serial: CONN_SERIAL.fetch_add(1, Ordering::Relaxed),
            addr,
            sender,
            pending: Mutex::new(Pending::default()),
            inflight: Arc::new(Semaphore::new(config.inflight_per_connection)),
            next_id: AtomicU64::new(1),
            dead: CancellationToken::new(),
        });
        tokio::spawn(
            client_writer(Arc::clone(&conn), wr, receiver, config.write_timeout).in_current_span(),
        );
        tokio::spawn(client_reader(Arc::clone(&conn), rd, config.frame_timeout).in_current_span());
        conn
    }

    fn alive(&self) -> bool {
        !self.dead.is_cancelled()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Record a call; false when the connection already failed.
    fn register(
        &self,
        request_id: u64,
        shape: ReplyShape,
        reply: oneshot::Sender<Result<Response, TransportError>>,
    ) -> bool {
        let mut p = self.lock();
        if p.failed.is_some() {
            return false;
        }
        p.calls.insert(request_id, PendingCall { shape, reply });
        true
    }

    fn unregister(&self, request_id: u64) {
        self.lock().calls.remove(&request_id);
    }

    fn is_pending(&self, request_id: u64) -> bool {
        self.lock().calls.contains_key(&request_id)
    }

    /// Hand a reply to its call.
    fn complete(&self, request_id: u64, resp: Response) {
        let Some(call) = self.lock().calls.remove(&request_id) else {
            tracing::debug!(
                conn = self.serial,
                request_id,
                "reply for no waiting call (timed out?)"
            );
            return;
        };
        let result = match call.shape.check(&resp) {
            Ok(()) => Ok(resp),
            Err(e) => {
                tracing::warn!(
                    conn = self.serial,
                    request_id,
                    "peer's reply does not fit the request: {e}"
                );
                Err(TransportError::Protocol(format!("{}: {e}", self.addr)))
            }
        };
        // The caller may have given up meanwhile; nothing to do then.
        let _ = call.reply.send(result);
    }

    /// Fail the connection: every call in flight gets `error` now, later
    /// registrations are refused. Idempotent; the first error wins.
    fn fail(&self, error: TransportError) {
        let calls = {
            let mut p = self.lock();
            if p.failed.is_some() {
                return;
            }
            p.failed = Some(error.clone());
            std::mem::take(&mut p.calls)
        };
        // Dead first: whoever sees the closed semaphore then sees it dead.
        self.dead.cancel();
        self.inflight.close();
        for (_, call) in calls {
            let _ = call.reply.send(Err(error.clone()));
        }
    }

    /// Why the connection failed, for the slot's state.
    fn failure(&self) -> String {
        match &self.lock().failed {
            Some(TransportError::Unreachable(e) | TransportError::Protocol(e)) => e.clone(),
            Some(other) => format!("{}: {other}", self.addr),
            None => format!("{}: connection closed", self.addr),
        }
    }
}

/// The transport error of a connection whose stream failed with `e`.
fn stream_error(addr: SocketAddr, e: &FrameError) -> TransportError {
    match e {
        FrameError::Io(_) | FrameError::Truncated { .. } | FrameError::Stalled(_) => {
            TransportError::Unreachable(format!("{addr}: {e}"))
        }
        _ => TransportError::Protocol(format!("{addr}: {e}")),
    }
}

async fn client_writer(
    conn: Arc<Conn>,
    wr: OwnedWriteHalf,
    mut receiver: mpsc::Receiver<Outgoing>,
    write_timeout: Duration,
) {
    let mut writer = FrameWriter::new(wr);
    let mut batch = Vec::with_capacity(WRITE_BATCH_MAX);
    loop {
        let n = tokio::select! {
            _ = conn.dead.cancelled() => return,
            n = receiver.recv_many(&mut batch, WRITE_BATCH_MAX) => n,
        };
        if n == 0 {
            return;
        }
        let written = tokio::select! {
            _ = conn.dead.cancelled() => return,
            r = write_batch(&conn, &mut writer, &mut batch, write_timeout) => r,
        };
        if let Err(error) = written {
            conn.fail(TransportError::Unreachable(format!(
                "{}: {error}",
                conn.addr
            )));
            return;
        }
    }
}

async fn write_batch(
    conn: &Conn,
    writer: &mut FrameWriter<OwnedWriteHalf>,
    batch: &mut Vec<Outgoing>,
    write_timeout: Duration,
) -> Result<(), String> {
    for out in batch.drain(..) {
        // A call that gave up (timeout, dropped) need not be sent.
        if !conn.is_pending(out.request_id) {
            continue;
        }
        timed_write(
            writer.write(out.request_id, MessageRef::Request(&out.req)),
            write_timeout,
        )
        .await?;
    }
    timed_write(writer.flush(), write_timeout).await
}

async fn timed_write(
    write: impl Future<Output = std::io::Result<()>>,
    write_timeout: Duration,
) -> Result<(), String> {
    match timeout(write_timeout, write).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(format!("write failed: {e}")),
        Err(_) => Err(format!("write stalled for {write_timeout:?}")),
    }
}

async fn client_reader(conn: Arc<Conn>, rd: OwnedReadHalf, frame_timeout: Duration) {
    let mut reader = FrameReader::new(rd);
    let error = loop {
        let frame = tokio::select! {
            _ = conn.dead.cancelled() => return,
            f = reader.read_frame(frame_timeout) => f,
        };
        match frame {
            Ok(None) => {
                break TransportError::Unreachable(format!(
                    "{}: connection closed by the peer",
                    conn.addr
                ));
            }
            Ok(Some(Frame {
                request_id,
                message: Message::Response(resp),
            })) => conn.complete(request_id, resp),
            Ok(Some(Frame {
                message: Message::Request(req),
                ..
            })) => {
                break TransportError::Protocol(format!(
                    "{}: peer sent a {} request on a client connection",
                    conn.addr,
                    req.name()
                ));
            }
            Err(e) => {
                let error = stream_error(conn.addr, &e);
                if matches!(error, TransportError::Protocol(_)) {
                    tracing::warn!(conn = conn.serial, error = %e, "corrupt reply stream; closing the connection");
                }
                break error;
            }
        }
    };
    conn.fail(error);
}

// ---------------------------------------------------------------- server

/// Serve replica requests on `listener` with `handler` and the default
/// [`ServerConfig`] until `shutdown` is cancelled (see the module doc).
pub async fn serve(
    listener: TcpListener,
    handler: Arc<dyn Handler>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    serve_with_config(listener, handler, shutdown, ServerConfig::default()).await
}

/// [`serve`] with explicit settings. Returns an error only for an invalid
/// configuration; accept failures are logged and retried.
pub async fn serve_with_config(
    listener: TcpListener,
    handler: Arc<dyn Handler>,
    shutdown: CancellationToken,
    config: ServerConfig,
) -> std::io::Result<()> {
    config
        .validate()
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let config = Arc::new(config);
    let slots = Arc::new(Semaphore::new(config.connections_max));
    let mut connections = JoinSet::new();
    tracing::info!(addr = ?listener.local_addr().ok(), "replication server listening");
    loop {
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            Some(done) = connections.join_next(), if !connections.is_empty() => log_join(done),
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
                        tracing::warn!(%peer, "refusing replication connection: connections_max reached");
                        continue;
                    };
                    let span = tracing::info_span!("replication_server", %peer);
                    let handler = Arc::clone(&handler);
                    let config = Arc::clone(&config);
                    let shutdown = shutdown.clone();
                    connections.spawn(
                        async move {
                            serve_connection(stream, peer, handler, shutdown, &config).await;
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
    // Each connection bounds its own drain by the grace and write timeout;
    // this is the backstop.
    let bound = config.shutdown_grace + config.write_timeout * 2;
    let drained = timeout(bound, async {
        while let Some(done) = connections.join_next().await {
            log_join(done);
        }
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            connections = connections.len(),
            "replication connections did not finish after shutdown; cutting them"
        );
        connections.shutdown().await;
    }
    tracing::info!("replication server stopped");
    Ok(())
}

fn log_join(done: Result<(), tokio::task::JoinError>) {
    if let Err(e) = done
        && e.is_panic()
    {
        tracing::error!(error = %e, "replication task panicked");
    }
}

async fn serve_connection(
    stream: TcpStream,
    peer: SocketAddr,
    handler: Arc<dyn Handler>,
    shutdown: CancellationToken,
    config: &ServerConfig,
) {
    tracing::debug!("replication connection accepted");
    if let Err(e) = stream.set_nodelay(true) {
        tracing::debug!(error = %e, "could not set TCP_NODELAY");
    }
    let (rd, wr) = stream.into_split();
    let (replies, reply_rx) = mpsc::channel(config.inflight_per_connection);
    let writer_failed = CancellationToken::new();
    tokio::join!(
        server_reader(
            rd,
            peer,
            handler,
            replies,
            &shutdown,
            &writer_failed,
            config
        ),
        server_writer(wr, reply_rx, &writer_failed, config.write_timeout),
    );
    tracing::debug!("replication connection closed");
}

async fn server_reader(
    rd: OwnedReadHalf,
    peer: SocketAddr,
    handler: Arc<dyn Handler>,
    replies: mpsc::Sender<(u64, Response)>,
    shutdown: &CancellationToken,
    writer_failed: &CancellationToken,
    config: &ServerConfig,
) {
    let mut reader = FrameReader::new(rd);
    let inflight = Arc::new(Semaphore::new(config.inflight_per_connection));
    let mut handlers = JoinSet::new();
    loop {
        while let Some(done) = handlers.try_join_next() {
            log_join(done);
        }
        let permit = tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            _ = writer_failed.cancelled() => break,
            p = Arc::clone(&inflight).acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let ready = tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            _ = writer_failed.cancelled() => break,
            r = reader.frame_ready() => r,
        };
        match ready {
            Ok(true) => {}
            Ok(false) => break,
            Err(e) => {
                tracing::debug!(error = %e, "replication connection read failed");
                break;
            }
        }
        let frame = tokio::select! {
            _ = writer_failed.cancelled() => break,
            f = reader.read_frame(config.frame_timeout) => f,
        };
        let (request_id, req) = match frame {
            Ok(None) => break,
            Ok(Some(Frame {
                request_id,
                message: Message::Request(req),
            })) => (request_id, req),
            Ok(Some(Frame {
                message: Message::Response(resp),
                ..
            })) => {
                tracing::warn!(
                    "peer sent a {} reply on a server connection; closing it",
                    resp.name()
                );
                break;
            }
            Err(FrameError::Io(e)) => {
                tracing::debug!(error = %e, "replication connection read failed");
                break;
            }
            Err(e) => {
                tracing::warn!(error = %e, "malformed replication frame; closing the connection");
                break;
            }
        };
        let handler = Arc::clone(&handler);
        let replies = replies.clone();
        handlers.spawn(
            async move {
                let resp = run_handler(&*handler, peer, req).await;
                // The writer is gone only when the connection failed.
                let _ = replies.send((request_id, resp)).await;
                drop(permit);
            }
            .in_current_span(),
        );
    }
    drop(replies);
    // Let running handlers finish and their replies go out; on shutdown (or
    // when it comes meanwhile) only for the grace period.
    let drain = async {
        while let Some(done) = handlers.join_next().await {
            log_join(done);
        }
    };
    let drained = tokio::select! {
        _ = drain => true,
        _ = async {
            shutdown.cancelled().await;
            tokio::time::sleep(config.shutdown_grace).await;
        } => false,
    };
    if !drained {
        tracing::warn!(
            handlers = handlers.len(),
            grace = ?config.shutdown_grace,
            "replication requests still running after the shutdown grace; cancelling them"
        );
        handlers.shutdown().await;
    }
}

async fn server_writer(
    wr: OwnedWriteHalf,
    mut replies: mpsc::Receiver<(u64, Response)>,
    writer_failed: &CancellationToken,
    write_timeout: Duration,
) {
    let mut writer = FrameWriter::new(wr);
    let mut batch = Vec::with_capacity(WRITE_BATCH_MAX);
    loop {
        if replies.recv_many(&mut batch, WRITE_BATCH_MAX).await == 0 {
            break;
        }
        let mut result = Ok(());
        for (request_id, resp) in batch.drain(..) {
            if result.is_ok() {
                result = timed_write(
                    writer.write(request_id, MessageRef::Response(&resp)),
                    write_timeout,
                )
                .await;
            }
        }
        if result.is_ok() {
            result = timed_write(writer.flush(), write_timeout).await;
        }
        if let Err(e) = result {
            tracing::info!(error = %e, "replication reply write failed; closing the connection");
            writer_failed.cancel();
            return;
        }
    }
    let _ = timeout(write_timeout, writer.shutdown()).await;
}
