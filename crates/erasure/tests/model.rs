//! The erasure code checked against a plain model.
//!
//! `Model` is a second, deliberately slow [`ErasureCode`] written from the
//! definition of the parity format (crate invariant 5), sharing no code with
//! `reed-solomon-erasure`: GF(2^8) multiplication by shift-and-add modulo
//! x^8 + x^4 + x^3 + x^2 + 1, the generator `V * inverse(V_top)` by
//! Gauss-Jordan elimination, reconstruction by inverting the rows of `k`
//! present shards. The properties then say:
//!
//! - encode equals the model, byte for byte (the parity format), and is
//!   position-wise (encoding a split stripe = splitting the encoded stripe);
//! - every subset of `k` shards rebuilds every shard (all three reconstruct
//!   forms), and fewer than `k` fail with `TooFewShards`, changing nothing;
//! - `update_parity` and `apply_delta` over any sub-range equal re-encoding
//!   the whole stripe from scratch, for both implementations (so the trait's
//!   provided `update_parity` is checked over two `apply_delta`s);
//! - mismatched lengths, counts and indices fail with the error naming the
//!   buffer, changing nothing;
//! - every supported geometry is MDS (exhaustively), the others are refused.

use std::sync::OnceLock;

use erasure::{
    Buffer, DELTA_CHUNK, ErasureCode, ErasureError, Fill, ReedSolomon, SHARDS_MAX, ShardKind,
    check_geometry, code_for,
};
use proptest::prelude::*;

// ---------------------------------------------------------------- GF(2^8) --

/// Shift-and-add multiplication modulo 0x11D.
fn gf_mul_slow(mut a: u8, mut b: u8) -> u8 {
    let mut p = 0u8;
    while b != 0 {
        if b & 1 != 0 {
            p ^= a;
        }
        let carry = a & 0x80 != 0;
        a <<= 1;
        if carry {
            a ^= 0x1D;
        }
        b >>= 1;
    }
    p
}

fn gf_mul(a: u8, b: u8) -> u8 {
    static TABLE: OnceLock<Vec<u8>> = OnceLock::new();
    let t = TABLE.get_or_init(|| {
        (0..=255u8)
            .flat_map(|a| (0..=255u8).map(move |b| gf_mul_slow(a, b)))
            .collect()
    });
    t[usize::from(a) * 256 + usize::from(b)]
}

fn gf_pow(a: u8, n: usize) -> u8 {
    (0..n).fold(1, |r, _| gf_mul(r, a))
}

fn gf_inv(a: u8) -> u8 {
    (1..=255u8)
        .find(|&x| gf_mul(a, x) == 1)
        .expect("non-zero has an inverse")
}

type Matrix = Vec<Vec<u8>>;

fn mat_mul(a: &Matrix, b: &Matrix) -> Matrix {
    a.iter()
        .map(|row| {
            (0..b[0].len())
                .map(|c| {
                    row.iter()
                        .zip(b)
                        .fold(0, |acc, (&x, brow)| acc ^ gf_mul(x, brow[c]))
                })
                .collect()
        })
        .collect()
}

/// Gauss-Jordan; `None` if singular.
fn mat_inv(m: &Matrix) -> Option<Matrix> {
    let n = m.len();
    let mut a: Matrix = m
        .iter()
        .enumerate()
        .map(|(r, row)| {
            let mut row = row.clone();
            row.extend((0..n).map(|c| u8::from(c == r)));
            row
        })
        .collect();
    for col in 0..n {
        let pivot = (col..n).find(|&r| a[r][col] != 0)?;
        a.swap(col, pivot);
        let inv = gf_inv(a[col][col]);
        for x in a[col].iter_mut() {
            *x = gf_mul(*x, inv);
        }
        for r in 0..n {
            if r != col && a[r][col] != 0 {
                let f = a[r][col];
                let pivot_row = a[col].clone();
                for (x, p) in a[r].iter_mut().zip(pivot_row) {
                    *x ^= gf_mul(f, p);
                }
            }
        }
    }
    Some(a.into_iter().map(|row| row[n..].to_vec()).collect())
}

