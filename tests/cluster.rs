//! Clusters of real storaged processes on 127.0.0.1 driven by s2dctl:
//! membership (voters, learners, the 16-node limit), metadata seen alike
//! from every node, leader failover, full restart, loss of quorum,
//! catch-up from a snapshot, failure detection, retiring a voter, and NBD
//! I/O through a volume's home node.

use harness::cluster::{Cluster, json_list, node_name, small_node, tiny_node};
use harness::{NodeOptions, StartFailure, have, run_ok};
use serde_json::Value;
use std::process::Output;
use std::time::{Duration, Instant};

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

fn stderr_of(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).trim_end().to_string()
}

/// (voters, learners, nodes flagged leader) in a `node list`.
fn roles(nodes: &[Value]) -> (usize, usize, usize) {
    let count = |f: &dyn Fn(&Value) -> bool| nodes.iter().filter(|n| f(n)).count();
    (
        count(&|n| n["role"] == "voter"),
        count(&|n| n["role"] == "learner"),
        count(&|n| n["leader"] == true),
    )
}

fn by_name<'a>(nodes: &'a [Value], name: &str) -> Option<&'a Value> {
    nodes.iter().find(|n| n["name"] == name)
}

fn summary(nodes: &[Value]) -> String {
    nodes
        .iter()
        .map(|n| {
            format!(
                "{}(id {}, {}, {}{})",
                n["name"].as_str().unwrap_or("?"),
                n["id"],
                n["state"].as_str().unwrap_or("?"),
                n["role"].as_str().unwrap_or("?"),
                if n["leader"] == true { ", leader" } else { "" }
            )
        })
        .collect::<Vec<_>>()
        .join(" ")
}

fn strings(v: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = v.iter().map(|s| s.to_string()).collect();
    v.sort();
    v
}

/// Node `i`'s applied Raft index, from its local `cluster status`.
fn applied(c: &Cluster, i: usize) -> Result<u64, String> {
    let s = c.status(i)?;
    s["applied_index"]
        .as_u64()
        .ok_or_else(|| format!("node {i}: no applied_index in {s}"))
}

/// Run `args` on node `i`, which has lost quorum: it must fail with exit 1,
/// one line on stderr naming the missing leader, within 15 s.
fn refused_without_leader(c: &Cluster, i: usize, args: &[&str]) -> String {
    let t = Instant::now();
    let o = c.ctl(i, args);
    let took = t.elapsed();
    let err = stderr_of(&o);
    assert_eq!(
        o.status.code(),
        Some(1),
        "s2dctl {args:?} on node {i} without quorum should exit 1, got {} \
         (stderr {err:?}, stdout {:?})",
        o.status,
        String::from_utf8_lossy(&o.stdout)
    );
    assert!(
        err.contains("cluster has no leader"),
        "s2dctl {args:?} on node {i} without quorum: error does not say \
         \"cluster has no leader\": {err:?}\n{}",
        c.logs(&[i])
    );
    assert_eq!(err.lines().count(), 1, "error is not one line: {err:?}");
    assert!(
        took < secs(15),
        "s2dctl {args:?} without quorum took {took:?} to fail (contract: ~10 s)"
    );
    eprintln!("without quorum, s2dctl {args:?} failed after {took:?}: {err}");
    err
}

