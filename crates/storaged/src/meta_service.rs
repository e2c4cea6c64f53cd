//! The node's metadata service: the thread that owns this node's Raft
//! member ([`MetaNode`]) and the tasks that carry its messages to peers.
//!
//! Invariants:
//! - One thread owns the `MetaNode` (its redb commits block, so they stay
//!   off the runtime that serves I/O). Everything else talks to it through
//!   one bounded channel ([`MetaHandle`]) and reads the applied state from a
//!   `watch` ([`MetaView`]), never through a lock.
//! - Every wait has a deadline: a change 5 s, a linearizable read 3 s. A
//!   wait that runs out says whether the cluster has a leader and how many
//!   voters this node cannot hear.
//! - Messages to a peer go through one bounded queue and one sender task
//!   per peer, batched into one gRPC call; a full queue drops the message
//!   (Raft sends again), a failed call reports the peer unreachable.
//! - Only the leader marks nodes down or up and promotes learners; it does
//!   so by proposing commands, like any other change.

use crate::peer::raft_client;
use meta::node::{Membership, MetaNode, ProposalResult};
use meta::protobuf::Message as _;
use meta::raft::eraftpb::Message as RaftMessage;
use meta::state::{Command, NodeState, Op, PoolState, PromoteNode, Rejection, SetNodeState};
use s2d_proto::v1::RaftBatch;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot, watch};

/// One Raft tick; the election timeout is 10 to 20 ticks, a heartbeat 2.
pub const TICK: Duration = Duration::from_millis(100);
/// How long a metadata change may take to commit.
pub const CHANGE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a linearizable read may take.
pub const READ_TIMEOUT: Duration = Duration::from_secs(3);
/// A read not answered this soon is asked again.
const READ_RETRY: Duration = Duration::from_millis(500);
/// A voter not heard from for this long counts as unreachable.
const SILENT_AFTER: Duration = Duration::from_secs(3);
/// How often the leader checks liveness and the voter count.
const DUTY_EVERY: Duration = Duration::from_millis(500);
/// Requests waiting for the metadata thread.
const REQUEST_QUEUE: usize = 1024;
/// Messages waiting to be sent to one peer.
const PEER_QUEUE: usize = 1024;
/// Most messages in one batch to a peer.
const BATCH_MAX: usize = 256;
/// Deadline of one batch to a peer.
const SEND_TIMEOUT: Duration = Duration::from_secs(2);

/// Settings of this node's member.
#[derive(Clone, Debug)]
pub struct MetaSettings {
    pub id: u64,
    /// This node's gRPC address, sent with every batch.
    pub address: String,
    /// A node silent this long is marked down.
    pub down_after: Duration,
}

/// What this node knows of the cluster now.
#[derive(Debug)]
pub struct MetaView {
    pub this: u64,
    pub state: Arc<PoolState>,
    pub applied: u64,
    /// 0: no leader known.
    pub leader: u64,
    pub term: u64,
    pub voters: Vec<u64>,
    pub learners: Vec<u64>,
    /// Voters other than this node it cannot hear: for the leader, those
    /// silent for 3 s; without a leader, those not heard since the leader
    /// was lost (live voters answer this node's election requests); for a
    /// follower, the leader if it went silent.
    pub silent_voters: Vec<u64>,
}

impl MetaView {
    fn quorum_lost(&self) -> bool {
        let reachable = self.voters.len() - self.silent_voters.len();
        self.leader == 0 || reachable < self.voters.len() / 2 + 1
    }
}

/// Why a metadata request failed.
#[derive(Debug, thiserror::Error)]
pub enum MetaError {
    #[error("cluster has no leader: {silent} of {voters} voters unreachable")]
    NoLeader { silent: usize, voters: usize },
    #[error(
        "metadata request not answered within {0:?}; the cluster may be electing a leader, retry"
    )]
    Timeout(Duration),
    #[error(transparent)]
    Rejected(#[from] Rejection),
    #[error("the metadata service stopped")]
    Stopped,
    #[error("metadata: {0}")]
    Meta(meta::Error),
}

enum Request {
    Propose(Command, oneshot::Sender<ProposalResult>),
    Membership(Membership, oneshot::Sender<ProposalResult>),
    ReadIndex(oneshot::Sender<meta::Result<u64>>),
    Receive {
        from: u64,
        address: String,
        messages: Vec<RaftMessage>,
    },
    TransferLeader(u64),
}

