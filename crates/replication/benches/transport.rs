//! Loopback throughput and latency of `TcpTransport` + `serve` with a
//! handler that does no I/O: the cost of the transport itself.
//! `cargo bench -p replication`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use block_api::AlignedBuf;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use replication::{Handler, Request, Response, TcpConfig, TcpTransport, Transport};
use tokio_util::sync::CancellationToken;

struct Null;

#[async_trait]
impl Handler for Null {
    async fn handle(&self, _peer: SocketAddr, req: Request) -> Response {
        match req {
            Request::Read { len, .. } => Response::Data(AlignedBuf::for_overwrite(len as usize)),
            _ => Response::Ok,
        }
    }
}

fn write(len: usize) -> Request {
    Request::Write {
        volume: 1,
        slab: 1,
        epoch: 1,
        offset: 0,
        data: AlignedBuf::zeroed(len),
        fua: false,
    }
}

/// Time `iters` calls of `make()` with `depth` in flight.
async fn run(
    t: &Arc<TcpTransport>,
    addr: SocketAddr,
    iters: u64,
    depth: u64,
    make: impl Fn() -> Request + Send + Sync + Copy + 'static,
) -> Duration {
    let start = Instant::now();
    let workers: Vec<_> = (0..depth)
        .map(|w| {
            let t = Arc::clone(t);
            tokio::spawn(async move {
                let mut i = w;
                while i < iters {
                    match t.call(addr, make(), Duration::from_secs(10)).await {
                        Ok(Response::Ok | Response::Data(_)) => {}
                        other => panic!("bench call answered {other:?}"),
                    }
                    i += depth;
                }
            })
        })
        .collect();
    for w in workers {
        w.await.expect("bench worker");
    }
    start.elapsed()
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let shutdown = CancellationToken::new();
    let (t, addr) = rt.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("address");
        tokio::spawn(replication::serve(
            listener,
            Arc::new(Null),
            shutdown.clone(),
        ));
        let t = Arc::new(TcpTransport::new(TcpConfig::default()));
        (t, addr)
    });

    let mut g = c.benchmark_group("tcp_loopback");
    g.measurement_time(Duration::from_secs(5));
    for (name, len, depth) in [
        ("write_4k_qd1", 4096usize, 1u64),
        ("write_4k_qd64", 4096, 64),
        ("write_1m_qd8", 1 << 20, 8),
    ] {
        g.throughput(Throughput::Bytes(len as u64));
        g.bench_function(name, |b| {
            b.iter_custom(|iters| rt.block_on(run(&t, addr, iters, depth, move || write(len))))
        });
    }
    g.throughput(Throughput::Bytes(1 << 20));
    g.bench_function("read_1m_qd8", |b| {
        b.iter_custom(|iters| {
            rt.block_on(run(&t, addr, iters, 8, || Request::Read {
                volume: 1,
                slab: 1,
                epoch: 1,
                offset: 0,
                len: 1 << 20,
            }))
        })
    });
    g.finish();
    shutdown.cancel();
}

criterion_group!(benches, bench);
criterion_main!(benches);
