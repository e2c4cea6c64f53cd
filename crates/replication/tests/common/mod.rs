//! A replica handler for tests: an in-memory block store whose behaviour
//! is chosen by the request's volume id, plus helpers to start servers.
#![allow(dead_code)] // each test binary uses a part of it

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use block_api::AlignedBuf;
use replication::{ErrorCode, Handler, Request, Response, ServerConfig};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Requests for this volume sleep for a minute.
pub const VOLUME_SLOW: u64 = 9_001;
/// Requests for this volume panic.
pub const VOLUME_PANIC: u64 = 9_002;
/// Requests for this volume wait for a permit of [`TestHandler::gate`].
pub const VOLUME_GATED: u64 = 9_003;
/// Requests for this volume sleep `offset / 4096 % 5` milliseconds, so that
/// replies complete out of order.
pub const VOLUME_JITTER: u64 = 9_004;
/// Requests for this volume get a reply of the wrong shape (`Ok` to a
/// `Read`).
pub const VOLUME_WRONG_REPLY: u64 = 9_005;
/// Requests for this volume sleep 300 ms.
pub const VOLUME_300MS: u64 = 9_006;

/// Contents of a block never written: its (volume, slab, offset) in the
/// first 24 bytes, zeros after, so a reply shows which request it answers.
pub fn unwritten_block(volume: u64, slab: u64, offset: u64) -> [u8; 4096] {
    let mut b = [0u8; 4096];
    b[0..8].copy_from_slice(&volume.to_le_bytes());
    b[8..16].copy_from_slice(&slab.to_le_bytes());
    b[16..24].copy_from_slice(&offset.to_le_bytes());
    b
}

/// (volume, slab, offset) of one stored block.
type BlockKey = (u64, u64, u64);

pub struct TestHandler {
    blocks: Mutex<HashMap<BlockKey, Box<[u8; 4096]>>>,
    running: AtomicUsize,
    /// Most handler calls running at once.
    pub running_max: AtomicUsize,
    /// Handler calls started.
    pub started: AtomicUsize,
    /// Permits for [`VOLUME_GATED`] requests (none at first).
    pub gate: Semaphore,
}

impl TestHandler {
    pub fn new() -> Arc<Self> {
        Arc::new(TestHandler {
            blocks: Mutex::new(HashMap::new()),
            running: AtomicUsize::new(0),
            running_max: AtomicUsize::new(0),
            started: AtomicUsize::new(0),
            gate: Semaphore::new(0),
        })
    }

    pub fn running(&self) -> usize {
        self.running.load(Ordering::SeqCst)
    }

    fn read(&self, volume: u64, slab: u64, offset: u64, len: u32) -> AlignedBuf {
        let mut buf = AlignedBuf::for_overwrite(len as usize);
        let blocks = self.blocks.lock().expect("test store lock");
        for (i, chunk) in buf.as_mut_slice().chunks_mut(4096).enumerate() {
            let off = offset + i as u64 * 4096;
            match blocks.get(&(volume, slab, off)) {
                Some(b) => chunk.copy_from_slice(&b[..]),
                None => chunk.copy_from_slice(&unwritten_block(volume, slab, off)),
            }
        }
        buf
    }

