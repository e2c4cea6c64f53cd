//! SCSI status codes and sense data (SPC-4 4.5): the errors a command can
//! end with, encoded in fixed (0x70) or descriptor (0x72) format as the
//! control mode page's D_SENSE bit asks.
//!
//! Invariants: every failure a command reports is a [`Sense`] built from the
//! constructors here, so the key/ASC/ASCQ pairs stay consistent; encoded
//! sense data is at most 252 bytes.

use block_api::BlockError;

pub const STATUS_GOOD: u8 = 0x00;
pub const STATUS_CHECK_CONDITION: u8 = 0x02;
pub const STATUS_CONDITION_MET: u8 = 0x04;
pub const STATUS_RESERVATION_CONFLICT: u8 = 0x18;
pub const STATUS_TASK_SET_FULL: u8 = 0x28;

pub const KEY_NO_SENSE: u8 = 0x00;
pub const KEY_NOT_READY: u8 = 0x02;
pub const KEY_MEDIUM_ERROR: u8 = 0x03;
pub const KEY_HARDWARE_ERROR: u8 = 0x04;
pub const KEY_ILLEGAL_REQUEST: u8 = 0x05;
pub const KEY_UNIT_ATTENTION: u8 = 0x06;
pub const KEY_DATA_PROTECT: u8 = 0x07;
pub const KEY_ABORTED_COMMAND: u8 = 0x0b;
pub const KEY_MISCOMPARE: u8 = 0x0e;

/// One sense condition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sense {
    pub key: u8,
    pub asc: u8,
    pub ascq: u8,
    /// The INFORMATION field (e.g. the offset of a miscompare), if valid.
    pub info: Option<u64>,
    /// Sense-key specific field pointing at the bad CDB/parameter byte:
    /// (is_cdb, byte, bit).
    pub field: Option<(bool, u16, Option<u8>)>,
}

impl Sense {
    pub const fn new(key: u8, asc: u8, ascq: u8) -> Self {
        Sense {
            key,
            asc,
            ascq,
            info: None,
            field: None,
        }
    }
    pub fn invalid_opcode() -> Self {
        Self::new(KEY_ILLEGAL_REQUEST, 0x20, 0x00)
    }
    /// INVALID FIELD IN CDB, pointing at `byte`.
    pub fn invalid_field_in_cdb(byte: u16) -> Self {
        Sense {
            field: Some((true, byte, None)),
            ..Self::new(KEY_ILLEGAL_REQUEST, 0x24, 0x00)
        }
    }
    pub fn invalid_field_in_parameter_list(byte: u16) -> Self {
        Sense {
            field: Some((false, byte, None)),
            ..Self::new(KEY_ILLEGAL_REQUEST, 0x26, 0x00)
        }
    }
    pub fn parameter_list_length_error() -> Self {
        Self::new(KEY_ILLEGAL_REQUEST, 0x1a, 0x00)
    }
    pub fn lba_out_of_range() -> Self {
        Self::new(KEY_ILLEGAL_REQUEST, 0x21, 0x00)
    }
    pub fn lun_not_supported() -> Self {
        Self::new(KEY_ILLEGAL_REQUEST, 0x25, 0x00)
    }
    pub fn invalid_field_in_information_unit() -> Self {
        Self::new(KEY_ILLEGAL_REQUEST, 0x0e, 0x03)
    }
    pub fn saving_parameters_not_supported() -> Self {
        Self::new(KEY_ILLEGAL_REQUEST, 0x39, 0x00)
    }
    pub fn invalid_release_of_persistent_reservation() -> Self {
        Self::new(KEY_ILLEGAL_REQUEST, 0x26, 0x04)
    }
    pub fn medium_removal_prevented() -> Self {
        Self::new(KEY_ILLEGAL_REQUEST, 0x53, 0x02)
    }
    pub fn write_protected() -> Self {
        Self::new(KEY_DATA_PROTECT, 0x27, 0x00)
    }
    pub fn miscompare(offset: u64) -> Self {
        Sense {
            info: Some(offset),
            ..Self::new(KEY_MISCOMPARE, 0x1d, 0x00)
        }
    }
    pub fn unrecovered_read_error(lba: u64) -> Self {
        Sense {
            info: Some(lba),
            ..Self::new(KEY_MEDIUM_ERROR, 0x11, 0x00)
        }
    }
    pub fn internal_target_failure() -> Self {
        Self::new(KEY_HARDWARE_ERROR, 0x44, 0x00)
    }
    pub fn space_allocation_failed() -> Self {
        Self::new(KEY_DATA_PROTECT, 0x27, 0x07)
    }
    pub fn not_ready() -> Self {
        Self::new(KEY_NOT_READY, 0x04, 0x00)
    }
    /// ABORTED COMMAND / DATA PHASE ERROR: the data-out did not arrive
    /// in order.
    pub fn data_phase_error() -> Self {
        Self::new(KEY_ABORTED_COMMAND, 0x4b, 0x00)
    }
    /// UNIT ATTENTION / BUS DEVICE RESET FUNCTION OCCURRED.
    pub fn reset_occurred() -> Self {
        Self::new(KEY_UNIT_ATTENTION, 0x29, 0x03)
    }
    pub fn no_sense() -> Self {
        Self::new(KEY_NO_SENSE, 0, 0)
    }

