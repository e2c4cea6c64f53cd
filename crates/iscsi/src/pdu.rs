//! The iSCSI PDU as plain data: the 48-byte Basic Header Segment (BHS), the
//! optional Additional Header Segments and the data segment, with typed
//! accessors for the fields RFC 7143 (section 11) defines.
//!
//! Invariants: a [`Bhs`] is always exactly 48 bytes and every accessor reads
//! or writes a fixed offset inside it, so no input can make one panic. The
//! data segment length field is derived from `data` when a PDU is written
//! (see `wire`), never trusted from the struct.

use bytes::Bytes;

/// Size of the Basic Header Segment.
pub const BHS_LEN: usize = 48;
/// The reserved tag value ("no task" / "no transfer").
pub const RESERVED_TAG: u32 = 0xffff_ffff;

/// Opcodes an initiator sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InitiatorOp {
    NopOut,
    ScsiCommand,
    TaskMgmt,
    Login,
    Text,
    DataOut,
    Logout,
    Snack,
}

impl InitiatorOp {
    pub fn from_code(code: u8) -> Option<Self> {
        Some(match code {
            0x00 => Self::NopOut,
            0x01 => Self::ScsiCommand,
            0x02 => Self::TaskMgmt,
            0x03 => Self::Login,
            0x04 => Self::Text,
            0x05 => Self::DataOut,
            0x06 => Self::Logout,
            0x10 => Self::Snack,
            _ => return None,
        })
    }
}

/// Opcodes a target sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum TargetOp {
    NopIn = 0x20,
    ScsiResponse = 0x21,
    TaskMgmtResponse = 0x22,
    LoginResponse = 0x23,
    TextResponse = 0x24,
    DataIn = 0x25,
    LogoutResponse = 0x26,
    R2t = 0x31,
    AsyncMessage = 0x32,
    Reject = 0x3f,
}

/// Reasons of a Reject PDU (RFC 7143 11.17.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum RejectReason {
    DataDigestError = 0x02,
    SnackReject = 0x03,
    ProtocolError = 0x04,
    CommandNotSupported = 0x05,
    ImmediateCommandReject = 0x06,
    TaskInProgress = 0x07,
    InvalidDataAck = 0x08,
    InvalidPduField = 0x09,
    OutOfResources = 0x0a,
    WaitingForLogout = 0x0c,
}

/// The Basic Header Segment.
#[derive(Clone, PartialEq, Eq)]
pub struct Bhs(pub [u8; BHS_LEN]);

impl std::fmt::Debug for Bhs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Bhs(op={:#04x} flags={:#04x} itt={:#x} dsl={})",
            self.opcode(),
            self.flags(),
            self.itt(),
            self.data_segment_len()
        )
    }
}

impl Default for Bhs {
    fn default() -> Self {
        Bhs([0; BHS_LEN])
    }
}

impl Bhs {
    /// A header for a target PDU with the given opcode, everything else zero.
    pub fn target(op: TargetOp) -> Self {
        let mut b = Bhs::default();
        b.0[0] = op as u8;
        b
    }

    pub fn opcode(&self) -> u8 {
        self.0[0] & 0x3f
    }
    pub fn immediate(&self) -> bool {
        self.0[0] & 0x40 != 0
    }
    pub fn flags(&self) -> u8 {
        self.0[1]
    }
    pub fn set_flags(&mut self, f: u8) {
        self.0[1] = f;
    }
    /// The F (final) bit, common to most PDUs.
    pub fn final_bit(&self) -> bool {
        self.0[1] & 0x80 != 0
    }
    pub fn total_ahs_len(&self) -> usize {
        self.0[4] as usize * 4
    }
    pub fn data_segment_len(&self) -> usize {
        (self.0[5] as usize) << 16 | (self.0[6] as usize) << 8 | self.0[7] as usize
    }
    pub fn set_lengths(&mut self, ahs_len: usize, data_len: usize) {
        debug_assert!(ahs_len.is_multiple_of(4) && ahs_len / 4 <= 255);
        debug_assert!(data_len < 1 << 24);
        self.0[4] = (ahs_len / 4) as u8;
        self.0[5] = (data_len >> 16) as u8;
        self.0[6] = (data_len >> 8) as u8;
        self.0[7] = data_len as u8;
    }
    pub fn lun_bytes(&self) -> [u8; 8] {
        let mut l = [0; 8];
        l.copy_from_slice(&self.0[8..16]);
        l
    }
    pub fn set_lun_bytes(&mut self, lun: [u8; 8]) {
        self.0[8..16].copy_from_slice(&lun);
    }
    pub fn itt(&self) -> u32 {
        self.u32_at(16)
    }
    pub fn set_itt(&mut self, v: u32) {
        self.set_u32_at(16, v)
    }

