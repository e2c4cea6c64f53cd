//! NBD wire constants and the fixed-size encodings of the protocol.
//!
//! Everything here is pure: no I/O, no allocation. The numbers are the ones
//! of the NBD protocol specification (`doc/proto.md` of the reference
//! implementation); names drop the `NBD_` prefix. All integers on the wire
//! are big-endian.
//!
//! Invariants: [`RequestHeader::parse`] accepts any 28 bytes and never
//! panics; the encoders write exactly the header sizes named by their
//! constants.

// Magic numbers.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

// Handshake flags (server) and client flags.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

// Transmission flags.
pub const FLAG_HAS_FLAGS: u16 = 1 << 0;
pub const FLAG_READ_ONLY: u16 = 1 << 1;
pub const FLAG_SEND_FLUSH: u16 = 1 << 2;
pub const FLAG_SEND_FUA: u16 = 1 << 3;
pub const FLAG_ROTATIONAL: u16 = 1 << 4;
pub const FLAG_SEND_TRIM: u16 = 1 << 5;
pub const FLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const FLAG_SEND_DF: u16 = 1 << 7;
pub const FLAG_CAN_MULTI_CONN: u16 = 1 << 8;
pub const FLAG_SEND_CACHE: u16 = 1 << 10;
pub const FLAG_SEND_FAST_ZERO: u16 = 1 << 11;

// Options.
pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_LIST_META_CONTEXT: u32 = 9;
pub const OPT_SET_META_CONTEXT: u32 = 10;
pub const OPT_EXTENDED_HEADERS: u32 = 11;

// Option reply types.
pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;
const REP_ERR: u32 = 1 << 31;
pub const REP_ERR_UNSUP: u32 = REP_ERR | 1;
pub const REP_ERR_POLICY: u32 = REP_ERR | 2;
pub const REP_ERR_INVALID: u32 = REP_ERR | 3;
pub const REP_ERR_PLATFORM: u32 = REP_ERR | 4;
pub const REP_ERR_TLS_REQD: u32 = REP_ERR | 5;
pub const REP_ERR_UNKNOWN: u32 = REP_ERR | 6;
pub const REP_ERR_SHUTDOWN: u32 = REP_ERR | 7;
pub const REP_ERR_BLOCK_SIZE_REQD: u32 = REP_ERR | 8;
pub const REP_ERR_TOO_BIG: u32 = REP_ERR | 9;

// Information types of NBD_REP_INFO.
pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_DESCRIPTION: u16 = 2;
pub const INFO_BLOCK_SIZE: u16 = 3;

// Commands.
pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_CACHE: u16 = 5;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;

// Command flags.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
pub const CMD_FLAG_DF: u16 = 1 << 2;
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;

// Structured replies.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
pub const REPLY_TYPE_NONE: u16 = 0;
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) | 1;
pub const REPLY_TYPE_ERROR_OFFSET: u16 = (1 << 15) | 2;

// Error values (the only ones a server may send).
pub const EPERM: u32 = 1;
pub const EIO: u32 = 5;
pub const ENOMEM: u32 = 12;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;
pub const EOVERFLOW: u32 = 75;
pub const ENOTSUP: u32 = 95;
pub const ESHUTDOWN: u32 = 108;

// base:allocation status flags.
pub const STATE_HOLE: u32 = 1 << 0;
pub const STATE_ZERO: u32 = 1 << 1;

/// The one metadata context this server knows.
pub const CONTEXT_BASE_ALLOCATION: &str = "base:allocation";

/// Advertised size constraints (`NBD_INFO_BLOCK_SIZE`). Unaligned requests
/// are still served: the volume does read-modify-write.
pub const BLOCK_SIZE_MIN: u32 = 1;
pub const BLOCK_SIZE_PREFERRED: u32 = 4096;
/// Largest READ or WRITE payload accepted, and the maximum advertised.
pub const PAYLOAD_MAX: u32 = 32 << 20;
/// Longest string (export name, context name, message) the protocol allows.
pub const STRING_MAX: usize = 4096;

const _: () = assert!(BLOCK_SIZE_PREFERRED as usize == block_api::BLOCK_SIZE);
const _: () = assert!(PAYLOAD_MAX >= BLOCK_SIZE_PREFERRED && PAYLOAD_MAX >= 1 << 20);