    /// The sense of a volume error, `block_size` converting byte offsets to
    /// LBAs for the INFORMATION field.
    pub fn from_block_error(e: &BlockError, block_size: u32) -> Self {
        match e {
            BlockError::OutOfRange { .. } => Self::lba_out_of_range(),
            BlockError::Checksum { offset } => {
                Self::unrecovered_read_error(offset / u64::from(block_size))
            }
            BlockError::NoSpace { .. } => Self::space_allocation_failed(),
            BlockError::NotFound(_) | BlockError::Gone(_) => Self::not_ready(),
            BlockError::Io(_) => Self::internal_target_failure(),
        }
    }

    /// Encode as sense data, descriptor format when `descriptor`.
    pub fn encode(&self, descriptor: bool) -> Vec<u8> {
        if descriptor {
            let mut v = vec![0x72, self.key & 0x0f, self.asc, self.ascq, 0, 0, 0, 0];
            if let Some(info) = self.info {
                v.extend_from_slice(&[0x00, 0x0a, 0x80, 0]);
                v.extend_from_slice(&info.to_be_bytes());
            }
            if let Some(sks) = self.sks() {
                v.extend_from_slice(&[0x02, 0x06, 0, 0]);
                v.extend_from_slice(&sks);
                v.push(0);
            }
            v[7] = (v.len() - 8) as u8;
            v
        } else {
            let mut v = vec![0u8; 18];
            v[0] = 0x70;
            v[2] = self.key & 0x0f;
            if let Some(info) = self.info {
                v[0] |= 0x80;
                let i = u32::try_from(info).unwrap_or(u32::MAX);
                v[3..7].copy_from_slice(&i.to_be_bytes());
            }
            v[7] = 10;
            v[12] = self.asc;
            v[13] = self.ascq;
            if let Some(sks) = self.sks() {
                v[15..18].copy_from_slice(&sks);
            }
            v
        }
    }

    fn sks(&self) -> Option<[u8; 3]> {
        let (cdb, byte, bit) = self.field?;
        let mut b0 = 0x80u8;
        if cdb {
            b0 |= 0x40;
        }
        if let Some(bit) = bit {
            b0 |= 0x08 | (bit & 7);
        }
        Some([b0, (byte >> 8) as u8, byte as u8])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixed_format_layout() {
        let s = Sense::invalid_field_in_cdb(2).encode(false);
        assert_eq!(s.len(), 18);
        assert_eq!((s[0], s[2], s[7], s[12], s[13]), (0x70, 5, 10, 0x24, 0));
        assert_eq!(&s[15..18], &[0xc0, 0, 2]);
        let m = Sense::miscompare(513).encode(false);
        assert_eq!(m[0], 0xf0);
        assert_eq!(&m[3..7], &513u32.to_be_bytes());
    }

    #[test]
    fn descriptor_format_layout() {
        let s = Sense::miscompare(7).encode(true);
        assert_eq!((s[0], s[1], s[2], s[3]), (0x72, 0x0e, 0x1d, 0));
        assert_eq!(s[7] as usize, s.len() - 8);
        assert_eq!(&s[8..12], &[0, 0x0a, 0x80, 0]);
    }
}
