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

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use block_api::{BlockError, BlockRun, BlockVolume};

    use super::*;
    use crate::config::LogicalBlockSize;
    use crate::reservation::MemoryReservationStore;

    /// A dense volume in a Vec, enough for the device server's rules.
    struct VecVolume(Mutex<Vec<u8>>);

    #[async_trait::async_trait]
    impl BlockVolume for VecVolume {
        fn name(&self) -> &str {
            "unit"
        }
        fn size(&self) -> u64 {
            self.0.lock().expect("lock").len() as u64
        }
        async fn read(&self, offset: u64, len: usize) -> Result<AlignedBuf, BlockError> {
            let v = self.0.lock().expect("lock");
            let end = offset as usize + len;
            if end > v.len() {
                return Err(BlockError::OutOfRange {
                    offset,
                    len: len as u64,
                    size: v.len() as u64,
                });
            }
            Ok(AlignedBuf::from_slice(&v[offset as usize..end]))
        }
        async fn write(&self, offset: u64, data: AlignedBuf, _fua: bool) -> Result<(), BlockError> {
            let mut v = self.0.lock().expect("lock");
            v[offset as usize..offset as usize + data.len()].copy_from_slice(&data);
            Ok(())
        }
        async fn flush(&self) -> Result<(), BlockError> {
            Ok(())
        }
        async fn trim(&self, offset: u64, len: u64) -> Result<(), BlockError> {
            self.write_zeroes(offset, len, true, false).await
        }
        async fn write_zeroes(
            &self,
            offset: u64,
            len: u64,
            _u: bool,
            _f: bool,
        ) -> Result<(), BlockError> {
            let mut v = self.0.lock().expect("lock");
            v[offset as usize..(offset + len) as usize].fill(0);
            Ok(())
        }
        async fn block_status(&self, _offset: u64, len: u64) -> Result<Vec<BlockRun>, BlockError> {
            Ok(vec![BlockRun {
                len,
                hole: false,
                zero: false,
            }])
        }
    }

    fn lu(block: LogicalBlockSize) -> LogicalUnit {
        let vol = Arc::new(VecVolume(Mutex::new(vec![0u8; 1 << 20])));
        LogicalUnit::new(
            vol,
            block,
            1 << 20,
            Arc::new(MemoryReservationStore::new()),
            Default::default(),
        )
    }

    fn nexus(name: &str) -> Nexus {
        Nexus {
            port: InitiatorPort {
                name: name.into(),
                isid: [0; 6],
            },
            target_port: 1,
        }
    }

    fn rw10(op: u8, lba: u32, blocks: u16) -> Vec<u8> {
        let mut c = vec![0u8; 10];
        c[0] = op;
        c[2..6].copy_from_slice(&lba.to_be_bytes());
        c[7..9].copy_from_slice(&blocks.to_be_bytes());
        c
    }

    fn sense_of(r: &ScsiResponse) -> (u8, u8, u8) {
        let s = r.sense.as_ref().expect("sense");
        (s[2] & 0x0f, s[12], s[13])
    }

    fn pr_out(sa: u8, kind: u8, key: u64, sa_key: u64) -> (Vec<u8>, AlignedBuf) {
        let mut c = vec![0x5f, sa, kind, 0, 0, 0, 0, 0, 24, 0];
        c[5..9].copy_from_slice(&24u32.to_be_bytes());
        let mut d = vec![0u8; 24];
        d[0..8].copy_from_slice(&key.to_be_bytes());
        d[8..16].copy_from_slice(&sa_key.to_be_bytes());
        (c, AlignedBuf::from_slice(&d))
    }

    #[tokio::test]
    async fn write_read_round_trip_and_range_checks() {
        let lu = lu(LogicalBlockSize::Emulated512);
        let n = nexus("a");
        let w = execute(
            &lu,
            &n,
            &rw10(0x2a, 3, 2),
            Some(AlignedBuf::from_slice(&[7u8; 1024])),
        )
        .await;
        assert_eq!(w.status, STATUS_GOOD);
        let r = execute(&lu, &n, &rw10(0x28, 3, 2), None).await;
        assert_eq!(r.data_in.expect("data").as_slice(), &[7u8; 1024][..]);
        let blocks = (1u32 << 20) / 512;
        let r = execute(&lu, &n, &rw10(0x28, blocks - 1, 2), None).await;
        assert_eq!(sense_of(&r), (0x05, 0x21, 0x00), "LBA OUT OF RANGE");
        let r = execute(&lu, &n, &[0xc7, 0, 0, 0, 0, 0], None).await;
        assert_eq!(
            sense_of(&r),
            (0x05, 0x20, 0x00),
            "INVALID COMMAND OPERATION CODE"
        );
        let mut inq = vec![0x12, 0x01, 0x42, 0, 0xff, 0];
        let r = execute(&lu, &n, &inq, None).await;
        assert_eq!(sense_of(&r), (0x05, 0x24, 0x00), "INVALID FIELD IN CDB");
        inq[2] = 0x83;
        let r = execute(&lu, &n, &inq, None).await;
        assert_eq!(r.status, STATUS_GOOD);
    }

    #[tokio::test]
    async fn native_4k_reports_4k_blocks() {
        let lu = lu(LogicalBlockSize::Native4096);
        let mut c = vec![0u8; 16];
        c[0] = 0x9e;
        c[1] = 0x10;
        c[13] = 32;
        let r = execute(&lu, &nexus("a"), &c, None).await;
        let d = r.data_in.expect("data");
        assert_eq!(&d.as_slice()[8..12], &4096u32.to_be_bytes());
        assert_eq!(d.as_slice()[13], 0, "one logical block per physical");
    }

    /// Two initiators: registration, reservation, the conflict an
    /// unregistered writer gets, preemption.
    #[tokio::test]
    async fn persistent_reservations_between_two_initiators() {
        let lu = lu(LogicalBlockSize::Emulated512);
        let (a, b) = (nexus("a"), nexus("b"));
        let write = |n: &Nexus| {
            let c = rw10(0x2a, 0, 1);
            let lu = &lu;
            let n = n.clone();
            async move {
                execute(lu, &n, &c, Some(AlignedBuf::from_slice(&[1u8; 512])))
                    .await
                    .status
            }
        };
        let (c, d) = pr_out(0, 0, 0, 0xaa);
        assert_eq!(execute(&lu, &a, &c, Some(d)).await.status, STATUS_GOOD);
        // Write Exclusive - Registrants Only.
        let (c, d) = pr_out(1, 5, 0xaa, 0);
        assert_eq!(execute(&lu, &a, &c, Some(d)).await.status, STATUS_GOOD);
        assert_eq!(write(&a).await, STATUS_GOOD);
        assert_eq!(
            write(&b).await,
            STATUS_RESERVATION_CONFLICT,
            "unregistered writer"
        );
        let r = execute(&lu, &b, &rw10(0x28, 0, 1), None).await;
        assert_eq!(
            r.status, STATUS_GOOD,
            "reads stay allowed under write exclusive"
        );
        let (c, d) = pr_out(0, 0, 0, 0xbb);
        assert_eq!(execute(&lu, &b, &c, Some(d)).await.status, STATUS_GOOD);
        assert_eq!(write(&b).await, STATUS_GOOD, "registrants may write");
        // b preempts a with Exclusive Access: a loses its registration.
        let (c, d) = pr_out(4, 3, 0xbb, 0xaa);
        assert_eq!(execute(&lu, &b, &c, Some(d)).await.status, STATUS_GOOD);
        assert_eq!(write(&a).await, STATUS_RESERVATION_CONFLICT);
        let r = execute(&lu, &a, &rw10(0x28, 0, 1), None).await;
        assert_eq!(
            r.status, STATUS_RESERVATION_CONFLICT,
            "exclusive access blocks reads"
        );
        // READ KEYS shows only b's key; the store has the state.
        let r = execute(&lu, &a, &[0x5e, 0, 0, 0, 0, 0, 0, 0, 64, 0], None).await;
        let d = r.data_in.expect("data");
        assert_eq!(&d.as_slice()[4..8], &8u32.to_be_bytes());
        assert_eq!(&d.as_slice()[8..16], &0xbbu64.to_be_bytes());
        let saved = lu.store.load("unit").await.expect("load");
        assert_eq!(saved, lu.pr());
    }

    #[tokio::test]
    async fn mode_select_changes_only_changeable_bits() {
        let lu = lu(LogicalBlockSize::Emulated512);
        let n = nexus("a");
        let sense6 = [0x1a, 0x08, 0x0a, 0, 0xff, 0];
        let r = execute(&lu, &n, &sense6, None).await;
        let mut page = r.data_in.expect("data").as_slice().to_vec();
        page[0] = 0;
        // Set D_SENSE: allowed.
        page[4 + 2] |= 0x04;
        let sel = [0x15, 0x10, 0, 0, page.len() as u8, 0];
        let r = execute(&lu, &n, &sel, Some(AlignedBuf::from_slice(&page))).await;
        assert_eq!(r.status, STATUS_GOOD);
        assert!(lu.mode().d_sense);
        // Descriptor-format sense from now on.
        let r = execute(&lu, &n, &[0xc7, 0, 0, 0, 0, 0], None).await;
        assert_eq!(r.sense.expect("sense")[0], 0x72);
        // Changing the queue algorithm modifier is refused.
        page[4 + 3] ^= 0xf0;
        let r = execute(&lu, &n, &sel, Some(AlignedBuf::from_slice(&page))).await;
        assert_eq!(r.status, STATUS_CHECK_CONDITION);
    }
}
