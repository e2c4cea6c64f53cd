//! I/O engines: where a disk's reads, writes and syncs actually run.
//!
//! Two implementations behind one handle, [`IoEngine`]:
//! - `uring`: one thread per disk owning an io_uring; requests arrive over a
//!   bounded channel and the thread sleeps in `io_uring_enter` when idle,
//!   woken through an eventfd that is itself a read in the ring.
//! - `sync`: a pool of threads per disk doing `pread`/`pwrite`/`fdatasync`,
//!   used where io_uring is unavailable and forced by `--io-engine sync`.
//!
//! Invariants: every request gets exactly one reply, also when the engine
//! shuts down (the channel closes and each queued request is answered or
//! dropped, which the caller sees as [`std::io::ErrorKind::BrokenPipe`]);
//! buffers travel with their request and come back with the reply, so no
//! I/O ever touches memory its caller still uses. The number of requests in
//! flight per disk is bounded by [`QUEUE_DEPTH`] and the channel capacity.

use block_api::AlignedBuf;
use crossbeam_channel::{Receiver, Sender, TryRecvError, bounded};
use std::io;
use std::os::fd::RawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering, fence};
use tokio::sync::oneshot;

/// Requests one ring keeps in flight at most.
pub const QUEUE_DEPTH: u32 = 128;
/// Requests waiting in a disk's queue at most before callers wait.
const CHANNEL_CAPACITY: usize = 1024;
/// Worker threads of the sync engine, per disk.
const SYNC_THREADS: usize = 32;

/// Which engine to run, as chosen by `--io-engine`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EngineChoice {
    /// io_uring when the kernel allows it, otherwise sync.
    Auto,
    Uring,
    Sync,
}

impl std::str::FromStr for EngineChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(EngineChoice::Auto),
            "uring" => Ok(EngineChoice::Uring),
            "sync" => Ok(EngineChoice::Sync),
            other => Err(format!("unknown io engine {other:?}: use auto, uring or sync")),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EngineKind {
    Uring,
    Sync,
}

impl std::fmt::Display for EngineKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            EngineKind::Uring => "uring",
            EngineKind::Sync => "sync",
        })
    }
}

#[derive(Debug, Clone, Copy)]
enum Op {
    Read,
    Write,
    Datasync,
}

struct Request {
    op: Op,
    fd: RawFd,
    offset: u64,
    buf: AlignedBuf,
    reply: oneshot::Sender<(io::Result<usize>, AlignedBuf)>,
}

/// Handle to one disk's engine. Cloning shares the engine; the engine's
/// threads end when the last handle is dropped and queued work is done.
#[derive(Clone)]
pub struct IoEngine {
    inner: Arc<EngineInner>,
}

struct EngineInner {
    tx: Option<Sender<Request>>,
    kind: EngineKind,
    waker: Option<Arc<UringWaker>>,
}

impl Drop for EngineInner {
    fn drop(&mut self) {
        // Close the channel, then wake the ring thread so it sees it closed.
        self.tx.take();
        if let Some(w) = &self.waker {
            w.sleeping.store(true, Ordering::SeqCst);
            w.wake();
        }
    }
}

impl IoEngine {
    /// Start an engine. `Auto` tries io_uring first and falls back to sync.
    pub fn start(choice: EngineChoice, name: &str) -> io::Result<IoEngine> {
        match choice {
            EngineChoice::Sync => Ok(Self::start_sync(name)),
            EngineChoice::Uring => Self::start_uring(name),
            EngineChoice::Auto => match Self::start_uring(name) {
                Ok(e) => Ok(e),
                Err(e) => {
                    tracing::warn!(error = %e, "io_uring unavailable, using the sync engine");
                    Ok(Self::start_sync(name))
                }
            },
        }
    }

    fn from_parts(tx: Sender<Request>, kind: EngineKind, waker: Option<Arc<UringWaker>>) -> IoEngine {
        IoEngine {
            inner: Arc::new(EngineInner {
                tx: Some(tx),
                kind,
                waker,
            }),
        }
    }

    pub fn kind(&self) -> EngineKind {
        self.inner.kind
    }

    fn start_sync(name: &str) -> IoEngine {
        let (tx, rx) = bounded::<Request>(CHANNEL_CAPACITY);
        for i in 0..SYNC_THREADS {
            let rx = rx.clone();
            // A failed spawn leaves fewer workers; the engine still works with one.
            let spawned = std::thread::Builder::new()
                .name(format!("io-sync-{name}-{i}"))
                .spawn(move || {
                    while let Ok(mut r) = rx.recv() {
                        let res = run_sync(r.op, r.fd, r.offset, &mut r.buf);
                        let _ = r.reply.send((res, r.buf));
                    }
                });
            if let Err(e) = spawned {
                tracing::warn!(error = %e, "could not start an I/O worker thread");
            }
        }
        IoEngine::from_parts(tx, EngineKind::Sync, None)
    }

