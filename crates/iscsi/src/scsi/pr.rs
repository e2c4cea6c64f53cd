//! PERSISTENT RESERVE IN and OUT (SPC-4 6.15, 6.16): registrations,
//! reservations, preemption, as pure functions over [`PrState`] plus the
//! load-modify-save through the [`ReservationStore`](crate::reservation::ReservationStore).
//!
//! Invariants: `apply_out` is pure (state in, state out), so every rule is
//! unit-testable; the new state takes effect only after the store saved it;
//! a refused command leaves the state untouched.

use super::lu::LogicalUnit;
use super::sense::Sense;
use super::{CmdResult, Nexus, ScsiResponse, cdb};
use crate::reservation::{PrState, Registration, Reservation, ReservationType};

pub fn pr_in(lu: &LogicalUnit, c: &[u8]) -> CmdResult {
    let sa = c[1] & 0x1f;
    let alloc = cdb::be16(&c[7..9]) as usize;
    let st = lu.pr();
    let mut v = Vec::new();
    match sa {
        0x00 => {
            v.extend_from_slice(&st.generation.to_be_bytes());
            v.extend_from_slice(&((st.registrations.len() * 8) as u32).to_be_bytes());
            for r in &st.registrations {
                v.extend_from_slice(&r.key.to_be_bytes());
            }
        }
        0x01 => {
            v.extend_from_slice(&st.generation.to_be_bytes());
            match &st.reservation {
                None => v.extend_from_slice(&0u32.to_be_bytes()),
                Some(r) => {
                    v.extend_from_slice(&16u32.to_be_bytes());
                    let key = if r.kind.all_registrants() { 0 } else { r.key };
                    v.extend_from_slice(&key.to_be_bytes());
                    v.extend_from_slice(&[0; 4]);
                    v.push(0);
                    v.push(r.kind.code());
                    v.extend_from_slice(&[0; 2]);
                }
            }
        }
        0x02 => {
            v.extend_from_slice(&8u16.to_be_bytes());
            // CRH 0, SIP_C 0, ATP_C 0, PTPL_C 1.
            v.push(0x01);
            // TMV: the type mask is valid; PTPL_A: we persist.
            v.push(0x80 | 0x01);
            // WR_EX_AR, EX_AC_RO, WR_EX_RO, EX_AC, WR_EX; EX_AC_AR.
            v.push(0x80 | 0x40 | 0x20 | 0x08 | 0x02);
            v.push(0x01);
            v.extend_from_slice(&[0; 2]);
        }
        0x03 => {
            v.extend_from_slice(&st.generation.to_be_bytes());
            v.extend_from_slice(&[0; 4]);
            for r in &st.registrations {
                let holder = st.is_holder(&r.port);
                v.extend_from_slice(&r.key.to_be_bytes());
                v.extend_from_slice(&[0; 4]);
                v.push(u8::from(holder));
                v.push(if holder {
                    st.reservation.as_ref().map_or(0, |x| x.kind.code())
                } else {
                    0
                });
                v.extend_from_slice(&[0; 4]);
                v.extend_from_slice(&r.target_port.to_be_bytes());
                let tid = transport_id(&r.port.port_name());
                v.extend_from_slice(&(tid.len() as u32).to_be_bytes());
                v.extend_from_slice(&tid);
            }
            let len = (v.len() - 8) as u32;
            v[4..8].copy_from_slice(&len.to_be_bytes());
        }
        _ => return Err(Sense::invalid_field_in_cdb(1)),
    }
    Ok(ScsiResponse::data_alloc(v, alloc))
}

/// An iSCSI TransportID with the ISID (format 01b, protocol 5).
fn transport_id(port_name: &str) -> Vec<u8> {
    let mut name = port_name.as_bytes().to_vec();
    name.push(0);
    while !name.len().is_multiple_of(4) || name.len() < 20 {
        name.push(0);
    }
    let mut v = vec![0x45, 0];
    v.extend_from_slice(&(name.len() as u16).to_be_bytes());
    v.extend_from_slice(&name);
    v
}

/// What a PR OUT decided.
#[derive(Debug, PartialEq, Eq)]
pub enum OutResult {
    /// Save this state (it changed).
    Changed(PrState),
    /// Nothing to save.
    Unchanged,
    Conflict,
}

