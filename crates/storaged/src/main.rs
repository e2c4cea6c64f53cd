//! storaged: the s2d storage daemon of one node.
//!
//! Pools the node's disks into extents (extent-store), takes part in the
//! cluster's metadata (Raft, `meta_service`), serves the volumes it stores
//! over NBD (and iSCSI with `--iscsi-listen`) and the control plane and
//! the peer protocol over gRPC.
//!
//! Start-up: a node with no metadata yet either forms a one-node cluster
//! by itself (no `--join`; a catalog left by an older single-node version
//! is carried into it) or joins the cluster of the node named by `--join`
//! before it opens any port. Its Raft id is kept in `DATA_DIR/node-id`.
//! `storaged check --disk PATH` verifies a disk offline.
//!
//! Shutdown (SIGTERM or SIGINT): stop accepting connections, let in-flight
//! requests finish, flush every disk, clear the write-intent bits, exit 0.

mod activity;
mod added_disks;
mod catalog;
mod config;
mod grpc;
mod iscsi;
mod manager;
mod meta_service;
mod mirror;
mod peer;
mod range_gate;
mod repair_api;
mod replica;
mod resync;
mod scrub;
mod topology;
mod volume;

use anyhow::{Context, bail};
use catalog::Catalog;
use clap::{Parser, Subcommand};
use config::{Config, FlagConfig};
use extent_store::{Store, StoreConfig};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

#[derive(Parser, Debug)]
#[command(
    name = "storaged",
    version,
    about = "s2d storage daemon: pools local disks and serves volumes over NBD and iSCSI"
)]
#[command(args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// TOML config file; flags override its keys.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Directory for the node's catalog (pool identity, volumes).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// gRPC control-plane address (s2dctl --endpoint).
    #[arg(long)]
    listen: Option<String>,
    /// NBD server address.
    #[arg(long)]
    nbd_listen: Option<String>,
    /// iSCSI portal address, e.g. 127.0.0.1:3260 (no iSCSI without it).
    #[arg(long)]
    iscsi_listen: Option<String>,
    /// A disk (block device or file); repeat for more. Missing files are
    /// created sparse with --disk-size; blank disks are formatted.
    #[arg(long = "disk")]
    disks: Vec<PathBuf>,
    /// Size of disk files created by --disk, e.g. 4GiB.
    #[arg(long)]
    disk_size: Option<String>,
    /// Extent size of a new pool, e.g. 256MiB (fixed once the pool exists).
    #[arg(long)]
    extent_size: Option<String>,
    /// I/O engine: auto (io_uring when available), uring or sync.
    #[arg(long)]
    io_engine: Option<String>,
    /// This node's name in the cluster (default: the --listen address).
    #[arg(long)]
    name: Option<String>,
    /// Fault domain, site/rack/chassis/node with any prefix omitted
    /// (default: the name). Copies of a slab never share one.
    #[arg(long)]
    fault_domain: Option<String>,
    /// gRPC address of a member of the cluster to join (first start only).
    #[arg(long)]
    join: Option<String>,
    /// Mark a node down after it is silent this long, e.g. 10s.
    #[arg(long)]
    down_after: Option<String>,
    /// Raft entries between metadata snapshots (log compaction).
    #[arg(long)]
    meta_snapshot_every: Option<u64>,
    /// Address for replica I/O from other nodes (default: the --listen IP,
    /// any free port).
    #[arg(long)]
    replication_listen: Option<String>,
    /// Rebuild the copies of a node down this long on other nodes, e.g. 5m.
    #[arg(long)]
    rebuild_after: Option<String>,
    /// Most bytes per second one resync or rebuild copies, e.g. 200MiB
    /// (default: no limit).
    #[arg(long)]
    repair_bandwidth: Option<String>,
    /// How long an idle runtime thread polls for disk completions before it
    /// sleeps, e.g. 50us (default), 0 to never poll (when storaged shares
    /// its cores with other busy processes).
    #[arg(long)]
    io_poll: Option<String>,
    /// Scrub every volume this often by itself (verify checksums, compare
    /// copies, repair), e.g. 168h (default), or off.
    #[arg(long)]
    scrub_interval: Option<String>,
    /// Most bytes per second one scrub reads, e.g. 64MiB (default), 0 for
    /// no limit.
    #[arg(long)]
    scrub_bandwidth: Option<String>,
    /// Fail a disk after this many I/O errors and checksum failures (since
    /// start): the cluster stops using it and rebuilds its copies elsewhere
    /// (default 32).
    #[arg(long)]
    disk_error_limit: Option<u64>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Verify every checksum of a disk offline and report each bad block.
    Check {
        /// The disk to check (repeatable).
        #[arg(long = "disk", required = true)]
        disks: Vec<PathBuf>,
    },
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    let code = match cli.command {
        Some(Command::Check { disks }) => check(&disks),
        None => match run(cli) {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("storaged: {e:#}");
                1
            }
        },
    };
    std::process::exit(code);
}

