//! Test fixtures shared by the integration tests: an in-memory sparse
//! volume and provider, a server started on loopback, and a raw NBD client
//! that speaks the protocol byte by byte (so tests can also speak it badly).
//!
//! Each test binary uses a different subset of these helpers.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use block_api::{AlignedBuf, BlockError, BlockRun, BlockVolume, VolumeProvider, VolumeSummary};
use nbd_server::proto::*;
use nbd_server::{CancellationToken, NbdError, NbdServer, ServerConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::watch;
use tokio::task::JoinHandle;

pub const BLOCK: u64 = 4096;
/// Bound on any single wait in a test, so a bug fails instead of hanging.
pub const TEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Which requests a paused volume holds back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pause {
    Nothing,
    Everything,
    At(u64),
}

/// A sparse in-memory volume of 4 KiB blocks: absent blocks are holes.
pub struct MemVolume {
    name: String,
    size: u64,
    blocks: Mutex<BTreeMap<u64, Box<[u8]>>>,
    pause: watch::Sender<Pause>,
    pub entered: AtomicUsize,
    pub inflight: AtomicUsize,
    pub inflight_max: AtomicUsize,
    pub flushes: AtomicU64,
    pub fua_writes: AtomicU64,
    pub mutations: AtomicU64,
    /// When set, every request fails with a checksum error (EIO).
    pub fail: std::sync::atomic::AtomicBool,
}

impl MemVolume {
    pub fn new(name: &str, size: u64) -> Arc<Self> {
        Arc::new(MemVolume {
            name: name.to_owned(),
            size,
            blocks: Mutex::new(BTreeMap::new()),
            pause: watch::Sender::new(Pause::Nothing),
            entered: AtomicUsize::new(0),
            inflight: AtomicUsize::new(0),
            inflight_max: AtomicUsize::new(0),
            flushes: AtomicU64::new(0),
            fua_writes: AtomicU64::new(0),
            mutations: AtomicU64::new(0),
            fail: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// Hold back requests (at one offset, or all) until [`resume`](Self::resume).
    pub fn pause(&self, what: Pause) {
        self.pause.send_replace(what);
    }

    pub fn resume(&self) {
        self.pause.send_replace(Pause::Nothing);
    }

    /// The bytes of `[offset, offset + len)` as stored (holes read as zeros).
    pub fn contents(&self, offset: u64, len: usize) -> Vec<u8> {
        let blocks = self.blocks.lock().expect("volume lock");
        let mut out = vec![0u8; len];
        let mut done = 0usize;
        while done < len {
            let at = offset + done as u64;
            let in_block = (at % BLOCK) as usize;
            let n = (BLOCK as usize - in_block).min(len - done);
            if let Some(b) = blocks.get(&(at / BLOCK)) {
                out[done..done + n].copy_from_slice(&b[in_block..in_block + n]);
            }
            done += n;
        }
        out
    }

    pub fn allocated_blocks(&self) -> usize {
        self.blocks.lock().expect("volume lock").len()
    }

    pub fn is_allocated(&self, block: u64) -> bool {
        self.blocks
            .lock()
            .expect("volume lock")
            .contains_key(&block)
    }

    /// Store bytes directly (test setup).
    pub fn fill(&self, offset: u64, data: &[u8]) {
        let mut blocks = self.blocks.lock().expect("volume lock");
        let mut done = 0usize;
        while done < data.len() {
            let at = offset + done as u64;
            let in_block = (at % BLOCK) as usize;
            let n = (BLOCK as usize - in_block).min(data.len() - done);
            let b = blocks
                .entry(at / BLOCK)
                .or_insert_with(|| vec![0u8; BLOCK as usize].into());
            b[in_block..in_block + n].copy_from_slice(&data[done..done + n]);
            done += n;
        }
    }

    async fn enter(&self, offset: u64) -> InflightGuard<'_> {
        self.entered.fetch_add(1, SeqCst);
        let mut rx = self.pause.subscribe();
        let _ = rx
            .wait_for(|p| match p {
                Pause::Nothing => true,
                Pause::Everything => false,
                Pause::At(o) => *o != offset,
            })
            .await;
        let now = self.inflight.fetch_add(1, SeqCst) + 1;
        self.inflight_max.fetch_max(now, SeqCst);
        InflightGuard(&self.inflight)
    }

    fn check(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        if self.fail.load(SeqCst) {
            return Err(BlockError::Checksum { offset });
        }
        match offset.checked_add(len) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(BlockError::OutOfRange {
                offset,
                len,
                size: self.size,
            }),
        }
    }

    /// Zero a range: whole blocks are removed with `unmap`, else kept as zeros.
    fn zero_range(&self, offset: u64, len: u64, unmap: bool) {
        let mut blocks = self.blocks.lock().expect("volume lock");
        let mut at = offset;
        let end = offset + len;
        while at < end {
            let block = at / BLOCK;
            let in_block = at % BLOCK;
            let n = (BLOCK - in_block).min(end - at);
            if n == BLOCK && unmap {
                blocks.remove(&block);
            } else if n == BLOCK {
                blocks.insert(block, vec![0u8; BLOCK as usize].into());
            } else if let Some(b) = blocks.get_mut(&block) {
                b[in_block as usize..(in_block + n) as usize].fill(0);
            } else if !unmap {
                blocks.insert(block, vec![0u8; BLOCK as usize].into());
            }
            at += n;
        }
        self.mutations.fetch_add(1, SeqCst);
    }
}

struct InflightGuard<'a>(&'a AtomicUsize);

impl Drop for InflightGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, SeqCst);
    }
}

