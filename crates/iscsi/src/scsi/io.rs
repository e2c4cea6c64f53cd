//! The block commands: READ CAPACITY, READ, WRITE (and WRITE AND VERIFY),
//! VERIFY, PRE-FETCH, SYNCHRONIZE CACHE, WRITE SAME, UNMAP, GET LBA STATUS
//! and COMPARE AND WRITE, each mapped onto [`block_api::BlockVolume`] calls
//! in bytes (`lba * block_size`).
//!
//! Invariants: the range `[lba, lba + blocks)` is checked against the
//! capacity before any volume call, so an out-of-range command changes
//! nothing; a transfer larger than the advertised maximum is refused;
//! volume errors become sense data through `Sense::from_block_error`.

use block_api::{AlignedBuf, BlockError};

use super::inquiry::{MAX_CAW_BLOCKS, MAX_UNMAP_BLOCKS_512, MAX_UNMAP_DESCRIPTORS};
use super::lu::LogicalUnit;
use super::sense::Sense;
use super::{CmdResult, DataIn, ScsiResponse, cdb};

/// Chunk used to expand a WRITE SAME pattern.
const WRITE_SAME_CHUNK: usize = 1024 * 1024;

fn vol_err(lu: &LogicalUnit, e: BlockError) -> Sense {
    tracing::debug!(volume = %lu.name, error = %e, "volume error");
    Sense::from_block_error(&e, lu.block_size())
}

/// Check `[lba, lba + n)` against the capacity.
fn check_range(lu: &LogicalUnit, lba: u64, n: u64) -> Result<(), Sense> {
    match lba.checked_add(n) {
        Some(end) if end <= lu.blocks() => Ok(()),
        _ => Err(Sense::lba_out_of_range()),
    }
}

fn check_max_transfer(lu: &LogicalUnit, n: u64, byte: u16) -> Result<(), Sense> {
    if n.saturating_mul(u64::from(lu.block_size())) > super::TRANSFER_BYTES_MAX {
        return Err(Sense::invalid_field_in_cdb(byte));
    }
    Ok(())
}

/// Byte offset of the transfer-length field, for sense key specific data.
fn len_field(op: u8) -> u16 {
    match op >> 5 {
        0 => 4,
        1 | 2 => 7,
        5 => 6,
        _ => 10,
    }
}

/// The PROTECT field (RDPROTECT/WRPROTECT/VRPROTECT) must be zero: we
/// have no protection information.
fn check_protect(c: &[u8]) -> Result<(), Sense> {
    if c[0] >> 5 != 0 && c[1] & 0xe0 != 0 {
        return Err(Sense::invalid_field_in_cdb(1));
    }
    Ok(())
}

/// The checks every READ/WRITE/VERIFY form starts with: no protection
/// information, the range inside the capacity, the transfer within the
/// cap. `None` for a zero-block transfer (nothing to do).
fn transfer_range(lu: &LogicalUnit, c: &[u8]) -> Result<Option<(u64, u64)>, Sense> {
    check_protect(c)?;
    let (lba, n) = cdb::lba_and_len(c);
    check_range(lu, lba, n)?;
    if n == 0 {
        return Ok(None);
    }
    check_max_transfer(lu, n, len_field(c[0]))?;
    Ok(Some((lba, n)))
}

fn offset(lu: &LogicalUnit, lba: u64) -> u64 {
    lba * u64::from(lu.block_size())
}

pub fn read_capacity10(lu: &LogicalUnit) -> CmdResult {
    let last = lu.blocks().saturating_sub(1);
    let mut v = Vec::with_capacity(8);
    v.extend_from_slice(&u32::try_from(last).unwrap_or(u32::MAX).to_be_bytes());
    v.extend_from_slice(&lu.block_size().to_be_bytes());
    Ok(ScsiResponse::data(v))
}