fn check(disks: &[PathBuf]) -> i32 {
    let mut code = 0;
    for d in disks {
        match extent_store::check::check_disk(d) {
            Ok(r) => {
                for n in &r.superblock_notes {
                    println!("{}: {n}", d.display());
                }
                for b in &r.bad_blocks {
                    println!(
                        "{}: BAD BLOCK extent {} block {} disk offset {} (volume id {} slab {} offset {})",
                        d.display(),
                        b.extent,
                        b.block,
                        b.disk_offset,
                        b.owner.volume_id,
                        b.owner.slab,
                        b.block * block_api::BLOCK_SIZE as u64,
                    );
                }
                for e in &r.damaged_records {
                    println!(
                        "{}: extent {e}: record damaged in both table copies",
                        d.display()
                    );
                }
                if !r.extents_with_intent.is_empty() {
                    println!(
                        "{}: not stopped cleanly: {} extents have write-intent bits (re-checksummed at next start)",
                        d.display(),
                        r.extents_with_intent.len()
                    );
                }
                println!(
                    "{}: {} extents owned, {} blocks checked, {} bad blocks",
                    d.display(),
                    r.extents_owned,
                    r.blocks_checked,
                    r.bad_blocks.len()
                );
                if !r.is_clean() {
                    code = 1;
                }
            }
            Err(e) => {
                println!("{}: {e}", d.display());
                code = 1;
            }
        }
    }
    code
}

/// Hold an exclusive lock on the data dir for the life of the process, so
/// two storaged processes never share a pool's disks.
fn lock_data_dir(dir: &std::path::Path) -> anyhow::Result<std::fs::File> {
    let path = dir.join("LOCK");
    let f = std::fs::File::create(&path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    // SAFETY: flock on an fd we own.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        bail!("data dir {} is in use by another storaged", dir.display());
    }
    Ok(f)
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let cfg = Config::load(FlagConfig {
        config: cli.config,
        data_dir: cli.data_dir,
        listen: cli.listen,
        nbd_listen: cli.nbd_listen,
        iscsi_listen: cli.iscsi_listen,
        disks: cli.disks,
        disk_size: cli.disk_size,
        extent_size: cli.extent_size,
        io_engine: cli.io_engine,
        name: cli.name,
        fault_domain: cli.fault_domain,
        join: cli.join,
        down_after: cli.down_after,
        meta_snapshot_every: cli.meta_snapshot_every,
        replication_listen: cli.replication_listen,
        rebuild_after: cli.rebuild_after,
        repair_bandwidth: cli.repair_bandwidth,
        io_poll: cli.io_poll,
        scrub_interval: cli.scrub_interval,
        scrub_bandwidth: cli.scrub_bandwidth,
        disk_error_limit: cli.disk_error_limit,
    })?;
    if cfg.disks.len() > volume::DISKS_MAX {
        bail!(
            "{} disks given; a node takes at most {}",
            cfg.disks.len(),
            volume::DISKS_MAX
        );
    }
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.enable_all().thread_name("storaged");
    let spin = cfg.io_poll;
    if !spin.is_zero() {
        builder.on_thread_park(move || extent_store::engine::poll_before_park(spin));
    }
    if std::env::var_os("TOKIO_WORKER_THREADS").is_none() {
        builder.worker_threads(default_worker_threads());
    }
    let rt = builder.build().context("cannot start the async runtime")?;
    rt.block_on(serve(cfg))
}

