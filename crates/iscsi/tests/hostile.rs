//! Generated hostile PDU streams against a live target: after each stream
//! the target still accepts a new session and serves it, and a bystander
//! session opened before all of them still works and still reads back
//! what it wrote.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use common::TestTarget;
use iscsi_target::TargetConfig;
use iscsi_target::pdu::{Bhs, Pdu};
use iscsi_target::wire::{WireLimits, read_pdu, write_pdu};
use proptest::prelude::*;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

const MIB: u64 = 1024 * 1024;

fn limits() -> WireLimits {
    WireLimits::login(1 << 20)
}

/// A minimal initiator: login straight to full feature phase.
struct Initiator {
    sock: TcpStream,
    cmd_sn: u32,
    itt: u32,
}

impl Initiator {
    async fn login(addr: SocketAddr, isid_tail: u8) -> Initiator {
        let mut sock = TcpStream::connect(addr).await.expect("connect");
        let mut b = Bhs::default();
        b.0[0] = 0x43;
        b.set_flags(0x80 | (1 << 2) | 3); // T, CSG=operational, NSG=full feature
        b.0[8..14].copy_from_slice(&[0x80, 0, 0, 0x12, 0x34, isid_tail]);
        b.set_itt(1);
        b.set_u32_at(24, 1);
        let text = b"InitiatorName=iqn.2026-01.test:hostile\0SessionType=Normal\0\
TargetName=iqn.2026-01.io.s2d:vol\0HeaderDigest=None\0DataDigest=None\0\
ImmediateData=Yes\0InitialR2T=No\0MaxRecvDataSegmentLength=65536\0";
        write_pdu(
            &mut sock,
            &Pdu::with_data(b, Bytes::from_static(text)),
            &limits(),
        )
        .await
        .expect("send login");
        let resp = read_pdu(&mut sock, &limits())
            .await
            .expect("login response");
        assert_eq!(resp.bhs.opcode(), 0x23);
        assert_eq!((resp.bhs.0[36], resp.bhs.0[37]), (0, 0), "login status");
        assert!(resp.bhs.final_bit(), "login must transit");
        Initiator {
            sock,
            cmd_sn: 1,
            itt: 100,
        }
    }

    /// Send a SCSI command (with optional immediate data) and wait for its
    /// status, collecting Data-In.
    async fn command(&mut self, cdb: &[u8], write: Option<&[u8]>, read_len: u32) -> (u8, Vec<u8>) {
        let mut b = Bhs::default();
        b.0[0] = 0x01;
        let mut flags = 0x80;
        if write.is_some() {
            flags |= 0x20;
        }
        if read_len > 0 {
            flags |= 0x40;
        }
        b.set_flags(flags);
        self.itt += 1;
        b.set_itt(self.itt);
        let edtl = write.map_or(read_len, |w| w.len() as u32);
        b.set_u32_at(20, edtl);
        b.set_u32_at(24, self.cmd_sn);
        self.cmd_sn += 1;
        b.0[32..32 + cdb.len()].copy_from_slice(cdb);
        let data = Bytes::copy_from_slice(write.unwrap_or(&[]));
        write_pdu(&mut self.sock, &Pdu::with_data(b, data), &limits())
            .await
            .expect("send");
        let mut got = Vec::new();
        loop {
            let p =
                tokio::time::timeout(Duration::from_secs(5), read_pdu(&mut self.sock, &limits()))
                    .await
                    .expect("response in time")
                    .expect("response");
            match p.bhs.opcode() {
                0x25 => {
                    got.extend_from_slice(&p.data);
                    if p.bhs.flags() & 0x01 != 0 {
                        return (p.bhs.0[3], got);
                    }
                }
                0x21 => return (p.bhs.0[3], got),
                0x20 => {} // NOP-In ping
                op => panic!("unexpected opcode {op:#x}"),
            }
        }
    }

