//! The SCSI device server: executes one CDB against a [`LogicalUnit`] and
//! returns status, sense and data-in. It knows nothing of iSCSI; the
//! transport hands it the CDB and the complete data-out buffer and turns the
//! result into PDUs.
//!
//! Invariants: every path returns a [`ScsiResponse`] (no panics on any
//! CDB or parameter data); data-in is never longer than the CDB's
//! allocation length; a command that fails its checks changes nothing.

pub mod cdb;
pub mod inquiry;
pub mod io;
pub mod lu;
pub mod mode;
pub mod opcodes;
pub mod pr;
pub mod sense;

use block_api::AlignedBuf;

use crate::reservation::InitiatorPort;
use lu::LogicalUnit;
use opcodes::Access;
use sense::{STATUS_CHECK_CONDITION, STATUS_GOOD, STATUS_RESERVATION_CONFLICT, Sense};

/// Data returned to the initiator.
pub enum DataIn {
    Bytes(Vec<u8>),
    Buf(AlignedBuf),
}

impl DataIn {
    pub fn as_slice(&self) -> &[u8] {
        match self {
            DataIn::Bytes(v) => v,
            DataIn::Buf(b) => b,
        }
    }
    pub fn len(&self) -> usize {
        self.as_slice().len()
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The outcome of one command.
pub struct ScsiResponse {
    pub status: u8,
    /// Encoded sense data (with CHECK CONDITION).
    pub sense: Option<Vec<u8>>,
    pub data_in: Option<DataIn>,
}

impl ScsiResponse {
    pub fn good() -> Self {
        ScsiResponse {
            status: STATUS_GOOD,
            sense: None,
            data_in: None,
        }
    }
    pub fn data(v: Vec<u8>) -> Self {
        ScsiResponse {
            status: STATUS_GOOD,
            sense: None,
            data_in: Some(DataIn::Bytes(v)),
        }
    }
    /// Data truncated to the allocation length.
    pub fn data_alloc(mut v: Vec<u8>, alloc: usize) -> Self {
        v.truncate(alloc);
        Self::data(v)
    }
    pub fn check(sense: Sense, descriptor: bool) -> Self {
        ScsiResponse {
            status: STATUS_CHECK_CONDITION,
            sense: Some(sense.encode(descriptor)),
            data_in: None,
        }
    }
    pub fn status(status: u8) -> Self {
        ScsiResponse {
            status,
            sense: None,
            data_in: None,
        }
    }
    pub fn conflict() -> Self {
        ScsiResponse {
            status: STATUS_RESERVATION_CONFLICT,
            sense: None,
            data_in: None,
        }
    }
}

/// Result type of command handlers: an error is a CHECK CONDITION.
pub type CmdResult = Result<ScsiResponse, Sense>;

/// The I_T nexus a command arrived on.
#[derive(Debug, Clone)]
pub struct Nexus {
    pub port: InitiatorPort,
    /// Relative target port identifier (one portal group: 1).
    pub target_port: u16,
}

/// Hard cap on the bytes one command may transfer, whatever the block
/// limits page advertises (initiators that ignore it still get served up to
/// here).
pub const TRANSFER_BYTES_MAX: u64 = 32 * 1024 * 1024;

/// The larger of the data-in and data-out lengths a CDB implies, for
/// buffer accounting.
pub fn transfer_bytes(cdb: &[u8], block_size: u32) -> u64 {
    let out = cdb::data_out_len(cdb, block_size).unwrap_or(0);
    let data_in = match cdb.first() {
        Some(0x08 | 0x28 | 0xa8 | 0x88 | 0x2f | 0xaf | 0x8f)
            if cdb.len() >= cdb::cdb_len(cdb[0]) =>
        {
            cdb::lba_and_len(cdb).1 * u64::from(block_size)
        }
        _ => 0,
    };
    out.max(data_in)
}

/// The length of data-out a CDB asks for, when it transfers any.
pub fn expected_data_out(cdb: &[u8], block_size: u32) -> u64 {
    cdb::data_out_len(cdb, block_size).unwrap_or(0)
}

/// Whether the reservations in effect forbid `access` from `nexus`.
fn conflicts(lu: &LogicalUnit, nexus: &Nexus, op: u8, access: Access) -> bool {
    if access == Access::Always {
        return false;
    }
    // PERSISTENT reservations take precedence over RESERVE(6).
    let pr = lu.with_pr(|st| {
        st.reservation.as_ref().map(|r| {
            let registered = st.registration(&nexus.port).is_some();
            let holder = st.is_holder(&nexus.port);
            (r.kind, registered, holder)
        })
    });
    if let Some((kind, registered, holder)) = pr {
        if matches!(op, 0x16 | 0x17) {
            return true;
        }
        if holder || (kind.registrants_have_access() && registered) {
            return false;
        }
        return access == Access::Write || kind.exclusive_access();
    }
    match lu.reserve6_holder() {
        Some(h) if h != nexus.port => op != 0x17,
        _ => false,
    }
}

/// Execute one command. `data_out` holds exactly the bytes the transport
/// received (the transport has checked it against the expected length).
pub async fn execute(
    lu: &LogicalUnit,
    nexus: &Nexus,
    cdb: &[u8],
    data_out: Option<AlignedBuf>,
) -> ScsiResponse {
    let d_sense = lu.mode().d_sense;
    let Some(info) = opcodes::lookup_cdb(cdb) else {
        let sense = if cdb
            .first()
            .is_some_and(|&op| opcodes::has_service_action(op))
        {
            Sense::invalid_field_in_cdb(1)
        } else {
            Sense::invalid_opcode()
        };
        return ScsiResponse::check(sense, d_sense);
    };
    if cdb.len() < info.usage.len() {
        return ScsiResponse::check(Sense::invalid_opcode(), d_sense);
    }
    // A pending unit attention is reported by any command but INQUIRY,
    // REPORT LUNS and REQUEST SENSE (which returns it as its data).
    if !matches!(info.opcode, 0x12 | 0xa0 | 0x03)
        && let Some(ua) = lu.take_unit_attention(&nexus.port)
    {
        return ScsiResponse::check(ua, d_sense);
    }
    if conflicts(lu, nexus, info.opcode, info.access) {
        return ScsiResponse::conflict();
    }
    let r = dispatch(lu, nexus, &cdb[..info.usage.len()], data_out).await;
    match r {
        Ok(resp) => resp,
        Err(sense) => ScsiResponse::check(sense, lu.mode().d_sense),
    }
}

async fn dispatch(
    lu: &LogicalUnit,
    nexus: &Nexus,
    cdb: &[u8],
    data: Option<AlignedBuf>,
) -> CmdResult {
    match cdb[0] {
        0x00 => Ok(ScsiResponse::good()),
        0x03 => request_sense(lu, nexus, cdb),
        0x12 => inquiry::inquiry(lu, cdb),
        0x15 | 0x55 => mode::mode_select(lu, cdb, data.as_deref().unwrap_or(&[])),
        0x1a | 0x5a => mode::mode_sense(lu, cdb),
        0x16 => {
            if lu.reserve6(&nexus.port) {
                Ok(ScsiResponse::good())
            } else {
                Ok(ScsiResponse::conflict())
            }
        }
        0x17 => {
            lu.release6(&nexus.port);
            Ok(ScsiResponse::good())
        }
        0x1b => start_stop(cdb),
        0x1e => Ok(ScsiResponse::good()),
        0x25 => io::read_capacity10(lu),
        0x9e if cdb[1] & 0x1f == 0x10 => io::read_capacity16(lu, cdb),
        0x9e => io::get_lba_status(lu, cdb).await,
        0x08 | 0x28 | 0xa8 | 0x88 => io::read(lu, cdb).await,
        0x0a | 0x2a | 0xaa | 0x8a | 0x2e | 0xae | 0x8e => io::write(lu, cdb, data).await,
        0x2f | 0xaf | 0x8f => io::verify(lu, cdb, data).await,
        0x34 | 0x90 => io::prefetch(lu, cdb),
        0x35 | 0x91 => io::sync_cache(lu, cdb).await,
        0x41 | 0x93 => io::write_same(lu, cdb, data).await,
        0x42 => io::unmap(lu, cdb, data.as_deref().unwrap_or(&[])).await,
        0x89 => io::compare_and_write(lu, cdb, data).await,
        0x5e => pr::pr_in(lu, cdb),
        0x5f => pr::pr_out(lu, nexus, cdb, data.as_deref().unwrap_or(&[])).await,
        0xa0 => report_luns(cdb),
        0xa3 => report_supported_opcodes(cdb),
        _ => Err(Sense::invalid_opcode()),
    }
}

fn request_sense(lu: &LogicalUnit, nexus: &Nexus, cdb: &[u8]) -> CmdResult {
    // No deferred errors are kept: report a pending unit attention or NO
    // SENSE, in the format asked for.
    let desc = cdb[1] & 0x01 != 0;
    let sense = lu
        .take_unit_attention(&nexus.port)
        .unwrap_or_else(Sense::no_sense);
    Ok(ScsiResponse::data_alloc(
        sense.encode(desc),
        cdb[4] as usize,
    ))
}

fn start_stop(cdb: &[u8]) -> CmdResult {
    // A non-removable, always-spinning unit: power conditions and start /
    // stop are accepted and change nothing; LOEJ asks to eject, which a
    // non-removable medium refuses.
    let loej = cdb[4] & 0x02 != 0;
    let start = cdb[4] & 0x01 != 0;
    let power_condition = cdb[4] >> 4;
    if loej && !start && power_condition == 0 {
        return Err(Sense::invalid_field_in_cdb(4));
    }
    Ok(ScsiResponse::good())
}

/// REPORT LUNS: LUN 0 only.
pub fn report_luns(cdb: &[u8]) -> CmdResult {
    let alloc = cdb::be32(&cdb[6..10]) as usize;
    if alloc < 16 {
        return Err(Sense::invalid_field_in_cdb(6));
    }
    if !matches!(cdb[2], 0x00 | 0x01 | 0x02 | 0x10 | 0x11 | 0x12) {
        return Err(Sense::invalid_field_in_cdb(2));
    }
    let mut v = vec![0u8; 16];
    v[0..4].copy_from_slice(&8u32.to_be_bytes());
    if cdb[2] == 0x01 {
        // Well-known LUNs only: we have none.
        v[0..4].copy_from_slice(&0u32.to_be_bytes());
        v.truncate(8);
    }
    Ok(ScsiResponse::data_alloc(v, alloc))
}

fn timeouts_descriptor() -> [u8; 12] {
    let mut t = [0u8; 12];
    t[1] = 0x0a;
    // Nominal 0 (unknown), recommended 60 s.
    t[8..12].copy_from_slice(&60u32.to_be_bytes());
    t
}

/// REPORT SUPPORTED OPERATION CODES (MAINTENANCE IN 0x0c).
fn report_supported_opcodes(cdb: &[u8]) -> CmdResult {
    let rctd = cdb[2] & 0x80 != 0;
    let options = cdb[2] & 0x07;
    let req_op = cdb[3];
    let req_sa = cdb::be16(&cdb[4..6]);
    let alloc = cdb::be32(&cdb[6..10]) as usize;
    let mut out = Vec::new();
    match options {
        0 => {
            out.extend_from_slice(&[0; 4]);
            for c in opcodes::COMMANDS {
                out.push(c.opcode);
                out.push(0);
                out.extend_from_slice(&u16::from(c.sa.unwrap_or(0)).to_be_bytes());
                out.push(0);
                out.push(u8::from(rctd) << 1 | u8::from(c.sa.is_some()));
                out.extend_from_slice(&(c.usage.len() as u16).to_be_bytes());
                if rctd {
                    out.extend_from_slice(&timeouts_descriptor());
                }
            }
            let len = (out.len() - 4) as u32;
            out[0..4].copy_from_slice(&len.to_be_bytes());
        }
        1..=3 => {
            let has_sa = opcodes::has_service_action(req_op);
            let entry = match options {
                1 if has_sa => return Err(Sense::invalid_field_in_cdb(2)),
                1 => opcodes::lookup(req_op, None),
                2 if !has_sa => return Err(Sense::invalid_field_in_cdb(2)),
                _ => {
                    if has_sa {
                        u8::try_from(req_sa)
                            .ok()
                            .and_then(|sa| opcodes::lookup(req_op, Some(sa)))
                    } else if req_sa == 0 {
                        opcodes::lookup(req_op, None)
                    } else {
                        None
                    }
                }
            };
            match entry {
                Some(c) => {
                    out.push(0);
                    out.push(u8::from(rctd) << 7 | 0x03);
                    out.extend_from_slice(&(c.usage.len() as u16).to_be_bytes());
                    out.extend_from_slice(c.usage);
                    if rctd {
                        out.extend_from_slice(&timeouts_descriptor());
                    }
                }
                None => out.extend_from_slice(&[0, 0x01, 0, 0]),
            }
        }
        _ => return Err(Sense::invalid_field_in_cdb(2)),
    }
    Ok(ScsiResponse::data_alloc(out, alloc))
}