#[test]
fn three_nodes_see_the_same_volumes_members_and_pool() {
    let mut c = Cluster::start(3);
    for i in 1..=3 {
        c.create_volume(i, &format!("from-n{i}"), "64MiB");
    }
    let want = strings(&["from-n1", "from-n2", "from-n3"]);
    let reference = c.wait_for(
        "node 1 to list the volumes created through every node",
        secs(10),
        |c| {
            let v = c.volume_ids(1)?;
            let names: Vec<String> = v.iter().map(|(n, _)| n.clone()).collect();
            if names == want {
                Ok(v)
            } else {
                Err(format!("node 1 lists {v:?}"))
            }
        },
    );
    let mut ids: Vec<u64> = reference.iter().map(|(_, id)| *id).collect();
    ids.dedup();
    assert!(
        ids.len() == 3 && !ids.contains(&0),
        "volume ids are not distinct and non-zero: {reference:?}"
    );
    for i in 2..=3 {
        c.wait_for(
            &format!("node {i} to list the same volumes with the same ids as node 1"),
            secs(10),
            |c| {
                let v = c.volume_ids(i)?;
                if v == reference {
                    Ok(())
                } else {
                    Err(format!("node {i} lists {v:?}, node 1 {reference:?}"))
                }
            },
        );
    }

    // Membership: three voters, one leader, all up, the same everywhere.
    for i in 1..=3 {
        c.wait_for(
            &format!("node {i}'s node list to show 3 up voters and one leader"),
            secs(10),
            |c| {
                let nodes = c.node_list(i)?;
                let mut names: Vec<String> = nodes
                    .iter()
                    .map(|n| n["name"].as_str().unwrap_or_default().to_string())
                    .collect();
                names.sort();
                if names != strings(&["n1", "n2", "n3"])
                    || roles(&nodes) != (3, 0, 1)
                    || nodes.iter().any(|n| n["state"] != "up")
                {
                    return Err(format!("node {i}: {}", summary(&nodes)));
                }
                for n in &nodes {
                    let k = c
                        .index_of(n)
                        .ok_or_else(|| format!("unknown node in list: {n}"))?;
                    if n["nbd_address"] != c.node(k).nbd.to_string()
                        || n["address"] != c.grpc(k).to_string()
                    {
                        return Err(format!("wrong addresses for node {k}: {n}"));
                    }
                }
                Ok(())
            },
        );
    }
    let leaders: Vec<usize> = (1..=3)
        .map(|i| c.leader_seen_by(i).unwrap_or_else(|e| panic!("{e}")))
        .collect();
    assert!(
        leaders.iter().all(|&l| l == leaders[0]),
        "nodes name different leaders: {leaders:?}"
    );
    let s = c.status(2).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(s["initialized"], true, "cluster status: {s}");
    assert_eq!(s["name"], "test", "cluster status: {s}");
    assert_eq!(s["voters"], 3, "cluster status: {s}");
    assert_eq!(s["learners"], 0, "cluster status: {s}");
    assert_eq!(s["extent_size_bytes"], 4u64 << 20, "cluster status: {s}");

    // Pool: three reachable nodes whose figures add up.
    for i in 1..=3 {
        let pool = c.ctl_json(i, &["pool", "status"]);
        let nodes = json_list(&pool["nodes"], "nodes");
        assert_eq!(nodes.len(), 3, "pool status on node {i}: {pool}");
        assert!(
            nodes
                .iter()
                .all(|n| n["reachable"] == true && n["capacity_bytes"].as_u64() > Some(0)),
            "pool status on node {i}: not every node reachable with capacity: {pool}"
        );
        let sum: u64 = nodes
            .iter()
            .map(|n| n["capacity_bytes"].as_u64().unwrap_or(0))
            .sum();
        assert_eq!(
            pool["capacity_bytes"].as_u64(),
            Some(sum),
            "pool capacity is not the sum over nodes: {pool}"
        );
        assert_eq!(pool["volumes"], 3, "pool status on node {i}: {pool}");
    }

    // Every volume's NBD URI points at its home node.
    for v in c.volume_list(2).unwrap_or_else(|e| panic!("{e}")) {
        let home = v["node"].as_str().unwrap_or_default();
        let k = c
            .index_of_name(home)
            .unwrap_or_else(|| panic!("volume's home node {home:?} is none of ours: {v}"));
        let uri = v["nbd_uri"].as_str().unwrap_or_default();
        assert!(
            uri.contains(&c.node(k).nbd.to_string()),
            "nbd_uri {uri} does not point at home node {home} ({}): {v}",
            c.node(k).nbd
        );
    }
}

