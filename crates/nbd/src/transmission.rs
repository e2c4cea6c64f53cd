//! The transmission phase: requests in, replies out, concurrently.
//!
//! Shape: the connection task reads and validates requests
//! ([`read_requests`]) and spawns one task per valid request, which calls the
//! volume; a writer task ([`write_replies`]) owns the socket's write half and
//! sends replies as they complete, so replies go out of order. Replies are
//! coalesced in a buffer that is flushed whenever the reply queue runs empty.
//!
//! Invariants:
//! - A request is read past its header only after it took a request slot
//!   and, for READ and WRITE, its payload bytes (for BLOCK_STATUS, its
//!   largest reply) from the connection's [`Limits`]; both return when its
//!   reply is in the socket buffer. So one client holds at most
//!   `inflight_requests_max` requests and `inflight_bytes_max` payload and
//!   reply bytes of server memory (all clients together at most
//!   `server_inflight_bytes_max`), and the reply
//!   channel (as large as the request limit) never blocks a sender for long.
//! - A request that fails validation reaches no volume; a WRITE's payload is
//!   still consumed (without buffering it) so the stream stays in sync.
//! - Every admitted request gets exactly one reply, unless the connection
//!   dies; DISC gets none. A READ reply carries exactly the requested bytes
//!   or an error, never a short payload that would desynchronise the client.
//! - Bad request magic ends the connection (the stream cannot be resynced)
//!   once the replies of requests already admitted are written.

use std::sync::Arc;

use block_api::{AlignedBuf, BlockError, BlockRun, BlockVolume};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufWriter};
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::handshake::{BASE_ALLOCATION_ID, Negotiated, discard, truncate};
use crate::proto::*;
use crate::{NbdError, ServerConfig, ServerStats};

/// Socket write buffer: room for a QD32 burst of 4 KiB read replies.
const WRITE_BUFFER_BYTES: usize = 256 << 10;
/// Block status descriptors sent at most in one reply (the spec allows 2^20).
const DESCRIPTORS_MAX: usize = 1 << 19;
/// Bytes of the export one BLOCK_STATUS asks the volume about at most (the
/// spec lets a reply cover less than asked). With 4 KiB blocks the volume's
/// answer and our reply stay within `DESCRIPTORS_MAX` runs.
const BLOCK_STATUS_SPAN_MAX: u32 = 1 << 30;
const _: () = assert!((BLOCK_STATUS_SPAN_MAX as usize / HOLE_GRANULE) + 2 <= DESCRIPTORS_MAX);
/// Granularity at which structured reads report zero blocks as holes.
const HOLE_GRANULE: usize = 4096;

/// Admission limits: per connection, and the server-wide byte limit.
struct Limits {
    requests: Semaphore,
    bytes: Semaphore,
    server_bytes: Arc<Semaphore>,
}

/// One admitted request's share of the limits, returned on drop.
pub(crate) struct Admission {
    limits: Arc<Limits>,
    bytes: u32,
}

impl Drop for Admission {
    fn drop(&mut self) {
        self.limits.requests.add_permits(1);
        if self.bytes > 0 {
            self.limits.bytes.add_permits(self.bytes as usize);
            self.limits.server_bytes.add_permits(self.bytes as usize);
        }
    }
}

impl Limits {
    fn new(cfg: &ServerConfig, server_bytes: &Arc<Semaphore>) -> Arc<Self> {
        Arc::new(Limits {
            requests: Semaphore::new(cfg.inflight_requests_max),
            bytes: Semaphore::new(cfg.inflight_bytes_max),
            server_bytes: Arc::clone(server_bytes),
        })
    }

    /// Wait for a request slot and `bytes` payload bytes. `None` only if the
    /// semaphores were closed, which this module never does.
    async fn admit(self: &Arc<Self>, bytes: u32) -> Option<Admission> {
        let slot = self.requests.acquire().await.ok()?;
        if bytes > 0 {
            // Per connection first: a client over its own limit never
            // queues on the server-wide one.
            let own = self.bytes.acquire_many(bytes).await.ok()?;
            self.server_bytes.acquire_many(bytes).await.ok()?.forget();
            own.forget();
        }
        slot.forget();
        Some(Admission {
            limits: Arc::clone(self),
            bytes,
        })
    }
}

