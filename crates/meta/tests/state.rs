//! Behaviour of the pool state machine: validation, determinism, snapshot round trip.

use meta::state::*;
use proptest::prelude::*;
use prost::Message;

const EXT: u64 = 1 << 20;

fn init() -> Command {
    Command::new(Op::InitPool(PoolSettings {
        name: "pool".into(),
        extent_size_bytes: EXT,
    }))
}

fn add_node(id: u64) -> Command {
    Command::new(Op::AddNode(AddNode {
        id,
        address: format!("127.0.0.1:{}", 7000 + id),
        fault_domain: vec!["rack".into(), format!("host-{id}")],
        ..Default::default()
    }))
}

fn add_disk(id: u64, node: u64) -> Command {
    Command::new(Op::AddDisk(AddDisk {
        id,
        node,
        capacity_bytes: 8 * EXT,
    }))
}

fn create(name: &str, slabs: u64, res: Resiliency) -> Command {
    Command::new(Op::CreateVolume(CreateVolume {
        name: name.into(),
        size_bytes: slabs * EXT,
        resiliency: res as i32,
        ..Default::default()
    }))
}

fn replica(node: u64, disk: u64, extent: u64) -> Replica {
    Replica {
        node,
        disk,
        extent,
        state: ReplicaState::Current as i32,
    }
}

fn alloc(volume: &str, slab: u64, replicas: Vec<Replica>, epoch: u64) -> Command {
    alloc_moving(volume, slab, replicas, epoch, 0)
}

fn alloc_moving(
    volume: &str,
    slab: u64,
    replicas: Vec<Replica>,
    epoch: u64,
    moving_from: u64,
) -> Command {
    Command::new(Op::AllocateSlab(AllocateSlab {
        volume: volume.into(),
        slab,
        replicas,
        epoch,
        moving_from,
    }))
}

/// A pool with three nodes, one disk each (disk id = node id).
fn pool() -> PoolState {
    let mut s = PoolState::default();
    for c in [
        init(),
        add_node(1),
        add_node(2),
        add_node(3),
        add_disk(1, 1),
        add_disk(2, 2),
        add_disk(3, 3),
    ] {
        s.apply(&c).expect("building the test pool");
    }
    s
}

#[test]
fn allocate_slab_takes_extents_and_delete_frees_them() {
    let mut s = pool();
    s.apply(&create("db", 4, Resiliency::TwoWayMirror))
        .expect("create volume");
    s.apply(&alloc("db", 0, vec![replica(1, 1, 0), replica(2, 2, 0)], 1))
        .expect("allocate slab 0");
    assert_eq!(
        s.disks[&1].allocated_extents,
        vec![0],
        "disk 1 should hold extent 0"
    );
    let err = s
        .apply(&alloc("db", 1, vec![replica(1, 1, 0), replica(3, 3, 0)], 1))
        .expect_err("an extent in use must not be allocated twice");
    assert!(
        matches!(err, Rejection::Invalid(_)),
        "unexpected rejection {err:?}"
    );
    s.apply(&Command::new(Op::DeleteVolume(DeleteVolume {
        name: "db".into(),
    })))
    .expect("delete volume");
    assert!(
        s.disks.values().all(|d| d.allocated_extents.is_empty()),
        "deleting the volume should free every extent: {:?}",
        s.disks
    );
}

#[test]
fn reallocating_a_slab_needs_a_newer_epoch_and_moves_its_extents() {
    let mut s = pool();
    s.apply(&create("db", 2, Resiliency::TwoWayMirror))
        .expect("create");
    s.apply(&alloc("db", 0, vec![replica(1, 1, 0), replica(2, 2, 0)], 1))
        .expect("alloc");
    let before = s.clone();
    let stale = s.apply(&alloc("db", 0, vec![replica(1, 1, 0), replica(3, 3, 0)], 1));
    assert!(stale.is_err(), "same epoch must be rejected");
    assert_eq!(s, before, "a rejected command must not change state");
    s.apply(&alloc("db", 0, vec![replica(1, 1, 0), replica(3, 3, 5)], 2))
        .expect("re-place slab at epoch 2");
    assert!(
        s.disks[&2].allocated_extents.is_empty(),
        "old extent on disk 2 should be freed"
    );
    assert_eq!(
        s.disks[&3].allocated_extents,
        vec![5],
        "new extent on disk 3 should be taken"
    );
    assert_eq!(s.volumes["db"].slabs[&0].epoch, 2, "slab epoch should be 2");
}