#[async_trait::async_trait]
impl BlockVolume for MemVolume {
    fn name(&self) -> &str {
        &self.name
    }

    fn size(&self) -> u64 {
        self.size
    }

    async fn read(&self, offset: u64, len: usize) -> Result<AlignedBuf, BlockError> {
        let _g = self.enter(offset).await;
        self.check(offset, len as u64)?;
        Ok(AlignedBuf::from_slice(&self.contents(offset, len)))
    }

    async fn write(&self, offset: u64, data: AlignedBuf, fua: bool) -> Result<(), BlockError> {
        let _g = self.enter(offset).await;
        self.check(offset, data.len() as u64)?;
        self.fill(offset, &data);
        self.mutations.fetch_add(1, SeqCst);
        if fua {
            self.fua_writes.fetch_add(1, SeqCst);
        }
        Ok(())
    }

    async fn flush(&self) -> Result<(), BlockError> {
        let _g = self.enter(u64::MAX).await;
        self.check(0, 0)?;
        self.flushes.fetch_add(1, SeqCst);
        Ok(())
    }

    async fn trim(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        let _g = self.enter(offset).await;
        self.check(offset, len)?;
        self.zero_range(offset, len, true);
        Ok(())
    }

    async fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        may_unmap: bool,
        fua: bool,
    ) -> Result<(), BlockError> {
        let _g = self.enter(offset).await;
        self.check(offset, len)?;
        self.zero_range(offset, len, may_unmap);
        if fua {
            self.fua_writes.fetch_add(1, SeqCst);
        }
        Ok(())
    }

    async fn block_status(&self, offset: u64, len: u64) -> Result<Vec<BlockRun>, BlockError> {
        let _g = self.enter(offset).await;
        self.check(offset, len)?;
        let blocks = self.blocks.lock().expect("volume lock");
        let mut runs: Vec<BlockRun> = Vec::new();
        let (mut at, end) = (offset, offset + len);
        while at < end {
            let n = (BLOCK - at % BLOCK).min(end - at);
            let (hole, zero) = match blocks.get(&(at / BLOCK)) {
                None => (true, true),
                Some(b) => (false, b.iter().all(|&x| x == 0)),
            };
            match runs.last_mut() {
                Some(r) if r.hole == hole && r.zero == zero => r.len += n,
                _ => runs.push(BlockRun { len: n, hole, zero }),
            }
            at += n;
        }
        Ok(runs)
    }
}