    pub fn u16_at(&self, off: usize) -> u16 {
        u16::from_be_bytes([self.0[off], self.0[off + 1]])
    }
    pub fn set_u16_at(&mut self, off: usize, v: u16) {
        self.0[off..off + 2].copy_from_slice(&v.to_be_bytes());
    }
    pub fn u32_at(&self, off: usize) -> u32 {
        u32::from_be_bytes([
            self.0[off],
            self.0[off + 1],
            self.0[off + 2],
            self.0[off + 3],
        ])
    }
    pub fn set_u32_at(&mut self, off: usize, v: u32) {
        self.0[off..off + 4].copy_from_slice(&v.to_be_bytes());
    }

    // Fields shared by several initiator PDUs.
    /// CmdSN (SCSI command, NOP-Out, TMF, login, text, logout).
    pub fn cmd_sn(&self) -> u32 {
        self.u32_at(24)
    }
    /// ExpStatSN (initiator PDUs).
    pub fn exp_stat_sn(&self) -> u32 {
        self.u32_at(28)
    }
    /// Target Transfer Tag (NOP-Out, Data-Out, Text).
    pub fn ttt(&self) -> u32 {
        self.u32_at(20)
    }
    pub fn set_ttt(&mut self, v: u32) {
        self.set_u32_at(20, v)
    }

    // Fields shared by target PDUs.
    pub fn set_stat_sn(&mut self, v: u32) {
        self.set_u32_at(24, v)
    }
    pub fn set_exp_cmd_sn(&mut self, v: u32) {
        self.set_u32_at(28, v)
    }
    pub fn set_max_cmd_sn(&mut self, v: u32) {
        self.set_u32_at(32, v)
    }
}

/// One whole PDU.
#[derive(Debug, Clone, Default)]
pub struct Pdu {
    pub bhs: Bhs,
    /// Additional Header Segments, a multiple of 4 bytes.
    pub ahs: Vec<u8>,
    /// The data segment without padding.
    pub data: Bytes,
}

impl Pdu {
    pub fn new(bhs: Bhs) -> Self {
        Pdu {
            bhs,
            ahs: Vec::new(),
            data: Bytes::new(),
        }
    }
    pub fn with_data(bhs: Bhs, data: impl Into<Bytes>) -> Self {
        Pdu {
            bhs,
            ahs: Vec::new(),
            data: data.into(),
        }
    }
}

/// The 8-byte LUN field as a LUN number (single-level peripheral or flat
/// addressing); `None` for formats we do not serve.
pub fn decode_lun(lun: [u8; 8]) -> Option<u16> {
    if lun[2..].iter().any(|&b| b != 0) {
        return None;
    }
    match lun[0] >> 6 {
        0 | 1 => Some(u16::from(lun[0] & 0x3f) << 8 | u16::from(lun[1])),
        _ => None,
    }
}

/// The LUN field for `lun` in peripheral (or flat above 255) addressing.
pub fn encode_lun(lun: u16) -> [u8; 8] {
    let mut l = [0; 8];
    if lun < 256 {
        l[1] = lun as u8;
    } else {
        l[0] = 0x40 | (lun >> 8) as u8 & 0x3f;
        l[1] = lun as u8;
    }
    l
}

/// Serial number arithmetic (RFC 1982, 32 bits): `a < b`.
pub fn sn_lt(a: u32, b: u32) -> bool {
    a != b && b.wrapping_sub(a) < 1 << 31
}

/// Serial number arithmetic: `a <= b`.
pub fn sn_le(a: u32, b: u32) -> bool {
    a == b || sn_lt(a, b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lengths_round_trip() {
        let mut b = Bhs::default();
        b.set_lengths(8, 0x12_3456);
        assert_eq!(b.total_ahs_len(), 8);
        assert_eq!(b.data_segment_len(), 0x12_3456);
    }

    #[test]
    fn luns_round_trip() {
        for l in [0u16, 1, 255, 256, 0x3fff] {
            assert_eq!(decode_lun(encode_lun(l)), Some(l));
        }
        assert_eq!(decode_lun([0xc0, 0, 0, 0, 0, 0, 0, 0]), None);
    }

    #[test]
    fn serial_arithmetic_wraps() {
        assert!(sn_lt(1, 2));
        assert!(sn_lt(0xffff_ffff, 0));
        assert!(!sn_lt(5, 5));
        assert!(sn_le(5, 5));
        assert!(!sn_lt(2, 1));
    }
}
