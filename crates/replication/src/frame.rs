//! The byte encoding of [`crate::message`]: one frame per request or reply,
//! read with [`FrameReader`] and written with [`FrameWriter`].
//!
//! # Layout (all integers little-endian)
//!
//! ```text
//! header (24 bytes)
//!   0  u32  magic        0x5244_3253, the bytes "S2DR"
//!   4  u16  version      PROTOCOL_VERSION (1)
//!   6  u8   kind         see below
//!   7  u8   flags        bit 0: FUA (Write only); every other bit 0
//!   8  u64  request_id   chosen by the caller, echoed by the reply
//!  16  u32  payload_len  bytes between header and trailer, <= FRAME_PAYLOAD_MAX
//!  20  u32  header_crc   CRC32C of bytes 0..20
//! payload (payload_len bytes): the body of the kind, then its data if any
//! trailer (4 bytes)
//!   0  u32  frame_crc    CRC32C of the header and the payload
//!
//! kind  message           body                                          data
//! 0x01  Write             volume u64, slab u64, epoch u64, offset u64   the bytes (n * 4096, n >= 1)
//! 0x02  Read              volume, slab, epoch, offset u64, len u32      -
//! 0x03  WriteZeroes       volume, slab, epoch, offset u64, len u64      -
//! 0x04  Trim              volume, slab, epoch, offset u64, len u64      -
//! 0x05  Flush             -                                             -
//! 0x06  Allocate          volume, slab, epoch u64                       -
//! 0x07  Checksums         volume, slab, epoch, offset u64, blocks u32   -
//! 0x08  Release           volume, slab u64                              -
//! 0x81  Ok                -                                             -
//! 0x82  Data              -                                             the bytes (n * 4096, n >= 1)
//! 0x83  Allocated         disk u32, extent u64                          -
//! 0x84  Checksums         -                                             n * u64
//! 0x85  Error             code u8, current u64, then the message        UTF-8, <= ERROR_MESSAGE_MAX
//!
//! error codes: 1 StaleEpoch (current = the slab's epoch), 2 NotFound, 3 Io,
//! 4 Checksum, 5 BadRequest, 6 Busy, 7 ShuttingDown; current is 0 for all
//! but StaleEpoch.
//! ```
//!
//! # Invariants
//! - The reader checks, in this order, magic, version, header CRC, kind,
//!   flags and the payload length against the limit and against the kind
//!   (fixed-size bodies must match exactly) before it allocates or reads
//!   any payload byte; the allocation is then at most
//!   [`FRAME_PAYLOAD_MAX`]. It checks the frame CRC before it parses the
//!   payload, and every field against [`crate::message`]'s invariants
//!   after. Any failure is a [`FrameError`]; nothing a peer sends panics.
//! - `Write` and `Data` bytes are read straight into an [`AlignedBuf`] (no
//!   copy on the way to `O_DIRECT`) and written from it: small frames are
//!   gathered in one reused buffer so a burst of them costs one system
//!   call; data over [`INLINE_DATA_MAX`] goes out with a vectored write.
//! - After a [`FrameError`] the stream is out of step: close it.

use std::io::{self, IoSlice};
use std::time::Duration;

use block_api::AlignedBuf;
use crc_fast::{CrcAlgorithm, Digest};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};

use crate::message::{
    BLOCK_SIZE, ERROR_MESSAGE_MAX, ErrorCode, InvalidRequest, PROTOCOL_VERSION, Request, Response,
    WRITE_DATA_MAX,
};

/// The first four bytes of every frame: "S2DR".
pub const MAGIC: u32 = u32::from_le_bytes(*b"S2DR");
pub const HEADER_LEN: usize = 24;
pub const TRAILER_LEN: usize = 4;
/// Largest payload a frame may carry: the largest write plus room for its
/// body.
pub const FRAME_PAYLOAD_MAX: u32 = (WRITE_DATA_MAX + BLOCK_SIZE) as u32;
/// Data up to this size is copied into the gather buffer; larger data is
/// written from its own buffer.
pub const INLINE_DATA_MAX: usize = 64 << 10;

const _: () = assert!(ERROR_MESSAGE_MAX + 9 <= FRAME_PAYLOAD_MAX as usize);
const _: () =
    assert!(crate::message::CHECKSUM_BLOCKS_MAX as usize * 8 <= FRAME_PAYLOAD_MAX as usize);