/// The `(k + m) x k` systematic generator: `V * inverse(V_top)`,
/// `V[r][c] = r^c`.
fn generator(k: usize, m: usize) -> Matrix {
    let v: Matrix = (0..k + m)
        .map(|r| (0..k).map(|c| gf_pow(r as u8, c)).collect())
        .collect();
    let top_inv = mat_inv(&v[..k].to_vec()).expect("Vandermonde rows are independent");
    mat_mul(&v, &top_inv)
}

// ------------------------------------------------------------------ model --

/// The plain model of the code: the format's definition, slowly.
#[derive(Debug)]
struct Model {
    k: usize,
    m: usize,
    g: Matrix,
}

impl Model {
    fn new(k: usize, m: usize) -> Self {
        Model {
            k,
            m,
            g: generator(k, m),
        }
    }

    /// Row `r` of the generator applied to the data, over `len` bytes.
    fn row_times(&self, r: usize, data: &[&[u8]], out: &mut [u8]) {
        for (b, o) in out.iter_mut().enumerate() {
            *o = (0..self.k).fold(0, |acc, j| acc ^ gf_mul(self.g[r][j], data[j][b]));
        }
    }
}

impl ErasureCode for Model {
    fn data_shards(&self) -> usize {
        self.k
    }

    fn parity_shards(&self) -> usize {
        self.m
    }

    fn encode(&self, data: &[&[u8]], parity: &mut [&mut [u8]]) -> Result<(), ErasureError> {
        for (i, p) in parity.iter_mut().enumerate() {
            self.row_times(self.k + i, data, p);
        }
        Ok(())
    }

    fn reconstruct_in_place(
        &self,
        shards: &mut [&mut [u8]],
        present: &[bool],
        fill: Fill,
    ) -> Result<(), ErasureError> {
        let rows: Vec<usize> = (0..self.k + self.m)
            .filter(|&i| present[i])
            .take(self.k)
            .collect();
        if rows.len() < self.k {
            return Err(ErasureError::TooFewShards {
                present: rows.len(),
                needed: self.k,
                total: self.k + self.m,
            });
        }
        let len = shards[rows[0]].len();
        let sub: Matrix = rows.iter().map(|&r| self.g[r].clone()).collect();
        let dec = mat_inv(&sub).expect("MDS");
        let data: Vec<Vec<u8>> = (0..self.k)
            .map(|j| {
                (0..len)
                    .map(|b| {
                        rows.iter()
                            .enumerate()
                            .fold(0, |acc, (t, &r)| acc ^ gf_mul(dec[j][t], shards[r][b]))
                    })
                    .collect()
            })
            .collect();
        let refs: Vec<&[u8]> = data.iter().map(|d| d.as_slice()).collect();
        for i in 0..self.k + self.m {
            if present[i] || (fill == Fill::Data && i >= self.k) {
                continue;
            }
            if i < self.k {
                shards[i].copy_from_slice(&data[i]);
            } else {
                self.row_times(i, &refs, shards[i]);
            }
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
        let c = self.g[self.k + parity_index][data_index];
        for (p, d) in parity.iter_mut().zip(delta) {
            *p ^= gf_mul(c, *d);
        }
        Ok(())
    }
}

// ---------------------------------------------------------------- helpers --

/// Deterministic bytes (splitmix64), so a stripe of 8 x 4 KiB is cheap to
/// generate and a failing case is reproduced by its seed.
fn bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut s = seed;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = s;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        out.extend_from_slice(&(z ^ (z >> 31)).to_le_bytes());
    }
    out.truncate(len);
    out
}

fn data_of(k: usize, len: usize, seed: u64) -> Vec<Vec<u8>> {
    (0..k)
        .map(|j| bytes(seed ^ ((j as u64) << 48), len))
        .collect()
}

fn encode_vec(code: &dyn ErasureCode, data: &[Vec<u8>]) -> Vec<Vec<u8>> {
    let len = data.first().map_or(0, Vec::len);
    let refs: Vec<&[u8]> = data.iter().map(Vec::as_slice).collect();
    let mut parity = vec![vec![0u8; len]; code.parity_shards()];
    let mut prefs: Vec<&mut [u8]> = parity.iter_mut().map(Vec::as_mut_slice).collect();
    code.encode(&refs, &mut prefs).expect("encode");
    parity
}

