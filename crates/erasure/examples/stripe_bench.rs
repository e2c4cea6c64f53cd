//! Throughput of the erasure code per stripe unit, to choose the default unit.
//!
//! ```text
//! taskset -c 1 cargo run --release -p erasure --example stripe_bench [-- --cold [--cold-mib N]] [--rounds N] [--round-us N] [--chunk BYTES]
//! ```
//!
//! For 2+1 and 4+2 at stripe units of 4 KiB to 1 MiB it times one call on
//! one stripe (one unit per shard), single-threaded, and prints GB/s
//! (1e9 bytes/s):
//!
//! - `encode`: the m parity units of k data units; bytes = k × unit.
//! - `rec 1` / `rec 2`: `reconstruct_in_place` of 1 or 2 lost data units
//!   (the first ones) from the others, into a caller buffer; bytes = k × unit.
//! - `rec 1 Vec`: `reconstruct` on `Option<Vec<u8>>`, which allocates and
//!   zeroes the lost unit each time; bytes = k × unit.
//! - `update`: `update_parity` of one whole data unit (old, new, m parity
//!   units); bytes = unit (the data rewritten).
//! - `xor`: plain XOR of the k data units into one parity unit (what
//!   RAID-5-style m = 1 parity would cost; reference only); bytes = k × unit.
//!
//! `--chunk` sets how many bytes of each shard `ReedSolomon` encodes and
//! reconstructs at a time (0: all at once; default `CHUNK_DEFAULT`).
//!
//! Each figure is the best of `--rounds` (default 200) rounds; a round runs
//! at least 3 calls and at least `--round-us` (default 1000) µs, after 2
//! warm-up calls. Short rounds and the best of many keep out the time other
//! processes take on a shared core. By default the
//! same stripe is used every time (hot in cache); `--cold` cycles through
//! `--cold-mib` (default 1024) MiB of stripes so that every call reads
//! memory, as a write fresh from the network or a disk would (the
//! development VM reports a 480 MiB L3).

use std::hint::black_box;
use std::time::{Duration, Instant};

use erasure::{CHUNK_DEFAULT, ErasureCode, Fill, ReedSolomon, SHARDS_MAX};
use std::sync::Arc;

const UNITS: [usize; 5] = [4 << 10, 16 << 10, 64 << 10, 256 << 10, 1 << 20];
const GEOMETRIES: [(usize, usize); 2] = [(2, 1), (4, 2)];

struct Stripe {
    data: Vec<Vec<u8>>,
    parity: Vec<Vec<u8>>,
    /// Output buffers for lost units.
    lost: Vec<Vec<u8>>,
    /// The new bytes of an update.
    new: Vec<u8>,
}

fn fill(buf: &mut [u8], seed: u64) {
    let mut s = seed | 1;
    for chunk in buf.chunks_mut(8) {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        let b = s.to_le_bytes();
        chunk.copy_from_slice(&b[..chunk.len()]);
    }
}

impl Stripe {
    fn new(code: &dyn ErasureCode, unit: usize, seed: u64) -> Stripe {
        let (k, m) = (code.data_shards(), code.parity_shards());
        let buf = |s: u64| {
            let mut v = vec![0u8; unit];
            fill(&mut v, seed.wrapping_mul(31).wrapping_add(s));
            v
        };
        let data: Vec<Vec<u8>> = (0..k as u64).map(buf).collect();
        let mut parity = vec![vec![0u8; unit]; m];
        {
            let d: Vec<&[u8]> = data.iter().map(Vec::as_slice).collect();
            let mut p: Vec<&mut [u8]> = parity.iter_mut().map(Vec::as_mut_slice).collect();
            code.encode(&d, &mut p).expect("encode");
        }
        Stripe {
            data,
            parity,
            lost: vec![vec![0u8; unit]; m],
            new: buf(99),
        }
    }
}

/// Best seconds per call over `rounds` rounds of at least 3 calls and at
/// least `min` each, after 2 warm-up calls. Short rounds and the best of
/// many keep out the time other processes take on a shared core.
fn time(rounds: usize, min: Duration, mut call: impl FnMut(usize)) -> f64 {
    let mut i = 0;
    for _ in 0..2 {
        call(i);
        i += 1;
    }
    let mut best = f64::INFINITY;
    for _ in 0..rounds {
        let start = Instant::now();
        let mut n = 0;
        while n < 3 || start.elapsed() < min {
            call(i);
            i += 1;
            n += 1;
        }
        best = best.min(start.elapsed().as_secs_f64() / n as f64);
    }
    best
}

fn gbps(bytes: usize, secs: f64) -> String {
    format!("{:.2}", bytes as f64 / secs / 1e9)
}

fn encode(code: &dyn ErasureCode, s: &mut Stripe) {
    let mut d: [&[u8]; SHARDS_MAX] = [&[]; SHARDS_MAX];
    for (r, v) in d.iter_mut().zip(&s.data) {
        *r = v;
    }
    let m = s.parity.len();
    let mut p: [&mut [u8]; 2] = [&mut [], &mut []];
    for (r, v) in p.iter_mut().zip(s.parity.iter_mut()) {
        *r = v;
    }
    code.encode(&d[..s.data.len()], &mut p[..m])
        .expect("encode");
}