/// Async worker threads when TOKIO_WORKER_THREADS does not say: half the
/// cores, at least one. storaged shares its host with the VMs it serves,
/// and on small hosts one thread that never hands a request to another
/// thread beats two that wake each other (measured: about 9.5 against 12.9
/// CPU-microseconds per 4 KiB I/O on a 2-core machine, benches/README.md).
fn default_worker_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| (n.get() / 2).max(1))
}

async fn serve(cfg: Config) -> anyhow::Result<()> {
    std::fs::create_dir_all(&cfg.data_dir)
        .with_context(|| format!("cannot create data dir {}", cfg.data_dir.display()))?;
    let _lock = lock_data_dir(&cfg.data_dir)?;
    let catalog = match Catalog::load(&cfg.data_dir)? {
        Some(c) => {
            if let Some(es) = cfg.extent_size
                && es != c.extent_size
            {
                bail!(
                    "--extent-size {es} differs from this pool's extent size {}; it is fixed when the pool is created",
                    c.extent_size
                );
            }
            c
        }
        None => {
            let c = Catalog::new(cfg.extent_size.unwrap_or(config::DEFAULT_EXTENT_SIZE));
            c.save(&cfg.data_dir)?;
            tracing::info!(pool = %c.pool_id, node = %c.node_id, "created a new pool");
            c
        }
    };
    let store = Store::open(&StoreConfig {
        pool_id: catalog.pool_id,
        node_id: catalog.node_id,
        disks: added_disks::with_added(&cfg.disks, added_disks::load(&cfg.data_dir)?),
        create_size: cfg.disk_size,
        extent_size: catalog.extent_size,
        engine: cfg.io_engine,
    })
    .await?;
    let store = Arc::new(store);
    let (meta, node_id) = start_meta(&cfg, &catalog, &store).await?;
    let view = meta.view();
    let (simple, copies) = sort_extents(&store, &view).await?;
    let mut local = catalog.clone();
    local.volumes = manager::local_records(&view.state, node_id);
    let live: Vec<u64> = view.state.volumes.values().map(|v| v.id).collect();
    let manager = Arc::new(
        manager::Manager::open(cfg.data_dir.clone(), local, store.clone(), simple, &live).await?,
    );
    let replicas = replica::ReplicaService::new(store.clone(), meta.clone(), copies);
    // Without --replication-listen, take the address this node had before
    // if it is free, so a restart needs no metadata change.
    let before = view
        .state
        .nodes
        .get(&node_id)
        .and_then(|n| n.replication_address.parse::<std::net::SocketAddr>().ok())
        .filter(|a| cfg.replication_listen.port() == 0 && a.ip() == cfg.replication_listen.ip());
    let repl_listener = match before {
        Some(a) => match tokio::net::TcpListener::bind(a).await {
            Ok(l) => Ok(l),
            Err(_) => tokio::net::TcpListener::bind(cfg.replication_listen).await,
        },
        None => tokio::net::TcpListener::bind(cfg.replication_listen).await,
    }
    .with_context(|| {
        format!(
            "cannot listen on {} (--replication-listen)",
            cfg.replication_listen
        )
    })?;
    let repl_addr = repl_listener.local_addr()?;
    let transport: Arc<dyn replication::Transport> = Arc::new(replication::TcpTransport::new(
        replication::TcpConfig::default(),
    ));
    manager.set_cluster(Arc::new(mirror::MirrorCluster {
        this: node_id,
        meta: meta.clone(),
        transport,
        local: replicas.clone(),
        rebuild_after: cfg.rebuild_after,
        repair_bandwidth: cfg.repair_bandwidth,
        scrub_interval: cfg.scrub_interval,
        scrub_bandwidth: cfg.scrub_bandwidth,
    }));
    tokio::spawn(follow_metadata(
        meta.clone(),
        manager.clone(),
        replicas.clone(),
        cfg.disk_error_limit,
    ));
    let grpc_listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .with_context(|| format!("cannot listen on {} (--listen)", cfg.listen))?;
    let shutdown = CancellationToken::new();
    let control = grpc::ControlService::new(manager.clone(), meta.clone());
    let peers = peer::Peers::new(meta.clone(), manager.clone(), catalog.extent_size);
    let grpc_shutdown = shutdown.clone();
    let grpc_task = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(grpc::VolumeServiceServer::new(control.clone()))
            .add_service(grpc::PoolServiceServer::new(control.clone()))
            .add_service(grpc::ClusterServiceServer::new(control.clone()))
            .add_service(repair_api::RepairServiceServer::new(control))
            .add_service(
                peer::PeerServiceServer::new(peers)
                    .max_decoding_message_size(peer::PEER_MESSAGE_MAX)
                    .max_encoding_message_size(peer::PEER_MESSAGE_MAX),
            )
            .serve_with_incoming_shutdown(
                // Small replies must not wait for a delayed ACK (Nagle):
                // a status call between nodes took 40 ms without this.
                tokio_stream::StreamExt::map(
                    tokio_stream::wrappers::TcpListenerStream::new(grpc_listener),
                    |s| {
                        s.inspect(|s| {
                            if let Err(e) = s.set_nodelay(true) {
                                tracing::debug!(error = %e, "TCP_NODELAY not set");
                            }
                        })
                    },
                ),
                grpc_shutdown.cancelled_owned(),
            ),
    );
    let repl_task = tokio::spawn(replication::serve(
        repl_listener,
        Arc::new(replica::ReplicaHandler(replicas.clone())),
        shutdown.clone(),
    ));
    // The node is ready for clients once the cluster knows its disks and
    // addresses (a new node first catches up through the gRPC port, which
    // is why that one is open already). Without a quorum it starts anyway.
    let mut registered = tokio::spawn(register_node(
        meta.clone(),
        store.clone(),
        meta::state::UpdateNode {
            node: node_id,
            address: cfg.listen.to_string(),
            nbd_address: cfg.nbd_listen.to_string(),
            iscsi_address: cfg.iscsi_listen.map_or(String::new(), |a| a.to_string()),
            replication_address: repl_addr.to_string(),
        },
    ));

    if tokio::time::timeout(std::time::Duration::from_secs(15), &mut registered)
        .await
        .is_err()
    {
        tracing::warn!(
            "the cluster has not recorded this node's disks and addresses yet (no quorum?); serving anyway and retrying"
        );
    }
    let nbd_listener = tokio::net::TcpListener::bind(cfg.nbd_listen)
        .await
        .with_context(|| format!("cannot listen on {} (--nbd-listen)", cfg.nbd_listen))?;
    let iscsi_listener = match cfg.iscsi_listen {
        Some(a) => Some(
            tokio::net::TcpListener::bind(a)
                .await
                .with_context(|| format!("cannot listen on {a} (--iscsi-listen)"))?,
        ),
        None => None,
    };
    let iscsi_addr = iscsi_listener
        .as_ref()
        .map(|l| l.local_addr())
        .transpose()?;
    let iscsi_task = iscsi_listener
        .map(|l| iscsi::spawn(l, manager.clone(), shutdown.clone()))
        .transpose()
        .context("cannot start the iSCSI target")?;
    let provider: Arc<dyn block_api::VolumeProvider> = Arc::new(manager::Provider(manager.clone()));
    let nbd_task = tokio::spawn(nbd_server::serve(nbd_listener, provider, shutdown.clone()));
    tracing::info!(
        node = %cfg.name,
        id = node_id,
        listen = %cfg.listen,
        nbd = %cfg.nbd_listen,
        iscsi = ?iscsi_addr,
        replication = %repl_addr,
        disks = cfg.disks.len(),
        engine = ?store.status().first().map(|d| d.engine),
        "storaged ready"
    );

    wait_for_signal().await?;
    tracing::info!("shutting down: finishing in-flight requests");
    shutdown.cancel();
    match nbd_task.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::error!(error = %e, "NBD server ended with an error"),
        Err(e) => tracing::error!(error = %e, "NBD server task failed"),
    }
    if let Some(t) = iscsi_task {
        match t.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::error!(error = %e, "iSCSI target ended with an error"),
            Err(e) => tracing::error!(error = %e, "iSCSI target task failed"),
        }
    }
    match repl_task.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::error!(error = %e, "replication server ended with an error"),
        Err(e) => tracing::error!(error = %e, "replication server task failed"),
    }
    match grpc_task.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::error!(error = %e, "gRPC server ended with an error"),
        Err(e) => tracing::error!(error = %e, "gRPC server task failed"),
    }
    store.close().await.context("final flush failed")?;
    tracing::info!("stopped cleanly");
    Ok(())
}

