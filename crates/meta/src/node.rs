//! The Raft node driver: raft-rs's `RawNode` over [`RedbStorage`], applying
//! committed entries to a [`PoolState`].
//!
//! The driver is synchronous and transport-agnostic: the owner calls
//! [`MetaNode::tick`] on a timer, feeds received messages to
//! [`MetaNode::step`], calls [`MetaNode::on_ready`] after either, and sends
//! what [`MetaNode::take_messages`] returns. storaged will own it from one
//! task; the tests drive it from an in-memory router.
//!
//! Invariants:
//! - `on_ready` follows raft-rs's documented order (see the steps in it);
//!   messages that require durable state (`persisted_messages`) leave only
//!   after the redb commit of that state.
//! - The state machine is persisted only as snapshots. On open, the node
//!   loads the latest snapshot and raft-rs replays the committed entries
//!   after it, so `state` is always "snapshot + applied log".
//! - A proposal's reply fires exactly once, when its entry is applied on the
//!   proposing node, or at once if raft-rs refused it. A proposal whose entry
//!   is overwritten by a new leader gets no reply: callers use a timeout.

use std::collections::BTreeMap;
use std::path::Path;

use prost::Message as _;
use protobuf::Message as _;
use raft::StateRole;
use raft::eraftpb::{ConfChange, ConfChangeType, ConfChangeV2, Entry, EntryType, Message};
use raft::{Config, RawNode};
use tokio::sync::oneshot;

use crate::error::{Error, Result};
use crate::state::{ApplyResult, Command, Op, PoolState, Rejection};
use crate::storage::RedbStorage;

/// Tuning of one node.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    /// Raft id of this node; non-zero.
    pub id: u64,
    /// Ticks without a leader before campaigning.
    pub election_tick: usize,
    /// Ticks between leader heartbeats.
    pub heartbeat_tick: usize,
    /// Take a snapshot and compact the log after this many applied entries.
    pub snapshot_every: u64,
}

impl NodeConfig {
    /// Defaults for node `id`.
    pub fn new(id: u64) -> Self {
        NodeConfig {
            id,
            election_tick: 10,
            heartbeat_tick: 2,
            snapshot_every: 1000,
        }
    }
}

/// The outcome of a proposal: `Err` if it never reached the log, otherwise
/// the state machine's verdict and the log index it was applied at.
pub type ProposalResult = Result<Applied>;

/// A proposal that reached the log and was applied on this node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Applied {
    /// Log index of the entry; [`MetaNode::applied`] is at least this now.
    pub index: u64,
    /// The state machine's verdict.
    pub result: ApplyResult,
}

/// A membership change: the Raft configuration change and the state command
/// that records it, applied together or not at all.
#[derive(Clone, Debug)]
pub enum Membership {
    /// Add a node as a voter ([`crate::state::Op::AddNode`] with `voter`).
    AddVoter(Command),
    /// Add a node as a learner.
    AddLearner(Command),
    /// Make a learner a voter ([`crate::state::Op::PromoteNode`]).
    Promote(Command),
    /// Remove a node ([`crate::state::Op::RetireNode`]).
    Remove(Command),
}

/// One member of the metadata Raft group.
pub struct MetaNode {
    id: u64,
    raw: RawNode<RedbStorage>,
    state: PoolState,
    applied: u64,
    snapshot_every: u64,
    next_request: u64,
    proposals: BTreeMap<u64, oneshot::Sender<ProposalResult>>,
    reads: BTreeMap<u64, oneshot::Sender<Result<u64>>>,
    /// ReadIndex answers waiting for `applied` to reach their index: (index, request id).
    ready_reads: Vec<(u64, u64)>,
    outbox: Vec<Message>,
    /// Set when the Raft configuration changed: the next snapshot must be
    /// taken now, because raft-rs refuses a snapshot whose configuration
    /// does not contain the receiving node (a node that just joined).
    conf_changed: bool,
}

/// Request context carried in an entry or ReadIndex: proposing node + request id.
fn context(node: u64, request: u64) -> Vec<u8> {
    let mut c = Vec::with_capacity(16);
    c.extend_from_slice(&node.to_be_bytes());
    c.extend_from_slice(&request.to_be_bytes());
    c
}

