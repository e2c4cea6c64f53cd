//! `TcpTransport` against `serve` (and against scripted fake peers) over
//! loopback sockets.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use block_api::AlignedBuf;
use common::{
    TestServer, VOLUME_300MS, VOLUME_GATED, VOLUME_JITTER, VOLUME_PANIC, VOLUME_SLOW,
    VOLUME_WRONG_REPLY, start_server, start_server_on, unwritten_block,
};
use replication::frame::{FrameReader, FrameWriter, Message, MessageRef};
use replication::{
    ErrorCode, Request, Response, ServerConfig, TcpConfig, TcpTransport, Transport, TransportError,
};
use tokio::net::TcpListener;
use tokio::time::Instant;

const LONG: Duration = Duration::from_secs(10);

fn read(volume: u64, slab: u64, offset: u64, len: u32) -> Request {
    Request::Read {
        volume,
        slab,
        epoch: 1,
        offset,
        len,
    }
}

fn transport() -> Arc<TcpTransport> {
    Arc::new(TcpTransport::new(TcpConfig::default()))
}

async fn flush_ok(t: &TcpTransport, addr: SocketAddr, timeout: Duration) {
    match t.call(addr, Request::Flush, timeout).await {
        Ok(Response::Ok) => {}
        other => panic!("Flush to {addr} answered {other:?}"),
    }
}

