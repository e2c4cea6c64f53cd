//! The gRPC control plane of a node (what `s2dctl` talks to): translates
//! requests into [`Manager`] calls and errors into gRPC status codes.
//!
//! Invariant: this is the only module that imports tonic; every error
//! reaches the client as one line saying what went wrong.

use crate::catalog::{ChapCredentialRecord, ChapRecord, DEFAULT_LOGICAL_BLOCK_SIZE};
use crate::manager::{Manager, ManagerError, VolumeInfo, VolumeOptions};
use s2d_proto::v1::pool_service_server::PoolService;
use s2d_proto::v1::volume_service_server::VolumeService;
use s2d_proto::v1::*;
use std::net::SocketAddr;
use std::sync::Arc;
use tonic::{Request, Response, Status};

pub use s2d_proto::v1::pool_service_server::PoolServiceServer;
pub use s2d_proto::v1::volume_service_server::VolumeServiceServer;

#[derive(Clone)]
pub struct ControlService {
    manager: Arc<Manager>,
    nbd_addr: SocketAddr,
    /// The iSCSI portal, when the node serves iSCSI.
    iscsi_addr: Option<SocketAddr>,
}

impl ControlService {
    pub fn new(
        manager: Arc<Manager>,
        nbd_addr: SocketAddr,
        iscsi_addr: Option<SocketAddr>,
    ) -> ControlService {
        ControlService {
            manager,
            nbd_addr,
            iscsi_addr,
        }
    }

    /// The API's view of a volume; never carries CHAP secrets.
    fn volume(&self, i: VolumeInfo) -> Volume {
        let iscsi_target = iscsi_target::target_iqn(&i.record.name);
        Volume {
            nbd_uri: format!("nbd://{}/{}", self.nbd_addr, i.record.name),
            iscsi_uri: self
                .iscsi_addr
                .map(|a| format!("iscsi://{a}/{iscsi_target}/0"))
                .unwrap_or_default(),
            iscsi_target,
            block_size_bytes: i.record.logical_block_size,
            chap_enabled: i.record.chap.is_some(),
            mutual_chap: i.record.chap.as_ref().is_some_and(|c| c.target.is_some()),
            name: i.record.name,
            id: i.record.id,
            size_bytes: i.record.size,
            resiliency: i.record.resiliency,
            allocated_bytes: i.allocated_bytes,
            slabs_allocated: i.slabs_allocated,
            slabs_total: i.slabs_total,
        }
    }
}

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
        ManagerError::Resiliency(_) => Status::failed_precondition(msg),
        ManagerError::PoolFull { .. } => Status::resource_exhausted(msg),
        ManagerError::Catalog(_) | ManagerError::Store(_) => {
            tracing::error!(error = %msg, "control request failed");
            Status::internal(msg)
        }
    }
}

/// The catalog form of CHAP credentials from the API; a target pair must be
/// given whole or not at all.
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
        let options = VolumeOptions {
            logical_block_size: match r.block_size_bytes {
                0 => DEFAULT_LOGICAL_BLOCK_SIZE,
                b => b,
            },
            chap: r.chap.map(chap_record).transpose()?,
        };
        let chap = options.chap.is_some();
        let block_size = options.logical_block_size;
        let info = self
            .manager
            .create(&r.name, r.size_bytes, resiliency, options)
            .await
            .map_err(status)?;
        tracing::info!(volume = %r.name, size = r.size_bytes, resiliency, block_size, chap, "volume created");
        Ok(Response::new(self.volume(info)))
    }

    async fn list_volumes(
        &self,
        _req: Request<ListVolumesRequest>,
    ) -> Result<Response<ListVolumesResponse>, Status> {
        let volumes = self
            .manager
            .list()
            .await
            .into_iter()
            .map(|i| self.volume(i))
            .collect();
        Ok(Response::new(ListVolumesResponse { volumes }))
    }

    async fn get_volume(&self, req: Request<GetVolumeRequest>) -> Result<Response<Volume>, Status> {
        let info = self
            .manager
            .show(&req.into_inner().name)
            .await
            .map_err(status)?;
        Ok(Response::new(self.volume(info)))
    }

    async fn resize_volume(
        &self,
        req: Request<ResizeVolumeRequest>,
    ) -> Result<Response<Volume>, Status> {
        let r = req.into_inner();
        let info = self
            .manager
            .resize(&r.name, r.size_bytes)
            .await
            .map_err(status)?;
        tracing::info!(volume = %r.name, size = r.size_bytes, "volume resized");
        Ok(Response::new(self.volume(info)))
    }

    async fn delete_volume(
        &self,
        req: Request<DeleteVolumeRequest>,
    ) -> Result<Response<DeleteVolumeResponse>, Status> {
        let name = req.into_inner().name;
        self.manager.delete(&name).await.map_err(status)?;
        tracing::info!(volume = %name, "volume deleted");
        Ok(Response::new(DeleteVolumeResponse {}))
    }

    async fn set_volume_chap(
        &self,
        req: Request<SetVolumeChapRequest>,
    ) -> Result<Response<Volume>, Status> {
        let r = req.into_inner();
        let chap = r.chap.map(chap_record).transpose()?;
        let mode = match &chap {
            None => "off",
            Some(c) if c.target.is_some() => "mutual",
            Some(_) => "one-way",
        };
        let info = self.manager.set_chap(&r.name, chap).await.map_err(status)?;
        tracing::info!(volume = %r.name, chap = mode, "volume CHAP changed");
        Ok(Response::new(self.volume(info)))
    }
}

#[tonic::async_trait]
impl PoolService for ControlService {
    async fn pool_status(
        &self,
        _req: Request<PoolStatusRequest>,
    ) -> Result<Response<PoolStatusResponse>, Status> {
        let cat = self.manager.catalog().await;
        let es = cat.extent_size;
        let disks: Vec<Disk> = self
            .manager
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
                }
            })
            .collect();
        let capacity: u64 = disks.iter().map(|d| d.capacity_bytes).sum();
        let free: u64 = disks.iter().map(|d| d.free_bytes).sum();
        Ok(Response::new(PoolStatusResponse {
            pool_id: cat.pool_id.to_string(),
            node_id: cat.node_id.to_string(),
            extent_size_bytes: es,
            capacity_bytes: capacity,
            used_bytes: capacity - free,
            free_bytes: free,
            provisioned_bytes: cat.volumes.iter().map(|v| v.size).sum(),
            volumes: cat.volumes.len() as u64,
            disks,
        }))
    }
}
