//! [`ReedSolomon`]: the [`ErasureCode`] on `reed-solomon-erasure` 6 with
//! `simd-accel`.
//!
//! Encode and reconstruct are the library's (`encode_sep`, `reconstruct` /
//! `reconstruct_data` on `(buffer, present)` pairs, which write in place).
//! The library has no read-modify-write, so [`ErasureCode::apply_delta`] uses
//! linearity (crate invariant 4): the coefficient `c(i, j)` of data shard `j`
//! in parity shard `i` is read off once, at construction, by encoding unit
//! vectors, and a delta is folded in with the library's SIMD
//! `galois_8::mul_slice_xor`.
//!
//! The library panics on empty slices (its SIMD path indexes `[0]`) and
//! unwraps a matrix inverse that the MDS property (tested for every
//! geometry) makes safe; every call checks its arguments first and handles
//! zero-length shards itself, so neither is reachable from a caller.
//!
//! `simd-accel` compiles the library's C kernel with `-march=haswell`
//! (override with `RUST_REED_SOLOMON_ERASURE_ARCH` at build time): the
//! binary needs an AVX2 CPU.

use std::fmt;

use reed_solomon_erasure::galois_8;

use crate::error::ErasureError;
use crate::{ErasureCode, Fill, PARITY_SHARDS_MAX, SHARDS_MAX, check, check_geometry};

/// Reed-Solomon over GF(2^8), `reed-solomon-erasure`'s Vandermonde-derived
/// systematic matrix (crate invariant 5 gives the exact format).
pub struct ReedSolomon {
    inner: galois_8::ReedSolomon,
    /// `m` rows of `k` coefficients: `coefficients[i * k + j]` = `c(i, j)`.
    coefficients: Vec<u8>,
    /// Encode and reconstruct work on byte ranges of at most this many bytes
    /// at a time (`usize::MAX`: the whole call at once).
    chunk: usize,
}

/// The default of [`ReedSolomon::with_chunk`], chosen with
/// `examples/stripe_bench.rs`.
pub const CHUNK_DEFAULT: usize = 16 << 10;

fn backend(e: reed_solomon_erasure::Error) -> ErasureError {
    ErasureError::Backend(e.to_string())
}

impl ReedSolomon {
    /// A `data + parity` code. Refuses geometries s2d does not support
    /// ([`check_geometry`]).
    pub fn new(data: usize, parity: usize) -> Result<Self, ErasureError> {
        Self::with_chunk(data, parity, CHUNK_DEFAULT)
    }

    /// A `data + parity` code that encodes and reconstructs `chunk` bytes of
    /// each shard at a time (0: the whole call at once). The library makes
    /// one pass per (input, output) pair over the whole length, so without
    /// chunks a stripe larger than the L2 cache comes from L3 or memory again
    /// on every pass; chunks keep the shards being built in cache (crate
    /// invariant 3 makes the result the same). Measured on the development
    /// VM (2 MiB L2 per core), 4+2 with 1 MiB shards: encode 8.4 GB/s whole,
    /// 13-15 GB/s in chunks of 4-64 KiB (best at 16 KiB and below);
    /// reconstruct of 2 lost shards 8.4 GB/s whole, 13-14 GB/s in chunks of
    /// 16-256 KiB. Up to 256 KiB shards chunking changes nothing measurable.
    pub fn with_chunk(data: usize, parity: usize, chunk: usize) -> Result<Self, ErasureError> {
        check_geometry(data, parity)?;
        let inner = galois_8::ReedSolomon::new(data, parity).map_err(backend)?;
        // Data shard j is the unit vector e_j (k bytes), so byte j of parity
        // shard i is c(i, j).
        let units: Vec<Vec<u8>> = (0..data)
            .map(|j| (0..data).map(|b| u8::from(b == j)).collect())
            .collect();
        let mut rows = vec![vec![0u8; data]; parity];
        inner.encode_sep(&units, &mut rows).map_err(backend)?;
        Ok(ReedSolomon {
            inner,
            coefficients: rows.concat(),
            chunk: if chunk == 0 { usize::MAX } else { chunk },
        })
    }

