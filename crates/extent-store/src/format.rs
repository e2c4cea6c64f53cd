//! The on-disk format of one s2d disk, byte for byte.
//!
//! ```text
//!  offset 0          superblock A (4 KiB)
//!  offset 512 KiB    superblock B (4 KiB), same content
//!  offset 1 MiB      extent table A: one 64-byte record per extent
//!  ...               extent table B: the same records (second copy)
//!  ...               write-intent area: 64 bytes (512 bits) per extent
//!  ...               checksum area: one 8-byte entry per 4 KiB block of every extent
//!  data_offset       extent 0, extent 1, ... (each `extent_size` bytes, 1 MiB aligned)
//! ```
//!
//! Invariants and why they hold:
//! - Superblocks are written one copy at a time, each followed by a sync, so
//!   a torn write leaves the other copy valid. Both carry a CRC32C.
//! - An extent record is updated in table A, synced, then in table B, synced.
//!   Each record has a sequence number and its own CRC, so after a torn
//!   4 KiB write at least one copy of every record is valid, and the copy
//!   with the higher sequence wins.
//! - Checksum entries ([`CsumEntry`]) say per block: never written / trimmed
//!   (reads zeros), allocated zeros, or data with its CRC32C.
//! - A write-intent bit covers one region of an extent. It is set and synced
//!   before a write lands in the region and cleared only after a flush made
//!   the region's data and checksums durable. After a crash, checksums of
//!   regions with the bit set are recomputed from the data, so a write torn
//!   by the crash never shows up as a checksum failure.
//!
//! Version history: 1 = the layout above.

use crate::crc32c;
use crate::error::StoreError;
use block_api::BLOCK_SIZE;
use uuid::Uuid;

pub const SB_MAGIC: [u8; 8] = *b"S2DDISK1";
pub const FORMAT_VERSION: u32 = 1;
pub const SB_A_OFFSET: u64 = 0;
pub const SB_B_OFFSET: u64 = 512 * 1024;
pub const MIB: u64 = 1024 * 1024;
pub const HEADER_BYTES: u64 = MIB;
pub const RECORD_BYTES: u64 = 64;
pub const INTENT_BYTES_PER_EXTENT: u64 = 64;
pub const INTENT_BITS_PER_EXTENT: u64 = INTENT_BYTES_PER_EXTENT * 8;
pub const CSUM_ENTRY_BYTES: u64 = 8;
/// Largest extent the format accepts.
pub const EXTENT_SIZE_MAX: u64 = 4096 * MIB;

const _: () = assert!((BLOCK_SIZE as u64).is_multiple_of(RECORD_BYTES));
const _: () = assert!(SB_B_OFFSET + BLOCK_SIZE as u64 <= HEADER_BYTES);

fn round_up(v: u64, to: u64) -> u64 {
    v.div_ceil(to) * to
}

/// Where each area of a disk lives, derived from its size and extent size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    pub extent_size: u64,
    pub extent_count: u64,
    pub table_a: u64,
    pub table_b: u64,
    pub table_bytes: u64,
    pub intent: u64,
    pub intent_bytes: u64,
    pub csum: u64,
    pub csum_bytes: u64,
    pub data: u64,
}

impl Layout {
    /// The layout with as many extents as fit on a disk of `disk_size` bytes.
    pub fn compute(disk_size: u64, extent_size: u64) -> Result<Layout, StoreError> {
        if extent_size == 0 || !extent_size.is_multiple_of(MIB) || extent_size > EXTENT_SIZE_MAX {
            return Err(StoreError::Config(format!(
                "extent size {extent_size} must be a non-zero multiple of 1 MiB, at most 4 GiB"
            )));
        }
        let mut n = disk_size / extent_size;
        while n > 0 {
            let l = Self::with_count(extent_size, n);
            if l.data + n * extent_size <= disk_size {
                return Ok(l);
            }
            n -= 1;
        }
        Err(StoreError::Config(format!(
            "disk of {disk_size} bytes is too small for one extent of {extent_size} bytes plus metadata"
        )))
    }

    fn with_count(extent_size: u64, n: u64) -> Layout {
        let table_bytes = round_up(n * RECORD_BYTES, BLOCK_SIZE as u64);
        let intent_bytes = round_up(n * INTENT_BYTES_PER_EXTENT, BLOCK_SIZE as u64);
        let blocks = extent_size / BLOCK_SIZE as u64;
        let csum_bytes = round_up(n * blocks * CSUM_ENTRY_BYTES, BLOCK_SIZE as u64);
        let table_a = HEADER_BYTES;
        let table_b = table_a + table_bytes;
        let intent = table_b + table_bytes;
        let csum = intent + intent_bytes;
        let data = round_up(csum + csum_bytes, MIB);
        Layout {
            extent_size,
            extent_count: n,
            table_a,
            table_b,
            table_bytes,
            intent,
            intent_bytes,
            csum,
            csum_bytes,
            data,
        }
    }

    pub fn blocks_per_extent(&self) -> u64 {
        self.extent_size / BLOCK_SIZE as u64
    }

