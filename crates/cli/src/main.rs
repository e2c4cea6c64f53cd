//! s2dctl: the operator's command line for s2d.
//!
//! Talks gRPC to one storaged node (`--endpoint`). Prints human tables by
//! default and JSON with `--json`. Every error is one line on stderr and
//! exit status 1; success is exit status 0. `volume verify` also exits 1,
//! after its report, when the copies differ or some could not be compared.

mod cluster;
mod pool;
mod repair;
mod table;
mod volume;

use anyhow::{Context, anyhow};
use clap::{Parser, Subcommand};
use s2d_proto::v1::pool_service_client::PoolServiceClient;
use s2d_proto::v1::volume_service_client::VolumeServiceClient;
use s2d_proto::v1::*;
use std::time::Duration;
use table::human;
use volume::chap_mode;

/// How long s2dctl waits for a node before giving up.
const TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Parser, Debug)]
#[command(name = "s2dctl", version, about = "Operate an s2d storage pool")]
struct Cli {
    /// gRPC address of a storaged node.
    #[arg(
        long,
        global = true,
        default_value = "127.0.0.1:7001",
        env = "S2D_ENDPOINT"
    )]
    endpoint: String,
    /// Print machine-readable JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Create, list, inspect, verify, resize and delete volumes.
    #[command(subcommand)]
    Volume(VolumeCmd),
    /// The pool's nodes, disks and capacity.
    #[command(subcommand)]
    Pool(PoolCmd),
    /// Initialize the cluster and see its Raft state and members.
    #[command(subcommand)]
    Cluster(cluster::ClusterCmd),
    /// List, drain and retire the cluster's nodes.
    #[command(subcommand)]
    Node(cluster::NodeCmd),
    /// The pool's state in one screen: healthy, degraded (and why) or
    /// repairing (and how far); exit status 2 when not healthy.
    Health,
    /// Resyncs and rebuilds of mirrored volumes: list, status, start now.
    #[command(subcommand)]
    Repair(repair::RepairCmd),
}

#[derive(Subcommand, Debug)]
enum VolumeCmd {
    /// Create a thin-provisioned volume.
    Create {
        name: String,
        /// Size, e.g. 10GiB.
        #[arg(long, value_parser = parse_size)]
        size: u64,
        /// simple, mirror-2, mirror-3 or parity-K+M.
        #[arg(long, default_value = "simple")]
        resiliency: String,
        /// Logical block size over iSCSI: 512 (512e over 4 KiB physical
        /// blocks) or 4096 (4 KiB native). Fixed at creation.
        #[arg(long, default_value_t = 512)]
        block_size: u32,
        #[command(flatten)]
        chap: CreateChapArgs,
    },
    /// List volumes.
    List,
    /// Show one volume.
    Show { name: String },
    /// Grow or shrink a volume.
    Resize {
        name: String,
        #[arg(long, value_parser = parse_size)]
        size: u64,
    },
    /// Delete a volume and release its space.
    Delete { name: String },
    /// Compare the copies of every slab of a mirrored volume; exit status
    /// 1 when they differ or some copy could not be compared.
    Verify { name: String },
    /// Require iSCSI CHAP for a volume (one-way, or mutual with the target
    /// pair), or turn it off with --clear. Applies at the next login.
    SetChap {
        name: String,
        /// CHAP name the initiator presents.
        #[arg(long, requires = "secret", required_unless_present = "clear")]
        user: Option<String>,
        /// The initiator's secret, 12 to 16 characters.
        #[arg(long, requires = "user")]
        secret: Option<String>,
        /// Mutual CHAP: the name the target answers with.
        #[arg(long, requires_all = ["target_secret", "user"])]
        target_user: Option<String>,
        /// Mutual CHAP: the target's secret, 12 to 16 characters, not the
        /// initiator's.
        #[arg(long, requires = "target_user")]
        target_secret: Option<String>,
        /// Turn CHAP off: any initiator may log in.
        #[arg(long, conflicts_with_all = ["user", "secret", "target_user", "target_secret"])]
        clear: bool,
    },
}

/// CHAP of a volume being created (all optional).
#[derive(clap::Args, Debug)]
struct CreateChapArgs {
    /// Require iSCSI CHAP: the name the initiator presents.
    #[arg(long, requires = "chap_secret")]
    chap_user: Option<String>,
    /// The initiator's CHAP secret, 12 to 16 characters.
    #[arg(long, requires = "chap_user")]
    chap_secret: Option<String>,
    /// Mutual CHAP: the name the target answers with.
    #[arg(long, requires_all = ["chap_target_secret", "chap_user"])]
    chap_target_user: Option<String>,
    /// Mutual CHAP: the target's secret, 12 to 16 characters.
    #[arg(long, requires = "chap_target_user")]
    chap_target_secret: Option<String>,
}

