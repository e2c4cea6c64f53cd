//! `s2dctl repair ...`: the RepairService. A repair is named by its
//! volume's id (or the volume's name).

use crate::table::{Table, human, or_dash};
use crate::{explain, print_as, print_json};
use clap::Subcommand;
use s2d_proto::v1::repair_service_client::RepairServiceClient;
use s2d_proto::v1::{ListRepairsRequest, Repair, RepairStatusRequest, StartRepairRequest};
use std::time::Duration;
use tonic::transport::Channel;

#[derive(Subcommand, Debug)]
pub enum RepairCmd {
    /// Repairs under way, waiting, or just finished.
    List,
    /// One repair: copies to repair, bytes done of total, rate and ETA.
    Status {
        /// The repair id (its volume's id) or the volume's name.
        id: String,
        /// Follow it with a progress bar until it ends.
        #[arg(long)]
        watch: bool,
    },
    /// Repair now: resync stale copies, and rebuild the copies of down
    /// nodes without waiting for --rebuild-after.
    Start {
        /// Only this volume [default: every mirrored volume].
        #[arg(long)]
        volume: Option<String>,
    },
}

fn copies(r: &Repair) -> String {
    let mut s = format!(
        "{} stale, {} resyncing, {} lost",
        r.stale_copies, r.resyncing_copies, r.lost_copies
    );
    if r.down_copies > 0 {
        s.push_str(&format!(", {} on down nodes", r.down_copies));
    }
    s
}

fn progress(r: &Repair) -> String {
    if r.total_bytes == 0 {
        return "-".into();
    }
    format!(
        "{} of {} ({}%)",
        human(r.done_bytes),
        human(r.total_bytes),
        r.done_bytes * 100 / r.total_bytes
    )
}

fn eta(r: &Repair) -> String {
    if r.eta_seconds == 0 {
        "-".into()
    } else {
        format!("{} s", r.eta_seconds)
    }
}

pub fn repair_table(repairs: &[Repair]) -> Table {
    let mut t = Table::new(&["ID", "VOLUME", "STATE", "NODE", "COPIES", "PROGRESS", "ETA"]);
    for r in repairs {
        t.row(vec![
            r.id.to_string(),
            r.volume.clone(),
            r.state.clone(),
            or_dash(&r.node),
            copies(r),
            progress(r),
            eta(r),
        ]);
    }
    t
}

pub fn render_repair(r: &Repair) -> String {
    let mut out = format!(
        "repair {} (volume {}): {}\n  copies    {}\n  progress  {}, {} copied\n  rate      {}/s\n  eta       {}\n",
        r.id,
        r.volume,
        r.state,
        copies(r),
        progress(r),
        human(r.copied_bytes),
        human(r.rate_bytes_per_sec),
        eta(r)
    );
    if !r.node.is_empty() {
        out.push_str(&format!("  node      {}\n", r.node));
    }
    if !r.waiting_for.is_empty() {
        out.push_str(&format!("  waiting   {}\n", r.waiting_for));
    }
    out
}

async fn status(
    c: &mut RepairServiceClient<Channel>,
    ep: &str,
    id: &str,
) -> anyhow::Result<Repair> {
    Ok(c.repair_status(RepairStatusRequest { id: id.to_string() })
        .await
        .map_err(|s| explain(ep, s))?
        .into_inner())
}

/// Follows a repair with a progress bar until it is no longer running.
async fn watch(c: &mut RepairServiceClient<Channel>, ep: &str, id: &str) -> anyhow::Result<Repair> {
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{msg} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        )
        .map_err(|e| anyhow::anyhow!("progress bar: {e}"))?
        .progress_chars("=> "),
    );
    loop {
        let r = status(c, ep, id).await?;
        bar.set_length(r.total_bytes);
        bar.set_position(r.done_bytes);
        bar.set_message(format!("{} {}", r.volume, r.state));
        if r.state != "running" {
            bar.finish();
            return Ok(r);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

pub async fn run_repair(cmd: RepairCmd, ch: Channel, ep: &str, json: bool) -> anyhow::Result<()> {
    let mut c = RepairServiceClient::new(ch);
    match cmd {
        RepairCmd::List => {
            let l = c
                .list_repairs(ListRepairsRequest {})
                .await
                .map_err(|s| explain(ep, s))?
                .into_inner();
            if json {
                return print_json(&l.repairs);
            }
            if l.repairs.is_empty() {
                println!("no repairs: every copy of every mirrored volume is current");
            } else {
                print!("{}", repair_table(&l.repairs).render());
            }
            Ok(())
        }
        RepairCmd::Status { id, watch: true } => {
            let r = watch(&mut c, ep, &id).await?;
            print_as(json, &r, |r| print!("{}", render_repair(r)))
        }
        RepairCmd::Status { id, watch: false } => {
            let r = status(&mut c, ep, &id).await?;
            print_as(json, &r, |r| print!("{}", render_repair(r)))
        }
        RepairCmd::Start { volume } => {
            let r = c
                .start_repair(StartRepairRequest {
                    volume: volume.unwrap_or_default(),
                })
                .await
                .map_err(|s| explain(ep, s))?
                .into_inner();
            if json {
                return print_json(&r.started);
            }
            if r.started.is_empty() {
                println!("nothing to repair: every copy is current");
            } else {
                print!("{}", repair_table(&r.started).render());
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_running_repair_shows_progress_rate_and_eta() {
        let r = Repair {
            id: 7,
            volume: "vm1".into(),
            state: "running".into(),
            node: "n1".into(),
            stale_copies: 0,
            resyncing_copies: 2,
            lost_copies: 0,
            done_bytes: 64 << 20,
            total_bytes: 256 << 20,
            copied_bytes: 4 << 20,
            rate_bytes_per_sec: 32 << 20,
            eta_seconds: 6,
            ..Default::default()
        };
        let s = render_repair(&r);
        assert!(s.starts_with("repair 7 (volume vm1): running\n"), "{s}");
        assert!(s.contains("0 stale, 2 resyncing, 0 lost"), "{s}");
        assert!(s.contains("64.0 MiB of 256.0 MiB (25%)"), "{s}");
        assert!(s.contains("eta       6 s"), "{s}");
        let t = repair_table(&[r]).render();
        assert!(
            t.contains("vm1") && t.contains("running") && t.contains("(25%)"),
            "{t}"
        );
    }

    #[test]
    fn a_waiting_repair_says_why() {
        let r = Repair {
            id: 3,
            volume: "db".into(),
            state: "waiting".into(),
            stale_copies: 4,
            waiting_for: "down node(s) n3".into(),
            ..Default::default()
        };
        let s = render_repair(&r);
        assert!(s.contains("waiting   down node(s) n3"), "{s}");
        assert!(s.contains("progress  -"), "{s}");
    }
}
