//! The gRPC control plane of a node (what `s2dctl` talks to): every node
//! answers every request. Changes are validated here, then committed
//! through Raft ([`MetaHandle::propose`]; a follower's proposal reaches the
//! leader by itself); reads that must be current use a linearizable read.
//! Figures only the node holding a disk knows (free extents, a volume's
//! allocation) are asked of that node, with a deadline; a node that does
//! not answer is reported as unreachable, never guessed.
//!
//! Invariant: every error reaches the client as one line saying what went
//! wrong; a refused request changes nothing.

pub(crate) mod disks;
mod scrub;

use crate::catalog::{ChapCredentialRecord, ChapRecord, DEFAULT_LOGICAL_BLOCK_SIZE};
use crate::manager::{self, Manager, ManagerError, chap_to_meta, local_records};
use crate::meta_service::{MetaError, MetaHandle, MetaView};
use crate::peer;
use meta::node::Membership;
use meta::state::{
    self as ms, Command, CreateVolume as MetaCreate, InitCluster, NodeState, Op, Rejection,
    Resiliency as MetaResiliency, RetireNode, SetNodeState, SetVolumeChap as MetaSetChap,
};
use s2d_proto::v1::cluster_service_server::ClusterService;
use s2d_proto::v1::pool_service_server::PoolService;
use s2d_proto::v1::volume_service_server::VolumeService;
use s2d_proto::v1::*;
use std::collections::HashMap;
use std::sync::Arc;
use tonic::{Request, Response, Status};

pub use s2d_proto::v1::cluster_service_server::ClusterServiceServer;
pub use s2d_proto::v1::pool_service_server::PoolServiceServer;
pub use s2d_proto::v1::volume_service_server::VolumeServiceServer;

/// Name of a cluster initialised without one.
pub const DEFAULT_CLUSTER_NAME: &str = "s2d";

#[derive(Clone)]
pub struct ControlService {
    manager: Arc<Manager>,
    meta: MetaHandle,
    clients: peer::StatusClients,
}

/// What the nodes asked said about themselves, by node id.
pub(crate) type Statuses = HashMap<u64, Result<LocalStatusResponse, String>>;

fn status(e: ManagerError) -> Status {
    let msg = e.to_string();
    match e {
        ManagerError::NotFound(_) => Status::not_found(msg),
        ManagerError::NameTaken(_) => Status::already_exists(msg),
        ManagerError::BadName { .. }
        | ManagerError::BadSize { .. }
        | ManagerError::UnknownResiliency(_)
        | ManagerError::BadBlockSize(_)
        | ManagerError::BadChap(_) => Status::invalid_argument(msg),
        ManagerError::Resiliency { .. } => Status::failed_precondition(msg),
        ManagerError::PoolFull { .. } => Status::resource_exhausted(msg),
        ManagerError::Catalog(_) | ManagerError::Store(_) => {
            tracing::error!(error = %msg, "control request failed");
            Status::internal(msg)
        }
    }
}

/// A metadata error as a gRPC status.
pub fn meta_status(e: MetaError) -> Status {
    match e {
        MetaError::NoLeader { .. } | MetaError::Timeout(_) => Status::unavailable(e.to_string()),
        MetaError::Rejected(Rejection::NotFound { kind, id }) => {
            Status::not_found(format!("{kind} {id} not found"))
        }
        MetaError::Rejected(Rejection::Exists { kind: "volume", id }) => {
            Status::already_exists(format!("volume name {id} is already taken"))
        }
        MetaError::Rejected(Rejection::Exists { kind, id }) => {
            Status::already_exists(format!("{kind} {id} already exists"))
        }
        MetaError::Rejected(Rejection::Malformed(m)) => Status::invalid_argument(m),
        MetaError::Rejected(r) => Status::failed_precondition(r.to_string()),
        MetaError::Stopped | MetaError::Meta(_) => {
            tracing::error!(error = %e, "metadata request failed");
            Status::internal(e.to_string())
        }
    }
}

/// The CHAP form of the catalog from the API; a target pair must be given
/// whole or not at all.
fn chap_record(c: ChapCredentials) -> Result<ChapRecord, Status> {
    let target = match (c.target_user.is_empty(), c.target_secret.is_empty()) {
        (true, true) => None,
        (false, false) => Some(ChapCredentialRecord {
            user: c.target_user,
            secret: c.target_secret,
        }),
        _ => {
            return Err(Status::invalid_argument(
                "bad CHAP settings: give both the target user and the target secret for mutual CHAP, or neither",
            ));
        }
    };
    Ok(ChapRecord {
        initiator: ChapCredentialRecord {
            user: c.user,
            secret: c.secret,
        },
        target,
    })
}

pub fn node_state_name(s: i32) -> &'static str {
    match NodeState::try_from(s) {
        Ok(NodeState::Up) => "up",
        Ok(NodeState::Down) => "down",
        Ok(NodeState::Maintenance) => "draining",
        Ok(NodeState::Retired) => "retired",
        Err(_) => "unknown",
    }
}

/// This node's disks as the API shows them.
pub fn local_disks(manager: &Manager, node_name: &str) -> Vec<Disk> {
    let es = manager.store().extent_size();
    manager
        .store()
        .status()
        .into_iter()
        .map(|d| {
            let free = d.extents_free * es;
            Disk {
                path: d.path.display().to_string(),
                disk_id: d.disk_id.to_string(),
                capacity_bytes: d.capacity_bytes,
                used_bytes: d.capacity_bytes - free,
                free_bytes: free,
                extents_total: d.extents_total,
                extents_free: d.extents_free,
                extents_quarantined: d.extents_quarantined,
                io_engine: d.engine.to_string(),
                node: node_name.to_string(),
                ..Default::default()
            }
        })
        .collect()
}

