//! s2dctl: the operator's command line for s2d.
//!
//! Talks gRPC to one storaged node (`--endpoint`). Prints human tables by
//! default and JSON with `--json`. Every error is one line on stderr and
//! exit status 1; success is exit status 0.

mod table;

use anyhow::{Context, anyhow};
use clap::{Parser, Subcommand};
use s2d_proto::v1::pool_service_client::PoolServiceClient;
use s2d_proto::v1::volume_service_client::VolumeServiceClient;
use s2d_proto::v1::*;
use std::time::Duration;
use table::{Table, human};

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
    /// Create, list, inspect, resize and delete volumes.
    #[command(subcommand)]
    Volume(VolumeCmd),
    /// The pool's disks and capacity.
    #[command(subcommand)]
    Pool(PoolCmd),
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

/// off, one-way or mutual.
fn chap_mode(v: &Volume) -> &'static str {
    match (v.chap_enabled, v.mutual_chap) {
        (false, _) => "off",
        (true, false) => "one-way",
        (true, true) => "mutual",
    }
}

#[derive(Subcommand, Debug)]
enum PoolCmd {
    /// Disks, capacity, used and free space.
    Status,
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
        tonic::Code::Unavailable => anyhow!("cannot reach storaged at {endpoint}: {}", s.message()),
        tonic::Code::DeadlineExceeded => {
            anyhow!("storaged at {endpoint} did not answer within {TIMEOUT:?}")
        }
        _ => anyhow!("{}", s.message()),
    }
}

async fn channel(endpoint: &str) -> anyhow::Result<tonic::transport::Channel> {
    let uri = if endpoint.contains("://") {
        endpoint.to_string()
    } else {
        format!("http://{endpoint}")
    };
    let ep = tonic::transport::Endpoint::from_shared(uri)
        .with_context(|| format!("bad endpoint {endpoint:?}"))?
        .connect_timeout(Duration::from_secs(5))
        .timeout(TIMEOUT);
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
    let ch = channel(&cli.endpoint).await?;
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
                        let mut t = Table::new(&[
                            "NAME",
                            "SIZE",
                            "RESILIENCY",
                            "ALLOCATED",
                            "BLOCK",
                            "CHAP",
                            "NBD",
                        ]);
                        for v in &l.volumes {
                            t.row(vec![
                                v.name.clone(),
                                human(v.size_bytes),
                                v.resiliency.clone(),
                                human(v.allocated_bytes),
                                v.block_size_bytes.to_string(),
                                chap_mode(v).to_string(),
                                v.nbd_uri.clone(),
                            ]);
                        }
                        t.print();
                    }
                }
                VolumeCmd::Show { name } => {
                    let v = c
                        .get_volume(GetVolumeRequest { name })
                        .await
                        .map_err(|s| explain(ep, s))?
                        .into_inner();
                    print_as(cli.json, &v, print_volume)?;
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
        Command::Pool(PoolCmd::Status) => {
            let mut c = PoolServiceClient::new(ch);
            let p = c
                .pool_status(PoolStatusRequest {})
                .await
                .map_err(|s| explain(ep, s))?
                .into_inner();
            print_as(cli.json, &p, print_pool)?;
        }
    }
    Ok(())
}

fn print_volume(v: &Volume) {
    let rows = [
        ("name", v.name.clone()),
        ("id", v.id.to_string()),
        (
            "size",
            format!("{} ({} bytes)", human(v.size_bytes), v.size_bytes),
        ),
        ("resiliency", v.resiliency.clone()),
        (
            "allocated",
            format!(
                "{} ({} of {} slabs)",
                human(v.allocated_bytes),
                v.slabs_allocated,
                v.slabs_total
            ),
        ),
        ("nbd", v.nbd_uri.clone()),
        (
            "block size",
            if v.block_size_bytes == 512 {
                "512 bytes (512e over 4 KiB physical blocks)".to_string()
            } else {
                format!("{} bytes", v.block_size_bytes)
            },
        ),
        ("iscsi", v.iscsi_target.clone()),
        (
            "iscsi uri",
            if v.iscsi_uri.is_empty() {
                "- (this node serves no iSCSI: storaged --iscsi-listen)".to_string()
            } else {
                v.iscsi_uri.clone()
            },
        ),
        ("chap", chap_mode(v).to_string()),
    ];
    for (k, val) in rows {
        println!("{k:<11} {val}");
    }
}

fn print_pool(p: &PoolStatusResponse) {
    println!("pool      {}", p.pool_id);
    println!("node      {}", p.node_id);
    println!("extent    {}", human(p.extent_size_bytes));
    println!(
        "capacity  {}   used {}   free {}   provisioned {} in {} volumes",
        human(p.capacity_bytes),
        human(p.used_bytes),
        human(p.free_bytes),
        human(p.provisioned_bytes),
        p.volumes
    );
    println!();
    let mut t = Table::new(&["DISK", "CAPACITY", "USED", "FREE", "EXTENTS", "ENGINE"]);
    for d in &p.disks {
        t.row(vec![
            d.path.clone(),
            human(d.capacity_bytes),
            human(d.used_bytes),
            human(d.free_bytes),
            format!("{}/{} free", d.extents_free, d.extents_total),
            d.io_engine.clone(),
        ]);
    }
    t.print();
}
