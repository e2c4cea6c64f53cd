//! The transmission phase, checked with a raw client: every command, the
//! flags, structured replies, malformed requests, concurrency, limits and
//! shutdown.

mod common;

use std::sync::Arc;
use std::sync::atomic::Ordering::SeqCst;
use std::time::Duration;

use common::*;
use nbd_server::ServerConfig;
use nbd_server::proto::*;

const SIZE: u64 = 4 << 20;

async fn one_volume(config: ServerConfig) -> (TestServer, Arc<MemVolume>) {
    let vol = MemVolume::new("vol", SIZE);
    (TestServer::start(vec![Arc::clone(&vol)], config).await, vol)
}

/// Wait until `cond` holds, or fail with `what`.
async fn wait_until(what: &str, cond: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + TEST_TIMEOUT;
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting until {what}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn descriptors(chunk: &Reply) -> Vec<(u32, u32)> {
    let Reply::Chunk {
        ty, payload, flags, ..
    } = chunk
    else {
        panic!("not a chunk: {chunk:?}")
    };
    assert_eq!(
        *ty, REPLY_TYPE_BLOCK_STATUS,
        "block status chunk expected: {chunk:?}"
    );
    assert_ne!(
        flags & REPLY_FLAG_DONE,
        0,
        "single block status chunk must be DONE"
    );
    payload[4..]
        .chunks_exact(8)
        .map(|d| {
            (
                u32::from_be_bytes(d[0..4].try_into().expect("4")),
                u32::from_be_bytes(d[4..8].try_into().expect("4")),
            )
        })
        .collect()
}

#[tokio::test]
async fn unaligned_write_then_read_round_trips_with_simple_replies() {
    let (srv, vol) = one_volume(Default::default()).await;
    let (mut c, _) = RawClient::open(srv.addr, "vol", false, false).await;
    let data = pattern(3, 5000);
    c.write(0, 1, 1000, &data).await;
    assert_eq!(c.read_reply(|_| 0).await, Reply::ok(1, vec![]));
    assert_eq!(
        vol.contents(1000, 5000),
        data,
        "volume holds the written bytes"
    );
    assert_eq!(
        vol.contents(0, 1000),
        vec![0; 1000],
        "bytes before the write untouched"
    );
    c.request(0, CMD_READ, 2, 1000, 5000).await;
    let r = c.read_reply(|_| 5000).await;
    assert_eq!(
        r,
        Reply::Simple {
            error: 0,
            cookie: 2,
            data
        },
        "read returns the write"
    );
    srv.stop().await;
}

#[tokio::test]
async fn structured_read_reports_zero_blocks_as_holes() {
    let (srv, vol) = one_volume(Default::default()).await;
    vol.fill(4096, &pattern(9, 4096));
    vol.fill(5 * 4096 + 100, &pattern(1, 10));
    let (mut c, _) = RawClient::open(srv.addr, "vol", true, false).await;
    c.request(0, CMD_READ, 1, 0, 8 * 4096).await;
    let chunks = c.read_chunks().await;
    let kinds: Vec<u16> = chunks
        .iter()
        .map(|r| match r {
            Reply::Chunk { ty, .. } => *ty,
            other => panic!("simple reply to a structured read: {other:?}"),
        })
        .collect();
    use nbd_server::proto::{REPLY_TYPE_OFFSET_DATA as D, REPLY_TYPE_OFFSET_HOLE as H};
    assert_eq!(kinds, vec![H, D, H, D, H], "hole/data layout of the read");
    let data = assemble_read(&chunks, 0, 8 * 4096).expect("read succeeds");
    assert_eq!(
        data,
        vol.contents(0, 8 * 4096),
        "reassembled read matches the volume"
    );

    // Unaligned read: edges are partial blocks and stay data.
    c.request(0, CMD_READ, 2, 4000, 3 * 4096).await;
    let chunks = c.read_chunks().await;
    let data = assemble_read(&chunks, 4000, 3 * 4096).expect("read succeeds");
    assert_eq!(
        data,
        vol.contents(4000, 3 * 4096),
        "unaligned structured read"
    );
    srv.stop().await;
}

#[tokio::test]
async fn structured_read_with_df_sends_one_data_chunk() {
    let (srv, vol) = one_volume(Default::default()).await;
    vol.fill(8192, b"xyz");
    let (mut c, session) = RawClient::open(srv.addr, "vol", true, false).await;
    assert_ne!(
        session.flags & FLAG_SEND_DF,
        0,
        "DF advertised with structured replies"
    );
    c.request(CMD_FLAG_DF, CMD_READ, 1, 0, 4 * 4096).await;
    let chunks = c.read_chunks().await;
    assert_eq!(
        chunks.len(),
        1,
        "DF: a single chunk: {} chunks",
        chunks.len()
    );
    let Reply::Chunk { ty, flags, .. } = &chunks[0] else {
        panic!("chunk expected")
    };
    assert_eq!((*ty, *flags), (REPLY_TYPE_OFFSET_DATA, REPLY_FLAG_DONE));
    assert_eq!(
        assemble_read(&chunks, 0, 4 * 4096).expect("ok"),
        vol.contents(0, 4 * 4096)
    );
    srv.stop().await;
}

#[tokio::test]
async fn fua_flush_and_trim_with_fua_reach_the_volume() {
    let (srv, vol) = one_volume(Default::default()).await;
    let (mut c, _) = RawClient::open(srv.addr, "vol", false, false).await;
    c.write(CMD_FLAG_FUA, 1, 0, &[1; 4096]).await;
    assert_eq!(reply_errno(&c.read_reply(|_| 0).await), 0);
    assert_eq!(
        vol.fua_writes.load(SeqCst),
        1,
        "FUA flag passed to the volume"
    );
    c.request(0, CMD_FLUSH, 2, 0, 0).await;
    assert_eq!(reply_errno(&c.read_reply(|_| 0).await), 0);
    assert_eq!(
        vol.flushes.load(SeqCst),
        1,
        "FLUSH calls the volume's flush"
    );
    c.request(CMD_FLAG_FUA, CMD_TRIM, 3, 0, 4096).await;
    assert_eq!(reply_errno(&c.read_reply(|_| 0).await), 0);
    assert_eq!(
        vol.flushes.load(SeqCst),
        2,
        "TRIM with FUA is followed by a flush"
    );
    srv.stop().await;
}

#[tokio::test]
async fn trim_punches_a_hole_that_block_status_reports() {
    let (srv, vol) = one_volume(Default::default()).await;
    let (mut c, _) = RawClient::open(srv.addr, "vol", true, true).await;
    c.write(0, 1, 0, &pattern(5, 3 * 4096)).await;
    assert_eq!(reply_errno(&c.read_reply(|_| 0).await), 0);
    c.request(0, CMD_TRIM, 2, 4096, 4096).await;
    assert_eq!(reply_errno(&c.read_reply(|_| 0).await), 0);
    assert!(!vol.is_allocated(1), "trimmed block released");
    c.request(0, CMD_BLOCK_STATUS, 3, 0, 4 * 4096).await;
    let chunks = c.read_chunks().await;
    assert_eq!(chunks.len(), 1, "one chunk per context");
    let hz = STATE_HOLE | STATE_ZERO;
    assert_eq!(
        descriptors(&chunks[0]),
        vec![(4096, 0), (4096, hz), (4096, 0), (4096, hz)]
    );

    c.request(CMD_FLAG_REQ_ONE, CMD_BLOCK_STATUS, 4, 4096, 3 * 4096)
        .await;
    let chunks = c.read_chunks().await;
    assert_eq!(
        descriptors(&chunks[0]),
        vec![(4096, hz)],
        "REQ_ONE: one descriptor"
    );
    srv.stop().await;
}

#[tokio::test]
async fn block_status_of_a_huge_range_answers_a_bounded_prefix() {
    let vol = MemVolume::new("big", 8 << 30);
    let srv = TestServer::start(vec![Arc::clone(&vol)], Default::default()).await;
    vol.fill(0, &[1; 4096]);
    let (mut c, _) = RawClient::open(srv.addr, "big", true, true).await;
    c.request(0, CMD_BLOCK_STATUS, 1, 0, u32::MAX).await;
    let chunks = c.read_chunks().await;
    let d = descriptors(&chunks[0]);
    let covered: u64 = d.iter().map(|&(l, _)| u64::from(l)).sum();
    assert_eq!(d[0], (4096, 0), "first block is data");
    assert!(
        covered <= 1 << 30,
        "reply covers {covered} bytes, more than the 1 GiB bound"
    );
    assert!(
        covered > 4096,
        "reply must still cover the hole after the data"
    );
    srv.stop().await;
}

#[tokio::test]
async fn write_zeroes_honours_no_hole_and_fast_zero() {
    let (srv, vol) = one_volume(Default::default()).await;
    vol.fill(0, &pattern(7, 4 * 4096));
    let (mut c, _) = RawClient::open(srv.addr, "vol", true, true).await;

    c.request(CMD_FLAG_NO_HOLE, CMD_WRITE_ZEROES, 1, 0, 4096)
        .await;
    assert_eq!(reply_errno(&c.read_reply(|_| 0).await), 0);
    assert!(vol.is_allocated(0), "NO_HOLE keeps the block allocated");
    assert_eq!(vol.contents(0, 4096), vec![0; 4096], "NO_HOLE still zeroes");

    c.request(0, CMD_WRITE_ZEROES, 2, 4096, 4096).await;
    assert_eq!(reply_errno(&c.read_reply(|_| 0).await), 0);
    assert!(
        !vol.is_allocated(1),
        "without NO_HOLE whole blocks are unmapped"
    );

    let before = vol.mutations.load(SeqCst);
    c.request(
        CMD_FLAG_FAST_ZERO | CMD_FLAG_NO_HOLE,
        CMD_WRITE_ZEROES,
        3,
        8192,
        4096,
    )
    .await;
    let chunks = c.read_chunks().await;
    assert_eq!(
        reply_errno(&chunks[0]),
        ENOTSUP,
        "FAST_ZERO + NO_HOLE cannot be fast"
    );
    assert_eq!(
        vol.mutations.load(SeqCst),
        before,
        "failed fast zero touched nothing"
    );
    assert_eq!(
        vol.contents(8192, 4096),
        pattern(7, 4 * 4096)[8192..12288].to_vec()
    );

    c.request(CMD_FLAG_FAST_ZERO, CMD_WRITE_ZEROES, 4, 8192, 8192)
        .await;
    assert_eq!(
        reply_errno(&c.read_reply(|_| 0).await),
        0,
        "FAST_ZERO by unmapping"
    );
    assert_eq!(
        vol.allocated_blocks(),
        1,
        "only the NO_HOLE block stays allocated"
    );
    srv.stop().await;
}

#[tokio::test]
async fn requests_past_the_end_fail_and_change_nothing() {
    let (srv, vol) = one_volume(Default::default()).await;
    let (mut c, _) = RawClient::open(srv.addr, "vol", false, false).await;
    c.write(0, 1, SIZE - 100, &[9; 200]).await;
    assert_eq!(
        reply_errno(&c.read_reply(|_| 0).await),
        ENOSPC,
        "write past the end"
    );
    for (cmd, offset, len, errno) in [
        (CMD_READ, SIZE, 1, EINVAL),
        (CMD_READ, u64::MAX - 10, 4096, EINVAL),
        (CMD_TRIM, SIZE - 4096, 8192, EINVAL),
        (CMD_WRITE_ZEROES, u64::MAX, 1, ENOSPC),
        (CMD_CACHE, SIZE, 4096, EINVAL),
    ] {
        c.request(0, cmd, 2, offset, len).await;
        let r = c.read_reply(|_| len as usize).await;
        assert_eq!(
            reply_errno(&r),
            errno,
            "{} at {offset} +{len}",
            command_name(cmd)
        );
    }
    assert_eq!(
        vol.mutations.load(SeqCst),
        0,
        "nothing written by refused requests"
    );
    assert_eq!(
        vol.entered.load(SeqCst),
        0,
        "refused requests never reach the volume"
    );
    // The write's payload was skipped: the stream is still in sync.
    c.request(0, CMD_READ, 3, SIZE - 4, 4).await;
    assert_eq!(c.read_reply(|_| 4).await, Reply::ok(3, vec![0; 4]));
    srv.stop().await;
}

#[tokio::test]
async fn oversized_payloads_are_refused_and_the_session_goes_on() {
    let (srv, vol) = one_volume(Default::default()).await;
    let (mut c, _) = RawClient::open(srv.addr, "vol", false, false).await;
    let big = PAYLOAD_MAX + 1;
    c.request(0, CMD_READ, 1, 0, big).await;
    assert_eq!(
        reply_errno(&c.read_reply(|_| 0).await),
        EINVAL,
        "simple oversized read"
    );
    c.write(0, 2, 0, &vec![1; big as usize]).await;
    assert_eq!(
        reply_errno(&c.read_reply(|_| 0).await),
        EINVAL,
        "oversized write"
    );
    assert_eq!(
        vol.mutations.load(SeqCst),
        0,
        "oversized write stored nothing"
    );
    c.write(0, 3, 0, b"ok").await;
    assert_eq!(
        reply_errno(&c.read_reply(|_| 0).await),
        0,
        "stream in sync after skipping"
    );
    assert_eq!(vol.contents(0, 2), b"ok");

    let (mut s, _) = RawClient::open(srv.addr, "vol", true, false).await;
    s.request(0, CMD_READ, 4, 0, big).await;
    let chunks = s.read_chunks().await;
    assert_eq!(
        reply_errno(&chunks[0]),
        EOVERFLOW,
        "structured oversized read"
    );
    srv.stop().await;
}

#[tokio::test]
async fn unknown_commands_and_flags_get_einval() {
    let (srv, vol) = one_volume(Default::default()).await;
    let (mut c, _) = RawClient::open(srv.addr, "vol", true, true).await;
    for (flags, cmd) in [
        (0, 8u16),
        (0, 0xffff),
        (1 << 9, CMD_FLUSH),
        (CMD_FLAG_NO_HOLE, CMD_WRITE),
        (CMD_FLAG_REQ_ONE, CMD_READ),
        (CMD_FLAG_DF, CMD_BLOCK_STATUS),
        (CMD_FLAG_FAST_ZERO, CMD_TRIM),
    ] {
        c.request(flags, cmd, 1, 0, 0).await;
        let chunks = c.read_chunks().await;
        assert_eq!(
            reply_errno(&chunks[0]),
            EINVAL,
            "command {cmd} flags {flags:#x}"
        );
    }
    // A refused WRITE still has its payload skipped.
    c.write(CMD_FLAG_DF, 2, 0, &[7; 100]).await;
    assert_eq!(reply_errno(&c.read_chunks().await[0]), EINVAL);
    assert_eq!(vol.mutations.load(SeqCst), 0);
    c.request(0, CMD_CACHE, 3, 0, 4096).await;
    assert_eq!(reply_errno(&c.read_reply(|_| 0).await), 0, "CACHE succeeds");
    srv.stop().await;
}

#[tokio::test]
async fn zero_length_requests_succeed_without_reaching_the_volume() {
    let (srv, vol) = one_volume(Default::default()).await;
    let (mut c, _) = RawClient::open(srv.addr, "vol", true, false).await;
    for cmd in [CMD_READ, CMD_WRITE, CMD_TRIM, CMD_WRITE_ZEROES, CMD_CACHE] {
        c.request(0, cmd, 1, 4096, 0).await;
        let chunks = c.read_chunks().await;
        match &chunks[..] {
            [Reply::Simple { error: 0, .. }] => {}
            [
                Reply::Chunk {
                    ty: REPLY_TYPE_NONE,
                    flags: REPLY_FLAG_DONE,
                    ..
                },
            ] => {}
            other => panic!("{}: unexpected reply {other:?}", command_name(cmd)),
        }
    }
    assert_eq!(vol.entered.load(SeqCst), 0);
    srv.stop().await;
}

#[tokio::test]
async fn volume_errors_become_nbd_errors_and_the_session_goes_on() {
    let (srv, vol) = one_volume(Default::default()).await;
    let (mut simple, _) = RawClient::open(srv.addr, "vol", false, false).await;
    let (mut structured, _) = RawClient::open(srv.addr, "vol", true, false).await;
    vol.fail.store(true, SeqCst);
    simple.request(0, CMD_READ, 1, 0, 4096).await;
    assert_eq!(
        simple.read_reply(|_| 4096).await,
        Reply::Simple {
            error: EIO,
            cookie: 1,
            data: vec![]
        }
    );
    structured.request(0, CMD_READ, 2, 0, 4096).await;
    let chunks = structured.read_chunks().await;
    assert_eq!(
        assemble_read(&chunks, 0, 4096),
        Err(EIO),
        "error chunk for a failed read"
    );
    let Reply::Chunk { payload, .. } = &chunks[0] else {
        panic!("chunk expected")
    };
    assert!(payload.len() > 6, "error chunk carries a message");
    structured.request(0, CMD_FLUSH, 3, 0, 0).await;
    assert_eq!(
        reply_errno(&structured.read_chunks().await[0]),
        EIO,
        "failed flush"
    );
    vol.fail.store(false, SeqCst);
    simple.request(0, CMD_READ, 4, 0, 8).await;
    assert_eq!(simple.read_reply(|_| 8).await, Reply::ok(4, vec![0; 8]));
    srv.stop().await;
}

#[tokio::test]
async fn bad_request_magic_closes_only_that_connection() {
    let (srv, _vol) = one_volume(Default::default()).await;
    let (mut good, _) = RawClient::open(srv.addr, "vol", false, false).await;
    let (mut bad, _) = RawClient::open(srv.addr, "vol", false, false).await;
    bad.send(&[0x12u8; 28]).await;
    assert!(bad.closed_by_server().await, "bad magic must disconnect");
    good.write(0, 1, 0, b"still here").await;
    assert_eq!(
        reply_errno(&good.read_reply(|_| 0).await),
        0,
        "other connection unaffected"
    );
    assert_eq!(srv.server.stats().snapshot().protocol_errors_total, 1);
    srv.stop().await;
}

#[tokio::test]
async fn replies_go_out_of_order_when_an_earlier_request_is_slow() {
    let (srv, vol) = one_volume(Default::default()).await;
    let (mut c, _) = RawClient::open(srv.addr, "vol", false, false).await;
    vol.pause(Pause::At(0));
    c.request(0, CMD_READ, 1, 0, 4096).await;
    c.request(0, CMD_READ, 2, 4096, 4096).await;
    let first = c.read_reply(|_| 4096).await;
    assert_eq!(
        first.cookie(),
        2,
        "the fast request must not wait for the slow one"
    );
    vol.resume();
    let second = c.read_reply(|_| 4096).await;
    assert_eq!(second.cookie(), 1);
    srv.stop().await;
}

#[tokio::test]
async fn requests_in_flight_are_bounded_per_connection() {
    let cfg = ServerConfig {
        inflight_requests_max: 4,
        ..Default::default()
    };
    let (srv, vol) = one_volume(cfg).await;
    let (mut c, _) = RawClient::open(srv.addr, "vol", false, false).await;
    vol.pause(Pause::Everything);
    for i in 0..20u64 {
        c.write(0, i, i * 4096, &[i as u8; 4096]).await;
    }
    wait_until("4 requests reached the volume", || {
        vol.entered.load(SeqCst) == 4
    })
    .await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        vol.entered.load(SeqCst),
        4,
        "more than inflight_requests_max admitted"
    );
    vol.resume();
    let mut cookies: Vec<u64> = Vec::new();
    for _ in 0..20 {
        let r = c.read_reply(|_| 0).await;
        assert_eq!(reply_errno(&r), 0);
        cookies.push(r.cookie());
    }
    cookies.sort_unstable();
    assert_eq!(
        cookies,
        (0..20).collect::<Vec<_>>(),
        "every request answered once"
    );
    assert!(
        vol.inflight_max.load(SeqCst) <= 4,
        "volume saw more than 4 at once"
    );
    srv.stop().await;
}