fn api_node(view: &MetaView, n: &ms::Node) -> Node {
    let disks: Vec<_> = view
        .state
        .disks
        .values()
        .filter(|d| d.node == n.id)
        .collect();
    let role = if n.state == NodeState::Retired as i32 {
        "none"
    } else if n.voter {
        "voter"
    } else {
        "learner"
    };
    Node {
        id: n.id,
        name: n.name.clone(),
        address: n.address.clone(),
        fault_domain: n.fault_domain.join("/"),
        state: node_state_name(n.state).into(),
        role: role.into(),
        leader: view.leader == n.id,
        disks: disks.len() as u32,
        capacity_bytes: disks.iter().map(|d| d.capacity_bytes).sum(),
        nbd_address: n.nbd_address.clone(),
        iscsi_address: n.iscsi_address.clone(),
        slab_copies: view
            .state
            .volumes
            .values()
            .flat_map(|v| v.slabs.values())
            .filter(|s| {
                s.replicas
                    .iter()
                    .any(|r| r.node == n.id && r.extent != meta::state::UNPLACED)
            })
            .count() as u64,
        simple_volumes: view
            .state
            .volumes
            .values()
            .filter(|v| v.home_node == n.id)
            .count() as u32,
    }
}

/// The gRPC address of node `id` (empty when unknown).
pub(crate) fn node_address(view: &MetaView, id: u64) -> String {
    view.state
        .nodes
        .get(&id)
        .map(|n| n.address.clone())
        .unwrap_or_default()
}

fn find_node<'a>(view: &'a MetaView, key: &str) -> Result<&'a ms::Node, Status> {
    let by_id = key.parse::<u64>().ok();
    let mut live = view.state.nodes.values().filter(|n| {
        (n.name == key || n.address == key || Some(n.id) == by_id)
            && n.state != NodeState::Retired as i32
    });
    live.next()
        .ok_or_else(|| Status::not_found(format!("node {key} not found")))
}

impl ControlService {
    pub(crate) fn meta(&self) -> &MetaHandle {
        &self.meta
    }

    pub(crate) fn manager(&self) -> &Arc<Manager> {
        &self.manager
    }

    pub fn new(manager: Arc<Manager>, meta: MetaHandle) -> ControlService {
        ControlService {
            manager,
            meta,
            clients: peer::StatusClients::default(),
        }
    }

    fn this_name(&self, view: &MetaView) -> String {
        view.state
            .nodes
            .get(&view.this)
            .map_or(String::new(), |n| n.name.clone())
    }

    /// Asks each of `nodes` for its local status, concurrently; this node
    /// answers itself.
    pub(crate) async fn statuses(
        &self,
        view: &MetaView,
        nodes: impl Iterator<Item = u64>,
    ) -> Statuses {
        let mut out = Statuses::new();
        let mut asks = Vec::new();
        for id in nodes {
            if id == view.this {
                let name = self.this_name(view);
                out.insert(
                    id,
                    Ok(LocalStatusResponse {
                        node_id: id,
                        disks: local_disks(&self.manager, &name),
                        volumes: self.manager.allocations().await,
                    }),
                );
            } else if let Some(n) = view.state.nodes.get(&id) {
                let address = n.address.clone();
                let clients = &self.clients;
                asks.push(async move { (id, peer::local_status(clients, &address).await) });
            }
        }
        out.extend(futures::future::join_all(asks).await);
        out
    }

    /// Makes this node's volumes match `view` now (the watcher does it too,
    /// but a reply must already see the change).
    async fn sync_local(&self, view: &MetaView) {
        self.manager
            .sync(local_records(&view.state, view.this))
            .await;
    }