/// State every request task of a connection shares.
struct Ctx {
    volume: Arc<dyn BlockVolume>,
    structured: bool,
    base_allocation: bool,
    stats: Arc<ServerStats>,
}

pub(crate) struct Reply {
    cookie: u64,
    body: Body,
    _admission: Admission,
}

enum Body {
    /// Success without payload.
    Ok,
    /// Success of a zero-length READ.
    EmptyRead,
    Error {
        errno: u32,
        message: String,
    },
    Data {
        offset: u64,
        data: AlignedBuf,
        df: bool,
    },
    /// A whole `NBD_REPLY_TYPE_BLOCK_STATUS` payload.
    BlockStatus {
        payload: Vec<u8>,
    },
}

/// Aborts the task when dropped, so a cut connection leaves no writer behind.
struct AbortOnDrop<T>(JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Serve requests until the client disconnects, breaks the protocol, or the
/// server shuts down; then wait for the in-flight replies to be written.
pub(crate) async fn run<R, W>(
    rd: &mut R,
    wr: W,
    negotiated: Negotiated,
    cfg: &ServerConfig,
    server_bytes: &Arc<Semaphore>,
    shutdown: &CancellationToken,
    stats: &Arc<ServerStats>,
) -> Result<(), NbdError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let stop = shutdown.child_token();
    let (tx, rx) = mpsc::channel(cfg.inflight_requests_max);
    let mut writer = AbortOnDrop(tokio::spawn(write_replies(
        wr,
        rx,
        negotiated.structured,
        stop.clone(),
    )));
    let ctx = Arc::new(Ctx {
        volume: negotiated.volume,
        structured: negotiated.structured,
        base_allocation: negotiated.base_allocation,
        stats: Arc::clone(stats),
    });
    let read_result = read_requests(rd, &ctx, &Limits::new(cfg, server_bytes), &tx, &stop).await;
    if matches!(read_result, Err(NbdError::BadMagic { .. })) {
        stats.protocol_error();
    }
    drop(tx);
    let write_result = match (&mut writer.0).await {
        Ok(r) => r,
        Err(e) => Err(NbdError::Task(e.to_string())),
    };
    read_result.and(write_result)
}

async fn read_requests<R: AsyncRead + Unpin>(
    rd: &mut R,
    ctx: &Arc<Ctx>,
    limits: &Arc<Limits>,
    tx: &mpsc::Sender<Reply>,
    stop: &CancellationToken,
) -> Result<(), NbdError> {
    let mut header = [0u8; REQUEST_HEADER_LEN];
    // One registration with the token for the connection's life: creating
    // a `cancelled()` future per request costs a lock on the token twice.
    let cancelled = stop.cancelled();
    tokio::pin!(cancelled);
    loop {
        tokio::select! {
            biased;
            _ = &mut cancelled => return Ok(()),
            r = rd.read_exact(&mut header) => match r {
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                    tracing::debug!("client closed the connection without NBD_CMD_DISC");
                    return Ok(());
                }
                Err(e) => return Err(e.into()),
            },
        }
        let req = RequestHeader::parse(&header).map_err(|magic| NbdError::BadMagic {
            expected: "request",
            magic: magic.into(),
        })?;
        ctx.stats.request();
        if req.command == CMD_DISC {
            tracing::debug!("client sent NBD_CMD_DISC");
            return Ok(());
        }

        let check = validate(ctx, &req);
        let payload_bytes = match (&check, req.command) {
            (Ok(()), CMD_READ | CMD_WRITE) => req.len,
            (Ok(()), CMD_BLOCK_STATUS) => block_status_reply_bytes(req.len),
            _ => 0,
        };
        let admission = tokio::select! {
            biased;
            _ = &mut cancelled => return Ok(()),
            a = limits.admit(payload_bytes) => a,
        };
        let Some(admission) = admission else {
            return Ok(());
        };

        let immediate = match check {
            Err((errno, message)) => {
                tracing::debug!(
                    command = command_name(req.command),
                    offset = req.offset,
                    len = req.len,
                    errno,
                    %message,
                    "request refused"
                );
                ctx.stats.request_error();
                Some(Body::Error { errno, message })
            }
            Ok(()) if req.len == 0 && req.command != CMD_FLUSH => {
                Some(if req.command == CMD_READ {
                    Body::EmptyRead
                } else {
                    Body::Ok
                })
            }
            Ok(()) => None,
        };
        if let Some(body) = immediate {
            if req.command == CMD_WRITE && req.len > 0 {
                tokio::select! {
                    biased;
                    _ = &mut cancelled => return Ok(()),
                    r = discard(rd, req.len.into()) => r?,
                }
            }
            let reply = Reply {
                cookie: req.cookie,
                body,
                _admission: admission,
            };
            if tx.send(reply).await.is_err() {
                return Ok(());
            }
            continue;
        }

        let payload = if req.command == CMD_WRITE {
            let mut buf = AlignedBuf::for_overwrite(req.len as usize);
            tokio::select! {
                biased;
                _ = &mut cancelled => return Ok(()),
                r = rd.read_exact(&mut buf) => { r?; }
            }
            Some(buf)
        } else {
            None
        };
        let ctx = Arc::clone(ctx);
        let tx = tx.clone();
        tokio::spawn(async move {
            let body = execute(&ctx, req, payload).await;
            // A send error means the connection is gone; nothing to tell.
            let _ = tx
                .send(Reply {
                    cookie: req.cookie,
                    body,
                    _admission: admission,
                })
                .await;
        });
    }
}