/// The PR OUT rules, pure. `sa` is the service action, `kind_code` the
/// TYPE field, `key`/`sa_key` the parameter list keys.
pub fn apply_out(
    st: &PrState,
    nexus: &Nexus,
    sa: u8,
    kind_code: u8,
    key: u64,
    sa_key: u64,
    aptpl: bool,
) -> Result<OutResult, Sense> {
    let port = &nexus.port;
    let mine = st.registration(port).map(|r| r.key);
    let mut new = st.clone();
    match sa {
        // REGISTER, REGISTER AND IGNORE EXISTING KEY
        0x00 | 0x06 => {
            let ignore = sa == 0x06;
            match mine {
                None => {
                    if !ignore && key != 0 {
                        return Ok(OutResult::Conflict);
                    }
                    if sa_key == 0 {
                        return Ok(OutResult::Unchanged);
                    }
                    new.registrations.push(Registration {
                        port: port.clone(),
                        key: sa_key,
                        target_port: nexus.target_port,
                        aptpl,
                    });
                }
                Some(k) => {
                    if !ignore && key != k {
                        return Ok(OutResult::Conflict);
                    }
                    if sa_key == 0 {
                        unregister(&mut new, port);
                    } else if let Some(r) = new.registrations.iter_mut().find(|r| &r.port == port) {
                        r.key = sa_key;
                        r.aptpl = aptpl;
                        if let Some(res) = &mut new.reservation
                            && &res.holder == port
                        {
                            res.key = sa_key;
                        }
                    }
                }
            }
            new.generation = new.generation.wrapping_add(1);
            Ok(OutResult::Changed(new))
        }
        // RESERVE
        0x01 => {
            let kind = ReservationType::from_code(kind_code)
                .ok_or_else(|| Sense::invalid_field_in_cdb(2))?;
            if mine != Some(key) {
                return Ok(OutResult::Conflict);
            }
            match &st.reservation {
                None => {
                    new.reservation = Some(Reservation {
                        holder: port.clone(),
                        kind,
                        key,
                    });
                    Ok(OutResult::Changed(new))
                }
                Some(r) if st.is_holder(port) && r.kind == kind => Ok(OutResult::Unchanged),
                Some(_) => Ok(OutResult::Conflict),
            }
        }
        // RELEASE
        0x02 => {
            if mine != Some(key) {
                return Ok(OutResult::Conflict);
            }
            match &st.reservation {
                None => Ok(OutResult::Unchanged),
                Some(_) if !st.is_holder(port) => Ok(OutResult::Unchanged),
                Some(r) if r.kind.code() != kind_code => {
                    Err(Sense::invalid_release_of_persistent_reservation())
                }
                Some(_) => {
                    new.reservation = None;
                    Ok(OutResult::Changed(new))
                }
            }
        }
        // CLEAR
        0x03 => {
            if mine != Some(key) {
                return Ok(OutResult::Conflict);
            }
            new.registrations.clear();
            new.reservation = None;
            new.generation = new.generation.wrapping_add(1);
            Ok(OutResult::Changed(new))
        }
        // PREEMPT, PREEMPT AND ABORT
        0x04 | 0x05 => {
            if mine != Some(key) {
                return Ok(OutResult::Conflict);
            }
            let kind = ReservationType::from_code(kind_code);
            match st.reservation.clone() {
                Some(r) if r.kind.all_registrants() && sa_key == 0 => {
                    let kind = kind.ok_or_else(|| Sense::invalid_field_in_cdb(2))?;
                    new.registrations.retain(|x| &x.port == port);
                    new.reservation = Some(Reservation {
                        holder: port.clone(),
                        kind,
                        key,
                    });
                }
                Some(r) if !r.kind.all_registrants() && r.key == sa_key => {
                    let kind = kind.ok_or_else(|| Sense::invalid_field_in_cdb(2))?;
                    new.registrations
                        .retain(|x| x.key != sa_key || &x.port == port);
                    new.reservation = Some(Reservation {
                        holder: port.clone(),
                        kind,
                        key,
                    });
                }
                _ => {
                    if sa_key == 0 {
                        return Err(Sense::invalid_field_in_parameter_list(8));
                    }
                    if !st.registrations.iter().any(|x| x.key == sa_key) {
                        return Ok(OutResult::Conflict);
                    }
                    new.registrations
                        .retain(|x| x.key != sa_key || &x.port == port);
                    if let Some(r) = &new.reservation
                        && !new.registrations.iter().any(|x| x.port == r.holder)
                    {
                        new.reservation = None;
                    }
                }
            }
            new.generation = new.generation.wrapping_add(1);
            Ok(OutResult::Changed(new))
        }
        _ => Err(Sense::invalid_field_in_cdb(1)),
    }
}

