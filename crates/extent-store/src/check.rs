//! `storaged check`: the offline verifier of one disk.
//!
//! Reads the superblocks, both extent tables and every data block of every
//! owned extent through the page cache (no O_DIRECT, no writes: the disk is
//! not changed), and reports each block whose data fails its checksum,
//! naming disk offset, extent, block and owning volume.

use crate::crc32c;
use crate::disk::{choose_superblock, merge_records, read_slots};
use crate::error::StoreError;
use crate::format::{CsumEntry, ExtentOwner, ExtentRecord, Layout, RECORD_BYTES, SlotContent};
use block_api::BLOCK_SIZE;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

/// One block that failed verification.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadBlock {
    pub extent: u32,
    pub block: u64,
    pub disk_offset: u64,
    pub owner: ExtentOwner,
}

#[derive(Debug, Clone, Default)]
pub struct CheckReport {
    /// Problems with the superblocks (one copy damaged, repaired at next start).
    pub superblock_notes: Vec<String>,
    pub extents_owned: u64,
    pub blocks_checked: u64,
    pub bad_blocks: Vec<BadBlock>,
    /// Extents whose record is damaged in both table copies.
    pub damaged_records: Vec<u32>,
    /// Extents with write-intent bits set: the disk was not stopped cleanly,
    /// and blocks written at the crash are re-checksummed at the next start.
    pub extents_with_intent: Vec<u32>,
}

impl CheckReport {
    pub fn is_clean(&self) -> bool {
        self.bad_blocks.is_empty() && self.damaged_records.is_empty()
    }
}

pub fn check_disk(path: &Path) -> Result<CheckReport, StoreError> {
    let io = |what: &str, e: std::io::Error| StoreError::Io {
        path: path.to_path_buf(),
        what: what.into(),
        source: e,
    };
    let f = File::open(path).map_err(|e| io("open", e))?;
    let mut report = CheckReport::default();
    let (a, b) = read_slots(&f).map_err(|e| io("read superblocks", e))?;
    for (name, slot) in [("first", &a), ("second", &b)] {
        if let SlotContent::Invalid(why) = slot {
            report
                .superblock_notes
                .push(format!("{name} superblock damaged: {why}"));
        }
    }
    let Some((sb, _)) = choose_superblock(path, a, b)? else {
        return Err(StoreError::BadSuperblock {
            path: path.to_path_buf(),
            reason: "blank: never formatted".into(),
        });
    };
    let layout = Layout::compute(sb.disk_size, sb.extent_size)?;
    let mut ta = vec![0u8; layout.table_bytes as usize];
    let mut tb = vec![0u8; layout.table_bytes as usize];
    f.read_exact_at(&mut ta, layout.table_a)
        .map_err(|e| io("read table", e))?;
    f.read_exact_at(&mut tb, layout.table_b)
        .map_err(|e| io("read table", e))?;
    let mut intent = vec![0u8; layout.intent_bytes as usize];
    f.read_exact_at(&mut intent, layout.intent)
        .map_err(|e| io("read intent bits", e))?;
    let bpe = layout.blocks_per_extent();
    let mut csum = vec![0u8; (bpe * 8) as usize];
    let mut data = vec![0u8; layout.extent_size as usize];
    for e in 0..layout.extent_count as usize {
        let at = e * RECORD_BYTES as usize;
        let rec: Option<ExtentRecord> = merge_records(
            ExtentRecord::decode(&ta[at..]),
            ExtentRecord::decode(&tb[at..]),
        );
        let Some(rec) = rec else {
            report.damaged_records.push(e as u32);
            continue;
        };
        let Some(owner) = rec.owner else { continue };
        report.extents_owned += 1;
        if intent[e * 64..(e + 1) * 64].iter().any(|&x| x != 0) {
            report.extents_with_intent.push(e as u32);
        }
        f.read_exact_at(&mut csum, layout.csum + e as u64 * bpe * 8)
            .map_err(|e| io("read checksums", e))?;
        let ext_off = layout.extent_offset(e as u32);
        f.read_exact_at(&mut data, ext_off)
            .map_err(|e| io("read extent", e))?;
        for blk in 0..bpe as usize {
            let mut raw = [0u8; 8];
            raw.copy_from_slice(&csum[blk * 8..blk * 8 + 8]);
            if let CsumEntry::Data(c) = CsumEntry::from_raw(u64::from_le_bytes(raw)) {
                report.blocks_checked += 1;
                if crc32c(&data[blk * BLOCK_SIZE..(blk + 1) * BLOCK_SIZE]) != c {
                    report.bad_blocks.push(BadBlock {
                        extent: e as u32,
                        block: blk as u64,
                        disk_offset: ext_off + (blk * BLOCK_SIZE) as u64,
                        owner,
                    });
                }
            }
        }
    }
    Ok(report)
}