/// Check a request against the protocol and the export before any work.
fn validate(ctx: &Ctx, req: &RequestHeader) -> Result<(), (u32, String)> {
    let name = command_name(req.command);
    let extra_flags = match req.command {
        CMD_READ if ctx.structured => CMD_FLAG_DF,
        CMD_READ | CMD_WRITE | CMD_FLUSH | CMD_TRIM | CMD_CACHE => 0,
        CMD_WRITE_ZEROES => CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
        CMD_BLOCK_STATUS => CMD_FLAG_REQ_ONE,
        other => return Err((EINVAL, format!("unknown command {other}"))),
    };
    if req.flags & !(CMD_FLAG_FUA | extra_flags) != 0 {
        return Err((
            EINVAL,
            format!("flags {:#x} are not valid for {name}", req.flags),
        ));
    }
    match req.command {
        CMD_READ | CMD_WRITE if req.len > PAYLOAD_MAX => {
            let errno = if req.command == CMD_READ && ctx.structured {
                EOVERFLOW
            } else {
                EINVAL
            };
            return Err((
                errno,
                format!("{name} of {} bytes exceeds {PAYLOAD_MAX}", req.len),
            ));
        }
        CMD_BLOCK_STATUS if !ctx.base_allocation => {
            return Err((EINVAL, "no metadata context was negotiated".into()));
        }
        CMD_BLOCK_STATUS if req.len == 0 => {
            return Err((EINVAL, "BLOCK_STATUS of zero length".into()));
        }
        CMD_FLUSH => return Ok(()),
        _ => {}
    }
    let size = ctx.volume.size();
    if req
        .offset
        .checked_add(req.len.into())
        .is_none_or(|end| end > size)
    {
        let errno = match req.command {
            CMD_WRITE | CMD_WRITE_ZEROES => ENOSPC,
            _ => EINVAL,
        };
        let msg = format!(
            "{name} [{}, +{}) is past the end ({size} bytes)",
            req.offset, req.len
        );
        return Err((errno, msg));
    }
    Ok(())
}