/// The API's CHAP credentials from optional flags; `None` without a user.
fn chap_credentials(
    user: Option<String>,
    secret: Option<String>,
    target_user: Option<String>,
    target_secret: Option<String>,
) -> Option<ChapCredentials> {
    Some(ChapCredentials {
        user: user?,
        secret: secret.unwrap_or_default(),
        target_user: target_user.unwrap_or_default(),
        target_secret: target_secret.unwrap_or_default(),
    })
}

#[derive(Subcommand, Debug)]
enum PoolCmd {
    /// Capacity, used and free space per node and disk, and what each
    /// resiliency can still store.
    Status,
    /// Stop placing extents on a disk and move the mirror copies on it to
    /// other nodes; redundancy never drops meanwhile. Refused when some
    /// copy has no node to go to.
    RemoveDisk {
        /// The node holding the disk (name or id).
        node: String,
        /// The disk: its path as the node opened it, its disk id, or its
        /// index on the node (0 for the first --disk).
        disk: String,
    },
    /// Add a disk to a running node (it is remembered for the node's next
    /// starts); existing data is then rebalanced onto it.
    AddDisk {
        /// The node to add it to (name or id).
        node: String,
        /// Absolute path of a block device or file on that node; a missing
        /// file is created with the node's --disk-size.
        path: String,
    },
    /// Even out the fill of the pool's disks now: copies move (never
    /// lowering redundancy) until every disk is within 10 % of the mean.
    Rebalance,
    /// Scrub every volume now: read every allocated block back against its
    /// checksum, compare mirror copies, repair from a good copy. Exit
    /// status 2 when something could not be repaired or checked.
    Scrub {
        /// Wait until every scrub has finished, then report.
        #[arg(long)]
        wait: bool,
        /// Only show the last scrub of every volume; start nothing.
        #[arg(long, conflicts_with = "wait")]
        status: bool,
    },
}

fn parse_size(s: &str) -> Result<u64, String> {
    s.trim()
        .parse::<bytesize::ByteSize>()
        .map(|b| b.as_u64())
        .map_err(|e| format!("bad size {s:?}: {e} (use e.g. 10GiB, 512MiB)"))
}

fn main() {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) if !e.use_stderr() => {
            // --help and --version
            let _ = e.print();
            std::process::exit(0);
        }
        Err(e) => {
            // One line, exit 1, like every other error: clap's message up
            // to its usage section, joined (a missing-argument error names
            // the arguments on the lines below its first).
            let text = e.to_string();
            let msg = text
                .lines()
                .map(str::trim)
                .take_while(|l| !l.is_empty() && !l.starts_with("Usage:"))
                .collect::<Vec<_>>()
                .join(" ");
            let msg = if msg.is_empty() {
                "bad arguments"
            } else {
                &msg
            };
            eprintln!(
                "s2dctl: {} (see s2dctl --help)",
                msg.trim_start_matches("error: ")
            );
            std::process::exit(1);
        }
    };
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("s2dctl: cannot start: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = rt.block_on(run(cli)) {
        eprintln!("s2dctl: {e:#}");
        std::process::exit(1);
    }
}

/// Turn a gRPC failure into the one line an operator needs.
fn explain(endpoint: &str, s: tonic::Status) -> anyhow::Error {
    match s.code() {
        // storaged itself answers "unavailable" when the cluster has no
        // quorum; only a failed connection means storaged was not reached.
        tonic::Code::Unavailable
            if std::error::Error::source(&s).is_none() && !s.message().contains("transport") =>
        {
            anyhow!("{}", s.message())
        }
        tonic::Code::Unavailable => anyhow!("cannot reach storaged at {endpoint}: {}", s.message()),
        tonic::Code::DeadlineExceeded => {
            anyhow!("storaged at {endpoint} did not answer within {TIMEOUT:?}")
        }
        _ => anyhow!("{}", s.message()),
    }
}

/// A channel to `endpoint` whose calls end after [`TIMEOUT`], or, with
/// `long_calls`, run as long as the node keeps answering HTTP/2 pings (a
/// verify reads every copy of a volume and may take minutes).
async fn channel(endpoint: &str, long_calls: bool) -> anyhow::Result<tonic::transport::Channel> {
    let uri = if endpoint.contains("://") {
        endpoint.to_string()
    } else {
        format!("http://{endpoint}")
    };
    let ep = tonic::transport::Endpoint::from_shared(uri)
        .with_context(|| format!("bad endpoint {endpoint:?}"))?
        .connect_timeout(Duration::from_secs(5));
    let ep = if long_calls {
        ep.http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(TIMEOUT)
            .keep_alive_while_idle(true)
    } else {
        ep.timeout(TIMEOUT)
    };
    ep.connect()
        .await
        .map_err(|e| anyhow!("cannot reach storaged at {endpoint}: {e}"))
}

