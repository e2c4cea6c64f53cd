//! A minimal, synchronous iSCSI initiator for tests that must choose the
//! initiator name and ISID (an I_T nexus) and see each command's SCSI
//! status: login straight to full feature phase without authentication,
//! one command at a time, immediate data only. Enough for persistent
//! reservations, which no packaged command-line initiator drives.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// The IQN prefix storaged gives every volume's target.
pub const IQN_PREFIX: &str = "iqn.2026-01.io.s2d:";

pub fn target_iqn(volume: &str) -> String {
    format!("{IQN_PREFIX}{volume}")
}

pub const STATUS_GOOD: u8 = 0x00;
pub const STATUS_CHECK_CONDITION: u8 = 0x02;
pub const STATUS_RESERVATION_CONFLICT: u8 = 0x18;

/// PERSISTENT RESERVE OUT service actions (SPC-4 6.16).
pub const PR_REGISTER: u8 = 0x00;
pub const PR_RESERVE: u8 = 0x01;
pub const PR_RELEASE: u8 = 0x02;
pub const PR_CLEAR: u8 = 0x03;
pub const PR_PREEMPT: u8 = 0x04;
/// Reservation type WRITE EXCLUSIVE.
pub const PR_WRITE_EXCLUSIVE: u8 = 0x01;

const BHS_LEN: usize = 48;
const DATA_SEGMENT_MAX: usize = 1 << 20;

/// The outcome of one SCSI command.
#[derive(Debug)]
pub struct ScsiResult {
    pub status: u8,
    /// Data-In bytes.
    pub data: Vec<u8>,
    /// Sense data (without the 2-byte length), when the target sent any.
    pub sense: Vec<u8>,
}

impl ScsiResult {
    /// (sense key, ASC, ASCQ) of fixed-format sense data.
    pub fn sense_code(&self) -> Option<(u8, u8, u8)> {
        let s = &self.sense;
        (s.len() >= 14).then(|| (s[2] & 0x0f, s[12], s[13]))
    }
}

/// The PERSISTENT RESERVE IN view of a logical unit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrView {
    pub generation: u32,
    pub keys: Vec<u64>,
    /// (key, type) of the reservation in effect.
    pub reservation: Option<(u64, u8)>,
}

pub struct Session {
    sock: TcpStream,
    cmd_sn: u32,
    exp_stat_sn: u32,
    itt: u32,
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

fn be64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}

fn pad4(n: usize) -> usize {
    n.div_ceil(4) * 4
}

impl Session {
    /// Log in as `initiator` with session id `isid` to `volume`'s target.
    pub fn login(
        addr: SocketAddr,
        initiator: &str,
        isid: [u8; 6],
        volume: &str,
    ) -> io::Result<Session> {
        let sock = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
        sock.set_read_timeout(Some(Duration::from_secs(20)))?;
        sock.set_nodelay(true)?;
        let mut s = Session {
            sock,
            cmd_sn: 1,
            exp_stat_sn: 0,
            itt: 1,
        };
        let mut bhs = [0u8; BHS_LEN];
        bhs[0] = 0x43; // login request, immediate
        bhs[1] = 0x80 | (1 << 2) | 3; // transit, operational -> full feature
        bhs[8..14].copy_from_slice(&isid);
        bhs[16..20].copy_from_slice(&s.itt.to_be_bytes());
        bhs[24..28].copy_from_slice(&s.cmd_sn.to_be_bytes());
        let text = format!(
            "InitiatorName={initiator}\0SessionType=Normal\0TargetName={}\0\
             HeaderDigest=None\0DataDigest=None\0ImmediateData=Yes\0InitialR2T=Yes\0\
             MaxRecvDataSegmentLength=262144\0",
            target_iqn(volume)
        );
        s.send(bhs, text.as_bytes())?;
        let (resp, _) = s.recv()?;
        if resp[0] & 0x3f != 0x23 {
            return Err(io::Error::other(format!(
                "expected a login response, got opcode {:#x}",
                resp[0]
            )));
        }
        let (class, detail) = (resp[36], resp[37]);
        if (class, detail) != (0, 0) {
            return Err(io::Error::other(format!(
                "login refused: status class {class} detail {detail}"
            )));
        }
        if resp[1] & 0x80 == 0 || resp[1] & 0x03 != 3 {
            return Err(io::Error::other(
                "the target did not move to full feature phase",
            ));
        }
        s.exp_stat_sn = be32(&resp[24..28]).wrapping_add(1);
        Ok(s)
    }

