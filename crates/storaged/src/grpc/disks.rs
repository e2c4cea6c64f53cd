//! `pool remove-disk` and the disk figures of `pool status` that come from
//! the metadata: a disk's state and the slab copies it holds.
//!
//! A disk is named by its node and by its path, disk id or index on that
//! node; its metadata id is positional (`replica::meta_disk_id`). Removing
//! one marks it draining through Raft: the node stops placing extents on
//! it and the copies on it move to other nodes (`crate::mirror::moves`).
//! A removal that cannot complete (a copy with no node to go to) is
//! refused up front and changes nothing.

use super::{ControlService, find_node, meta_status};
use crate::meta_service::MetaView;
use crate::replica::meta_disk_id;
use meta::state::{DiskState, Op, RequestRebalance, SetDiskState, UNPLACED};
use s2d_proto::v1::{AddDiskRequest, Disk, DiskRequest, RebalanceResponse};
use tonic::{Request, Response, Status};

/// A disk state as the API names it.
pub fn disk_state_name(s: i32) -> &'static str {
    match DiskState::try_from(s) {
        Ok(DiskState::Online) => "online",
        Ok(DiskState::Draining) => "draining",
        Ok(DiskState::Failed) => "failed",
        Ok(DiskState::Removed) => "removed",
        Err(_) => "unknown",
    }
}

/// Fills the metadata's figures into the disks one node reported, in the
/// node's order.
pub fn annotate(view: &MetaView, node: u64, disks: &mut [Disk]) {
    for (i, d) in disks.iter_mut().enumerate() {
        figures(view, meta_disk_id(node, i), d);
    }
}

/// Fills the metadata's figures of disk `id` into `d`.
fn figures(view: &MetaView, id: u64, d: &mut Disk) {
    if let Some(md) = view.state.disks.get(&id) {
        d.state = disk_state_name(md.state).into();
    }
    d.slab_copies = copies_on(view, id).len() as u64;
}

/// The (volume, slab, copy nodes) of every slab with a copy on disk `id`.
fn copies_on(view: &MetaView, id: u64) -> Vec<(String, u64, Vec<u64>)> {
    let mut out = Vec::new();
    for v in view.state.volumes.values() {
        for (n, s) in &v.slabs {
            if s.replicas
                .iter()
                .any(|r| r.disk == id && r.extent != UNPLACED)
            {
                out.push((
                    v.name.clone(),
                    *n,
                    s.replicas.iter().map(|r| r.node).collect(),
                ));
            }
        }
    }
    out
}

/// Adds disk `path` to this node (see `crate::added_disks`) and answers
/// with it as `pool status` shows it.
pub async fn add_here(
    manager: &crate::manager::Manager,
    meta: &crate::meta_service::MetaHandle,
    path: &str,
) -> Result<Disk, Status> {
    let index = crate::added_disks::add(manager, meta, std::path::Path::new(path))
        .await
        .map_err(|e| Status::failed_precondition(format!("{e:#}")))?;
    let view = meta.view();
    let name = view
        .state
        .nodes
        .get(&view.this)
        .map_or(String::new(), |n| n.name.clone());
    let mut d = super::local_disks(manager, &name)
        .into_iter()
        .nth(index)
        .ok_or_else(|| Status::internal("the added disk is not in the store"))?;
    figures(&view, meta_disk_id(view.this, index), &mut d);
    Ok(d)
}

impl ControlService {
    pub(super) async fn add_disk_now(
        &self,
        req: Request<AddDiskRequest>,
    ) -> Result<Response<Disk>, Status> {
        let r = req.into_inner();
        let view = self.meta.read().await.map_err(meta_status)?;
        let node = find_node(&view, &r.node)?.clone();
        if r.path.is_empty() {
            return Err(Status::invalid_argument("no disk path given"));
        }
        let d = if node.id == view.this {
            add_here(&self.manager, &self.meta, &r.path).await?
        } else {
            crate::peer::add_local_disk(&node.address, &r.path)
                .await
                .map_err(|e| {
                    Status::failed_precondition(format!(
                        "node {} did not add disk {}: {e}",
                        node.name, r.path
                    ))
                })?
        };
        tracing::info!(node = %node.name, disk = %r.path, "disk added to the pool");
        Ok(Response::new(d))
    }

