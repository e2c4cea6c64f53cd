//! In-process Raft clusters of `MetaNode`s over an in-memory router that can
//! drop nodes and partition links: election, replication, leader loss,
//! restart from redb, catch-up from a snapshot.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use meta::node::{Membership, MetaNode, NodeConfig, ProposalResult};
use meta::state::*;
use prost::Message as _;
use tokio::sync::oneshot;

/// A cluster: live nodes, their redb files, and links cut by the test.
struct Cluster {
    _dir: tempfile::TempDir,
    voters: Vec<u64>,
    paths: BTreeMap<u64, PathBuf>,
    nodes: BTreeMap<u64, MetaNode>,
    /// Directed links (from, to) whose messages are dropped.
    cut: BTreeSet<(u64, u64)>,
    snapshot_every: u64,
}

impl Cluster {
    fn new(n: u64, snapshot_every: u64) -> Self {
        let dir = tempfile::tempdir().expect("temp dir for the cluster");
        let voters: Vec<u64> = (1..=n).collect();
        let paths = voters
            .iter()
            .map(|id| (*id, dir.path().join(format!("node-{id}.redb"))))
            .collect();
        let mut c = Cluster {
            _dir: dir,
            voters,
            paths,
            nodes: BTreeMap::new(),
            cut: BTreeSet::new(),
            snapshot_every,
        };
        for id in c.voters.clone() {
            c.start(id);
        }
        c
    }

    fn start(&mut self, id: u64) {
        let mut cfg = NodeConfig::new(id);
        cfg.snapshot_every = self.snapshot_every;
        let node = MetaNode::open(&cfg, &self.paths[&id], &self.voters).expect("open node store");
        self.nodes.insert(id, node);
    }

    /// Drops the node (its redb file stays, like a killed process).
    fn kill(&mut self, id: u64) {
        self.nodes.remove(&id);
    }

    /// Cuts every link to and from `id`.
    fn isolate(&mut self, id: u64) {
        for other in self.voters.clone() {
            self.cut.insert((id, other));
            self.cut.insert((other, id));
        }
    }

    fn heal(&mut self) {
        self.cut.clear();
    }

    /// Handles ready state and delivers messages until the network is quiet.
    fn settle(&mut self) {
        for _ in 0..100 {
            let mut msgs = Vec::new();
            for node in self.nodes.values_mut() {
                node.on_ready().expect("on_ready");
                msgs.extend(node.take_messages());
            }
            if msgs.is_empty() {
                return;
            }
            for m in msgs {
                if self.cut.contains(&(m.from, m.to)) {
                    continue;
                }
                if let Some(to) = self.nodes.get_mut(&m.to) {
                    // Stale or unexpected messages are refused by raft; that is fine here.
                    let _ = to.step(m);
                }
            }
        }
    }

    fn tick(&mut self) {
        for node in self.nodes.values_mut() {
            node.tick();
        }
        self.settle();
    }

    /// Ticks until exactly one live node leads and every connected node knows it.
    fn elect(&mut self) -> u64 {
        for _ in 0..500 {
            self.tick();
            let leaders: Vec<u64> = self
                .nodes
                .values()
                .filter(|n| n.is_leader())
                .map(|n| n.id())
                .collect();
            if let [l] = leaders[..] {
                let reachable = self
                    .nodes
                    .keys()
                    .filter(|id| !self.cut.contains(&(l, **id)));
                if reachable.clone().all(|id| self.nodes[id].leader_id() == l) {
                    return l;
                }
            }
        }
        panic!(
            "no single leader elected after 500 ticks among {:?}",
            self.nodes.keys()
        );
    }

    /// Proposes on `via` and ticks until the reply arrives.
    fn propose(&mut self, via: u64, cmd: Command) -> ApplyResult {
        let mut rx = self
            .nodes
            .get_mut(&via)
            .expect("proposing node is live")
            .propose(&cmd);
        self.settle();
        for _ in 0..200 {
            match rx.try_recv() {
                Ok(r) => return r.expect("proposal reached the log").result,
                Err(oneshot::error::TryRecvError::Empty) => self.tick(),
                Err(e) => panic!("proposal reply lost: {e}"),
            }
        }
        panic!("proposal {cmd:?} via node {via} not applied after 200 ticks");
    }

    /// Ticks until every live node applied as far as the leader.
    fn converge(&mut self) {
        for _ in 0..300 {
            let max = self.nodes.values().map(|n| n.applied()).max().unwrap_or(0);
            if self.nodes.values().all(|n| n.applied() == max) {
                return;
            }
            self.tick();
        }
        let applied: Vec<_> = self.nodes.values().map(|n| (n.id(), n.applied())).collect();
        panic!("nodes did not converge: (id, applied) = {applied:?}");
    }