/// All subsets of `0..n` as bit masks.
fn subsets(n: usize) -> impl Iterator<Item = u32> {
    0..(1u32 << n)
}

fn stripe() -> impl Strategy<Value = (usize, usize, usize, u64)> {
    (2usize..=8, 1usize..=2, 0usize..=4096, any::<u64>())
}

fn nonempty_stripe() -> impl Strategy<Value = (usize, usize, usize, u64)> {
    (2usize..=8, 1usize..=2, 1usize..=4096, any::<u64>())
}

// ------------------------------------------------------------- properties --

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    /// (c) The parity is the model's, byte for byte: the on-disk format.
    #[test]
    fn encode_matches_model((k, m, len, seed) in stripe()) {
        let data = data_of(k, len, seed);
        let rs = code_for(k, m).unwrap();
        prop_assert_eq!(encode_vec(&*rs, &data), encode_vec(&Model::new(k, m), &data));
    }

    /// Position-wise: encoding two pieces of a stripe gives the pieces of the
    /// encoded stripe.
    #[test]
    fn encode_is_position_wise((k, m, len, seed) in nonempty_stripe(), cut in any::<prop::sample::Index>()) {
        let data = data_of(k, len, seed);
        let rs = code_for(k, m).unwrap();
        let whole = encode_vec(&*rs, &data);
        let s = cut.index(len + 1);
        let left: Vec<Vec<u8>> = data.iter().map(|d| d[..s].to_vec()).collect();
        let right: Vec<Vec<u8>> = data.iter().map(|d| d[s..].to_vec()).collect();
        let (l, r) = (encode_vec(&*rs, &left), encode_vec(&*rs, &right));
        for i in 0..m {
            prop_assert_eq!(&whole[i][..s], &l[i][..]);
            prop_assert_eq!(&whole[i][s..], &r[i][..]);
        }
    }

    /// (a) Every subset of at least k shards gives back every shard, through
    /// reconstruct, reconstruct_data and reconstruct_in_place (whose missing
    /// buffers hold garbage), in both implementations.
    #[test]
    fn reconstruct_from_every_k_subset((k, m, len, seed) in stripe()) {
        let data = data_of(k, len, seed);
        let rs = code_for(k, m).unwrap();
        let model = Model::new(k, m);
        let parity = encode_vec(&*rs, &data);
        let all: Vec<Vec<u8>> = data.iter().chain(&parity).cloned().collect();
        let n = k + m;
        for mask in subsets(n).filter(|mask| mask.count_ones() as usize >= k) {
            let present: Vec<bool> = (0..n).map(|i| mask & (1 << i) != 0).collect();
            let lossy: Vec<Option<Vec<u8>>> = all
                .iter()
                .zip(&present)
                .map(|(s, &p)| p.then(|| s.clone()))
                .collect();

            let mut shards = lossy.clone();
            rs.reconstruct(&mut shards).unwrap();
            let got: Vec<Vec<u8>> = shards.into_iter().map(Option::unwrap).collect();
            prop_assert_eq!(&got, &all, "reconstruct, present {:?}", present);

            let mut shards = lossy.clone();
            rs.reconstruct_data(&mut shards).unwrap();
            for (i, s) in shards.iter().enumerate() {
                if i < k {
                    prop_assert_eq!(s.as_deref(), Some(&all[i][..]));
                } else {
                    prop_assert_eq!(s.as_deref(), present[i].then_some(&all[i][..]));
                }
            }

            for code in [&*rs as &dyn ErasureCode, &model] {
                let mut bufs: Vec<Vec<u8>> = all
                    .iter()
                    .zip(&present)
                    .map(|(s, &p)| if p { s.clone() } else { bytes(!seed, len) })
                    .collect();
                let mut refs: Vec<&mut [u8]> = bufs.iter_mut().map(Vec::as_mut_slice).collect();
                code.reconstruct_in_place(&mut refs, &present, Fill::All).unwrap();
                prop_assert_eq!(&bufs, &all, "{:?} in place, present {:?}", code, present);
            }
        }
    }

    /// (d) Fewer than k shards: TooFewShards, and nothing changes.
    #[test]
    fn too_few_shards_fail((k, m, len, seed) in stripe(), pick in any::<prop::sample::Index>()) {
        let data = data_of(k, len, seed);
        let rs = code_for(k, m).unwrap();
        let parity = encode_vec(&*rs, &data);
        let n = k + m;
        let masks: Vec<u32> = subsets(n).filter(|mask| (mask.count_ones() as usize) < k).collect();
        let mask = masks[pick.index(masks.len())];
        let present: Vec<bool> = (0..n).map(|i| mask & (1 << i) != 0).collect();
        let want = ErasureError::TooFewShards { present: mask.count_ones() as usize, needed: k, total: n };
        let lossy: Vec<Option<Vec<u8>>> = data
            .iter()
            .chain(&parity)
            .zip(&present)
            .map(|(s, &p)| p.then(|| s.clone()))
            .collect();
        let mut shards = lossy.clone();
        prop_assert_eq!(rs.reconstruct(&mut shards), Err(want.clone()));
        prop_assert_eq!(&shards, &lossy);
        prop_assert_eq!(rs.reconstruct_data(&mut shards), Err(want.clone()));
        prop_assert_eq!(&shards, &lossy);
        let mut bufs = vec![vec![7u8; len]; n];
        let mut refs: Vec<&mut [u8]> = bufs.iter_mut().map(Vec::as_mut_slice).collect();
        prop_assert_eq!(rs.reconstruct_in_place(&mut refs, &present, Fill::All), Err(want));
        prop_assert!(bufs.iter().flatten().all(|&b| b == 7));
    }

    /// (b) Read-modify-write of any sub-range of one data shard (up to three
    /// delta chunks long), a few times in a row, equals re-encoding the
    /// whole stripe; so does apply_delta per parity shard. In both
    /// implementations.
    #[test]
    fn update_parity_equals_reencode(
        (k, m, len, seed) in (2usize..=8, 1usize..=2, 1usize..=3 * DELTA_CHUNK + 1, any::<u64>()),
        writes in prop::collection::vec((any::<prop::sample::Index>(), any::<prop::sample::Index>(), any::<prop::sample::Index>(), any::<u64>()), 1..4),
    ) {
        let rs = code_for(k, m).unwrap();
        let model = Model::new(k, m);
        let mut data = data_of(k, len, seed);
        let mut parity = encode_vec(&*rs, &data);
        let mut model_parity = parity.clone();
        let mut delta_parity = parity.clone();
        for (j, a, b, s) in writes {
            let j = j.index(k);
            let (a, b) = (a.index(len + 1), b.index(len + 1));
            let (a, b) = (a.min(b), a.max(b));
            let new = bytes(s, b - a);
            let old = data[j][a..b].to_vec();
            for (code, p) in [(&*rs as &dyn ErasureCode, &mut parity), (&model as &dyn ErasureCode, &mut model_parity)] {
                let mut prefs: Vec<&mut [u8]> = p.iter_mut().map(|p| &mut p[a..b]).collect();
                code.update_parity(j, &old, &new, &mut prefs).unwrap();
            }
            let delta: Vec<u8> = old.iter().zip(&new).map(|(o, n)| o ^ n).collect();
            for (i, p) in delta_parity.iter_mut().enumerate() {
                rs.apply_delta(j, i, &delta, &mut p[a..b]).unwrap();
            }
            data[j][a..b].copy_from_slice(&new);
        }
        let fresh = encode_vec(&*rs, &data);
        prop_assert_eq!(&parity, &fresh);
        prop_assert_eq!(&model_parity, &fresh);
        prop_assert_eq!(&delta_parity, &fresh);
    }

    /// Working in chunks (here 1 to 100 bytes, so that every stripe has
    /// several and a ragged last one) gives the same bytes as the model:
    /// encode, and every reconstruct form for one pattern of losses.
    #[test]
    fn chunked_equals_model((k, m, len, seed) in nonempty_stripe(), chunk in 1usize..=100, lost in any::<prop::sample::Index>()) {
        let data = data_of(k, len, seed);
        let rs = ReedSolomon::with_chunk(k, m, chunk).unwrap();
        let model = Model::new(k, m);
        let parity = encode_vec(&rs, &data);
        prop_assert_eq!(&parity, &encode_vec(&model, &data));
        let all: Vec<Vec<u8>> = data.iter().chain(&parity).cloned().collect();
        let n = k + m;
        let masks: Vec<u32> = subsets(n).filter(|mask| mask.count_ones() as usize >= k).collect();
        let mask = masks[lost.index(masks.len())];
        let present: Vec<bool> = (0..n).map(|i| mask & (1 << i) != 0).collect();
        for fill in [Fill::All, Fill::Data] {
            let mut bufs: Vec<Vec<u8>> = all
                .iter()
                .zip(&present)
                .map(|(s, &p)| if p { s.clone() } else { vec![0x5A; len] })
                .collect();
            let mut refs: Vec<&mut [u8]> = bufs.iter_mut().map(Vec::as_mut_slice).collect();
            rs.reconstruct_in_place(&mut refs, &present, fill).unwrap();
            for i in 0..n {
                let want = if present[i] || fill == Fill::All || i < k { &all[i] } else { &vec![0x5A; len] };
                prop_assert_eq!(&bufs[i], want, "{:?} shard {} present {:?}", fill, i, present);
            }
        }
    }

    /// Verify accepts the stripe's parity and refuses it after any one byte
    /// of data or parity changes.
    #[test]
    fn verify_detects_a_changed_byte((k, m, len, seed) in nonempty_stripe(), at in any::<prop::sample::Index>(), shard in any::<prop::sample::Index>(), flip in 1u8..=255) {
        let mut data = data_of(k, len, seed);
        let rs = code_for(k, m).unwrap();
        let mut parity = encode_vec(&*rs, &data);
        let verify = |data: &[Vec<u8>], parity: &[Vec<u8>]| {
            let d: Vec<&[u8]> = data.iter().map(Vec::as_slice).collect();
            let p: Vec<&[u8]> = parity.iter().map(Vec::as_slice).collect();
            rs.verify(&d, &p)
        };
        prop_assert_eq!(verify(&data, &parity), Ok(true));
        let s = shard.index(k + m);
        let b = at.index(len);
        if s < k { data[s][b] ^= flip } else { parity[s - k][b] ^= flip }
        prop_assert_eq!(verify(&data, &parity), Ok(false));
    }

    /// (e) A buffer of another length: ShardSize naming it, outputs unchanged.
    #[test]
    fn mismatched_lengths_fail((k, m, len, seed) in nonempty_stripe(), which in any::<prop::sample::Index>(), longer in any::<bool>()) {
        let rs = code_for(k, m).unwrap();
        let data = data_of(k, len, seed);
        let parity = encode_vec(&*rs, &data);
        let other = if longer { len + 1 } else { len - 1 };
        let n = k + m;
        let bad = which.index(n);
        // The first buffer sets the expected length, so make a later one wrong.
        let bad = if bad == 0 { 1 } else { bad };
        let buffer = if bad < k { Buffer::Data(bad) } else { Buffer::Parity(bad - k) };
        let want = ErasureError::ShardSize { buffer, expected: len, got: other };

        // encode
        let mut d = data.clone();
        let mut p = vec![vec![9u8; len]; m];
        if bad < k { d[bad].resize(other, 0) } else { p[bad - k].resize(other, 9) }
        let drefs: Vec<&[u8]> = d.iter().map(Vec::as_slice).collect();
        let mut prefs: Vec<&mut [u8]> = p.iter_mut().map(Vec::as_mut_slice).collect();
        prop_assert_eq!(rs.encode(&drefs, &mut prefs), Err(want.clone()));
        prop_assert!(p.iter().flatten().all(|&b| b == 9));

        // reconstruct: the bad shard present, another one missing
        let mut shards: Vec<Option<Vec<u8>>> = data.iter().chain(&parity).cloned().map(Some).collect();
        if let Some(s) = shards[bad].as_mut() { s.resize(other, 0) }
        let lost = if bad == n - 1 { n - 2 } else { n - 1 };
        shards[lost] = None;
        let before = shards.clone();
        prop_assert_eq!(rs.reconstruct(&mut shards), Err(want.clone()));
        prop_assert_eq!(&shards, &before);

        // reconstruct in place: the bad buffer is a missing shard's output
        let mut bufs: Vec<Vec<u8>> = data.iter().chain(&parity).cloned().collect();
        bufs[bad].resize(other, 0);
        let mut present = vec![true; n];
        present[bad] = false;
        let snapshot = bufs.clone();
        let mut refs: Vec<&mut [u8]> = bufs.iter_mut().map(Vec::as_mut_slice).collect();
        prop_assert_eq!(rs.reconstruct_in_place(&mut refs, &present, Fill::All), Err(want.clone()));
        prop_assert_eq!(&bufs, &snapshot);

        // update_parity: new data or one parity shard of another length
        let mut p = parity.clone();
        let new = vec![1u8; other];
        let mut prefs: Vec<&mut [u8]> = p.iter_mut().map(Vec::as_mut_slice).collect();
        prop_assert_eq!(
            rs.update_parity(0, &data[0], &new, &mut prefs),
            Err(ErasureError::ShardSize { buffer: Buffer::New, expected: len, got: other })
        );
        p[m - 1].resize(other, 0);
        let snapshot = p.clone();
        let mut prefs: Vec<&mut [u8]> = p.iter_mut().map(Vec::as_mut_slice).collect();
        prop_assert_eq!(
            rs.update_parity(0, &data[0], &data[1], &mut prefs),
            Err(ErasureError::ShardSize { buffer: Buffer::Parity(m - 1), expected: len, got: other })
        );
        prop_assert_eq!(&p, &snapshot);
        prop_assert_eq!(
            rs.apply_delta(0, m - 1, &data[0], &mut p[m - 1]),
            Err(ErasureError::ShardSize { buffer: Buffer::Parity(m - 1), expected: len, got: other })
        );
        prop_assert_eq!(&p, &snapshot);
    }
}