#[test]
fn a_copy_moves_off_a_draining_node_with_one_extra_replica_then_is_dropped() {
    let mut s = pool();
    s.apply(&add_node(4)).expect("node 4");
    s.apply(&add_disk(4, 4)).expect("disk 4");
    s.apply(&create("db", 2, Resiliency::TwoWayMirror))
        .expect("create");
    s.apply(&alloc("db", 0, vec![replica(1, 1, 0), replica(2, 2, 0)], 1))
        .expect("alloc");
    s.apply(&Command::new(Op::SetNodeState(SetNodeState {
        node: 2,
        state: NodeState::Maintenance as i32,
        at_ms: 1,
    })))
    .expect("drain node 2");
    let mut new = replica(3, 3, 0);
    new.state = ReplicaState::Stale as i32;
    new.extent = UNPLACED;
    let before = s.clone();
    let three = vec![replica(1, 1, 0), replica(2, 2, 0), new.clone()];
    s.apply(&alloc("db", 0, three.clone(), 2))
        .expect_err("three copies of a mirror-2 slab need a move");
    s.apply(&alloc_moving("db", 0, three.clone(), 2, 4))
        .expect_err("the moving copy must be one of the slab's");
    s.apply(&alloc_moving(
        "db",
        0,
        vec![replica(1, 1, 0), replica(2, 2, 0)],
        2,
        2,
    ))
    .expect_err("a move needs the extra replica");
    assert_eq!(s, before, "rejected moves must change nothing");
    // The copy on the draining node is kept where it is, although its node
    // takes no new extents.
    s.apply(&alloc_moving("db", 0, three, 2, 2))
        .expect("start moving the copy off node 2");
    let slab = &s.volumes["db"].slabs[&0];
    assert_eq!((slab.replicas.len(), slab.moving_from), (3, 2));
    assert_eq!(
        s.disks[&2].allocated_extents,
        vec![0],
        "the draining copy keeps its extent while the new one fills"
    );
    s.apply(&alloc("db", 0, vec![replica(1, 1, 0), replica(3, 3, 0)], 3))
        .expect("drop the copy on node 2");
    let slab = &s.volumes["db"].slabs[&0];
    assert_eq!((slab.replicas.len(), slab.moving_from), (2, 0));
    assert!(
        s.disks[&2].allocated_extents.is_empty(),
        "the drained node's extent is freed"
    );
    // A new copy on the draining node is refused.
    s.apply(&alloc("db", 1, vec![replica(1, 1, 1), replica(2, 2, 1)], 1))
        .expect_err("no new extent on a draining node");
}

#[test]
fn a_disk_added_under_data_or_an_operator_asks_for_a_rebalance() {
    let mut s = pool();
    assert_eq!(s.rebalance_generation, 0);
    s.apply(&add_node(4)).expect("node 4");
    s.apply(&add_disk(4, 4)).expect("disk 4");
    assert_eq!(
        s.rebalance_generation, 0,
        "disks of an empty pool need no rebalance"
    );
    s.apply(&create("db", 2, Resiliency::TwoWayMirror))
        .expect("create");
    s.apply(&alloc("db", 0, vec![replica(1, 1, 0), replica(2, 2, 0)], 1))
        .expect("alloc");
    s.apply(&add_disk(5, 4)).expect("a second disk on node 4");
    assert_eq!(s.rebalance_generation, 1, "a disk added under data");
    s.apply(&Command::new(Op::RequestRebalance(RequestRebalance {})))
        .expect("rebalance request");
    assert_eq!(s.rebalance_generation, 2, "an operator's request");
}

#[test]
fn attachment_allows_one_writer_and_generation_grows() {
    let mut s = pool();
    s.apply(&create("v", 1, Resiliency::Simple))
        .expect("create");
    let attach = |n| {
        Command::new(Op::AttachVolume(AttachVolume {
            volume: "v".into(),
            node: n,
            takeover: false,
        }))
    };
    let detach = |n| {
        Command::new(Op::DetachVolume(DetachVolume {
            volume: "v".into(),
            node: n,
        }))
    };
    s.apply(&attach(1)).expect("first attach");
    assert!(
        s.apply(&attach(2)).is_err(),
        "a second writer must be refused"
    );
    assert!(
        s.apply(&detach(2)).is_err(),
        "only the attached node may detach"
    );
    s.apply(&detach(1)).expect("detach");
    s.apply(&attach(2)).expect("attach elsewhere");
    let a = s.volumes["v"].attachment.clone().expect("attached");
    assert_eq!(
        (a.node, a.generation),
        (2, 2),
        "second attachment should be node 2, generation 2"
    );
    assert!(
        s.apply(&Command::new(Op::DeleteVolume(DeleteVolume {
            name: "v".into()
        })))
        .is_err(),
        "an attached volume must not be deleted"
    );
}

