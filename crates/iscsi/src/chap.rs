//! CHAP authentication (RFC 1994 with MD5, as RFC 7143 12.1.3 uses it), one
//! way and mutual, as a small state machine the login driver feeds with the
//! keys of each security-stage PDU.
//!
//! Invariants: the exchange succeeds only after the initiator proved the
//! configured secret for the configured name; a mutual challenge equal to
//! our own is refused (reflection attack); secrets never appear in `Debug`
//! output or logs; malformed values fail the exchange, never panic.

use md5::{Digest, Md5};

use crate::text::find;

/// A CHAP name and secret.
#[derive(Clone, PartialEq, Eq)]
pub struct ChapCredential {
    pub user: String,
    pub secret: Vec<u8>,
}

impl ChapCredential {
    pub fn new(user: impl Into<String>, secret: impl AsRef<[u8]>) -> Self {
        ChapCredential {
            user: user.into(),
            secret: secret.as_ref().to_vec(),
        }
    }
}

impl std::fmt::Debug for ChapCredential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "ChapCredential {{ user: {:?}, secret: <{} bytes> }}",
            self.user,
            self.secret.len()
        )
    }
}

/// The CHAP settings of one target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChapSecrets {
    /// What the initiator must present (CHAP_N and the secret behind CHAP_R).
    pub initiator: ChapCredential,
    /// For mutual CHAP: how the target answers the initiator's challenge.
    /// When set, an initiator that does not challenge the target is still
    /// admitted (mutual is the initiator's choice).
    pub target: Option<ChapCredential>,
}

/// Why a CHAP exchange failed; each ends the login with an authentication
/// failure status.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChapError {
    #[error("initiator offered no CHAP algorithm we support (MD5)")]
    NoAlgorithm,
    #[error("missing CHAP key {0}")]
    Missing(&'static str),
    #[error("malformed CHAP value for {0}")]
    Malformed(&'static str),
    #[error("unknown CHAP user")]
    UnknownUser,
    #[error("CHAP response does not match")]
    BadResponse,
    #[error("mutual CHAP requested but no target secret is configured")]
    NoTargetSecret,
    #[error("initiator reflected the target's challenge")]
    Reflection,
    #[error("CHAP key out of sequence")]
    OutOfSequence,
}

/// The MD5 CHAP response: MD5(id || secret || challenge).
pub fn response(id: u8, secret: &[u8], challenge: &[u8]) -> [u8; 16] {
    let mut h = Md5::new();
    h.update([id]);
    h.update(secret);
    h.update(challenge);
    h.finalize().into()
}

/// Decode a CHAP binary value: `0x` hex or `0b` base64.
pub fn decode_binary(v: &str) -> Option<Vec<u8>> {
    if let Some(h) = v.strip_prefix("0x").or_else(|| v.strip_prefix("0X")) {
        if h.is_empty() || h.len() > 2048 {
            return None;
        }
        let h = if h.len() % 2 == 1 {
            format!("0{h}")
        } else {
            h.to_string()
        };
        (0..h.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(h.get(i..i + 2)?, 16).ok())
            .collect()
    } else if let Some(b) = v.strip_prefix("0b").or_else(|| v.strip_prefix("0B")) {
        decode_base64(b)
    } else {
        None
    }
}

fn decode_base64(s: &str) -> Option<Vec<u8>> {
    if s.is_empty() || s.len() > 4096 {
        return None;
    }
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let mut acc = 0u32;
    let mut bits = 0;
    for c in s.bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            b'=' => break,
            _ => return None,
        };
        acc = acc << 6 | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    Some(out)
}

/// Encode bytes as a CHAP hex value.
pub fn encode_hex(b: &[u8]) -> String {
    let mut s = String::with_capacity(2 + b.len() * 2);
    s.push_str("0x");
    for x in b {
        s.push_str(&format!("{x:02x}"));
    }
    s
}

fn random_bytes(n: usize) -> Vec<u8> {
    let mut b = vec![0u8; n];
    if getrandom::fill(&mut b).is_err() {
        // No OS randomness: fall back to a hash of the time and address,
        // still unpredictable enough to keep challenges distinct.
        use std::hash::{BuildHasher, Hasher};
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u128(
            std::time::SystemTime::now()
                .elapsed()
                .map(|d| d.as_nanos())
                .unwrap_or(0),
        );
        for (i, x) in b.iter_mut().enumerate() {
            h.write_usize(i);
            *x = h.finish() as u8;
        }
    }
    b
}

#[derive(Debug)]
enum State {
    /// AuthMethod=CHAP was agreed; waiting for CHAP_A.
    WaitAlgorithm,
    /// Challenge sent; waiting for CHAP_N/CHAP_R.
    WaitResponse {
        id: u8,
        challenge: Vec<u8>,
    },
    Done,
}

/// One CHAP exchange on one login.
#[derive(Debug)]
pub struct ChapExchange {
    secrets: ChapSecrets,
    state: State,
}

impl ChapExchange {
    pub fn new(secrets: ChapSecrets) -> Self {
        ChapExchange {
            secrets,
            state: State::WaitAlgorithm,
        }
    }

    pub fn done(&self) -> bool {
        matches!(self.state, State::Done)
    }

