//! A cluster of real storaged processes on 127.0.0.1: node 1 forms the
//! cluster and runs `s2dctl cluster init`, the others start with
//! `--join <node 1>` one after another. Nodes are numbered from 1 and named
//! `n1`, `n2`, ... (their `--name`), so a test can say `node retire n2`.
//!
//! Everything that waits does so with a deadline and, when it runs out,
//! panics with what it last saw and the tail of every node's log.

use crate::{Node, NodeOptions, StartFailure};
use serde_json::Value;
use std::net::SocketAddr;
use std::process::Output;
use std::time::{Duration, Instant};

/// How often `Cluster::wait_for` looks again.
const POLL: Duration = Duration::from_millis(150);
/// Log lines per node shown when something times out or fails.
const LOG_TAIL: usize = 40;

/// Small nodes: one 256 MiB disk, 4 MiB extents.
pub fn small_node() -> NodeOptions {
    NodeOptions {
        disks: 1,
        disk_size: "256MiB",
        extent_size: "4MiB",
        ..NodeOptions::default()
    }
}

/// Tiny nodes for big clusters: one 64 MiB disk, 4 MiB extents, sync I/O.
pub fn tiny_node() -> NodeOptions {
    NodeOptions {
        disks: 1,
        disk_size: "64MiB",
        extent_size: "4MiB",
        io_engine: "sync",
        ..NodeOptions::default()
    }
}

/// Polls `f` on `c` every 150 ms until it returns Ok or `timeout` passes;
/// then panics with `what`, the last error and `logs(c)`.
pub fn poll_until<C, T>(
    c: &mut C,
    what: &str,
    timeout: Duration,
    mut f: impl FnMut(&mut C) -> Result<T, String>,
    logs: impl Fn(&C) -> String,
) -> T {
    let start = Instant::now();
    loop {
        let last = match f(c) {
            Ok(v) => return v,
            Err(e) => e,
        };
        if start.elapsed() >= timeout {
            panic!(
                "timed out after {:.1} s waiting for {what}\nlast seen: {last}\n{}",
                start.elapsed().as_secs_f64(),
                logs(c)
            );
        }
        std::thread::sleep(POLL);
    }
}

/// Whether every node of `live` sees `n` members (`status`) and they all
/// name the same leader (`leader`).
pub fn members_agree(
    live: &[usize],
    n: usize,
    status: impl Fn(usize) -> Result<Value, String>,
    leader: impl Fn(usize) -> Result<usize, String>,
) -> Result<(), String> {
    let mut leaders = Vec::new();
    for &i in live {
        let s = status(i)?;
        let seen = json_list(&s["nodes"], "nodes").len();
        if seen != n {
            return Err(format!("node {i} sees {seen} nodes: {s}"));
        }
        leaders.push(leader(i)?);
    }
    leaders.dedup();
    if leaders.len() != 1 {
        return Err(format!("nodes name different leaders: {leaders:?}"));
    }
    Ok(())
}

/// The name the harness gives node `i` (1-based).
pub fn node_name(i: usize) -> String {
    format!("n{i}")
}

/// A list a command printed with --json: either the list itself or an
/// object holding it under `key` (`{"volumes": [...]}`).
pub fn json_list(v: &Value, key: &str) -> Vec<Value> {
    if let Some(a) = v.as_array() {
        return a.clone();
    }
    match v.get(key).and_then(Value::as_array) {
        Some(a) => a.clone(),
        // prost/serde leaves an empty repeated field out when asked to.
        None if v.is_null() || (v.is_object() && v.get(key).is_none()) => Vec::new(),
        None => panic!("expected a list or {{\"{key}\": [...]}}, got {v}"),
    }
}

pub struct Cluster {
    nodes: Vec<Node>,
    template: NodeOptions,
}

impl Cluster {
    /// `n` small nodes (`small_node`), joined and with a leader.
    pub fn start(n: usize) -> Cluster {
        Cluster::start_with(n, small_node())
    }