#[test]
fn repair_marks_replica_rebuilding_then_current_and_is_fenced_by_epoch() {
    let mut s = pool();
    s.apply(&create("v", 1, Resiliency::TwoWayMirror))
        .expect("create");
    s.apply(&alloc("v", 0, vec![replica(1, 1, 0), replica(2, 2, 0)], 3))
        .expect("alloc");
    let job = |id, epoch| RepairJob {
        id,
        volume: "v".into(),
        slab: 0,
        replica: 1,
        epoch,
    };
    assert!(
        s.apply(&Command::new(Op::StartRepair(job(1, 2)))).is_err(),
        "stale epoch must be refused"
    );
    s.apply(&Command::new(Op::StartRepair(job(1, 3))))
        .expect("start repair");
    assert_eq!(
        s.volumes["v"].slabs[&0].replicas[1].state,
        ReplicaState::Rebuilding as i32,
        "replica should be rebuilding"
    );
    s.apply(&Command::new(Op::FinishRepair(FinishRepair { id: 1 })))
        .expect("finish");
    assert_eq!(
        s.volumes["v"].slabs[&0].replicas[1].state,
        ReplicaState::Current as i32,
        "replica should be current"
    );
    assert!(s.repairs.is_empty(), "finished job should be gone");
}

#[test]
fn retired_node_is_terminal_and_gets_no_allocations() {
    let mut s = pool();
    assert!(
        s.apply(&Command::new(Op::SetNodeState(SetNodeState {
            node: 3,
            state: NodeState::Retired as i32,
            at_ms: 0,
        })))
        .is_err(),
        "retiring goes through RetireNode, with the Raft removal"
    );
    s.apply(&Command::new(Op::RetireNode(RetireNode { node: 3 })))
        .expect("retire");
    assert!(
        s.apply(&Command::new(Op::SetNodeState(SetNodeState {
            node: 3,
            state: NodeState::Up as i32,
            at_ms: 0,
        })))
        .is_err(),
        "a retired node must stay retired"
    );
    s.apply(&create("v", 1, Resiliency::Simple))
        .expect("create");
    assert!(
        s.apply(&alloc("v", 0, vec![replica(3, 3, 0)], 1)).is_err(),
        "no extents on a retired node"
    );
}

#[test]
fn seventeenth_node_is_refused_and_a_retired_slot_is_reusable() {
    let mut s = pool();
    for id in 4..=16 {
        s.apply(&add_node(id)).expect("nodes 4 to 16 join");
    }
    let before = s.clone();
    let err = s
        .apply(&add_node(17))
        .expect_err("a 17th node must be refused");
    assert!(
        err.to_string().contains("16 nodes"),
        "the refusal should say the cluster is full: {err}"
    );
    assert_eq!(s, before, "a refused join changes nothing");
    s.apply(&Command::new(Op::RetireNode(RetireNode { node: 5 })))
        .expect("retire node 5");
    s.apply(&add_node(17))
        .expect("a retired node's place can be taken");
}

#[test]
fn node_names_are_unique_and_promotion_needs_a_learner() {
    let mut s = pool();
    let named = |id: u64, name: &str| {
        Command::new(Op::AddNode(AddNode {
            id,
            address: format!("10.0.0.{id}:7001"),
            name: name.into(),
            ..Default::default()
        }))
    };
    s.apply(&named(4, "alpha")).expect("alpha joins");
    let err = s.apply(&named(5, "alpha")).expect_err("duplicate name");
    assert!(err.to_string().contains("alpha"), "{err}");
    assert!(!s.nodes[&4].voter, "joined as a learner");
    s.apply(&Command::new(Op::PromoteNode(PromoteNode { node: 4 })))
        .expect("promote the learner");
    assert!(s.nodes[&4].voter, "node 4 votes after promotion");
    assert!(
        s.apply(&Command::new(Op::PromoteNode(PromoteNode { node: 4 })))
            .is_err(),
        "a voter cannot be promoted again"
    );
}

