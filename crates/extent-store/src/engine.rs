//! I/O engines: where a disk's reads, writes and syncs actually run.
//!
//! Two implementations behind one handle, [`IoEngine`]:
//! - `uring`: one io_uring per disk. The submitting task pushes its SQE and
//!   enters the kernel itself; completions are signalled on an eventfd that a
//!   reaper task awaits through tokio's reactor. No request crosses to another
//!   thread, which halves the context switches of a thread-per-ring design.
//!   Must be started inside a tokio runtime.
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
use crossbeam_channel::{Sender, bounded};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
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
            other => Err(format!(
                "unknown io engine {other:?}: use auto, uring or sync"
            )),
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
    /// The sync engine's queue.
    tx: Option<Sender<Request>>,
    kind: EngineKind,
    uring: Option<UringHandle>,
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

    fn from_parts(tx: Sender<Request>, kind: EngineKind) -> IoEngine {
        IoEngine {
            inner: Arc::new(EngineInner {
                tx: Some(tx),
                kind,
                uring: None,
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
        IoEngine::from_parts(tx, EngineKind::Sync)
    }

    fn start_uring(_name: &str) -> io::Result<IoEngine> {
        let handle = start_uring_ring()?;
        Ok(IoEngine {
            inner: Arc::new(EngineInner {
                tx: None,
                kind: EngineKind::Uring,
                uring: Some(handle),
            }),
        })
    }

    async fn submit(
        &self,
        op: Op,
        fd: RawFd,
        offset: u64,
        buf: AlignedBuf,
    ) -> (io::Result<usize>, AlignedBuf) {
        if let Some(u) = &self.inner.uring {
            return u.shared.submit(op, fd, offset, buf).await;
        }
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
        match rx.await {
            Ok(done) => done,
            Err(_) => (Err(engine_gone()), AlignedBuf::zeroed(0)),
        }
    }

    /// Read `buf.len()` bytes at `offset` (whole, or an error).
    pub async fn read_exact(
        &self,
        fd: RawFd,
        offset: u64,
        buf: AlignedBuf,
    ) -> (io::Result<()>, AlignedBuf) {
        self.rw_exact(Op::Read, fd, offset, buf).await
    }

    /// Write all of `buf` at `offset` (whole, or an error).
    pub async fn write_all(
        &self,
        fd: RawFd,
        offset: u64,
        buf: AlignedBuf,
    ) -> (io::Result<()>, AlignedBuf) {
        self.rw_exact(Op::Write, fd, offset, buf).await
    }

    async fn rw_exact(
        &self,
        op: Op,
        fd: RawFd,
        offset: u64,
        buf: AlignedBuf,
    ) -> (io::Result<()>, AlignedBuf) {
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
        self.submit(Op::Datasync, fd, 0, AlignedBuf::zeroed(0))
            .await
            .0
            .map(|_| ())
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

/// An io_uring shared by the tasks that submit to it. Submissions happen
/// inline on the submitting task's thread (one `io_uring_enter` each); the
/// kernel signals completions on an eventfd that the reaper task waits on
/// through tokio's reactor, so no I/O crosses to another thread.
struct UringShared {
    state: std::sync::Mutex<RingState>,
    /// Bounds the requests in flight to the ring's depth.
    permits: tokio::sync::Semaphore,
}

struct RingState {
    ring: io_uring::IoUring,
    slots: Vec<Option<Pending>>,
    free: Vec<usize>,
}

struct Pending {
    buf: AlignedBuf,
    reply: oneshot::Sender<(io::Result<usize>, AlignedBuf)>,
}

struct UringHandle {
    shared: Arc<UringShared>,
    /// Dropping it tells the reaper to finish.
    _stop: oneshot::Sender<()>,
}

fn start_uring_ring() -> io::Result<UringHandle> {
    use std::os::fd::{FromRawFd, OwnedFd};
    let ring = io_uring::IoUring::builder().build(QUEUE_DEPTH)?;
    // SAFETY: plain syscall; the fd is owned by OwnedFd from here on.
    let raw = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: raw is a fresh fd we own.
    let efd = unsafe { OwnedFd::from_raw_fd(raw) };
    ring.submitter().register_eventfd(efd.as_raw_fd())?;
    // SAFETY: OwnedFd keeps the eventfd open for the AsyncFd's whole life.
    let efd = unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(efd, tokio::io::Interest::READABLE)
    }
    .map_err(|e| io::Error::other(e.to_string()))?;
    let shared = Arc::new(UringShared {
        state: std::sync::Mutex::new(RingState {
            ring,
            slots: Vec::new(),
            free: Vec::new(),
        }),
        permits: tokio::sync::Semaphore::new(QUEUE_DEPTH as usize),
    });
    let (stop, stopped) = oneshot::channel();
    RINGS
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .push(Arc::downgrade(&shared));
    tokio::spawn(reap(shared.clone(), efd, stopped));
    Ok(UringHandle {
        shared,
        _stop: stop,
    })
}

impl UringShared {
    async fn submit(
        &self,
        op: Op,
        fd: RawFd,
        offset: u64,
        buf: AlignedBuf,
    ) -> (io::Result<usize>, AlignedBuf) {
        use io_uring::{opcode, types};
        let Ok(_permit) = self.permits.acquire().await else {
            return (Err(engine_gone()), buf);
        };
        let (reply, rx) = oneshot::channel();
        let mut submitted;
        {
            let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
            let st = &mut *st;
            let idx = st.free.pop().unwrap_or_else(|| {
                st.slots.push(None);
                st.slots.len() - 1
            });
            let sqe = match op {
                Op::Read => {
                    opcode::Read::new(types::Fd(fd), buf.as_ptr() as *mut u8, buf.len() as u32)
                        .offset(offset)
                        .build()
                }
                Op::Write => opcode::Write::new(types::Fd(fd), buf.as_ptr(), buf.len() as u32)
                    .offset(offset)
                    .build(),
                Op::Datasync => opcode::Fsync::new(types::Fd(fd))
                    .flags(types::FsyncFlags::DATASYNC)
                    .build(),
            }
            .user_data(idx as u64);
            // The buffer's heap memory stays put while the slot owns it.
            st.slots[idx] = Some(Pending { buf, reply });
            // SAFETY: the memory the SQE points at is owned by the slot until
            // its completion is reaped.
            while unsafe { st.ring.submission().push(&sqe) }.is_err() {
                if let Err(e) = st.ring.submit() {
                    tracing::error!(error = %e, "io_uring submit failed");
                }
            }
            submitted = st.ring.submit().is_ok();
        }
        // The SQE is in the ring and owns its buffer from here on: it can't
        // be taken back, so a failed enter (EAGAIN, EBUSY, EINTR) is retried
        // until the kernel has taken it.
        let mut tries = 0u32;
        while !submitted {
            tries += 1;
            if tries % 1000 == 1 {
                tracing::warn!(tries, "io_uring submit failing; retrying");
            }
            tokio::time::sleep(std::time::Duration::from_micros(200)).await;
            let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
            submitted = st.ring.submission().is_empty() || st.ring.submit().is_ok();
        }
        match rx.await {
            Ok(done) => done,
            Err(_) => (Err(engine_gone()), AlignedBuf::zeroed(0)),
        }
    }

    /// Hand every completed request its result.
    fn drain(&self) {
        let mut done = Vec::new();
        {
            let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
            let st = &mut *st;
            for cqe in st.ring.completion() {
                let idx = cqe.user_data() as usize;
                if let Some(p) = st.slots.get_mut(idx).and_then(Option::take) {
                    st.free.push(idx);
                    done.push((p, cqe.result()));
                }
            }
        }
        for (p, r) in done {
            let res = if r < 0 {
                Err(io::Error::from_raw_os_error(-r))
            } else {
                Ok(r as usize)
            };
            let _ = p.reply.send((res, p.buf));
        }
    }

    fn inflight(&self) -> usize {
        let st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        st.slots.len() - st.free.len()
    }
}

static RINGS: std::sync::Mutex<Vec<std::sync::Weak<UringShared>>> =
    std::sync::Mutex::new(Vec::new());

/// Called by a runtime worker about to sleep: if a ring has requests in
/// flight, spin on its completion queue for up to `spin` before letting the
/// worker sleep, so a completion that is microseconds away is handed out
/// without an eventfd and epoll round trip.
pub fn poll_before_park(spin: std::time::Duration) {
    let rings: Vec<Arc<UringShared>> = {
        let mut l = RINGS.lock().unwrap_or_else(|p| p.into_inner());
        l.retain(|w| w.strong_count() > 0);
        l.iter().filter_map(|w| w.upgrade()).collect()
    };
    let busy: Vec<&Arc<UringShared>> = rings.iter().filter(|r| r.inflight() > 0).collect();
    if busy.is_empty() {
        return;
    }
    let deadline = std::time::Instant::now() + spin;
    loop {
        let mut found = false;
        for r in &busy {
            let ready = {
                let mut st = r.state.lock().unwrap_or_else(|p| p.into_inner());
                !st.ring.completion().is_empty()
            };
            if ready {
                r.drain();
                found = true;
            }
        }
        if found || std::time::Instant::now() >= deadline {
            return;
        }
        std::hint::spin_loop();
    }
}

/// The reaper task: waits for the ring's eventfd and completes requests.
/// After the engine is dropped it finishes what is in flight, then ends.
async fn reap(
    shared: Arc<UringShared>,
    efd: tokio::io::unix::AsyncFd<std::os::fd::OwnedFd>,
    mut stopped: oneshot::Receiver<()>,
) {
    let mut stopping = false;
    loop {
        if stopping && shared.inflight() == 0 {
            return;
        }
        tokio::select! {
            r = efd.readable() => {
                let Ok(mut guard) = r else { return };
                let mut counter = [0u8; 8];
                // SAFETY: reads 8 bytes into a live buffer from our eventfd.
                let n = unsafe { libc::read(efd.get_ref().as_raw_fd(), counter.as_mut_ptr().cast(), 8) };
                if n < 0 {
                    guard.clear_ready();
                }
                shared.drain();
            }
            _ = &mut stopped, if !stopping => stopping = true,
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
            let (r, b) = e
                .read_exact(f.as_raw_fd(), i * 4096, AlignedBuf::zeroed(4096))
                .await;
            r.expect("read");
            assert!(
                b.iter().all(|&x| x == i as u8),
                "block {i} read back wrong ({choice:?})"
            );
        }
        let (r, _) = e
            .read_exact(f.as_raw_fd(), 1 << 20, AlignedBuf::zeroed(4096))
            .await;
        assert!(
            r.is_err(),
            "read past the end of the file must fail ({choice:?})"
        );
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