// ----------------------------------------------------------- exhaustive --

/// Every supported geometry is accepted, everything else refused.
#[test]
fn geometry() {
    for k in 0..=20 {
        for m in 0..=4 {
            let ok = k >= 2 && (1..=2).contains(&m) && k + m <= SHARDS_MAX;
            let got = ReedSolomon::new(k, m);
            assert_eq!(got.is_ok(), ok, "{k}+{m}");
            assert_eq!(check_geometry(k, m).is_ok(), ok, "{k}+{m}");
            if let Err(e) = got {
                assert!(
                    matches!(e, ErasureError::BadGeometry { data, parity, .. } if data == k && parity == m)
                );
            }
        }
    }
    assert_eq!(
        code_for(1, 1).unwrap_err().to_string(),
        "unsupported erasure geometry 1+1: at least 2 data shards are needed"
    );
    assert_eq!(
        code_for(4, 3).unwrap_err().to_string(),
        "unsupported erasure geometry 4+3: parity shards must be 1 or 2"
    );
    assert_eq!(
        code_for(15, 2).unwrap_err().to_string(),
        "unsupported erasure geometry 15+2: at most 16 shards in all (one per node)"
    );
    assert!(code_for(usize::MAX, 2).is_err());
}

/// MDS for every supported geometry: every way of losing m shards (and
/// fewer) is rebuilt, and every k x k submatrix of the model's generator is
/// invertible. Lengths cover the SIMD body and its scalar tail.
#[test]
fn every_supported_geometry_is_mds() {
    for m in 1..=2 {
        for k in 2..=SHARDS_MAX - m {
            let n = k + m;
            let g = generator(k, m);
            let rs = ReedSolomon::new(k, m).unwrap();
            let data = data_of(k, 97, (k * 10 + m) as u64);
            let parity = encode_vec(&rs, &data);
            let all: Vec<Vec<u8>> = data.iter().chain(&parity).cloned().collect();
            for mask in subsets(n).filter(|mask| mask.count_ones() as usize >= k) {
                let mut shards: Vec<Option<Vec<u8>>> = all
                    .iter()
                    .enumerate()
                    .map(|(i, s)| (mask & (1 << i) != 0).then(|| s.clone()))
                    .collect();
                rs.reconstruct(&mut shards).unwrap();
                assert!(
                    shards.iter().zip(&all).all(|(s, a)| s.as_ref() == Some(a)),
                    "{k}+{m} mask {mask:b}"
                );
                if mask.count_ones() as usize == k {
                    let sub: Matrix = (0..n)
                        .filter(|i| mask & (1 << i) != 0)
                        .map(|i| g[i].clone())
                        .collect();
                    assert!(mat_inv(&sub).is_some(), "{k}+{m} mask {mask:b} singular");
                }
            }
        }
    }
}