    fn api_volume(&self, view: &MetaView, v: &ms::Volume, st: &Statuses) -> Volume {
        let rec = manager::record_from_meta(v);
        let es = self.manager.store().extent_size();
        let mirrored = v.home_node == 0;
        let attached = v
            .attachment
            .as_ref()
            .and_then(|a| view.state.nodes.get(&a.node));
        // A mirrored volume is served by whichever node a client uses; its
        // URIs name this node.
        let home = if mirrored {
            view.state.nodes.get(&view.this)
        } else {
            view.state.nodes.get(&v.home_node)
        };
        let (alloc, reachable) = if mirrored {
            let n = v.slabs.len() as u64;
            (
                Some(VolumeAllocation {
                    name: v.name.clone(),
                    slabs_allocated: n,
                    slabs_total: v.size_bytes.div_ceil(es),
                    allocated_bytes: n * es,
                    ..Default::default()
                }),
                true,
            )
        } else {
            match st.get(&v.home_node) {
                Some(Ok(s)) => (s.volumes.iter().find(|a| a.name == v.name).cloned(), true),
                _ => (None, false),
            }
        };
        let alloc = alloc.unwrap_or_default();
        let resync = v
            .attachment
            .as_ref()
            .and_then(|a| st.get(&a.node))
            .and_then(|s| s.as_ref().ok())
            .and_then(|s| s.volumes.iter().find(|a| a.name == v.name))
            .map(|a| (a.resync_done_bytes, a.resync_total_bytes));
        let node_name = |id: u64| {
            view.state
                .nodes
                .get(&id)
                .map_or_else(|| format!("node-{id}"), |n| n.name.clone())
        };
        let slabs = v
            .slabs
            .iter()
            .map(|(n, s)| SlabInfo {
                slab: *n,
                epoch: s.epoch,
                replicas: s
                    .replicas
                    .iter()
                    .map(|r| SlabReplica {
                        node: node_name(r.node),
                        state: match ms::ReplicaState::try_from(r.state) {
                            Ok(ms::ReplicaState::Current) => "current",
                            Ok(ms::ReplicaState::Stale) => "stale",
                            Ok(ms::ReplicaState::Rebuilding) => "resyncing",
                            Err(_) => "unknown",
                        }
                        .into(),
                    })
                    .collect(),
            })
            .collect();
        let iscsi_target = iscsi_target::target_iqn(&v.name);
        let iscsi_address = home.map_or("", |n| n.iscsi_address.as_str());
        Volume {
            nbd_uri: home.map_or(String::new(), |n| {
                format!("nbd://{}/{}", n.nbd_address, v.name)
            }),
            iscsi_uri: if iscsi_address.is_empty() {
                String::new()
            } else {
                format!("iscsi://{iscsi_address}/{iscsi_target}/0")
            },
            iscsi_target,
            block_size_bytes: rec.logical_block_size,
            chap_enabled: rec.chap.is_some(),
            mutual_chap: rec.chap.as_ref().is_some_and(|c| c.target.is_some()),
            name: rec.name,
            id: rec.id,
            size_bytes: rec.size,
            resiliency: rec.resiliency,
            allocated_bytes: alloc.allocated_bytes,
            slabs_allocated: alloc.slabs_allocated,
            slabs_total: if reachable {
                alloc.slabs_total
            } else {
                v.size_bytes.div_ceil(self.manager.store().extent_size())
            },
            node: if mirrored {
                attached.map_or(String::new(), |n| n.name.clone())
            } else {
                home.map_or(String::new(), |n| n.name.clone())
            },
            node_reachable: reachable,
            slabs,
            attached_to: attached.map_or(String::new(), |n| n.name.clone()),
            resync_done_bytes: resync.map_or(0, |r| r.0),
            resync_total_bytes: resync.map_or(0, |r| r.1),
        }
    }

    async fn show(&self, view: &MetaView, name: &str) -> Result<Volume, Status> {
        let v = view
            .state
            .volumes
            .get(name)
            .ok_or_else(|| status(ManagerError::NotFound(name.into())))?;
        let ask = [v.home_node, v.attachment.as_ref().map_or(0, |a| a.node)];
        let st = self.statuses(view, ask.into_iter()).await;
        Ok(self.api_volume(view, v, &st))
    }

    /// Picks the node that stores a new simple volume: placement's choice
    /// among the up nodes that answer, by their free extents now.
    async fn place_simple(&self, view: &MetaView) -> Result<u64, Status> {
        let es = self.manager.store().extent_size();
        let candidates: Vec<&ms::Node> = view
            .state
            .nodes
            .values()
            .filter(|n| n.state == NodeState::Up as i32)
            .collect();
        let mut st = self.statuses(view, candidates.iter().map(|n| n.id)).await;
        let (mut free, mut capacity) = (0, 0);
        for s in st.values().flatten() {
            for d in &s.disks {
                free += d.free_bytes;
                capacity += d.capacity_bytes;
            }
        }
        // Volumes are thin: a node's free extents do not show the volumes
        // it already holds. Count their unwritten slabs as taken (keeping at
        // least one extent free where one is), so new volumes spread over
        // the nodes instead of piling onto the emptiest one.
        for s in st.values_mut().flatten() {
            let mut promised: u64 = s
                .volumes
                .iter()
                .map(|a| a.slabs_total.saturating_sub(a.slabs_allocated))
                .sum();
            for d in &mut s.disks {
                let take = promised.min(d.extents_free.saturating_sub(1));
                d.extents_free -= take;
                promised -= take;
            }
        }
        let topo = topology(es, &candidates, &st);
        match placement::allocate_slab(&topo, placement::Resiliency::SIMPLE, None) {
            Ok(layout) => layout
                .extents
                .first()
                .map(|e| u64::from(e.node.0))
                .ok_or_else(|| status(ManagerError::PoolFull { free, capacity })),
            Err(placement::PlacementError::PoolFull { .. })
            | Err(placement::PlacementError::NotEnoughFaultDomains { .. }) => {
                Err(status(ManagerError::PoolFull { free, capacity }))
            }
            Err(e) => Err(Status::failed_precondition(format!(
                "cannot place the volume: {e}"
            ))),
        }
    }

    /// Refuses a resiliency the cluster cannot hold now, saying why.
    fn check_resiliency(&self, view: &MetaView, r: &str) -> Result<(), Status> {
        let copies = match r {
            "mirror-2" => 2,
            "mirror-3" => 3,
            _ => return Ok(()),
        };
        match mirror_nodes(view, copies, view.this) {
            Ok(_) => Ok(()),
            Err(why) => Err(status(ManagerError::Resiliency {
                resiliency: r.into(),
                why: format!("with the current nodes: {why}"),
            })),
        }
    }
}

/// The nodes that get the copies of a new mirrored slab, `prefer` first
/// when placement can, with their replication addresses: placement's
/// choice from the metadata (node states, disk capacity, extents the
/// metadata records as used).
pub fn mirror_nodes(
    view: &MetaView,
    copies: usize,
    prefer: u64,
) -> Result<Vec<(u64, Option<std::net::SocketAddr>)>, String> {
    use placement::NodeId;
    let (topo, known) = crate::topology::from_meta(view, |n| {
        n.state == NodeState::Up as i32 && !n.replication_address.is_empty()
    })?;
    let r = placement::Resiliency::mirror(copies).map_err(|e| e.to_string())?;
    let prefer = known.contains(&prefer).then_some(NodeId(prefer as u32));
    let layout = placement::allocate_slab(&topo, r, prefer).map_err(|e| match e {
        placement::PlacementError::NotEnoughFaultDomains { needed, available, .. } => format!(
            "mirror-{copies} needs {needed} up nodes in distinct fault domains, the cluster has {available}"
        ),
        e => e.to_string(),
    })?;
    Ok(layout
        .extents
        .iter()
        .map(|e| {
            let id = u64::from(e.node.0);
            let addr = view
                .state
                .nodes
                .get(&id)
                .and_then(|n| n.replication_address.parse().ok());
            (id, addr)
        })
        .collect())
}

