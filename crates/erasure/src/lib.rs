//! # erasure: the parity coding of s2d's erasure-coded volumes
//!
//! A parity-`k+m` slab stripes its bytes over `k` data extents and keeps `m`
//! parity extents beside them on other fault domains, so that any `m` of the
//! `k + m` extents can be lost without losing data. This crate is the
//! arithmetic of that: the [`ErasureCode`] trait the volume layer calls, and
//! [`ReedSolomon`], its first implementation, on `reed-solomon-erasure`
//! (`simd-accel`, AVX2). The volume layer names only the trait (see
//! [`code_for`]), so a faster implementation can replace this one without
//! touching it. This crate does no I/O and keeps no state beyond the code's
//! tables.
//!
//! ## Words
//!
//! - **stripe unit**: the run of consecutive volume bytes that goes to one
//!   data extent before the next extent's turn (the volume layer chooses it).
//! - **stripe**: `k` data units at the same offset of the `k` data extents,
//!   and the `m` parity units computed from them.
//! - **shard**: one of the `k + m` buffers of a call, data shards `0..k`
//!   first, then parity shards `0..m` (in [`ErasureCode::reconstruct`], index
//!   `k + i` is parity shard `i`). A shard can be a whole stripe unit or any
//!   byte range of one (see below).
//!
//! ## Invariants (every implementation keeps them; `tests/model.rs` checks them)
//!
//! 1. **Systematic**: data shards are stored as they are; only parity is
//!    computed.
//! 2. **MDS**: any `k` of the `k + m` shards give back all of them
//!    ([`ErasureCode::reconstruct`]); with fewer, the call fails with
//!    [`ErasureError::TooFewShards`]. Checked exhaustively for every
//!    supported geometry.
//! 3. **Position-wise**: byte `b` of each parity shard depends only on byte
//!    `b` of each data shard. So every call works on any byte range of a
//!    stripe unit, as long as all buffers of one call cover the same range:
//!    a 4 KiB read-modify-write of a 256 KiB unit touches 4 KiB of the data
//!    shard and 4 KiB of each parity shard, and `n` stripes whose units lie
//!    back to back in each extent are encoded in one call.
//! 4. **Linear over GF(2^8)**: parity(a XOR b) = parity(a) XOR parity(b).
//!    Hence [`ErasureCode::update_parity`]: after data shard `j` changes from
//!    `old` to `new`, parity shard `i` becomes
//!    `parity_i XOR c(i, j) * (old XOR new)`. The other data shards are not
//!    read. [`ErasureCode::apply_delta`] is the same step for one parity
//!    shard, for a parity holder that receives the delta over the network.
//! 5. **Parity bytes are an on-disk format.** [`ReedSolomon`]'s parity is
//!    `reed-solomon-erasure`'s: GF(2^8) with polynomial
//!    x^8 + x^4 + x^3 + x^2 + 1 (0x11D), generator `V * inverse(V_top)` where
//!    `V[r][c] = r^c` is the `(k + m) x k` Vandermonde matrix and `V_top` its
//!    first `k` rows. For `m = 1` that is **not** the XOR of the data (for
//!    2+1, parity = 3·d0 + 2·d1). `tests/model.rs` recomputes it with an
//!    independent slow model and pins the coefficients of 2+1, 4+1, 4+2 and
//!    8+2; a replacement must produce the same bytes, or volumes must record
//!    which code wrote their parity.
//! 6. **Erasures, not errors**: the code rebuilds missing shards; it cannot
//!    tell a wrong shard from a right one. Shards handed to it must have
//!    passed their checksums.
//! 7. **Refusals change nothing**: a call that returns an error has not
//!    written to any output buffer, and nothing a caller passes makes it
//!    panic. Zero-length shards are valid and every call on them is a no-op.
//!
//! ## Speed
//!
//! `examples/stripe_bench.rs` measures every operation per stripe unit
//! (`cargo run --release -p erasure --example stripe_bench`). On the
//! development VM (one core of a Xeon with AVX-512, data hot in cache),
//! 4+2 encodes at about 20 GB/s of data and 2+1 at 33-44 GB/s, nearly
//! the same for units from 4 KiB to 256 KiB; with data coming from memory
//! every call runs at 5-10 GB/s. The CPU cost of the code is therefore not
//! what chooses the stripe unit.
//!
//! ## Geometry
//!
//! `k >= 2` ([`DATA_SHARDS_MIN`]), `m` in {1, 2} ([`PARITY_SHARDS_MAX`]),
//! `k + m <= 16` ([`SHARDS_MAX`], the cluster's node cap: every shard of a
//! slab is on its own node). Anything else is [`ErasureError::BadGeometry`].
//!
//! ## Example
//!
//! ```
//! use erasure::{code_for, ErasureCode};
//!
//! let code = code_for(4, 2)?;
//! let data: Vec<Vec<u8>> = (0..4u8).map(|i| vec![i; 4096]).collect();
//! let refs: Vec<&[u8]> = data.iter().map(|d| d.as_slice()).collect();
//! let mut parity = vec![vec![0u8; 4096]; 2];
//! let mut prefs: Vec<&mut [u8]> = parity.iter_mut().map(|p| p.as_mut_slice()).collect();
//! code.encode(&refs, &mut prefs)?;
//!
//! // Lose data shard 1 and parity shard 0, rebuild both from the other 4.
//! let mut shards: Vec<Option<Vec<u8>>> =
//!     data.iter().chain(parity.iter()).cloned().map(Some).collect();
//! shards[1] = None;
//! shards[4] = None;
//! code.reconstruct(&mut shards)?;
//! assert_eq!(shards[1].as_deref(), Some(&data[1][..]));
//! assert_eq!(shards[4].as_deref(), Some(&parity[0][..]));
//!
//! // Rewrite bytes 512..1024 of data shard 2: only that range of the parity
//! // changes, computed without reading the other data shards.
//! let new = vec![0xAB; 512];
//! let mut pranges: Vec<&mut [u8]> = parity.iter_mut().map(|p| &mut p[512..1024]).collect();
//! code.update_parity(2, &data[2][512..1024], &new, &mut pranges)?;
//! let mut data = data;
//! data[2][512..1024].copy_from_slice(&new);
//! let refs: Vec<&[u8]> = data.iter().map(|d| d.as_slice()).collect();
//! let prefs: Vec<&[u8]> = parity.iter().map(|p| p.as_slice()).collect();
//! assert!(code.verify(&refs, &prefs)?);
//!
//! // Three of six shards are not enough.
//! let mut shards: Vec<Option<Vec<u8>>> = vec![None, None, None, Some(data[3].clone()),
//!     Some(parity[0].clone()), Some(parity[1].clone())];
//! let err = code.reconstruct(&mut shards).unwrap_err();
//! assert_eq!(err.to_string(), "too many shards missing: 3 of 6 present, 4 needed to reconstruct");
//! # Ok::<(), erasure::ErasureError>(())
//! ```