pub fn read_capacity16(lu: &LogicalUnit, c: &[u8]) -> CmdResult {
    let alloc = cdb::be32(&c[10..14]) as usize;
    let mut v = vec![0u8; 32];
    v[0..8].copy_from_slice(&lu.blocks().saturating_sub(1).to_be_bytes());
    v[8..12].copy_from_slice(&lu.block_size().to_be_bytes());
    v[13] = lu.block.per_physical_exponent();
    v[14] = 0x80 | 0x40; // LBPME (thin), LBPRZ (unmapped reads zero)
    Ok(ScsiResponse::data_alloc(v, alloc))
}

pub async fn read(lu: &LogicalUnit, c: &[u8]) -> CmdResult {
    let Some((lba, n)) = transfer_range(lu, c)? else {
        return Ok(ScsiResponse::good());
    };
    let len = (n * u64::from(lu.block_size())) as usize;
    let buf = lu
        .volume
        .read(offset(lu, lba), len)
        .await
        .map_err(|e| vol_err(lu, e))?;
    Ok(ScsiResponse {
        status: super::sense::STATUS_GOOD,
        sense: None,
        data_in: Some(DataIn::Buf(buf)),
    })
}

fn fua(c: &[u8]) -> bool {
    // FUA bit of the 10/12/16-byte forms; WRITE AND VERIFY writes through.
    match c[0] {
        0x0a => false,
        0x2e | 0xae | 0x8e => true,
        _ => c[1] & 0x08 != 0,
    }
}

fn write_protected(lu: &LogicalUnit) -> Result<(), Sense> {
    if lu.mode().swp {
        return Err(Sense::write_protected());
    }
    Ok(())
}

pub async fn write(lu: &LogicalUnit, c: &[u8], data: Option<AlignedBuf>) -> CmdResult {
    let Some((lba, n)) = transfer_range(lu, c)? else {
        return Ok(ScsiResponse::good());
    };
    write_protected(lu)?;
    let len = (n * u64::from(lu.block_size())) as usize;
    let data = match data {
        Some(d) if d.len() == len => d,
        _ => return Err(Sense::invalid_field_in_information_unit()),
    };
    let fua = fua(c) || !lu.mode().wce;
    lu.volume
        .write(offset(lu, lba), data, fua)
        .await
        .map_err(|e| vol_err(lu, e))?;
    Ok(ScsiResponse::good())
}

fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    a.iter().zip(b).position(|(x, y)| x != y)
}

pub async fn verify(lu: &LogicalUnit, c: &[u8], data: Option<AlignedBuf>) -> CmdResult {
    let Some((lba, n)) = transfer_range(lu, c)? else {
        return Ok(ScsiResponse::good());
    };
    let bs = lu.block_size() as usize;
    let len = n as usize * bs;
    let bytchk = (c[1] >> 1) & 0x03;
    let stored = lu
        .volume
        .read(offset(lu, lba), len)
        .await
        .map_err(|e| vol_err(lu, e))?;
    match bytchk {
        0 => Ok(ScsiResponse::good()),
        1 => {
            let d = data.ok_or_else(Sense::invalid_field_in_information_unit)?;
            if d.len() != len {
                return Err(Sense::invalid_field_in_information_unit());
            }
            match first_difference(&stored, &d) {
                Some(i) => Err(Sense::miscompare(i as u64)),
                None => Ok(ScsiResponse::good()),
            }
        }
        3 => {
            let d = data.ok_or_else(Sense::invalid_field_in_information_unit)?;
            if d.len() != bs {
                return Err(Sense::invalid_field_in_information_unit());
            }
            for (i, blk) in stored.chunks(bs).enumerate() {
                if let Some(j) = first_difference(blk, &d) {
                    return Err(Sense::miscompare((i * bs + j) as u64));
                }
            }
            Ok(ScsiResponse::good())
        }
        _ => Err(Sense::invalid_field_in_cdb(1)),
    }
}

pub fn prefetch(lu: &LogicalUnit, c: &[u8]) -> CmdResult {
    let (lba, n) = cdb::lba_and_len(c);
    check_range(lu, lba, n)?;
    // Nothing to warm: report that the range would fit in the cache.
    Ok(ScsiResponse {
        status: super::sense::STATUS_CONDITION_MET,
        sense: None,
        data_in: None,
    })
}