/// Placement's picture of `nodes` from what they said about their disks;
/// nodes that did not answer are left out.
fn topology(es: u64, nodes: &[&ms::Node], st: &Statuses) -> placement::Topology {
    use placement::{DiskId, DiskSpec, FaultDomain, NodeId, Topology};
    let mut topo = match Topology::new(es) {
        Ok(t) => t,
        Err(e) => {
            tracing::error!(error = %e, "placement refused the extent size");
            return Topology::new(1 << 20).unwrap_or_else(|_| unreachable!("1 MiB is valid"));
        }
    };
    for n in nodes {
        let Some(Ok(s)) = st.get(&n.id) else { continue };
        let path = if n.fault_domain.is_empty() {
            n.name.clone()
        } else {
            n.fault_domain.join("/")
        };
        let domain =
            FaultDomain::parse(&path).or_else(|_| FaultDomain::parse(&format!("node-{}", n.id)));
        let Ok(domain) = domain else { continue };
        let id = NodeId(n.id as u32);
        if topo.add_node(id, domain, placement::NodeState::Up).is_err() {
            continue;
        }
        for (i, d) in s.disks.iter().enumerate() {
            let spec = DiskSpec {
                id: DiskId((u128::from(n.id) << 64) | i as u128),
                capacity_extents: d.extents_total,
                free_extents: d.extents_free,
                state: placement::DiskState::Healthy,
            };
            let _ = topo.add_disk(id, spec);
        }
    }
    topo
}

#[tonic::async_trait]
impl VolumeService for ControlService {
    async fn create_volume(
        &self,
        req: Request<CreateVolumeRequest>,
    ) -> Result<Response<Volume>, Status> {
        let r = req.into_inner();
        let resiliency = if r.resiliency.is_empty() {
            "simple"
        } else {
            &r.resiliency
        };
        let block_size = match r.block_size_bytes {
            0 => DEFAULT_LOGICAL_BLOCK_SIZE,
            b => b,
        };
        let chap = r.chap.map(chap_record).transpose()?;
        manager::validate_name(&r.name).map_err(status)?;
        manager::validate_size(r.size_bytes).map_err(status)?;
        manager::validate_resiliency(resiliency).map_err(status)?;
        manager::validate_block_size(block_size).map_err(status)?;
        if let Some(c) = &chap {
            manager::validate_chap(c).map_err(status)?;
        }
        let view = self.meta.read().await.map_err(meta_status)?;
        if view.state.volumes.contains_key(&r.name) {
            return Err(status(ManagerError::NameTaken(r.name)));
        }
        self.check_resiliency(&view, resiliency)?;
        let (home, meta_resiliency) = match resiliency {
            "mirror-2" => (0, MetaResiliency::TwoWayMirror),
            "mirror-3" => (0, MetaResiliency::ThreeWayMirror),
            _ => (self.place_simple(&view).await?, MetaResiliency::Simple),
        };
        let view = self
            .meta
            .propose(Op::CreateVolume(MetaCreate {
                name: r.name.clone(),
                size_bytes: r.size_bytes,
                resiliency: meta_resiliency as i32,
                home_node: home,
                block_size,
                chap: chap.as_ref().map(chap_to_meta),
            }))
            .await
            .map_err(meta_status)?;
        if home == view.this {
            self.sync_local(&view).await;
        }
        let home = if home == 0 {
            "any".to_string()
        } else {
            home.to_string()
        };
        tracing::info!(volume = %r.name, size = r.size_bytes, resiliency, block_size, chap = chap.is_some(), home, "volume created");
        Ok(Response::new(self.show(&view, &r.name).await?))
    }

    async fn list_volumes(
        &self,
        _req: Request<ListVolumesRequest>,
    ) -> Result<Response<ListVolumesResponse>, Status> {
        let view = self.meta.read().await.map_err(meta_status)?;
        let mut homes: Vec<u64> = view
            .state
            .volumes
            .values()
            .flat_map(|v| [v.home_node, v.attachment.as_ref().map_or(0, |a| a.node)])
            .collect();
        homes.sort_unstable();
        homes.dedup();
        let st = self.statuses(&view, homes.into_iter()).await;
        let volumes = view
            .state
            .volumes
            .values()
            .map(|v| self.api_volume(&view, v, &st))
            .collect();
        Ok(Response::new(ListVolumesResponse { volumes }))
    }

    async fn get_volume(&self, req: Request<GetVolumeRequest>) -> Result<Response<Volume>, Status> {
        let view = self.meta.read().await.map_err(meta_status)?;
        Ok(Response::new(
            self.show(&view, &req.into_inner().name).await?,
        ))
    }

