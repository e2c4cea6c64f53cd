//! What storaged nodes ask each other over their gRPC port: Raft message
//! batches, joins, and each node's local disk and allocation figures.
//! Also the client side of those calls.
//!
//! Invariants:
//! - A malformed batch is refused whole with `invalid_argument`; nothing of
//!   it reaches Raft.
//! - A join is decided on a linearizable view and committed as one
//!   membership change (state and Raft configuration together); a join
//!   retried after it committed gets the same node id back.
//! - Every outgoing call has a deadline.

use crate::grpc::{local_disks, meta_status};
use crate::manager::Manager;
use crate::meta_service::{MetaHandle, wanted_voters};
use meta::node::Membership;
use meta::protobuf::Message as _;
use meta::raft::eraftpb::Message as RaftMessage;
use meta::state::{AddNode, Command, MAX_NODES, NodeState, Op};
use s2d_proto::v1::peer_service_client::PeerServiceClient;
use s2d_proto::v1::peer_service_server::PeerService;
use s2d_proto::v1::*;
use std::sync::Arc;
use std::time::Duration;
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Response, Status};

pub use s2d_proto::v1::peer_service_server::PeerServiceServer;

/// Largest gRPC message between nodes (a metadata snapshot travels whole).
pub const PEER_MESSAGE_MAX: usize = 64 << 20;
/// Deadline of a status call to another node.
pub const STATUS_TIMEOUT: Duration = Duration::from_secs(2);

/// A client for another node's peer service; connects on first use.
pub fn raft_client(
    address: &str,
    timeout: Duration,
) -> Result<PeerServiceClient<Channel>, tonic::transport::Error> {
    let channel = Endpoint::from_shared(format!("http://{address}"))?
        .connect_timeout(Duration::from_secs(1))
        .timeout(timeout)
        .tcp_nodelay(true)
        .connect_lazy();
    Ok(PeerServiceClient::new(channel)
        .max_decoding_message_size(PEER_MESSAGE_MAX)
        .max_encoding_message_size(PEER_MESSAGE_MAX))
}

/// Connections to other nodes for status calls, by address, reused across
/// calls (one HTTP/2 connection carries many).
#[derive(Clone, Default)]
pub struct StatusClients {
    clients: Arc<std::sync::Mutex<std::collections::HashMap<String, PeerServiceClient<Channel>>>>,
}

impl StatusClients {
    fn get(&self, address: &str) -> Result<PeerServiceClient<Channel>, String> {
        let mut map = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = map.get(address) {
            return Ok(c.clone());
        }
        let c = raft_client(address, STATUS_TIMEOUT).map_err(|e| e.to_string())?;
        map.insert(address.to_string(), c.clone());
        Ok(c)
    }
}

/// Asks the node at `address` for its local status.
pub async fn local_status(
    clients: &StatusClients,
    address: &str,
) -> Result<LocalStatusResponse, String> {
    let mut c = clients.get(address)?;
    match tokio::time::timeout(STATUS_TIMEOUT, c.local_status(LocalStatusRequest {})).await {
        Ok(Ok(r)) => Ok(r.into_inner()),
        Ok(Err(s)) => Err(s.message().to_string()),
        Err(_) => Err(format!("no answer within {STATUS_TIMEOUT:?}")),
    }
}

/// Asks the node at `address` to run the repair of `volume` now.
/// Asks the node at `address` to scrub `volume` now.
pub async fn run_scrub(address: &str, volume: &str) -> Result<s2d_proto::v1::VolumeScrub, String> {
    let mut c = raft_client(address, STATUS_TIMEOUT).map_err(|e| e.to_string())?;
    let req = s2d_proto::v1::GetVolumeRequest {
        name: volume.to_string(),
    };
    match tokio::time::timeout(STATUS_TIMEOUT, c.run_scrub(req)).await {
        Ok(Ok(r)) => Ok(r.into_inner()),
        Ok(Err(s)) => Err(s.message().to_string()),
        Err(_) => Err(format!("no answer within {STATUS_TIMEOUT:?}")),
    }
}

/// Asks the node at `address` to add the disk at `path` to itself.
pub async fn add_local_disk(address: &str, path: &str) -> Result<s2d_proto::v1::Disk, String> {
    let mut c = raft_client(address, STATUS_TIMEOUT).map_err(|e| e.to_string())?;
    let req = s2d_proto::v1::AddDiskRequest {
        node: String::new(),
        path: path.to_string(),
    };
    match tokio::time::timeout(STATUS_TIMEOUT, c.add_local_disk(req)).await {
        Ok(Ok(r)) => Ok(r.into_inner()),
        Ok(Err(s)) => Err(s.message().to_string()),
        Err(_) => Err(format!("no answer within {STATUS_TIMEOUT:?}")),
    }
}

