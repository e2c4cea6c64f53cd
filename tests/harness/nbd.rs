//! A minimal, synchronous NBD client for tests that must control each
//! request and know exactly which writes were acknowledged: fixed newstyle
//! handshake with NBD_OPT_GO, simple replies, one request at a time.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
const OPT_GO: u32 = 7;
const REP_ACK: u32 = 1;
const REP_INFO: u32 = 3;
const FLAG_C_FIXED_NEWSTYLE: u32 = 1;
const FLAG_C_NO_ZEROES: u32 = 2;

pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_FLAG_FUA: u16 = 1;

pub struct NbdClient {
    s: TcpStream,
    pub size: u64,
    cookie: u64,
}

/// An NBD reply error (the server's errno) or a transport failure.
#[derive(Debug)]
pub enum NbdError {
    Server(u32),
    Io(io::Error),
}

impl NbdError {
    /// Whether the socket timed out (the server did not answer in time).
    pub fn is_timeout(&self) -> bool {
        matches!(self, NbdError::Io(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut))
    }
}

impl std::fmt::Display for NbdError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NbdError::Server(code) => write!(f, "server error {code}"),
            NbdError::Io(e) => write!(f, "transport error: {e}"),
        }
    }
}

impl From<io::Error> for NbdError {
    fn from(e: io::Error) -> Self {
        NbdError::Io(e)
    }
}

fn u16_of(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}
fn u32_of(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}
fn u64_of(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}

impl NbdClient {
    pub fn connect(addr: SocketAddr, export: &str) -> io::Result<NbdClient> {
        let s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
        s.set_read_timeout(Some(Duration::from_secs(30)))?;
        s.set_nodelay(true)?;
        let mut c = NbdClient {
            s,
            size: 0,
            cookie: 1,
        };
        c.handshake(export)?;
        Ok(c)
    }

    /// `connect` with `timeout` for the TCP connect, the handshake and
    /// every later read and write of the socket (a server that hangs, e.g.
    /// a SIGSTOPped storaged, then fails the call with a timeout error
    /// instead of blocking; see `NbdError::is_timeout`).
    pub fn connect_with_timeout(
        addr: SocketAddr,
        export: &str,
        timeout: Duration,
    ) -> io::Result<NbdClient> {
        let s = TcpStream::connect_timeout(&addr, timeout)?;
        s.set_read_timeout(Some(timeout))?;
        s.set_write_timeout(Some(timeout))?;
        s.set_nodelay(true)?;
        let mut c = NbdClient {
            s,
            size: 0,
            cookie: 1,
        };
        c.handshake(export)?;
        Ok(c)
    }