/// The parity format, pinned: a change of library, version or matrix that
/// changes parity bytes fails here even if the model moved with it. Note
/// that m = 1 is not XOR parity (XOR would be all ones).
#[test]
fn parity_format_is_pinned() {
    let pinned: [(usize, usize, &[&[u8]]); 4] = [
        (2, 1, &[&[0x03, 0x02]]),
        (4, 1, &[&[0x1B, 0x1C, 0x12, 0x14]]),
        (
            4,
            2,
            &[&[0x1B, 0x1C, 0x12, 0x14], &[0x1C, 0x1B, 0x14, 0x12]],
        ),
        (
            8,
            2,
            &[
                &[0x1A, 0x84, 0xBA, 0x33, 0xE7, 0x10, 0xC6, 0x27],
                &[0x84, 0x1A, 0x33, 0xBA, 0x10, 0xE7, 0x27, 0xC6],
            ],
        ),
    ];
    for (k, m, rows) in pinned {
        let rs = ReedSolomon::new(k, m).unwrap();
        let g = generator(k, m);
        for (i, row) in rows.iter().enumerate() {
            for (j, &c) in row.iter().enumerate() {
                assert_eq!(rs.coefficient(i, j), Ok(c), "{k}+{m} c({i},{j})");
                assert_eq!(g[k + i][j], c, "model {k}+{m} c({i},{j})");
            }
        }
    }
    let rs = ReedSolomon::new(2, 1).unwrap();
    let d0 = [1u8, 0, 0x80];
    let d1 = [0u8, 1, 0x80];
    let mut p = [0u8; 3];
    rs.encode(&[&d0, &d1], &mut [&mut p]).unwrap();
    // 3·1 = 3, 2·1 = 2, 3·0x80 + 2·0x80 = 1·0x80.
    assert_eq!(p, [3, 2, 0x80]);
}