/// The way to the metadata thread; cheap to clone.
#[derive(Clone)]
pub struct MetaHandle {
    tx: mpsc::Sender<Request>,
    view: watch::Receiver<Arc<MetaView>>,
}

impl MetaHandle {
    /// The local view, without asking the leader (may lag it).
    pub fn view(&self) -> Arc<MetaView> {
        self.view.borrow().clone()
    }

    pub fn subscribe(&self) -> watch::Receiver<Arc<MetaView>> {
        self.view.clone()
    }

    /// The error for a request that found no quorum or ran out of time.
    fn stuck(&self, waited: Duration) -> MetaError {
        let v = self.view();
        if v.quorum_lost() {
            MetaError::NoLeader {
                silent: v.silent_voters.len(),
                voters: v.voters.len(),
            }
        } else {
            MetaError::Timeout(waited)
        }
    }

    async fn call<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<T>) -> Request,
        within: Duration,
    ) -> Result<T, MetaError> {
        let deadline = tokio::time::Instant::now() + within;
        let (tx, rx) = oneshot::channel();
        match tokio::time::timeout_at(deadline, self.tx.send(make(tx))).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => return Err(MetaError::Stopped),
            Err(_) => return Err(self.stuck(within)),
        }
        match tokio::time::timeout_at(deadline, rx).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(_)) => Err(MetaError::Stopped),
            Err(_) => Err(self.stuck(within)),
        }
    }

    fn applied(&self, r: ProposalResult) -> Result<u64, MetaError> {
        match r {
            Ok(a) => {
                a.result?;
                Ok(a.index)
            }
            Err(meta::Error::Raft(_)) => Err(self.stuck(CHANGE_TIMEOUT)),
            Err(e) => Err(MetaError::Meta(e)),
        }
    }

    /// Commits `op` and waits until this node has applied it; returns the
    /// view that includes it.
    pub async fn propose(&self, op: Op) -> Result<Arc<MetaView>, MetaError> {
        let r = self
            .call(|tx| Request::Propose(Command::new(op), tx), CHANGE_TIMEOUT)
            .await?;
        let index = self.applied(r)?;
        self.wait_applied(index).await
    }

    /// Commits a membership change, like [`MetaHandle::propose`].
    pub async fn change(&self, m: Membership) -> Result<Arc<MetaView>, MetaError> {
        let r = self
            .call(|tx| Request::Membership(m, tx), CHANGE_TIMEOUT)
            .await?;
        let index = self.applied(r)?;
        self.wait_applied(index).await
    }

    /// A linearizable read: a view that reflects every change committed
    /// before the call.
    pub async fn read(&self) -> Result<Arc<MetaView>, MetaError> {
        // Raft drops a read it cannot serve yet (no leader known, or a new
        // leader that has not committed in its term): ask again until the
        // deadline.
        let deadline = tokio::time::Instant::now() + READ_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.call(Request::ReadIndex, left.min(READ_RETRY)).await {
                Ok(Ok(index)) => return self.wait_applied(index).await,
                Err(MetaError::Stopped) => return Err(MetaError::Stopped),
                Ok(Err(_)) | Err(_) if left > READ_RETRY => {}
                Ok(Err(_)) | Err(_) => return Err(self.stuck(READ_TIMEOUT)),
            }
        }
    }

    /// Waits until this node has applied `index`.
    pub async fn wait_applied(&self, index: u64) -> Result<Arc<MetaView>, MetaError> {
        let mut rx = self.view.clone();
        match tokio::time::timeout(READ_TIMEOUT, rx.wait_for(|v| v.applied >= index)).await {
            Ok(Ok(v)) => Ok(v.clone()),
            Ok(Err(_)) => Err(MetaError::Stopped),
            Err(_) => Err(self.stuck(READ_TIMEOUT)),
        }
    }

    /// Hands messages received from a peer to the metadata thread.
    pub async fn receive(
        &self,
        from: u64,
        address: String,
        messages: Vec<RaftMessage>,
    ) -> Result<(), MetaError> {
        let req = Request::Receive {
            from,
            address,
            messages,
        };
        match tokio::time::timeout(SEND_TIMEOUT, self.tx.send(req)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(MetaError::Stopped),
            Err(_) => Err(MetaError::Timeout(SEND_TIMEOUT)),
        }
    }

    /// Asks the leader to hand leadership to `to`.
    pub async fn transfer_leader(&self, to: u64) -> Result<(), MetaError> {
        match tokio::time::timeout(SEND_TIMEOUT, self.tx.send(Request::TransferLeader(to))).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(MetaError::Stopped),
            Err(_) => Err(MetaError::Timeout(SEND_TIMEOUT)),
        }
    }
}

