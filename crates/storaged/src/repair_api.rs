//! The repair API (`s2dctl repair list|status|start`): what the repairs of
//! mirrored volumes are doing, from the cluster metadata (which copies are
//! stale, resyncing, or on lost nodes) and from the node running each (how
//! far it is).
//!
//! A repair is identified by its volume's id. There is no separate job
//! record: the copies' states in Raft are the job, so a repair survives any
//! restart and the node that serves the volume (or the lowest-numbered up
//! node holding a current copy) picks it up again by itself.

use crate::grpc::{ControlService, Statuses, meta_status};
use crate::meta_service::MetaView;
use meta::state::{self as ms, NodeState, ReplicaState};
use s2d_proto::v1::repair_service_server::RepairService;
use s2d_proto::v1::*;
use std::time::Duration;
use tonic::{Request, Response, Status};

pub use s2d_proto::v1::repair_service_server::RepairServiceServer;

/// The repair of one volume as the API shows it; `None` when the volume
/// needs none and none ran on its serving node.
fn repair_of(
    view: &MetaView,
    v: &ms::Volume,
    st: &Statuses,
    rebuild_after: Duration,
) -> Option<Repair> {
    let name_of = |id: u64| {
        view.state
            .nodes
            .get(&id)
            .map_or_else(|| format!("node-{id}"), |n| n.name.clone())
    };
    let mut r = Repair {
        id: v.id,
        volume: v.name.clone(),
        ..Default::default()
    };
    let mut waiting_on = std::collections::BTreeSet::new();
    for s in v.slabs.values() {
        for c in &s.replicas {
            let down = view.state.nodes.get(&c.node).is_none_or(|n| {
                n.state != NodeState::Up as i32 && n.state != NodeState::Maintenance as i32
            });
            if crate::mirror::lost_copy(view, c, rebuild_after) {
                r.lost_copies += 1;
            } else if c.state == ReplicaState::Current as i32 && down {
                r.down_copies += 1;
                waiting_on.insert(name_of(c.node));
            } else if c.state == ReplicaState::Stale as i32 {
                r.stale_copies += 1;
                let down = view
                    .state
                    .nodes
                    .get(&c.node)
                    .is_none_or(|n| n.state != NodeState::Up as i32);
                if down {
                    waiting_on.insert(name_of(c.node));
                }
            } else if c.state == ReplicaState::Rebuilding as i32 {
                r.resyncing_copies += 1;
            }
        }
    }
    // The latest resync of the volume, on whichever node ran it.
    let progress = st
        .iter()
        .filter_map(|(node, s)| {
            let s = s.as_ref().ok()?;
            let p = s
                .volumes
                .iter()
                .find(|p| p.name == v.name && p.resync_total_bytes > 0)?;
            Some((*node, p.clone()))
        })
        .max_by_key(|(_, p)| p.resync_started_ms);
    if let Some((node, p)) = &progress {
        r.node = name_of(*node);
        r.done_bytes = p.resync_done_bytes;
        r.total_bytes = p.resync_total_bytes;
        r.copied_bytes = p.resync_copied_bytes;
        // A finished resync's rate is over its run, not up to now.
        let until = if p.resync_running || p.resync_finished_ms == 0 {
            crate::meta_service::unix_ms()
        } else {
            p.resync_finished_ms
        };
        let elapsed_ms = until.saturating_sub(p.resync_started_ms);
        if p.resync_started_ms > 0 && elapsed_ms > 0 {
            r.rate_bytes_per_sec = p.resync_done_bytes * 1000 / elapsed_ms;
        }
        if r.rate_bytes_per_sec > 0 && p.resync_running {
            r.eta_seconds = (p.resync_total_bytes.saturating_sub(p.resync_done_bytes))
                .div_ceil(r.rate_bytes_per_sec);
        }
    }
    let needs = r.stale_copies + r.resyncing_copies + r.lost_copies + r.down_copies > 0;
    let running = progress.as_ref().is_some_and(|(_, p)| p.resync_running);
    r.state = if running {
        "running"
    } else if needs {
        "waiting"
    } else {
        "done"
    }
    .into();
    if !running && needs {
        r.waiting_for = if !waiting_on.is_empty() {
            format!(
                "down node(s) {}: resynced when they return, or rebuilt elsewhere {} s after they went down (s2dctl repair start: now)",
                waiting_on.into_iter().collect::<Vec<_>>().join(", "),
                rebuild_after.as_secs()
            )
        } else {
            "a node to run it (within seconds)".into()
        };
    }
    (needs
        || progress
            .as_ref()
            .is_some_and(|(_, p)| p.resync_total_bytes > 0))
    .then_some(r)
}