/// A provider serving a fixed set of in-memory volumes.
pub struct MemProvider {
    volumes: Vec<Arc<MemVolume>>,
}

impl MemProvider {
    pub fn new(volumes: Vec<Arc<MemVolume>>) -> Arc<Self> {
        Arc::new(MemProvider { volumes })
    }
}

#[async_trait::async_trait]
impl VolumeProvider for MemProvider {
    async fn list(&self) -> Vec<VolumeSummary> {
        let mut list: Vec<_> = self
            .volumes
            .iter()
            .map(|v| VolumeSummary {
                name: v.name.clone(),
                size: v.size,
            })
            .collect();
        list.sort_by(|a, b| a.name.cmp(&b.name));
        list
    }

    async fn open(&self, name: &str) -> Result<Arc<dyn BlockVolume>, BlockError> {
        match self.volumes.iter().find(|v| v.name == name) {
            Some(v) => Ok(Arc::clone(v) as Arc<dyn BlockVolume>),
            None => Err(BlockError::NotFound(name.to_owned())),
        }
    }
}

/// A server on 127.0.0.1:0 running in the test's runtime.
pub struct TestServer {
    pub addr: SocketAddr,
    pub server: NbdServer,
    pub shutdown: CancellationToken,
    pub task: JoinHandle<Result<(), NbdError>>,
}

impl TestServer {
    pub async fn start(volumes: Vec<Arc<MemVolume>>, config: ServerConfig) -> TestServer {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind loopback");
        let addr = listener.local_addr().expect("local addr");
        let server = NbdServer::new(MemProvider::new(volumes), config).expect("valid config");
        let shutdown = CancellationToken::new();
        let task = tokio::spawn({
            let server = server.clone();
            let shutdown = shutdown.clone();
            async move { server.serve(listener, shutdown).await }
        });
        TestServer {
            addr,
            server,
            shutdown,
            task,
        }
    }

    /// Cancel and wait for `serve` to return.
    pub async fn stop(self) {
        self.shutdown.cancel();
        let r = tokio::time::timeout(TEST_TIMEOUT, self.task)
            .await
            .expect("serve did not return after shutdown")
            .expect("serve task panicked");
        r.expect("serve returned an error");
    }

    pub fn url(&self, export: &str) -> String {
        format!("nbd://{}/{}", self.addr, export)
    }
}

/// One option reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OptReply {
    pub option: u32,
    pub reply: u32,
    pub data: Vec<u8>,
}

/// One transmission reply: simple or a structured chunk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    Simple {
        error: u32,
        cookie: u64,
        data: Vec<u8>,
    },
    Chunk {
        flags: u16,
        ty: u16,
        cookie: u64,
        payload: Vec<u8>,
    },
}

impl Reply {
    /// A successful simple reply.
    pub fn ok(cookie: u64, data: Vec<u8>) -> Reply {
        Reply::Simple {
            error: 0,
            cookie,
            data,
        }
    }

    pub fn cookie(&self) -> u64 {
        match self {
            Reply::Simple { cookie, .. } | Reply::Chunk { cookie, .. } => *cookie,
        }
    }
}

/// What a negotiated session agreed on.
#[derive(Debug, Clone, Copy)]
pub struct Session {
    pub size: u64,
    pub flags: u16,
}

/// A raw NBD client over TCP.
pub struct RawClient {
    pub rd: BufReader<OwnedReadHalf>,
    pub wr: OwnedWriteHalf,
}

impl RawClient {
    /// Connect and read the server greeting; returns the handshake flags.
    pub async fn connect(addr: SocketAddr) -> (RawClient, u16) {
        let stream = TcpStream::connect(addr)
            .await
            .expect("connect to test server");
        let (rd, wr) = stream.into_split();
        let mut c = RawClient {
            rd: BufReader::new(rd),
            wr,
        };
        let magic = c.u64().await;
        assert_eq!(magic, NBDMAGIC, "greeting must start with NBDMAGIC");
        let opt = c.u64().await;
        assert_eq!(opt, IHAVEOPT, "greeting must announce newstyle negotiation");
        let flags = c.u16().await;
        (c, flags)
    }