/// Starts the metadata thread for `node`. Committed entries in the node's
/// own log are applied before this returns, so the first view already has
/// every change this node had applied before a restart.
/// `peers` seeds the addresses of other members (from a join).
pub fn start(
    mut node: MetaNode,
    settings: MetaSettings,
    peers: HashMap<u64, String>,
) -> anyhow::Result<MetaHandle> {
    node.on_ready()?;
    if node.members().0 == [settings.id] {
        // The only voter: lead at once rather than after an election timeout.
        node.campaign()?;
        node.on_ready()?;
    }
    let (tx, rx) = mpsc::channel(REQUEST_QUEUE);
    let (unreachable_tx, unreachable_rx) = mpsc::channel(PEER_QUEUE);
    let mut driver = Driver {
        node,
        settings,
        view_tx: None,
        peers: HashMap::new(),
        addresses: peers,
        last_seen: HashMap::new(),
        leader_since: None,
        leaderless_since: None,
        pending_state: HashMap::new(),
        pending_membership: None,
        unreachable_tx,
        state: Arc::new(PoolState::default()),
        state_applied: u64::MAX,
        published: None,
    };
    let view = driver.view();
    let (view_tx, view_rx) = watch::channel(Arc::new(view));
    driver.view_tx = Some(view_tx);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    std::thread::Builder::new()
        .name("meta".into())
        .spawn(move || rt.block_on(driver.run(rx, unreachable_rx)))?;
    Ok(MetaHandle { tx, view: view_rx })
}

struct Peer {
    address: String,
    tx: mpsc::Sender<RaftMessage>,
}

struct Driver {
    node: MetaNode,
    settings: MetaSettings,
    view_tx: Option<watch::Sender<Arc<MetaView>>>,
    peers: HashMap<u64, Peer>,
    /// Addresses learnt from joins and from received batches; the state's
    /// node table wins when it has the node.
    addresses: HashMap<u64, String>,
    last_seen: HashMap<u64, Instant>,
    leader_since: Option<Instant>,
    /// Since when this node knows of no leader.
    leaderless_since: Option<Instant>,
    /// Node-state proposals in flight (when, and the state asked for), so
    /// a slow commit is not proposed twice.
    pending_state: HashMap<u64, (Instant, i32)>,
    pending_membership: Option<Instant>,
    unreachable_tx: mpsc::Sender<u64>,
    /// The published state and the applied index it is at.
    state: Arc<PoolState>,
    state_applied: u64,
    published: Option<Published>,
}

/// What a published view was made of: applied index, leader, term, voters,
/// silent voters.
type Published = (u64, u64, u64, Vec<u64>, Vec<u64>);