const NODE_ID_FILE: &str = "node-id";
const META_STORE: &str = "meta.redb";

use replica::meta_disk_id;

/// Extents with their owner records.
type OwnedExtents = Vec<(extent_store::ExtentOwner, extent_store::ExtentAddr)>;

/// Sorts the extents on this node's disks: those of its simple volumes,
/// and copies of mirrored slabs (or of volumes it has not heard of yet).
/// Extents of volumes the metadata says were deleted are released.
async fn sort_extents(
    store: &Store,
    view: &meta_service::MetaView,
) -> anyhow::Result<(OwnedExtents, OwnedExtents)> {
    let by_id: std::collections::HashMap<u64, &meta::state::Volume> =
        view.state.volumes.values().map(|v| (v.id, v)).collect();
    let (mut simple, mut copies) = (Vec::new(), Vec::new());
    for (owner, addr) in store.owned_extents() {
        match by_id.get(&owner.volume_id) {
            Some(v) if v.home_node == view.this => simple.push((owner, addr)),
            Some(v) if v.home_node == 0 => copies.push((owner, addr)),
            Some(v) => tracing::warn!(
                volume = %v.name,
                "an extent of a volume served by another node; kept"
            ),
            None if owner.volume_id < view.state.next_volume_id => {
                tracing::info!(
                    volume = owner.volume_id,
                    "releasing an extent of a deleted volume"
                );
                store.release(addr).await?;
            }
            // A volume this node has not heard of yet: keep it.
            None => copies.push((owner, addr)),
        }
    }
    Ok((simple, copies))
}