    async fn resize_volume(
        &self,
        req: Request<ResizeVolumeRequest>,
    ) -> Result<Response<Volume>, Status> {
        let r = req.into_inner();
        manager::validate_size(r.size_bytes).map_err(status)?;
        let view = self.meta.read().await.map_err(meta_status)?;
        let v = view
            .state
            .volumes
            .get(&r.name)
            .ok_or_else(|| status(ManagerError::NotFound(r.name.clone())))?;
        if r.size_bytes > v.size_bytes {
            let st = self.statuses(&view, std::iter::once(v.home_node)).await;
            if let Some(Ok(s)) = st.get(&v.home_node) {
                let free: u64 = s.disks.iter().map(|d| d.free_bytes).sum();
                let capacity: u64 = s.disks.iter().map(|d| d.capacity_bytes).sum();
                if free == 0 {
                    return Err(status(ManagerError::PoolFull { free, capacity }));
                }
            }
        }
        let view = self
            .meta
            .propose(Op::ResizeVolume(ms::ResizeVolume {
                name: r.name.clone(),
                size_bytes: r.size_bytes,
            }))
            .await
            .map_err(meta_status)?;
        self.sync_local(&view).await;
        self.trim_mirror_tail(&view, &r.name).await;
        tracing::info!(volume = %r.name, size = r.size_bytes, "volume resized");
        Ok(Response::new(self.show(&view, &r.name).await?))
    }

    async fn delete_volume(
        &self,
        req: Request<DeleteVolumeRequest>,
    ) -> Result<Response<DeleteVolumeResponse>, Status> {
        let name = req.into_inner().name;
        let view = self
            .meta
            .propose(Op::DeleteVolume(ms::DeleteVolume { name: name.clone() }))
            .await
            .map_err(meta_status)?;
        self.sync_local(&view).await;
        tracing::info!(volume = %name, "volume deleted");
        Ok(Response::new(DeleteVolumeResponse {}))
    }

    async fn verify_volume(
        &self,
        req: Request<VerifyVolumeRequest>,
    ) -> Result<Response<VerifyVolumeResponse>, Status> {
        let name = req.into_inner().name;
        let r = self.verify(&name).await?;
        tracing::info!(volume = %name, identical = r.identical, differences = r.differences.len(), "volume verified");
        Ok(Response::new(r))
    }

    async fn set_volume_chap(
        &self,
        req: Request<SetVolumeChapRequest>,
    ) -> Result<Response<Volume>, Status> {
        let r = req.into_inner();
        let chap = r.chap.map(chap_record).transpose()?;
        if let Some(c) = &chap {
            manager::validate_chap(c).map_err(status)?;
        }
        let mode = match &chap {
            None => "off",
            Some(c) if c.target.is_some() => "mutual",
            Some(_) => "one-way",
        };
        let view = self
            .meta
            .propose(Op::SetVolumeChap(MetaSetChap {
                volume: r.name.clone(),
                chap: chap.as_ref().map(chap_to_meta),
            }))
            .await
            .map_err(meta_status)?;
        self.sync_local(&view).await;
        tracing::info!(volume = %r.name, chap = mode, "volume CHAP changed");
        Ok(Response::new(self.show(&view, &r.name).await?))
    }
}

impl ControlService {
    /// After a mirrored volume shrank to a size inside a slab, the copies
    /// of that slab forget the blocks past the new end (trimmed), so they
    /// read as zeros if the volume grows again. A copy that misses the
    /// trim is stale or becomes so; resync compares checksums, so holes
    /// propagate.
    async fn trim_mirror_tail(&self, view: &MetaView, name: &str) {
        let Some(v) = view.state.volumes.get(name).filter(|v| v.home_node == 0) else {
            return;
        };
        let es = self.manager.store().extent_size();
        let Some(c) = self.manager.cluster() else {
            return;
        };
        if v.size_bytes.is_multiple_of(es) {
            return;
        }
        let slab = v.size_bytes / es;
        let Some(s) = v.slabs.get(&slab) else {
            return;
        };
        let off = (v.size_bytes % es).div_ceil(block_api::BLOCK_SIZE as u64)
            * block_api::BLOCK_SIZE as u64;
        if off >= es {
            return;
        }
        for r in s
            .replicas
            .iter()
            .filter(|r| r.state != ms::ReplicaState::Stale as i32)
        {
            let req = replication::Request::Trim {
                volume: v.id,
                slab,
                epoch: s.epoch,
                offset: off,
                len: es - off,
            };
            let ok = if r.node == view.this {
                matches!(c.local.serve(req).await, replication::Response::Ok)
            } else if let Some(a) = view
                .state
                .nodes
                .get(&r.node)
                .and_then(|n| n.replication_address.parse::<std::net::SocketAddr>().ok())
            {
                matches!(
                    c.transport
                        .call(a, req, crate::mirror::REPLICA_TIMEOUT)
                        .await,
                    Ok(replication::Response::Ok)
                )
            } else {
                false
            };
            if !ok {
                tracing::warn!(
                    volume = name,
                    slab,
                    node = r.node,
                    "could not trim the tail past the new end on a copy"
                );
            }
        }
    }
}

/// Blocks compared per request while verifying.
const VERIFY_CHUNK_BLOCKS: u64 = 256;

