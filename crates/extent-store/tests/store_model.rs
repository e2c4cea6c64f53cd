//! Property test: the extent store behaves like a map of blocks, across
//! random writes, reads, trims, zeroing, flushes, clean restarts and
//! restarts without a clean close, with both I/O engines.

use block_api::AlignedBuf;
use extent_store::{CsumEntry, EngineChoice, ExtentAddr, ExtentOwner, Store, StoreConfig};
use proptest::prelude::*;
use std::collections::HashMap;

const MIB: u64 = 1 << 20;
const EXTENT: u64 = 4 * MIB;
const BS: u64 = 4096;
/// Slabs the test writes into (each gets its own extent).
const SLABS: u64 = 6;

#[derive(Debug, Clone)]
enum Op {
    Write {
        slab: u64,
        block: u64,
        blocks: u64,
        seed: u8,
    },
    Read {
        slab: u64,
        block: u64,
        blocks: u64,
    },
    Trim {
        slab: u64,
        block: u64,
        blocks: u64,
    },
    Zero {
        slab: u64,
        block: u64,
        blocks: u64,
    },
    Flush,
    CleanRestart,
    UncleanRestart,
}

fn range() -> impl Strategy<Value = (u64, u64, u64)> {
    (0..SLABS, 0..EXTENT / BS)
        .prop_flat_map(|(s, b)| (Just(s), Just(b), 1..=(EXTENT / BS - b).min(64)))
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (range(), any::<u8>()).prop_map(|((slab, block, blocks), seed)| Op::Write { slab, block, blocks, seed }),
        4 => range().prop_map(|(slab, block, blocks)| Op::Read { slab, block, blocks }),
        1 => range().prop_map(|(slab, block, blocks)| Op::Trim { slab, block, blocks }),
        1 => range().prop_map(|(slab, block, blocks)| Op::Zero { slab, block, blocks }),
        1 => Just(Op::Flush),
        1 => Just(Op::CleanRestart),
        1 => Just(Op::UncleanRestart),
    ]
}

fn pattern(seed: u8, block: u64) -> Vec<u8> {
    (0..BS)
        .map(|i| seed.wrapping_add((i as u8) ^ (block as u8)))
        .collect()
}

struct Harness {
    cfg: StoreConfig,
    store: Store,
    map: HashMap<u64, ExtentAddr>,
}

impl Harness {
    async fn open(cfg: StoreConfig) -> Harness {
        let store = Store::open(&cfg).await.expect("open store");
        let map = store
            .owned_extents()
            .into_iter()
            .map(|(o, a)| (o.slab, a))
            .collect();
        Harness { cfg, store, map }
    }

    async fn addr(&mut self, slab: u64) -> ExtentAddr {
        if let Some(a) = self.map.get(&slab) {
            return *a;
        }
        let owner = ExtentOwner {
            volume_id: 1,
            slab,
            shard: 0,
            epoch: 1,
        };
        let a = self.store.allocate(owner).await.expect("allocate");
        self.map.insert(slab, a);
        a
    }
}

/// A new two-disk store of 32 MiB disks in `dir`.
fn two_disks(dir: &tempfile::TempDir, engine: EngineChoice) -> StoreConfig {
    StoreConfig {
        pool_id: uuid::Uuid::new_v4(),
        node_id: uuid::Uuid::new_v4(),
        disks: vec![dir.path().join("d0"), dir.path().join("d1")],
        create_size: Some(32 * MIB),
        extent_size: EXTENT,
        engine,
    }
}