#[tokio::test]
async fn payload_bytes_in_flight_are_bounded_per_connection() {
    let cfg = ServerConfig {
        inflight_bytes_max: PAYLOAD_MAX as usize,
        ..Default::default()
    };
    let vol = MemVolume::new("vol", 64 << 20);
    let srv = TestServer::start(vec![Arc::clone(&vol)], cfg).await;
    let (c, _) = RawClient::open(srv.addr, "vol", false, false).await;
    vol.pause(Pause::Everything);
    let half = vec![3u8; (PAYLOAD_MAX / 2) as usize]; // two fit, a third does not
    // Send from another task: the server stops reading the third payload.
    let RawClient { rd, mut wr } = c;
    let sender = tokio::spawn(async move {
        for i in 0..3u64 {
            let h = RequestHeader {
                flags: 0,
                command: CMD_WRITE,
                cookie: i,
                offset: 0,
                len: half.len() as u32,
            };
            tokio::io::AsyncWriteExt::write_all(&mut wr, &h.encode())
                .await
                .expect("send header");
            tokio::io::AsyncWriteExt::write_all(&mut wr, &half)
                .await
                .expect("send payload");
        }
        wr
    });
    wait_until("2 writes reached the volume", || {
        vol.entered.load(SeqCst) == 2
    })
    .await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        vol.entered.load(SeqCst),
        2,
        "a third 16 MiB write was admitted"
    );
    vol.resume();
    let wr = sender.await.expect("payload sender");
    let mut c = RawClient { rd, wr };
    for _ in 0..3 {
        assert_eq!(reply_errno(&c.read_reply(|_| 0).await), 0);
    }
    srv.stop().await;
}