    fn send(&mut self, mut bhs: [u8; BHS_LEN], data: &[u8]) -> io::Result<()> {
        let n = data.len();
        bhs[5..8].copy_from_slice(&(n as u32).to_be_bytes()[1..]);
        let mut buf = Vec::with_capacity(BHS_LEN + pad4(n));
        buf.extend_from_slice(&bhs);
        buf.extend_from_slice(data);
        buf.resize(BHS_LEN + pad4(n), 0);
        self.sock.write_all(&buf)
    }

    /// One PDU: its header and data segment.
    fn recv(&mut self) -> io::Result<([u8; BHS_LEN], Vec<u8>)> {
        let mut bhs = [0u8; BHS_LEN];
        self.sock.read_exact(&mut bhs)?;
        let ahs = bhs[4] as usize * 4;
        let n = be32(&[0, bhs[5], bhs[6], bhs[7]]) as usize;
        if n > DATA_SEGMENT_MAX {
            return Err(io::Error::other(format!("data segment of {n} bytes")));
        }
        let mut rest = vec![0u8; ahs + pad4(n)];
        self.sock.read_exact(&mut rest)?;
        rest.drain(..ahs);
        rest.truncate(n);
        Ok((bhs, rest))
    }

    /// Run one command on LUN 0: `write` goes as immediate data, up to
    /// `read_len` bytes come back.
    pub fn command(
        &mut self,
        cdb: &[u8],
        write: Option<&[u8]>,
        read_len: u32,
    ) -> io::Result<ScsiResult> {
        assert!(cdb.len() <= 16, "CDB longer than 16 bytes");
        self.itt = self.itt.wrapping_add(1);
        let itt = self.itt;
        let mut bhs = [0u8; BHS_LEN];
        bhs[0] = 0x01;
        let mut flags = 0x80 | 0x01; // final, simple task
        if write.is_some() {
            flags |= 0x20;
        }
        if read_len > 0 {
            flags |= 0x40;
        }
        bhs[1] = flags;
        bhs[16..20].copy_from_slice(&itt.to_be_bytes());
        let edtl = write.map_or(read_len, |w| w.len() as u32);
        bhs[20..24].copy_from_slice(&edtl.to_be_bytes());
        bhs[24..28].copy_from_slice(&self.cmd_sn.to_be_bytes());
        bhs[28..32].copy_from_slice(&self.exp_stat_sn.to_be_bytes());
        bhs[32..32 + cdb.len()].copy_from_slice(cdb);
        self.cmd_sn = self.cmd_sn.wrapping_add(1);
        self.send(bhs, write.unwrap_or(&[]))?;
        let mut data = Vec::new();
        loop {
            let (h, seg) = self.recv()?;
            match h[0] & 0x3f {
                // Data-In, possibly with status.
                0x25 => {
                    data.extend_from_slice(&seg);
                    if h[1] & 0x01 != 0 {
                        self.exp_stat_sn = be32(&h[24..28]).wrapping_add(1);
                        return Ok(ScsiResult {
                            status: h[3],
                            data,
                            sense: Vec::new(),
                        });
                    }
                }
                // SCSI response.
                0x21 => {
                    self.exp_stat_sn = be32(&h[24..28]).wrapping_add(1);
                    let sense = if seg.len() >= 2 {
                        let len = u16::from_be_bytes([seg[0], seg[1]]) as usize;
                        seg[2..(2 + len).min(seg.len())].to_vec()
                    } else {
                        Vec::new()
                    };
                    return Ok(ScsiResult {
                        status: h[3],
                        data,
                        sense,
                    });
                }
                // NOP-In: answer a ping that asks for it.
                0x20 => {
                    let ttt = be32(&h[20..24]);
                    if ttt != 0xffff_ffff {
                        let mut out = [0u8; BHS_LEN];
                        out[0] = 0x40; // NOP-Out, immediate
                        out[1] = 0x80;
                        out[8..16].copy_from_slice(&h[8..16]);
                        out[16..20].copy_from_slice(&0xffff_ffffu32.to_be_bytes());
                        out[20..24].copy_from_slice(&ttt.to_be_bytes());
                        out[24..28].copy_from_slice(&self.cmd_sn.to_be_bytes());
                        out[28..32].copy_from_slice(&self.exp_stat_sn.to_be_bytes());
                        self.send(out, &[])?;
                    }
                }
                op => {
                    return Err(io::Error::other(format!(
                        "unexpected PDU opcode {op:#x} while waiting for a command's status"
                    )));
                }
            }
        }
    }