#![warn(missing_docs)]

mod check;
mod error;
mod reed_solomon;

use std::sync::Arc;

pub use error::{Buffer, ErasureError, ShardKind};
pub use reed_solomon::{CHUNK_DEFAULT, ReedSolomon};

/// The fewest data shards a code may have.
pub const DATA_SHARDS_MIN: usize = 2;
/// The fewest parity shards a code may have.
pub const PARITY_SHARDS_MIN: usize = 1;
/// The most parity shards a code may have.
pub const PARITY_SHARDS_MAX: usize = 2;
/// The most shards (data + parity) a stripe may have: one per node of the
/// largest cluster.
pub const SHARDS_MAX: usize = 16;

/// Checks that `k + m` is a geometry s2d supports: `k >= 2`, `m` in {1, 2},
/// `k + m <= 16`.
pub fn check_geometry(data: usize, parity: usize) -> Result<(), ErasureError> {
    let bad = |reason| {
        Err(ErasureError::BadGeometry {
            data,
            parity,
            reason,
        })
    };
    if data < DATA_SHARDS_MIN {
        return bad("at least 2 data shards are needed");
    }
    if !(PARITY_SHARDS_MIN..=PARITY_SHARDS_MAX).contains(&parity) {
        return bad("parity shards must be 1 or 2");
    }
    if data.saturating_add(parity) > SHARDS_MAX {
        return bad("at most 16 shards in all (one per node)");
    }
    Ok(())
}

/// The code s2d uses for `k + m` volumes today, behind the trait.
pub fn code_for(data: usize, parity: usize) -> Result<Arc<dyn ErasureCode>, ErasureError> {
    Ok(Arc::new(ReedSolomon::new(data, parity)?))
}

/// What [`ErasureCode::reconstruct_in_place`] fills.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fill {
    /// Every missing shard, data and parity (rebuild, resync).
    All,
    /// Only the missing data shards (a degraded read); the buffers of missing
    /// parity shards are neither read nor written and may have any length.
    Data,
}

/// How many bytes of delta [`ErasureCode::update_parity`] computes at a time
/// on the stack: small enough that the delta and the pieces of old, new and
/// parity it covers stay in the L1 cache.
pub const DELTA_CHUNK: usize = 4096;

/// A systematic `k + m` erasure code over byte shards. See the crate docs for
/// the invariants every implementation keeps.
///
/// All buffers of one call have the same length and stand for the same byte
/// range of their shards (a whole stripe unit or any part of it).
pub trait ErasureCode: Send + Sync + std::fmt::Debug {
    /// `k`, the number of data shards.
    fn data_shards(&self) -> usize;

    /// `m`, the number of parity shards.
    fn parity_shards(&self) -> usize;

    /// `k + m`.
    fn total_shards(&self) -> usize {
        self.data_shards() + self.parity_shards()
    }

