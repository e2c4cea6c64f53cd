//! storaged: the s2d storage daemon of one node.
//!
//! Pools the node's disks into extents (extent-store), keeps the volume
//! catalog, serves volumes over NBD (and iSCSI with `--iscsi-listen`) and
//! the control plane over gRPC.
//! `storaged check --disk PATH` verifies a disk offline.
//!
//! Shutdown (SIGTERM or SIGINT): stop accepting connections, let in-flight
//! requests finish, flush every disk, clear the write-intent bits, exit 0.

mod catalog;
mod config;
mod grpc;
mod iscsi;
mod manager;
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
    })?;
    if cfg.disks.len() > volume::DISKS_MAX {
        bail!(
            "{} disks given; a node takes at most {}",
            cfg.disks.len(),
            volume::DISKS_MAX
        );
    }
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder
        .enable_all()
        .thread_name("storaged")
        .on_thread_park(|| {
            extent_store::engine::poll_before_park(std::time::Duration::from_micros(50))
        });
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
        disks: cfg.disks.clone(),
        create_size: cfg.disk_size,
        extent_size: catalog.extent_size,
        engine: cfg.io_engine,
    })
    .await?;
    let store = Arc::new(store);
    let manager =
        Arc::new(manager::Manager::open(cfg.data_dir.clone(), catalog, store.clone()).await?);

    let grpc_listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .with_context(|| format!("cannot listen on {} (--listen)", cfg.listen))?;
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
    let shutdown = CancellationToken::new();

    let iscsi_task = iscsi_listener
        .map(|l| iscsi::spawn(l, manager.clone(), shutdown.clone()))
        .transpose()
        .context("cannot start the iSCSI target")?;
    let control =
        grpc::ControlService::new(manager.clone(), nbd_listener.local_addr()?, iscsi_addr);
    let grpc_shutdown = shutdown.clone();
    let grpc_task = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(grpc::VolumeServiceServer::new(control.clone()))
            .add_service(grpc::PoolServiceServer::new(control))
            .serve_with_incoming_shutdown(
                tokio_stream::wrappers::TcpListenerStream::new(grpc_listener),
                grpc_shutdown.cancelled_owned(),
            ),
    );
    let provider: Arc<dyn block_api::VolumeProvider> = manager.clone();
    let nbd_task = tokio::spawn(nbd_server::serve(nbd_listener, provider, shutdown.clone()));
    tracing::info!(
        listen = %cfg.listen,
        nbd = %cfg.nbd_listen,
        iscsi = ?iscsi_addr,
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
    match grpc_task.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::error!(error = %e, "gRPC server ended with an error"),
        Err(e) => tracing::error!(error = %e, "gRPC server task failed"),
    }
    store.close().await.context("final flush failed")?;
    tracing::info!("stopped cleanly");
    Ok(())
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