/// Flag bit 0 of a `Write`.
const FLAG_FUA: u8 = 1;
/// Gathered bytes are written out once the buffer holds this much.
const GATHER_FLUSH_BYTES: usize = 256 << 10;
/// Socket read buffer: many small frames per system call.
const READ_BUFFER_BYTES: usize = 64 << 10;
/// A scratch buffer grown past this (by a large `Checksums` reply) is
/// given back after use.
const SCRATCH_KEEP_BYTES: usize = 1 << 20;

const KIND_WRITE: u8 = 0x01;
const KIND_READ: u8 = 0x02;
const KIND_WRITE_ZEROES: u8 = 0x03;
const KIND_TRIM: u8 = 0x04;
const KIND_FLUSH: u8 = 0x05;
const KIND_ALLOCATE: u8 = 0x06;
const KIND_CHECKSUMS: u8 = 0x07;
const KIND_RELEASE: u8 = 0x08;
const KIND_OK: u8 = 0x81;
const KIND_DATA: u8 = 0x82;
const KIND_ALLOCATED: u8 = 0x83;
const KIND_CHECKSUM_LIST: u8 = 0x84;
const KIND_ERROR: u8 = 0x85;

/// Body sizes of the kinds with a fixed-size body.
const WRITE_BODY: usize = 32;
const READ_BODY: usize = 36;
const RANGE_BODY: usize = 40;
const ALLOCATE_BODY: usize = 24;
const CHECKSUMS_BODY: usize = 36;
const RELEASE_BODY: usize = 16;
const ALLOCATED_BODY: usize = 12;
const ERROR_BODY: usize = 9;

/// A decoded message: a request (what a server reads) or a reply (what a
/// client reads).
#[derive(Debug)]
pub enum Message {
    Request(Request),
    Response(Response),
}