impl ControlService {
    async fn repairs(&self) -> Result<Vec<Repair>, Status> {
        let view = self.meta().read().await.map_err(meta_status)?;
        let rebuild_after = self
            .manager()
            .cluster()
            .map_or(Duration::from_secs(300), |c| c.rebuild_after);
        let mirrored: Vec<&ms::Volume> = view
            .state
            .volumes
            .values()
            .filter(|v| v.home_node == 0)
            .collect();
        // Any up node may have run a resync: ask them all.
        let nodes: Vec<u64> = view
            .state
            .nodes
            .values()
            .filter(|n| n.state == NodeState::Up as i32)
            .map(|n| n.id)
            .collect();
        let st = self.statuses(&view, nodes.into_iter()).await;
        Ok(mirrored
            .into_iter()
            .filter_map(|v| repair_of(&view, v, &st, rebuild_after))
            .collect())
    }
}

#[tonic::async_trait]
impl RepairService for ControlService {
    async fn list_repairs(
        &self,
        _req: Request<ListRepairsRequest>,
    ) -> Result<Response<ListRepairsResponse>, Status> {
        Ok(Response::new(ListRepairsResponse {
            repairs: self.repairs().await?,
        }))
    }

    async fn repair_status(
        &self,
        req: Request<RepairStatusRequest>,
    ) -> Result<Response<Repair>, Status> {
        let id = req.into_inner().id;
        let view = self.meta().read().await.map_err(meta_status)?;
        let v = view
            .state
            .volumes
            .values()
            .find(|v| v.name == id || v.id.to_string() == id)
            .ok_or_else(|| Status::not_found(format!("repair {id} not found: no such volume")))?;
        if v.home_node != 0 {
            return Err(Status::failed_precondition(format!(
                "volume {} is simple: it has one copy and no repairs",
                v.name
            )));
        }
        let name = v.name.clone();
        Ok(Response::new(
            self.repairs()
                .await?
                .into_iter()
                .find(|r| r.volume == name)
                .unwrap_or_else(|| Repair {
                    id: v.id,
                    volume: name,
                    state: "done".into(),
                    ..Default::default()
                }),
        ))
    }

    async fn start_repair(
        &self,
        req: Request<StartRepairRequest>,
    ) -> Result<Response<StartRepairResponse>, Status> {
        let want = req.into_inner().volume;
        let view = self.meta().read().await.map_err(meta_status)?;
        let targets: Vec<ms::Volume> = view
            .state
            .volumes
            .values()
            .filter(|v| v.home_node == 0 && (want.is_empty() || v.name == want))
            .cloned()
            .collect();
        if !want.is_empty() && targets.is_empty() {
            return Err(match view.state.volumes.get(&want) {
                Some(_) => Status::failed_precondition(format!(
                    "volume {want} is simple: it has one copy and no repairs"
                )),
                None => Status::not_found(format!("volume {want} not found")),
            });
        }
        for v in &targets {
            match v.attachment.as_ref().map(|a| a.node) {
                Some(node) if node != view.this => {
                    crate::peer::run_repair(&crate::grpc::node_address(&view, node), &v.name)
                        .await
                        .map_err(|e| {
                            Status::unavailable(format!(
                                "volume {} is served by node {node}, which should run its repair: {e}",
                                v.name
                            ))
                        })?;
                }
                _ => {
                    self.manager().start_repair(&v.name, Duration::ZERO);
                }
            }
        }
        // Let the repairs begin before reporting them.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let names: Vec<&str> = targets.iter().map(|v| v.name.as_str()).collect();
        let started = self
            .repairs()
            .await?
            .into_iter()
            .filter(|r| names.contains(&r.volume.as_str()))
            .collect();
        Ok(Response::new(StartRepairResponse { started }))
    }
}