    pub(super) async fn rebalance_now(&self) -> Result<Response<RebalanceResponse>, Status> {
        let view = self
            .meta
            .propose(Op::RequestRebalance(RequestRebalance {}))
            .await
            .map_err(meta_status)?;
        Ok(Response::new(RebalanceResponse {
            generation: view.state.rebalance_generation,
        }))
    }

    pub(super) async fn remove_disk_now(
        &self,
        req: Request<DiskRequest>,
    ) -> Result<Response<Disk>, Status> {
        let r = req.into_inner();
        let view = self.meta.read().await.map_err(meta_status)?;
        let node = find_node(&view, &r.node)?.clone();
        let st = self.statuses(&view, std::iter::once(node.id)).await;
        let disks = match st.get(&node.id) {
            Some(Ok(s)) => s.disks.clone(),
            Some(Err(e)) => {
                return Err(Status::unavailable(format!(
                    "node {} does not answer ({e}); a disk is removed while its node is up",
                    node.name
                )));
            }
            None => return Err(Status::not_found(format!("node {} not found", r.node))),
        };
        let index = disks
            .iter()
            .position(|d| d.path == r.disk || d.disk_id == r.disk)
            .or_else(|| r.disk.parse::<usize>().ok().filter(|i| *i < disks.len()))
            .ok_or_else(|| {
                let paths: Vec<&str> = disks.iter().map(|d| d.path.as_str()).collect();
                Status::not_found(format!(
                    "node {} has no disk {:?}; its disks: {}",
                    node.name,
                    r.disk,
                    paths.join(", ")
                ))
            })?;
        let id = meta_disk_id(node.id, index);
        let md = view.state.disks.get(&id).ok_or_else(|| {
            Status::unavailable(format!(
                "disk {} of node {} is not recorded in the cluster yet; try again in a moment",
                disks[index].path, node.name
            ))
        })?;
        match DiskState::try_from(md.state) {
            Ok(DiskState::Online) => {
                // Every copy on the disk needs a node to go to, or the
                // removal could never finish: refuse it now.
                let stuck: Vec<String> = copies_on(&view, id)
                    .into_iter()
                    .filter(|(_, _, nodes)| {
                        let staying: Vec<u64> =
                            nodes.iter().copied().filter(|n| *n != node.id).collect();
                        crate::mirror::moves::move_target(&view, nodes, &staying).is_none()
                    })
                    .map(|(v, s, _)| format!("{v} slab {s}"))
                    .collect();
                if !stuck.is_empty() {
                    return Err(Status::failed_precondition(format!(
                        "cannot remove disk {} of node {}: {} slab copies on it have no node to move to (every other up node with free space holds a copy of their slab already: {}); add a node or free space first",
                        disks[index].path,
                        node.name,
                        stuck.len(),
                        stuck.join(", ")
                    )));
                }
                self.meta
                    .propose(Op::SetDiskState(SetDiskState {
                        disk: id,
                        state: DiskState::Draining as i32,
                    }))
                    .await
                    .map_err(meta_status)?;
                tracing::info!(node = %node.name, disk = %disks[index].path, "disk draining: its copies move to other nodes");
            }
            Ok(DiskState::Draining) => {}
            _ => {
                return Err(Status::failed_precondition(format!(
                    "disk {} of node {} is {}; only an online disk can be removed",
                    disks[index].path,
                    node.name,
                    disk_state_name(md.state)
                )));
            }
        }
        let view = self.meta.read().await.map_err(meta_status)?;
        let mut out = disks[index].clone();
        figures(&view, id, &mut out);
        Ok(Response::new(out))
    }
}