/// A borrowed message to encode.
#[derive(Debug, Clone, Copy)]
pub enum MessageRef<'a> {
    Request(&'a Request),
    Response(&'a Response),
}

/// One decoded frame.
#[derive(Debug)]
pub struct Frame {
    pub request_id: u64,
    pub message: Message,
}

/// Why a frame could not be read. Every variant but `Io` and `Stalled`
/// means the peer sent bytes that are not a valid frame.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("bad magic {found:#010x} (expected {MAGIC:#010x}): not an s2d replication stream")]
    BadMagic { found: u32 },
    #[error("unsupported protocol version {found} (this node speaks version {PROTOCOL_VERSION})")]
    UnsupportedVersion { found: u16 },
    #[error("header checksum mismatch: computed {computed:#010x}, header carries {stored:#010x}")]
    HeaderChecksum { computed: u32, stored: u32 },
    #[error("unknown message kind {0:#04x}")]
    UnknownKind(u8),
    #[error("{kind} frame with unknown flags {flags:#04x}")]
    BadFlags { kind: &'static str, flags: u8 },
    #[error("payload of {len} bytes exceeds the limit of {FRAME_PAYLOAD_MAX}")]
    TooLarge { len: u32 },
    #[error("{kind} frame with a payload of {len} bytes: {expected}")]
    BadLength {
        kind: &'static str,
        len: u32,
        expected: &'static str,
    },
    #[error("stream ended inside a frame's {part}")]
    Truncated { part: &'static str },
    #[error("frame checksum mismatch: computed {computed:#010x}, frame carries {stored:#010x}")]
    Checksum { computed: u32, stored: u32 },
    #[error(transparent)]
    InvalidRequest(#[from] InvalidRequest),
    #[error("invalid {kind} frame: {reason}")]
    Invalid { kind: &'static str, reason: String },
    #[error("frame not complete {0:?} after its first byte")]
    Stalled(Duration),
    #[error("I/O error: {0}")]
    Io(#[from] io::Error),
}

fn kind_name(kind: u8) -> Option<&'static str> {
    Some(match kind {
        KIND_WRITE => "Write",
        KIND_READ => "Read",
        KIND_WRITE_ZEROES => "WriteZeroes",
        KIND_TRIM => "Trim",
        KIND_FLUSH => "Flush",
        KIND_ALLOCATE => "Allocate",
        KIND_CHECKSUMS => "Checksums",
        KIND_RELEASE => "Release",
        KIND_OK => "Ok",
        KIND_DATA => "Data",
        KIND_ALLOCATED => "Allocated",
        KIND_CHECKSUM_LIST => "Checksums reply",
        KIND_ERROR => "Error",
        _ => return None,
    })
}

fn crc32c(bytes: &[u8]) -> u32 {
    crc_fast::checksum(CrcAlgorithm::Crc32Iscsi, bytes) as u32
}

fn error_code_byte(code: ErrorCode) -> (u8, u64) {
    match code {
        ErrorCode::StaleEpoch { current } => (1, current),
        ErrorCode::NotFound => (2, 0),
        ErrorCode::Io => (3, 0),
        ErrorCode::Checksum => (4, 0),
        ErrorCode::BadRequest => (5, 0),
        ErrorCode::Busy => (6, 0),
        ErrorCode::ShuttingDown => (7, 0),
    }
}

fn error_code_from(code: u8, current: u64) -> Result<ErrorCode, String> {
    let code = match code {
        1 => return Ok(ErrorCode::StaleEpoch { current }),
        2 => ErrorCode::NotFound,
        3 => ErrorCode::Io,
        4 => ErrorCode::Checksum,
        5 => ErrorCode::BadRequest,
        6 => ErrorCode::Busy,
        7 => ErrorCode::ShuttingDown,
        other => return Err(format!("unknown error code {other}")),
    };
    if current != 0 {
        return Err(format!("error code {code:?} with an epoch {current}"));
    }
    Ok(code)
}

/// The longest prefix of `s` of at most `max` bytes that ends on a
/// character boundary.
fn truncate_utf8(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

fn put_u64s(out: &mut Vec<u8>, values: &[u64]) {
    for v in values {
        out.extend_from_slice(&v.to_le_bytes());
    }
}

/// Append the header and body of `msg` to `out`; return the data bytes
/// that follow the body (not appended), if the kind has any.
///
/// Fails, leaving `out` as it was, when the payload would exceed
/// [`FRAME_PAYLOAD_MAX`] (callers validate messages first, so this is a
/// programming error reported rather than a panic).
fn encode_head<'a>(
    out: &mut Vec<u8>,
    request_id: u64,
    msg: MessageRef<'a>,
) -> io::Result<Option<&'a [u8]>> {
    let start = out.len();
    out.extend_from_slice(&[0; HEADER_LEN]);
    let mut flags = 0u8;
    let (kind, data): (u8, Option<&'a [u8]>) = match msg {
        MessageRef::Request(req) => match req {
            Request::Write {
                volume,
                slab,
                epoch,
                offset,
                data,
                fua,
            } => {
                put_u64s(out, &[*volume, *slab, *epoch, *offset]);
                if *fua {
                    flags |= FLAG_FUA;
                }
                (KIND_WRITE, Some(data.as_slice()))
            }
            Request::Read {
                volume,
                slab,
                epoch,
                offset,
                len,
            } => {
                put_u64s(out, &[*volume, *slab, *epoch, *offset]);
                out.extend_from_slice(&len.to_le_bytes());
                (KIND_READ, None)
            }
            Request::WriteZeroes {
                volume,
                slab,
                epoch,
                offset,
                len,
            } => {
                put_u64s(out, &[*volume, *slab, *epoch, *offset, *len]);
                (KIND_WRITE_ZEROES, None)
            }
            Request::Trim {
                volume,
                slab,
                epoch,
                offset,
                len,
            } => {
                put_u64s(out, &[*volume, *slab, *epoch, *offset, *len]);
                (KIND_TRIM, None)
            }
            Request::Flush => (KIND_FLUSH, None),
            Request::Allocate {
                volume,
                slab,
                epoch,
            } => {
                put_u64s(out, &[*volume, *slab, *epoch]);
                (KIND_ALLOCATE, None)
            }
            Request::Checksums {
                volume,
                slab,
                epoch,
                offset,
                blocks,
            } => {
                put_u64s(out, &[*volume, *slab, *epoch, *offset]);
                out.extend_from_slice(&blocks.to_le_bytes());
                (KIND_CHECKSUMS, None)
            }
            Request::Release { volume, slab } => {
                put_u64s(out, &[*volume, *slab]);
                (KIND_RELEASE, None)
            }
        },
        MessageRef::Response(resp) => match resp {
            Response::Ok => (KIND_OK, None),
            Response::Data(data) => (KIND_DATA, Some(data.as_slice())),
            Response::Allocated { disk, extent } => {
                out.extend_from_slice(&disk.to_le_bytes());
                out.extend_from_slice(&extent.to_le_bytes());
                (KIND_ALLOCATED, None)
            }
            Response::Checksums(sums) => {
                put_u64s(out, sums);
                (KIND_CHECKSUM_LIST, None)
            }
            Response::Error { code, message } => {
                let (code, current) = error_code_byte(*code);
                out.push(code);
                out.extend_from_slice(&current.to_le_bytes());
                out.extend_from_slice(truncate_utf8(message, ERROR_MESSAGE_MAX).as_bytes());
                (KIND_ERROR, None)
            }
        },
    };
    let payload_len = out.len() - start - HEADER_LEN + data.map_or(0, <[u8]>::len);
    if payload_len > FRAME_PAYLOAD_MAX as usize {
        out.truncate(start);
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("frame payload of {payload_len} bytes exceeds {FRAME_PAYLOAD_MAX}"),
        ));
    }
    let header = &mut out[start..start + HEADER_LEN];
    header[0..4].copy_from_slice(&MAGIC.to_le_bytes());
    header[4..6].copy_from_slice(&PROTOCOL_VERSION.to_le_bytes());
    header[6] = kind;
    header[7] = flags;
    header[8..16].copy_from_slice(&request_id.to_le_bytes());
    header[16..20].copy_from_slice(&(payload_len as u32).to_le_bytes());
    let header_crc = crc32c(&header[0..20]);
    header[20..24].copy_from_slice(&header_crc.to_le_bytes());
    Ok(data)
}

/// One whole frame in a fresh vector: for tests and tools. The I/O paths
/// use [`FrameWriter`], which reuses its buffer.
pub fn encode_frame(request_id: u64, msg: MessageRef<'_>) -> io::Result<Vec<u8>> {
    let mut out = Vec::new();
    let data = encode_head(&mut out, request_id, msg)?.unwrap_or(&[]);
    let mut crc = Digest::new(CrcAlgorithm::Crc32Iscsi);
    crc.update(&out);
    crc.update(data);
    out.extend_from_slice(data);
    out.extend_from_slice(&(crc.finalize() as u32).to_le_bytes());
    Ok(out)
}

/// Writes frames to a byte stream. Frames are gathered in a reused buffer;
/// call [`FrameWriter::flush`] after the last frame of a burst. Not
/// cancel-safe: a dropped `write` or `flush` may leave half a frame, so the
/// stream must then be closed.
pub struct FrameWriter<W> {
    inner: W,
    buf: Vec<u8>,
}

impl<W: AsyncWrite + Unpin> FrameWriter<W> {
    pub fn new(inner: W) -> Self {
        FrameWriter {
            inner,
            buf: Vec::with_capacity(GATHER_FLUSH_BYTES + INLINE_DATA_MAX + 4096),
        }
    }

    /// Queue one frame; writes to the stream when the gather buffer is
    /// full or the frame carries more than [`INLINE_DATA_MAX`] bytes.
    pub async fn write(&mut self, request_id: u64, msg: MessageRef<'_>) -> io::Result<()> {
        let start = self.buf.len();
        let data = encode_head(&mut self.buf, request_id, msg)?.unwrap_or(&[]);
        let mut crc = Digest::new(CrcAlgorithm::Crc32Iscsi);
        crc.update(&self.buf[start..]);
        crc.update(data);
        let trailer = (crc.finalize() as u32).to_le_bytes();
        if data.len() <= INLINE_DATA_MAX {
            self.buf.extend_from_slice(data);
            self.buf.extend_from_slice(&trailer);
        } else {
            let mut slices = [
                IoSlice::new(&self.buf),
                IoSlice::new(data),
                IoSlice::new(&trailer),
            ];
            write_all_vectored(&mut self.inner, &mut slices).await?;
            self.buf.clear();
        }
        if self.buf.len() >= GATHER_FLUSH_BYTES {
            self.inner.write_all(&self.buf).await?;
            self.buf.clear();
        }
        Ok(())
    }

    /// Write out everything gathered and flush the stream.
    pub async fn flush(&mut self) -> io::Result<()> {
        if !self.buf.is_empty() {
            self.inner.write_all(&self.buf).await?;
            self.buf.clear();
        }
        self.inner.flush().await
    }

    /// Flush, then shut down the write side of the stream.
    pub async fn shutdown(&mut self) -> io::Result<()> {
        self.flush().await?;
        self.inner.shutdown().await
    }
}

async fn write_all_vectored<W: AsyncWrite + Unpin>(
    w: &mut W,
    mut slices: &mut [IoSlice<'_>],
) -> io::Result<()> {
    while !slices.is_empty() {
        let n = w.write_vectored(slices).await?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        IoSlice::advance_slices(&mut slices, n);
    }
    Ok(())
}

/// The checked fields of a header.
struct Header {
    kind: u8,
    name: &'static str,
    flags: u8,
    request_id: u64,
    payload_len: u32,
}

/// Check a header; see the module invariants for the order.
fn parse_header(h: &[u8; HEADER_LEN]) -> Result<Header, FrameError> {
    let magic = u32::from_le_bytes([h[0], h[1], h[2], h[3]]);
    if magic != MAGIC {
        return Err(FrameError::BadMagic { found: magic });
    }
    let version = u16::from_le_bytes([h[4], h[5]]);
    if version != PROTOCOL_VERSION {
        return Err(FrameError::UnsupportedVersion { found: version });
    }
    let stored = u32::from_le_bytes([h[20], h[21], h[22], h[23]]);
    let computed = crc32c(&h[0..20]);
    if stored != computed {
        return Err(FrameError::HeaderChecksum { computed, stored });
    }
    let kind = h[6];
    let name = kind_name(kind).ok_or(FrameError::UnknownKind(kind))?;
    let flags = h[7];
    let allowed = if kind == KIND_WRITE { FLAG_FUA } else { 0 };
    if flags & !allowed != 0 {
        return Err(FrameError::BadFlags { kind: name, flags });
    }
    let mut id = [0u8; 8];
    id.copy_from_slice(&h[8..16]);
    let request_id = u64::from_le_bytes(id);
    let payload_len = u32::from_le_bytes([h[16], h[17], h[18], h[19]]);
    if payload_len > FRAME_PAYLOAD_MAX {
        return Err(FrameError::TooLarge { len: payload_len });
    }
    check_payload_len(kind, name, payload_len as usize)?;
    Ok(Header {
        kind,
        name,
        flags,
        request_id,
        payload_len,
    })
}

/// The payload length a kind allows, checked before any payload is read.
fn check_payload_len(kind: u8, name: &'static str, len: usize) -> Result<(), FrameError> {
    let exact = |n: usize, expected| (len == n).then_some(()).ok_or(expected);
    let blocks = |body: usize| {
        (len > body && (len - body).is_multiple_of(BLOCK_SIZE))
            .then_some(())
            .ok_or("expected a body and a non-zero multiple of 4096 data bytes")
    };
    let checked = match kind {
        KIND_WRITE => blocks(WRITE_BODY),
        KIND_DATA => blocks(0),
        KIND_READ => exact(READ_BODY, "expected 36"),
        KIND_WRITE_ZEROES | KIND_TRIM => exact(RANGE_BODY, "expected 40"),
        KIND_FLUSH | KIND_OK => exact(0, "expected 0"),
        KIND_ALLOCATE => exact(ALLOCATE_BODY, "expected 24"),
        KIND_CHECKSUMS => exact(CHECKSUMS_BODY, "expected 36"),
        KIND_RELEASE => exact(RELEASE_BODY, "expected 16"),
        KIND_ALLOCATED => exact(ALLOCATED_BODY, "expected 12"),
        KIND_CHECKSUM_LIST => (len > 0 && len.is_multiple_of(8))
            .then_some(())
            .ok_or("expected a non-zero multiple of 8"),
        KIND_ERROR => (ERROR_BODY..=ERROR_BODY + ERROR_MESSAGE_MAX)
            .contains(&len)
            .then_some(())
            .ok_or("expected 9 bytes and a message of at most 4096"),
        _ => Err("unknown kind"),
    };
    checked.map_err(|expected| FrameError::BadLength {
        kind: name,
        len: len as u32,
        expected,
    })
}

/// Little-endian field reader over a body whose length was checked.
struct Fields<'a>(&'a [u8]);

impl Fields<'_> {
    fn u64(&mut self) -> u64 {
        let (head, rest) = self.0.split_at(8);
        self.0 = rest;
        let mut b = [0u8; 8];
        b.copy_from_slice(head);
        u64::from_le_bytes(b)
    }

    fn u32(&mut self) -> u32 {
        let (head, rest) = self.0.split_at(4);
        self.0 = rest;
        u32::from_le_bytes([head[0], head[1], head[2], head[3]])
    }

    fn u8(&mut self) -> u8 {
        let (head, rest) = self.0.split_at(1);
        self.0 = rest;
        head[0]
    }
}

