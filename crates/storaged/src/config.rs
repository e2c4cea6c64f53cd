//! storaged's configuration: command-line flags over an optional TOML file
//! (`--config`), validated once at start.
//!
//! Invariant: a `Config` that exists is valid (sizes parsed and in range,
//! at least one disk, addresses parsed); everything after start-up can rely
//! on it.

use anyhow::{Context, bail};
use extent_store::EngineChoice;
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub const DEFAULT_LISTEN: &str = "127.0.0.1:7001";
pub const DEFAULT_NBD_LISTEN: &str = "127.0.0.1:10809";
pub const DEFAULT_EXTENT_SIZE: u64 = 256 << 20;
/// A node silent this long is marked down.
pub const DEFAULT_DOWN_AFTER: Duration = Duration::from_secs(10);
/// How long an idle runtime thread polls io_uring completions before it
/// sleeps (measured: +5-15 % on 4k QD1 with one storaged per core).
pub const DEFAULT_IO_POLL: Duration = Duration::from_micros(50);
/// A copy on a node down this long is rebuilt on another node.
pub const DEFAULT_REBUILD_AFTER: Duration = Duration::from_secs(300);
/// Every volume is scrubbed once a week by default.
pub const DEFAULT_SCRUB_INTERVAL: Duration = Duration::from_secs(7 * 24 * 3600);
/// I/O errors and checksum failures after which a disk is failed.
pub const DEFAULT_DISK_ERROR_LIMIT: u64 = 32;
/// A scrub reads at most this many bytes per second by default.
pub const DEFAULT_SCRUB_BANDWIDTH: u64 = 64 << 20;
/// Raft entries between metadata snapshots.
pub const DEFAULT_META_SNAPSHOT_EVERY: u64 = 1000;

/// The keys of storaged.toml (all optional; flags win).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct FileConfig {
    pub data_dir: Option<PathBuf>,
    pub listen: Option<String>,
    pub nbd_listen: Option<String>,
    pub iscsi_listen: Option<String>,
    pub disks: Option<Vec<PathBuf>>,
    pub disk_size: Option<String>,
    pub extent_size: Option<String>,
    pub io_engine: Option<String>,
    pub name: Option<String>,
    pub fault_domain: Option<String>,
    pub join: Option<String>,
    pub down_after: Option<String>,
    pub meta_snapshot_every: Option<u64>,
    pub replication_listen: Option<String>,
    pub rebuild_after: Option<String>,
    pub repair_bandwidth: Option<String>,
    pub io_poll: Option<String>,
    pub scrub_interval: Option<String>,
    pub scrub_bandwidth: Option<String>,
    pub disk_error_limit: Option<u64>,
}

/// The flags that can also come from the file.
#[derive(Debug, Default, Clone)]
pub struct FlagConfig {
    pub config: Option<PathBuf>,
    pub data_dir: Option<PathBuf>,
    pub listen: Option<String>,
    pub nbd_listen: Option<String>,
    pub iscsi_listen: Option<String>,
    pub disks: Vec<PathBuf>,
    pub disk_size: Option<String>,
    pub extent_size: Option<String>,
    pub io_engine: Option<String>,
    pub name: Option<String>,
    pub fault_domain: Option<String>,
    pub join: Option<String>,
    pub down_after: Option<String>,
    pub meta_snapshot_every: Option<u64>,
    pub replication_listen: Option<String>,
    pub rebuild_after: Option<String>,
    pub repair_bandwidth: Option<String>,
    pub io_poll: Option<String>,
    pub scrub_interval: Option<String>,
    pub scrub_bandwidth: Option<String>,
    pub disk_error_limit: Option<u64>,
}