/// Carry out one validated request on the volume.
async fn execute(ctx: &Ctx, req: RequestHeader, payload: Option<AlignedBuf>) -> Body {
    let fua = req.flags & CMD_FLAG_FUA != 0;
    let (offset, len) = (req.offset, u64::from(req.len));
    let volume = &*ctx.volume;
    let result: Result<Body, BlockError> = match req.command {
        CMD_READ => match volume.read(offset, req.len as usize).await {
            Ok(data) if data.len() == req.len as usize => {
                ctx.stats.read_bytes(len);
                let df = req.flags & CMD_FLAG_DF != 0;
                Ok(Body::Data { offset, data, df })
            }
            Ok(data) => Err(BlockError::Io(format!(
                "volume returned {} bytes for a read of {len}",
                data.len()
            ))),
            Err(e) => Err(e),
        },
        CMD_WRITE => match payload {
            Some(data) => volume.write(offset, data, fua).await.map(|()| {
                ctx.stats.written_bytes(len);
                Body::Ok
            }),
            None => Err(BlockError::Io("write without payload".into())),
        },
        CMD_FLUSH => volume.flush().await.map(|()| Body::Ok),
        CMD_TRIM => match volume.trim(offset, len).await {
            Ok(()) if fua => volume.flush().await.map(|()| Body::Ok),
            other => other.map(|()| Body::Ok),
        },
        CMD_WRITE_ZEROES => {
            let no_hole = req.flags & CMD_FLAG_NO_HOLE != 0;
            if req.flags & CMD_FLAG_FAST_ZERO != 0 && no_hole {
                // Zeroing that must stay allocated writes every block: no
                // faster than a WRITE, so fail fast as the spec asks.
                ctx.stats.request_error();
                return Body::Error {
                    errno: ENOTSUP,
                    message: "fast zero is not possible without punching holes".into(),
                };
            }
            volume
                .write_zeroes(offset, len, !no_hole, fua)
                .await
                .map(|()| Body::Ok)
        }
        CMD_BLOCK_STATUS => {
            let span = req.len.min(BLOCK_STATUS_SPAN_MAX);
            let req_one = req.flags & CMD_FLAG_REQ_ONE != 0;
            volume
                .block_status(offset, span.into())
                .await
                .map(|runs| Body::BlockStatus {
                    payload: encode_block_status(&runs, span, req_one),
                })
        }
        // CACHE is a hint; the range was checked, there is nothing to do.
        CMD_CACHE => Ok(Body::Ok),
        other => Err(BlockError::Io(format!("command {other} reached execution"))),
    };
    result.unwrap_or_else(|e| {
        ctx.stats.request_error();
        tracing::warn!(
            volume = volume.name(),
            command = command_name(req.command),
            offset,
            len,
            error = %e,
            "volume request failed"
        );
        Body::Error {
            errno: wire_errno(e.errno()),
            message: e.to_string(),
        }
    })
}

/// The reply memory a BLOCK_STATUS of `len` bytes is charged: one
/// descriptor per 4 KiB block of the span it asks about, plus the edges.
fn block_status_reply_bytes(len: u32) -> u32 {
    let span = len.min(BLOCK_STATUS_SPAN_MAX) as usize;
    (4 + 8 * (span / HOLE_GRANULE + 2)) as u32
}

/// Encode the `base:allocation` chunk for `runs`, covering at most `len`
/// bytes (exactly one descriptor with `req_one`), merging equal neighbours.
fn encode_block_status(runs: &[BlockRun], len: u32, req_one: bool) -> Vec<u8> {
    let max = if req_one { 1 } else { DESCRIPTORS_MAX };
    let mut payload = Vec::with_capacity(4 + 8 * runs.len().clamp(1, max));
    payload.extend_from_slice(&BASE_ALLOCATION_ID.to_be_bytes());
    let mut count = 0;
    let mut remaining = u64::from(len);
    // The descriptor being built: (length, flags).
    let mut current: Option<(u64, u32)> = None;
    for run in runs.iter().filter(|r| r.len > 0) {
        if remaining == 0 {
            break;
        }
        let flags = (u32::from(run.hole) * STATE_HOLE) | (u32::from(run.zero) * STATE_ZERO);
        let n = run.len.min(remaining);
        remaining -= n;
        match &mut current {
            Some((l, f)) if *f == flags => *l += n,
            _ => {
                if let Some((l, f)) = current.take() {
                    push_descriptor(&mut payload, l, f);
                    count += 1;
                    if count == max {
                        return payload;
                    }
                }
                current = Some((n, flags));
            }
        }
    }
    match current {
        Some((l, f)) => push_descriptor(&mut payload, l, f),
        // The spec needs at least one descriptor; status 0 is always safe.
        None => push_descriptor(&mut payload, u64::from(len), 0),
    }
    payload
}

fn push_descriptor(payload: &mut Vec<u8>, len: u64, flags: u32) {
    // Descriptors never exceed the request length, which is a u32.
    let len = u32::try_from(len).unwrap_or(u32::MAX);
    payload.extend_from_slice(&len.to_be_bytes());
    payload.extend_from_slice(&flags.to_be_bytes());
}