impl ControlService {
    /// Compares the current copies of every slab of a mirrored volume: reads
    /// every copy's data (each node checks it against its stored checksums)
    /// and compares the bytes.
    async fn verify(&self, name: &str) -> Result<VerifyVolumeResponse, Status> {
        let view = self.meta.read().await.map_err(meta_status)?;
        let v = view
            .state
            .volumes
            .get(name)
            .ok_or_else(|| status(ManagerError::NotFound(name.into())))?;
        if v.home_node != 0 {
            return Err(Status::failed_precondition(format!(
                "volume {name} is simple: it has one copy, nothing to compare"
            )));
        }
        let c = self
            .manager
            .cluster()
            .ok_or_else(|| Status::unavailable("this node's replication is not running yet"))?;
        let es = self.manager.store().extent_size();
        let bs = block_api::BLOCK_SIZE as u64;
        let mut out = VerifyVolumeResponse {
            name: name.into(),
            identical: true,
            ..Default::default()
        };
        for (slab, s) in &v.slabs {
            out.slabs_checked += 1;
            let mut reps = Vec::new();
            for r in &s.replicas {
                let who = view
                    .state
                    .nodes
                    .get(&r.node)
                    .map_or_else(|| format!("node-{}", r.node), |n| n.name.clone());
                if r.state != ms::ReplicaState::Current as i32 {
                    out.skipped
                        .push(format!("slab {slab}: copy on {who} is not current"));
                    continue;
                }
                let addr = view
                    .state
                    .nodes
                    .get(&r.node)
                    .and_then(|n| n.replication_address.parse::<std::net::SocketAddr>().ok());
                reps.push((r.node, who, addr));
            }
            let mut diff_blocks = 0u64;
            let mut first_diff = None;
            let mut detail = String::new();
            let mut block = 0u64;
            'chunks: while block * bs < es {
                let blocks = VERIFY_CHUNK_BLOCKS.min(es / bs - block);
                // Each copy's data, read (and so checked against its stored
                // checksums) on its node; holes read as zeros.
                let mut datas: Vec<(String, Vec<u8>)> = Vec::new();
                for (node, who, addr) in &reps {
                    let req = replication::Request::Read {
                        volume: v.id,
                        slab: *slab,
                        epoch: s.epoch,
                        offset: block * bs,
                        len: (blocks * bs) as u32,
                    };
                    let resp = if *node == view.this {
                        Ok(c.local.serve(req).await)
                    } else if let Some(a) = addr {
                        c.transport
                            .call(*a, req, crate::mirror::REPLICA_TIMEOUT)
                            .await
                            .map_err(|e| e.to_string())
                    } else {
                        Err("no replication address".to_string())
                    };
                    match resp {
                        Ok(replication::Response::Data(b)) => datas.push((who.clone(), b.to_vec())),
                        Ok(replication::Response::Error {
                            code: replication::ErrorCode::Checksum,
                            message,
                        }) => {
                            // A bad block in this chunk: a difference.
                            diff_blocks += 1;
                            if first_diff.is_none() {
                                first_diff = Some(block * bs);
                                detail = format!("copy on {who} fails its checksum: {message}");
                            }
                        }
                        Ok(replication::Response::Error { message, .. }) => {
                            out.skipped
                                .push(format!("slab {slab}: copy on {who}: {message}"));
                            out.identical = false;
                            break 'chunks;
                        }
                        Ok(_) => {
                            out.skipped
                                .push(format!("slab {slab}: copy on {who}: unexpected reply"));
                            out.identical = false;
                            break 'chunks;
                        }
                        Err(e) => {
                            out.skipped.push(format!("slab {slab}: copy on {who}: {e}"));
                            out.identical = false;
                            break 'chunks;
                        }
                    }
                }
                if let Some((first_who, first)) = datas.first() {
                    for (i, want) in first.chunks(bs as usize).enumerate() {
                        let odd = datas
                            .iter()
                            .skip(1)
                            .find(|(_, o)| o.chunks(bs as usize).nth(i).is_none_or(|x| x != want));
                        if let Some((who, _)) = odd {
                            diff_blocks += 1;
                            if first_diff.is_none() {
                                first_diff = Some((block + i as u64) * bs);
                                detail = format!("copies on {first_who} and {who} differ");
                            }
                        }
                    }
                }
                out.blocks_checked += blocks;
                block += blocks;
            }
            if let Some(offset) = first_diff {
                out.identical = false;
                out.differences.push(SlabDifference {
                    slab: *slab,
                    offset,
                    blocks: diff_blocks,
                    detail,
                });
            }
        }
        Ok(out)
    }
}

#[tonic::async_trait]
impl PoolService for ControlService {
    async fn remove_disk(&self, req: Request<DiskRequest>) -> Result<Response<Disk>, Status> {
        self.remove_disk_now(req).await
    }

    async fn add_disk(&self, req: Request<AddDiskRequest>) -> Result<Response<Disk>, Status> {
        self.add_disk_now(req).await
    }

    async fn rebalance(
        &self,
        _req: Request<RebalanceRequest>,
    ) -> Result<Response<RebalanceResponse>, Status> {
        self.rebalance_now().await
    }

    async fn scrub(&self, _req: Request<ScrubRequest>) -> Result<Response<ScrubResponse>, Status> {
        self.scrub_now().await
    }

    async fn scrub_status(
        &self,
        _req: Request<ScrubRequest>,
    ) -> Result<Response<ScrubResponse>, Status> {
        self.scrub_status_now().await
    }