    /// Feed the keys of one login PDU; returns the CHAP keys to answer with.
    pub fn step(&mut self, keys: &[(String, String)]) -> Result<Vec<(String, String)>, ChapError> {
        match &self.state {
            State::WaitAlgorithm => {
                let Some(a) = find(keys, "CHAP_A") else {
                    // Keys of the security stage without CHAP yet: wait.
                    return Ok(Vec::new());
                };
                if !a.split(',').any(|x| x.trim() == "5") {
                    return Err(ChapError::NoAlgorithm);
                }
                let id = random_bytes(1)[0];
                let challenge = random_bytes(16);
                let out = vec![
                    ("CHAP_A".to_string(), "5".to_string()),
                    ("CHAP_I".to_string(), id.to_string()),
                    ("CHAP_C".to_string(), encode_hex(&challenge)),
                ];
                self.state = State::WaitResponse { id, challenge };
                Ok(out)
            }
            State::WaitResponse { id, challenge } => {
                let name = find(keys, "CHAP_N").ok_or(ChapError::Missing("CHAP_N"))?;
                let resp = find(keys, "CHAP_R").ok_or(ChapError::Missing("CHAP_R"))?;
                let resp = decode_binary(resp).ok_or(ChapError::Malformed("CHAP_R"))?;
                if name != self.secrets.initiator.user {
                    return Err(ChapError::UnknownUser);
                }
                let want = response(*id, &self.secrets.initiator.secret, challenge);
                if resp.len() != want.len() || !constant_time_eq(&resp, &want) {
                    return Err(ChapError::BadResponse);
                }
                let mut out = Vec::new();
                match (find(keys, "CHAP_I"), find(keys, "CHAP_C")) {
                    (None, None) => {}
                    (Some(mi), Some(mc)) => {
                        let mi: u8 = mi.parse().map_err(|_| ChapError::Malformed("CHAP_I"))?;
                        let mc = decode_binary(mc).ok_or(ChapError::Malformed("CHAP_C"))?;
                        if mc == *challenge {
                            return Err(ChapError::Reflection);
                        }
                        let t = self
                            .secrets
                            .target
                            .as_ref()
                            .ok_or(ChapError::NoTargetSecret)?;
                        if t.secret == self.secrets.initiator.secret {
                            // The same secret both ways would let a reflected
                            // exchange prove nothing.
                            return Err(ChapError::Reflection);
                        }
                        out.push(("CHAP_N".to_string(), t.user.clone()));
                        out.push((
                            "CHAP_R".to_string(),
                            encode_hex(&response(mi, &t.secret, &mc)),
                        ));
                    }
                    (None, Some(_)) => return Err(ChapError::Missing("CHAP_I")),
                    (Some(_), None) => return Err(ChapError::Missing("CHAP_C")),
                }
                self.state = State::Done;
                Ok(out)
            }
            State::Done => {
                if keys.iter().any(|(k, _)| k.starts_with("CHAP_")) {
                    return Err(ChapError::OutOfSequence);
                }
                Ok(Vec::new())
            }
        }
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn kv(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn secrets(mutual: bool) -> ChapSecrets {
        ChapSecrets {
            initiator: ChapCredential::new("alice", "initiator-secret"),
            target: mutual.then(|| ChapCredential::new("s2d", "target-secret-1")),
        }
    }

    /// Play the initiator's side against the exchange.
    fn run(secret: &str, mutual: bool) -> Result<Vec<(String, String)>, ChapError> {
        let mut x = ChapExchange::new(secrets(true));
        let ch = x.step(&kv(&[("CHAP_A", "7,5")]))?;
        let id: u8 = ch[1].1.parse().expect("id");
        let c = decode_binary(&ch[2].1).expect("challenge");
        let r = encode_hex(&response(id, secret.as_bytes(), &c));
        let mut keys = vec![("CHAP_N", "alice"), ("CHAP_R", r.as_str())];
        if mutual {
            keys.push(("CHAP_I", "9"));
            keys.push(("CHAP_C", "0x0102030405060708"));
        }
        let out = x.step(&kv(&keys))?;
        assert!(x.done());
        Ok(out)
    }

    #[test]
    fn one_way_and_mutual() {
        assert_eq!(run("initiator-secret", false), Ok(vec![]));
        assert_eq!(run("wrong", false), Err(ChapError::BadResponse));
        let out = run("initiator-secret", true).expect("mutual");
        let want = encode_hex(&response(9, b"target-secret-1", &[1, 2, 3, 4, 5, 6, 7, 8]));
        assert_eq!(out, kv(&[("CHAP_N", "s2d"), ("CHAP_R", &want)]));
    }

    #[test]
    fn md5_response_vector() {
        // MD5(0x01 || "secret" || 0x00..0x0f), computed independently.
        let r = response(1, b"secret", &(0u8..16).collect::<Vec<_>>());
        assert_eq!(encode_hex(&r), "0x740e86463bda3a4d7017d6e0fba0699d");
    }

    #[test]
    fn base64_values() {
        assert_eq!(decode_binary("0bAQID"), Some(vec![1, 2, 3]));
        assert_eq!(decode_binary("0x0a0B"), Some(vec![10, 11]));
        assert_eq!(decode_binary("0xzz"), None);
        assert_eq!(decode_binary("12"), None);
    }

    proptest! {
        #[test]
        fn hostile_values_never_panic(a in "\\PC{0,40}", b in "\\PC{0,40}") {
            let _ = decode_binary(&a);
            let mut x = ChapExchange::new(secrets(true));
            let _ = x.step(&kv(&[("CHAP_A", "5")]));
            let _ = x.step(&kv(&[("CHAP_N", &a), ("CHAP_R", &b), ("CHAP_I", &a), ("CHAP_C", &b)]));
        }
    }
}