    /// Computes the `m` parity shards of the `k` data shards, overwriting
    /// `parity`.
    fn encode(&self, data: &[&[u8]], parity: &mut [&mut [u8]]) -> Result<(), ErasureError>;

    /// Rebuilds the shards whose `present` flag is false, in place, from the
    /// present ones (`k + m` buffers and flags, data first; buffers of missing
    /// shards are outputs of the shards' length). Fails with
    /// [`ErasureError::TooFewShards`] when fewer than `k` are present. The
    /// allocation-free form, for the volume layer's aligned buffers.
    fn reconstruct_in_place(
        &self,
        shards: &mut [&mut [u8]],
        present: &[bool],
        fill: Fill,
    ) -> Result<(), ErasureError>;

    /// Fills every `None` of the `k + m` shards (data and parity) from any
    /// `k` present ones. Fails with [`ErasureError::TooFewShards`] when fewer
    /// than `k` are present; on error `shards` is unchanged.
    fn reconstruct(&self, shards: &mut [Option<Vec<u8>>]) -> Result<(), ErasureError> {
        reconstruct_options(self, shards, Fill::All)
    }

    /// Like [`reconstruct`](Self::reconstruct), but fills only the missing
    /// data shards; missing parity shards stay `None`.
    fn reconstruct_data(&self, shards: &mut [Option<Vec<u8>>]) -> Result<(), ErasureError> {
        reconstruct_options(self, shards, Fill::Data)
    }

    /// Adds to one parity shard the contribution of a change of one data
    /// shard: `parity ^= c(parity_index, data_index) * delta`, where
    /// `delta = old XOR new` of data shard `data_index` over the same range.
    fn apply_delta(
        &self,
        data_index: usize,
        parity_index: usize,
        delta: &[u8],
        parity: &mut [u8],
    ) -> Result<(), ErasureError>;

    /// Read-modify-write: turns `parity` (the `m` parity shards over some
    /// range) into the parity the stripe has once data shard `data_index`'s
    /// bytes over that range change from `old` to `new`, without the other
    /// data shards. Equal to re-encoding the whole stripe (tested).
    fn update_parity(
        &self,
        data_index: usize,
        old: &[u8],
        new: &[u8],
        parity: &mut [&mut [u8]],
    ) -> Result<(), ErasureError> {
        check::update_args(self, data_index, old, new, parity)?;
        let mut delta = [0u8; DELTA_CHUNK];
        let mut start = 0;
        while start < old.len() {
            let end = old.len().min(start + DELTA_CHUNK);
            let d = &mut delta[..end - start];
            for ((d, o), n) in d.iter_mut().zip(&old[start..end]).zip(&new[start..end]) {
                *d = o ^ n;
            }
            for (i, p) in parity.iter_mut().enumerate() {
                self.apply_delta(data_index, i, d, &mut p[start..end])?;
            }
            start = end;
        }
        Ok(())
    }

    /// Whether `parity` is the parity of `data` (scrub). Allocates scratch
    /// parity of the shards' length.
    fn verify(&self, data: &[&[u8]], parity: &[&[u8]]) -> Result<bool, ErasureError> {
        let len = check::stripe(
            self.data_shards(),
            self.parity_shards(),
            data.iter().map(|d| d.len()),
            parity.iter().map(|p| p.len()),
        )?;
        let mut scratch = vec![vec![0u8; len]; parity.len()];
        let mut refs: Vec<&mut [u8]> = scratch.iter_mut().map(|s| s.as_mut_slice()).collect();
        self.encode(data, &mut refs)?;
        Ok(scratch.iter().zip(parity).all(|(s, p)| s[..] == p[..]))
    }
}

/// [`ErasureCode::reconstruct`] and [`ErasureCode::reconstruct_data`] on top
/// of [`ErasureCode::reconstruct_in_place`].
fn reconstruct_options<C: ErasureCode + ?Sized>(
    code: &C,
    shards: &mut [Option<Vec<u8>>],
    fill: Fill,
) -> Result<(), ErasureError> {
    let k = code.data_shards();
    let len = check::options(k, code.parity_shards(), shards)?;
    let present: Vec<bool> = shards.iter().map(Option::is_some).collect();
    let wanted = |i: usize| !present[i] && (fill == Fill::All || i < k);
    if !(0..shards.len()).any(wanted) {
        return Ok(());
    }
    for (i, s) in shards.iter_mut().enumerate() {
        if wanted(i) {
            *s = Some(vec![0u8; len]);
        }
    }
    let result = {
        let mut refs: Vec<&mut [u8]> = shards
            .iter_mut()
            .map(|s| s.as_deref_mut().unwrap_or(&mut []))
            .collect();
        code.reconstruct_in_place(&mut refs, &present, fill)
    };
    if result.is_err() {
        for (i, s) in shards.iter_mut().enumerate() {
            if wanted(i) {
                *s = None;
            }
        }
    }
    result
}