/// The metadata of a new one-node cluster: this node, its disks, and the
/// volumes of a catalog written by a single-node version, if any.
fn bootstrap_state(cfg: &Config, catalog: &Catalog, store: &Store) -> meta::state::PoolState {
    use meta::state::*;
    let mut st = PoolState {
        settings: Some(PoolSettings {
            name: cfg.name.clone(),
            extent_size_bytes: catalog.extent_size,
        }),
        next_volume_id: catalog.next_volume_id.max(1),
        ..Default::default()
    };
    st.nodes.insert(
        1,
        Node {
            id: 1,
            address: cfg.listen.to_string(),
            fault_domain: cfg.fault_domain.split('/').map(str::to_string).collect(),
            state: NodeState::Up as i32,
            name: cfg.name.clone(),
            voter: true,
            nbd_address: cfg.nbd_listen.to_string(),
            iscsi_address: cfg.iscsi_listen.map_or(String::new(), |a| a.to_string()),
            // Recorded by `register_node` once the listener is bound.
            replication_address: String::new(),
            down_since_ms: 0,
        },
    );
    for (i, d) in store.status().iter().enumerate() {
        let id = meta_disk_id(1, i);
        st.disks.insert(
            id,
            Disk {
                id,
                node: 1,
                capacity_bytes: d.capacity_bytes,
                state: DiskState::Online as i32,
                allocated_extents: Vec::new(),
            },
        );
    }
    for v in &catalog.volumes {
        st.volumes.insert(
            v.name.clone(),
            Volume {
                name: v.name.clone(),
                size_bytes: v.size,
                resiliency: Resiliency::Simple as i32,
                id: v.id,
                home_node: 1,
                block_size: v.logical_block_size,
                chap: v.chap.as_ref().map(manager::chap_to_meta),
                ..Default::default()
            },
        );
    }
    st
}