#[tokio::test]
async fn payload_bytes_in_flight_are_bounded_across_connections() {
    let cfg = ServerConfig {
        inflight_bytes_max: PAYLOAD_MAX as usize,
        server_inflight_bytes_max: PAYLOAD_MAX as usize,
        ..Default::default()
    };
    let vol = MemVolume::new("vol", 64 << 20);
    let srv = TestServer::start(vec![Arc::clone(&vol)], cfg).await;
    let (a, _) = RawClient::open(srv.addr, "vol", false, false).await;
    let (mut b, _) = RawClient::open(srv.addr, "vol", false, false).await;
    vol.pause(Pause::At(0));
    // Connection a fills the server-wide limit with a paused 32 MiB write.
    let RawClient { rd, mut wr } = a;
    let sender = tokio::spawn(async move {
        let big = vec![1u8; PAYLOAD_MAX as usize];
        let h = RequestHeader {
            flags: 0,
            command: CMD_WRITE,
            cookie: 1,
            offset: 0,
            len: PAYLOAD_MAX,
        };
        tokio::io::AsyncWriteExt::write_all(&mut wr, &h.encode())
            .await
            .expect("send header");
        tokio::io::AsyncWriteExt::write_all(&mut wr, &big)
            .await
            .expect("send payload");
        wr
    });
    wait_until("the big write reached the volume", || {
        vol.entered.load(SeqCst) == 1
    })
    .await;
    b.write(0, 2, 1 << 20, &[2; 4096]).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        vol.entered.load(SeqCst),
        1,
        "server-wide byte limit let a second write in"
    );
    vol.resume();
    assert_eq!(
        reply_errno(&b.read_reply(|_| 0).await),
        0,
        "second connection served after"
    );
    let mut a = RawClient {
        rd,
        wr: sender.await.expect("payload sender"),
    };
    assert_eq!(reply_errno(&a.read_reply(|_| 0).await), 0);
    srv.stop().await;
}