/// Wrong counts and indices are refused with errors that say so.
#[test]
fn wrong_counts_and_indices_fail() {
    let rs = ReedSolomon::new(4, 2).unwrap();
    let d = [0u8; 8];
    let mut p0 = [0u8; 8];
    let mut p1 = [0u8; 8];
    assert_eq!(
        rs.encode(&[&d, &d, &d], &mut [&mut p0, &mut p1]),
        Err(ErasureError::ShardCount {
            kind: ShardKind::Data,
            expected: 4,
            got: 3
        })
    );
    assert_eq!(
        rs.encode(&[&d, &d, &d, &d], &mut [&mut p0]),
        Err(ErasureError::ShardCount {
            kind: ShardKind::Parity,
            expected: 2,
            got: 1
        })
    );
    let mut shards: Vec<Option<Vec<u8>>> = vec![Some(vec![0; 8]); 5];
    assert_eq!(
        rs.reconstruct(&mut shards),
        Err(ErasureError::ShardCount {
            kind: ShardKind::Any,
            expected: 6,
            got: 5
        })
    );
    let mut bufs = [[0u8; 8]; 6];
    let mut refs: Vec<&mut [u8]> = bufs.iter_mut().map(|b| &mut b[..]).collect();
    assert!(matches!(
        rs.reconstruct_in_place(&mut refs, &[true; 5], Fill::All),
        Err(ErasureError::ShardCount { .. })
    ));
    assert_eq!(
        rs.update_parity(4, &d, &d, &mut [&mut p0, &mut p1]),
        Err(ErasureError::IndexOutOfRange {
            kind: ShardKind::Data,
            index: 4,
            count: 4
        })
    );
    assert_eq!(
        rs.apply_delta(0, 2, &d, &mut p0),
        Err(ErasureError::IndexOutOfRange {
            kind: ShardKind::Parity,
            index: 2,
            count: 2
        })
    );
    assert!(rs.coefficient(2, 0).is_err());
    assert!(rs.coefficient(0, 4).is_err());
    assert_eq!(
        ErasureError::TooFewShards {
            present: 3,
            needed: 4,
            total: 6
        }
        .to_string(),
        "too many shards missing: 3 of 6 present, 4 needed to reconstruct"
    );
    assert_eq!(
        ErasureError::ShardSize {
            buffer: Buffer::Parity(1),
            expected: 4096,
            got: 4095
        }
        .to_string(),
        "shard size mismatch: parity shard 1 is 4095 bytes, expected 4096"
    );
}