pub async fn sync_cache(lu: &LogicalUnit, c: &[u8]) -> CmdResult {
    let (lba, n) = cdb::lba_and_len(c);
    check_range(lu, lba, n)?;
    lu.volume.flush().await.map_err(|e| vol_err(lu, e))?;
    Ok(ScsiResponse::good())
}

pub async fn write_same(lu: &LogicalUnit, c: &[u8], data: Option<AlignedBuf>) -> CmdResult {
    check_protect(c)?;
    let (lba, n) = cdb::lba_and_len(c);
    let unmap = c[1] & 0x08 != 0;
    let anchor = c[1] & 0x10 != 0;
    let ndob = c[0] == 0x93 && c[1] & 0x01 != 0;
    if anchor {
        return Err(Sense::invalid_field_in_cdb(1));
    }
    if n == 0 {
        // WSNZ is set in the block limits page.
        return Err(Sense::invalid_field_in_cdb(len_field(c[0])));
    }
    check_range(lu, lba, n)?;
    let bs = lu.block_size() as usize;
    let max = u64::from(MAX_UNMAP_BLOCKS_512 / (lu.block_size() / 512));
    if n > max {
        return Err(Sense::invalid_field_in_cdb(len_field(c[0])));
    }
    write_protected(lu)?;
    let pattern = if ndob {
        None
    } else {
        match data {
            Some(d) if d.len() == bs => Some(d),
            _ => return Err(Sense::invalid_field_in_information_unit()),
        }
    };
    let off = offset(lu, lba);
    let len = n * bs as u64;
    let fua = !lu.mode().wce;
    let zero = pattern.as_ref().is_none_or(|p| p.iter().all(|&b| b == 0));
    if zero {
        lu.volume
            .write_zeroes(off, len, unmap, fua)
            .await
            .map_err(|e| vol_err(lu, e))?;
        return Ok(ScsiResponse::good());
    }
    // UNMAP with a non-zero pattern: the blocks must read back as the
    // pattern, so it is a plain write.
    let Some(pattern) = pattern else {
        return Ok(ScsiResponse::good());
    };
    let chunk_blocks = (WRITE_SAME_CHUNK / bs) as u64;
    let mut done = 0u64;
    while done < n {
        let this = (n - done).min(chunk_blocks);
        let mut buf = AlignedBuf::zeroed(this as usize * bs);
        for blk in buf.chunks_mut(bs) {
            blk.copy_from_slice(&pattern);
        }
        lu.volume
            .write(off + done * bs as u64, buf, fua)
            .await
            .map_err(|e| vol_err(lu, e))?;
        done += this;
    }
    Ok(ScsiResponse::good())
}

pub async fn unmap(lu: &LogicalUnit, c: &[u8], data: &[u8]) -> CmdResult {
    if c[1] & 0x01 != 0 {
        return Err(Sense::invalid_field_in_cdb(1)); // ANCHOR
    }
    let list_len = cdb::be16(&c[7..9]) as usize;
    if list_len == 0 {
        return Ok(ScsiResponse::good());
    }
    if list_len < 8 || data.len() < list_len {
        return Err(Sense::parameter_list_length_error());
    }
    let data = &data[..list_len];
    let bd_len = cdb::be16(&data[2..4]) as usize;
    if !bd_len.is_multiple_of(16) || 8 + bd_len > data.len() {
        return Err(Sense::parameter_list_length_error());
    }
    let count = bd_len / 16;
    if count > MAX_UNMAP_DESCRIPTORS as usize {
        return Err(Sense::invalid_field_in_parameter_list(2));
    }
    let max = u64::from(MAX_UNMAP_BLOCKS_512 / (lu.block_size() / 512));
    let mut ranges = Vec::with_capacity(count);
    for i in 0..count {
        let d = &data[8 + 16 * i..24 + 16 * i];
        let lba = cdb::be64(&d[0..8]);
        let n = u64::from(cdb::be32(&d[8..12]));
        check_range(lu, lba, n)?;
        if n > max {
            return Err(Sense::invalid_field_in_parameter_list(
                (8 + 16 * i + 8) as u16,
            ));
        }
        ranges.push((lba, n));
    }
    write_protected(lu)?;
    for (lba, n) in ranges {
        if n > 0 {
            let bs = u64::from(lu.block_size());
            lu.volume
                .trim(lba * bs, n * bs)
                .await
                .map_err(|e| vol_err(lu, e))?;
        }
    }
    Ok(ScsiResponse::good())
}

