//! Per-node traffic of a plan: how many bytes each node reads and writes, so
//! that repair can throttle itself and report progress.
//!
//! Invariant: the counters only grow while a plan is built; the totals over
//! all nodes equal the sums over the plan's tasks or moves.

use std::collections::BTreeMap;

use crate::topology::{NODES_MAX, NodeId, Topology};

/// Bytes one node reads (as a source) and writes (as a target) for a plan.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NodeTraffic {
    pub read_bytes: u64,
    pub write_bytes: u64,
}

/// Extent counts read and written per node index while a plan is built.
#[derive(Debug, Clone, Default)]
pub(crate) struct TrafficCounter {
    reads: [u64; NODES_MAX],
    writes: [u64; NODES_MAX],
}

impl TrafficCounter {
    pub(crate) fn read(&mut self, node: usize) {
        self.reads[node] += 1;
    }

    pub(crate) fn write(&mut self, node: usize) {
        self.writes[node] += 1;
    }

    /// Take back one write (a planned move was sent elsewhere).
    pub(crate) fn unwrite(&mut self, node: usize) {
        self.writes[node] = self.writes[node].saturating_sub(1);
    }

    pub(crate) fn reads(&self, node: usize) -> u64 {
        self.reads[node]
    }

    pub(crate) fn writes(&self, node: usize) -> u64 {
        self.writes[node]
    }

    /// Bytes per node id, for every node that reads or writes anything.
    pub(crate) fn into_map(self, topology: &Topology) -> BTreeMap<NodeId, NodeTraffic> {
        let size = topology.extent_size_bytes();
        topology
            .nodes()
            .iter()
            .enumerate()
            .filter(|&(i, _)| self.reads[i] > 0 || self.writes[i] > 0)
            .map(|(i, node)| {
                let traffic = NodeTraffic {
                    read_bytes: self.reads[i].saturating_mul(size),
                    write_bytes: self.writes[i].saturating_mul(size),
                };
                (node.id(), traffic)
            })
            .collect()
    }
}