#[test]
fn six_nodes_have_five_voters_and_one_learner() {
    let mut c = Cluster::start(6);
    let nodes = c.wait_for("5 voters and 1 learner among 6 nodes", secs(20), |c| {
        let nodes = c.node_list(1)?;
        if nodes.len() == 6 && roles(&nodes) == (5, 1, 1) {
            Ok(nodes)
        } else {
            Err(summary(&nodes))
        }
    });
    let learner = nodes
        .iter()
        .find(|n| n["role"] == "learner")
        .and_then(|n| c.index_of(n))
        .expect("the learner is one of ours");
    c.wait_for(
        "every node's cluster status to count 5 voters, 1 learner",
        secs(10),
        |c| {
            for i in 1..=6 {
                let s = c.status(i)?;
                if s["voters"] != 5 || s["learners"] != 1 {
                    return Err(format!("node {i}: {s}"));
                }
            }
            Ok(())
        },
    );

    let mut creators = vec![1, learner, 6];
    creators.dedup();
    if creators.len() < 3 {
        creators.push(3);
    }
    let mut want = Vec::new();
    for &i in &creators {
        let name = format!("made-on-n{i}");
        c.create_volume(i, &name, "64MiB");
        want.push(name);
    }
    want.sort();
    let reference = c.wait_for("node 1 to list every volume", secs(10), |c| {
        let v = c.volume_ids(1)?;
        if v.iter().map(|(n, _)| n).eq(want.iter()) {
            Ok(v)
        } else {
            Err(format!("node 1 lists {v:?}, want {want:?}"))
        }
    });
    for i in 2..=6 {
        c.wait_for(
            &format!("node {i} to list the same volumes as node 1"),
            secs(10),
            |c| {
                let v = c.volume_ids(i)?;
                if v == reference {
                    Ok(())
                } else {
                    Err(format!("node {i} lists {v:?}, node 1 {reference:?}"))
                }
            },
        );
    }
}

#[test]
fn killing_the_leader_elects_a_new_one_quickly_and_loses_nothing() {
    let mut c = Cluster::start(3);
    for i in 1..=3 {
        c.create_volume(i, &format!("before-{i}"), "64MiB");
    }
    let old = c.leader();
    let before = c.wait_for("the leader to list the 3 volumes", secs(10), |c| {
        let v = c.volume_ids(old)?;
        if v.len() == 3 {
            Ok(v)
        } else {
            Err(format!("leader lists {v:?}"))
        }
    });

    c.kill9(old);
    let t0 = Instant::now();
    let survivors: Vec<usize> = (1..=3).filter(|&i| i != old).collect();
    let mut elected: Option<(usize, Duration)> = None;
    let (via, took) = c.wait_for(
        "a survivor to accept a volume create after kill -9 of the leader",
        secs(30),
        |c| {
            let mut last = String::new();
            for &i in &survivors {
                match c.leader_seen_by(i) {
                    Ok(l) if l != old => {
                        if elected.is_none() {
                            elected = Some((l, t0.elapsed()));
                        }
                    }
                    Ok(_) => {
                        last = format!("node {i} still names the dead leader {old}");
                        continue;
                    }
                    Err(e) => {
                        last = e;
                        continue;
                    }
                }
                let o = c.ctl(i, &["volume", "create", "after-kill", "--size", "64MiB"]);
                let err = stderr_of(&o);
                // An earlier attempt that timed out may have committed.
                if o.status.success() || err.contains("already taken") {
                    return Ok((i, t0.elapsed()));
                }
                last = format!("create on node {i}: {err}");
            }
            Err(last)
        },
    );
    let (new, elected_after) = elected.expect("a new leader was seen");
    println!(
        "FAILOVER: kill -9 of leader {} -> new leader {} seen after {} ms, first successful \
         `volume create` (through node {via}) after {} ms",
        node_name(old),
        node_name(new),
        elected_after.as_millis(),
        took.as_millis()
    );
    eprintln!(
        "FAILOVER: new leader after {} ms, first volume create after {} ms",
        elected_after.as_millis(),
        took.as_millis()
    );
    assert!(
        took < secs(10),
        "failover took {took:?} (kill -9 of the leader to the first successful create)"
    );

    // Both survivors work and lost nothing.
    let other = survivors.iter().copied().find(|&i| i != via).unwrap();
    c.create_volume(other, "after-kill-2", "64MiB");
    let after = c.wait_for(
        "both survivors to list all 5 volumes alike",
        secs(10),
        |c| {
            let a = c.volume_ids(survivors[0])?;
            let b = c.volume_ids(survivors[1])?;
            let names: Vec<&str> = a.iter().map(|(n, _)| n.as_str()).collect();
            if a == b
                && names
                    == [
                        "after-kill",
                        "after-kill-2",
                        "before-1",
                        "before-2",
                        "before-3",
                    ]
            {
                Ok(a)
            } else {
                Err(format!(
                    "node {} lists {a:?}, node {} {b:?}",
                    survivors[0], survivors[1]
                ))
            }
        },
    );
    for v in &before {
        assert!(
            after.contains(v),
            "volume {v:?} committed before the kill is gone or changed id: {after:?}"
        );
    }
    let leader_applied = applied(&c, new).unwrap_or_else(|e| panic!("{e}"));

    // The old leader comes back and catches up.
    c.restart(old);
    c.wait_for(
        "the restarted old leader to catch up and list the volumes made while it was down",
        secs(20),
        |c| {
            let a = applied(c, old)?;
            let v = c.volume_ids(old)?;
            if a >= leader_applied && v == after {
                Ok(())
            } else {
                Err(format!(
                    "old leader applied {a} (leader had {leader_applied}), lists {v:?}"
                ))
            }
        },
    );
}