/// Remove `port`'s registration, and the reservation with it when it was
/// the (last) holder.
fn unregister(st: &mut PrState, port: &crate::reservation::InitiatorPort) {
    st.registrations.retain(|r| &r.port != port);
    if let Some(r) = &st.reservation {
        let release = if r.kind.all_registrants() {
            st.registrations.is_empty()
        } else {
            &r.holder == port
        };
        if release {
            st.reservation = None;
        } else if r.kind.all_registrants() && &r.holder == port {
            // Hand the nominal holder role to a remaining registrant.
            let next = st.registrations[0].port.clone();
            if let Some(res) = &mut st.reservation {
                res.holder = next;
            }
        }
    }
}

pub async fn pr_out(lu: &LogicalUnit, nexus: &Nexus, c: &[u8], data: &[u8]) -> CmdResult {
    let sa = c[1] & 0x1f;
    let scope = c[2] >> 4;
    let kind_code = c[2] & 0x0f;
    let list_len = cdb::be32(&c[5..9]) as usize;
    if sa > 0x06 {
        return Err(Sense::invalid_field_in_cdb(1));
    }
    if matches!(sa, 0x01 | 0x02 | 0x04 | 0x05) && scope != 0 {
        return Err(Sense::invalid_field_in_cdb(2));
    }
    if list_len != 24 {
        return Err(Sense::parameter_list_length_error());
    }
    if data.len() < 24 {
        return Err(Sense::parameter_list_length_error());
    }
    let key = cdb::be64(&data[0..8]);
    let sa_key = cdb::be64(&data[8..16]);
    let flags = data[20];
    if flags & 0x08 != 0 {
        // SPEC_I_PT is not supported.
        return Err(Sense::invalid_field_in_parameter_list(20));
    }
    if flags & 0x04 != 0 {
        // ALL_TG_PT is not supported (ATP_C is clear).
        return Err(Sense::invalid_field_in_parameter_list(20));
    }
    let aptpl = flags & 0x01 != 0;
    let _w = lu.pr_write.lock().await;
    let st = lu.pr();
    match apply_out(&st, nexus, sa, kind_code, key, sa_key, aptpl)? {
        OutResult::Conflict => Ok(ScsiResponse::conflict()),
        OutResult::Unchanged => Ok(ScsiResponse::good()),
        OutResult::Changed(new) => {
            if let Err(e) = lu.store.save(&lu.name, &new).await {
                tracing::warn!(volume = %lu.name, error = %e, "saving reservations failed");
                return Err(Sense::internal_target_failure());
            }
            lu.set_pr(new);
            Ok(ScsiResponse::good())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reservation::InitiatorPort;

    fn nexus(n: &str) -> Nexus {
        Nexus {
            port: InitiatorPort {
                name: n.into(),
                isid: [0; 6],
            },
            target_port: 1,
        }
    }

    fn changed(r: Result<OutResult, Sense>) -> PrState {
        match r {
            Ok(OutResult::Changed(s)) => s,
            other => panic!("expected a change, got {other:?}"),
        }
    }

    #[test]
    fn register_reserve_preempt() {
        let (a, b) = (nexus("a"), nexus("b"));
        let st = PrState::default();
        let st = changed(apply_out(&st, &a, 0, 0, 0, 0xa, false));
        let st = changed(apply_out(&st, &b, 0, 0, 0, 0xb, false));
        assert_eq!(st.generation, 2);
        // Wrong key: conflict.
        assert_eq!(
            apply_out(&st, &a, 1, 1, 0xb, 0, false),
            Ok(OutResult::Conflict)
        );
        let st = changed(apply_out(&st, &a, 1, 1, 0xa, 0, false));
        assert!(st.is_holder(&a.port));
        // b cannot reserve while a holds it.
        assert_eq!(
            apply_out(&st, &b, 1, 1, 0xb, 0, false),
            Ok(OutResult::Conflict)
        );
        // b preempts a.
        let st = changed(apply_out(&st, &b, 4, 3, 0xb, 0xa, false));
        assert!(st.is_holder(&b.port));
        assert!(st.registration(&a.port).is_none());
        // Unregistering the holder releases.
        let st = changed(apply_out(&st, &b, 0, 0, 0xb, 0, false));
        assert!(st.reservation.is_none() && st.registrations.is_empty());
    }

    #[test]
    fn release_with_wrong_type_is_refused() {
        let a = nexus("a");
        let st = changed(apply_out(&PrState::default(), &a, 0, 0, 0, 1, false));
        let st = changed(apply_out(&st, &a, 1, 1, 1, 0, false));
        assert_eq!(
            apply_out(&st, &a, 2, 3, 1, 0, false),
            Err(Sense::invalid_release_of_persistent_reservation())
        );
        let st = changed(apply_out(&st, &a, 2, 1, 1, 0, false));
        assert!(st.reservation.is_none());
    }
}