/// Wait until `cond` holds, for at most `limit`.
async fn eventually(limit: Duration, what: &str, cond: impl Fn() -> bool) {
    let end = Instant::now() + limit;
    while !cond() {
        assert!(Instant::now() < end, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_concurrent_calls_each_get_their_own_reply() {
    let server = start_server(ServerConfig::default()).await;
    let t = transport();
    let calls = (0..1000u64).map(|i| {
        let t = Arc::clone(&t);
        let addr = server.addr;
        async move {
            let (slab, offset, blocks) = (i % 7, i * 4096, 1 + (i % 4) as u32);
            let reply = t
                .call(
                    addr,
                    read(common::VOLUME_JITTER, slab, offset, blocks * 4096),
                    LONG,
                )
                .await;
            let data = match reply {
                Ok(Response::Data(d)) => d,
                other => panic!("call {i}: Read answered {other:?}"),
            };
            for b in 0..blocks as u64 {
                let got = &data.as_slice()[b as usize * 4096..][..4096];
                let want = unwritten_block(VOLUME_JITTER, slab, offset + b * 4096);
                assert!(
                    got == &want[..],
                    "call {i} got the bytes of another request in block {b}"
                );
            }
        }
    });
    futures::future::join_all(calls).await;
    assert!(
        server.handler.running_max.load(Ordering::SeqCst) > 1,
        "requests were not handled concurrently"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn payloads_of_4k_1m_and_8m_round_trip_byte_exact() {
    let server = start_server(ServerConfig::default()).await;
    let t = transport();
    for (i, len) in [4096usize, 1 << 20, replication::WRITE_DATA_MAX]
        .into_iter()
        .enumerate()
    {
        let data = common::pattern(len, i as u64 + 1);
        let expected = data.as_slice().to_vec();
        let offset = (i as u64) << 24;
        let write = Request::Write {
            volume: 1,
            slab: 2,
            epoch: 3,
            offset,
            data,
            fua: true,
        };
        match t.call(server.addr, write, LONG).await {
            Ok(Response::Ok) => {}
            other => panic!("Write of {len} bytes answered {other:?}"),
        }
        match t
            .call(server.addr, read(1, 2, offset, len as u32), LONG)
            .await
        {
            Ok(Response::Data(d)) => {
                assert_eq!(d.len(), len, "Read of {len} bytes returned {}", d.len());
                assert!(
                    d.as_slice() == &expected[..],
                    "{len} bytes came back different from what was written"
                );
            }
            other => panic!("Read of {len} bytes answered {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_request_kind_gets_its_reply_kind() {
    let server = start_server(ServerConfig::default()).await;
    let t = transport();
    let a = server.addr;
    let got = t
        .call(
            a,
            Request::Allocate {
                volume: 4,
                slab: 5,
                epoch: 1,
            },
            LONG,
        )
        .await;
    assert!(
        matches!(
            got,
            Ok(Response::Allocated {
                disk: 5,
                extent: 4005
            })
        ),
        "Allocate answered {got:?}"
    );
    let got = t
        .call(
            a,
            Request::Checksums {
                volume: 4,
                slab: 5,
                epoch: 1,
                offset: 8192,
                blocks: 3,
            },
            LONG,
        )
        .await;
    match got {
        Ok(Response::Checksums(sums)) => {
            let want: Vec<u64> = (0..3)
                .map(|b| {
                    crc_fast::checksum(
                        crc_fast::CrcAlgorithm::Crc32Iscsi,
                        &unwritten_block(4, 5, 8192 + b * 4096),
                    )
                })
                .collect();
            assert_eq!(sums, want, "Checksums returned other values");
        }
        other => panic!("Checksums answered {other:?}"),
    }
    for req in [
        Request::Trim {
            volume: 4,
            slab: 5,
            epoch: 1,
            offset: 0,
            len: 4096,
        },
        Request::WriteZeroes {
            volume: 4,
            slab: 5,
            epoch: 1,
            offset: 0,
            len: 4096,
        },
        Request::Release { volume: 4, slab: 5 },
        Request::Flush,
    ] {
        let name = req.name();
        let got = t.call(a, req, LONG).await;
        assert!(matches!(got, Ok(Response::Ok)), "{name} answered {got:?}");
    }
    let got = t
        .call(
            a,
            Request::WriteZeroes {
                volume: 4,
                slab: 5,
                epoch: 0,
                offset: 0,
                len: 4096,
            },
            LONG,
        )
        .await;
    match got {
        Ok(Response::Error {
            code: ErrorCode::StaleEpoch { current: 7 },
            message,
        }) => assert_eq!(message, "epoch 0 < 7"),
        other => panic!("a stale WriteZeroes answered {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_handler_times_out_and_the_connection_stays_usable() {
    let server = start_server(ServerConfig::default()).await;
    let t = transport();
    flush_ok(&t, server.addr, LONG).await;
    let start = Instant::now();
    let got = t
        .call(
            server.addr,
            read(VOLUME_SLOW, 0, 0, 4096),
            Duration::from_millis(300),
        )
        .await;
    let took = start.elapsed();
    assert_eq!(
        got.err(),
        Some(TransportError::Timeout),
        "slow Read did not time out"
    );
    assert!(
        took >= Duration::from_millis(300) && took < Duration::from_secs(2),
        "a 300 ms timeout took {took:?}"
    );
    // The late reply (never, here) and the timed-out call leave the
    // connection working.
    flush_ok(&t, server.addr, LONG).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_server_fails_calls_in_flight_promptly_and_later_calls_reconnect() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("address");
    let server = start_server_on(
        listener,
        common::TestHandler::new(),
        ServerConfig::default(),
    );
    let t = transport();
    flush_ok(&t, addr, LONG).await;

    let in_flight: Vec<_> = (0..10)
        .map(|i| {
            let t = Arc::clone(&t);
            tokio::spawn(async move {
                let r = t.call(addr, read(VOLUME_SLOW, i, 0, 4096), LONG).await;
                (r, Instant::now())
            })
        })
        .collect();
    eventually(LONG, "10 slow reads running on the server", || {
        server.handler.running() == 10
    })
    .await;

    // Kill the server: its tasks and sockets go away at once.
    server.task.abort();
    let killed_at = Instant::now();
    let _ = server.task.await;
    for call in in_flight {
        let (result, at) = call.await.expect("call task");
        assert!(
            matches!(result, Err(TransportError::Unreachable(_))),
            "a call in flight on a killed server ended with {result:?}"
        );
        let after = at.saturating_duration_since(killed_at);
        assert!(
            after < Duration::from_secs(2),
            "a call in flight failed {after:?} after the kill, not at once"
        );
    }

    // Nobody listens: calls fail as unreachable (not after their timeout).
    let start = Instant::now();
    let got = t.call(addr, Request::Flush, LONG).await;
    assert!(
        matches!(got, Err(TransportError::Unreachable(_))),
        "a call with no server answered {got:?}"
    );
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "a call with no server took {:?}",
        start.elapsed()
    );

    // A new server on the same port: calls get through again, within the
    // back-off bound.
    let listener = TcpListener::bind(addr).await.expect("rebind the same port");
    let _server = start_server_on(
        listener,
        common::TestHandler::new(),
        ServerConfig::default(),
    );
    let start = Instant::now();
    loop {
        match t.call(addr, Request::Flush, Duration::from_secs(1)).await {
            Ok(Response::Ok) => break,
            Err(TransportError::Unreachable(_) | TransportError::Timeout) => {
                assert!(
                    start.elapsed() < Duration::from_secs(6),
                    "no reconnect within 6 s of the new server listening"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            other => panic!("Flush to the new server answered {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_listening_is_unreachable_at_once() {
    let addr = {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        l.local_addr().expect("address")
    };
    let t = transport();
    let start = Instant::now();
    let got = t.call(addr, Request::Flush, LONG).await;
    assert!(
        matches!(got, Err(TransportError::Unreachable(ref m)) if m.contains(&addr.to_string())),
        "a call to a closed port answered {got:?}"
    );
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "a refused connect took {:?}",
        start.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_in_flight_limit_makes_extra_calls_wait_within_their_timeout() {
    let server = start_server(ServerConfig::default()).await;
    let t = Arc::new(TcpTransport::new(TcpConfig {
        connections_per_peer: 1,
        inflight_per_connection: 2,
        ..TcpConfig::default()
    }));
    let held: Vec<_> = (0..2)
        .map(|i| {
            let t = Arc::clone(&t);
            let addr = server.addr;
            tokio::spawn(async move { t.call(addr, read(VOLUME_GATED, i, 0, 4096), LONG).await })
        })
        .collect();
    eventually(LONG, "2 gated reads running", || {
        server.handler.running() == 2
    })
    .await;
    let got = t
        .call(server.addr, Request::Flush, Duration::from_millis(200))
        .await;
    assert_eq!(
        got.err(),
        Some(TransportError::Timeout),
        "a third call was not held back by the in-flight limit of 2"
    );
    assert_eq!(
        server.handler.started.load(Ordering::SeqCst),
        2,
        "the server saw a request beyond the client's in-flight limit"
    );
    server.handler.gate.add_permits(2);
    for h in held {
        let got = h.await.expect("call task");
        assert!(
            matches!(got, Ok(Response::Data(_))),
            "gated Read answered {got:?}"
        );
    }
    flush_ok(&t, server.addr, LONG).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_in_flight_limit_bounds_concurrent_handlers_per_connection() {
    let server = start_server(ServerConfig {
        inflight_per_connection: 3,
        ..ServerConfig::default()
    })
    .await;
    let t = Arc::new(TcpTransport::new(TcpConfig {
        connections_per_peer: 1,
        ..TcpConfig::default()
    }));
    let calls: Vec<_> = (0..10)
        .map(|i| {
            let t = Arc::clone(&t);
            let addr = server.addr;
            tokio::spawn(async move { t.call(addr, read(VOLUME_GATED, i, 0, 4096), LONG).await })
        })
        .collect();
    eventually(LONG, "3 gated reads running", || {
        server.handler.running() == 3
    })
    .await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        server.handler.running_max.load(Ordering::SeqCst),
        3,
        "more handlers ran at once than the server's per-connection limit"
    );
    server.handler.gate.add_permits(10);
    for c in calls {
        let got = c.await.expect("call task");
        assert!(
            matches!(got, Ok(Response::Data(_))),
            "gated Read answered {got:?}"
        );
    }
    assert_eq!(server.handler.running_max.load(Ordering::SeqCst), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn panicking_handler_is_answered_with_an_io_error_and_the_server_goes_on() {
    let server = start_server(ServerConfig::default()).await;
    let t = transport();
    let got = t
        .call(server.addr, read(VOLUME_PANIC, 0, 0, 4096), LONG)
        .await;
    assert!(
        matches!(
            got,
            Ok(Response::Error {
                code: ErrorCode::Io,
                ..
            })
        ),
        "a panicking handler's call answered {got:?}"
    );
    flush_ok(&t, server.addr, LONG).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handler_reply_that_does_not_fit_becomes_an_io_error() {
    let server = start_server(ServerConfig::default()).await;
    let t = transport();
    let got = t
        .call(server.addr, read(VOLUME_WRONG_REPLY, 0, 0, 4096), LONG)
        .await;
    assert!(
        matches!(
            got,
            Ok(Response::Error {
                code: ErrorCode::Io,
                ..
            })
        ),
        "an Ok reply to a Read reached the caller as {got:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_request_is_refused_without_being_sent() {
    let server = start_server(ServerConfig::default()).await;
    let t = transport();
    let got = t.call(server.addr, read(1, 0, 100, 4096), LONG).await;
    assert!(
        matches!(got, Err(TransportError::Protocol(ref m)) if m.contains("not sent")),
        "an unaligned Read answered {got:?}"
    );
    assert_eq!(
        server.handler.started.load(Ordering::SeqCst),
        0,
        "an invalid request reached the handler"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_finishes_requests_in_flight_then_stops_serving() {
    let server = start_server(ServerConfig::default()).await;
    let TestServer {
        addr,
        handler,
        shutdown,
        task,
    } = server;
    let t = transport();
    let calls: Vec<_> = (0..5)
        .map(|i| {
            let t = Arc::clone(&t);
            tokio::spawn(async move { t.call(addr, read(VOLUME_300MS, i, 0, 4096), LONG).await })
        })
        .collect();
    eventually(LONG, "5 reads running", || handler.running() == 5).await;
    shutdown.cancel();
    for c in calls {
        let got = c.await.expect("call task");
        assert!(
            matches!(got, Ok(Response::Data(_))),
            "a request in flight at shutdown answered {got:?}"
        );
    }
    let served = tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("serve returned within 5 s of shutdown")
        .expect("serve task");
    assert!(served.is_ok(), "serve returned {served:?}");
    let got = t.call(addr, Request::Flush, LONG).await;
    assert!(
        matches!(got, Err(TransportError::Unreachable(_))),
        "a call after shutdown answered {got:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_fails_calls_in_flight_with_closed() {
    let server = start_server(ServerConfig::default()).await;
    let t = transport();
    let call = {
        let t = Arc::clone(&t);
        let addr = server.addr;
        tokio::spawn(async move { t.call(addr, read(VOLUME_SLOW, 0, 0, 4096), LONG).await })
    };
    eventually(LONG, "the slow read running", || {
        server.handler.running() == 1
    })
    .await;
    t.close();
    let got = tokio::time::timeout(Duration::from_secs(1), call)
        .await
        .expect("the call ended within 1 s of close")
        .expect("call task");
    assert_eq!(got.err(), Some(TransportError::Closed));
    let got = t.call(server.addr, Request::Flush, LONG).await;
    assert_eq!(
        got.err(),
        Some(TransportError::Closed),
        "a call after close"
    );
}

/// A scripted peer: answers every request on its `n`th accepted
/// connection with the bytes of `reply(n, request_id)`.
async fn fake_peer(
    listener: TcpListener,
    reply: impl Fn(usize, u64) -> Vec<u8> + Send + Sync + 'static,
) {
    let reply = Arc::new(reply);
    let mut index = 0;
    while let Ok((stream, _)) = listener.accept().await {
        let reply = Arc::clone(&reply);
        tokio::spawn(async move {
            let (rd, mut wr) = stream.into_split();
            let mut reader = FrameReader::new(rd);
            while let Ok(Some(frame)) = reader.read_frame(LONG).await {
                let bytes = reply(index, frame.request_id);
                if tokio::io::AsyncWriteExt::write_all(&mut wr, &bytes)
                    .await
                    .is_err()
                {
                    break;
                }
            }
        });
        index += 1;
    }
}

fn encode(id: u64, resp: &Response) -> Vec<u8> {
    replication::frame::encode_frame(id, MessageRef::Response(resp)).expect("encode reply")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_reply_fails_the_call_as_a_protocol_error_and_the_next_call_reconnects() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("address");
    tokio::spawn(fake_peer(listener, |conn, id| {
        let mut bytes = encode(id, &Response::Ok);
        if conn == 0 {
            let last = bytes.len() - 1;
            bytes[last] ^= 0x40; // the frame CRC
        }
        bytes
    }));
    let t = Arc::new(TcpTransport::new(TcpConfig {
        connections_per_peer: 1,
        ..TcpConfig::default()
    }));
    let got = t.call(addr, Request::Flush, LONG).await;
    assert!(
        matches!(got, Err(TransportError::Protocol(ref m)) if m.contains("checksum")),
        "a reply with a bad CRC answered {got:?}"
    );
    let start = Instant::now();
    loop {
        match t.call(addr, Request::Flush, LONG).await {
            Ok(Response::Ok) => break,
            Err(TransportError::Unreachable(_)) if start.elapsed() < Duration::from_secs(3) => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            other => panic!("Flush on a fresh connection answered {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replies_that_do_not_fit_or_match_no_call_are_not_delivered() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("address");
    tokio::spawn(fake_peer(listener, |_, id| {
        // First a reply to a request nobody sent, then 8 KiB for a 4 KiB
        // Read.
        let mut bytes = encode(id + 1000, &Response::Ok);
        bytes.extend(encode(id, &Response::Data(AlignedBuf::zeroed(8192))));
        bytes
    }));
    let t = transport();
    let got = t.call(addr, read(1, 0, 0, 4096), LONG).await;
    assert!(
        matches!(got, Err(TransportError::Protocol(ref m)) if m.contains("8192")),
        "an 8 KiB reply to a 4 KiB Read answered {got:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_frame_from_the_server_side_closes_the_client_connection() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("address");
    tokio::spawn(fake_peer(listener, |_, id| {
        replication::frame::encode_frame(id, MessageRef::Request(&Request::Flush)).expect("encode")
    }));
    let t = transport();
    let got = t.call(addr, Request::Flush, LONG).await;
    assert!(
        matches!(got, Err(TransportError::Protocol(_))),
        "a request sent as a reply answered {got:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replies_on_the_wire_carry_the_request_id() {
    // A raw client: two pipelined requests, replies matched by id.
    let server = start_server(ServerConfig::default()).await;
    let stream = tokio::net::TcpStream::connect(server.addr)
        .await
        .expect("connect");
    let (rd, wr) = stream.into_split();
    let mut w = FrameWriter::new(wr);
    w.write(41, MessageRef::Request(&read(VOLUME_300MS, 0, 0, 4096)))
        .await
        .expect("write");
    w.write(42, MessageRef::Request(&Request::Flush))
        .await
        .expect("write");
    w.flush().await.expect("flush");
    let mut r = FrameReader::new(rd);
    let first = r.read_frame(LONG).await.expect("read").expect("a reply");
    let second = r.read_frame(LONG).await.expect("read").expect("a reply");
    assert_eq!(
        first.request_id, 42,
        "the fast Flush should be answered before the slow Read"
    );
    assert!(matches!(first.message, Message::Response(Response::Ok)));
    assert_eq!(second.request_id, 41);
    assert!(matches!(
        second.message,
        Message::Response(Response::Data(_))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disconnect_fails_calls_in_flight_and_the_next_call_connects_afresh() {
    let server = start_server(ServerConfig::default()).await;
    let t = transport();
    let call = {
        let t = Arc::clone(&t);
        let addr = server.addr;
        tokio::spawn(async move { t.call(addr, read(VOLUME_SLOW, 0, 0, 4096), LONG).await })
    };
    eventually(LONG, "the slow read running", || {
        server.handler.running() == 1
    })
    .await;
    t.disconnect(server.addr);
    let got = tokio::time::timeout(Duration::from_secs(2), call)
        .await
        .expect("the call ended within 2 s of disconnect")
        .expect("call task");
    assert!(
        matches!(got, Err(TransportError::Unreachable(ref m)) if m.contains("disconnected")),
        "a call in flight at disconnect answered {got:?}"
    );
    flush_ok(&t, server.addr, LONG).await;
}