#[test]
fn stopping_and_starting_all_nodes_keeps_volumes_and_members() {
    let mut c = Cluster::start(3);
    for i in 1..=3 {
        c.create_volume(i, &format!("keep-{i}"), "64MiB");
    }
    let vols = c.wait_for("node 1 to list 3 volumes", secs(10), |c| {
        let v = c.volume_ids(1)?;
        if v.len() == 3 {
            Ok(v)
        } else {
            Err(format!("node 1 lists {v:?}"))
        }
    });
    let member_ids = |nodes: &[Value]| {
        let mut m: Vec<(u64, String)> = nodes
            .iter()
            .map(|n| {
                (
                    n["id"].as_u64().unwrap_or(0),
                    n["name"].as_str().unwrap_or_default().to_string(),
                )
            })
            .collect();
        m.sort();
        m
    };
    let members = member_ids(&c.node_list(1).unwrap_or_else(|e| panic!("{e}")));
    assert_eq!(members.len(), 3, "members: {members:?}");

    for i in 1..=3 {
        let code = c.stop(i);
        assert_eq!(
            code,
            Some(0),
            "node {i} did not exit 0 on SIGTERM\n{}",
            c.logs(&[i])
        );
    }
    c.restart_together(&[1, 2, 3]);
    c.wait_members(3);
    for i in 1..=3 {
        c.wait_for(
            &format!("node {i} to list the volumes and members from before"),
            secs(30),
            |c| {
                let v = c.volume_ids(i)?;
                let nodes = c.node_list(i)?;
                if v == vols
                    && member_ids(&nodes) == members
                    && nodes.iter().all(|n| n["state"] == "up")
                    && roles(&nodes) == (3, 0, 1)
                {
                    Ok(())
                } else {
                    Err(format!(
                        "node {i}: volumes {v:?} (want {vols:?}), nodes {}",
                        summary(&nodes)
                    ))
                }
            },
        );
    }
    c.create_volume(2, "after-restart", "64MiB");
}