    fn start_uring(name: &str) -> io::Result<IoEngine> {
        let ring = io_uring::IoUring::new(QUEUE_DEPTH * 2)?;
        // SAFETY: plain syscall; the fd is owned by UringWaker from here on.
        let efd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if efd < 0 {
            return Err(io::Error::last_os_error());
        }
        let waker = Arc::new(UringWaker {
            efd,
            sleeping: AtomicBool::new(false),
        });
        let (tx, rx) = bounded::<Request>(CHANNEL_CAPACITY);
        let w = waker.clone();
        std::thread::Builder::new()
            .name(format!("io-uring-{name}"))
            .spawn(move || uring_loop(ring, rx, w))?;
        Ok(IoEngine::from_parts(tx, EngineKind::Uring, Some(waker)))
    }

    async fn submit(&self, op: Op, fd: RawFd, offset: u64, buf: AlignedBuf) -> (io::Result<usize>, AlignedBuf) {
        let (reply, rx) = oneshot::channel();
        let req = Request {
            op,
            fd,
            offset,
            buf,
            reply,
        };
        let Some(tx) = self.inner.tx.as_ref() else {
            return (Err(engine_gone()), req.buf);
        };
        let req = match tx.try_send(req) {
            Ok(()) => None,
            Err(crossbeam_channel::TrySendError::Full(r)) => Some(r),
            Err(crossbeam_channel::TrySendError::Disconnected(r)) => {
                return (Err(engine_gone()), r.buf);
            }
        };
        if let Some(req) = req {
            // The queue is full: wait for room off the async threads.
            let tx = tx.clone();
            match tokio::task::spawn_blocking(move || tx.send(req).map_err(|e| e.0)).await {
                Ok(Ok(())) => {}
                Ok(Err(r)) => return (Err(engine_gone()), r.buf),
                Err(_) => return (Err(engine_gone()), AlignedBuf::zeroed(0)),
            }
        }
        if let Some(w) = &self.inner.waker {
            w.wake();
        }
        match rx.await {
            Ok(done) => done,
            Err(_) => (Err(engine_gone()), AlignedBuf::zeroed(0)),
        }
    }

    /// Read `buf.len()` bytes at `offset` (whole, or an error).
    pub async fn read_exact(&self, fd: RawFd, offset: u64, buf: AlignedBuf) -> (io::Result<()>, AlignedBuf) {
        self.rw_exact(Op::Read, fd, offset, buf).await
    }

    /// Write all of `buf` at `offset` (whole, or an error).
    pub async fn write_all(&self, fd: RawFd, offset: u64, buf: AlignedBuf) -> (io::Result<()>, AlignedBuf) {
        self.rw_exact(Op::Write, fd, offset, buf).await
    }

    async fn rw_exact(&self, op: Op, fd: RawFd, offset: u64, buf: AlignedBuf) -> (io::Result<()>, AlignedBuf) {
        let want = buf.len();
        let (res, buf) = self.submit(op, fd, offset, buf).await;
        match res {
            Ok(n) if n == want => (Ok(()), buf),
            // O_DIRECT transfers on our aligned, in-bounds ranges are whole;
            // a short one means the device ended or misbehaved.
            Ok(n) => (
                Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("short transfer: {n} of {want} bytes at offset {offset}"),
                )),
                buf,
            ),
            Err(e) => (Err(e), buf),
        }
    }

    /// fdatasync the file behind `fd`.
    pub async fn datasync(&self, fd: RawFd) -> io::Result<()> {
        self.submit(Op::Datasync, fd, 0, AlignedBuf::zeroed(0)).await.0.map(|_| ())
    }
}

fn engine_gone() -> io::Error {
    io::Error::new(io::ErrorKind::BrokenPipe, "I/O engine stopped")
}

fn run_sync(op: Op, fd: RawFd, offset: u64, buf: &mut AlignedBuf) -> io::Result<usize> {
    let off = offset as libc::off_t;
    // SAFETY: buf is valid for buf.len() bytes and exclusively ours.
    let r = unsafe {
        match op {
            Op::Read => libc::pread(fd, buf.as_mut_ptr().cast(), buf.len(), off),
            Op::Write => libc::pwrite(fd, buf.as_ptr().cast(), buf.len(), off),
            Op::Datasync => libc::fdatasync(fd) as isize,
        }
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as usize)
    }
}

struct UringWaker {
    efd: RawFd,
    /// Set by the ring thread just before it sleeps.
    sleeping: AtomicBool,
}

impl UringWaker {
    fn wake(&self) {
        fence(Ordering::SeqCst);
        if self.sleeping.swap(false, Ordering::SeqCst) {
            let one: u64 = 1;
            // SAFETY: writes 8 bytes from a live u64 to our eventfd.
            unsafe { libc::write(self.efd, (&one as *const u64).cast(), 8) };
        }
    }
}

impl Drop for UringWaker {
    fn drop(&mut self) {
        // SAFETY: the fd is ours and no longer used.
        unsafe { libc::close(self.efd) };
    }
}

const EVENTFD_TOKEN: u64 = u64::MAX;