    /// `n` nodes built from `template` (its name and join are set per
    /// node): node 1 starts alone and runs `cluster init`, each other node
    /// joins node 1 in turn. Returns once every node sees all `n` members
    /// and a leader.
    pub fn start_with(n: usize, template: NodeOptions) -> Cluster {
        assert!(n >= 1);
        let mut c = Cluster {
            nodes: Vec::with_capacity(n),
            template,
        };
        let first = Node::start(NodeOptions {
            name: Some(node_name(1)),
            join: None,
            ..c.template.clone()
        });
        c.nodes.push(first);
        // A just-started node may still be electing itself: retry briefly
        // and say so.
        let mut tries = 0;
        c.wait_for("cluster init on node 1", Duration::from_secs(10), |c| {
            tries += 1;
            let o = c.ctl(1, &["cluster", "init", "--name", "test"]);
            if o.status.success() {
                Ok(())
            } else {
                let e = String::from_utf8_lossy(&o.stderr).trim_end().to_string();
                eprintln!("cluster init on node 1 failed (try {tries}): {e}");
                Err(e)
            }
        });
        for _ in 1..n {
            c.add_node();
        }
        c.wait_members(n);
        c
    }

    /// Start one more node that joins node 1; returns its index. Panics
    /// (with the logs) if it does not come up.
    pub fn add_node(&mut self) -> usize {
        let i = self.nodes.len() + 1;
        let mut node = Node::new(self.join_options(i));
        if let Err(e) = node.try_restart() {
            panic!(
                "node {i} did not join the cluster: {e}\n{}",
                self.logs(&self.all())
            );
        }
        self.nodes.push(node);
        i
    }

    /// Options for node `i` joining node 1.
    pub fn join_options(&self, i: usize) -> NodeOptions {
        NodeOptions {
            name: Some(node_name(i)),
            join: Some(self.nodes[0].grpc),
            ..self.template.clone()
        }
    }