impl Driver {
    async fn run(mut self, mut rx: mpsc::Receiver<Request>, mut unreachable: mpsc::Receiver<u64>) {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut duty = tokio::time::interval(DUTY_EVERY);
        duty.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => self.node.tick(),
                _ = duty.tick() => self.duties(),
                Some(peer) = unreachable.recv() => self.node.report_unreachable(peer),
                req = rx.recv() => {
                    let Some(req) = req else { break };
                    self.handle(req);
                    for _ in 0..BATCH_MAX {
                        match rx.try_recv() {
                            Ok(req) => self.handle(req),
                            Err(_) => break,
                        }
                    }
                }
            }
            if let Err(e) = self.node.on_ready() {
                // The node can no longer keep its Raft promises (its log
                // store failed); going on would risk the cluster's
                // metadata. Stop the process, loudly.
                tracing::error!(error = %e, "metadata store failed; stopping storaged");
                std::process::exit(70);
            }
            self.send_messages();
            self.publish();
        }
    }

    fn handle(&mut self, req: Request) {
        match req {
            Request::Propose(cmd, reply) => {
                let rx = self.node.propose(&cmd);
                forward(rx, reply);
            }
            Request::Membership(m, reply) => {
                let rx = self.node.propose_membership(m);
                forward(rx, reply);
            }
            Request::ReadIndex(reply) => {
                let rx = self.node.read_index();
                tokio::spawn(async move {
                    if let Ok(r) = rx.await {
                        let _ = reply.send(r);
                    }
                });
            }
            Request::Receive {
                from,
                address,
                messages,
            } => {
                self.last_seen.insert(from, Instant::now());
                if !address.is_empty() {
                    self.addresses.insert(from, address);
                }
                for m in messages {
                    if m.to != self.settings.id {
                        tracing::debug!(to = m.to, "dropping a Raft message for another node");
                        continue;
                    }
                    if let Err(e) = self.node.step(m) {
                        tracing::debug!(from, error = %e, "Raft refused a message");
                    }
                }
            }
            // A follower forwards the request to the leader.
            Request::TransferLeader(to) => self.node.transfer_leader(to),
        }
    }

    fn address_of(&self, id: u64) -> Option<String> {
        self.node
            .state()
            .nodes
            .get(&id)
            .map(|n| n.address.clone())
            .or_else(|| self.addresses.get(&id).cloned())
    }

    fn send_messages(&mut self) {
        for m in self.node.take_messages() {
            let to = m.to;
            let Some(address) = self.address_of(to) else {
                self.node.report_unreachable(to);
                continue;
            };
            let stale = self.peers.get(&to).is_none_or(|p| p.address != address);
            if stale {
                let (tx, rx) = mpsc::channel(PEER_QUEUE);
                tokio::spawn(peer_sender(
                    to,
                    address.clone(),
                    self.settings.id,
                    self.settings.address.clone(),
                    rx,
                    self.unreachable_tx.clone(),
                ));
                self.peers.insert(to, Peer { address, tx });
            }
            if let Some(p) = self.peers.get(&to)
                && p.tx.try_send(m).is_err()
            {
                tracing::debug!(to, "peer queue full; Raft will resend");
            }
        }
    }

    fn silent_voters(&self) -> Vec<u64> {
        let now = Instant::now();
        let (voters, _) = self.node.members();
        let leader = self.node.leader_id();
        let quiet_since =
            |v: &u64, since: Instant| self.last_seen.get(v).is_none_or(|t| *t < since);
        voters
            .into_iter()
            .filter(|v| *v != self.settings.id)
            .filter(|v| match self.leaderless_since {
                Some(since) => quiet_since(v, since),
                None if self.node.is_leader() => {
                    quiet_since(v, now.checked_sub(SILENT_AFTER).unwrap_or(now))
                }
                None => {
                    *v == leader && quiet_since(v, now.checked_sub(SILENT_AFTER).unwrap_or(now))
                }
            })
            .collect()
    }

    fn view(&mut self) -> MetaView {
        if self.state_applied != self.node.applied() {
            self.state = Arc::new(self.node.state().clone());
            self.state_applied = self.node.applied();
        }
        let (voters, learners) = self.node.members();
        MetaView {
            this: self.settings.id,
            state: self.state.clone(),
            applied: self.node.applied(),
            leader: self.node.leader_id(),
            term: self.node.term(),
            voters,
            learners,
            silent_voters: self.silent_voters(),
        }
    }

    /// Publishes the view when anything in it changed.
    fn publish(&mut self) {
        match (self.node.leader_id(), self.leaderless_since) {
            (0, None) => self.leaderless_since = Some(Instant::now()),
            (0, Some(_)) => {}
            (_, _) => self.leaderless_since = None,
        }
        let (voters, _) = self.node.members();
        let key = (
            self.node.applied(),
            self.node.leader_id(),
            self.node.term(),
            voters,
            self.silent_voters(),
        );
        if self.published.as_ref() == Some(&key) {
            return;
        }
        self.published = Some(key);
        let view = Arc::new(self.view());
        if let Some(tx) = &self.view_tx {
            tx.send_replace(view);
        }
    }

    /// The leader's periodic work: mark silent nodes down and returning
    /// ones up, and keep the number of voters at what the rule says.
    fn duties(&mut self) {
        self.publish();
        if !self.node.is_leader() {
            self.leader_since = None;
            return;
        }
        let now = Instant::now();
        let since = *self.leader_since.get_or_insert(now);
        let state = self.node.state();
        // A proposal is done once applied (or given up after a while).
        self.pending_state.retain(|id, (t, want)| {
            now.duration_since(*t) < CHANGE_TIMEOUT
                && state.nodes.get(id).is_some_and(|n| n.state != *want)
        });
        let mut proposals = Vec::new();
        for n in state.nodes.values() {
            if n.id == self.settings.id || self.pending_state.contains_key(&n.id) {
                continue;
            }
            let seen = self.last_seen.get(&n.id).copied();
            let quiet = now.duration_since(seen.map_or(since, |s| s.max(since)));
            let heard_lately = seen.is_some_and(|s| now.duration_since(s) < DUTY_EVERY * 2);
            let to = if n.state == NodeState::Up as i32 && quiet > self.settings.down_after {
                tracing::warn!(node = %n.name, silent = ?quiet, "marking node down");
                NodeState::Down
            } else if n.state == NodeState::Down as i32 && heard_lately {
                tracing::info!(node = %n.name, "node is back; marking it up");
                NodeState::Up
            } else {
                continue;
            };
            proposals.push((
                n.id,
                to as i32,
                Command::new(Op::SetNodeState(SetNodeState {
                    node: n.id,
                    state: to as i32,
                    at_ms: unix_ms(),
                })),
            ));
        }
        let promote = self.learner_to_promote(now);
        for (id, want, cmd) in proposals {
            self.pending_state.insert(id, (now, want));
            // The outcome shows in the state; nobody waits for the reply.
            drop(self.node.propose(&cmd));
        }
        if let Some(id) = promote {
            tracing::info!(node = id, "promoting a learner to voter");
            self.pending_membership = Some(now);
            drop(
                self.node
                    .propose_membership(Membership::Promote(Command::new(Op::PromoteNode(
                        PromoteNode { node: id },
                    )))),
            );
        }
    }

    /// A learner to make a voter, if the cluster has fewer voters than
    /// the rule wants (3, or 5 from 5 nodes on).
    fn learner_to_promote(&self, now: Instant) -> Option<u64> {
        if self
            .pending_membership
            .is_some_and(|t| now.duration_since(t) < CHANGE_TIMEOUT)
        {
            return None;
        }
        let state = self.node.state();
        let live: Vec<_> = state
            .nodes
            .values()
            .filter(|n| n.state != NodeState::Retired as i32)
            .collect();
        let voters = live.iter().filter(|n| n.voter).count();
        if voters >= wanted_voters(live.len()) {
            return None;
        }
        live.iter()
            .filter(|n| !n.voter && n.state == NodeState::Up as i32)
            .filter(|n| {
                self.last_seen
                    .get(&n.id)
                    .is_some_and(|t| now.duration_since(*t) < SILENT_AFTER)
            })
            .map(|n| n.id)
            .min()
    }
}