fn uring_loop(mut ring: io_uring::IoUring, rx: Receiver<Request>, waker: Arc<UringWaker>) {
    use io_uring::{opcode, types};
    let mut slots: Vec<Option<Request>> = Vec::new();
    let mut free: Vec<usize> = Vec::new();
    let mut inflight: u32 = 0;
    // Heap-allocated and leaked at exit: the kernel may still own the
    // pending eventfd read when the ring is torn down.
    let efd_buf: &'static mut [u8; 8] = Box::leak(Box::new([0u8; 8]));
    let mut efd_armed = false;
    let mut closed = false;
    loop {
        if !efd_armed {
            let sqe = opcode::Read::new(types::Fd(waker.efd), efd_buf.as_mut_ptr(), 8)
                .build()
                .user_data(EVENTFD_TOKEN);
            // SAFETY: efd_buf lives for the whole loop; the ring is drained before return.
            if unsafe { ring.submission().push(&sqe) }.is_ok() {
                efd_armed = true;
            }
        }
        // Take new requests while the ring has room.
        while !closed && inflight < QUEUE_DEPTH {
            match rx.try_recv() {
                Ok(req) => {
                    let idx = free.pop().unwrap_or_else(|| {
                        slots.push(None);
                        slots.len() - 1
                    });
                    let sqe = match req.op {
                        Op::Read => opcode::Read::new(
                            types::Fd(req.fd),
                            req.buf.as_ptr() as *mut u8,
                            req.buf.len() as u32,
                        )
                        .offset(req.offset)
                        .build(),
                        Op::Write => opcode::Write::new(types::Fd(req.fd), req.buf.as_ptr(), req.buf.len() as u32)
                            .offset(req.offset)
                            .build(),
                        Op::Datasync => opcode::Fsync::new(types::Fd(req.fd))
                            .flags(types::FsyncFlags::DATASYNC)
                            .build(),
                    }
                    .user_data(idx as u64);
                    slots[idx] = Some(req);
                    // SAFETY: the buffer is owned by the slot until its completion.
                    while unsafe { ring.submission().push(&sqe) }.is_err() {
                        if let Err(e) = ring.submit() {
                            tracing::error!(error = %e, "io_uring submit failed");
                        }
                    }
                    inflight += 1;
                }
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => closed = true,
            }
        }
        if closed && inflight == 0 {
            return;
        }
        let mut wait = 1;
        if !closed && inflight < QUEUE_DEPTH {
            waker.sleeping.store(true, Ordering::SeqCst);
            fence(Ordering::SeqCst);
            if !rx.is_empty() {
                waker.sleeping.store(false, Ordering::SeqCst);
                wait = 0;
            }
        }
        if let Err(e) = ring.submit_and_wait(wait)
            && e.raw_os_error() != Some(libc::EINTR)
        {
            tracing::error!(error = %e, "io_uring wait failed");
        }
        waker.sleeping.store(false, Ordering::SeqCst);
        for cqe in ring.completion() {
            let ud = cqe.user_data();
            if ud == EVENTFD_TOKEN {
                efd_armed = false;
                continue;
            }
            let idx = ud as usize;
            if let Some(req) = slots.get_mut(idx).and_then(Option::take) {
                inflight -= 1;
                free.push(idx);
                let r = cqe.result();
                let res = if r < 0 {
                    Err(io::Error::from_raw_os_error(-r))
                } else {
                    Ok(r as usize)
                };
                let _ = req.reply.send((res, req.buf));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::OpenOptionsExt;

    async fn round_trip(choice: EngineChoice) {
        let dir = tempfile::tempdir_in("/var/tmp").expect("tempdir");
        let path = dir.path().join("d");
        let f = std::fs::OpenOptions::new()
            .create(true)
            .read(true)
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(&path)
            .expect("open");
        f.set_len(1 << 20).expect("set_len");
        let e = IoEngine::start(choice, "t").expect("engine");
        let mut tasks = Vec::new();
        for i in 0..64u64 {
            let e = e.clone();
            let fd = f.as_raw_fd();
            tasks.push(tokio::spawn(async move {
                let b = AlignedBuf::from_slice(&[i as u8; 4096]);
                let (r, _) = e.write_all(fd, i * 4096, b).await;
                r.expect("write");
            }));
        }
        for t in tasks {
            t.await.expect("join");
        }
        e.datasync(f.as_raw_fd()).await.expect("sync");
        for i in 0..64u64 {
            let (r, b) = e.read_exact(f.as_raw_fd(), i * 4096, AlignedBuf::zeroed(4096)).await;
            r.expect("read");
            assert!(b.iter().all(|&x| x == i as u8), "block {i} read back wrong ({choice:?})");
        }
        let (r, _) = e.read_exact(f.as_raw_fd(), 1 << 20, AlignedBuf::zeroed(4096)).await;
        assert!(r.is_err(), "read past the end of the file must fail ({choice:?})");
    }

    #[tokio::test]
    async fn uring_engine_writes_and_reads_back() {
        round_trip(EngineChoice::Uring).await;
    }

    #[tokio::test]
    async fn sync_engine_writes_and_reads_back() {
        round_trip(EngineChoice::Sync).await;
    }
}