#[test]
fn losing_a_majority_refuses_metadata_commands_until_quorum_returns() {
    let mut c = Cluster::start(3);
    c.create_volume(1, "keep", "64MiB");
    // Keep the leader and kill the other two: the survivor may have the
    // refused create in its log, which must never take effect.
    let surv = c.leader();
    let dead: Vec<usize> = (1..=3).filter(|&i| i != surv).collect();
    for &i in &dead {
        c.kill9(i);
    }

    refused_without_leader(
        &c,
        surv,
        &["volume", "create", "refused", "--size", "64MiB"],
    );
    let err = refused_without_leader(&c, surv, &["volume", "list"]);
    assert!(
        err.contains("2 of 3 voters unreachable"),
        "the error should count the unreachable voters: {err:?}"
    );
    refused_without_leader(&c, surv, &["volume", "show", "keep"]);
    refused_without_leader(&c, surv, &["node", "list"]);
    refused_without_leader(&c, surv, &["pool", "status"]);
    // cluster status answers from the local view, with no leader.
    c.wait_for(
        "the survivor's cluster status to answer with leader_id 0",
        secs(15),
        |c| {
            let s = c.status(surv)?;
            if s["leader_id"] == 0 {
                Ok(())
            } else {
                Err(format!("cluster status: {s}"))
            }
        },
    );

    c.restart(dead[0]);
    let names = c.wait_for(
        "volume list on the survivor to work again with 2 of 3 nodes",
        secs(30),
        |c| c.volume_names(surv),
    );
    assert_eq!(
        names,
        ["keep"],
        "after quorum returned the survivor lists {names:?}: the refused create took effect"
    );
    c.wait_for(
        "volume create on the survivor to work again",
        secs(10),
        |c| {
            let o = c.ctl(surv, &["volume", "create", "after", "--size", "64MiB"]);
            let err = stderr_of(&o);
            if o.status.success() || err.contains("already taken") {
                Ok(())
            } else {
                Err(err)
            }
        },
    );
    // Give a stale proposal time to surface, then look from both nodes.
    std::thread::sleep(secs(2));
    for i in [surv, dead[0]] {
        let names = c.wait_for(&format!("node {i} to list 'after'"), secs(10), |c| {
            let n = c.volume_names(i)?;
            if n.iter().any(|v| v == "after") {
                Ok(n)
            } else {
                Err(format!("node {i} lists {n:?}"))
            }
        });
        assert_eq!(
            names,
            ["after", "keep"],
            "node {i} lists {names:?}: the create refused without quorum took effect"
        );
    }
}

#[test]
fn a_lagging_node_catches_up_from_a_snapshot() {
    let mut c = Cluster::start_with(
        3,
        NodeOptions {
            meta_snapshot_every: Some(5),
            // "metadata snapshot taken, log compacted index=N" is a debug line.
            rust_log: Some("info,meta=debug"),
            ..small_node()
        },
    );
    let leader = c.leader();
    let lag = (1..=3).rev().find(|&i| i != leader).unwrap();
    let up: Vec<usize> = (1..=3).filter(|&i| i != lag).collect();
    let lag_applied = applied(&c, lag).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        c.stop(lag),
        Some(0),
        "node {lag} did not exit 0 on SIGTERM\n{}",
        c.logs(&[lag])
    );
    let mut want = Vec::new();
    for k in 0..30 {
        let name = format!("snap-{k:02}");
        c.create_volume(up[k % 2], &name, "16MiB");
        want.push(name);
    }
    let now_leader = c.leader();
    let target = applied(&c, now_leader).unwrap_or_else(|e| panic!("{e}"));
    // The leader's log must be compacted past what the stopped node has,
    // so that it can only catch up from a snapshot.
    let compacted = c.wait_for(
        "the leader to compact its log past the stopped node's applied index",
        secs(10),
        |c| {
            let max = compacted_to(&c.node(now_leader).log_text());
            match max {
                Some(m) if m > lag_applied => Ok(m),
                _ => Err(format!(
                    "leader node {now_leader} compacted to {max:?}, stopped node \
                         applied {lag_applied}"
                )),
            }
        },
    );
    eprintln!(
        "stopped node {lag} had applied {lag_applied}; leader {now_leader} compacted its log \
         to {compacted} (applied {target})"
    );

    c.restart(lag);
    c.wait_for(
        "the restarted node to catch up (applied index and all 30 volumes)",
        secs(30),
        |c| {
            let a = applied(c, lag)?;
            let names = c.volume_names(lag)?;
            if a >= target && names == want {
                Ok(())
            } else {
                Err(format!(
                    "node {lag} applied {a} (leader had {target}), lists {} volumes: {names:?}",
                    names.len()
                ))
            }
        },
    );
}

