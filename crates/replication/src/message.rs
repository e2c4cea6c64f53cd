//! The replica protocol: what a coordinator asks of a replica node and what
//! the node answers. Pure data; the byte encoding is in [`crate::frame`].
//!
//! Every slab request names the slab (`volume`, `slab`) and the coordinator's
//! `epoch` for it; a replica refuses an epoch older than the one it knows
//! with [`ErrorCode::StaleEpoch`]. Offsets are byte offsets inside the
//! slab's extent on the replica.
//!
//! Invariants (checked by [`Request::validate`] before a request is sent and
//! by the decoder when one arrives, so a handler never sees a violation):
//! - every `offset` is a multiple of [`BLOCK_SIZE`];
//! - `Write` data, `Read::len`, `WriteZeroes::len` and `Trim::len` are
//!   non-zero multiples of [`BLOCK_SIZE`], and `offset + len` does not
//!   overflow `u64`;
//! - `Write` data is at most [`WRITE_DATA_MAX`], `Read::len` at most
//!   [`READ_LEN_MAX`], `Checksums::blocks` in `1..=`[`CHECKSUM_BLOCKS_MAX`],
//!   so every request and its reply fits in one frame;
//! - an error message is at most [`ERROR_MESSAGE_MAX`] bytes on the wire
//!   (longer ones are cut at a character boundary when encoded).
//!
//! The transport also checks that a reply fits its request (see
//! [`Request::reply_shape`]): a `Read` gets `Data` of exactly `len` bytes or an
//! `Error`, a `Checksums` gets exactly `blocks` values, and so on.

use block_api::AlignedBuf;

/// The version every frame carries. Bump it when the encoding of any
/// message changes; a node refuses frames of a version it does not speak.
///
/// - 1: the first version.
pub const PROTOCOL_VERSION: u16 = 1;

/// The unit of offsets and lengths: one checksummed block.
pub const BLOCK_SIZE: usize = block_api::BLOCK_SIZE;

/// Largest `Write` payload; callers split larger writes.
pub const WRITE_DATA_MAX: usize = 8 << 20;
/// Largest `Read` (so the `Data` reply fits one frame).
pub const READ_LEN_MAX: u32 = 8 << 20;
/// Most blocks one `Checksums` request may ask about (8 bytes each in the
/// reply).
pub const CHECKSUM_BLOCKS_MAX: u32 = 1 << 20;
/// Longest error message carried on the wire, in bytes.
pub const ERROR_MESSAGE_MAX: usize = 4096;

const _: () = assert!(WRITE_DATA_MAX.is_multiple_of(BLOCK_SIZE));
const _: () = assert!((READ_LEN_MAX as usize).is_multiple_of(BLOCK_SIZE));
const _: () = assert!(READ_LEN_MAX as usize <= WRITE_DATA_MAX);
const _: () = assert!(CHECKSUM_BLOCKS_MAX as usize * 8 <= WRITE_DATA_MAX);

/// A request from a coordinator to a replica node.
#[derive(Debug)]
pub enum Request {
    /// Write `data` at `offset` of the slab's extent; with `fua` the data is
    /// durable before the reply.
    Write {
        volume: u64,
        slab: u64,
        epoch: u64,
        offset: u64,
        data: AlignedBuf,
        fua: bool,
    },
    /// Read `len` bytes at `offset`; answered with [`Response::Data`].
    Read {
        volume: u64,
        slab: u64,
        epoch: u64,
        offset: u64,
        len: u32,
    },
    /// Make `[offset, offset + len)` read as zeros.
    WriteZeroes {
        volume: u64,
        slab: u64,
        epoch: u64,
        offset: u64,
        len: u64,
    },
    /// Discard `[offset, offset + len)` (reads as zeros afterwards).
    Trim {
        volume: u64,
        slab: u64,
        epoch: u64,
        offset: u64,
        len: u64,
    },
    /// Make every acknowledged write on all of the node's disks durable.
    Flush,
    /// Give the slab an extent on this node; answered with
    /// [`Response::Allocated`].
    Allocate { volume: u64, slab: u64, epoch: u64 },
    /// One opaque checksum per block of `[offset, offset + blocks * 4 KiB)`;
    /// answered with [`Response::Checksums`].
    Checksums {
        volume: u64,
        slab: u64,
        epoch: u64,
        offset: u64,
        blocks: u32,
    },
    /// Free this node's extent of the slab.
    Release { volume: u64, slab: u64 },
}