/// Loses the first `lost` data units and rebuilds them in place.
fn reconstruct(code: &dyn ErasureCode, s: &mut Stripe, lost: usize) {
    let (k, m) = (s.data.len(), s.parity.len());
    let mut refs: [&mut [u8]; SHARDS_MAX] = std::array::from_fn(|_| &mut [][..]);
    let mut present = [true; SHARDS_MAX];
    let bufs = s
        .lost
        .iter_mut()
        .take(lost)
        .chain(s.data.iter_mut().skip(lost))
        .chain(s.parity.iter_mut());
    for (r, v) in refs.iter_mut().zip(bufs) {
        *r = v;
    }
    present[..lost].fill(false);
    code.reconstruct_in_place(&mut refs[..k + m], &present[..k + m], Fill::All)
        .expect("reconstruct");
}

fn update(code: &dyn ErasureCode, s: &mut Stripe) {
    let m = s.parity.len();
    let mut p: [&mut [u8]; 2] = [&mut [], &mut []];
    for (r, v) in p.iter_mut().zip(s.parity.iter_mut()) {
        *r = v;
    }
    code.update_parity(0, &s.data[0], &s.new, &mut p[..m])
        .expect("update");
}

fn xor(s: &mut Stripe) {
    let (first, rest) = s.data.split_first().expect("k >= 2");
    let p = &mut s.parity[0];
    p.copy_from_slice(first);
    for d in rest {
        for (p, d) in p.iter_mut().zip(d) {
            *p ^= d;
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let cold = args.iter().any(|a| a == "--cold");
    let flag = |name: &str, default: u64| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let round_us = flag("--round-us", 1000);
    let chunk = usize::try_from(flag("--chunk", CHUNK_DEFAULT as u64)).unwrap_or(CHUNK_DEFAULT);
    let rounds = usize::try_from(flag("--rounds", 200)).unwrap_or(200);
    let cold_bytes = usize::try_from(flag("--cold-mib", 1024)).unwrap_or(1024) << 20;
    let min = Duration::from_micros(round_us);

    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    #[cfg(target_arch = "x86_64")]
    let avx2 = is_x86_feature_detected!("avx2");
    #[cfg(not(target_arch = "x86_64"))]
    let avx2 = false;
    println!(
        "erasure stripe_bench: {cpu}, avx2 {avx2}, chunk {} B, {} data, best of {rounds} rounds of >= 3 calls and >= {round_us} us, GB/s = 1e9 B/s",
        chunk,
        if cold {
            format!("cold ({} MiB of stripes)", cold_bytes >> 20)
        } else {
            "hot (one stripe)".to_string()
        },
    );
    println!();
    println!(
        "| k+m | unit | encode | rec 1 | rec 2 | rec 1 Vec | update | xor (ref) | encode µs/stripe | update µs/unit |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for (k, m) in GEOMETRIES {
        let code: Arc<dyn ErasureCode> =
            Arc::new(ReedSolomon::with_chunk(k, m, chunk).expect("geometry"));
        let code = &*code;
        for unit in UNITS {
            let copies = if cold {
                (cold_bytes / ((k + m) * unit)).max(1)
            } else {
                1
            };
            let mut stripes: Vec<Stripe> = (0..copies)
                .map(|c| Stripe::new(code, unit, c as u64))
                .collect();
            let n = stripes.len();
            let t_enc = time(rounds, min, |i| {
                encode(code, black_box(&mut stripes[i % n]))
            });
            let t_rec1 = time(rounds, min, |i| {
                reconstruct(code, black_box(&mut stripes[i % n]), 1)
            });
            let t_rec2 = (m >= 2).then(|| {
                time(rounds, min, |i| {
                    reconstruct(code, black_box(&mut stripes[i % n]), 2)
                })
            });
            let mut shards: Vec<Vec<Option<Vec<u8>>>> = stripes
                .iter()
                .map(|s| s.data.iter().chain(&s.parity).cloned().map(Some).collect())
                .collect();
            let t_vec = time(rounds, min, |i| {
                let sh = &mut shards[i % n];
                sh[0] = None;
                code.reconstruct(black_box(sh)).expect("reconstruct");
            });
            drop(shards);
            let t_upd = time(rounds, min, |i| {
                update(code, black_box(&mut stripes[i % n]))
            });
            let t_xor =
                (m == 1).then(|| time(rounds, min, |i| xor(black_box(&mut stripes[i % n]))));
            let dash = || "—".to_string();
            println!(
                "| {k}+{m} | {} KiB | {} | {} | {} | {} | {} | {} | {:.2} | {:.2} |",
                unit >> 10,
                gbps(k * unit, t_enc),
                gbps(k * unit, t_rec1),
                t_rec2.map_or_else(dash, |t| gbps(k * unit, t)),
                gbps(k * unit, t_vec),
                gbps(unit, t_upd),
                t_xor.map_or_else(dash, |t| gbps(k * unit, t)),
                t_enc * 1e6,
                t_upd * 1e6,
            );
        }
    }
}