async fn run(ops: Vec<Op>, engine: EngineChoice) {
    let dir = tempfile::tempdir_in("/var/tmp").expect("tempdir on ext4");
    let mut h = Harness::open(two_disks(&dir, engine)).await;
    // Model: (slab, block) -> Some(pattern seed) or absent (zeros).
    let mut model: HashMap<(u64, u64), Vec<u8>> = HashMap::new();
    for op in ops {
        match op {
            Op::Write {
                slab,
                block,
                blocks,
                seed,
            } => {
                let a = h.addr(slab).await;
                let mut buf = AlignedBuf::zeroed((blocks * BS) as usize);
                for i in 0..blocks {
                    let p = pattern(seed, block + i);
                    buf[(i * BS) as usize..((i + 1) * BS) as usize].copy_from_slice(&p);
                    model.insert((slab, block + i), p);
                }
                h.store
                    .write(a, block * BS, buf, seed % 7 == 0)
                    .await
                    .expect("write");
            }
            Op::Read {
                slab,
                block,
                blocks,
            } => {
                let Some(&a) = h.map.get(&slab) else { continue };
                let got = h
                    .store
                    .read(a, block * BS, blocks * BS)
                    .await
                    .expect("read");
                for i in 0..blocks {
                    let want = model
                        .get(&(slab, block + i))
                        .cloned()
                        .unwrap_or_else(|| vec![0; BS as usize]);
                    assert!(
                        got[(i * BS) as usize..((i + 1) * BS) as usize] == want[..],
                        "slab {slab} block {} differs from the model",
                        block + i
                    );
                }
            }
            Op::Trim {
                slab,
                block,
                blocks,
            }
            | Op::Zero {
                slab,
                block,
                blocks,
            } => {
                let Some(&a) = h.map.get(&slab) else { continue };
                let state = if matches!(op, Op::Trim { .. }) {
                    CsumEntry::Hole
                } else {
                    CsumEntry::Zero
                };
                h.store.set_blocks(a, block * BS, blocks * BS, state);
                for i in 0..blocks {
                    model.remove(&(slab, block + i));
                }
                let states = h.store.block_states(a, block * BS, blocks * BS);
                assert!(
                    states.iter().all(|s| *s == state),
                    "trim/zero state not reported"
                );
            }
            Op::Flush => h.store.sync_all().await.expect("flush"),
            Op::CleanRestart => {
                h.store.close().await.expect("close");
                let cfg = h.cfg.clone();
                drop(h);
                h = Harness::open(cfg).await;
            }
            Op::UncleanRestart => {
                // Drop without close: intent bits stay set and the next open
                // recomputes their regions' checksums.
                h.store.sync_all().await.expect("flush");
                let cfg = h.cfg.clone();
                drop(h);
                h = Harness::open(cfg).await;
            }
        }
    }
    // Everything in the model is there after a final restart.
    h.store.close().await.expect("close");
    let cfg = h.cfg.clone();
    drop(h);
    let h = Harness::open(cfg).await;
    for ((slab, block), want) in &model {
        let a = h.map[slab];
        let got = h.store.read(a, block * BS, BS).await.expect("final read");
        assert!(
            got[..] == want[..],
            "after restart slab {slab} block {block} differs"
        );
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 12, ..ProptestConfig::default() })]

    #[test]
    fn store_matches_model_with_uring(ops in proptest::collection::vec(op(), 1..40)) {
        tokio::runtime::Runtime::new().expect("runtime").block_on(run(ops, EngineChoice::Uring));
    }

    #[test]
    fn store_matches_model_with_sync_engine(ops in proptest::collection::vec(op(), 1..40)) {
        tokio::runtime::Runtime::new().expect("runtime").block_on(run(ops, EngineChoice::Sync));
    }
}

#[tokio::test]
async fn a_disk_that_stops_accepting_gets_no_new_extents_but_keeps_its_own() {
    let dir = tempfile::tempdir_in("/var/tmp").expect("tempdir on ext4");
    let mut h = Harness::open(two_disks(&dir, EngineChoice::Sync)).await;
    let kept = h.addr(0).await;
    h.store.set_accepting(usize::from(kept.disk), false);
    for slab in 1..4 {
        let a = h.addr(slab).await;
        assert_ne!(
            a.disk, kept.disk,
            "slab {slab} was placed on a disk that accepts no new extents"
        );
    }
    let other = 1 - usize::from(kept.disk);
    h.store.set_accepting(other, false);
    let owner = ExtentOwner {
        volume_id: 1,
        slab: 9,
        shard: 0,
        epoch: 1,
    };
    assert!(
        h.store.allocate(owner).await.is_err(),
        "with no disk accepting, an allocation must fail"
    );
    let data = h
        .store
        .read(kept, 0, BS)
        .await
        .expect("the refusing disk still serves its extent");
    assert_eq!(data.len(), BS as usize);
}

#[tokio::test]
async fn a_released_extent_gives_its_space_back_to_the_disk_file() {
    use std::os::unix::fs::MetadataExt;
    let dir = tempfile::tempdir_in("/var/tmp").expect("tempdir on ext4");
    let mut h = Harness::open(two_disks(&dir, EngineChoice::Sync)).await;
    let a = h.addr(0).await;
    let path = h.store.disk(a).path.clone();
    let used = || std::fs::metadata(&path).expect("stat disk").blocks() * 512;
    let before = used();
    let mut buf = AlignedBuf::zeroed(EXTENT as usize);
    buf.fill(0x5a);
    h.store
        .write(a, 0, buf, true)
        .await
        .expect("write the extent");
    let written = used();
    assert!(
        written >= before + EXTENT,
        "writing 4 MiB should take 4 MiB of the file: {before} -> {written}"
    );
    h.store.release(a).await.expect("release");
    let after = used();
    assert!(
        after + EXTENT <= written,
        "a released extent should give its 4 MiB back: {written} -> {after}"
    );
    let b = h.addr(1).await;
    let data = h.store.read(b, 0, BS).await.expect("read a reused extent");
    assert!(
        data.iter().all(|x| *x == 0),
        "a reused extent reads as zeros"
    );
}