/// A replica node's answer to one [`Request`].
#[derive(Debug)]
pub enum Response {
    Ok,
    Data(AlignedBuf),
    Allocated { disk: u32, extent: u64 },
    Checksums(Vec<u64>),
    Error { code: ErrorCode, message: String },
}

/// Why a replica refused or failed a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    /// The request's epoch is older than the slab's `current` one.
    StaleEpoch { current: u64 },
    /// The volume or slab has no extent on this node.
    NotFound,
    /// The disk failed the I/O.
    Io,
    /// Stored data failed its checksum.
    Checksum,
    /// The request makes no sense to the node (e.g. past the extent's end).
    BadRequest,
    /// The node is overloaded; try again later or elsewhere.
    Busy,
    /// The node is shutting down.
    ShuttingDown,
}

impl Response {
    /// An error reply.
    pub fn error(code: ErrorCode, message: impl Into<String>) -> Self {
        Response::Error {
            code,
            message: message.into(),
        }
    }

    /// Short name for logs and error messages.
    pub fn name(&self) -> &'static str {
        match self {
            Response::Ok => "Ok",
            Response::Data(_) => "Data",
            Response::Allocated { .. } => "Allocated",
            Response::Checksums(_) => "Checksums",
            Response::Error { .. } => "Error",
        }
    }
}

/// A request that breaks one of the module's invariants.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {kind} request: {reason}")]
pub struct InvalidRequest {
    pub kind: &'static str,
    pub reason: String,
}

impl Request {
    /// Short name for logs and error messages.
    pub fn name(&self) -> &'static str {
        match self {
            Request::Write { .. } => "Write",
            Request::Read { .. } => "Read",
            Request::WriteZeroes { .. } => "WriteZeroes",
            Request::Trim { .. } => "Trim",
            Request::Flush => "Flush",
            Request::Allocate { .. } => "Allocate",
            Request::Checksums { .. } => "Checksums",
            Request::Release { .. } => "Release",
        }
    }

    /// Check the module's invariants.
    pub fn validate(&self) -> Result<(), InvalidRequest> {
        let kind = self.name();
        let bad = |reason: String| Err(InvalidRequest { kind, reason });
        match self {
            Request::Write { offset, data, .. } => {
                check_range(kind, *offset, data.len() as u64)?;
                if data.len() > WRITE_DATA_MAX {
                    return bad(format!(
                        "{} bytes of data exceed the limit of {WRITE_DATA_MAX}",
                        data.len()
                    ));
                }
                Ok(())
            }
            Request::Read { offset, len, .. } => {
                check_range(kind, *offset, u64::from(*len))?;
                if *len > READ_LEN_MAX {
                    return bad(format!("len {len} exceeds the limit of {READ_LEN_MAX}"));
                }
                Ok(())
            }
            Request::WriteZeroes { offset, len, .. } | Request::Trim { offset, len, .. } => {
                check_range(kind, *offset, *len)
            }
            Request::Checksums { offset, blocks, .. } => {
                if *blocks == 0 || *blocks > CHECKSUM_BLOCKS_MAX {
                    return bad(format!(
                        "blocks {blocks} is outside 1..={CHECKSUM_BLOCKS_MAX}"
                    ));
                }
                check_range(kind, *offset, u64::from(*blocks) * BLOCK_SIZE as u64)
            }
            Request::Flush | Request::Allocate { .. } | Request::Release { .. } => Ok(()),
        }
    }

    /// The reply this request asks for (besides an error).
    pub fn reply_shape(&self) -> ReplyShape {
        match self {
            Request::Read { len, .. } => ReplyShape::Data { len: *len },
            Request::Checksums { blocks, .. } => ReplyShape::Checksums { blocks: *blocks },
            Request::Allocate { .. } => ReplyShape::Allocated,
            Request::Write { .. }
            | Request::WriteZeroes { .. }
            | Request::Trim { .. }
            | Request::Flush
            | Request::Release { .. } => ReplyShape::Ok,
        }
    }
}

