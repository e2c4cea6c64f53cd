//! Operational parameter negotiation (RFC 7143 13): the session and
//! connection parameters, our offers, and the answer to each key an
//! initiator proposes.
//!
//! Invariants: a negotiated value is always inside the range RFC 7143
//! allows and inside our own limits (`FirstBurstLength <= MaxBurstLength`,
//! `ErrorRecoveryLevel == 0`, `MaxConnections == 1`); an unknown key is
//! answered `NotUnderstood`, a malformed value `Reject`, and neither changes
//! the parameters.

/// Our own limits, offered during negotiation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParamLimits {
    /// The MaxRecvDataSegmentLength we declare (what we accept per PDU).
    pub max_recv_data_segment_len: u32,
    pub max_burst_len: u32,
    pub first_burst_len: u32,
    pub max_outstanding_r2t: u32,
    /// Whether we offer CRC32C digests at all.
    pub allow_digests: bool,
}

impl Default for ParamLimits {
    fn default() -> Self {
        ParamLimits {
            max_recv_data_segment_len: 256 * 1024,
            max_burst_len: 1024 * 1024,
            first_burst_len: 256 * 1024,
            max_outstanding_r2t: 1,
            allow_digests: true,
        }
    }
}

/// The negotiated parameters of one session (with its single connection).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionParams {
    pub header_digest: bool,
    pub data_digest: bool,
    /// Largest data segment we accept from the initiator (our declaration).
    pub target_max_recv_data_segment_len: u32,
    /// Largest data segment we may send (the initiator's declaration).
    pub initiator_max_recv_data_segment_len: u32,
    pub max_burst_len: u32,
    pub first_burst_len: u32,
    pub initial_r2t: bool,
    pub immediate_data: bool,
    pub max_outstanding_r2t: u32,
    pub default_time2wait: u32,
    pub default_time2retain: u32,
    pub data_pdu_in_order: bool,
    pub data_sequence_in_order: bool,
}

impl SessionParams {
    /// RFC 7143 defaults, before any key is negotiated.
    pub fn defaults(limits: &ParamLimits) -> Self {
        SessionParams {
            header_digest: false,
            data_digest: false,
            target_max_recv_data_segment_len: limits.max_recv_data_segment_len,
            initiator_max_recv_data_segment_len: 8192,
            max_burst_len: 262_144.min(limits.max_burst_len),
            first_burst_len: 65_536.min(limits.first_burst_len),
            initial_r2t: true,
            immediate_data: true,
            max_outstanding_r2t: 1,
            default_time2wait: 2,
            default_time2retain: 20,
            data_pdu_in_order: true,
            data_sequence_in_order: true,
        }
    }
}

/// What to do with a key that is not an operational parameter.
pub enum KeyClass {
    /// Answered by this module.
    Operational,
    /// Handled by the login state machine (names, session type, auth).
    Login,
    Unknown,
}

pub fn classify(key: &str) -> KeyClass {
    match key {
        "HeaderDigest"
        | "DataDigest"
        | "MaxConnections"
        | "InitialR2T"
        | "ImmediateData"
        | "MaxRecvDataSegmentLength"
        | "MaxBurstLength"
        | "FirstBurstLength"
        | "DefaultTime2Wait"
        | "DefaultTime2Retain"
        | "MaxOutstandingR2T"
        | "DataPDUInOrder"
        | "DataSequenceInOrder"
        | "ErrorRecoveryLevel"
        | "IFMarker"
        | "OFMarker"
        | "OFMarkInt"
        | "IFMarkInt"
        | "TaskReporting"
        | "iSCSIProtocolLevel" => KeyClass::Operational,
        "InitiatorName"
        | "InitiatorAlias"
        | "TargetName"
        | "TargetAlias"
        | "SessionType"
        | "AuthMethod"
        | "TargetAddress"
        | "TargetPortalGroupTag"
        | "SendTargets" => KeyClass::Login,
        k if k.starts_with("CHAP_") => KeyClass::Login,
        _ => KeyClass::Unknown,
    }
}

fn parse_num(v: &str) -> Option<u64> {
    if let Some(h) = v.strip_prefix("0x").or_else(|| v.strip_prefix("0X")) {
        u64::from_str_radix(h, 16).ok()
    } else {
        v.parse().ok()
    }
}

fn parse_bool(v: &str) -> Option<bool> {
    match v {
        "Yes" => Some(true),
        "No" => Some(false),
        _ => None,
    }
}

fn yes_no(b: bool) -> String {
    if b { "Yes" } else { "No" }.to_string()
}

