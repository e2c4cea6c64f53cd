//! Test fixtures: an in-memory thin volume (a sparse map of 4 KiB blocks),
//! a provider over a set of them, and a target served on 127.0.0.1 with a
//! random port.

#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use block_api::{
    AlignedBuf, BLOCK_SIZE, BlockError, BlockRun, BlockVolume, VolumeProvider, VolumeSummary,
};
use iscsi_target::TargetConfig;
use tokio_util::sync::CancellationToken;

const BS: u64 = BLOCK_SIZE as u64;

/// A thin volume in memory: unwritten and trimmed blocks are holes.
pub struct MemVolume {
    name: String,
    size: u64,
    blocks: Mutex<HashMap<u64, Box<[u8]>>>,
}

impl MemVolume {
    pub fn new(name: &str, size: u64) -> Arc<Self> {
        assert_eq!(size % BS, 0);
        Arc::new(MemVolume {
            name: name.into(),
            size,
            blocks: Mutex::new(HashMap::new()),
        })
    }

    fn check(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        if offset.checked_add(len).is_none_or(|e| e > self.size) {
            return Err(BlockError::OutOfRange {
                offset,
                len,
                size: self.size,
            });
        }
        Ok(())
    }

    /// Zero `[offset, offset+len)`, releasing whole blocks when `unmap`.
    fn zero(&self, offset: u64, len: u64, unmap: bool) {
        let mut g = self.blocks.lock().expect("lock");
        let mut pos = offset;
        let end = offset + len;
        while pos < end {
            let b = pos / BS;
            let in_block = pos % BS;
            let n = (BS - in_block).min(end - pos);
            if n == BS && unmap {
                g.remove(&b);
            } else if let Some(blk) = g.get_mut(&b) {
                blk[in_block as usize..(in_block + n) as usize].fill(0);
            } else if !unmap {
                g.insert(b, vec![0u8; BLOCK_SIZE].into_boxed_slice());
            }
            pos += n;
        }
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
        self.check(offset, len as u64)?;
        let mut out = AlignedBuf::zeroed(len);
        let g = self.blocks.lock().expect("lock");
        let mut pos = offset;
        let end = offset + len as u64;
        while pos < end {
            let b = pos / BS;
            let in_block = pos % BS;
            let n = (BS - in_block).min(end - pos);
            if let Some(blk) = g.get(&b) {
                let o = (pos - offset) as usize;
                out[o..o + n as usize]
                    .copy_from_slice(&blk[in_block as usize..(in_block + n) as usize]);
            }
            pos += n;
        }
        Ok(out)
    }
    async fn write(&self, offset: u64, data: AlignedBuf, _fua: bool) -> Result<(), BlockError> {
        self.check(offset, data.len() as u64)?;
        let mut g = self.blocks.lock().expect("lock");
        let mut pos = offset;
        let end = offset + data.len() as u64;
        while pos < end {
            let b = pos / BS;
            let in_block = pos % BS;
            let n = (BS - in_block).min(end - pos);
            let blk = g
                .entry(b)
                .or_insert_with(|| vec![0u8; BLOCK_SIZE].into_boxed_slice());
            let o = (pos - offset) as usize;
            blk[in_block as usize..(in_block + n) as usize]
                .copy_from_slice(&data[o..o + n as usize]);
            pos += n;
        }
        Ok(())
    }
    async fn flush(&self) -> Result<(), BlockError> {
        Ok(())
    }
    async fn trim(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        self.check(offset, len)?;
        self.zero(offset, len, true);
        Ok(())
    }
    async fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        may_unmap: bool,
        _fua: bool,
    ) -> Result<(), BlockError> {
        self.check(offset, len)?;
        self.zero(offset, len, may_unmap);
        Ok(())
    }
    async fn block_status(&self, offset: u64, len: u64) -> Result<Vec<BlockRun>, BlockError> {
        self.check(offset, len)?;
        let g = self.blocks.lock().expect("lock");
        let mut runs: Vec<BlockRun> = Vec::new();
        let mut pos = offset;
        let end = offset + len;
        while pos < end {
            let b = pos / BS;
            let n = (BS - pos % BS).min(end - pos);
            let hole = !g.contains_key(&b);
            match runs.last_mut() {
                Some(r) if r.hole == hole => r.len += n,
                _ => runs.push(BlockRun {
                    len: n,
                    hole,
                    zero: hole,
                }),
            }
            pos += n;
        }
        Ok(runs)
    }
}

pub struct MemProvider {
    pub volumes: BTreeMap<String, Arc<MemVolume>>,
}

#[async_trait::async_trait]
impl VolumeProvider for MemProvider {
    async fn list(&self) -> Vec<VolumeSummary> {
        self.volumes
            .values()
            .map(|v| VolumeSummary {
                name: v.name.clone(),
                size: v.size,
            })
            .collect()
    }
    async fn open(&self, name: &str) -> Result<Arc<dyn BlockVolume>, BlockError> {
        match self.volumes.get(name) {
            Some(v) => Ok(v.clone()),
            None => Err(BlockError::NotFound(name.to_string())),
        }
    }
}

/// A target serving `volumes` (name, size) on 127.0.0.1 with its own
/// runtime thread; dropped, it shuts down.
pub struct TestTarget {
    pub addr: SocketAddr,
    pub provider: Arc<MemProvider>,
    shutdown: CancellationToken,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl TestTarget {
    pub fn start(volumes: &[(&str, u64)], config: TargetConfig) -> Self {
        let provider = Arc::new(MemProvider {
            volumes: volumes
                .iter()
                .map(|(n, s)| (n.to_string(), MemVolume::new(n, *s)))
                .collect(),
        });
        let shutdown = CancellationToken::new();
        let (tx, rx) = std::sync::mpsc::channel();
        let p = provider.clone();
        let token = shutdown.clone();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let l = tokio::net::TcpListener::bind("127.0.0.1:0")
                    .await
                    .expect("bind");
                tx.send(l.local_addr().expect("addr")).expect("send addr");
                iscsi_target::serve(l, p, config, token)
                    .await
                    .expect("serve");
            });
        });
        let addr = rx.recv().expect("target address");
        TestTarget {
            addr,
            provider,
            shutdown,
            thread: Some(thread),
        }
    }

    pub fn url(&self, volume: &str) -> String {
        format!("iscsi://{}/iqn.2026-01.io.s2d:{volume}/0", self.addr)
    }
}

impl Drop for TestTarget {
    fn drop(&mut self) {
        self.shutdown.cancel();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Whether `bin` is on PATH; prints a loud notice when it is not.
pub fn have(bin: &str) -> bool {
    let ok = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {bin}"))
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        eprintln!(
            "\n!!!!! SKIPPED: `{bin}` is not installed (apt-get install libiscsi-bin qemu-utils qemu-block-extra) !!!!!\n"
        );
    }
    ok
}

/// Run a command with a timeout, returning (success, stdout+stderr).
pub fn run(cmd: &str, args: &[&str], timeout_s: u64) -> (bool, String) {
    let out = std::process::Command::new("timeout")
        .arg(timeout_s.to_string())
        .arg(cmd)
        .args(args)
        .output()
        .expect("spawn");
    let mut s = String::from_utf8_lossy(&out.stdout).into_owned();
    s.push_str(&String::from_utf8_lossy(&out.stderr));
    (out.status.success(), s)
}