fn print_json<T: serde::Serialize>(v: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

/// Print a command's result as JSON with --json, else as `human` says.
fn print_as<T: serde::Serialize>(json: bool, v: &T, human: impl FnOnce(&T)) -> anyhow::Result<()> {
    if json {
        print_json(v)
    } else {
        human(v);
        Ok(())
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let long_calls = matches!(cli.command, Command::Volume(VolumeCmd::Verify { .. }));
    let ch = channel(&cli.endpoint, long_calls).await?;
    let ep = cli.endpoint.as_str();
    match cli.command {
        Command::Volume(cmd) => {
            let mut c = VolumeServiceClient::new(ch);
            match cmd {
                VolumeCmd::Create {
                    name,
                    size,
                    resiliency,
                    block_size,
                    chap,
                } => {
                    let v = c
                        .create_volume(CreateVolumeRequest {
                            name,
                            size_bytes: size,
                            resiliency,
                            block_size_bytes: block_size,
                            chap: chap_credentials(
                                chap.chap_user,
                                chap.chap_secret,
                                chap.chap_target_user,
                                chap.chap_target_secret,
                            ),
                        })
                        .await
                        .map_err(|s| explain(ep, s))?
                        .into_inner();
                    print_as(cli.json, &v, |v| {
                        let iscsi = if v.iscsi_uri.is_empty() {
                            String::new()
                        } else {
                            format!(" and {}", v.iscsi_uri)
                        };
                        println!(
                            "created volume {} ({}, {}, {}-byte blocks, CHAP {}) at {}{iscsi}",
                            v.name,
                            human(v.size_bytes),
                            v.resiliency,
                            v.block_size_bytes,
                            chap_mode(v),
                            v.nbd_uri
                        );
                    })?;
                }
                VolumeCmd::List => {
                    let l = c
                        .list_volumes(ListVolumesRequest {})
                        .await
                        .map_err(|s| explain(ep, s))?
                        .into_inner();
                    if cli.json {
                        print_json(&l.volumes)?;
                    } else {
                        volume::volume_table(&l.volumes).print();
                    }
                }
                VolumeCmd::Show { name } => {
                    let v = c
                        .get_volume(GetVolumeRequest { name })
                        .await
                        .map_err(|s| explain(ep, s))?
                        .into_inner();
                    print_as(cli.json, &v, |v| print!("{}", volume::render_volume(v)))?;
                }
                VolumeCmd::Resize { name, size } => {
                    let v = c
                        .resize_volume(ResizeVolumeRequest {
                            name,
                            size_bytes: size,
                        })
                        .await
                        .map_err(|s| explain(ep, s))?
                        .into_inner();
                    print_as(cli.json, &v, |v| {
                        println!("resized volume {} to {}", v.name, human(v.size_bytes))
                    })?;
                }
                VolumeCmd::Delete { name } => {
                    c.delete_volume(DeleteVolumeRequest { name: name.clone() })
                        .await
                        .map_err(|s| explain(ep, s))?;
                    if cli.json {
                        print_json(&serde_json::json!({ "deleted": name }))?;
                    } else {
                        println!("deleted volume {name}");
                    }
                }
                VolumeCmd::Verify { name } => {
                    let r = c
                        .verify_volume(VerifyVolumeRequest { name })
                        .await
                        .map_err(|s| explain(ep, s))?
                        .into_inner();
                    let verdict = volume::verify_verdict(&r);
                    print_as(cli.json, &r, |_| print!("{}", verdict.report))?;
                    // The report is on stdout; main prints this line on
                    // stderr and exits 1.
                    if let Some(f) = verdict.failure {
                        return Err(anyhow!(f));
                    }
                }
                VolumeCmd::SetChap {
                    name,
                    user,
                    secret,
                    target_user,
                    target_secret,
                    clear,
                } => {
                    let chap = if clear {
                        None
                    } else {
                        chap_credentials(user, secret, target_user, target_secret)
                    };
                    let v = c
                        .set_volume_chap(SetVolumeChapRequest { name, chap })
                        .await
                        .map_err(|s| explain(ep, s))?
                        .into_inner();
                    print_as(cli.json, &v, |v| {
                        println!(
                            "CHAP of volume {} is {} (applies at the next iSCSI login)",
                            v.name,
                            chap_mode(v)
                        )
                    })?;
                }
            }
        }
        Command::Pool(PoolCmd::RemoveDisk { node, disk }) => {
            let mut c = PoolServiceClient::new(ch);
            let d = c
                .remove_disk(DiskRequest { node, disk })
                .await
                .map_err(|s| explain(ep, s))?
                .into_inner();
            print_as(cli.json, &d, |d| print!("{}", pool::render_removed(d)))?;
        }
        Command::Pool(PoolCmd::AddDisk { node, path }) => {
            let mut c = PoolServiceClient::new(ch);
            let d = c
                .add_disk(AddDiskRequest { node, path })
                .await
                .map_err(|s| explain(ep, s))?
                .into_inner();
            print_as(cli.json, &d, |d| {
                println!(
                    "disk {} added to node {}: {} ({} extents); data is rebalanced onto it",
                    d.path,
                    d.node,
                    human(d.capacity_bytes),
                    d.extents_total
                )
            })?;
        }
        Command::Pool(PoolCmd::Rebalance) => {
            let mut c = PoolServiceClient::new(ch);
            let r = c
                .rebalance(RebalanceRequest {})
                .await
                .map_err(|s| explain(ep, s))?
                .into_inner();
            print_as(cli.json, &r, |_| {
                println!(
                    "rebalance asked for: copies move until every disk is within 10 % of the mean fill (`pool status` shows the fill, `health` the moves)"
                )
            })?;
        }
        Command::Pool(PoolCmd::Scrub { wait, status }) => {
            pool::run_scrub(PoolServiceClient::new(ch), ep, cli.json, wait, status).await?
        }
        Command::Pool(PoolCmd::Status) => {
            let mut c = PoolServiceClient::new(ch);
            let p = c
                .pool_status(PoolStatusRequest {})
                .await
                .map_err(|s| explain(ep, s))?
                .into_inner();
            print_as(cli.json, &p, |p| print!("{}", pool::render_pool(p)))?;
        }
        Command::Cluster(cmd) => cluster::run_cluster(cmd, ch, ep, cli.json).await?,
        Command::Node(cmd) => cluster::run_node(cmd, ch, ep, cli.json).await?,
        Command::Repair(cmd) => repair::run_repair(cmd, ch, ep, cli.json).await?,
        Command::Health => {
            let mut c = s2d_proto::v1::cluster_service_client::ClusterServiceClient::new(ch);
            let h = c
                .health(s2d_proto::v1::HealthRequest {})
                .await
                .map_err(|s| explain(ep, s))?
                .into_inner();
            print_as(cli.json, &h, |h| print!("{}", cluster::render_health(h)))?;
            if h.state != "healthy" {
                std::process::exit(2);
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;
    use cluster::{ClusterCmd, NodeCmd};

    fn parse(args: &[&str]) -> Cli {
        Cli::try_parse_from(std::iter::once("s2dctl").chain(args.iter().copied()))
            .unwrap_or_else(|e| panic!("{args:?}: {e}"))
    }

    #[test]
    fn command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn cluster_commands_parse() {
        assert!(matches!(
            parse(&["cluster", "init"]).command,
            Command::Cluster(ClusterCmd::Init { name: None })
        ));
        assert!(matches!(
            parse(&["cluster", "init", "--name", "prod"]).command,
            Command::Cluster(ClusterCmd::Init { name: Some(n) }) if n == "prod"
        ));
        let c = parse(&["--json", "cluster", "status"]);
        assert!(c.json && matches!(c.command, Command::Cluster(ClusterCmd::Status)));
    }

    #[test]
    fn node_commands_parse() {
        assert!(matches!(
            parse(&["node", "list", "--json"]).command,
            Command::Node(NodeCmd::List)
        ));
        assert!(matches!(
            parse(&["node", "drain", "b"]).command,
            Command::Node(NodeCmd::Drain { node }) if node == "b"
        ));
        assert!(matches!(
            parse(&["node", "retire", "3"]).command,
            Command::Node(NodeCmd::Retire { node }) if node == "3"
        ));
        assert!(Cli::try_parse_from(["s2dctl", "node", "drain"]).is_err());
    }

    #[test]
    fn verify_parses() {
        let c = parse(&["volume", "verify", "m1", "--json"]);
        assert!(c.json);
        assert!(matches!(
            c.command,
            Command::Volume(VolumeCmd::Verify { name }) if name == "m1"
        ));
        assert!(Cli::try_parse_from(["s2dctl", "volume", "verify"]).is_err());
    }
}