pub async fn run_repair(address: &str, volume: &str) -> Result<(), String> {
    let mut c = raft_client(address, STATUS_TIMEOUT).map_err(|e| e.to_string())?;
    let req = StartRepairRequest {
        volume: volume.to_string(),
    };
    match tokio::time::timeout(STATUS_TIMEOUT, c.run_repair(req)).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(s)) => Err(s.message().to_string()),
        Err(_) => Err(format!("no answer within {STATUS_TIMEOUT:?}")),
    }
}

/// Joins the cluster that the node at `target` belongs to. Retries what
/// may pass later (no leader yet, a membership change in progress, the
/// node not up yet) for up to `patience`; a refusal is final.
pub async fn join(
    target: &str,
    req: JoinRequest,
    patience: Duration,
) -> anyhow::Result<JoinResponse> {
    let deadline = tokio::time::Instant::now() + patience;
    let mut client = raft_client(target, Duration::from_secs(10))?;
    loop {
        let err =
            match tokio::time::timeout(Duration::from_secs(10), client.join(req.clone())).await {
                Ok(Ok(r)) => return Ok(r.into_inner()),
                Ok(Err(s)) => {
                    use tonic::Code::*;
                    if matches!(
                        s.code(),
                        FailedPrecondition | ResourceExhausted | AlreadyExists | InvalidArgument
                    ) {
                        anyhow::bail!("cannot join the cluster at {target}: {}", s.message());
                    }
                    s.message().to_string()
                }
                Err(_) => "no answer within 10s".to_string(),
            };
        if tokio::time::Instant::now() >= deadline {
            anyhow::bail!("cannot join the cluster at {target}: {err}");
        }
        tracing::info!(%target, error = %err, "join not possible yet; retrying");
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// The peer service of this node.
#[derive(Clone)]
pub struct Peers {
    meta: MetaHandle,
    manager: Arc<Manager>,
    extent_size: u64,
}

impl Peers {
    pub fn new(meta: MetaHandle, manager: Arc<Manager>, extent_size: u64) -> Peers {
        Peers {
            meta,
            manager,
            extent_size,
        }
    }
}

fn validate_node_name(name: &str) -> Result<(), Status> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(Status::invalid_argument(format!(
            "bad node name {name:?}: use 1 to 64 letters, digits, '-', '_', '.' or ':'"
        )))
    }
}

#[tonic::async_trait]
impl PeerService for Peers {
    async fn raft(&self, req: Request<RaftBatch>) -> Result<Response<RaftAck>, Status> {
        let b = req.into_inner();
        if b.from_id == 0 {
            return Err(Status::invalid_argument("Raft batch without a sender id"));
        }
        let mut messages = Vec::with_capacity(b.messages.len());
        for (i, bytes) in b.messages.iter().enumerate() {
            let m = RaftMessage::parse_from_bytes(bytes).map_err(|e| {
                Status::invalid_argument(format!("Raft message {i} does not decode: {e}"))
            })?;
            if m.from != b.from_id {
                return Err(Status::invalid_argument(format!(
                    "Raft message {i} is from node {}, the batch from node {}",
                    m.from, b.from_id
                )));
            }
            messages.push(m);
        }
        self.meta
            .receive(b.from_id, b.from_address, messages)
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        Ok(Response::new(RaftAck {}))
    }