/// The wall clock, in ms since the Unix epoch.
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// How many voters a cluster of `nodes` live nodes should have.
pub fn wanted_voters(nodes: usize) -> usize {
    if nodes >= 5 { 5 } else { nodes.min(3) }
}

fn forward(rx: oneshot::Receiver<ProposalResult>, reply: oneshot::Sender<ProposalResult>) {
    tokio::spawn(async move {
        if let Ok(r) = rx.await {
            let _ = reply.send(r);
        }
    });
}

/// Sends the messages queued for one peer, batched, until the queue closes.
async fn peer_sender(
    to: u64,
    address: String,
    from: u64,
    from_address: String,
    mut rx: mpsc::Receiver<RaftMessage>,
    unreachable: mpsc::Sender<u64>,
) {
    let mut client = match raft_client(&address, SEND_TIMEOUT) {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(peer = to, %address, error = %e, "bad peer address");
            return;
        }
    };
    let mut failing = false;
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        while batch.len() < BATCH_MAX {
            match rx.try_recv() {
                Ok(m) => batch.push(m),
                Err(_) => break,
            }
        }
        let messages = batch
            .iter()
            .filter_map(|m| m.write_to_bytes().ok())
            .collect();
        let req = RaftBatch {
            from_id: from,
            from_address: from_address.clone(),
            messages,
        };
        match tokio::time::timeout(SEND_TIMEOUT, client.raft(req)).await {
            Ok(Ok(_)) => {
                if failing {
                    tracing::info!(peer = to, %address, "peer reachable again");
                }
                failing = false;
            }
            Ok(Err(e)) => {
                if !failing {
                    tracing::info!(peer = to, %address, error = %e.message(), "peer unreachable");
                }
                failing = true;
                let _ = unreachable.try_send(to);
                tokio::time::sleep(TICK).await;
            }
            Err(_) => {
                if !failing {
                    tracing::info!(peer = to, %address, "peer did not answer in time");
                }
                failing = true;
                let _ = unreachable.try_send(to);
            }
        }
    }
}