#[test]
fn volumes_get_ids_shrink_frees_slabs_and_chap_changes() {
    let mut s = pool();
    s.apply(&create("a", 3, Resiliency::Simple))
        .expect("create a");
    s.apply(&create("b", 1, Resiliency::Simple))
        .expect("create b");
    assert_ne!(s.volumes["a"].id, s.volumes["b"].id, "ids are unique");
    assert_eq!(s.volumes["a"].block_size, 512, "default block size");
    s.apply(&alloc("a", 2, vec![replica(1, 1, 5)], 1))
        .expect("allocate the last slab");
    s.apply(&Command::new(Op::ResizeVolume(ResizeVolume {
        name: "a".into(),
        size_bytes: EXT + 4096,
    })))
    .expect("shrink a");
    assert!(
        s.volumes["a"].slabs.is_empty() && s.disks[&1].allocated_extents.is_empty(),
        "slabs past the new end are freed"
    );
    let chap = Chap {
        user: "u".into(),
        secret: "twelve-chars".into(),
        ..Default::default()
    };
    s.apply(&Command::new(Op::SetVolumeChap(SetVolumeChap {
        volume: "a".into(),
        chap: Some(chap.clone()),
    })))
    .expect("set chap");
    assert_eq!(s.volumes["a"].chap, Some(chap));
    assert!(
        s.apply(&Command::new(Op::CreateVolume(CreateVolume {
            name: "c".into(),
            size_bytes: 1000,
            ..Default::default()
        })))
        .is_err(),
        "a size that is not a multiple of 4 KiB is refused"
    );
}

#[test]
fn takeover_needs_a_down_holder_and_fences_it_with_new_epochs() {
    let mut s = pool();
    s.apply(&create("m", 2, Resiliency::TwoWayMirror))
        .expect("create");
    s.apply(&alloc("m", 0, vec![replica(1, 1, 0), replica(2, 2, 0)], 1))
        .expect("allocate");
    let attach = |node, takeover| {
        Command::new(Op::AttachVolume(AttachVolume {
            volume: "m".into(),
            node,
            takeover,
        }))
    };
    s.apply(&attach(1, false)).expect("attach to node 1");
    assert!(
        s.apply(&attach(2, true)).is_err(),
        "no takeover while the holder is up"
    );
    s.apply(&Command::new(Op::SetNodeState(SetNodeState {
        node: 1,
        state: NodeState::Down as i32,
        at_ms: 0,
    })))
    .expect("node 1 down");
    assert!(
        s.apply(&attach(2, false)).is_err(),
        "a plain attach never steals the volume"
    );
    s.apply(&attach(2, true))
        .expect("take over from a down holder");
    let v = &s.volumes["m"];
    assert_eq!(v.attachment.as_ref().map(|a| a.node), Some(2));
    assert_eq!(
        v.slabs[&0].epoch, 2,
        "the takeover bumps every slab's epoch"
    );
}

#[test]
fn change_replicas_is_fenced_by_epoch_and_keeps_a_current_copy() {
    let mut s = pool();
    s.apply(&create("m", 1, Resiliency::ThreeWayMirror))
        .expect("create");
    s.apply(&alloc(
        "m",
        0,
        vec![replica(1, 1, 0), replica(2, 2, 0), replica(3, 3, 0)],
        1,
    ))
    .expect("allocate");
    let change = |epoch, states: [ReplicaState; 3]| {
        Command::new(Op::ChangeReplicas(ChangeReplicas {
            volume: "m".into(),
            slab: 0,
            epoch,
            states: states.iter().map(|s| *s as i32).collect(),
            ..Default::default()
        }))
    };
    use ReplicaState::*;
    s.apply(&change(1, [Current, Current, Stale]))
        .expect("mark replica 2 stale");
    assert_eq!(s.volumes["m"].slabs[&0].epoch, 2, "epoch bumped");
    let before = s.clone();
    assert!(
        s.apply(&change(1, [Current, Current, Current])).is_err(),
        "an old epoch is refused"
    );
    assert!(
        s.apply(&change(2, [Stale, Stale, Stale])).is_err(),
        "no current copy left is refused"
    );
    assert_eq!(s, before, "refusals change nothing");
    s.apply(&change(2, [Current, Current, Current]))
        .expect("resynced");
    assert_eq!(s.volumes["m"].slabs[&0].replicas[2].state, Current as i32);
}