/// The node a membership command is about.
fn membership_target(cmd: &Command) -> Option<u64> {
    match &cmd.op {
        Some(Op::AddNode(c)) => Some(c.id),
        Some(Op::PromoteNode(c)) => Some(c.node),
        Some(Op::RetireNode(c)) => Some(c.node),
        _ => None,
    }
}

fn parse_context(c: &[u8]) -> Option<(u64, u64)> {
    let node = u64::from_be_bytes(c.get(0..8)?.try_into().ok()?);
    let request = u64::from_be_bytes(c.get(8..16)?.try_into().ok()?);
    Some((node, request))
}

impl MetaNode {
    /// Opens the node's store at `path`. A store without a Raft configuration
    /// is bootstrapped with `voters` (all nodes of a new cluster pass the same
    /// list); an existing one restarts from its snapshot and log.
    pub fn open(cfg: &NodeConfig, path: impl AsRef<Path>, voters: &[u64]) -> Result<Self> {
        Self::open_with(cfg, path, voters, &PoolState::default())
    }

    /// Like [`MetaNode::open`], with the state a new cluster starts from.
    /// With no `voters`, a new store is left empty: the node waits for a
    /// leader to send it a snapshot (a node joining a running cluster).
    pub fn open_with(
        cfg: &NodeConfig,
        path: impl AsRef<Path>,
        voters: &[u64],
        initial: &PoolState,
    ) -> Result<Self> {
        let mut store = RedbStorage::open(path)?;
        if !store.is_initialised() && !voters.is_empty() {
            store.bootstrap(voters, initial.encode_to_vec())?;
        }
        let state = PoolState::decode_from(&store.latest_snapshot().data)?;
        let applied = store.snapshot_metadata().index;
        let raft_cfg = Config {
            id: cfg.id,
            election_tick: cfg.election_tick,
            heartbeat_tick: cfg.heartbeat_tick,
            applied,
            max_size_per_msg: 1 << 20,
            max_inflight_msgs: 256,
            pre_vote: true,
            check_quorum: true,
            ..Default::default()
        };
        let logger = slog::Logger::root(slog::Discard, slog::o!());
        let raw = RawNode::new(&raft_cfg, store, &logger)?;
        Ok(MetaNode {
            id: cfg.id,
            raw,
            state,
            applied,
            snapshot_every: cfg.snapshot_every.max(1),
            // Request ids must not repeat across restarts: an entry proposed
            // before a restart may still be applied after it.
            next_request: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64),
            proposals: BTreeMap::new(),
            reads: BTreeMap::new(),
            ready_reads: Vec::new(),
            outbox: Vec::new(),
            conf_changed: false,
        })
    }

    /// This node's Raft id.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Whether this node is the leader now.
    pub fn is_leader(&self) -> bool {
        self.raw.raft.state == StateRole::Leader
    }

    /// The leader this node knows of (0: none).
    pub fn leader_id(&self) -> u64 {
        self.raw.raft.leader_id
    }

    /// The voters and learners of the current Raft configuration.
    pub fn members(&self) -> (Vec<u64>, Vec<u64>) {
        let cs = self.raw.raft.prs().conf().to_conf_state();
        (cs.voters, cs.learners)
    }

    /// The highest log index known committed.
    pub fn commit_index(&self) -> u64 {
        self.raw.raft.raft_log.committed
    }

    /// Asks the leader (this node) to hand leadership to `to`.
    pub fn transfer_leader(&mut self, to: u64) {
        self.raw.transfer_leader(to);
    }

    /// The current Raft term.
    pub fn term(&self) -> u64 {
        self.raw.raft.term
    }

    /// The applied state (may lag the leader; use [`MetaNode::read_index`] for linearizable reads).
    pub fn state(&self) -> &PoolState {
        &self.state
    }

    /// Index of the last applied entry.
    pub fn applied(&self) -> u64 {
        self.applied
    }

    /// The log store (for inspection: snapshot index, hard state).
    pub fn store(&self) -> &RedbStorage {
        self.raw.store()
    }

    /// Advances the logical clock by one tick.
    pub fn tick(&mut self) {
        self.raw.tick();
    }

    /// Starts an election now (used to bootstrap tests and leader transfer).
    pub fn campaign(&mut self) -> Result<()> {
        Ok(self.raw.campaign()?)
    }

    /// Feeds one message received from a peer.
    pub fn step(&mut self, msg: Message) -> Result<()> {
        Ok(self.raw.step(msg)?)
    }

    /// Proposes a command. The receiver yields the state machine's verdict
    /// once the entry is applied on this node (a follower forwards it to the
    /// leader), or an error at once if Raft refused it (e.g. no leader known).
    pub fn propose(&mut self, cmd: &Command) -> oneshot::Receiver<ProposalResult> {
        let (tx, rx) = oneshot::channel();
        let request = self.next_request;
        self.next_request += 1;
        match self
            .raw
            .propose(context(self.id, request), cmd.encode_to_vec())
        {
            Ok(()) => {
                self.proposals.insert(request, tx);
            }
            Err(e) => {
                // The caller may have dropped the receiver; nothing to do then.
                let _ = tx.send(Err(e.into()));
            }
        }
        rx
    }

    /// Proposes a membership change. The reply fires like [`MetaNode::propose`]'s;
    /// the Raft configuration changes only if the state command is accepted.
    pub fn propose_membership(&mut self, change: Membership) -> oneshot::Receiver<ProposalResult> {
        let (kind, cmd) = match &change {
            Membership::AddVoter(c) => (ConfChangeType::AddNode, c),
            Membership::AddLearner(c) => (ConfChangeType::AddLearnerNode, c),
            Membership::Promote(c) => (ConfChangeType::AddNode, c),
            Membership::Remove(c) => (ConfChangeType::RemoveNode, c),
        };
        let (tx, rx) = oneshot::channel();
        let Some(node_id) = membership_target(cmd) else {
            let _ = tx.send(Ok(Applied {
                index: 0,
                result: Err(Rejection::Malformed(
                    "membership change without a node command".into(),
                )),
            }));
            return rx;
        };
        let mut cc = ConfChange::default();
        cc.set_change_type(kind);
        cc.node_id = node_id;
        cc.context = cmd.encode_to_vec().into();
        let request = self.next_request;
        self.next_request += 1;
        match self.raw.propose_conf_change(context(self.id, request), cc) {
            Ok(()) => {
                self.proposals.insert(request, tx);
            }
            Err(e) => {
                let _ = tx.send(Err(e.into()));
            }
        }
        rx
    }

    /// Asks for a linearizable read: the receiver yields an applied index at
    /// which [`MetaNode::state`] reflects every write committed before the
    /// call, once this node has applied that far.
    pub fn read_index(&mut self) -> oneshot::Receiver<Result<u64>> {
        let (tx, rx) = oneshot::channel();
        let request = self.next_request;
        self.next_request += 1;
        self.reads.insert(request, tx);
        self.raw.read_index(context(self.id, request));
        rx
    }

    /// Messages to send to peers (each carries its destination in `to`).
    pub fn take_messages(&mut self) -> Vec<Message> {
        std::mem::take(&mut self.outbox)
    }

    /// Tells Raft a peer could not be reached (e.g. the transport failed).
    pub fn report_unreachable(&mut self, peer: u64) {
        self.raw.report_unreachable(peer);
    }

    /// Processes everything raft-rs has ready, in raft-rs's documented order.
    pub fn on_ready(&mut self) -> Result<()> {
        if !self.raw.has_ready() {
            return Ok(());
        }
        let mut rd = self.raw.ready();

        // Step 1: messages to peers that need no durable state (a leader's
        // appends can go out before its own write) leave at once.
        self.outbox.extend(rd.take_messages());
        // ReadIndex answers: serve once applied reaches their index.
        for rs in rd.take_read_states() {
            if let Some((node, request)) = parse_context(&rs.request_ctx)
                && node == self.id
            {
                self.ready_reads.push((rs.index, request));
            }
        }

        // Step 2: a snapshot from the leader replaces the state machine; it
        // is persisted below, with the entries, in one transaction.
        let snapshot = if rd.snapshot().is_empty() {
            None
        } else {
            let snap = rd.snapshot().clone();
            self.state = PoolState::decode_from(&snap.data)?;
            self.applied = snap.get_metadata().index;
            Some(snap)
        };

        // Step 3: apply committed entries to the state machine.
        let committed = rd.take_committed_entries();
        self.apply_entries(committed)?;

        // Step 4: append new log entries, and step 5: persist the hard state
        // (term, vote, commit); together with the snapshot of step 2 this is
        // one durable redb commit.
        let hs = rd.hs().cloned();
        let entries = rd.take_entries();
        self.raw
            .mut_store()
            .persist(&entries, hs.as_ref(), snapshot.as_ref())?;

        // Step 6: messages that depend on the state just persisted (votes,
        // follower append responses) may leave only now.
        self.outbox.extend(rd.take_persisted_messages());

        // Step 7: tell raft-rs this Ready is handled; it returns a LightReady.
        let mut light = self.raw.advance(rd);

        // Step 8: the LightReady: a new commit index (persist it so a restart
        // replays up to it), more messages, more committed entries.
        if let Some(commit) = light.commit_index() {
            let mut hs = self.raw.store().hard_state().clone();
            hs.commit = commit;
            self.raw.mut_store().persist(&[], Some(&hs), None)?;
        }
        self.outbox.extend(light.take_messages());
        self.apply_entries(light.take_committed_entries())?;

        // Step 9: everything committed so far is applied.
        self.raw.advance_apply();

        self.serve_reads();
        self.maybe_compact()
    }

    fn apply_entries(&mut self, entries: Vec<Entry>) -> Result<()> {
        for e in entries {
            match e.get_entry_type() {
                EntryType::EntryNormal => {
                    // A new leader's empty entry carries no command.
                    if !e.data.is_empty() {
                        let result = match Command::decode_from(&e.data) {
                            Ok(cmd) => self.state.apply(&cmd),
                            Err(err) => Err(Rejection::Malformed(err.to_string())),
                        };
                        self.reply(&e.context, e.index, result);
                    }
                }
                EntryType::EntryConfChange => {
                    let cc = ConfChange::parse_from_bytes(&e.data)
                        .map_err(Error::raft_codec("conf change"))?;
                    // A change that records itself in the state applies to
                    // Raft only if the state accepts it, so both always agree.
                    let result = if cc.context.is_empty() {
                        Ok(())
                    } else {
                        match Command::decode_from(&cc.context) {
                            Ok(cmd) if membership_target(&cmd) == Some(cc.node_id) => {
                                self.state.apply(&cmd)
                            }
                            Ok(_) => Err(Rejection::Malformed(
                                "membership command names another node".into(),
                            )),
                            Err(err) => Err(Rejection::Malformed(err.to_string())),
                        }
                    };
                    if result.is_ok() {
                        let cs = self.raw.apply_conf_change(&cc)?;
                        self.raw.mut_store().set_conf_state(cs)?;
                        self.conf_changed = true;
                    }
                    self.reply(&e.context, e.index, result);
                }
                EntryType::EntryConfChangeV2 => {
                    let cc = ConfChangeV2::parse_from_bytes(&e.data)
                        .map_err(Error::raft_codec("conf change v2"))?;
                    let cs = self.raw.apply_conf_change(&cc)?;
                    self.raw.mut_store().set_conf_state(cs)?;
                    self.conf_changed = true;
                }
            }
            self.applied = e.index;
        }
        Ok(())
    }

    fn reply(&mut self, ctx: &[u8], index: u64, result: ApplyResult) {
        if let Some((node, request)) = parse_context(ctx)
            && node == self.id
            && let Some(tx) = self.proposals.remove(&request)
        {
            // The proposer may have given up waiting; that is not an error.
            let _ = tx.send(Ok(Applied { index, result }));
        }
    }

    fn serve_reads(&mut self) {
        let applied = self.applied;
        let (done, waiting): (Vec<_>, Vec<_>) =
            self.ready_reads.drain(..).partition(|(i, _)| *i <= applied);
        self.ready_reads = waiting;
        for (_, request) in done {
            if let Some(tx) = self.reads.remove(&request) {
                let _ = tx.send(Ok(applied));
            }
        }
    }

    fn maybe_compact(&mut self) -> Result<()> {
        let snap_index = self.raw.store().snapshot_metadata().index;
        let commit = self.raw.store().hard_state().commit;
        let target = self.applied.min(commit);
        let due = target >= snap_index + self.snapshot_every;
        if (due || self.conf_changed) && target > snap_index {
            self.conf_changed = false;
            let data = self.state.encode_to_vec();
            self.raw.mut_store().compact_to(target, data)?;
            tracing::debug!(
                node = self.id,
                index = target,
                "metadata snapshot taken, log compacted"
            );
        }
        Ok(())
    }
}
