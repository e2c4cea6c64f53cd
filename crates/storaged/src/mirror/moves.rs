//! Moving a slab's copy off a node without lowering its redundancy: the
//! copies on a draining node (`s2dctl node drain`) or a draining disk
//! (`s2dctl pool remove-disk`) get new places on other nodes.
//!
//! A move of one slab, run by the node that coordinates the volume:
//! 1. Through Raft (epoch + 1), the slab gets one replica more than its
//!    resiliency's copies: an empty stale copy on a node placement picks,
//!    with `moving_from` naming the node the copy leaves. The leaving copy
//!    stays current and keeps taking writes.
//! 2. The resync fills the new copy (`crate::resync`) and makes it current.
//! 3. Through Raft (epoch + 1), the copy on `moving_from` is dropped; that
//!    node frees its extent when it sees the change (`collect_garbage`).
//!
//! Invariants: a slab never has fewer current copies during a move than
//! before it; the leaving copy is dropped only once `copies` other copies
//! are current; a slab moves one copy at a time.

use super::{EPOCH_RETRIES, MirrorVolume, io};
use crate::meta_service::MetaView;
use block_api::BlockError;
use meta::state::{AllocateSlab, DiskState, NodeState, Op, Replica, ReplicaState, UNPLACED};

/// Whether a copy sits on hardware that is being emptied on purpose: a
/// draining node or a draining disk. It keeps serving until its
/// replacement is current.
pub fn leaving(view: &MetaView, r: &Replica) -> bool {
    if r.extent == UNPLACED {
        return false;
    }
    let node_draining = view
        .state
        .nodes
        .get(&r.node)
        .is_some_and(|n| n.state == NodeState::Maintenance as i32);
    let disk_draining = view
        .state
        .disks
        .get(&r.disk)
        .is_some_and(|d| d.state == DiskState::Draining as i32);
    node_draining || disk_draining
}

/// Slabs of `name` with work for a move now: a current copy on leaving
/// hardware that another node can take, or a move whose new copy is
/// current (the old one can go). A move whose new copy is still stale is
/// the resync's work ([`crate::resync::slabs_to_resync`]).
pub fn slabs_to_move(view: &MetaView, name: &str) -> Vec<u64> {
    let Some(v) = view.state.volumes.get(name) else {
        return Vec::new();
    };
    let copies = meta::state::Resiliency::try_from(v.resiliency).map_or(1, |r| r.copies());
    v.slabs
        .iter()
        .filter(|(_, s)| {
            if s.moving_from != 0 {
                let current = s
                    .replicas
                    .iter()
                    .filter(|r| r.node != s.moving_from && r.state == ReplicaState::Current as i32);
                return current.count() >= copies;
            }
            let Some(from) = s
                .replicas
                .iter()
                .find(|r| r.state == ReplicaState::Current as i32 && leaving(view, r))
            else {
                return false;
            };
            let nodes: Vec<u64> = s.replicas.iter().map(|r| r.node).collect();
            let staying: Vec<u64> = nodes.iter().copied().filter(|n| *n != from.node).collect();
            move_target(view, &nodes, &staying).is_some()
        })
        .map(|(n, _)| *n)
        .collect()
}

/// Where a new copy of a slab goes: an up node with a replication address
/// and free extents on an online disk, holding no copy of the slab; one in
/// a fault domain the slab's other copies do not use first, then the one
/// with the most free extents.
pub fn move_target(view: &MetaView, slab_nodes: &[u64], staying: &[u64]) -> Option<u64> {
    let domain = |id: u64| view.state.nodes.get(&id).map(|n| n.fault_domain.clone());
    let used: Vec<_> = staying.iter().filter_map(|n| domain(*n)).collect();
    let es = view
        .state
        .settings
        .as_ref()
        .map_or(1, |s| s.extent_size_bytes.max(1));
    view.state
        .nodes
        .values()
        .filter(|n| n.state == NodeState::Up as i32 && !n.replication_address.is_empty())
        .filter(|n| !slab_nodes.contains(&n.id))
        .map(|n| {
            let free: u64 = view
                .state
                .disks
                .values()
                .filter(|d| d.node == n.id && d.state == DiskState::Online as i32)
                .map(|d| (d.capacity_bytes / es).saturating_sub(d.allocated_extents.len() as u64))
                .sum();
            let shares_domain = !n.fault_domain.is_empty() && used.contains(&n.fault_domain);
            (n.id, free, shares_domain)
        })
        .filter(|(_, free, _)| *free > 0)
        .max_by_key(|(id, free, shares)| (!*shares, *free, std::cmp::Reverse(*id)))
        .map(|(id, _, _)| id)
}