/// Turn a checked header, body and data into a message and check its
/// fields. `body` has exactly the length `check_payload_len` allowed (minus
/// the data), so the fixed-size reads cannot run short.
fn parse_body(h: &Header, body: &[u8], data: Option<AlignedBuf>) -> Result<Message, FrameError> {
    let mut f = Fields(body);
    let invalid = |reason: String| FrameError::Invalid {
        kind: h.name,
        reason,
    };
    let missing = || invalid("data missing".into());
    let message = match h.kind {
        KIND_WRITE => Message::Request(Request::Write {
            volume: f.u64(),
            slab: f.u64(),
            epoch: f.u64(),
            offset: f.u64(),
            data: data.ok_or_else(missing)?,
            fua: h.flags & FLAG_FUA != 0,
        }),
        KIND_READ => Message::Request(Request::Read {
            volume: f.u64(),
            slab: f.u64(),
            epoch: f.u64(),
            offset: f.u64(),
            len: f.u32(),
        }),
        KIND_WRITE_ZEROES => Message::Request(Request::WriteZeroes {
            volume: f.u64(),
            slab: f.u64(),
            epoch: f.u64(),
            offset: f.u64(),
            len: f.u64(),
        }),
        KIND_TRIM => Message::Request(Request::Trim {
            volume: f.u64(),
            slab: f.u64(),
            epoch: f.u64(),
            offset: f.u64(),
            len: f.u64(),
        }),
        KIND_FLUSH => Message::Request(Request::Flush),
        KIND_ALLOCATE => Message::Request(Request::Allocate {
            volume: f.u64(),
            slab: f.u64(),
            epoch: f.u64(),
        }),
        KIND_CHECKSUMS => Message::Request(Request::Checksums {
            volume: f.u64(),
            slab: f.u64(),
            epoch: f.u64(),
            offset: f.u64(),
            blocks: f.u32(),
        }),
        KIND_RELEASE => Message::Request(Request::Release {
            volume: f.u64(),
            slab: f.u64(),
        }),
        KIND_OK => Message::Response(Response::Ok),
        KIND_DATA => Message::Response(Response::Data(data.ok_or_else(missing)?)),
        KIND_ALLOCATED => Message::Response(Response::Allocated {
            disk: f.u32(),
            extent: f.u64(),
        }),
        KIND_CHECKSUM_LIST => {
            let count = body.len() / 8;
            if count > crate::message::CHECKSUM_BLOCKS_MAX as usize {
                return Err(invalid(format!("{count} checksums exceed the limit")));
            }
            Message::Response(Response::Checksums((0..count).map(|_| f.u64()).collect()))
        }
        KIND_ERROR => {
            let code = f.u8();
            let current = f.u64();
            let code = error_code_from(code, current).map_err(invalid)?;
            let message = std::str::from_utf8(f.0)
                .map_err(|e| invalid(format!("message is not UTF-8: {e}")))?
                .to_owned();
            Message::Response(Response::Error { code, message })
        }
        other => return Err(FrameError::UnknownKind(other)),
    };
    if let Message::Request(req) = &message {
        req.validate()?;
    }
    Ok(message)
}