    fn assert_identical(&self) {
        let mut it = self.nodes.values();
        let first = it.next().expect("a live node");
        let want = first.state().encode_to_vec();
        for n in it {
            assert_eq!(
                n.state().encode_to_vec(),
                want,
                "node {} state differs from node {}",
                n.id(),
                first.id()
            );
        }
    }
}

fn init() -> Command {
    Command::new(Op::InitPool(PoolSettings {
        name: "pool".into(),
        extent_size_bytes: 1 << 20,
    }))
}

fn create(name: &str) -> Command {
    Command::new(Op::CreateVolume(CreateVolume {
        name: name.into(),
        size_bytes: 4 << 20,
        resiliency: Resiliency::Simple as i32,
        ..Default::default()
    }))
}

fn volumes(node: &MetaNode) -> Vec<String> {
    node.state().volumes.keys().cloned().collect()
}

#[test]
fn three_nodes_elect_a_leader_and_commit_identically() {
    let mut c = Cluster::new(3, 1000);
    let leader = c.elect();
    assert_eq!(c.propose(leader, init()), Ok(()), "init on the leader");
    let follower = c
        .voters
        .iter()
        .copied()
        .find(|id| *id != leader)
        .expect("a follower");
    assert_eq!(
        c.propose(follower, create("a")),
        Ok(()),
        "a follower forwards proposals"
    );
    assert!(
        matches!(
            c.propose(leader, create("a")),
            Err(Rejection::Exists { .. })
        ),
        "a duplicate name is rejected through Raft too"
    );
    c.converge();
    c.assert_identical();
    assert_eq!(
        volumes(&c.nodes[&3]),
        vec!["a".to_string()],
        "node 3 should see volume a"
    );
}

#[test]
fn five_nodes_survive_leader_loss_without_losing_commits() {
    let mut c = Cluster::new(5, 1000);
    let old = c.elect();
    c.propose(old, init()).expect("init");
    for i in 0..5 {
        c.propose(old, create(&format!("v{i}")))
            .expect("create before failover");
    }
    c.kill(old);
    let new = c.elect();
    assert_ne!(new, old, "a dead node cannot stay leader");
    assert_eq!(
        volumes(&c.nodes[&new]).len(),
        5,
        "the new leader has every committed volume"
    );
    c.propose(new, create("after"))
        .expect("create after failover");
    c.kill(new);
    let third = c.elect();
    c.propose(third, create("after-2"))
        .expect("3 of 5 still commit");
    c.converge();
    c.assert_identical();
    assert_eq!(
        volumes(&c.nodes[&third]).len(),
        7,
        "nothing committed was lost"
    );
}

#[test]
fn linearizable_read_sees_the_latest_commit_on_a_follower() {
    let mut c = Cluster::new(3, 1000);
    let leader = c.elect();
    c.propose(leader, init()).expect("init");
    c.propose(leader, create("x")).expect("create");
    let follower = c
        .voters
        .iter()
        .copied()
        .find(|id| *id != leader)
        .expect("a follower");
    let mut rx = c.nodes.get_mut(&follower).expect("live").read_index();
    for _ in 0..50 {
        if let Ok(r) = rx.try_recv() {
            let index = r.expect("read index");
            assert!(
                c.nodes[&follower].applied() >= index,
                "read served before applying its index"
            );
            assert!(
                c.nodes[&follower].state().volumes.contains_key("x"),
                "follower read misses a committed volume"
            );
            return;
        }
        c.tick();
    }
    panic!("read index not served on node {follower}");
}

#[test]
fn restarted_cluster_restores_state_from_redb() {
    let mut c = Cluster::new(3, 4);
    let leader = c.elect();
    c.propose(leader, init()).expect("init");
    for i in 0..10 {
        c.propose(leader, create(&format!("v{i}"))).expect("create");
    }
    c.converge();
    let before = c.nodes[&1].state().encode_to_vec();
    for id in c.voters.clone() {
        c.kill(id);
    }
    for id in c.voters.clone() {
        c.start(id);
    }
    c.settle();
    // Entries after the last snapshot are replayed up to the persisted commit.
    assert_eq!(
        c.nodes[&1].state().encode_to_vec(),
        before,
        "node 1 lost state across restart"
    );
    let leader = c.elect();
    c.propose(leader, create("after-restart"))
        .expect("commit after full restart");
    c.converge();
    c.assert_identical();
    assert_eq!(
        volumes(&c.nodes[&2]).len(),
        11,
        "all volumes are back plus the new one"
    );
}

#[test]
fn lagging_node_catches_up_from_a_snapshot_after_compaction() {
    let mut c = Cluster::new(3, 5);
    let leader = c.elect();
    c.propose(leader, init()).expect("init");
    let lagger = c
        .voters
        .iter()
        .copied()
        .find(|id| *id != leader)
        .expect("a follower");
    c.kill(lagger);
    for i in 0..20 {
        c.propose(leader, create(&format!("v{i}")))
            .expect("create while a node is down");
    }
    let snap = c.nodes[&leader].store().snapshot_metadata().index;
    assert!(
        snap > 10,
        "the leader should have compacted its log (snapshot at {snap})"
    );
    c.start(lagger);
    c.converge();
    assert!(
        c.nodes[&lagger].store().snapshot_metadata().index >= snap,
        "the lagging node should have installed the leader's snapshot"
    );
    c.assert_identical();
    assert_eq!(
        volumes(&c.nodes[&lagger]).len(),
        20,
        "lagging node has every volume"
    );
}