    /// `c(parity_index, data_index)`: the GF(2^8) coefficient of data shard
    /// `data_index` in parity shard `parity_index`. Together these are the
    /// parity format.
    pub fn coefficient(&self, parity_index: usize, data_index: usize) -> Result<u8, ErasureError> {
        let k = self.data_shards();
        check::data_index(k, data_index)?;
        check::parity_index(self.parity_shards(), parity_index)?;
        Ok(self.coefficients[parity_index * k + data_index])
    }
}

impl fmt::Debug for ReedSolomon {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "ReedSolomon({}+{})",
            self.data_shards(),
            self.parity_shards()
        )
    }
}

impl ErasureCode for ReedSolomon {
    fn data_shards(&self) -> usize {
        self.inner.data_shard_count()
    }

    fn parity_shards(&self) -> usize {
        self.inner.parity_shard_count()
    }

    fn encode(&self, data: &[&[u8]], parity: &mut [&mut [u8]]) -> Result<(), ErasureError> {
        let len = check::stripe(
            self.data_shards(),
            self.parity_shards(),
            data.iter().map(|d| d.len()),
            parity.iter().map(|p| p.len()),
        )?;
        let (k, m) = (data.len(), parity.len());
        let mut start = 0;
        while start < len {
            let end = len.min(start.saturating_add(self.chunk));
            let mut d: [&[u8]; SHARDS_MAX] = [&[]; SHARDS_MAX];
            let mut p: [&mut [u8]; PARITY_SHARDS_MAX] = [&mut [], &mut []];
            for (r, s) in d.iter_mut().zip(data) {
                *r = &s[start..end];
            }
            for (r, s) in p.iter_mut().zip(parity.iter_mut()) {
                *r = &mut s[start..end];
            }
            self.inner
                .encode_sep(&d[..k], &mut p[..m])
                .map_err(backend)?;
            start = end;
        }
        Ok(())
    }

    fn reconstruct_in_place(
        &self,
        shards: &mut [&mut [u8]],
        present: &[bool],
        fill: Fill,
    ) -> Result<(), ErasureError> {
        let (k, m) = (self.data_shards(), self.parity_shards());
        let (len, n) = check::in_place(k, m, shards, present, fill)?;
        if n == k + m || len == 0 {
            return Ok(());
        }
        // The library's in-place form: (buffer, present) pairs, on the
        // stack (k + m <= SHARDS_MAX), one chunk of every shard at a time.
        // Missing parity shards the caller does not want filled may have any
        // length: they are handed over empty.
        let mut start = 0;
        while start < len {
            let end = len.min(start.saturating_add(self.chunk));
            let mut pairs: [(&mut [u8], bool); SHARDS_MAX] =
                std::array::from_fn(|_| (&mut [][..], true));
            for (i, ((pair, shard), &p)) in pairs
                .iter_mut()
                .zip(shards.iter_mut())
                .zip(present)
                .enumerate()
            {
                let used = p || fill == Fill::All || i < k;
                *pair = (
                    if used {
                        &mut shard[start..end]
                    } else {
                        &mut []
                    },
                    p,
                );
            }
            let pairs = &mut pairs[..k + m];
            match fill {
                Fill::All => self.inner.reconstruct(pairs),
                Fill::Data => self.inner.reconstruct_data(pairs),
            }
            .map_err(backend)?;
            start = end;
        }
        Ok(())
    }

    fn apply_delta(
        &self,
        data_index: usize,
        parity_index: usize,
        delta: &[u8],
        parity: &mut [u8],
    ) -> Result<(), ErasureError> {
        let (k, m) = (self.data_shards(), self.parity_shards());
        check::delta_args(k, m, data_index, parity_index, delta, parity)?;
        if delta.is_empty() {
            return Ok(());
        }
        let c = self.coefficients[parity_index * k + data_index];
        galois_8::mul_slice_xor(c, delta, parity);
        Ok(())
    }
}