    /// Change the socket's read and write timeouts (None: wait forever).
    pub fn set_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        self.s.set_read_timeout(timeout)?;
        self.s.set_write_timeout(timeout)
    }

    fn bad(what: &str) -> io::Error {
        io::Error::new(io::ErrorKind::InvalidData, what.to_string())
    }

    fn handshake(&mut self, export: &str) -> io::Result<()> {
        let mut hello = [0u8; 18];
        self.s.read_exact(&mut hello)?;
        if u64_of(&hello) != NBDMAGIC || u64_of(&hello[8..]) != IHAVEOPT {
            return Err(Self::bad("bad server greeting"));
        }
        self.s
            .write_all(&(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes())?;
        let mut opt = Vec::new();
        opt.extend_from_slice(&IHAVEOPT.to_be_bytes());
        opt.extend_from_slice(&OPT_GO.to_be_bytes());
        opt.extend_from_slice(&((4 + export.len() + 2) as u32).to_be_bytes());
        opt.extend_from_slice(&(export.len() as u32).to_be_bytes());
        opt.extend_from_slice(export.as_bytes());
        opt.extend_from_slice(&0u16.to_be_bytes());
        self.s.write_all(&opt)?;
        loop {
            let mut h = [0u8; 20];
            self.s.read_exact(&mut h)?;
            if u64_of(&h) != OPT_REPLY_MAGIC {
                return Err(Self::bad("bad option reply magic"));
            }
            let rep = u32_of(&h[12..]);
            let len = u32_of(&h[16..]) as usize;
            let mut body = vec![0u8; len];
            self.s.read_exact(&mut body)?;
            match rep {
                REP_ACK => return Ok(()),
                REP_INFO if len >= 12 && u16_of(&body) == 0 => self.size = u64_of(&body[2..]),
                REP_INFO => {}
                e if e & 0x8000_0000 != 0 => {
                    return Err(io::Error::new(
                        io::ErrorKind::NotFound,
                        format!(
                            "server refused export {export:?}: reply {e:#x} {}",
                            String::from_utf8_lossy(&body)
                        ),
                    ));
                }
                _ => {}
            }
        }
    }

    fn request(
        &mut self,
        cmd: u16,
        flags: u16,
        offset: u64,
        len: u32,
        payload: &[u8],
    ) -> io::Result<u64> {
        let cookie = self.cookie;
        self.cookie += 1;
        let mut r = Vec::with_capacity(28 + payload.len());
        r.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        r.extend_from_slice(&flags.to_be_bytes());
        r.extend_from_slice(&cmd.to_be_bytes());
        r.extend_from_slice(&cookie.to_be_bytes());
        r.extend_from_slice(&offset.to_be_bytes());
        r.extend_from_slice(&len.to_be_bytes());
        r.extend_from_slice(payload);
        self.s.write_all(&r)?;
        Ok(cookie)
    }

    fn reply(&mut self, cookie: u64) -> Result<(), NbdError> {
        let mut h = [0u8; 16];
        self.s.read_exact(&mut h)?;
        if u32_of(&h) != SIMPLE_REPLY_MAGIC || u64_of(&h[8..]) != cookie {
            return Err(NbdError::Io(Self::bad("bad reply header")));
        }
        match u32_of(&h[4..]) {
            0 => Ok(()),
            e => Err(NbdError::Server(e)),
        }
    }

    pub fn write(&mut self, offset: u64, data: &[u8], fua: bool) -> Result<(), NbdError> {
        let c = self.request(
            CMD_WRITE,
            if fua { CMD_FLAG_FUA } else { 0 },
            offset,
            data.len() as u32,
            data,
        )?;
        self.reply(c)
    }

    /// Send a write without waiting for its reply (several may be in
    /// flight; collect their replies with `reply_any`). Returns its cookie.
    pub fn send_write(&mut self, offset: u64, data: &[u8], fua: bool) -> io::Result<u64> {
        self.request(
            CMD_WRITE,
            if fua { CMD_FLAG_FUA } else { 0 },
            offset,
            data.len() as u32,
            data,
        )
    }

    /// The next simple reply that carries no data (a write's, trim's or
    /// flush's), in the server's completion order: its cookie and the
    /// server's error code (0: success).
    pub fn reply_any(&mut self) -> io::Result<(u64, u32)> {
        let mut h = [0u8; 16];
        self.s.read_exact(&mut h)?;
        if u32_of(&h) != SIMPLE_REPLY_MAGIC {
            return Err(Self::bad("bad reply magic"));
        }
        Ok((u64_of(&h[8..]), u32_of(&h[4..])))
    }

    pub fn read(&mut self, offset: u64, len: u32) -> Result<Vec<u8>, NbdError> {
        let c = self.request(CMD_READ, 0, offset, len, &[])?;
        self.reply(c)?;
        let mut buf = vec![0u8; len as usize];
        self.s.read_exact(&mut buf)?;
        Ok(buf)
    }

    pub fn flush(&mut self) -> Result<(), NbdError> {
        let c = self.request(CMD_FLUSH, 0, 0, 0, &[])?;
        self.reply(c)
    }

    pub fn trim(&mut self, offset: u64, len: u32) -> Result<(), NbdError> {
        let c = self.request(CMD_TRIM, 0, offset, len, &[])?;
        self.reply(c)
    }

    /// Send raw bytes (for hostile-input tests).
    pub fn send_raw(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.s.write_all(bytes)
    }

    /// Send a request with arbitrary fields; returns the reply's error code.
    pub fn raw_request(
        &mut self,
        cmd: u16,
        flags: u16,
        offset: u64,
        len: u32,
        payload: &[u8],
    ) -> Result<u32, NbdError> {
        let c = self.request(cmd, flags, offset, len, payload)?;
        match self.reply(c) {
            Ok(()) => Ok(0),
            Err(NbdError::Server(e)) => Ok(e),
            Err(e) => Err(e),
        }
    }

    pub fn disconnect(mut self) {
        let _ = self.request(CMD_DISC, 0, 0, 0, &[]);
    }
}