    async fn test_unit_ready(&mut self) -> u8 {
        self.command(&[0u8; 6], None, 0).await.0
    }
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

/// A PDU with a random header and a data segment that may lie about its
/// length, as raw bytes.
fn hostile_pdu() -> impl Strategy<Value = Vec<u8>> {
    (
        prop_oneof![
            Just(0x00u8),
            Just(0x01),
            Just(0x02),
            Just(0x04),
            Just(0x05),
            Just(0x06),
            Just(0x10),
            any::<u8>()
        ],
        any::<u8>(),
        proptest::collection::vec(any::<u8>(), 46),
        proptest::collection::vec(any::<u8>(), 0..600),
        any::<bool>(),
    )
        .prop_map(|(op, flags, rest, data, honest)| {
            let mut bhs = vec![op, flags];
            bhs.extend(rest);
            if honest {
                // Honest lengths: no AHS, data length as sent.
                bhs[4] = 0;
                let l = data.len();
                bhs[5] = (l >> 16) as u8;
                bhs[6] = (l >> 8) as u8;
                bhs[7] = l as u8;
            }
            let mut v = bhs;
            v.extend(&data);
            while v.len() % 4 != 0 {
                v.push(0);
            }
            v
        })
}

async fn assert_serving(addr: SocketAddr) {
    let mut i = Initiator::login(addr, 0xee).await;
    assert_eq!(
        i.test_unit_ready().await,
        0,
        "target no longer serves new sessions"
    );
}

async fn blast(addr: SocketAddr, login_first: bool, stream: Vec<Vec<u8>>) {
    let mut sock = if login_first {
        Initiator::login(addr, 0x01).await.sock
    } else {
        TcpStream::connect(addr).await.expect("connect")
    };
    for p in stream {
        if sock.write_all(&p).await.is_err() {
            break;
        }
    }
    // Read whatever comes back until the target closes or goes quiet.
    let _ = tokio::time::timeout(Duration::from_millis(200), async {
        let l = WireLimits::login(1 << 24);
        while read_pdu(&mut sock, &l).await.is_ok() {}
    })
    .await;
}

#[test]
fn hostile_streams_leave_the_target_serving() {
    let t = TestTarget::start(&[("vol", 16 * MIB)], TargetConfig::default());
    let addr = t.addr;
    let rt = rt();
    let mut bystander = rt.block_on(async {
        let mut b = Initiator::login(addr, 0x77).await;
        // WRITE(10) one 512-byte block at LBA 7 with immediate data.
        let cdb = [0x2a, 0, 0, 0, 0, 7, 0, 0, 1, 0];
        assert_eq!(b.command(&cdb, Some(&[0x5a; 512]), 0).await.0, 0);
        b
    });
    let mut runner = proptest::test_runner::TestRunner::new(proptest::test_runner::Config {
        cases: 48,
        failure_persistence: None,
        ..Default::default()
    });
    let strategy = (
        any::<bool>(),
        proptest::collection::vec(hostile_pdu(), 1..6),
    );
    runner
        .run(&strategy, |(login_first, stream)| {
            rt.block_on(async {
                blast(addr, login_first, stream).await;
                assert_serving(addr).await;
            });
            Ok(())
        })
        .expect("target survived every stream");
    rt.block_on(async {
        // READ(10) the block back on the bystander session.
        // A generated stream may have reset the LU: a unit attention is
        // then reported once.
        let cdb = [0x28, 0, 0, 0, 0, 7, 0, 0, 1, 0];
        let mut r = bystander.command(&cdb, None, 512).await;
        if r.0 == 2 {
            r = bystander.command(&cdb, None, 512).await;
        }
        let (status, data) = r;
        assert_eq!(status, 0);
        assert_eq!(
            data,
            vec![0x5a; 512],
            "bystander's acknowledged write changed"
        );
    });
}

/// Writes past the negotiated burst limits and Data-Out for unknown tasks
/// end at most the offending connection.
#[test]
fn data_out_past_limits_is_refused() {
    let t = TestTarget::start(&[("vol", 16 * MIB)], TargetConfig::default());
    let addr = t.addr;
    rt().block_on(async {
        let mut i = Initiator::login(addr, 0x02).await;
        // WRITE(10) of 2 blocks announcing 1024 bytes, then a Data-Out at
        // offset 4096 (past the expected length).
        let mut b = Bhs::default();
        b.0[0] = 0x01;
        b.set_flags(0x20); // W, not final: unsolicited data follows
        b.set_itt(9);
        b.set_u32_at(20, 1024);
        b.set_u32_at(24, 1);
        b.0[32..42].copy_from_slice(&[0x2a, 0, 0, 0, 0, 0, 0, 0, 2, 0]);
        write_pdu(&mut i.sock, &Pdu::new(b), &limits())
            .await
            .expect("send");
        let mut d = Bhs::default();
        d.0[0] = 0x05;
        d.set_flags(0x80);
        d.set_itt(9);
        d.set_ttt(0xffff_ffff);
        d.set_u32_at(40, 4096);
        write_pdu(&mut i.sock, &Pdu::with_data(d, vec![1u8; 512]), &limits())
            .await
            .expect("send");
        // The target rejects and closes this connection.
        let closed = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                match read_pdu(&mut i.sock, &limits()).await {
                    Ok(p) => assert_eq!(p.bhs.opcode(), 0x3f, "only a Reject may come back"),
                    Err(_) => return,
                }
            }
        })
        .await;
        assert!(closed.is_ok(), "connection not closed");
        assert_serving(addr).await;
    });
}