/// Opens this node's Raft member: restarts it, forms a one-node cluster,
/// or joins the cluster at `--join`; then starts the metadata thread.
async fn start_meta(
    cfg: &Config,
    catalog: &Catalog,
    store: &Store,
) -> anyhow::Result<(meta_service::MetaHandle, u64)> {
    let id_path = cfg.data_dir.join(NODE_ID_FILE);
    let known = match std::fs::read_to_string(&id_path) {
        Ok(s) => Some(s.trim().parse::<u64>().with_context(|| {
            format!("{} is damaged: {s:?} is not a node id", id_path.display())
        })?),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", id_path.display())),
    };
    let mut peers = std::collections::HashMap::new();
    let mut bootstrap = None;
    let id = match (known, cfg.join) {
        (Some(id), join) => {
            if join.is_some() {
                tracing::info!(id, "already a member of a cluster; --join ignored");
            }
            id
        }
        (None, Some(target)) => {
            let req = s2d_proto::v1::JoinRequest {
                name: cfg.name.clone(),
                address: cfg.listen.to_string(),
                nbd_address: cfg.nbd_listen.to_string(),
                fault_domain: cfg.fault_domain.clone(),
                extent_size_bytes: catalog.extent_size,
                iscsi_address: cfg.iscsi_listen.map_or(String::new(), |a| a.to_string()),
            };
            let resp = peer::join(
                &target.to_string(),
                req,
                std::time::Duration::from_secs(120),
            )
            .await?;
            for p in resp.peers {
                peers.insert(p.id, p.address);
            }
            tracing::info!(id = resp.node_id, cluster = %resp.cluster_name, "joined the cluster");
            resp.node_id
        }
        (None, None) => {
            bootstrap = Some(bootstrap_state(cfg, catalog, store));
            1
        }
    };
    let mut ncfg = meta::node::NodeConfig::new(id);
    ncfg.snapshot_every = cfg.meta_snapshot_every;
    let path = cfg.data_dir.join(META_STORE);
    let node = match &bootstrap {
        Some(st) => meta::node::MetaNode::open_with(&ncfg, &path, &[id], st),
        None => meta::node::MetaNode::open(&ncfg, &path, &[]),
    }
    .with_context(|| format!("cannot open the metadata store {}", path.display()))?;
    // It holds CHAP secrets.
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
            .with_context(|| format!("cannot restrict access to {}", path.display()))?;
    }
    if known.is_none() {
        write_durably(&cfg.data_dir, NODE_ID_FILE, id.to_string().as_bytes())?;
        if !catalog.volumes.is_empty() {
            // The volumes now live in the cluster metadata.
            let mut c = catalog.clone();
            c.volumes.clear();
            c.save(&cfg.data_dir)?;
            tracing::info!(
                volumes = catalog.volumes.len(),
                "carried the catalog's volumes into the cluster metadata"
            );
        }
        if bootstrap.is_some() {
            tracing::info!("formed a one-node cluster; `s2dctl cluster init` opens it to joins");
        }
    }
    let handle = meta_service::start(
        node,
        meta_service::MetaSettings {
            id,
            address: cfg.listen.to_string(),
            down_after: cfg.down_after,
        },
        peers,
    )?;
    Ok((handle, id))
}