    /// Bytes of extent covered by one write-intent bit (a multiple of 1 MiB).
    pub fn region_bytes(&self) -> u64 {
        MIB * (self.extent_size / MIB).div_ceil(INTENT_BITS_PER_EXTENT)
    }

    pub fn regions_per_extent(&self) -> u64 {
        self.extent_size.div_ceil(self.region_bytes())
    }

    /// Byte offset on disk of `extent`.
    pub fn extent_offset(&self, extent: u32) -> u64 {
        self.data + extent as u64 * self.extent_size
    }
}

/// The identity and geometry of a disk, stored twice at its start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Superblock {
    pub version: u32,
    pub pool_id: Uuid,
    pub disk_id: Uuid,
    pub node_id: Uuid,
    pub disk_size: u64,
    pub extent_size: u64,
    pub extent_count: u64,
}

/// What a superblock slot holds.
#[derive(Debug, PartialEq, Eq)]
pub enum SlotContent {
    /// All zeros: never formatted.
    Blank,
    Valid(Superblock),
    /// Something else: not ours, or damaged. The string says what is wrong.
    Invalid(String),
}

impl Superblock {
    pub fn encode(&self) -> [u8; BLOCK_SIZE] {
        let mut b = [0u8; BLOCK_SIZE];
        b[0..8].copy_from_slice(&SB_MAGIC);
        b[8..12].copy_from_slice(&self.version.to_le_bytes());
        b[16..32].copy_from_slice(self.pool_id.as_bytes());
        b[32..48].copy_from_slice(self.disk_id.as_bytes());
        b[48..64].copy_from_slice(self.node_id.as_bytes());
        b[64..72].copy_from_slice(&self.disk_size.to_le_bytes());
        b[72..80].copy_from_slice(&self.extent_size.to_le_bytes());
        b[80..88].copy_from_slice(&self.extent_count.to_le_bytes());
        let crc = crc32c(&b[..BLOCK_SIZE - 4]);
        b[BLOCK_SIZE - 4..].copy_from_slice(&crc.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8]) -> SlotContent {
        if b.len() < BLOCK_SIZE {
            return SlotContent::Invalid("short superblock".into());
        }
        let b = &b[..BLOCK_SIZE];
        if b.iter().all(|&x| x == 0) {
            return SlotContent::Blank;
        }
        if b[0..8] != SB_MAGIC {
            return SlotContent::Invalid("no s2d magic (not an s2d disk, or damaged)".into());
        }
        let stored = u32::from_le_bytes(le4(&b[BLOCK_SIZE - 4..]));
        let crc = crc32c(&b[..BLOCK_SIZE - 4]);
        if stored != crc {
            return SlotContent::Invalid(format!(
                "checksum mismatch (stored {stored:08x}, computed {crc:08x})"
            ));
        }
        let version = u32::from_le_bytes(le4(&b[8..12]));
        if version != FORMAT_VERSION {
            return SlotContent::Invalid(format!(
                "format version {version}, this build reads version {FORMAT_VERSION}"
            ));
        }
        SlotContent::Valid(Superblock {
            version,
            pool_id: uuid_at(b, 16),
            disk_id: uuid_at(b, 32),
            node_id: uuid_at(b, 48),
            disk_size: u64_at(b, 64),
            extent_size: u64_at(b, 72),
            extent_count: u64_at(b, 80),
        })
    }
}

fn le4(b: &[u8]) -> [u8; 4] {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[..4]);
    a
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

fn uuid_at(b: &[u8], at: usize) -> Uuid {
    let mut a = [0u8; 16];
    a.copy_from_slice(&b[at..at + 16]);
    Uuid::from_bytes(a)
}

/// State of one extent in the extent table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ExtentRecord {
    /// Bumped on every update; the higher of the two table copies wins.
    pub seq: u64,
    pub owner: Option<ExtentOwner>,
}

/// Which slab of which volume an allocated extent holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ExtentOwner {
    pub volume_id: u64,
    pub slab: u64,
    pub shard: u8,
    pub epoch: u64,
}

const REC_FREE: u8 = 0;
const REC_ALLOCATED: u8 = 1;