#[derive(Debug, Clone)]
pub struct Config {
    pub data_dir: PathBuf,
    pub listen: SocketAddr,
    pub nbd_listen: SocketAddr,
    /// iSCSI portal; `None`: no iSCSI (it is off unless asked for).
    pub iscsi_listen: Option<SocketAddr>,
    pub disks: Vec<PathBuf>,
    pub disk_size: Option<u64>,
    /// `None`: the pool's own (or the default for a new pool).
    pub extent_size: Option<u64>,
    pub io_engine: EngineChoice,
    /// This node's name in the cluster (default: the --listen address).
    pub name: String,
    /// Fault-domain path `site/rack/chassis/node`, any prefix omitted
    /// (default: the name).
    pub fault_domain: String,
    /// A member of the cluster to join, at first start.
    pub join: Option<SocketAddr>,
    pub down_after: Duration,
    pub meta_snapshot_every: u64,
    /// Where other nodes send replica I/O (default: the --listen IP, a
    /// port the system picks; the cluster learns it at every start).
    pub replication_listen: SocketAddr,
    /// A copy on a node down this long is rebuilt elsewhere.
    pub rebuild_after: Duration,
    /// Bytes per second one resync may copy (None: no limit).
    pub repair_bandwidth: Option<u64>,
    /// How long an idle runtime thread polls io_uring before it sleeps.
    pub io_poll: Duration,
    /// How often each volume is scrubbed by itself (None: only on request).
    pub scrub_interval: Option<Duration>,
    /// Bytes per second one scrub may read (None: no limit).
    pub scrub_bandwidth: Option<u64>,
    /// A disk with more I/O errors and checksum failures than this (since
    /// storaged started) is failed: its copies are rebuilt elsewhere.
    pub disk_error_limit: u64,
}

/// Parse a size such as `4GiB`, `512MiB`, `10GB` or `4096` (bytes).
pub fn parse_size(what: &str, s: &str) -> anyhow::Result<u64> {
    let v: bytesize::ByteSize = s
        .trim()
        .parse()
        .map_err(|e| anyhow::anyhow!("bad {what} {s:?}: {e} (use e.g. 4GiB, 512MiB)"))?;
    Ok(v.as_u64())
}