    async fn pool_status(
        &self,
        _req: Request<PoolStatusRequest>,
    ) -> Result<Response<PoolStatusResponse>, Status> {
        let view = self.meta.read().await.map_err(meta_status)?;
        let es = self.manager.store().extent_size();
        let live: Vec<&ms::Node> = view
            .state
            .nodes
            .values()
            .filter(|n| n.state != NodeState::Retired as i32)
            .collect();
        let st = self.statuses(&view, live.iter().map(|n| n.id)).await;
        let mut disks = Vec::new();
        let mut nodes = Vec::new();
        for n in &live {
            let mut np = NodePool {
                id: n.id,
                name: n.name.clone(),
                state: node_state_name(n.state).into(),
                ..Default::default()
            };
            if let Some(Ok(s)) = st.get(&n.id) {
                np.reachable = true;
                np.disks = s.disks.len() as u32;
                let mut node_disks = s.disks.clone();
                disks::annotate(&view, n.id, &mut node_disks);
                for d in &node_disks {
                    np.capacity_bytes += d.capacity_bytes;
                    np.used_bytes += d.used_bytes;
                    np.free_bytes += d.free_bytes;
                    let mut d = d.clone();
                    d.node = n.name.clone();
                    disks.push(d);
                }
            }
            nodes.push(np);
        }
        let up: Vec<&ms::Node> = live
            .iter()
            .copied()
            .filter(|n| n.state == NodeState::Up as i32)
            .collect();
        let topo = topology(es, &up, &st);
        let usable = [
            ("simple", placement::Resiliency::SIMPLE),
            ("mirror-2", placement::Resiliency::MIRROR_2),
            ("mirror-3", placement::Resiliency::MIRROR_3),
        ]
        .into_iter()
        .map(|(name, r)| {
            let c = placement::capacity(&topo, r);
            let domains = topo.nodes().len();
            UsableCapacity {
                resiliency: name.into(),
                bytes: c.usable_free_bytes,
                note: if domains < r.width() {
                    format!(
                        "needs {} up nodes in distinct fault domains, {domains} answer",
                        r.width()
                    )
                } else if c.usable_free_bytes == 0 {
                    "no free space".into()
                } else {
                    String::new()
                },
            }
        })
        .collect();
        let capacity: u64 = nodes.iter().map(|n| n.capacity_bytes).sum();
        let free: u64 = nodes.iter().map(|n| n.free_bytes).sum();
        Ok(Response::new(PoolStatusResponse {
            pool_id: self.manager.pool_id(),
            node_id: view.this.to_string(),
            extent_size_bytes: es,
            capacity_bytes: capacity,
            used_bytes: capacity - free,
            free_bytes: free,
            provisioned_bytes: view.state.volumes.values().map(|v| v.size_bytes).sum(),
            volumes: view.state.volumes.len() as u64,
            disks,
            nodes,
            usable,
        }))
    }
}

impl ControlService {
    fn cluster_status_of(&self, view: &MetaView) -> ClusterStatus {
        let st = &view.state;
        ClusterStatus {
            name: if st.cluster_name.is_empty() {
                String::new()
            } else {
                st.cluster_name.clone()
            },
            initialized: !st.cluster_name.is_empty(),
            this_node_id: view.this,
            leader_id: view.leader,
            leader_name: st
                .nodes
                .get(&view.leader)
                .map_or(String::new(), |n| n.name.clone()),
            term: view.term,
            applied_index: view.applied,
            voters: view.voters.len() as u32,
            learners: view.learners.len() as u32,
            nodes: st.nodes.values().map(|n| api_node(view, n)).collect(),
            extent_size_bytes: st.settings.as_ref().map_or(0, |s| s.extent_size_bytes),
        }
    }
}

#[tonic::async_trait]
impl ClusterService for ControlService {
    async fn init_cluster(
        &self,
        req: Request<InitClusterRequest>,
    ) -> Result<Response<ClusterStatus>, Status> {
        let mut name = req.into_inner().name;
        if name.is_empty() {
            name = DEFAULT_CLUSTER_NAME.into();
        }
        let view = self
            .meta
            .propose(Op::InitCluster(InitCluster { name: name.clone() }))
            .await
            .map_err(meta_status)?;
        tracing::info!(cluster = %name, "cluster initialised: nodes may join");
        Ok(Response::new(self.cluster_status_of(&view)))
    }

    async fn cluster_status(
        &self,
        _req: Request<ClusterStatusRequest>,
    ) -> Result<Response<ClusterStatus>, Status> {
        // The local view: it answers without a quorum, which is when an
        // operator needs it most.
        let view = self.meta.view();
        Ok(Response::new(self.cluster_status_of(&view)))
    }

