//! Argument checks shared by the trait's provided methods and its
//! implementations: every call validates all of its input here before it
//! touches an output buffer.

use crate::error::{Buffer, ErasureError, ShardKind};
use crate::{ErasureCode, Fill};

fn count(kind: ShardKind, expected: usize, got: usize) -> Result<(), ErasureError> {
    if expected == got {
        Ok(())
    } else {
        Err(ErasureError::ShardCount {
            kind,
            expected,
            got,
        })
    }
}

fn size(buffer: Buffer, expected: usize, got: usize) -> Result<(), ErasureError> {
    if expected == got {
        Ok(())
    } else {
        Err(ErasureError::ShardSize {
            buffer,
            expected,
            got,
        })
    }
}

/// `k` data and `m` parity buffers of one length; returns the length.
pub(crate) fn stripe(
    k: usize,
    m: usize,
    data: impl ExactSizeIterator<Item = usize>,
    parity: impl ExactSizeIterator<Item = usize>,
) -> Result<usize, ErasureError> {
    count(ShardKind::Data, k, data.len())?;
    count(ShardKind::Parity, m, parity.len())?;
    let mut len = None;
    for (i, l) in data.enumerate() {
        size(Buffer::Data(i), *len.get_or_insert(l), l)?;
    }
    for (i, l) in parity.enumerate() {
        size(Buffer::Parity(i), *len.get_or_insert(l), l)?;
    }
    Ok(len.unwrap_or(0))
}

pub(crate) fn data_index(k: usize, index: usize) -> Result<(), ErasureError> {
    if index < k {
        Ok(())
    } else {
        Err(ErasureError::IndexOutOfRange {
            kind: ShardKind::Data,
            index,
            count: k,
        })
    }
}

pub(crate) fn parity_index(m: usize, index: usize) -> Result<(), ErasureError> {
    if index < m {
        Ok(())
    } else {
        Err(ErasureError::IndexOutOfRange {
            kind: ShardKind::Parity,
            index,
            count: m,
        })
    }
}

/// One data index, one parity index, delta and parity of one length.
pub(crate) fn delta_args(
    k: usize,
    m: usize,
    data: usize,
    parity: usize,
    delta: &[u8],
    out: &[u8],
) -> Result<(), ErasureError> {
    data_index(k, data)?;
    parity_index(m, parity)?;
    size(Buffer::Parity(parity), delta.len(), out.len())
}

/// The arguments of [`ErasureCode::update_parity`].
pub(crate) fn update_args<C: ErasureCode + ?Sized>(
    code: &C,
    index: usize,
    old: &[u8],
    new: &[u8],
    parity: &[&mut [u8]],
) -> Result<(), ErasureError> {
    data_index(code.data_shards(), index)?;
    count(ShardKind::Parity, code.parity_shards(), parity.len())?;
    size(Buffer::New, old.len(), new.len())?;
    for (i, p) in parity.iter().enumerate() {
        size(Buffer::Parity(i), old.len(), p.len())?;
    }
    Ok(())
}

fn buffer(k: usize, i: usize) -> Buffer {
    if i < k {
        Buffer::Data(i)
    } else {
        Buffer::Parity(i - k)
    }
}

fn enough(k: usize, m: usize, present: usize) -> Result<(), ErasureError> {
    if present >= k {
        Ok(())
    } else {
        Err(ErasureError::TooFewShards {
            present,
            needed: k,
            total: k + m,
        })
    }
}

/// The arguments of [`ErasureCode::reconstruct_in_place`]: `k + m` buffers
/// and flags, at least `k` present, every buffer that is read or written of
/// one length. Returns (length, number present).
pub(crate) fn in_place(
    k: usize,
    m: usize,
    shards: &[&mut [u8]],
    present: &[bool],
    fill: Fill,
) -> Result<(usize, usize), ErasureError> {
    count(ShardKind::Any, k + m, shards.len())?;
    count(ShardKind::Any, k + m, present.len())?;
    let mut len = None;
    for (i, (s, &p)) in shards.iter().zip(present).enumerate() {
        let used = p || fill == Fill::All || i < k;
        if used {
            size(buffer(k, i), *len.get_or_insert(s.len()), s.len())?;
        }
    }
    let n = present.iter().filter(|&&p| p).count();
    enough(k, m, n)?;
    Ok((len.unwrap_or(0), n))
}

/// The arguments of [`ErasureCode::reconstruct`]: `k + m` shards, at least
/// `k` present, the present ones of one length. Returns the length.
pub(crate) fn options(
    k: usize,
    m: usize,
    shards: &[Option<Vec<u8>>],
) -> Result<usize, ErasureError> {
    count(ShardKind::Any, k + m, shards.len())?;
    let mut len = None;
    let mut n = 0;
    for (i, s) in shards.iter().enumerate() {
        if let Some(s) = s {
            size(buffer(k, i), *len.get_or_insert(s.len()), s.len())?;
            n += 1;
        }
    }
    enough(k, m, n)?;
    Ok(len.unwrap_or(0))
}