/// The highest `index=N` of the "metadata snapshot taken" lines in a log.
fn compacted_to(log: &str) -> Option<u64> {
    log.lines()
        .filter(|l| l.contains("metadata snapshot taken"))
        .filter_map(|l| {
            let rest = &l[l.find("index=")? + "index=".len()..];
            let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
            digits.parse().ok()
        })
        .max()
}

#[test]
fn a_cluster_holds_at_most_16_nodes() {
    let mut c = Cluster::start_with(16, tiny_node());
    let (n17, r) = c.try_join(17);
    match r {
        Ok(()) => panic!("a 17th node joined a cluster of 16\n{}", c.logs(&[1])),
        Err(StartFailure::Timeout { log }) => {
            panic!("the 17th node neither joined nor exited within 30 s; its log:\n{log}")
        }
        Err(StartFailure::Exited { status, log }) => {
            assert_eq!(
                status.code(),
                Some(1),
                "the refused 17th storaged should exit 1, got {status}; log:\n{log}"
            );
            let line = log
                .lines()
                .find(|l| l.starts_with("storaged: cannot join"))
                .unwrap_or_else(|| {
                    panic!("no line starting \"storaged: cannot join\" from the 17th node:\n{log}")
                });
            assert!(
                line.contains("16 nodes"),
                "the refusal does not mention the 16-node limit: {line:?}"
            );
            eprintln!("17th node refused: {line}");
        }
    }
    drop(n17);
    c.wait_for("16 nodes, 5 voters and 11 learners", secs(15), |c| {
        let nodes = c.node_list(1)?;
        if nodes.len() == 16 && roles(&nodes) == (5, 11, 1) {
            Ok(())
        } else {
            Err(format!("{} nodes: {}", nodes.len(), summary(&nodes)))
        }
    });
    let s = c.status(16).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        json_list(&s["nodes"], "nodes").len(),
        16,
        "node 16's cluster status: {s}"
    );
}

#[test]
fn a_silent_node_is_marked_down_and_up_again() {
    let mut c = Cluster::start_with(
        3,
        NodeOptions {
            down_after: Some("1s"),
            ..small_node()
        },
    );
    let leader = c.leader();
    let victim = (1..=3).rev().find(|&i| i != leader).unwrap();
    let name = node_name(victim);
    let state_of = move |c: &mut Cluster| -> Result<String, String> {
        let nodes = c.node_list(leader)?;
        by_name(&nodes, &name)
            .map(|n| n["state"].as_str().unwrap_or_default().to_string())
            .ok_or_else(|| format!("no {name} in {}", summary(&nodes)))
    };
    c.wait_for("all nodes up", secs(10), |c| {
        let s = state_of(c)?;
        if s == "up" { Ok(()) } else { Err(s) }
    });

    c.kill9(victim);
    let t0 = Instant::now();
    let took = c.wait_for(
        &format!(
            "the killed node {} to be shown down (down_after 1s)",
            node_name(victim)
        ),
        secs(6),
        |c| {
            let s = state_of(c)?;
            if s == "down" {
                Ok(t0.elapsed())
            } else {
                Err(format!("state {s}"))
            }
        },
    );
    eprintln!("kill -9 to state down: {} ms", took.as_millis());

    c.restart(victim);
    let t1 = Instant::now();
    c.wait_for("the restarted node to be shown up again", secs(10), |c| {
        let s = state_of(c)?;
        if s == "up" {
            Ok(())
        } else {
            Err(format!("state {s}"))
        }
    });
    eprintln!("restart to state up: {} ms", t1.elapsed().as_millis());
}