#[test]
fn a_stale_copy_on_a_down_node_is_placed_when_it_is_resynced() {
    let mut s = pool();
    s.apply(&create("m", 1, Resiliency::ThreeWayMirror))
        .expect("create");
    s.apply(&Command::new(Op::SetNodeState(SetNodeState {
        node: 3,
        state: NodeState::Down as i32,
        at_ms: 0,
    })))
    .expect("node 3 down");
    let mut unplaced = replica(3, 3, UNPLACED);
    unplaced.state = ReplicaState::Stale as i32;
    let mut current_unplaced = replica(3, 3, UNPLACED);
    current_unplaced.state = ReplicaState::Current as i32;
    assert!(
        s.apply(&alloc(
            "m",
            0,
            vec![replica(1, 1, 0), replica(2, 2, 0), current_unplaced],
            1
        ))
        .is_err(),
        "an unplaced copy cannot be current"
    );
    s.apply(&alloc(
        "m",
        0,
        vec![replica(1, 1, 0), replica(2, 2, 0), unplaced],
        1,
    ))
    .expect("degraded placement with a stale placeholder");
    assert!(
        s.disks[&3].allocated_extents.is_empty(),
        "the placeholder takes no extent"
    );
    let place = |epoch, extent| {
        Command::new(Op::ChangeReplicas(ChangeReplicas {
            volume: "m".into(),
            slab: 0,
            epoch,
            states: vec![
                ReplicaState::Current as i32,
                ReplicaState::Current as i32,
                ReplicaState::Rebuilding as i32,
            ],
            disks: vec![UNPLACED, UNPLACED, 3],
            extents: vec![UNPLACED, UNPLACED, extent],
        }))
    };
    assert!(
        s.apply(&Command::new(Op::ChangeReplicas(ChangeReplicas {
            volume: "m".into(),
            slab: 0,
            epoch: 1,
            states: vec![
                ReplicaState::Current as i32,
                ReplicaState::Current as i32,
                ReplicaState::Rebuilding as i32,
            ],
            ..Default::default()
        })))
        .is_err(),
        "an unplaced copy must get an extent before it resyncs"
    );
    s.apply(&place(1, 4)).expect("place the copy on extent 4");
    assert_eq!(s.volumes["m"].slabs[&0].replicas[2].extent, 4);
    assert_eq!(s.disks[&3].allocated_extents, vec![4]);
}

#[test]
fn init_cluster_only_once() {
    let mut s = pool();
    s.apply(&Command::new(Op::InitCluster(InitCluster {
        name: "prod".into(),
    })))
    .expect("init");
    assert!(
        s.apply(&Command::new(Op::InitCluster(InitCluster {
            name: "again".into()
        })))
        .is_err(),
        "a second init is refused"
    );
    assert_eq!(s.cluster_name, "prod");
}

#[test]
fn commands_before_init_and_malformed_commands_are_rejected() {
    let mut s = PoolState::default();
    assert_eq!(
        s.apply(&add_disk(1, 1)),
        Err(Rejection::PoolInit("not initialised")),
        "disk before init"
    );
    assert!(
        matches!(s.apply(&Command { op: None }), Err(Rejection::Malformed(_))),
        "empty command"
    );
    s.apply(&init()).expect("init");
    s.apply(&add_node(1)).expect("node");
    let bad = Command::new(Op::SetNodeState(SetNodeState {
        node: 1,
        state: 99,
        at_ms: 0,
    }));
    assert!(
        matches!(s.apply(&bad), Err(Rejection::Malformed(_))),
        "unknown enum value"
    );
    assert_eq!(
        s.apply(&init()),
        Err(Rejection::PoolInit("already initialised")),
        "second init"
    );
}

