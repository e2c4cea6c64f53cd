//! Crash test: kill -9 storaged during a verifying write workload, restart
//! it, and check that every write acknowledged before the last completed
//! FLUSH reads back exactly, later writes read back as one of the values
//! written, and no block fails its checksum.

use harness::nbd::NbdClient;
use harness::{Node, NodeOptions};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const VOL_BYTES: u64 = 64 << 20;
const BLOCKS: u64 = VOL_BYTES / 4096;

fn content(seq: u64, block: u64) -> Vec<u8> {
    let mut v = vec![0u8; 4096];
    v[..8].copy_from_slice(&seq.to_le_bytes());
    v[8..16].copy_from_slice(&block.to_le_bytes());
    let mut x = seq.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ block;
    for c in v[16..].chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        c.copy_from_slice(&x.to_le_bytes()[..c.len()]);
    }
    v
}

/// What the writer knows: per block, the last write covered by a completed
/// flush, and every write sent after it (acknowledged or not).
#[derive(Default)]
struct Ledger {
    durable: HashMap<u64, u64>,
    since_flush: HashMap<u64, Vec<u64>>,
    acked: u64,
    flushes: u64,
}

fn writer(
    addr: std::net::SocketAddr,
    ledger: Arc<Mutex<Ledger>>,
    first_seq: u64,
    stop: Arc<AtomicBool>,
) {
    let Ok(mut c) = NbdClient::connect(addr, "crash") else {
        return;
    };
    let mut rng = first_seq
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let mut seq = first_seq;
    let mut pending: Vec<(u64, u64)> = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let block = rng % BLOCKS;
        let two = rng.is_multiple_of(5) && block + 1 < BLOCKS;
        seq += 1;
        let mut data = content(seq, block);
        if two {
            data.extend(content(seq, block + 1));
        }
        {
            let mut l = ledger.lock().expect("ledger");
            l.since_flush.entry(block).or_default().push(seq);
            if two {
                l.since_flush.entry(block + 1).or_default().push(seq);
            }
        }
        if c.write(block * 4096, &data, rng.is_multiple_of(11))
            .is_err()
        {
            return;
        }
        ledger.lock().expect("ledger").acked += 1;
        pending.push((block, seq));
        if two {
            pending.push((block + 1, seq));
        }
        if pending.len() >= 24 {
            if c.flush().is_err() {
                return;
            }
            let mut l = ledger.lock().expect("ledger");
            for (b, s) in pending.drain(..) {
                l.durable.insert(b, s);
                if let Some(v) = l.since_flush.get_mut(&b) {
                    v.retain(|&x| x > s);
                }
            }
            l.flushes += 1;
        }
    }
}

fn verify(node: &Node, ledger: &Ledger) -> usize {
    let mut c = NbdClient::connect(node.nbd, "crash").expect("connect after restart");
    let mut checked = 0;
    for chunk in 0..VOL_BYTES / (1 << 20) {
        let data = c.read(chunk << 20, 1 << 20).unwrap_or_else(|e| {
            let log = node.log_text();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            panic!(
                "reading MiB {chunk} after the crash failed: {e:?} (checksum error?); storaged log tail:\n{}",
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            )
        });
        for i in 0..256u64 {
            let block = chunk * 256 + i;
            let got = &data[(i * 4096) as usize..((i + 1) * 4096) as usize];
            let mut allowed: Vec<Vec<u8>> = Vec::new();
            match ledger.durable.get(&block) {
                Some(&s) => allowed.push(content(s, block)),
                None => allowed.push(vec![0u8; 4096]),
            }
            for &s in ledger.since_flush.get(&block).into_iter().flatten() {
                allowed.push(content(s, block));
            }
            if !allowed.iter().any(|a| a[..] == got[..]) {
                let seq = u64::from_le_bytes(got[..8].try_into().expect("8 bytes"));
                panic!(
                    "block {block}: content (seq {seq}) is neither the flushed write {:?} nor a later one {:?}",
                    ledger.durable.get(&block),
                    ledger.since_flush.get(&block)
                );
            }
            if ledger.durable.contains_key(&block) {
                checked += 1;
            }
        }
    }
    checked
}

#[test]
fn kill_9_during_writes_loses_nothing_flushed_and_no_checksum_fails() {
    crash_rounds("uring");
}

#[test]
fn kill_9_during_writes_loses_nothing_flushed_with_the_sync_engine() {
    crash_rounds("sync");
}

fn crash_rounds(io_engine: &'static str) {
    let mut node = Node::start(NodeOptions {
        io_engine,
        ..NodeOptions::default()
    });
    node.create_volume("crash", "64MiB");
    let ledger = Arc::new(Mutex::new(Ledger::default()));
    for round in 0..3u64 {
        let stop = Arc::new(AtomicBool::new(false));
        let (addr, l, s) = (node.nbd, ledger.clone(), stop.clone());
        let w = std::thread::spawn(move || writer(addr, l, round * 1_000_000_000, s));
        // Let the workload get going (slow machines included), then kill
        // at a point that differs per round.
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            let target = 400 * (round + 1);
            let (acked, flushes) = {
                let l = ledger.lock().expect("ledger");
                (l.acked, l.flushes)
            };
            if acked >= target && flushes >= 5 * (round + 1) {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "round {round}: workload stalled at {acked} writes, {flushes} flushes; log:\n{}",
                node.log_text()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        std::thread::sleep(Duration::from_millis(50 + round * 70));
        node.kill9();
        stop.store(true, Ordering::Relaxed);
        w.join().expect("writer thread");
        node.restart();
        let l = ledger.lock().expect("ledger");
        assert!(
            l.flushes > 0 && l.acked > 100,
            "round {round}: workload too small ({} writes, {} flushes)",
            l.acked,
            l.flushes
        );
        let checked = verify(&node, &l);
        assert!(checked > 0, "round {round}: no flushed block was checked");
        eprintln!(
            "round {round}: {} writes acked, {} flushes, {checked} flushed blocks verified",
            l.acked, l.flushes
        );
    }
    // A clean stop after the crashes leaves disks whose every checksum holds.
    assert_eq!(node.stop(), Some(0));
    let storaged = harness::bin_dir().join("storaged");
    for d in node.disk_paths() {
        let out = harness::run_ok(
            storaged.to_str().expect("path"),
            &["check", "--disk", d.to_str().expect("path")],
        );
        assert!(
            out.contains(" 0 bad blocks"),
            "storaged check after crashes: {out}"
        );
    }
}