impl Config {
    pub fn load(flags: FlagConfig) -> anyhow::Result<Config> {
        let file = match &flags.config {
            Some(p) => read_file(p)?,
            None => FileConfig::default(),
        };
        let data_dir = flags
            .data_dir
            .or(file.data_dir)
            .context("no data dir: pass --data-dir DIR or set data-dir in the config file")?;
        let listen = flags
            .listen
            .or(file.listen)
            .unwrap_or_else(|| DEFAULT_LISTEN.into());
        let nbd_listen = flags
            .nbd_listen
            .or(file.nbd_listen)
            .unwrap_or_else(|| DEFAULT_NBD_LISTEN.into());
        let iscsi_listen = flags
            .iscsi_listen
            .or(file.iscsi_listen)
            .map(|a| parse_addr("--iscsi-listen", &a))
            .transpose()?;
        let disks = if flags.disks.is_empty() {
            file.disks.unwrap_or_default()
        } else {
            flags.disks
        };
        if disks.is_empty() {
            bail!("no disks: pass --disk PATH (repeatable) or set disks in the config file");
        }
        let disk_size = flags
            .disk_size
            .or(file.disk_size)
            .map(|s| parse_size("disk size", &s))
            .transpose()?;
        let extent_size = flags
            .extent_size
            .or(file.extent_size)
            .map(|s| parse_size("extent size", &s))
            .transpose()?;
        if let Some(es) = extent_size
            && (es < (1 << 20) || es % (1 << 20) != 0 || es > (4 << 30))
        {
            bail!("bad extent size {es}: must be a multiple of 1 MiB, at most 4 GiB");
        }
        let es = extent_size.unwrap_or(DEFAULT_EXTENT_SIZE);
        if let Some(ds) = disk_size
            && ds < es + (4 << 20)
        {
            bail!("disk size {ds} is too small for one extent of {es} bytes plus metadata");
        }
        let io_engine = flags
            .io_engine
            .or(file.io_engine)
            .unwrap_or_else(|| "auto".into())
            .parse::<EngineChoice>()
            .map_err(|e| anyhow::anyhow!(e))?;
        let listen = parse_addr("--listen", &listen)?;
        let name = flags
            .name
            .or(file.name)
            .unwrap_or_else(|| listen.to_string());
        let name_ok = !name.is_empty()
            && name.len() <= 64
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b));
        if !name_ok {
            bail!("bad --name {name:?}: use 1 to 64 letters, digits, '-', '_', '.' or ':'");
        }
        let fault_domain = flags
            .fault_domain
            .or(file.fault_domain)
            .unwrap_or_else(|| name.clone());
        placement::FaultDomain::parse(&fault_domain)
            .map_err(|e| anyhow::anyhow!("bad --fault-domain {fault_domain:?}: {e}"))?;
        let join = flags
            .join
            .or(file.join)
            .map(|a| parse_addr("--join", &a))
            .transpose()?;
        let down_after = match flags.down_after.or(file.down_after) {
            Some(s) => humantime::parse_duration(&s)
                .map_err(|e| anyhow::anyhow!("bad --down-after {s:?}: {e} (use e.g. 10s, 1m)"))?,
            None => DEFAULT_DOWN_AFTER,
        };
        if down_after < Duration::from_millis(500) {
            bail!("--down-after {down_after:?} is too short: at least 500ms");
        }
        let meta_snapshot_every = flags
            .meta_snapshot_every
            .or(file.meta_snapshot_every)
            .unwrap_or(DEFAULT_META_SNAPSHOT_EVERY);
        if meta_snapshot_every == 0 {
            bail!("--meta-snapshot-every must be at least 1");
        }
        let replication_listen = match flags.replication_listen.or(file.replication_listen) {
            Some(a) => parse_addr("--replication-listen", &a)?,
            None => SocketAddr::new(listen.ip(), 0),
        };
        let rebuild_after = match flags.rebuild_after.or(file.rebuild_after) {
            Some(s) => humantime::parse_duration(&s).map_err(|e| {
                anyhow::anyhow!("bad --rebuild-after {s:?}: {e} (use e.g. 5m, 30s)")
            })?,
            None => DEFAULT_REBUILD_AFTER,
        };
        if rebuild_after < down_after {
            bail!(
                "--rebuild-after {rebuild_after:?} is shorter than --down-after {down_after:?}: a node must be down before its copies are rebuilt"
            );
        }
        let repair_bandwidth = flags
            .repair_bandwidth
            .or(file.repair_bandwidth)
            .map(|s| parse_size("repair bandwidth", s.trim_end_matches("/s")))
            .transpose()?
            .filter(|b| *b > 0);
        let io_poll = match flags.io_poll.or(file.io_poll) {
            Some(s) if s.trim() == "0" => Duration::ZERO,
            Some(s) => humantime::parse_duration(&s)
                .map_err(|e| anyhow::anyhow!("bad --io-poll {s:?}: {e} (use e.g. 50us, or 0)"))?,
            None => DEFAULT_IO_POLL,
        };
        if io_poll > Duration::from_millis(1) {
            bail!("--io-poll {io_poll:?} is too long: at most 1ms");
        }
        let scrub_interval = match flags.scrub_interval.or(file.scrub_interval) {
            Some(s) if matches!(s.trim(), "0" | "off") => None,
            Some(s) => Some(humantime::parse_duration(&s).map_err(|e| {
                anyhow::anyhow!("bad --scrub-interval {s:?}: {e} (use e.g. 168h, or off)")
            })?),
            None => Some(DEFAULT_SCRUB_INTERVAL),
        };
        let scrub_bandwidth = match flags.scrub_bandwidth.or(file.scrub_bandwidth) {
            Some(s) => Some(parse_size("scrub bandwidth", s.trim_end_matches("/s"))?),
            None => Some(DEFAULT_SCRUB_BANDWIDTH),
        }
        .filter(|b| *b > 0);
        Ok(Config {
            data_dir,
            listen,
            nbd_listen: parse_addr("--nbd-listen", &nbd_listen)?,
            iscsi_listen,
            disks,
            disk_size,
            extent_size,
            io_engine,
            name,
            fault_domain,
            join,
            down_after,
            meta_snapshot_every,
            replication_listen,
            rebuild_after,
            repair_bandwidth,
            scrub_interval,
            scrub_bandwidth,
            disk_error_limit: flags
                .disk_error_limit
                .or(file.disk_error_limit)
                .unwrap_or(DEFAULT_DISK_ERROR_LIMIT)
                .max(1),
            io_poll,
        })
    }
}

fn parse_addr(flag: &str, s: &str) -> anyhow::Result<SocketAddr> {
    s.parse().with_context(|| {
        format!("bad {flag} address {s:?}: expected IP:PORT such as 127.0.0.1:7001")
    })
}