/// Bytes of a transmission request header.
pub const REQUEST_HEADER_LEN: usize = 28;
/// Bytes of a simple reply header.
pub const SIMPLE_REPLY_LEN: usize = 16;
/// Bytes of a structured reply chunk header.
pub const CHUNK_HEADER_LEN: usize = 20;
/// Bytes of an option header (after the server greeting).
pub const OPTION_HEADER_LEN: usize = 16;
/// Bytes of an option reply header.
pub const OPTION_REPLY_HEADER_LEN: usize = 20;

/// One transmission request as the client sent it, before validation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestHeader {
    pub flags: u16,
    pub command: u16,
    pub cookie: u64,
    pub offset: u64,
    pub len: u32,
}

impl RequestHeader {
    /// Decode a request header; `Err` carries the bad magic.
    pub fn parse(buf: &[u8; REQUEST_HEADER_LEN]) -> Result<Self, u32> {
        let magic = be_u32(buf, 0);
        if magic != REQUEST_MAGIC {
            return Err(magic);
        }
        Ok(RequestHeader {
            flags: be_u16(buf, 4),
            command: be_u16(buf, 6),
            cookie: be_u64(buf, 8),
            offset: be_u64(buf, 16),
            len: be_u32(buf, 24),
        })
    }

    /// Encode (used by tests and tools that speak to the server).
    pub fn encode(&self) -> [u8; REQUEST_HEADER_LEN] {
        let mut b = [0u8; REQUEST_HEADER_LEN];
        b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&self.flags.to_be_bytes());
        b[6..8].copy_from_slice(&self.command.to_be_bytes());
        b[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        b[16..24].copy_from_slice(&self.offset.to_be_bytes());
        b[24..28].copy_from_slice(&self.len.to_be_bytes());
        b
    }
}

/// Data of an `NBD_OPT_INFO` / `NBD_OPT_GO` request (the client side:
/// used by tests and tools that speak to the server).
pub fn info_request(name: &str, infos: &[u16]) -> Vec<u8> {
    let mut d = Vec::with_capacity(6 + name.len() + 2 * infos.len());
    d.extend_from_slice(&(name.len() as u32).to_be_bytes());
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(&(infos.len() as u16).to_be_bytes());
    for info in infos {
        d.extend_from_slice(&info.to_be_bytes());
    }
    d
}