#[test]
fn isolated_minority_cannot_commit_and_rejoins() {
    let mut c = Cluster::new(3, 1000);
    let leader = c.elect();
    c.propose(leader, init()).expect("init");
    c.isolate(leader);
    let mut stuck = c
        .nodes
        .get_mut(&leader)
        .expect("live")
        .propose(&create("lost"));
    // check_quorum makes the cut-off leader step down within an election timeout.
    for _ in 0..30 {
        c.tick();
    }
    assert!(
        !c.nodes[&leader].is_leader(),
        "an isolated leader must step down"
    );
    let new = c.elect();
    assert_ne!(new, leader, "the majority side elects its own leader");
    c.propose(new, create("kept")).expect("majority commits");
    let r: Result<ProposalResult, _> = stuck.try_recv();
    assert!(
        !matches!(r, Ok(Ok(ref a)) if a.result.is_ok()),
        "the isolated old leader must not commit alone"
    );
    c.heal();
    c.converge();
    c.assert_identical();
    assert_eq!(
        volumes(&c.nodes[&leader]),
        vec!["kept".to_string()],
        "the old leader adopts the majority's log"
    );
}

impl Cluster {
    /// Opens an empty store for a node that will join (no bootstrap).
    fn start_joiner(&mut self, id: u64) {
        let path = self._dir.path().join(format!("node-{id}.redb"));
        self.paths.insert(id, path.clone());
        let mut cfg = NodeConfig::new(id);
        cfg.snapshot_every = self.snapshot_every;
        let node = MetaNode::open(&cfg, &path, &[]).expect("open joiner store");
        self.nodes.insert(id, node);
    }

    fn change(&mut self, via: u64, change: Membership) -> ApplyResult {
        let mut rx = self
            .nodes
            .get_mut(&via)
            .expect("proposing node is live")
            .propose_membership(change);
        self.settle();
        for _ in 0..200 {
            match rx.try_recv() {
                Ok(r) => return r.expect("membership change reached the log").result,
                Err(oneshot::error::TryRecvError::Empty) => self.tick(),
                Err(e) => panic!("membership reply lost: {e}"),
            }
        }
        panic!("membership change not applied within 200 ticks");
    }
}

fn join_cmd(id: u64, voter: bool) -> Command {
    Command::new(Op::AddNode(AddNode {
        id,
        address: format!("127.0.0.1:{}", 7000 + id),
        voter,
        ..Default::default()
    }))
}

#[test]
fn learner_joins_catches_up_is_promoted_and_a_voter_is_removed() {
    let mut c = Cluster::new(1, 5);
    let leader = c.elect();
    c.propose(leader, init()).expect("init");
    c.propose(leader, join_cmd(1, true)).expect("record node 1");
    for i in 0..12 {
        c.propose(leader, create(&format!("v{i}"))).expect("create");
    }
    c.start_joiner(2);
    c.change(leader, Membership::AddLearner(join_cmd(2, false)))
        .expect("node 2 joins as a learner");
    c.converge();
    assert_eq!(
        volumes(&c.nodes[&2]),
        volumes(&c.nodes[&1]),
        "the learner caught up (from a snapshot: the log was compacted)"
    );
    assert_eq!(c.nodes[&1].members(), (vec![1], vec![2]));
    assert!(
        !c.nodes[&2].state().nodes[&2].voter,
        "recorded as a learner"
    );

    c.change(
        leader,
        Membership::Promote(Command::new(Op::PromoteNode(PromoteNode { node: 2 }))),
    )
    .expect("promote node 2");
    assert_eq!(c.nodes[&1].members(), (vec![1, 2], vec![]));
    assert!(
        c.nodes[&1].state().nodes[&2].voter,
        "state agrees with Raft"
    );

    let before = c.nodes[&1].members();
    assert!(
        c.change(
            leader,
            Membership::Promote(Command::new(Op::PromoteNode(PromoteNode { node: 2 })))
        )
        .is_err(),
        "promoting a voter is refused"
    );
    assert_eq!(
        c.nodes[&1].members(),
        before,
        "a refused change leaves Raft as it was"
    );

    c.change(
        leader,
        Membership::Remove(Command::new(Op::RetireNode(RetireNode { node: 2 }))),
    )
    .expect("retire node 2");
    assert_eq!(c.nodes[&1].members(), (vec![1], vec![]));
    c.propose(leader, create("after-retire"))
        .expect("the one remaining voter commits alone");
}