impl ExtentRecord {
    pub fn encode(&self) -> [u8; RECORD_BYTES as usize] {
        let mut b = [0u8; RECORD_BYTES as usize];
        b[0..8].copy_from_slice(&self.seq.to_le_bytes());
        match self.owner {
            None => b[8] = REC_FREE,
            Some(o) => {
                b[8] = REC_ALLOCATED;
                b[9] = o.shard;
                b[16..24].copy_from_slice(&o.volume_id.to_le_bytes());
                b[24..32].copy_from_slice(&o.slab.to_le_bytes());
                b[32..40].copy_from_slice(&o.epoch.to_le_bytes());
            }
        }
        let crc = crc32c(&b[..60]);
        b[60..64].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// `None` when the record fails its CRC; an all-zero record is a free
    /// extent that was never written.
    pub fn decode(b: &[u8]) -> Option<ExtentRecord> {
        let b = b.get(..RECORD_BYTES as usize)?;
        if b.iter().all(|&x| x == 0) {
            return Some(ExtentRecord::default());
        }
        if u32::from_le_bytes(le4(&b[60..64])) != crc32c(&b[..60]) {
            return None;
        }
        let seq = u64_at(b, 0);
        let owner = match b[8] {
            REC_FREE => None,
            REC_ALLOCATED => Some(ExtentOwner {
                volume_id: u64_at(b, 16),
                slab: u64_at(b, 24),
                shard: b[9],
                epoch: u64_at(b, 32),
            }),
            _ => return None,
        };
        Some(ExtentRecord { seq, owner })
    }
}

/// One block's checksum entry (8 bytes in the checksum area).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CsumEntry {
    /// Never written or trimmed: no data, reads as zeros.
    Hole,
    /// Allocated, reads as zeros (WRITE ZEROES without unmap).
    Zero,
    /// Holds data whose CRC32C is the value.
    Data(u32),
}

const ENTRY_DATA: u64 = 1 << 32;
const ENTRY_ZERO: u64 = 1 << 33;

impl CsumEntry {
    pub fn to_raw(self) -> u64 {
        match self {
            CsumEntry::Hole => 0,
            CsumEntry::Zero => ENTRY_ZERO,
            CsumEntry::Data(c) => ENTRY_DATA | c as u64,
        }
    }

    /// Unknown bit patterns (damage in the checksum area) decode as data
    /// with an impossible checksum so the block reads as a checksum error
    /// rather than silently as zeros.
    pub fn from_raw(v: u64) -> CsumEntry {
        match v {
            0 => CsumEntry::Hole,
            ENTRY_ZERO => CsumEntry::Zero,
            v if v & !0xffff_ffff == ENTRY_DATA => CsumEntry::Data(v as u32),
            v => CsumEntry::Data(!(v as u32)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn layout_fits_disk_and_aligns_areas() {
        for (disk, ext) in [
            (64 * MIB, 4 * MIB),
            (4096 * MIB, 256 * MIB),
            (1 << 40, 256 * MIB),
        ] {
            let l = Layout::compute(disk, ext).expect("layout");
            assert!(
                l.data + l.extent_count * ext <= disk,
                "{disk}/{ext}: data past end"
            );
            assert_eq!(l.data % MIB, 0);
            assert!(l.table_a >= HEADER_BYTES && l.table_b >= l.table_a + l.extent_count * 64);
            assert!(l.csum >= l.intent + l.extent_count * 64);
            assert!(l.data >= l.csum + l.extent_count * l.blocks_per_extent() * 8);
            assert!(l.regions_per_extent() <= INTENT_BITS_PER_EXTENT);
        }
    }

    #[test]
    fn layout_refuses_bad_extent_sizes_and_tiny_disks() {
        assert!(Layout::compute(64 * MIB, 3 * 1000).is_err());
        assert!(Layout::compute(64 * MIB, 0).is_err());
        assert!(Layout::compute(2 * MIB, 4 * MIB).is_err());
    }

    #[test]
    fn damaged_superblock_is_invalid_not_blank() {
        let sb = Superblock {
            version: FORMAT_VERSION,
            pool_id: Uuid::new_v4(),
            disk_id: Uuid::new_v4(),
            node_id: Uuid::new_v4(),
            disk_size: 1 << 30,
            extent_size: 4 * MIB,
            extent_count: 200,
        };
        let mut b = sb.encode();
        assert_eq!(Superblock::decode(&b), SlotContent::Valid(sb));
        b[70] ^= 0x40;
        assert!(matches!(Superblock::decode(&b), SlotContent::Invalid(_)));
        assert_eq!(Superblock::decode(&[0u8; BLOCK_SIZE]), SlotContent::Blank);
    }

    proptest! {
        #[test]
        fn extent_records_round_trip(seq in any::<u64>(), vol in any::<u64>(), slab in any::<u64>(),
                                     shard in any::<u8>(), epoch in any::<u64>(), free in any::<bool>()) {
            let r = ExtentRecord { seq, owner: (!free).then_some(ExtentOwner { volume_id: vol, slab, shard, epoch }) };
            prop_assert_eq!(ExtentRecord::decode(&r.encode()), Some(r));
        }

        #[test]
        fn a_flipped_bit_in_a_record_is_detected(bit in 0usize..512, seq in 1u64..) {
            let r = ExtentRecord { seq, owner: Some(ExtentOwner { volume_id: 7, slab: 3, shard: 0, epoch: 1 }) };
            let mut b = r.encode();
            b[bit / 8] ^= 1 << (bit % 8);
            prop_assert_ne!(ExtentRecord::decode(&b), Some(r));
        }

        #[test]
        fn csum_entries_round_trip(c in any::<u32>()) {
            for e in [CsumEntry::Hole, CsumEntry::Zero, CsumEntry::Data(c)] {
                prop_assert_eq!(CsumEntry::from_raw(e.to_raw()), e);
            }
        }
    }
}