/// Most descriptors one GET LBA STATUS returns.
const LBA_STATUS_DESCRIPTORS_MAX: usize = 1024;
/// Most bytes one GET LBA STATUS asks the volume about.
const LBA_STATUS_SPAN_MAX: u64 = 1 << 30;

pub async fn get_lba_status(lu: &LogicalUnit, c: &[u8]) -> CmdResult {
    let lba = cdb::be64(&c[2..10]);
    let alloc = cdb::be32(&c[10..14]) as usize;
    let blocks = lu.blocks();
    if lba >= blocks {
        return Err(Sense::lba_out_of_range());
    }
    let bs = u64::from(lu.block_size());
    let span = ((blocks - lba) * bs).min(LBA_STATUS_SPAN_MAX);
    let runs = lu
        .volume
        .block_status(lba * bs, span)
        .await
        .map_err(|e| vol_err(lu, e))?;
    let room = (alloc.saturating_sub(8) / 16).clamp(1, LBA_STATUS_DESCRIPTORS_MAX);
    let mut descs: Vec<(u64, u64, u8)> = Vec::new();
    let mut at = lba;
    for r in runs {
        let n = r.len / bs;
        if n == 0 {
            continue;
        }
        let status = if r.hole { 1 } else { 0 };
        match descs.last_mut() {
            Some(last) if last.2 == status && last.1 + n <= u64::from(u32::MAX) => last.1 += n,
            _ => {
                if descs.len() == room {
                    break;
                }
                descs.push((at, n, status));
            }
        }
        at += n;
    }
    if descs.is_empty() {
        // The volume reported nothing whole-block: call one block mapped.
        descs.push((lba, 1, 0));
    }
    let mut v = vec![0u8; 8];
    for (l, n, s) in &descs {
        v.extend_from_slice(&l.to_be_bytes());
        v.extend_from_slice(&u32::try_from(*n).unwrap_or(u32::MAX).to_be_bytes());
        v.push(*s);
        v.extend_from_slice(&[0; 3]);
    }
    let plen = (v.len() - 4) as u32;
    v[0..4].copy_from_slice(&plen.to_be_bytes());
    Ok(ScsiResponse::data_alloc(v, alloc))
}

pub async fn compare_and_write(lu: &LogicalUnit, c: &[u8], data: Option<AlignedBuf>) -> CmdResult {
    check_protect(c)?;
    let (lba, n) = cdb::lba_and_len(c);
    if n > u64::from(MAX_CAW_BLOCKS) {
        return Err(Sense::invalid_field_in_cdb(13));
    }
    check_range(lu, lba, n)?;
    if n == 0 {
        if data.is_some_and(|d| !d.is_empty()) {
            // Data for zero blocks: the length did not fit the 1-byte field.
            return Err(Sense::invalid_field_in_cdb(13));
        }
        return Ok(ScsiResponse::good());
    }
    write_protected(lu)?;
    let len = n as usize * lu.block_size() as usize;
    let data = match data {
        Some(d) if d.len() == 2 * len => d,
        _ => return Err(Sense::invalid_field_in_information_unit()),
    };
    let _guard = lu.caw.lock().await;
    let off = offset(lu, lba);
    let stored = lu.volume.read(off, len).await.map_err(|e| vol_err(lu, e))?;
    if let Some(i) = first_difference(&stored, &data[..len]) {
        return Err(Sense::miscompare(i as u64));
    }
    let new = AlignedBuf::from_slice(&data[len..]);
    let fua = c[1] & 0x08 != 0 || !lu.mode().wce;
    lu.volume
        .write(off, new, fua)
        .await
        .map_err(|e| vol_err(lu, e))?;
    Ok(ScsiResponse::good())
}