/// Reads frames from a byte stream through its own read buffer.
pub struct FrameReader<R> {
    inner: BufReader<R>,
    /// Reused for bodies; holds at most one frame's payload.
    scratch: Vec<u8>,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    pub fn new(inner: R) -> Self {
        FrameReader {
            inner: BufReader::with_capacity(READ_BUFFER_BYTES, inner),
            scratch: Vec::with_capacity(256),
        }
    }

    /// Wait until a frame starts (`true`) or the stream ends cleanly
    /// between frames (`false`). Cancel-safe: it consumes nothing.
    pub async fn frame_ready(&mut self) -> Result<bool, FrameError> {
        Ok(!self.inner.fill_buf().await?.is_empty())
    }

    /// The next frame, or `None` when the stream ended cleanly between
    /// frames. Once a frame's first byte is there, the rest must arrive
    /// within `rest_timeout` ([`FrameError::Stalled`] otherwise). Not
    /// cancel-safe once a frame has started: use [`Self::frame_ready`] to
    /// wait for one in a `select!`.
    pub async fn read_frame(
        &mut self,
        rest_timeout: Duration,
    ) -> Result<Option<Frame>, FrameError> {
        if !self.frame_ready().await? {
            return Ok(None);
        }
        match tokio::time::timeout(rest_timeout, self.read_started_frame()).await {
            Ok(frame) => frame.map(Some),
            Err(_) => Err(FrameError::Stalled(rest_timeout)),
        }
    }

