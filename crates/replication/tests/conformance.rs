//! The `Transport` contract, run against every implementation: the TCP
//! transport with a real server, and the in-process `MemTransport`.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use replication::{
    ErrorCode, Handler, MemTransport, Request, Response, ServerConfig, TcpConfig, TcpTransport,
    Transport, TransportError,
};

const LONG: Duration = Duration::from_secs(10);

/// A transport, a peer address served by a [`common::TestHandler`], and an
/// address nobody serves.
struct Setup {
    name: &'static str,
    transport: Arc<dyn Transport>,
    peer: SocketAddr,
    nobody: SocketAddr,
}

async fn tcp_setup() -> (Setup, common::TestServer) {
    let server = common::start_server(ServerConfig::default()).await;
    let nobody = {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        l.local_addr().expect("address")
    };
    let setup = Setup {
        name: "TcpTransport",
        transport: Arc::new(TcpTransport::new(TcpConfig::default())),
        peer: server.addr,
        nobody,
    };
    (setup, server)
}

fn mem_setup() -> Setup {
    let t = MemTransport::new(None);
    let peer: SocketAddr = "10.0.0.1:7420".parse().expect("address");
    t.add_peer(peer, common::TestHandler::new() as Arc<dyn Handler>);
    Setup {
        name: "MemTransport",
        transport: Arc::new(t),
        peer,
        nobody: "10.0.0.2:7420".parse().expect("address"),
    }
}

async fn conformance(s: &Setup) {
    let (t, name) = (&s.transport, s.name);

    // Written bytes read back exactly.
    let data = common::pattern(64 << 10, 9);
    let expected = data.as_slice().to_vec();
    let write = Request::Write {
        volume: 1,
        slab: 3,
        epoch: 1,
        offset: 1 << 20,
        data,
        fua: false,
    };
    let got = t.call(s.peer, write, LONG).await;
    assert!(
        matches!(got, Ok(Response::Ok)),
        "{name}: Write answered {got:?}"
    );
    let read = Request::Read {
        volume: 1,
        slab: 3,
        epoch: 1,
        offset: 1 << 20,
        len: 64 << 10,
    };
    match t.call(s.peer, read, LONG).await {
        Ok(Response::Data(d)) => assert!(
            d.as_slice() == &expected[..],
            "{name}: read back different bytes"
        ),
        other => panic!("{name}: Read answered {other:?}"),
    }

    // An error reply is a reply, not a transport error.
    let got = t
        .call(s.peer, Request::Release { volume: 0, slab: 1 }, LONG)
        .await;
    assert!(
        matches!(
            got,
            Ok(Response::Error {
                code: ErrorCode::NotFound,
                ..
            })
        ),
        "{name}: Release of a missing slab answered {got:?}"
    );

    // Timeout bounds the call.
    let start = Instant::now();
    let slow = Request::Read {
        volume: common::VOLUME_SLOW,
        slab: 0,
        epoch: 1,
        offset: 0,
        len: 4096,
    };
    let got = t.call(s.peer, slow, Duration::from_millis(200)).await;
    assert_eq!(
        got.err(),
        Some(TransportError::Timeout),
        "{name}: slow call"
    );
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "{name}: a 200 ms timeout took {:?}",
        start.elapsed()
    );

    // Invalid requests are refused before sending.
    let bad = Request::Trim {
        volume: 1,
        slab: 1,
        epoch: 1,
        offset: 0,
        len: 100,
    };
    let got = t.call(s.peer, bad, LONG).await;
    assert!(
        matches!(got, Err(TransportError::Protocol(_))),
        "{name}: a Trim of 100 bytes answered {got:?}"
    );

    // A panicking handler is an Io error reply.
    let boom = Request::Allocate {
        volume: common::VOLUME_PANIC,
        slab: 0,
        epoch: 1,
    };
    let got = t.call(s.peer, boom, LONG).await;
    assert!(
        matches!(
            got,
            Ok(Response::Error {
                code: ErrorCode::Io,
                ..
            })
        ),
        "{name}: a panicking handler answered {got:?}"
    );

    // Nobody there: unreachable, promptly.
    let start = Instant::now();
    let got = t.call(s.nobody, Request::Flush, LONG).await;
    assert!(
        matches!(got, Err(TransportError::Unreachable(_))),
        "{name}: a call to nobody answered {got:?}"
    );
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "{name}: a call to nobody took {:?}",
        start.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_transport_keeps_the_transport_contract() {
    let (setup, _server) = tcp_setup().await;
    conformance(&setup).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mem_transport_keeps_the_transport_contract() {
    conformance(&mem_setup()).await;
}