/// The target pings an idle initiator (NOP-In) and drops it when the ping
/// goes unanswered; an answered ping keeps the session.
#[test]
fn nop_keepalive() {
    let cfg = TargetConfig {
        nop_interval: Duration::from_millis(300),
        nop_timeout: Duration::from_millis(300),
        ..TargetConfig::default()
    };
    let t = TestTarget::start(&[("vol", 16 * MIB)], cfg);
    let addr = t.addr;
    rt().block_on(async {
        // Answered pings: still alive after several intervals.
        let mut i = Initiator::login(addr, 0x03).await;
        let deadline = tokio::time::Instant::now() + Duration::from_millis(1500);
        let mut pings = 0;
        while tokio::time::Instant::now() < deadline {
            let Ok(p) =
                tokio::time::timeout(Duration::from_millis(200), read_pdu(&mut i.sock, &limits()))
                    .await
            else {
                continue;
            };
            let p = p.expect("connection kept");
            assert_eq!(p.bhs.opcode(), 0x20);
            assert_eq!(p.bhs.itt(), 0xffff_ffff);
            pings += 1;
            let mut b = Bhs::default();
            b.0[0] = 0x40; // immediate NOP-Out
            b.set_flags(0x80);
            b.set_itt(0xffff_ffff);
            b.set_ttt(p.bhs.ttt());
            b.set_u32_at(24, i.cmd_sn);
            write_pdu(&mut i.sock, &Pdu::new(b), &limits())
                .await
                .expect("pong");
        }
        assert!(pings >= 2, "expected pings, got {pings}");
        assert_eq!(i.test_unit_ready().await, 0);
        // Unanswered: the connection is closed.
        let mut j = Initiator::login(addr, 0x04).await;
        let closed = tokio::time::timeout(Duration::from_secs(3), async {
            while read_pdu(&mut j.sock, &limits()).await.is_ok() {}
        })
        .await;
        assert!(closed.is_ok(), "silent initiator not dropped");
    });
}

/// Shutdown stops accepting, lets running commands finish, closes the
/// sessions and returns.
#[test]
fn shutdown_returns_with_sessions_open() {
    let t = TestTarget::start(&[("vol", 16 * MIB)], TargetConfig::default());
    let addr = t.addr;
    let rt = rt();
    let mut i = rt.block_on(async {
        let mut i = Initiator::login(addr, 0x05).await;
        assert_eq!(i.test_unit_ready().await, 0);
        // A half-done login must not hold shutdown up either.
        i
    });
    let half = rt.block_on(async { TcpStream::connect(addr).await.expect("connect") });
    let start = std::time::Instant::now();
    drop(t);
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "shutdown took {:?}",
        start.elapsed()
    );
    rt.block_on(async {
        let r =
            tokio::time::timeout(Duration::from_secs(2), read_pdu(&mut i.sock, &limits())).await;
        assert!(matches!(r, Ok(Err(_))), "session not closed at shutdown");
        assert!(
            TcpStream::connect(addr).await.is_err(),
            "still accepting after shutdown"
        );
    });
    drop(half);
}