    async fn serve(&self, req: Request) -> Response {
        match req {
            Request::Write {
                volume,
                slab,
                offset,
                data,
                ..
            } => {
                let mut blocks = self.blocks.lock().expect("test store lock");
                for (i, chunk) in data.as_slice().chunks(4096).enumerate() {
                    let mut b = Box::new([0u8; 4096]);
                    b.copy_from_slice(chunk);
                    blocks.insert((volume, slab, offset + i as u64 * 4096), b);
                }
                Response::Ok
            }
            Request::Read {
                volume,
                slab,
                offset,
                len,
                ..
            } => {
                if volume == VOLUME_WRONG_REPLY {
                    return Response::Ok;
                }
                Response::Data(self.read(volume, slab, offset, len))
            }
            Request::Checksums {
                volume,
                slab,
                offset,
                blocks,
                ..
            } => {
                let data = self.read(volume, slab, offset, blocks * 4096);
                Response::Checksums(
                    data.as_slice()
                        .chunks(4096)
                        .map(|b| crc_fast::checksum(crc_fast::CrcAlgorithm::Crc32Iscsi, b))
                        .collect(),
                )
            }
            Request::Allocate { volume, slab, .. } => Response::Allocated {
                disk: slab as u32,
                extent: volume * 1000 + slab,
            },
            Request::Release { volume: 0, .. } => {
                Response::error(ErrorCode::NotFound, "volume 0 has no extent here")
            }
            Request::WriteZeroes { epoch: 0, .. } => {
                Response::error(ErrorCode::StaleEpoch { current: 7 }, "epoch 0 < 7")
            }
            _ => Response::Ok,
        }
    }
}

fn volume_of(req: &Request) -> Option<u64> {
    match req {
        Request::Write { volume, .. }
        | Request::Read { volume, .. }
        | Request::WriteZeroes { volume, .. }
        | Request::Trim { volume, .. }
        | Request::Allocate { volume, .. }
        | Request::Checksums { volume, .. }
        | Request::Release { volume, .. } => Some(*volume),
        Request::Flush => None,
    }
}

fn offset_of(req: &Request) -> u64 {
    match req {
        Request::Write { offset, .. }
        | Request::Read { offset, .. }
        | Request::WriteZeroes { offset, .. }
        | Request::Trim { offset, .. }
        | Request::Checksums { offset, .. } => *offset,
        _ => 0,
    }
}

struct Running<'a>(&'a AtomicUsize);

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

#[async_trait]
impl Handler for TestHandler {
    async fn handle(&self, _peer: SocketAddr, req: Request) -> Response {
        self.started.fetch_add(1, Ordering::SeqCst);
        let now = self.running.fetch_add(1, Ordering::SeqCst) + 1;
        let _running = Running(&self.running);
        self.running_max.fetch_max(now, Ordering::SeqCst);
        match volume_of(&req) {
            Some(VOLUME_SLOW) => tokio::time::sleep(Duration::from_secs(60)).await,
            Some(VOLUME_PANIC) => panic!("test handler asked to panic"),
            Some(VOLUME_GATED) => match self.gate.acquire().await {
                Ok(p) => p.forget(),
                Err(_) => return Response::error(ErrorCode::ShuttingDown, "gate closed"),
            },
            Some(VOLUME_JITTER) => {
                let ms = offset_of(&req) / 4096 % 5;
                tokio::time::sleep(Duration::from_millis(ms)).await;
            }
            Some(VOLUME_300MS) => tokio::time::sleep(Duration::from_millis(300)).await,
            _ => {}
        }
        self.serve(req).await
    }
}

/// A server on a fresh loopback port.
pub struct TestServer {
    pub addr: SocketAddr,
    pub handler: Arc<TestHandler>,
    pub shutdown: CancellationToken,
    pub task: JoinHandle<std::io::Result<()>>,
}

pub async fn start_server(config: ServerConfig) -> TestServer {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind a loopback port");
    start_server_on(listener, TestHandler::new(), config)
}

pub fn start_server_on(
    listener: TcpListener,
    handler: Arc<TestHandler>,
    config: ServerConfig,
) -> TestServer {
    let addr = listener.local_addr().expect("listener address");
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(replication::serve_with_config(
        listener,
        Arc::clone(&handler) as Arc<dyn Handler>,
        shutdown.clone(),
        config,
    ));
    TestServer {
        addr,
        handler,
        shutdown,
        task,
    }
}

/// Bytes that differ from block to block and from run to run of a
/// pattern seed.
pub fn pattern(len: usize, seed: u64) -> AlignedBuf {
    let mut buf = AlignedBuf::for_overwrite(len);
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    for chunk in buf.as_mut_slice().chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let bytes = x.to_le_bytes();
        chunk.copy_from_slice(&bytes[..chunk.len()]);
    }
    buf
}