/// Zero-length shards: every call is a no-op that succeeds (the library
/// itself would panic on them).
#[test]
fn zero_length_shards_are_no_ops() {
    let rs = ReedSolomon::new(3, 2).unwrap();
    let e: &[u8] = &[];
    let (mut p0, mut p1) = ([0u8; 0], [0u8; 0]);
    rs.encode(&[e, e, e], &mut [&mut p0, &mut p1]).unwrap();
    rs.update_parity(1, e, e, &mut [&mut p0, &mut p1]).unwrap();
    rs.apply_delta(1, 1, e, &mut p1).unwrap();
    assert_eq!(rs.verify(&[e, e, e], &[e, e]), Ok(true));
    let mut shards = vec![Some(vec![]), None, Some(vec![]), None, Some(vec![])];
    rs.reconstruct(&mut shards).unwrap();
    assert_eq!(shards, vec![Some(vec![]); 5]);
    let mut shards = vec![None, None, Some(vec![]), Some(vec![]), Some(vec![])];
    rs.reconstruct_data(&mut shards).unwrap();
    assert_eq!(shards[..2], [Some(vec![]), Some(vec![])]);
}

/// Degraded read: only the data is filled; a missing parity shard's buffer
/// is neither checked nor written.
#[test]
fn fill_data_leaves_missing_parity_alone() {
    let rs = ReedSolomon::new(4, 2).unwrap();
    let data = data_of(4, 4096, 42);
    let parity = encode_vec(&rs, &data);
    let mut bufs: Vec<Vec<u8>> = data.iter().chain(&parity).cloned().collect();
    bufs[2] = vec![0; 4096];
    bufs[5] = vec![0xEE; 3]; // missing parity: any length
    let present = [true, true, false, true, true, false];
    let mut refs: Vec<&mut [u8]> = bufs.iter_mut().map(Vec::as_mut_slice).collect();
    rs.reconstruct_in_place(&mut refs, &present, Fill::Data)
        .unwrap();
    assert_eq!(bufs[2], data[2]);
    assert_eq!(bufs[5], vec![0xEE; 3]);
}

/// The code is shared between threads behind the trait.
#[test]
fn shared_across_threads() {
    let code = code_for(6, 2).unwrap();
    std::thread::scope(|s| {
        for t in 0..4u64 {
            let code = &code;
            s.spawn(move || {
                let data = data_of(6, 8192, t);
                let parity = encode_vec(&**code, &data);
                let mut shards: Vec<Option<Vec<u8>>> =
                    data.iter().chain(&parity).cloned().map(Some).collect();
                shards[t as usize] = None;
                shards[7] = None;
                code.reconstruct(&mut shards).unwrap();
                assert_eq!(shards[t as usize].as_ref(), Some(&data[t as usize]));
            });
        }
    });
}