/// What a well-formed answer to a request looks like: small and `Copy`, so
/// the transport keeps it (not the request) while the request is in flight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyShape {
    Ok,
    Data { len: u32 },
    Allocated,
    Checksums { blocks: u32 },
}

impl ReplyShape {
    /// Whether `response` is a possible answer: an `Error`, or the reply
    /// kind asked for with the size asked for. `Err` says what is wrong.
    pub fn check(self, response: &Response) -> Result<(), String> {
        match (self, response) {
            (_, Response::Error { .. })
            | (ReplyShape::Ok, Response::Ok)
            | (ReplyShape::Allocated, Response::Allocated { .. }) => Ok(()),
            (ReplyShape::Data { len }, Response::Data(data)) => {
                if data.len() == len as usize {
                    Ok(())
                } else {
                    Err(format!(
                        "a Read of {len} bytes was answered with {} bytes",
                        data.len()
                    ))
                }
            }
            (ReplyShape::Checksums { blocks }, Response::Checksums(sums)) => {
                if sums.len() == blocks as usize {
                    Ok(())
                } else {
                    Err(format!(
                        "Checksums of {blocks} blocks was answered with {} values",
                        sums.len()
                    ))
                }
            }
            (shape, resp) => Err(format!(
                "a request expecting {shape:?} was answered with {}",
                resp.name()
            )),
        }
    }
}

/// `offset` block-aligned, `len` a non-zero multiple of the block size and
/// the range not wrapping around.
fn check_range(kind: &'static str, offset: u64, len: u64) -> Result<(), InvalidRequest> {
    let reason = if !offset.is_multiple_of(BLOCK_SIZE as u64) {
        format!("offset {offset} is not a multiple of {BLOCK_SIZE}")
    } else if len == 0 || !len.is_multiple_of(BLOCK_SIZE as u64) {
        format!("length {len} is not a non-zero multiple of {BLOCK_SIZE}")
    } else if offset.checked_add(len).is_none() {
        format!("range {offset} + {len} overflows")
    } else {
        return Ok(());
    };
    Err(InvalidRequest { kind, reason })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(offset: u64, len: u32) -> Request {
        Request::Read {
            volume: 1,
            slab: 2,
            epoch: 3,
            offset,
            len,
        }
    }

    #[test]
    fn validate_refuses_unaligned_empty_oversized_and_wrapping_requests() {
        assert!(read(4096, 8192).validate().is_ok());
        for (req, what) in [
            (read(1, 4096), "unaligned offset"),
            (read(0, 0), "zero length"),
            (read(0, 4095), "partial block"),
            (read(0, READ_LEN_MAX + 4096), "read over the limit"),
            (
                Request::Trim {
                    volume: 0,
                    slab: 0,
                    epoch: 0,
                    offset: u64::MAX - 4095,
                    len: 8192,
                },
                "wrapping range",
            ),
            (
                Request::Checksums {
                    volume: 0,
                    slab: 0,
                    epoch: 0,
                    offset: 0,
                    blocks: 0,
                },
                "zero blocks",
            ),
            (
                Request::Write {
                    volume: 0,
                    slab: 0,
                    epoch: 0,
                    offset: 0,
                    data: AlignedBuf::zeroed(WRITE_DATA_MAX + 4096),
                    fua: false,
                },
                "write over the limit",
            ),
        ] {
            assert!(req.validate().is_err(), "{what} was accepted: {req:?}");
        }
    }

    #[test]
    fn reply_shape_matches_reply_kind_and_size_to_the_request() {
        let shape = read(0, 4096).reply_shape();
        assert!(
            shape
                .check(&Response::Data(AlignedBuf::zeroed(4096)))
                .is_ok()
        );
        assert!(
            shape
                .check(&Response::Data(AlignedBuf::zeroed(8192)))
                .is_err()
        );
        assert!(shape.check(&Response::Ok).is_err());
        let flush = Request::Flush.reply_shape();
        assert!(flush.check(&Response::Ok).is_ok());
        assert!(
            flush
                .check(&Response::error(ErrorCode::Busy, "later"))
                .is_ok()
        );
        assert!(
            flush
                .check(&Response::Allocated { disk: 0, extent: 0 })
                .is_err()
        );
    }
}