fn arb_command() -> impl Strategy<Value = Command> {
    let name = prop_oneof![
        Just("a".to_string()),
        Just("b".to_string()),
        Just(String::new())
    ];
    let rep =
        (1u64..5, 1u64..5, 0u64..10, 0i32..4).prop_map(|(node, disk, extent, state)| Replica {
            node,
            disk,
            extent,
            state,
        });
    prop_oneof![
        (0u64..3).prop_map(|e| Command::new(Op::InitPool(PoolSettings {
            name: "p".into(),
            extent_size_bytes: EXT << e
        }))),
        (0u64..5, 0u64..3).prop_map(|(id, a)| Command::new(Op::AddNode(AddNode {
            id,
            address: format!("n{a}"),
            fault_domain: vec![format!("r{a}")],
            ..Default::default()
        }))),
        (0u64..5, 0i32..5).prop_map(|(node, state)| Command::new(Op::SetNodeState(SetNodeState {
            node,
            state,
            at_ms: 7
        }))),
        (0u64..5, 0u64..5, 0u64..10).prop_map(|(id, node, c)| Command::new(Op::AddDisk(AddDisk {
            id,
            node,
            capacity_bytes: c * EXT
        }))),
        (0u64..5, 0i32..4)
            .prop_map(|(disk, state)| Command::new(Op::SetDiskState(SetDiskState { disk, state }))),
        (name.clone(), 0u64..4, 0i32..4).prop_map(|(name, n, r)| Command::new(Op::CreateVolume(
            CreateVolume {
                name,
                size_bytes: n * EXT,
                resiliency: r,
                ..Default::default()
            }
        ))),
        (name.clone(), 0u64..6).prop_map(|(name, n)| Command::new(Op::ResizeVolume(
            ResizeVolume {
                name,
                size_bytes: n * EXT
            }
        ))),
        name.clone()
            .prop_map(|name| Command::new(Op::DeleteVolume(DeleteVolume { name }))),
        (
            name.clone(),
            0u64..5,
            prop::collection::vec(rep, 0..4),
            0u64..4,
            0u64..4
        )
            .prop_map(|(volume, slab, replicas, epoch, moving_from)| Command::new(
                Op::AllocateSlab(AllocateSlab {
                    volume,
                    slab,
                    replicas,
                    epoch,
                    moving_from
                })
            )),
        (name.clone(), 0u64..3, 0u32..3, 0u64..4, 0i32..4).prop_map(
            |(volume, slab, replica, epoch, state)| Command::new(Op::SetReplicaState(
                SetReplicaState {
                    volume,
                    slab,
                    replica,
                    epoch,
                    state
                }
            ))
        ),
        (name.clone(), 0u64..5).prop_map(|(volume, node)| Command::new(Op::AttachVolume(
            AttachVolume {
                volume,
                node,
                takeover: node % 2 == 0
            }
        ))),
        (name.clone(), 0u64..5).prop_map(|(volume, node)| Command::new(Op::DetachVolume(
            DetachVolume { volume, node }
        ))),
        (0u64..3, name.clone(), 0u64..3, 0u32..3, 0u64..4).prop_map(
            |(id, volume, slab, replica, epoch)| Command::new(Op::StartRepair(RepairJob {
                id,
                volume,
                slab,
                replica,
                epoch
            }))
        ),
        (0u64..3).prop_map(|id| Command::new(Op::FinishRepair(FinishRepair { id }))),
        (0u64..2).prop_map(|n| Command::new(Op::InitCluster(InitCluster {
            name: if n == 0 { String::new() } else { "c".into() }
        }))),
        (name, any::<bool>()).prop_map(|(volume, on)| Command::new(Op::SetVolumeChap(
            SetVolumeChap {
                volume,
                chap: on.then(|| Chap {
                    user: "u".into(),
                    secret: "s".into(),
                    ..Default::default()
                })
            }
        ))),
        (0u64..5).prop_map(|node| Command::new(Op::RetireNode(RetireNode { node }))),
        (0u64..5).prop_map(|node| Command::new(Op::PromoteNode(PromoteNode { node }))),
        (0u64..3, 0u64..4, proptest::collection::vec(0i32..4, 0..4)).prop_map(
            |(slab, epoch, states)| Command::new(Op::ChangeReplicas(ChangeReplicas {
                volume: "a".into(),
                slab,
                epoch,
                states,
                ..Default::default()
            }))
        ),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Two replicas applying the same log end byte-identical; every rejected
    /// command left the state untouched; the snapshot round-trips.
    #[test]
    fn same_log_gives_identical_state_and_rejections_change_nothing(
        log in prop::collection::vec(arb_command(), 0..80)
    ) {
        let mut a = PoolState::default();
        let mut b = PoolState::default();
        for cmd in &log {
            // Go through the wire encoding, as a Raft entry would.
            let decoded = Command::decode_from(&cmd.encode_to_vec()).expect("command round trip");
            let before = a.clone();
            let ra = a.apply(&decoded);
            let rb = b.apply(cmd);
            prop_assert_eq!(&ra, &rb, "the two replicas disagree on the outcome of {:?}", cmd);
            if ra.is_err() {
                prop_assert_eq!(&a, &before, "rejected {:?} changed the state", cmd);
            }
        }
        prop_assert_eq!(a.encode_to_vec(), b.encode_to_vec(), "encoded states differ");
        let restored = PoolState::decode_from(&a.encode_to_vec()).expect("snapshot decodes");
        prop_assert_eq!(restored, a, "snapshot round trip lost information");
    }
}
