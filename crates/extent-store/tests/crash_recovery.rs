//! Recovery after an unclean stop: a write whose data reached the disk but
//! whose checksum entry did not (the process died in between) must read
//! back without a checksum error, in every extent and region, because its
//! region's write-intent bit makes the next open recompute the checksums.

use block_api::AlignedBuf;
use extent_store::{EngineChoice, ExtentOwner, Store, StoreConfig};
use std::os::unix::fs::FileExt;

const MIB: u64 = 1 << 20;

#[tokio::test]
async fn data_written_without_its_checksum_is_recovered_in_every_extent_and_region() {
    let dir = tempfile::tempdir_in("/var/tmp").expect("tempdir on ext4");
    let cfg = StoreConfig {
        pool_id: uuid::Uuid::new_v4(),
        node_id: uuid::Uuid::new_v4(),
        disks: vec![dir.path().join("d0")],
        create_size: Some(64 * MIB),
        extent_size: 4 * MIB,
        engine: EngineChoice::Auto,
    };
    let store = Store::open(&cfg).await.expect("open");
    let mut targets = Vec::new();
    for slab in 0..4u64 {
        let owner = ExtentOwner {
            volume_id: 1,
            slab,
            shard: 0,
            epoch: 1,
        };
        let addr = store.allocate(owner).await.expect("allocate");
        for region in 0..4u64 {
            let off = region * MIB + 8192;
            store
                .write(addr, off, AlignedBuf::from_slice(&[0x11; 4096]), false)
                .await
                .expect("write");
            let disk_off = store.disk(addr).layout.extent_offset(addr.extent) + off;
            targets.push((addr, off, disk_off));
        }
    }
    // Die without a clean stop, then let the "late" data land behind the
    // store's back: new bytes on disk, old checksums in the table.
    drop(store);
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(dir.path().join("d0"))
        .expect("open disk");
    for (_, _, disk_off) in &targets {
        f.write_all_at(&[0x22; 4096], *disk_off)
            .expect("write behind the store");
    }
    f.sync_all().expect("sync");
    drop(f);

    let store = Store::open(&cfg).await.expect("reopen");
    for (addr, off, _) in targets {
        let got = store
            .read(addr, off, 4096)
            .await
            .unwrap_or_else(|e| panic!("extent {} offset {off}: {e}", addr.extent));
        assert!(
            got.iter().all(|&b| b == 0x22),
            "extent {} offset {off}: recovered data differs",
            addr.extent
        );
    }
}
