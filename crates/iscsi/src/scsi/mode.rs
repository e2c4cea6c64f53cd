//! MODE SENSE and MODE SELECT (6 and 10) with the caching (08), control
//! (0A) and informational exceptions control (1C) pages.
//!
//! Invariants: MODE SELECT changes only the bits the changeable-values mask
//! allows (WCE, D_SENSE, SWP) and applies nothing unless the whole
//! parameter list is valid; saved pages are not supported.

use super::lu::{LogicalUnit, ModeState};
use super::sense::Sense;
use super::{CmdResult, ScsiResponse, cdb};

const PAGE_CACHING: u8 = 0x08;
const PAGE_CONTROL: u8 = 0x0a;
const PAGE_IEC: u8 = 0x1c;
const PAGES: [u8; 3] = [PAGE_CACHING, PAGE_CONTROL, PAGE_IEC];

#[derive(Clone, Copy, PartialEq, Eq)]
enum Pc {
    Current,
    Changeable,
    Default,
}

fn page(code: u8, pc: Pc, m: &ModeState) -> Vec<u8> {
    let m = match pc {
        Pc::Current => *m,
        _ => ModeState::default(),
    };
    match code {
        PAGE_CACHING => {
            let mut p = vec![0u8; 20];
            p[0] = PAGE_CACHING;
            p[1] = 0x12;
            match pc {
                Pc::Changeable => p[2] = 0x04,
                _ => p[2] = if m.wce { 0x04 } else { 0 },
            }
            p
        }
        PAGE_CONTROL => {
            let mut p = vec![0u8; 12];
            p[0] = PAGE_CONTROL;
            p[1] = 0x0a;
            match pc {
                Pc::Changeable => {
                    p[2] = 0x04;
                    p[4] = 0x08;
                }
                _ => {
                    p[2] = if m.d_sense { 0x04 } else { 0 };
                    // Queue algorithm modifier 1: unrestricted reordering.
                    p[3] = 0x10;
                    p[4] = if m.swp { 0x08 } else { 0 };
                    // Busy timeout period: unlimited.
                    p[8] = 0xff;
                    p[9] = 0xff;
                }
            }
            p
        }
        _ => {
            let mut p = vec![0u8; 12];
            p[0] = PAGE_IEC;
            p[1] = 0x0a;
            if pc != Pc::Changeable {
                p[2] = 0x08; // DEXCPT: no informational exceptions reported
            }
            p
        }
    }
}

pub fn mode_sense(lu: &LogicalUnit, c: &[u8]) -> CmdResult {
    let ten = c[0] == 0x5a;
    let dbd = c[1] & 0x08 != 0;
    let llbaa = ten && c[1] & 0x10 != 0;
    let pc = match c[2] >> 6 {
        0 => Pc::Current,
        1 => Pc::Changeable,
        2 => Pc::Default,
        _ => return Err(Sense::saving_parameters_not_supported()),
    };
    let code = c[2] & 0x3f;
    let sub = c[3];
    let alloc = if ten {
        cdb::be16(&c[7..9]) as usize
    } else {
        c[4] as usize
    };
    let mode = lu.mode();
    let mut pages = Vec::new();
    match (code, sub) {
        (0x3f, 0x00 | 0xff) => {
            for p in PAGES {
                pages.extend(page(p, pc, &mode));
            }
        }
        (p, 0) if PAGES.contains(&p) => pages.extend(page(p, pc, &mode)),
        (p, _) if PAGES.contains(&p) || p == 0x3f => return Err(Sense::invalid_field_in_cdb(3)),
        _ => return Err(Sense::invalid_field_in_cdb(2)),
    }
    let blocks = lu.blocks();
    let bs = lu.block_size();
    let mut desc = Vec::new();
    if !dbd {
        if llbaa {
            desc.extend_from_slice(&blocks.to_be_bytes());
            desc.extend_from_slice(&[0; 4]);
            desc.extend_from_slice(&bs.to_be_bytes());
        } else {
            let n = u32::try_from(blocks).unwrap_or(u32::MAX);
            desc.extend_from_slice(&n.to_be_bytes());
            desc.push(0);
            desc.extend_from_slice(&bs.to_be_bytes()[1..]);
        }
    }
    let dev_specific = 0x10 | if mode.swp { 0x80 } else { 0 }; // DPOFUA, WP
    let mut out = Vec::new();
    if ten {
        let total = 8 + desc.len() + pages.len();
        out.extend_from_slice(&((total - 2) as u16).to_be_bytes());
        out.push(0);
        out.push(dev_specific);
        out.push(u8::from(llbaa && !dbd));
        out.push(0);
        out.extend_from_slice(&(desc.len() as u16).to_be_bytes());
    } else {
        let total = 4 + desc.len() + pages.len();
        out.push(u8::try_from(total - 1).unwrap_or(u8::MAX));
        out.push(0);
        out.push(dev_specific);
        out.push(desc.len() as u8);
    }
    out.extend(desc);
    out.extend(pages);
    Ok(ScsiResponse::data_alloc(out, alloc))
}

pub fn mode_select(lu: &LogicalUnit, c: &[u8], data: &[u8]) -> CmdResult {
    let ten = c[0] == 0x55;
    if c[1] & 0x01 != 0 {
        return Err(Sense::invalid_field_in_cdb(1)); // SP: no saved pages
    }
    let list_len = if ten {
        cdb::be16(&c[7..9]) as usize
    } else {
        c[4] as usize
    };
    if list_len == 0 {
        return Ok(ScsiResponse::good());
    }
    if data.len() < list_len {
        return Err(Sense::parameter_list_length_error());
    }
    let data = &data[..list_len];
    let (hdr, bd_len) = if ten {
        if data.len() < 8 {
            return Err(Sense::parameter_list_length_error());
        }
        (8, cdb::be16(&data[6..8]) as usize)
    } else {
        if data.len() < 4 {
            return Err(Sense::parameter_list_length_error());
        }
        (4, data[3] as usize)
    };
    let mut pos = hdr + bd_len;
    if pos > data.len() {
        return Err(Sense::parameter_list_length_error());
    }
    let mut m = lu.mode();
    while pos < data.len() {
        if pos + 2 > data.len() {
            return Err(Sense::parameter_list_length_error());
        }
        let code = data[pos] & 0x3f;
        if data[pos] & 0x40 != 0 {
            return Err(Sense::invalid_field_in_parameter_list(pos as u16)); // subpage format
        }
        let plen = data[pos + 1] as usize + 2;
        if pos + plen > data.len() {
            return Err(Sense::parameter_list_length_error());
        }
        let p = &data[pos..pos + plen];
        if !PAGES.contains(&code) {
            return Err(Sense::invalid_field_in_parameter_list(pos as u16));
        }
        let current = page(code, Pc::Current, &m);
        let mask = page(code, Pc::Changeable, &m);
        if p.len() != current.len() {
            return Err(Sense::invalid_field_in_parameter_list(pos as u16 + 1));
        }
        for i in 2..p.len() {
            if (p[i] ^ current[i]) & !mask[i] != 0 {
                return Err(Sense::invalid_field_in_parameter_list((pos + i) as u16));
            }
        }
        match code {
            PAGE_CACHING => m.wce = p[2] & 0x04 != 0,
            PAGE_CONTROL => {
                m.d_sense = p[2] & 0x04 != 0;
                m.swp = p[4] & 0x08 != 0;
            }
            _ => {}
        }
        pos += plen;
    }
    lu.set_mode(m);
    Ok(ScsiResponse::good())
}