    async fn join(&self, req: Request<JoinRequest>) -> Result<Response<JoinResponse>, Status> {
        let r = req.into_inner();
        validate_node_name(&r.name)?;
        r.address.parse::<std::net::SocketAddr>().map_err(|e| {
            Status::invalid_argument(format!("bad node address {:?}: {e}", r.address))
        })?;
        let view = self.meta.read().await.map_err(meta_status)?;
        let st = &view.state;
        let here = st
            .nodes
            .get(&view.this)
            .map_or(String::new(), |n| n.address.clone());
        if st.cluster_name.is_empty() {
            return Err(Status::failed_precondition(format!(
                "the cluster is not initialised: run `s2dctl --endpoint {here} cluster init` first"
            )));
        }
        if r.extent_size_bytes != self.extent_size {
            return Err(Status::failed_precondition(format!(
                "the new node's extent size is {} bytes, the cluster's {}; start it with --extent-size {}",
                r.extent_size_bytes, self.extent_size, self.extent_size
            )));
        }
        let live: Vec<_> = st
            .nodes
            .values()
            .filter(|n| n.state != NodeState::Retired as i32)
            .collect();
        let peers = |id: u64, extra: Option<Node>| JoinResponse {
            node_id: id,
            peers: live
                .iter()
                .map(|n| Node {
                    id: n.id,
                    name: n.name.clone(),
                    address: n.address.clone(),
                    ..Default::default()
                })
                .chain(extra)
                .collect(),
            cluster_name: st.cluster_name.clone(),
        };
        if let Some(n) = live.iter().find(|n| n.address == r.address) {
            if n.name == r.name {
                // A join retried after it committed.
                return Ok(Response::new(peers(n.id, None)));
            }
            return Err(Status::already_exists(format!(
                "address {} is already node {}",
                r.address, n.name
            )));
        }
        if let Some(n) = live.iter().find(|n| n.name == r.name) {
            return Err(Status::already_exists(format!(
                "node name {} is taken by the node at {}",
                r.name, n.address
            )));
        }
        if live.len() >= MAX_NODES {
            return Err(Status::resource_exhausted(format!(
                "the cluster already has {} nodes, the most it can hold",
                live.len()
            )));
        }
        let id = st.nodes.keys().max().copied().unwrap_or(0) + 1;
        let voters = live.iter().filter(|n| n.voter).count();
        let voter = voters < wanted_voters(live.len() + 1);
        let fault_domain: Vec<String> = if r.fault_domain.is_empty() {
            vec![r.name.clone()]
        } else {
            r.fault_domain.split('/').map(str::to_string).collect()
        };
        let cmd = Command::new(Op::AddNode(AddNode {
            id,
            address: r.address.clone(),
            fault_domain,
            name: r.name.clone(),
            voter,
            nbd_address: r.nbd_address.clone(),
            iscsi_address: r.iscsi_address.clone(),
        }));
        let change = if voter {
            Membership::AddVoter(cmd)
        } else {
            Membership::AddLearner(cmd)
        };
        self.meta.change(change).await.map_err(meta_status)?;
        tracing::info!(node = %r.name, id, address = %r.address, voter, "node joined");
        let me = Node {
            id,
            name: r.name,
            address: r.address,
            ..Default::default()
        };
        Ok(Response::new(peers(id, Some(me))))
    }

    async fn run_repair(
        &self,
        req: Request<StartRepairRequest>,
    ) -> Result<Response<StartRepairResponse>, Status> {
        let name = req.into_inner().volume;
        let view = self.meta.view();
        match view.state.volumes.get(&name) {
            Some(v) if v.home_node == 0 => {}
            Some(_) => {
                return Err(Status::failed_precondition(format!(
                    "volume {name} is simple: it has no repairs"
                )));
            }
            None => return Err(Status::not_found(format!("volume {name} not found"))),
        }
        self.manager.start_repair(&name, std::time::Duration::ZERO);
        Ok(Response::new(StartRepairResponse::default()))
    }

    async fn run_scrub(
        &self,
        req: Request<s2d_proto::v1::GetVolumeRequest>,
    ) -> Result<Response<s2d_proto::v1::VolumeScrub>, Status> {
        let name = req.into_inner().name;
        if !self.meta.view().state.volumes.contains_key(&name) {
            return Err(Status::not_found(format!("volume {name} not found")));
        }
        self.manager.start_scrub(&name);
        let view = self.meta.view();
        let node = view
            .state
            .nodes
            .get(&view.this)
            .map_or(String::new(), |n| n.name.clone());
        self.manager
            .scrub_report(&name, &node)
            .map(Response::new)
            .ok_or_else(|| Status::internal(format!("the scrub of {name} did not start")))
    }

    async fn add_local_disk(
        &self,
        req: Request<s2d_proto::v1::AddDiskRequest>,
    ) -> Result<Response<s2d_proto::v1::Disk>, Status> {
        crate::grpc::disks::add_here(&self.manager, &self.meta, &req.into_inner().path)
            .await
            .map(Response::new)
    }

    async fn local_status(
        &self,
        _req: Request<LocalStatusRequest>,
    ) -> Result<Response<LocalStatusResponse>, Status> {
        let view = self.meta.view();
        let name = view
            .state
            .nodes
            .get(&view.this)
            .map_or(String::new(), |n| n.name.clone());
        Ok(Response::new(LocalStatusResponse {
            node_id: view.this,
            disks: local_disks(&self.manager, &name),
            volumes: self.manager.allocations().await,
        }))
    }
}