#[test]
fn retiring_a_voter_promotes_the_learner() {
    let mut c = Cluster::start(4);
    let nodes = c.wait_for("3 voters and 1 learner among 4 nodes", secs(20), |c| {
        let nodes = c.node_list(1)?;
        if nodes.len() == 4 && roles(&nodes) == (3, 1, 1) {
            Ok(nodes)
        } else {
            Err(summary(&nodes))
        }
    });
    let learner = nodes
        .iter()
        .find(|n| n["role"] == "learner")
        .and_then(|n| c.index_of(n))
        .expect("learner is ours");
    c.create_volume(1, "keep", "64MiB");
    let show = c.ctl_json(1, &["volume", "show", "keep"]);
    let home = c
        .index_of_name(show["node"].as_str().unwrap_or_default())
        .unwrap_or_else(|| panic!("volume keep has no home node of ours: {show}"));
    let leader = c.leader();
    let target = nodes
        .iter()
        .filter(|n| n["role"] == "voter")
        .filter_map(|n| c.index_of(n))
        .find(|&i| i != leader && i != home)
        .expect("a voter that is neither leader nor home");
    let tname = node_name(target);
    let lname = node_name(learner);

    let out = c.ctl_json(leader, &["node", "retire", &tname]);
    assert_eq!(
        out["name"],
        tname.as_str(),
        "node retire answered with {out}"
    );

    c.wait_for(
        &format!("{tname} retired and the learner {lname} promoted to voter"),
        secs(20),
        |c| {
            let nodes = c.node_list(leader)?;
            let t = by_name(&nodes, &tname).ok_or("retired node missing from the list")?;
            let l = by_name(&nodes, &lname).ok_or("learner missing from the list")?;
            if t["state"] == "retired"
                && t["role"] == "none"
                && l["role"] == "voter"
                && roles(&nodes) == (3, 0, 1)
            {
                Ok(())
            } else {
                Err(summary(&nodes))
            }
        },
    );
    c.wait_for(
        "cluster status to count 3 voters, 0 learners",
        secs(10),
        |c| {
            let s = c.status(leader)?;
            if s["voters"] == 3 && s["learners"] == 0 {
                Ok(())
            } else {
                Err(format!("{s}"))
            }
        },
    );
    // The cluster still works.
    c.create_volume(learner, "after-retire", "64MiB");
    let names = c.volume_names(leader).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(names, ["after-retire", "keep"], "volumes after retire");
}

#[test]
fn nbd_io_goes_through_the_volume_home_node() {
    let mut c = Cluster::start(3);
    c.create_volume(1, "data", "64MiB");
    let show = c.ctl_json(2, &["volume", "show", "data"]);
    let home_name = show["node"].as_str().unwrap_or_default().to_string();
    let home = c
        .index_of_name(&home_name)
        .unwrap_or_else(|| panic!("volume data has no home node of ours: {show}"));
    let uri = show["nbd_uri"].as_str().unwrap_or_default().to_string();
    let nbd = c.node(home).nbd.to_string();
    assert!(
        uri.starts_with("nbd://") && uri.contains(&nbd) && uri.ends_with("/data"),
        "nbd_uri {uri:?} from node 2 does not point at home node {home_name} ({nbd})"
    );
    if !have("qemu-io") {
        eprintln!("qemu-io missing: NBD I/O through the home node not checked");
        return;
    }
    let w = run_ok("qemu-io", &["-f", "raw", "-c", "write -P 0x5a 0 1M", &uri]);
    assert!(w.contains("wrote"), "qemu-io write: {w}");
    let r = run_ok("qemu-io", &["-f", "raw", "-c", "read -P 0x5a 0 1M", &uri]);
    assert!(
        r.contains("read") && !r.contains("Pattern verification failed"),
        "qemu-io read back through {uri}: {r}"
    );
    let other = (1..=3).find(|&i| i != home).unwrap();
    c.wait_for(
        &format!("node {other} (not the home) to report allocated bytes of data"),
        secs(10),
        |c| {
            let v = c.try_json(other, &["volume", "show", "data"])?;
            if v["allocated_bytes"].as_u64() > Some(0) && v["node_reachable"] == true {
                Ok(())
            } else {
                Err(format!("{v}"))
            }
        },
    );
}