/// Own the write half: send replies as they arrive, flush when idle.
async fn write_replies<W: AsyncWrite + Unpin>(
    wr: W,
    mut rx: mpsc::Receiver<Reply>,
    structured: bool,
    stop: CancellationToken,
) -> Result<(), NbdError> {
    let mut wr = BufWriter::with_capacity(WRITE_BUFFER_BYTES, wr);
    let result = async {
        while let Some(reply) = rx.recv().await {
            send_reply(&mut wr, reply, structured).await?;
            loop {
                while let Ok(reply) = rx.try_recv() {
                    send_reply(&mut wr, reply, structured).await?;
                }
                // Let request tasks that are ready run first, so their
                // replies share this write instead of costing one each.
                tokio::task::yield_now().await;
                match rx.try_recv() {
                    Ok(reply) => send_reply(&mut wr, reply, structured).await?,
                    Err(_) => break,
                }
            }
            wr.flush().await?;
        }
        wr.shutdown().await
    }
    .await;
    if result.is_err() {
        // The client is gone: stop reading requests too.
        stop.cancel();
    }
    result.map_err(NbdError::from)
}

async fn send_reply<W: AsyncWrite + Unpin>(
    wr: &mut BufWriter<W>,
    reply: Reply,
    structured: bool,
) -> std::io::Result<()> {
    let cookie = reply.cookie;
    match reply.body {
        Body::Ok => wr.write_all(&simple_reply(0, cookie)).await,
        Body::EmptyRead if structured => {
            wr.write_all(&chunk_header(REPLY_FLAG_DONE, REPLY_TYPE_NONE, cookie, 0))
                .await
        }
        Body::EmptyRead => wr.write_all(&simple_reply(0, cookie)).await,
        Body::Error { errno, message } if structured => {
            let message = truncate(&message, STRING_MAX);
            let len = 6 + message.len() as u32;
            wr.write_all(&chunk_header(
                REPLY_FLAG_DONE,
                REPLY_TYPE_ERROR,
                cookie,
                len,
            ))
            .await?;
            wr.write_all(&errno.to_be_bytes()).await?;
            wr.write_all(&(message.len() as u16).to_be_bytes()).await?;
            wr.write_all(message.as_bytes()).await
        }
        Body::Error { errno, .. } => wr.write_all(&simple_reply(errno, cookie)).await,
        Body::Data { offset, data, df } if structured => {
            send_read_chunks(wr, cookie, offset, &data, df).await
        }
        Body::Data { data, .. } => {
            wr.write_all(&simple_reply(0, cookie)).await?;
            wr.write_all(&data).await
        }
        Body::BlockStatus { payload } => {
            let len = payload.len() as u32;
            wr.write_all(&chunk_header(
                REPLY_FLAG_DONE,
                REPLY_TYPE_BLOCK_STATUS,
                cookie,
                len,
            ))
            .await?;
            wr.write_all(&payload).await
        }
    }
}

/// Send read data as structured chunks: runs of whole zero 4 KiB blocks
/// (aligned to the export) as `OFFSET_HOLE`, the rest as `OFFSET_DATA`;
/// the last chunk carries `DONE`. With `df`, one data chunk.
async fn send_read_chunks<W: AsyncWrite + Unpin>(
    wr: &mut BufWriter<W>,
    cookie: u64,
    offset: u64,
    data: &[u8],
    df: bool,
) -> std::io::Result<()> {
    if df || data.len() < HOLE_GRANULE {
        return send_run(wr, cookie, offset, data, 0..data.len(), false, true).await;
    }
    // The run being built: (start, end, is_zero).
    let mut current: Option<(usize, usize, bool)> = None;
    let mut pos = 0;
    while pos < data.len() {
        let into_block = ((offset + pos as u64) % HOLE_GRANULE as u64) as usize;
        let end = (pos + HOLE_GRANULE - into_block).min(data.len());
        let zero = end - pos == HOLE_GRANULE && is_zero(&data[pos..end]);
        match &mut current {
            Some((_, e, z)) if *z == zero => *e = end,
            _ => {
                if let Some((s, e, z)) = current.take() {
                    send_run(wr, cookie, offset, data, s..e, z, false).await?;
                }
                current = Some((pos, end, zero));
            }
        }
        pos = end;
    }
    match current {
        Some((s, e, z)) => send_run(wr, cookie, offset, data, s..e, z, true).await,
        None => {
            wr.write_all(&chunk_header(REPLY_FLAG_DONE, REPLY_TYPE_NONE, cookie, 0))
                .await
        }
    }
}