    async fn read_started_frame(&mut self) -> Result<Frame, FrameError> {
        let mut h = [0u8; HEADER_LEN];
        read_part(&mut self.inner, &mut h, "header").await?;
        let header = parse_header(&h)?;
        let payload_len = header.payload_len as usize;
        let (body_len, data_len) = match header.kind {
            KIND_WRITE => (WRITE_BODY, payload_len - WRITE_BODY),
            KIND_DATA => (0, payload_len),
            _ => (payload_len, 0),
        };
        self.scratch.clear();
        self.scratch.resize(body_len, 0);
        read_part(&mut self.inner, &mut self.scratch, "payload").await?;
        let data = if data_len > 0 {
            // The length passed the limit and the kind checks above.
            let mut buf = AlignedBuf::for_overwrite(data_len);
            read_part(&mut self.inner, buf.as_mut_slice(), "payload").await?;
            Some(buf)
        } else {
            None
        };
        let mut trailer = [0u8; TRAILER_LEN];
        read_part(&mut self.inner, &mut trailer, "trailer").await?;
        let stored = u32::from_le_bytes(trailer);
        let mut crc = Digest::new(CrcAlgorithm::Crc32Iscsi);
        crc.update(&h);
        crc.update(&self.scratch);
        if let Some(d) = &data {
            crc.update(d.as_slice());
        }
        let computed = crc.finalize() as u32;
        let message = if stored != computed {
            Err(FrameError::Checksum { computed, stored })
        } else {
            parse_body(&header, &self.scratch, data)
        };
        if self.scratch.capacity() > SCRATCH_KEEP_BYTES {
            self.scratch = Vec::with_capacity(256);
        }
        Ok(Frame {
            request_id: header.request_id,
            message: message?,
        })
    }
}