/// Data of an `NBD_OPT_LIST_META_CONTEXT` / `NBD_OPT_SET_META_CONTEXT`
/// request (the client side).
pub fn meta_context_request(name: &str, queries: &[&str]) -> Vec<u8> {
    let mut d = (name.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for q in queries {
        d.extend_from_slice(&(q.len() as u32).to_be_bytes());
        d.extend_from_slice(q.as_bytes());
    }
    d
}

/// A simple reply header: magic, error, cookie.
pub fn simple_reply(error: u32, cookie: u64) -> [u8; SIMPLE_REPLY_LEN] {
    let mut b = [0u8; SIMPLE_REPLY_LEN];
    b[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    b[4..8].copy_from_slice(&error.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b
}

/// A structured reply chunk header: magic, flags, type, cookie, payload length.
pub fn chunk_header(flags: u16, ty: u16, cookie: u64, len: u32) -> [u8; CHUNK_HEADER_LEN] {
    let mut b = [0u8; CHUNK_HEADER_LEN];
    b[0..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&flags.to_be_bytes());
    b[6..8].copy_from_slice(&ty.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b[16..20].copy_from_slice(&len.to_be_bytes());
    b
}

/// An option reply header: magic, option, reply type, payload length.
pub fn option_reply_header(option: u32, reply: u32, len: u32) -> [u8; OPTION_REPLY_HEADER_LEN] {
    let mut b = [0u8; OPTION_REPLY_HEADER_LEN];
    b[0..8].copy_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
    b[8..12].copy_from_slice(&option.to_be_bytes());
    b[12..16].copy_from_slice(&reply.to_be_bytes());
    b[16..20].copy_from_slice(&len.to_be_bytes());
    b
}

/// The errno a front end may put on the wire for a volume error: the
/// protocol allows only a few values, anything else becomes `EIO`.
pub fn wire_errno(errno: i32) -> u32 {
    match u32::try_from(errno) {
        Ok(e @ (EPERM | EIO | ENOMEM | EINVAL | ENOSPC | EOVERFLOW | ENOTSUP | ESHUTDOWN)) => e,
        _ => EIO,
    }
}

/// A short name of a command for logs.
pub fn command_name(command: u16) -> &'static str {
    match command {
        CMD_READ => "READ",
        CMD_WRITE => "WRITE",
        CMD_DISC => "DISC",
        CMD_FLUSH => "FLUSH",
        CMD_TRIM => "TRIM",
        CMD_CACHE => "CACHE",
        CMD_WRITE_ZEROES => "WRITE_ZEROES",
        CMD_BLOCK_STATUS => "BLOCK_STATUS",
        _ => "unknown",
    }
}

fn be_u16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn be_u32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn be_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(a)
}

/// A bounds-checked reader over option data sent by a client. Every getter
/// returns `None` instead of reading past the end.
#[derive(Debug)]
pub struct Cursor<'a> {
    rest: &'a [u8],
}

impl<'a> Cursor<'a> {
    pub fn new(data: &'a [u8]) -> Self {
        Cursor { rest: data }
    }

    pub fn bytes(&mut self, n: usize) -> Option<&'a [u8]> {
        if n > self.rest.len() {
            return None;
        }
        let (head, tail) = self.rest.split_at(n);
        self.rest = tail;
        Some(head)
    }

    pub fn u16(&mut self) -> Option<u16> {
        self.bytes(2).map(|b| be_u16(b, 0))
    }

    pub fn u32(&mut self) -> Option<u32> {
        self.bytes(4).map(|b| be_u32(b, 0))
    }

    /// A string prefixed with its 32-bit length, at most [`STRING_MAX`] bytes.
    pub fn string(&mut self) -> Option<&'a [u8]> {
        let len = self.u32()? as usize;
        if len > STRING_MAX {
            return None;
        }
        self.bytes(len)
    }

    pub fn remaining(&self) -> usize {
        self.rest.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_header_round_trips() {
        let req = RequestHeader {
            flags: CMD_FLAG_FUA,
            command: CMD_WRITE,
            cookie: 0x0102_0304_0506_0708,
            offset: 1 << 40,
            len: 4096,
        };
        assert_eq!(RequestHeader::parse(&req.encode()), Ok(req));
    }

    #[test]
    fn request_header_with_bad_magic_is_rejected() {
        let mut b = [0u8; REQUEST_HEADER_LEN];
        b[0..4].copy_from_slice(&0x1256_0953u32.to_be_bytes());
        assert_eq!(RequestHeader::parse(&b), Err(0x1256_0953));
    }

    #[test]
    fn cursor_never_reads_past_the_end() {
        let data = [0, 0, 0, 9, b'a', b'b'];
        let mut c = Cursor::new(&data);
        assert_eq!(c.string(), None, "a length past the data must not be read");
        let mut c = Cursor::new(&data[..5]);
        assert_eq!(c.u32(), Some(9));
        assert_eq!(c.u16(), None);
        assert_eq!(c.bytes(1), Some(&b"a"[..]));
        assert_eq!(c.remaining(), 0);
    }

    #[test]
    fn cursor_rejects_strings_longer_than_the_protocol_allows() {
        let mut data = ((STRING_MAX + 1) as u32).to_be_bytes().to_vec();
        data.resize(4 + STRING_MAX + 1, b'x');
        assert_eq!(Cursor::new(&data).string(), None);
    }

    #[test]
    fn unknown_errnos_become_eio() {
        assert_eq!(wire_errno(22), EINVAL);
        assert_eq!(wire_errno(28), ENOSPC);
        assert_eq!(wire_errno(2), EIO);
        assert_eq!(wire_errno(-1), EIO);
    }

    #[test]
    fn headers_have_the_documented_layout() {
        let h = chunk_header(REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, 7, 4104);
        assert_eq!(&h[0..4], &STRUCTURED_REPLY_MAGIC.to_be_bytes());
        assert_eq!(&h[4..8], &[0, 1, 0, 1]);
        assert_eq!(&h[16..20], &4104u32.to_be_bytes());
        let s = simple_reply(EIO, 9);
        assert_eq!(&s[4..8], &EIO.to_be_bytes());
        assert_eq!(&s[8..16], &9u64.to_be_bytes());
        let o = option_reply_header(OPT_GO, REP_ERR_UNKNOWN, 3);
        assert_eq!(&o[0..8], &OPTION_REPLY_MAGIC.to_be_bytes());
        assert_eq!(&o[12..16], &0x8000_0006u32.to_be_bytes());
    }
}
