//! Decoding of CDB fields: big-endian integers, the LBA and transfer length
//! of the block commands in their 6/10/12/16-byte forms, and the data-out
//! length a CDB announces.
//!
//! Invariant: every function takes the CDB as a slice at least as long as
//! the opcode's CDB length (the dispatcher checks it) and only indexes
//! inside that length.

pub fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}

pub fn be24(b: &[u8]) -> u32 {
    u32::from_be_bytes([0, b[0], b[1], b[2]])
}

pub fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

pub fn be64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}

/// The CDB length implied by an opcode's group code.
pub fn cdb_len(opcode: u8) -> usize {
    match opcode >> 5 {
        0 => 6,
        1 | 2 => 10,
        4 => 16,
        5 => 12,
        _ => 16,
    }
}

/// (LBA, number of blocks) of a READ/WRITE/VERIFY/WRITE SAME/PRE-FETCH/
/// SYNCHRONIZE CACHE/COMPARE AND WRITE CDB.
pub fn lba_and_len(cdb: &[u8]) -> (u64, u64) {
    match cdb[0] {
        // 6-byte: 21-bit LBA; a length of 0 means 256 blocks.
        0x08 | 0x0a => {
            let lba = u64::from(be24(&cdb[1..4]) & 0x1f_ffff);
            let len = if cdb[4] == 0 { 256 } else { u64::from(cdb[4]) };
            (lba, len)
        }
        // COMPARE AND WRITE: 8-byte LBA, 1-byte NUMBER OF LOGICAL BLOCKS.
        0x89 => (be64(&cdb[2..10]), u64::from(cdb[13])),
        op => match op >> 5 {
            0 => (0, 0),
            1 | 2 => (u64::from(be32(&cdb[2..6])), u64::from(be16(&cdb[7..9]))),
            5 => (u64::from(be32(&cdb[2..6])), u64::from(be32(&cdb[6..10]))),
            _ => (be64(&cdb[2..10]), u64::from(be32(&cdb[10..14]))),
        },
    }
}

/// Whether the opcode is one of the WRITE / WRITE AND VERIFY forms.
pub fn is_plain_write(op: u8) -> bool {
    matches!(op, 0x0a | 0x2a | 0xaa | 0x8a | 0x2e | 0xae | 0x8e)
}

/// Rewrite the transfer length of a READ/WRITE-style CDB to `n` blocks
/// (`n` must fit the form's field; 6-byte forms take 1..=255).
pub fn set_transfer_len(cdb: &mut [u8], n: u32) {
    match cdb[0] >> 5 {
        0 => cdb[4] = n as u8,
        1 | 2 => cdb[7..9].copy_from_slice(&(n as u16).to_be_bytes()),
        5 => cdb[6..10].copy_from_slice(&n.to_be_bytes()),
        _ => cdb[10..14].copy_from_slice(&n.to_be_bytes()),
    }
}

/// The number of data-out bytes the CDB announces, `None` when the command
/// transfers none or we do not know the command.
pub fn data_out_len(cdb: &[u8], block_size: u32) -> Option<u64> {
    let op = *cdb.first()?;
    if cdb.len() < cdb_len(op) {
        return None;
    }
    let bs = u64::from(block_size);
    Some(match op {
        0x0a | 0x2a | 0xaa | 0x8a | 0x2e | 0xae | 0x8e => lba_and_len(cdb).1 * bs,
        // VERIFY: data only with BYTCHK (01b: n blocks, 11b: one block).
        0x2f | 0xaf | 0x8f => match (cdb[1] >> 1) & 0x03 {
            0 => return None,
            0x03 => bs,
            _ => lba_and_len(cdb).1 * bs,
        },
        0x41 => bs,
        0x93 => {
            if cdb[1] & 0x01 != 0 {
                return None;
            }
            bs
        }
        0x89 => 2 * lba_and_len(cdb).1 * bs,
        0x15 => u64::from(cdb[4]),
        0x55 | 0x42 => u64::from(be16(&cdb[7..9])),
        0x5f => u64::from(be32(&cdb[5..9])),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn decodes_forms() {
        let mut c10 = [0u8; 10];
        c10[0] = 0x28;
        c10[2..6].copy_from_slice(&7u32.to_be_bytes());
        c10[7..9].copy_from_slice(&3u16.to_be_bytes());
        assert_eq!(lba_and_len(&c10), (7, 3));
        let c6 = [0x08, 0xff, 0xff, 0xff, 0, 0];
        assert_eq!(lba_and_len(&c6), (0x1f_ffff, 256));
        let mut c16 = [0u8; 16];
        c16[0] = 0x8a;
        c16[2..10].copy_from_slice(&u64::MAX.to_be_bytes());
        c16[10..14].copy_from_slice(&9u32.to_be_bytes());
        assert_eq!(lba_and_len(&c16), (u64::MAX, 9));
        assert_eq!(data_out_len(&c16, 512), Some(9 * 512));
    }

    proptest! {
        #[test]
        fn never_panics(cdb in proptest::collection::vec(any::<u8>(), 0..17)) {
            let _ = data_out_len(&cdb, 512);
            if !cdb.is_empty() && cdb.len() >= cdb_len(cdb[0]) {
                let _ = lba_and_len(&cdb);
            }
        }
    }
}
