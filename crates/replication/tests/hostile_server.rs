//! Hostile byte streams against a live server: each hostile connection is
//! closed (never a panic, never a hang), and the server keeps serving a
//! well-behaved client on another connection throughout.

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use proptest::prelude::*;
use replication::frame::{FRAME_PAYLOAD_MAX, HEADER_LEN, MAGIC, MessageRef, encode_frame};
use replication::{
    PROTOCOL_VERSION, Request, Response, ServerConfig, TcpConfig, TcpTransport, Transport,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

struct World {
    runtime: tokio::runtime::Runtime,
    addr: SocketAddr,
    handler: Arc<common::TestHandler>,
    client: Arc<TcpTransport>,
}

/// One server and one well-behaved client shared by every case.
static WORLD: LazyLock<World> = LazyLock::new(|| {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("test runtime");
    let (addr, handler, client) = runtime.block_on(async {
        let server = common::start_server(ServerConfig {
            frame_timeout: Duration::from_secs(2),
            ..ServerConfig::default()
        })
        .await;
        let client = Arc::new(TcpTransport::new(TcpConfig::default()));
        (server.addr, server.handler, client)
    });
    World {
        runtime,
        addr,
        handler,
        client,
    }
});

/// Send `bytes` on a fresh connection, close our side, and wait for the
/// server to close its side. Returns how many reply bytes came back.
async fn send_hostile(addr: SocketAddr, bytes: &[u8]) -> Result<usize, String> {
    let mut stream = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    // The server may close before taking everything: a write error is fine.
    let _ = stream.write_all(bytes).await;
    let _ = stream.shutdown().await;
    let mut sink = Vec::new();
    match tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut sink)).await {
        Err(_) => Err("the server kept a hostile connection open for 10 s".into()),
        // End of stream or a reset: closed either way.
        Ok(_) => Ok(sink.len()),
    }
}

fn valid_frame(id: u64) -> Vec<u8> {
    let req = Request::Write {
        volume: 1,
        slab: 1,
        epoch: 1,
        offset: 0,
        data: common::pattern(8192, id),
        fua: false,
    };
    encode_frame(id, MessageRef::Request(&req)).expect("encode")
}

fn forged_header(kind: u8, len: u32) -> Vec<u8> {
    let mut h = vec![0u8; HEADER_LEN];
    h[0..4].copy_from_slice(&MAGIC.to_le_bytes());
    h[4..6].copy_from_slice(&PROTOCOL_VERSION.to_le_bytes());
    h[6] = kind;
    h[16..20].copy_from_slice(&len.to_le_bytes());
    let crc = crc_fast::checksum(crc_fast::CrcAlgorithm::Crc32Iscsi, &h[0..20]) as u32;
    h[20..24].copy_from_slice(&crc.to_le_bytes());
    h
}

fn hostile_bytes() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        // Random bytes.
        prop::collection::vec(any::<u8>(), 1..2048),
        // A valid frame cut short.
        (any::<u64>(), any::<prop::sample::Index>()).prop_map(|(id, cut)| {
            let f = valid_frame(id);
            let cut = 1 + cut.index(f.len() - 1);
            f[..cut].to_vec()
        }),
        // A valid frame with bits flipped.
        (
            any::<u64>(),
            prop::collection::vec(any::<prop::sample::Index>(), 1..4)
        )
            .prop_map(|(id, bits)| {
                let mut f = valid_frame(id);
                for b in bits {
                    let b = b.index(f.len() * 8);
                    f[b / 8] ^= 1 << (b % 8);
                }
                f
            }),
        // A well-formed header claiming a huge or wrong payload.
        (
            prop::sample::select(vec![1u8, 2, 5, 0x81, 0x99]),
            any::<u32>(),
            prop::collection::vec(any::<u8>(), 0..64)
        )
            .prop_map(|(kind, len, tail)| {
                let mut h = forged_header(kind, len);
                h.extend(tail);
                h
            }),
        // A valid frame, then garbage.
        (any::<u64>(), prop::collection::vec(any::<u8>(), 1..256)).prop_map(|(id, tail)| {
            let mut f = valid_frame(id);
            f.extend(tail);
            f
        }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn hostile_streams_close_only_their_connection(bytes in hostile_bytes()) {
        let w = &*WORLD;
        let result = w.runtime.block_on(async {
            // A request in flight on the good connection while the hostile
            // one is refused.
            let client = Arc::clone(&w.client);
            let addr = w.addr;
            let good = tokio::spawn(async move {
                client
                    .call(addr, Request::Read { volume: common::VOLUME_JITTER, slab: 0, epoch: 1, offset: 12288, len: 4096 }, Duration::from_secs(10))
                    .await
            });
            let hostile = send_hostile(w.addr, &bytes).await;
            let good = good.await.map_err(|e| format!("good call task: {e}"))?;
            match good {
                Ok(Response::Data(_)) => {}
                other => return Err(format!("the well-behaved call answered {other:?}")),
            }
            let after = w.client.call(w.addr, Request::Flush, Duration::from_secs(10)).await;
            if !matches!(after, Ok(Response::Ok)) {
                return Err(format!("after a hostile connection, Flush answered {after:?}"));
            }
            hostile.map(|_| ())
        });
        prop_assert!(result.is_ok(), "{}", result.err().unwrap_or_default());
    }
}

#[test]
fn oversized_frame_header_is_refused_without_waiting_for_the_payload() {
    let w = &*WORLD;
    w.runtime.block_on(async {
        // Keep our side open: the server must close on the header alone.
        let mut stream = TcpStream::connect(w.addr).await.expect("connect");
        stream
            .write_all(&forged_header(1, FRAME_PAYLOAD_MAX + 1))
            .await
            .expect("write header");
        let mut sink = Vec::new();
        let closed =
            tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut sink)).await;
        assert!(
            closed.is_ok(),
            "the server waited for the payload of an oversized frame"
        );
    });
}

#[test]
fn a_half_sent_frame_is_dropped_after_the_frame_timeout() {
    let w = &*WORLD;
    w.runtime.block_on(async {
        let mut stream = TcpStream::connect(w.addr).await.expect("connect");
        let f = valid_frame(5);
        stream
            .write_all(&f[..100])
            .await
            .expect("write half a frame");
        let mut sink = Vec::new();
        // The world's server has a 2 s frame timeout.
        let closed =
            tokio::time::timeout(Duration::from_secs(8), stream.read_to_end(&mut sink)).await;
        assert!(closed.is_ok(), "a stalled frame kept its connection open");
    });
}

#[test]
fn valid_frame_then_garbage_is_answered_then_closed() {
    let w = &*WORLD;
    let before = w.handler.started.load(std::sync::atomic::Ordering::SeqCst);
    let mut bytes = valid_frame(77);
    bytes.extend_from_slice(b"garbage after a good frame");
    let replied = w
        .runtime
        .block_on(send_hostile(w.addr, &bytes))
        .expect("the server closed the connection");
    assert!(
        replied > 0,
        "the valid frame before the garbage got no reply"
    );
    assert!(
        w.handler.started.load(std::sync::atomic::Ordering::SeqCst) > before,
        "the valid frame did not reach the handler"
    );
}