    async fn health(
        &self,
        _req: Request<HealthRequest>,
    ) -> Result<Response<HealthResponse>, Status> {
        let view = self.meta.read().await.map_err(meta_status)?;
        let st = &view.state;
        let now = crate::meta_service::unix_ms();
        let mut problems = Vec::new();
        let mut repairs = Vec::new();
        for n in st.nodes.values() {
            if n.state == NodeState::Down as i32 {
                let since = if n.down_since_ms > 0 {
                    format!(" for {} s", now.saturating_sub(n.down_since_ms) / 1000)
                } else {
                    String::new()
                };
                problems.push(format!("node {} is down{since}", n.name));
            }
        }
        for d in st.disks.values() {
            if d.state == ms::DiskState::Failed as i32 {
                let node = st.nodes.get(&d.node);
                if node.is_none_or(|n| n.state == NodeState::Retired as i32) {
                    continue;
                }
                problems.push(format!(
                    "disk {} of node {} failed (too many I/O errors or checksum failures); its copies are rebuilt elsewhere; replace it",
                    d.id & 0xffff,
                    node.map_or(String::new(), |n| n.name.clone())
                ));
            }
        }
        let name_of = |id: u64| {
            st.nodes
                .get(&id)
                .map_or_else(|| format!("node-{id}"), |n| n.name.clone())
        };
        let mut attached = Vec::new();
        for v in st.volumes.values().filter(|v| v.home_node == 0) {
            let (mut stale, mut resyncing, mut down, mut moving) = (0, 0, 0, 0);
            let mut on = std::collections::BTreeSet::new();
            let mut down_on = std::collections::BTreeSet::new();
            for s in v.slabs.values() {
                for r in &s.replicas {
                    // The new copy of a move: an extra, filling while the
                    // leaving one still counts.
                    if s.moving_from != 0
                        && r.node != s.moving_from
                        && r.state != ms::ReplicaState::Current as i32
                    {
                        moving += 1;
                        continue;
                    }
                    let node_down = st.nodes.get(&r.node).is_none_or(|n| {
                        n.state != NodeState::Up as i32 && n.state != NodeState::Maintenance as i32
                    });
                    if r.state == ms::ReplicaState::Current as i32 && node_down {
                        down += 1;
                        down_on.insert(name_of(r.node));
                    } else if r.state == ms::ReplicaState::Stale as i32 {
                        stale += 1;
                        on.insert(name_of(r.node));
                    } else if r.state == ms::ReplicaState::Rebuilding as i32 {
                        resyncing += 1;
                    }
                }
            }
            if stale > 0 {
                problems.push(format!(
                    "volume {}: {stale} stale cop{} (on {}): fewer copies than its resiliency until resynced",
                    v.name,
                    if stale == 1 { "y" } else { "ies" },
                    on.into_iter().collect::<Vec<_>>().join(", ")
                ));
            }
            if down > 0 {
                problems.push(format!(
                    "volume {}: {down} cop{} on down nodes ({})",
                    v.name,
                    if down == 1 { "y" } else { "ies" },
                    down_on.into_iter().collect::<Vec<_>>().join(", ")
                ));
            }
            if resyncing > 0 {
                repairs.push(format!("volume {}: {resyncing} copies resyncing", v.name));
            }
            if moving > 0 {
                repairs.push(format!(
                    "volume {}: {moving} copies moving off draining nodes or disks",
                    v.name
                ));
            }
            if stale + resyncing + moving > 0
                && let Some(a) = &v.attachment
            {
                attached.push((v.name.clone(), a.node));
            }
        }
        // How far the resyncs are, from the nodes running them.
        let mut nodes: Vec<u64> = attached.iter().map(|a| a.1).collect();
        nodes.sort_unstable();
        nodes.dedup();
        let statuses = self.statuses(&view, nodes.into_iter()).await;
        for (name, node) in attached {
            if let Some(Ok(s)) = statuses.get(&node)
                && let Some(a) = s
                    .volumes
                    .iter()
                    .find(|a| a.name == name && a.resync_total_bytes > 0)
                && a.resync_done_bytes < a.resync_total_bytes
            {
                repairs.push(format!(
                    "volume {name}: resync on {} at {} of {} bytes",
                    name_of(node),
                    a.resync_done_bytes,
                    a.resync_total_bytes
                ));
            }
        }
        let state = if !repairs.is_empty() {
            "repairing"
        } else if !problems.is_empty() {
            "degraded"
        } else {
            "healthy"
        };
        Ok(Response::new(HealthResponse {
            state: state.into(),
            problems,
            repairs,
        }))
    }

    async fn list_nodes(
        &self,
        _req: Request<ListNodesRequest>,
    ) -> Result<Response<ListNodesResponse>, Status> {
        let view = self.meta.read().await.map_err(meta_status)?;
        let nodes = view
            .state
            .nodes
            .values()
            .map(|n| api_node(&view, n))
            .collect();
        Ok(Response::new(ListNodesResponse { nodes }))
    }

    async fn drain_node(&self, req: Request<NodeRequest>) -> Result<Response<Node>, Status> {
        let key = req.into_inner().node;
        let view = self.meta.read().await.map_err(meta_status)?;
        let id = find_node(&view, &key)?.id;
        let view = self
            .meta
            .propose(Op::SetNodeState(SetNodeState {
                node: id,
                state: NodeState::Maintenance as i32,
                at_ms: crate::meta_service::unix_ms(),
            }))
            .await
            .map_err(meta_status)?;
        let n = view
            .state
            .nodes
            .get(&id)
            .ok_or_else(|| Status::not_found(format!("node {key} not found")))?;
        tracing::info!(node = %n.name, "node draining: its copies move to other nodes, no new volumes go to it");
        Ok(Response::new(api_node(&view, n)))
    }

    async fn retire_node(&self, req: Request<NodeRequest>) -> Result<Response<Node>, Status> {
        let key = req.into_inner().node;
        let view = self.meta.read().await.map_err(meta_status)?;
        let node = find_node(&view, &key)?;
        let id = node.id;
        if node.voter && view.voters.len() <= 1 {
            return Err(Status::failed_precondition(format!(
                "node {} is the only voter; the cluster cannot go on without it",
                node.name
            )));
        }
        if view.leader == id {
            // Hand leadership to another voter first, so the cluster keeps
            // a leader through the change.
            if let Some(to) = view.voters.iter().copied().find(|v| *v != id) {
                self.meta.transfer_leader(to).await.map_err(meta_status)?;
                let mut rx = self.meta.subscribe();
                let moved = tokio::time::timeout(
                    crate::meta_service::CHANGE_TIMEOUT,
                    rx.wait_for(|v| v.leader != 0 && v.leader != id),
                )
                .await;
                if !matches!(moved, Ok(Ok(_))) {
                    return Err(Status::unavailable(format!(
                        "node {} leads the cluster and leadership could not be handed over; retry",
                        node.name
                    )));
                }
            }
        }
        let view = self
            .meta
            .change(Membership::Remove(Command::new(Op::RetireNode(
                RetireNode { node: id },
            ))))
            .await
            .map_err(meta_status)?;
        let n = view
            .state
            .nodes
            .get(&id)
            .ok_or_else(|| Status::not_found(format!("node {key} not found")))?;
        tracing::info!(node = %n.name, "node retired");
        Ok(Response::new(api_node(&view, n)))
    }
}