    /// Try to start another node that joins node 1 without adding it to
    /// the cluster: the node and how its start went.
    pub fn try_join(&self, i: usize) -> (Node, Result<(), StartFailure>) {
        let mut node = Node::new(self.join_options(i));
        let r = node.try_restart();
        (node, r)
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// All indices, 1-based.
    pub fn all(&self) -> Vec<usize> {
        (1..=self.nodes.len()).collect()
    }

    /// Node `i` (1-based).
    pub fn node(&self, i: usize) -> &Node {
        assert!(
            (1..=self.nodes.len()).contains(&i),
            "no node {i} in a cluster of {}",
            self.nodes.len()
        );
        &self.nodes[i - 1]
    }

    pub fn node_mut(&mut self, i: usize) -> &mut Node {
        assert!((1..=self.nodes.len()).contains(&i), "no node {i}");
        &mut self.nodes[i - 1]
    }

    /// Indices of the nodes whose process runs.
    pub fn live(&mut self) -> Vec<usize> {
        (1..=self.nodes.len())
            .filter(|&i| self.nodes[i - 1].is_running())
            .collect()
    }

    /// The index of the node with this gRPC address, name or id as a
    /// `Node` JSON object from s2dctl reports it.
    pub fn index_of(&self, node: &Value) -> Option<usize> {
        let addr = node["address"].as_str().unwrap_or_default();
        let name = node["name"].as_str().unwrap_or_default();
        self.nodes
            .iter()
            .position(|n| n.grpc.to_string() == addr || n.opts.name.as_deref() == Some(name))
            .map(|p| p + 1)
    }

    /// The index of the node called `name` (`n3`) or listening on `name`.
    pub fn index_of_name(&self, name: &str) -> Option<usize> {
        self.nodes
            .iter()
            .position(|n| n.opts.name.as_deref() == Some(name) || n.grpc.to_string() == name)
            .map(|p| p + 1)
    }

    pub fn grpc(&self, i: usize) -> SocketAddr {
        self.node(i).grpc
    }

    // ---- s2dctl --------------------------------------------------------

    /// Run s2dctl against node `i`.
    pub fn ctl(&self, i: usize, args: &[&str]) -> Output {
        self.node(i).ctl(args)
    }

    /// Run s2dctl against node `i` and require success; returns stdout.
    /// A failure panics with s2dctl's output and the node's log.
    pub fn ctl_ok(&self, i: usize, args: &[&str]) -> String {
        let o = self.ctl(i, args);
        if !o.status.success() {
            panic!(
                "s2dctl {args:?} on node {i} failed ({}): {}{}\n{}",
                o.status,
                String::from_utf8_lossy(&o.stderr),
                String::from_utf8_lossy(&o.stdout),
                self.logs(&[i])
            );
        }
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    /// `s2dctl --json ARGS` on node `i`, parsed; panics on failure.
    pub fn ctl_json(&self, i: usize, args: &[&str]) -> Value {
        let mut a = vec!["--json"];
        a.extend_from_slice(args);
        let out = self.ctl_ok(i, &a);
        serde_json::from_str(&out)
            .unwrap_or_else(|e| panic!("s2dctl {a:?} on node {i} printed no JSON ({e}): {out}"))
    }

    /// `s2dctl --json ARGS` on node `i`: the parsed output, or the error
    /// line (with the exit status) when it failed.
    pub fn try_json(&self, i: usize, args: &[&str]) -> Result<Value, String> {
        let mut a = vec!["--json"];
        a.extend_from_slice(args);
        let o = self.ctl(i, &a);
        if !o.status.success() {
            return Err(format!(
                "s2dctl {a:?} on node {i}: {} ({})",
                String::from_utf8_lossy(&o.stderr).trim_end(),
                o.status
            ));
        }
        serde_json::from_slice(&o.stdout).map_err(|e| {
            format!(
                "s2dctl {a:?} on node {i} printed no JSON ({e}): {}",
                String::from_utf8_lossy(&o.stdout)
            )
        })
    }

    /// `cluster status` as node `i` sees it.
    pub fn status(&self, i: usize) -> Result<Value, String> {
        self.try_json(i, &["cluster", "status"])
    }

    /// `node list` from node `i`.
    pub fn node_list(&self, i: usize) -> Result<Vec<Value>, String> {
        self.try_json(i, &["node", "list"])
            .map(|v| json_list(&v, "nodes"))
    }

    /// `volume list` from node `i`.
    pub fn volume_list(&self, i: usize) -> Result<Vec<Value>, String> {
        self.try_json(i, &["volume", "list"])
            .map(|v| json_list(&v, "volumes"))
    }

    /// Sorted (name, id) of the volumes node `i` lists.
    pub fn volume_ids(&self, i: usize) -> Result<Vec<(String, u64)>, String> {
        let mut v: Vec<(String, u64)> = self
            .volume_list(i)?
            .iter()
            .map(|v| {
                (
                    v["name"].as_str().unwrap_or_default().to_string(),
                    v["id"].as_u64().unwrap_or(0),
                )
            })
            .collect();
        v.sort();
        Ok(v)
    }

    /// Sorted names of the volumes node `i` lists.
    pub fn volume_names(&self, i: usize) -> Result<Vec<String>, String> {
        Ok(self.volume_ids(i)?.into_iter().map(|(n, _)| n).collect())
    }

    /// Create a volume through node `i`; panics on failure.
    pub fn create_volume(&self, i: usize, name: &str, size: &str) {
        self.ctl_ok(i, &["volume", "create", name, "--size", size]);
    }

    // ---- leader and waiting -------------------------------------------

    /// The leader as node `i` sees it (its index), if it knows one that is
    /// one of ours.
    pub fn leader_seen_by(&self, i: usize) -> Result<usize, String> {
        let s = self.status(i)?;
        let id = s["leader_id"].as_u64().unwrap_or(0);
        if id == 0 {
            return Err(format!("node {i} knows no leader: {s}"));
        }
        let nodes = json_list(&s["nodes"], "nodes");
        let leader = nodes
            .iter()
            .find(|n| n["id"].as_u64() == Some(id))
            .and_then(|n| self.index_of(n))
            .or_else(|| self.index_of_name(s["leader_name"].as_str().unwrap_or_default()));
        leader.ok_or_else(|| format!("node {i}: leader id {id} is none of ours: {s}"))
    }

    /// The current leader: the index a live node names, and which is
    /// running itself. Waits up to 15 s.
    pub fn leader(&mut self) -> usize {
        self.wait_for(
            "a live node to name a live leader",
            Duration::from_secs(15),
            |c| {
                let live = c.live();
                let mut last = String::from("no node is running");
                for &i in &live {
                    match c.leader_seen_by(i) {
                        Ok(l) if live.contains(&l) => return Ok(l),
                        Ok(l) => last = format!("node {i} names node {l}, which is not running"),
                        Err(e) => last = e,
                    }
                }
                Err(last)
            },
        )
    }

    /// Wait until every running node's `cluster status` shows `n` nodes
    /// and the same leader.
    pub fn wait_members(&mut self, n: usize) {
        self.wait_for(
            &format!("every live node to see {n} members and one leader"),
            Duration::from_secs(30),
            |c| {
                let live = c.live();
                members_agree(&live, n, |i| c.status(i), |i| c.leader_seen_by(i))
            },
        )
    }

    /// Poll `f` every 150 ms until it returns Ok or `timeout` passes; then
    /// panic with `what`, the last error `f` returned and every node's log
    /// tail.
    pub fn wait_for<T>(
        &mut self,
        what: &str,
        timeout: Duration,
        f: impl FnMut(&mut Cluster) -> Result<T, String>,
    ) -> T {
        poll_until(self, what, timeout, f, |c| c.logs(&c.all()))
    }

    /// The tails of the logs of the nodes `which`, for failure messages.
    pub fn logs(&self, which: &[usize]) -> String {
        let mut s = String::new();
        for &i in which {
            if let Some(n) = self.nodes.get(i.wrapping_sub(1)) {
                s.push_str(&format!(
                    "---- node {i} ({}, {}) log tail ----\n{}\n",
                    node_name(i),
                    n.grpc,
                    n.log_tail(LOG_TAIL)
                ));
            }
        }
        s
    }

    // ---- process control ----------------------------------------------

    /// kill -9 node `i`.
    pub fn kill9(&mut self, i: usize) {
        self.node_mut(i).kill9();
    }

    /// SIGSTOP node `i`: the process stays alive, holds its ports and
    /// connections and answers nothing, as a node that hangs.
    pub fn pause(&mut self, i: usize) {
        self.node(i).signal(libc::SIGSTOP);
    }

    /// SIGCONT node `i` after `pause`.
    pub fn resume(&mut self, i: usize) {
        self.node(i).signal(libc::SIGCONT);
    }

    /// SIGTERM node `i` and wait; returns its exit code.
    pub fn stop(&mut self, i: usize) -> Option<i32> {
        self.node_mut(i).stop()
    }

    /// Start node `i` again (same data dir, ports and flags; its --join is
    /// ignored by a member) and wait until its ports accept.
    pub fn restart(&mut self, i: usize) {
        if let Err(e) = self.node_mut(i).try_restart() {
            panic!("node {i} did not restart: {e}\n{}", self.logs(&self.all()));
        }
    }

    /// Start the nodes `which` together (none waits for another) and wait
    /// until all their ports accept.
    pub fn restart_together(&mut self, which: &[usize]) {
        for &i in which {
            self.node_mut(i).spawn();
        }
        for &i in which {
            if let Err(e) = self.node_mut(i).wait_ready() {
                panic!("node {i} did not restart: {e}\n{}", self.logs(&self.all()));
            }
        }
    }
}