async fn read_part<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut [u8],
    part: &'static str,
) -> Result<(), FrameError> {
    match r.read_exact(buf).await {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Err(FrameError::Truncated { part }),
        Err(e) => Err(FrameError::Io(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn decode_all(bytes: &[u8]) -> Result<Vec<Frame>, FrameError> {
        let mut r = FrameReader::new(bytes);
        let mut frames = Vec::new();
        while let Some(f) = r.read_frame(Duration::from_secs(5)).await? {
            frames.push(f);
        }
        Ok(frames)
    }

    fn flush_frame() -> Vec<u8> {
        encode_frame(7, MessageRef::Request(&Request::Flush)).expect("encode Flush")
    }

    /// Rewrite the header CRC after editing header bytes, so the check
    /// under test is the one that fires.
    fn reseal_header(frame: &mut [u8]) {
        let crc = crc32c(&frame[0..20]);
        frame[20..24].copy_from_slice(&crc.to_le_bytes());
    }

    #[tokio::test]
    async fn flush_frame_has_the_documented_layout() {
        let f = flush_frame();
        assert_eq!(f.len(), HEADER_LEN + TRAILER_LEN, "Flush frame size");
        assert_eq!(&f[0..4], b"S2DR", "magic");
        assert_eq!(u16::from_le_bytes([f[4], f[5]]), PROTOCOL_VERSION);
        assert_eq!(f[6], KIND_FLUSH);
        assert_eq!(u64::from_le_bytes(f[8..16].try_into().expect("8 bytes")), 7);
        assert_eq!(&f[16..20], &[0, 0, 0, 0], "payload length");
        let frames = decode_all(&f).await.expect("decode Flush");
        assert_eq!(frames.len(), 1);
        assert!(matches!(
            frames[0].message,
            Message::Request(Request::Flush)
        ));
    }

    #[tokio::test]
    async fn decoder_names_the_unsupported_version() {
        let mut f = flush_frame();
        f[4..6].copy_from_slice(&2u16.to_le_bytes());
        reseal_header(&mut f);
        match decode_all(&f).await {
            Err(e @ FrameError::UnsupportedVersion { found: 2 }) => {
                let text = e.to_string();
                assert!(text.contains('2') && text.contains('1'), "message: {text}");
            }
            other => panic!("version 2 frame decoded as {other:?}"),
        }
    }

    #[tokio::test]
    async fn decoder_refuses_oversized_length_before_reading_payload() {
        let mut f = flush_frame();
        f[16..20].copy_from_slice(&u32::MAX.to_le_bytes());
        reseal_header(&mut f);
        // No payload follows: a decoder that tried to read it would report
        // truncation instead.
        assert!(
            matches!(
                decode_all(&f[..HEADER_LEN]).await,
                Err(FrameError::TooLarge { len: u32::MAX })
            ),
            "a 4 GiB length was not refused as too large"
        );
    }

    #[tokio::test]
    async fn decoder_refuses_write_data_that_is_not_whole_blocks() {
        let mut f = flush_frame();
        f[6] = KIND_WRITE;
        f[16..20].copy_from_slice(&((WRITE_BODY + 100) as u32).to_le_bytes());
        reseal_header(&mut f);
        assert!(
            matches!(
                decode_all(&f[..HEADER_LEN]).await,
                Err(FrameError::BadLength { kind: "Write", .. })
            ),
            "a Write of 100 data bytes was not refused"
        );
    }

    #[tokio::test]
    async fn decoder_refuses_unaligned_offsets_after_the_crc() {
        let req = Request::Read {
            volume: 1,
            slab: 1,
            epoch: 1,
            offset: 4096,
            len: 4096,
        };
        let mut f = encode_frame(1, MessageRef::Request(&req)).expect("encode Read");
        // offset field: header + volume, slab, epoch
        f[HEADER_LEN + 24] = 1;
        let end = f.len() - TRAILER_LEN;
        let crc = crc32c(&f[..end]);
        f[end..].copy_from_slice(&crc.to_le_bytes());
        assert!(
            matches!(decode_all(&f).await, Err(FrameError::InvalidRequest(_))),
            "an unaligned Read offset was accepted"
        );
    }

    #[tokio::test]
    async fn error_messages_are_cut_to_the_limit_on_a_char_boundary() {
        let long = "é".repeat(ERROR_MESSAGE_MAX); // 2 bytes each
        let resp = Response::error(ErrorCode::Io, long);
        let f = encode_frame(3, MessageRef::Response(&resp)).expect("encode Error");
        let frames = decode_all(&f).await.expect("decode a long Error");
        match &frames[0].message {
            Message::Response(Response::Error { code, message }) => {
                assert_eq!(*code, ErrorCode::Io);
                assert_eq!(
                    message.len(),
                    ERROR_MESSAGE_MAX,
                    "message not cut to the limit"
                );
            }
            other => panic!("decoded {other:?}"),
        }
    }

    #[tokio::test]
    async fn stalled_frame_times_out() {
        let f = flush_frame();
        let (mut client, server) = tokio::io::duplex(1024);
        client
            .write_all(&f[..10])
            .await
            .expect("write half a header");
        let mut r = FrameReader::new(server);
        let got = r.read_frame(Duration::from_millis(50)).await;
        assert!(
            matches!(got, Err(FrameError::Stalled(_))),
            "half a frame did not time out: {got:?}"
        );
    }
}