/// Answer one operational key proposed by the initiator, updating `p`.
/// Returns the value to send back, or `None` for a declarative key that
/// needs no answer.
pub fn negotiate_key(
    p: &mut SessionParams,
    limits: &ParamLimits,
    key: &str,
    value: &str,
) -> Option<String> {
    let reject = || Some("Reject".to_string());
    match key {
        "HeaderDigest" | "DataDigest" => {
            let mut chosen = None;
            for opt in value.split(',') {
                match opt {
                    "CRC32C" if limits.allow_digests => {
                        chosen = Some(true);
                        break;
                    }
                    "None" => {
                        chosen = Some(false);
                        break;
                    }
                    _ => {}
                }
            }
            let Some(c) = chosen else { return reject() };
            if key == "HeaderDigest" {
                p.header_digest = c;
            } else {
                p.data_digest = c;
            }
            Some(if c { "CRC32C" } else { "None" }.to_string())
        }
        "MaxConnections" => match parse_num(value) {
            Some(n) if (1..=65535).contains(&n) => Some("1".into()),
            _ => reject(),
        },
        "InitialR2T" => match parse_bool(value) {
            // OR function: our own preference is No.
            Some(b) => {
                p.initial_r2t = b;
                Some(yes_no(b))
            }
            None => reject(),
        },
        "ImmediateData" => match parse_bool(value) {
            // AND function: our own preference is Yes.
            Some(b) => {
                p.immediate_data = b;
                Some(yes_no(b))
            }
            None => reject(),
        },
        "DataPDUInOrder" | "DataSequenceInOrder" => match parse_bool(value) {
            // OR with our Yes: always Yes.
            Some(_) => Some("Yes".into()),
            None => reject(),
        },
        "MaxRecvDataSegmentLength" => match parse_num(value) {
            Some(n) if (512..(1 << 24)).contains(&n) => {
                p.initiator_max_recv_data_segment_len = n as u32;
                None
            }
            _ => reject(),
        },
        "MaxBurstLength" => match parse_num(value) {
            Some(n) if (512..(1 << 24)).contains(&n) => {
                p.max_burst_len = (n as u32).min(limits.max_burst_len);
                p.first_burst_len = p.first_burst_len.min(p.max_burst_len);
                Some(p.max_burst_len.to_string())
            }
            _ => reject(),
        },
        "FirstBurstLength" => match parse_num(value) {
            Some(n) if (512..(1 << 24)).contains(&n) => {
                p.first_burst_len = (n as u32).min(limits.first_burst_len).min(p.max_burst_len);
                Some(p.first_burst_len.to_string())
            }
            _ => reject(),
        },
        "DefaultTime2Wait" => match parse_num(value) {
            Some(n) if n <= 3600 => {
                p.default_time2wait = (n as u32).max(2);
                Some(p.default_time2wait.to_string())
            }
            _ => reject(),
        },
        "DefaultTime2Retain" => match parse_num(value) {
            Some(n) if n <= 3600 => {
                p.default_time2retain = (n as u32).min(20);
                Some(p.default_time2retain.to_string())
            }
            _ => reject(),
        },
        "MaxOutstandingR2T" => match parse_num(value) {
            Some(n) if (1..=65535).contains(&n) => {
                p.max_outstanding_r2t = (n as u32).min(limits.max_outstanding_r2t);
                Some(p.max_outstanding_r2t.to_string())
            }
            _ => reject(),
        },
        "ErrorRecoveryLevel" => match parse_num(value) {
            Some(n) if n <= 2 => Some("0".into()),
            _ => reject(),
        },
        "IFMarker" | "OFMarker" => Some("No".into()),
        "OFMarkInt" | "IFMarkInt" => Some("Irrelevant".into()),
        "TaskReporting" => Some("RFC3720".into()),
        "iSCSIProtocolLevel" => Some("1".into()),
        _ => Some("NotUnderstood".into()),
    }
}

/// After the FirstBurstLength/MaxBurstLength pair is settled, keep the
/// invariant between them whatever order the keys came in.
pub fn finish(p: &mut SessionParams) {
    p.first_burst_len = p.first_burst_len.min(p.max_burst_len);
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn typical_libiscsi_offer() {
        let l = ParamLimits::default();
        let mut p = SessionParams::defaults(&l);
        assert_eq!(
            negotiate_key(&mut p, &l, "HeaderDigest", "None,CRC32C").as_deref(),
            Some("None")
        );
        assert_eq!(
            negotiate_key(&mut p, &l, "DataDigest", "CRC32C,None").as_deref(),
            Some("CRC32C")
        );
        assert!(p.data_digest && !p.header_digest);
        assert_eq!(
            negotiate_key(&mut p, &l, "MaxBurstLength", "16776192").as_deref(),
            Some("1048576")
        );
        assert_eq!(
            negotiate_key(&mut p, &l, "FirstBurstLength", "262144").as_deref(),
            Some("262144")
        );
        assert_eq!(
            negotiate_key(&mut p, &l, "InitialR2T", "No").as_deref(),
            Some("No")
        );
        assert_eq!(
            negotiate_key(&mut p, &l, "MaxRecvDataSegmentLength", "262144"),
            None
        );
        assert_eq!(p.initiator_max_recv_data_segment_len, 262144);
        assert_eq!(
            negotiate_key(&mut p, &l, "ErrorRecoveryLevel", "2").as_deref(),
            Some("0")
        );
        assert_eq!(
            negotiate_key(&mut p, &l, "X-foo", "1").as_deref(),
            Some("NotUnderstood")
        );
        assert_eq!(
            negotiate_key(&mut p, &l, "MaxBurstLength", "-1").as_deref(),
            Some("Reject")
        );
    }

    proptest! {
        #[test]
        fn invariants_hold(keys in proptest::collection::vec((0usize..12, "[0-9a-zA-Z,x]{0,12}"), 0..30)) {
            const K: [&str; 12] = ["HeaderDigest", "DataDigest", "MaxBurstLength", "FirstBurstLength",
                "MaxRecvDataSegmentLength", "MaxOutstandingR2T", "InitialR2T", "ImmediateData",
                "DefaultTime2Wait", "DefaultTime2Retain", "ErrorRecoveryLevel", "MaxConnections"];
            let l = ParamLimits::default();
            let mut p = SessionParams::defaults(&l);
            for (k, v) in keys {
                negotiate_key(&mut p, &l, K[k], &v);
            }
            finish(&mut p);
            prop_assert!(p.first_burst_len <= p.max_burst_len);
            prop_assert!(p.max_burst_len <= l.max_burst_len && p.max_burst_len >= 512);
            prop_assert!(p.initiator_max_recv_data_segment_len >= 512);
            prop_assert!(p.max_outstanding_r2t >= 1 && p.max_outstanding_r2t <= l.max_outstanding_r2t);
        }
    }
}