/// Writes `name` in `dir` crash-safely: temporary file, fsync, rename,
/// directory fsync.
fn write_durably(dir: &std::path::Path, name: &str, data: &[u8]) -> anyhow::Result<()> {
    use std::io::Write;
    let tmp = dir.join(format!("{name}.tmp"));
    let mut f =
        std::fs::File::create(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    f.write_all(data)?;
    f.sync_all()?;
    std::fs::rename(&tmp, dir.join(name))?;
    std::fs::File::open(dir)?.sync_all()?;
    Ok(())
}

/// Keeps this node's volumes and copies in step with the cluster metadata.
async fn follow_metadata(
    meta: meta_service::MetaHandle,
    manager: Arc<manager::Manager>,
    replicas: Arc<replica::ReplicaService>,
    disk_error_limit: u64,
) {
    let mut rx = meta.subscribe();
    let mut applied = 0;
    loop {
        let view = rx.borrow_and_update().clone();
        if view.applied != applied {
            applied = view.applied;
            manager
                .sync(manager::local_records(&view.state, view.this))
                .await;
            manager.sync_mirrors(&view.state).await;
            replicas.collect_garbage(&view).await;
            // New extents go only to this node's online disks.
            for i in 0..manager.store().disks().len() {
                let online = view
                    .state
                    .disks
                    .get(&replica::meta_disk_id(view.this, i))
                    .is_none_or(|d| d.state == meta::state::DiskState::Online as i32);
                manager.store().set_accepting(i, online);
            }
        }
        fail_bad_disks(&meta, &manager, &view, disk_error_limit).await;
        manager.drive_resyncs(&view);
        manager.drive_scrubs(&view);
        // Also look again now and then: a resync that stopped is retried.
        if let Ok(Err(_)) =
            tokio::time::timeout(std::time::Duration::from_secs(2), rx.changed()).await
        {
            return;
        }
    }
}

/// Fails (through Raft) each of this node's disks that saw more than
/// `limit` I/O errors and checksum failures: no new extents go to it and
/// the cluster rebuilds its copies elsewhere (`mirror::lost_copy`).
async fn fail_bad_disks(
    meta: &meta_service::MetaHandle,
    manager: &manager::Manager,
    view: &meta_service::MetaView,
    limit: u64,
) {
    use meta::state::DiskState;
    for (i, d) in manager.store().disks().iter().enumerate() {
        let id = replica::meta_disk_id(view.this, i);
        let Some(md) = view.state.disks.get(&id) else {
            continue;
        };
        let in_use = md.state == DiskState::Online as i32 || md.state == DiskState::Draining as i32;
        if !in_use || d.errors() <= limit {
            continue;
        }
        tracing::error!(disk = %d.path.display(), errors = d.errors(), limit, "disk failed: too many I/O errors and checksum failures; its copies are rebuilt elsewhere");
        let op = meta::state::Op::SetDiskState(meta::state::SetDiskState {
            disk: id,
            state: DiskState::Failed as i32,
        });
        if let Err(e) = meta.propose(op).await {
            tracing::warn!(disk = %d.path.display(), error = %e, "recording the disk failure failed; retrying");
        }
    }
}

/// Records this node's disks and its addresses of this start in the
/// cluster metadata once the node is in it (a joined node learns of itself
/// from the leader).
async fn register_node(
    meta: meta_service::MetaHandle,
    store: Arc<Store>,
    addresses: meta::state::UpdateNode,
) {
    let disks = store.status();
    loop {
        let view = meta.view();
        if let Some(me) = view.state.nodes.get(&view.this) {
            let stale = me.address != addresses.address
                || me.nbd_address != addresses.nbd_address
                || me.iscsi_address != addresses.iscsi_address
                || me.replication_address != addresses.replication_address;
            if stale {
                match meta
                    .propose(meta::state::Op::UpdateNode(addresses.clone()))
                    .await
                {
                    Ok(_) => tracing::info!("node addresses recorded in the cluster"),
                    Err(e) => {
                        tracing::debug!(error = %e, "recording addresses failed; retrying");
                        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                    }
                }
                continue;
            }
            let missing: Vec<_> = disks
                .iter()
                .enumerate()
                .filter(|(i, _)| !view.state.disks.contains_key(&meta_disk_id(view.this, *i)))
                .collect();
            if missing.is_empty() {
                return;
            }
            for (i, d) in missing {
                let op = meta::state::Op::AddDisk(meta::state::AddDisk {
                    id: meta_disk_id(view.this, i),
                    node: view.this,
                    capacity_bytes: d.capacity_bytes,
                });
                match meta.propose(op).await {
                    Ok(_) => {
                        tracing::info!(disk = %d.path.display(), "disk recorded in the cluster")
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "recording a disk failed; retrying");
                        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                    }
                }
            }
            continue;
        }
        // Not in the state yet: a joined node is still catching up.
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

async fn wait_for_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("cannot watch SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot watch SIGINT")?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    Ok(())
}