async fn send_run<W: AsyncWrite + Unpin>(
    wr: &mut BufWriter<W>,
    cookie: u64,
    offset: u64,
    data: &[u8],
    range: std::ops::Range<usize>,
    hole: bool,
    last: bool,
) -> std::io::Result<()> {
    let flags = if last { REPLY_FLAG_DONE } else { 0 };
    let at = offset + range.start as u64;
    let len = range.len() as u32;
    if hole {
        wr.write_all(&chunk_header(flags, REPLY_TYPE_OFFSET_HOLE, cookie, 12))
            .await?;
        wr.write_all(&at.to_be_bytes()).await?;
        wr.write_all(&len.to_be_bytes()).await
    } else {
        wr.write_all(&chunk_header(
            flags,
            REPLY_TYPE_OFFSET_DATA,
            cookie,
            8 + len,
        ))
        .await?;
        wr.write_all(&at.to_be_bytes()).await?;
        wr.write_all(&data[range]).await
    }
}

/// Whether every byte is zero; stops at the first non-zero 64-byte chunk.
fn is_zero(b: &[u8]) -> bool {
    let (chunks, tail) = b.as_chunks::<64>();
    chunks
        .iter()
        .all(|c| c.iter().fold(0u8, |a, &x| a | x) == 0)
        && tail.iter().all(|&x| x == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(len: u64, hole: bool, zero: bool) -> BlockRun {
        BlockRun { len, hole, zero }
    }

    fn descriptors(payload: &[u8]) -> Vec<(u32, u32)> {
        assert_eq!(&payload[0..4], &BASE_ALLOCATION_ID.to_be_bytes());
        payload[4..]
            .chunks_exact(8)
            .map(|d| {
                let l = u32::from_be_bytes([d[0], d[1], d[2], d[3]]);
                let f = u32::from_be_bytes([d[4], d[5], d[6], d[7]]);
                (l, f)
            })
            .collect()
    }

    #[test]
    fn block_status_merges_equal_runs_and_stops_at_the_request_length() {
        let runs = [
            run(4096, false, false),
            run(4096, false, false),
            run(8192, true, true),
        ];
        let p = encode_block_status(&runs, 10_000, false);
        assert_eq!(
            descriptors(&p),
            vec![(8192, 0), (1808, STATE_HOLE | STATE_ZERO)]
        );
    }

    #[test]
    fn block_status_req_one_sends_one_descriptor_within_the_request() {
        let runs = [run(1 << 20, true, true), run(4096, false, false)];
        let p = encode_block_status(&runs, 4096, true);
        assert_eq!(descriptors(&p), vec![(4096, STATE_HOLE | STATE_ZERO)]);
        let runs = [run(4096, true, true), run(4096, false, false)];
        let p = encode_block_status(&runs, 8192, true);
        assert_eq!(descriptors(&p), vec![(4096, STATE_HOLE | STATE_ZERO)]);
    }

    #[test]
    fn block_status_without_usable_runs_reports_one_safe_descriptor() {
        let p = encode_block_status(&[], 512, false);
        assert_eq!(descriptors(&p), vec![(512, 0)]);
        let p = encode_block_status(&[run(0, true, true)], 512, false);
        assert_eq!(descriptors(&p), vec![(512, 0)]);
    }

    #[test]
    fn block_status_charges_are_bounded_and_fit_the_byte_limit() {
        assert_eq!(block_status_reply_bytes(4096), 4 + 8 * 3);
        let worst = block_status_reply_bytes(u32::MAX) as usize;
        assert!(
            worst <= 4 + 8 * DESCRIPTORS_MAX,
            "charge {worst} above the reply bound"
        );
        assert!(
            worst < crate::proto::PAYLOAD_MAX as usize,
            "must fit every valid byte limit"
        );
    }

    #[test]
    fn is_zero_sees_a_single_set_byte_anywhere() {
        let mut b = vec![0u8; 4096 + 7];
        assert!(is_zero(&b));
        for at in [0, 63, 64, 4095, 4096 + 6] {
            b[at] = 1;
            assert!(!is_zero(&b), "byte {at} missed");
            b[at] = 0;
        }
    }
}