fn read_file(p: &Path) -> anyhow::Result<FileConfig> {
    let text = std::fs::read_to_string(p)
        .with_context(|| format!("cannot read config file {}", p.display()))?;
    toml::from_str(&text).with_context(|| format!("bad config file {}", p.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_override_the_file_and_sizes_parse() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("s.toml");
        std::fs::write(
            &p,
            "data-dir = \"/d\"\nlisten = \"127.0.0.1:1\"\niscsi-listen = \"127.0.0.1:3260\"\ndisks = [\"/a\", \"/b\"]\ndisk-size = \"1GiB\"\nextent-size = \"4MiB\"\nio-engine = \"sync\"\n",
        )
        .expect("write");
        let c = Config::load(FlagConfig {
            config: Some(p),
            listen: Some("127.0.0.1:2".into()),
            ..Default::default()
        })
        .expect("valid config");
        assert_eq!(c.listen.port(), 2, "flag must win over the file");
        assert_eq!(c.data_dir, PathBuf::from("/d"));
        assert_eq!(c.disks.len(), 2);
        assert_eq!(c.disk_size, Some(1 << 30));
        assert_eq!(c.extent_size, Some(4 << 20));
        assert_eq!(c.io_engine, EngineChoice::Sync);
        assert_eq!(
            c.iscsi_listen,
            Some("127.0.0.1:3260".parse().expect("addr")),
            "iscsi-listen from the file must be kept"
        );
    }

    #[test]
    fn iscsi_is_off_unless_asked_for_and_its_address_is_checked() {
        let base = FlagConfig {
            data_dir: Some("/d".into()),
            disks: vec!["/a".into()],
            ..Default::default()
        };
        let c = Config::load(base.clone()).expect("valid config");
        assert_eq!(c.iscsi_listen, None, "iSCSI must be off by default");
        let c = Config::load(FlagConfig {
            iscsi_listen: Some("127.0.0.1:3261".into()),
            ..base.clone()
        })
        .expect("valid config");
        assert_eq!(c.iscsi_listen.map(|a| a.port()), Some(3261));
        let e = Config::load(FlagConfig {
            iscsi_listen: Some("port 3260".into()),
            ..base
        })
        .unwrap_err();
        assert!(
            e.to_string().contains("--iscsi-listen"),
            "a bad iSCSI address must name the flag: {e}"
        );
    }

    #[test]
    fn cluster_timings_and_io_poll_are_parsed_and_checked() {
        let base = FlagConfig {
            data_dir: Some("/d".into()),
            disks: vec!["/a".into()],
            ..Default::default()
        };
        let c = Config::load(base.clone()).expect("defaults");
        assert_eq!(c.io_poll, DEFAULT_IO_POLL);
        assert_eq!(c.rebuild_after, DEFAULT_REBUILD_AFTER);
        assert_eq!(c.repair_bandwidth, None, "no repair cap by default");
        let c = Config::load(FlagConfig {
            io_poll: Some("0".into()),
            down_after: Some("2s".into()),
            rebuild_after: Some("30s".into()),
            repair_bandwidth: Some("64MiB/s".into()),
            ..base.clone()
        })
        .expect("valid timings");
        assert!(c.io_poll.is_zero(), "--io-poll 0 turns polling off");
        assert_eq!(c.down_after, Duration::from_secs(2));
        assert_eq!(c.rebuild_after, Duration::from_secs(30));
        assert_eq!(c.repair_bandwidth, Some(64 << 20));
        for (flags, want) in [
            (
                FlagConfig {
                    io_poll: Some("5ms".into()),
                    ..base.clone()
                },
                "--io-poll",
            ),
            (
                FlagConfig {
                    down_after: Some("10s".into()),
                    rebuild_after: Some("5s".into()),
                    ..base.clone()
                },
                "--rebuild-after",
            ),
            (
                FlagConfig {
                    down_after: Some("soon".into()),
                    ..base.clone()
                },
                "--down-after",
            ),
        ] {
            let e = Config::load(flags).expect_err("must be refused");
            assert!(e.to_string().contains(want), "{want}: {e}");
        }
    }

    #[test]
    fn bad_configs_are_refused_with_a_reason() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("s.toml");
        std::fs::write(&p, "data-dir = \"/d\"\nunknown-key = 1\n").expect("write");
        let e = Config::load(FlagConfig {
            config: Some(p),
            ..Default::default()
        })
        .unwrap_err();
        assert!(format!("{e:#}").contains("unknown field"), "{e:#}");
        let base = FlagConfig {
            data_dir: Some("/d".into()),
            disks: vec!["/a".into()],
            ..Default::default()
        };
        let e = Config::load(FlagConfig {
            disk_size: Some("lots".into()),
            ..base.clone()
        })
        .unwrap_err();
        assert!(e.to_string().contains("bad disk size"), "{e}");
        let e = Config::load(FlagConfig {
            io_engine: Some("fast".into()),
            ..base.clone()
        })
        .unwrap_err();
        assert!(e.to_string().contains("unknown io engine"), "{e}");
        let e = Config::load(FlagConfig {
            listen: Some("nowhere".into()),
            ..base.clone()
        })
        .unwrap_err();
        assert!(e.to_string().contains("--listen"), "{e}");
        let e = Config::load(FlagConfig {
            disks: vec![],
            ..base
        })
        .unwrap_err();
        assert!(e.to_string().contains("no disks"), "{e}");
    }
}