    /// Connect, negotiate fixed newstyle with NO_ZEROES, optionally
    /// structured replies and base:allocation, and GO to `export`.
    pub async fn open(
        addr: SocketAddr,
        export: &str,
        structured: bool,
        meta: bool,
    ) -> (RawClient, Session) {
        let (mut c, _) = RawClient::connect(addr).await;
        c.send(&(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes())
            .await;
        if structured {
            c.send_option(OPT_STRUCTURED_REPLY, &[]).await;
            let r = c.read_option_reply().await;
            assert_eq!(r.reply, REP_ACK, "structured replies refused: {r:?}");
        }
        if meta {
            c.send_option(
                OPT_SET_META_CONTEXT,
                &meta_context_request(export, &[CONTEXT_BASE_ALLOCATION]),
            )
            .await;
            let replies = c.read_option_replies().await;
            assert_eq!(
                replies.len(),
                2,
                "one context then ACK expected: {replies:?}"
            );
            assert_eq!(replies[0].reply, REP_META_CONTEXT);
            assert_eq!(replies[1].reply, REP_ACK);
        }
        c.send_option(OPT_GO, &info_request(export, &[INFO_BLOCK_SIZE]))
            .await;
        let replies = c.read_option_replies().await;
        let last = replies.last().expect("GO got no reply");
        assert_eq!(last.reply, REP_ACK, "GO {export:?} failed: {replies:?}");
        let export_info = replies
            .iter()
            .find(|r| r.reply == REP_INFO && r.data[0..2] == INFO_EXPORT.to_be_bytes())
            .expect("GO must send NBD_INFO_EXPORT");
        let size = u64::from_be_bytes(export_info.data[2..10].try_into().expect("8 bytes"));
        let flags = u16::from_be_bytes([export_info.data[10], export_info.data[11]]);
        (c, Session { size, flags })
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        self.wr.write_all(bytes).await.expect("send to server");
    }

    pub async fn send_option(&mut self, option: u32, data: &[u8]) {
        let mut b = IHAVEOPT.to_be_bytes().to_vec();
        b.extend_from_slice(&option.to_be_bytes());
        b.extend_from_slice(&(data.len() as u32).to_be_bytes());
        b.extend_from_slice(data);
        self.send(&b).await;
    }

    pub async fn read_option_reply(&mut self) -> OptReply {
        let magic = self.u64().await;
        assert_eq!(magic, OPTION_REPLY_MAGIC, "bad option reply magic");
        let option = self.u32().await;
        let reply = self.u32().await;
        let len = self.u32().await as usize;
        let data = self.bytes(len).await;
        OptReply {
            option,
            reply,
            data,
        }
    }

    /// Replies up to and including the final one (ACK or an error).
    pub async fn read_option_replies(&mut self) -> Vec<OptReply> {
        let mut out = Vec::new();
        loop {
            let r = self.read_option_reply().await;
            let last = r.reply == REP_ACK || r.reply & (1 << 31) != 0;
            out.push(r);
            if last {
                return out;
            }
        }
    }

    pub async fn request(&mut self, flags: u16, command: u16, cookie: u64, offset: u64, len: u32) {
        self.send(
            &RequestHeader {
                flags,
                command,
                cookie,
                offset,
                len,
            }
            .encode(),
        )
        .await;
    }

    pub async fn write(&mut self, flags: u16, cookie: u64, offset: u64, data: &[u8]) {
        self.request(flags, CMD_WRITE, cookie, offset, data.len() as u32)
            .await;
        self.send(data).await;
    }

    /// Read one reply; `read_len` gives the payload length of a successful
    /// simple reply to the request with that cookie (0 for non-reads).
    pub async fn read_reply(&mut self, read_len: impl Fn(u64) -> usize) -> Reply {
        let magic = self.u32().await;
        match magic {
            SIMPLE_REPLY_MAGIC => {
                let error = self.u32().await;
                let cookie = self.u64().await;
                let n = if error == 0 { read_len(cookie) } else { 0 };
                let data = self.bytes(n).await;
                Reply::Simple {
                    error,
                    cookie,
                    data,
                }
            }
            STRUCTURED_REPLY_MAGIC => {
                let flags = self.u16().await;
                let ty = self.u16().await;
                let cookie = self.u64().await;
                let len = self.u32().await as usize;
                let payload = self.bytes(len).await;
                Reply::Chunk {
                    flags,
                    ty,
                    cookie,
                    payload,
                }
            }
            other => panic!("bad reply magic {other:#x}"),
        }
    }

    /// Structured chunks of one request, through the one marked DONE.
    pub async fn read_chunks(&mut self) -> Vec<Reply> {
        let mut out = Vec::new();
        loop {
            let r = self.read_reply(|_| 0).await;
            let done = matches!(r, Reply::Chunk { flags, .. } if flags & REPLY_FLAG_DONE != 0)
                || matches!(r, Reply::Simple { .. });
            out.push(r);
            if done {
                return out;
            }
        }
    }

    /// Whether the server closed the connection (EOF) within the test timeout.
    pub async fn closed_by_server(&mut self) -> bool {
        let mut buf = [0u8; 1024];
        loop {
            match tokio::time::timeout(TEST_TIMEOUT, self.rd.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return true,
                Ok(Ok(_)) => continue,
                Err(_) => return false,
            }
        }
    }

    async fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut b = vec![0u8; n];
        tokio::time::timeout(TEST_TIMEOUT, self.rd.read_exact(&mut b))
            .await
            .expect("server reply timed out")
            .expect("read from server");
        b
    }