impl MirrorVolume {
    /// The metadata's record of one of this volume's slabs.
    fn slab_record<'a>(&self, view: &'a MetaView, slab: u64) -> Option<&'a meta::state::Slab> {
        view.state
            .volumes
            .get(&self.name)
            .and_then(|v| v.slabs.get(&slab))
    }

    /// Step 1 for a copy on leaving hardware: gives it an empty stale twin
    /// on another node. Returns whether a move started.
    pub async fn start_move(&self, slab: u64) -> Result<bool, BlockError> {
        let view = self.cluster.meta.view();
        let Some(old) = self.slab_record(&view, slab) else {
            return Ok(false);
        };
        let Some(from) = old
            .replicas
            .iter()
            .find(|r| r.state == ReplicaState::Current as i32 && leaving(&view, r))
        else {
            return Ok(false);
        };
        let nodes: Vec<u64> = old.replicas.iter().map(|r| r.node).collect();
        let staying: Vec<u64> = nodes.iter().copied().filter(|n| *n != from.node).collect();
        let Some(to) = move_target(&view, &nodes, &staying) else {
            tracing::warn!(volume = %self.name, slab, from = from.node, "no node to move the copy to: every up node with free space holds one already");
            return Ok(false);
        };
        self.start_move_to(slab, from.node, to).await
    }

    /// Step 1: gives the current copy of `slab` on node `from` an empty
    /// stale twin on node `to`, which must be up and hold no copy of the
    /// slab. Returns whether the move started (false: the slab changed so
    /// that it no longer applies).
    pub async fn start_move_to(&self, slab: u64, from: u64, to: u64) -> Result<bool, BlockError> {
        for _ in 0..EPOCH_RETRIES {
            let view = self.cluster.meta.view();
            let Some(old) = self.slab_record(&view, slab) else {
                return Ok(false);
            };
            let target_up = view.state.nodes.get(&to).is_some_and(|n| {
                n.state == NodeState::Up as i32 && !n.replication_address.is_empty()
            });
            let applies = old.moving_from == 0
                && old.replicas.len() == self.copies
                && old
                    .replicas
                    .iter()
                    .any(|r| r.node == from && r.state == ReplicaState::Current as i32)
                && !old.replicas.iter().any(|r| r.node == to)
                && target_up;
            if !applies {
                return Ok(false);
            }
            let mut replicas = old.replicas.clone();
            replicas.push(Replica {
                node: to,
                disk: 0,
                extent: UNPLACED,
                state: ReplicaState::Stale as i32,
            });
            tracing::info!(volume = %self.name, slab, from, to, "moving a copy to another node");
            match self
                .commit(Op::AllocateSlab(AllocateSlab {
                    volume: self.name.clone(),
                    slab,
                    replicas,
                    epoch: old.epoch + 1,
                    moving_from: from,
                }))
                .await
            {
                Ok(_) => return Ok(true),
                Err(crate::meta_service::MetaError::Rejected(r)) => {
                    tracing::debug!(volume = %self.name, slab, reason = %r, "move refused; looking again");
                    self.newer_than(old.epoch, slab).await;
                }
                Err(e) => return Err(Self::meta_err(e)),
            }
        }
        Err(io(format!(
            "slab {slab} of {} kept changing epoch",
            self.name
        )))
    }

    /// Step 3: once `copies` other copies are current, drops the copy on
    /// the node the move leaves. Returns whether it was dropped.
    pub async fn finish_move(&self, slab: u64) -> Result<bool, BlockError> {
        for _ in 0..EPOCH_RETRIES {
            let view = self.cluster.meta.view();
            let Some(old) = self.slab_record(&view, slab) else {
                return Ok(false);
            };
            if old.moving_from == 0 {
                return Ok(false);
            }
            let rest: Vec<Replica> = old
                .replicas
                .iter()
                .filter(|r| r.node != old.moving_from)
                .cloned()
                .collect();
            let current = rest
                .iter()
                .filter(|r| r.state == ReplicaState::Current as i32)
                .count();
            if current < self.copies {
                return Ok(false);
            }
            match self
                .commit(Op::AllocateSlab(AllocateSlab {
                    volume: self.name.clone(),
                    slab,
                    replicas: rest,
                    epoch: old.epoch + 1,
                    moving_from: 0,
                }))
                .await
            {
                Ok(_) => {
                    tracing::info!(volume = %self.name, slab, from = old.moving_from, "copy moved; the old one is dropped");
                    return Ok(true);
                }
                Err(crate::meta_service::MetaError::Rejected(r)) => {
                    tracing::debug!(volume = %self.name, slab, reason = %r, "dropping the moved copy refused; looking again");
                    self.newer_than(old.epoch, slab).await;
                }
                Err(e) => return Err(Self::meta_err(e)),
            }
        }
        Err(io(format!(
            "slab {slab} of {} kept changing epoch",
            self.name
        )))
    }
}