#[tokio::test]
async fn disc_sends_the_replies_of_requests_in_flight_first() {
    let (srv, vol) = one_volume(Default::default()).await;
    let (mut c, _) = RawClient::open(srv.addr, "vol", false, false).await;
    vol.pause(Pause::Everything);
    c.write(0, 1, 0, b"last words").await;
    c.request(0, CMD_DISC, 2, 0, 0).await;
    wait_until("the write reached the volume", || {
        vol.entered.load(SeqCst) == 1
    })
    .await;
    vol.resume();
    assert_eq!(c.read_reply(|_| 0).await, Reply::ok(1, vec![]));
    assert!(c.closed_by_server().await, "connection closed after DISC");
    assert_eq!(vol.contents(0, 10), b"last words");
    srv.stop().await;
}

#[tokio::test]
async fn shutdown_finishes_requests_in_flight_then_serve_returns() {
    let (srv, vol) = one_volume(Default::default()).await;
    let (mut c, _) = RawClient::open(srv.addr, "vol", false, false).await;
    vol.pause(Pause::Everything);
    c.write(0, 1, 0, b"in flight").await;
    wait_until("the write reached the volume", || {
        vol.entered.load(SeqCst) == 1
    })
    .await;
    srv.shutdown.cancel();
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(
        !srv.task.is_finished(),
        "serve returned before the in-flight write finished"
    );
    assert!(
        tokio::net::TcpStream::connect(srv.addr).await.is_err(),
        "still accepting"
    );
    vol.resume();
    assert_eq!(c.read_reply(|_| 0).await, Reply::ok(1, vec![]));
    assert!(c.closed_by_server().await, "connection closed at shutdown");
    srv.stop().await;
    assert_eq!(vol.contents(0, 9), b"in flight");
}