    async fn u16(&mut self) -> u16 {
        u16::from_be_bytes(self.bytes(2).await.try_into().expect("2 bytes"))
    }

    async fn u32(&mut self) -> u32 {
        u32::from_be_bytes(self.bytes(4).await.try_into().expect("4 bytes"))
    }

    async fn u64(&mut self) -> u64 {
        u64::from_be_bytes(self.bytes(8).await.try_into().expect("8 bytes"))
    }
}

/// Reassemble a structured READ reply into bytes, or return its errno.
pub fn assemble_read(chunks: &[Reply], offset: u64, len: usize) -> Result<Vec<u8>, u32> {
    let mut out = vec![0xEEu8; len];
    let mut covered = 0usize;
    for c in chunks {
        let Reply::Chunk { ty, payload, .. } = c else {
            panic!("simple reply to a structured read")
        };
        match *ty {
            REPLY_TYPE_NONE => {}
            REPLY_TYPE_OFFSET_DATA => {
                let at = u64::from_be_bytes(payload[0..8].try_into().expect("8")) - offset;
                let data = &payload[8..];
                out[at as usize..at as usize + data.len()].copy_from_slice(data);
                covered += data.len();
            }
            REPLY_TYPE_OFFSET_HOLE => {
                let at = u64::from_be_bytes(payload[0..8].try_into().expect("8")) - offset;
                let n = u32::from_be_bytes(payload[8..12].try_into().expect("4")) as usize;
                out[at as usize..at as usize + n].fill(0);
                covered += n;
            }
            REPLY_TYPE_ERROR => {
                return Err(u32::from_be_bytes(payload[0..4].try_into().expect("4")));
            }
            other => panic!("unexpected chunk type {other}"),
        }
    }
    assert_eq!(covered, len, "read chunks cover {covered} of {len} bytes");
    Ok(out)
}

/// The errno of a reply that must be an error (simple or error chunk).
pub fn reply_errno(r: &Reply) -> u32 {
    match r {
        Reply::Simple { error, .. } => *error,
        Reply::Chunk { ty, payload, .. } if *ty == REPLY_TYPE_ERROR => {
            u32::from_be_bytes(payload[0..4].try_into().expect("4"))
        }
        other => panic!("not an error reply: {other:?}"),
    }
}

/// A recognisable pattern of `len` bytes.
pub fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| seed.wrapping_add((i % 251) as u8) | 1)
        .collect()
}
