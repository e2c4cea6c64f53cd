//! INQUIRY: standard data and the VPD pages we support (00 supported pages,
//! 80 unit serial number, 83 device identification, B0 block limits, B1
//! block device characteristics, B2 logical block provisioning).
//!
//! Invariant: the supported-pages list and the pages served are the same
//! constant, in ascending order.

use super::lu::LogicalUnit;
use super::sense::Sense;
use super::{CmdResult, ScsiResponse, cdb};

const VPD_PAGES: [u8; 6] = [0x00, 0x80, 0x83, 0xb0, 0xb1, 0xb2];

/// Most LBAs one UNMAP / WRITE SAME may cover (512 MiB of 512-byte blocks).
pub const MAX_UNMAP_BLOCKS_512: u32 = 1 << 20;
/// Most block descriptors in one UNMAP parameter list.
pub const MAX_UNMAP_DESCRIPTORS: u32 = 256;
/// Most blocks of one COMPARE AND WRITE.
pub const MAX_CAW_BLOCKS: u8 = 128;

fn pad(s: &str, n: usize) -> Vec<u8> {
    let mut v: Vec<u8> = s.bytes().take(n).collect();
    v.resize(n, b' ');
    v
}

pub fn inquiry(lu: &LogicalUnit, c: &[u8]) -> CmdResult {
    let evpd = c[1] & 0x01 != 0;
    let page = c[2];
    let alloc = cdb::be16(&c[3..5]) as usize;
    if c[1] & 0x02 != 0 {
        // CMDDT is obsolete.
        return Err(Sense::invalid_field_in_cdb(1));
    }
    if !evpd {
        if page != 0 {
            return Err(Sense::invalid_field_in_cdb(2));
        }
        return Ok(ScsiResponse::data_alloc(standard(), alloc));
    }
    let body = match page {
        0x00 => VPD_PAGES.to_vec(),
        0x80 => lu.serial().into_bytes(),
        0x83 => device_identification(lu),
        0xb0 => block_limits(lu),
        0xb1 => {
            let mut v = vec![0u8; 0x3c];
            // Non-rotating medium; form factor not reported.
            v[1] = 0x01;
            v
        }
        0xb2 => {
            // LBPU, LBPWS, LBPWS10, LBPRZ (unmapped blocks read zero);
            // provisioning type 2 = thin.
            vec![0, 0x80 | 0x40 | 0x20 | 0x04, 0x02, 0]
        }
        _ => return Err(Sense::invalid_field_in_cdb(2)),
    };
    let mut v = vec![0u8, page, 0, 0];
    v[2..4].copy_from_slice(&(body.len() as u16).to_be_bytes());
    v.extend_from_slice(&body);
    Ok(ScsiResponse::data_alloc(v, alloc))
}

/// Version descriptors: SAM-5, SPC-4, SBC-3, iSCSI.
const VERSION_DESCRIPTORS: [u16; 4] = [0x00a0, 0x0460, 0x04c0, 0x0960];

fn standard() -> Vec<u8> {
    let mut v = vec![0u8; 96];
    v[0] = 0x00; // connected direct-access block device
    v[1] = 0x00; // not removable
    v[2] = 0x06; // SPC-4
    v[3] = 0x12; // HISUP, response data format 2
    v[4] = (96 - 5) as u8;
    v[5] = 0x00;
    v[6] = 0x00;
    v[7] = 0x02; // CMDQUE
    v[8..16].copy_from_slice(&pad("S2D", 8));
    v[16..32].copy_from_slice(&pad("VOLUME", 16));
    v[32..36].copy_from_slice(&pad("0001", 4));
    for (i, d) in VERSION_DESCRIPTORS.iter().enumerate() {
        v[58 + 2 * i..60 + 2 * i].copy_from_slice(&d.to_be_bytes());
    }
    v
}

fn designator(out: &mut Vec<u8>, proto_code_set: u8, piv_assoc_type: u8, value: &[u8]) {
    out.push(proto_code_set);
    out.push(piv_assoc_type);
    out.push(0);
    out.push(value.len() as u8);
    out.extend_from_slice(value);
}

fn device_identification(lu: &LogicalUnit) -> Vec<u8> {
    let mut v = Vec::new();
    // NAA, associated with the logical unit, binary.
    designator(&mut v, 0x01, 0x03, &lu.naa.to_be_bytes());
    // T10 vendor ID based: vendor + serial, ASCII.
    let mut t10 = pad("S2D", 8);
    t10.extend_from_slice(lu.serial().as_bytes());
    designator(&mut v, 0x02, 0x01, &t10);
    // Relative target port 1 (iSCSI protocol, PIV, target port association).
    designator(&mut v, 0x51, 0x94, &[0, 0, 0, 1]);
    // SCSI name string of the target port, UTF-8, null-padded to 4.
    let mut name = format!("{},t,0x0001", lu.iqn()).into_bytes();
    name.push(0);
    while name.len() % 4 != 0 {
        name.push(0);
    }
    name.truncate(252);
    designator(&mut v, 0x53, 0x98, &name);
    v
}

fn block_limits(lu: &LogicalUnit) -> Vec<u8> {
    let bs = lu.block_size();
    let per_phys = 1u16 << lu.block.per_physical_exponent();
    let max_xfer = lu.max_transfer_bytes / bs;
    let max_unmap = MAX_UNMAP_BLOCKS_512 / (bs / 512);
    let mut v = vec![0u8; 0x3c];
    v[0] = 0x01; // WSNZ: WRITE SAME with 0 blocks is refused
    v[1] = MAX_CAW_BLOCKS;
    v[2..4].copy_from_slice(&per_phys.to_be_bytes());
    v[4..8].copy_from_slice(&max_xfer.to_be_bytes());
    v[8..12].copy_from_slice(&(max_xfer.min(256 * 1024 / bs)).to_be_bytes());
    v[12..16].copy_from_slice(&max_xfer.to_be_bytes());
    v[16..20].copy_from_slice(&max_unmap.to_be_bytes());
    v[20..24].copy_from_slice(&MAX_UNMAP_DESCRIPTORS.to_be_bytes());
    v[24..28].copy_from_slice(&u32::from(per_phys).to_be_bytes());
    v[28..32].copy_from_slice(&0x8000_0000u32.to_be_bytes()); // UGAVALID, alignment 0
    v[32..40].copy_from_slice(&u64::from(max_unmap).to_be_bytes());
    v
}