#[tokio::test]
async fn shutdown_cuts_connections_that_outlive_the_grace_period() {
    let cfg = ServerConfig {
        shutdown_grace: Duration::from_millis(100),
        ..Default::default()
    };
    let (srv, vol) = one_volume(cfg).await;
    let (mut c, _) = RawClient::open(srv.addr, "vol", false, false).await;
    vol.pause(Pause::Everything);
    c.write(0, 1, 0, b"stuck").await;
    wait_until("the write reached the volume", || {
        vol.entered.load(SeqCst) == 1
    })
    .await;
    let stats = srv.server.stats();
    srv.stop().await;
    assert!(c.closed_by_server().await, "cut connection must be closed");
    assert_eq!(
        stats.snapshot().connections_active,
        0,
        "no connection left active"
    );
}

#[tokio::test]
async fn a_flushed_write_is_visible_on_another_connection() {
    let (srv, _vol) = one_volume(Default::default()).await;
    let (mut a, sa) = RawClient::open(srv.addr, "vol", false, false).await;
    let (mut b, _) = RawClient::open(srv.addr, "vol", true, false).await;
    assert_ne!(sa.flags & FLAG_CAN_MULTI_CONN, 0, "multi-conn advertised");
    a.write(0, 1, 12345, b"shared").await;
    assert_eq!(reply_errno(&a.read_reply(|_| 0).await), 0);
    a.request(0, CMD_FLUSH, 2, 0, 0).await;
    assert_eq!(reply_errno(&a.read_reply(|_| 0).await), 0);
    b.request(0, CMD_READ, 3, 12345, 6).await;
    assert_eq!(
        assemble_read(&b.read_chunks().await, 12345, 6).expect("read"),
        b"shared"
    );
    let snap = srv.server.stats().snapshot();
    assert_eq!(snap.written_bytes_total, 6);
    assert_eq!(snap.read_bytes_total, 6);
    srv.stop().await;
}