    /// PERSISTENT RESERVE OUT with the basic 24-byte parameter list.
    pub fn pr_out(
        &mut self,
        action: u8,
        kind: u8,
        key: u64,
        sa_key: u64,
    ) -> io::Result<ScsiResult> {
        let mut cdb = [0u8; 10];
        cdb[0] = 0x5f;
        cdb[1] = action;
        cdb[2] = kind & 0x0f;
        cdb[5..9].copy_from_slice(&24u32.to_be_bytes());
        let mut params = [0u8; 24];
        params[0..8].copy_from_slice(&key.to_be_bytes());
        params[8..16].copy_from_slice(&sa_key.to_be_bytes());
        self.command(&cdb, Some(&params), 0)
    }

    /// READ KEYS and READ RESERVATION.
    pub fn pr_view(&mut self) -> io::Result<PrView> {
        let pr_in = |action: u8| {
            let mut cdb = [0u8; 10];
            cdb[0] = 0x5e;
            cdb[1] = action;
            cdb[7..9].copy_from_slice(&4096u16.to_be_bytes());
            cdb
        };
        let keys = self.command(&pr_in(0), None, 4096)?;
        let res = self.command(&pr_in(1), None, 4096)?;
        for (what, r) in [("READ KEYS", &keys), ("READ RESERVATION", &res)] {
            if r.status != STATUS_GOOD || r.data.len() < 8 {
                return Err(io::Error::other(format!(
                    "PERSISTENT RESERVE IN {what} failed: {r:?}"
                )));
            }
        }
        let n = (be32(&keys.data[4..8]) as usize).min(keys.data.len() - 8);
        let list = keys.data[8..8 + n]
            .chunks_exact(8)
            .map(be64)
            .collect::<Vec<_>>();
        let reservation = (be32(&res.data[4..8]) >= 16 && res.data.len() >= 24)
            .then(|| (be64(&res.data[8..16]), res.data[21] & 0x0f));
        Ok(PrView {
            generation: be32(&keys.data[0..4]),
            keys: list,
            reservation,
        })
    }

    /// WRITE(10) of whole 512-byte logical blocks at `lba`.
    pub fn write10(&mut self, lba: u32, data: &[u8]) -> io::Result<ScsiResult> {
        assert!(
            data.len().is_multiple_of(512),
            "write10 takes whole 512-byte blocks"
        );
        let mut cdb = [0u8; 10];
        cdb[0] = 0x2a;
        cdb[2..6].copy_from_slice(&lba.to_be_bytes());
        cdb[7..9].copy_from_slice(&((data.len() / 512) as u16).to_be_bytes());
        self.command(&cdb, Some(data), 0)
    }

    /// READ(10) of `blocks` 512-byte logical blocks at `lba`.
    pub fn read10(&mut self, lba: u32, blocks: u16) -> io::Result<ScsiResult> {
        let mut cdb = [0u8; 10];
        cdb[0] = 0x28;
        cdb[2..6].copy_from_slice(&lba.to_be_bytes());
        cdb[7..9].copy_from_slice(&blocks.to_be_bytes());
        self.command(&cdb, None, u32::from(blocks) * 512)
    }
}
