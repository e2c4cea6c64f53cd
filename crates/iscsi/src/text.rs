//! The `key=value\0` text format of login and text PDUs (RFC 7143 6.1).
//!
//! Invariants: parsing never panics and never returns more than
//! [`KEYS_MAX`] pairs; keys longer than 63 bytes or values longer than
//! [`VALUE_LEN_MAX`] are errors, as is a pair without `=`.

/// Most key=value pairs accepted in one negotiation exchange.
pub const KEYS_MAX: usize = 128;
/// Longest value accepted (RFC 7143 allows 8192 for most keys, more for
/// CHAP challenges in base64/hex; 16 KiB covers both).
pub const VALUE_LEN_MAX: usize = 16384;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TextError {
    #[error("key=value pair without '='")]
    MissingEquals,
    #[error("key too long or empty")]
    BadKey,
    #[error("value too long")]
    ValueTooLong,
    #[error("more than {KEYS_MAX} keys")]
    TooManyKeys,
    #[error("text is not UTF-8")]
    NotUtf8,
}

/// Parse a text data segment into ordered pairs.
pub fn parse(data: &[u8]) -> Result<Vec<(String, String)>, TextError> {
    let mut out = Vec::new();
    for item in data.split(|&b| b == 0) {
        if item.is_empty() {
            continue;
        }
        if out.len() >= KEYS_MAX {
            return Err(TextError::TooManyKeys);
        }
        let s = std::str::from_utf8(item).map_err(|_| TextError::NotUtf8)?;
        let (k, v) = s.split_once('=').ok_or(TextError::MissingEquals)?;
        if k.is_empty() || k.len() > 63 {
            return Err(TextError::BadKey);
        }
        if v.len() > VALUE_LEN_MAX {
            return Err(TextError::ValueTooLong);
        }
        out.push((k.to_string(), v.to_string()));
    }
    Ok(out)
}

/// The value of the first `k` in `keys`.
pub fn find<'a>(keys: &'a [(String, String)], k: &str) -> Option<&'a str> {
    keys.iter()
        .find(|(key, _)| key == k)
        .map(|(_, v)| v.as_str())
}

/// Encode pairs as `key=value\0...`.
pub fn encode(pairs: &[(String, String)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (k, v) in pairs {
        out.extend_from_slice(k.as_bytes());
        out.push(b'=');
        out.extend_from_slice(v.as_bytes());
        out.push(0);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_pairs() {
        let p = parse(b"A=1\0B=x=y\0\0").expect("parse");
        assert_eq!(
            p,
            vec![("A".into(), "1".into()), ("B".into(), "x=y".into())]
        );
        assert_eq!(parse(b"novalue\0"), Err(TextError::MissingEquals));
    }

    proptest! {
        #[test]
        fn never_panics(data in proptest::collection::vec(any::<u8>(), 0..4096)) {
            if let Ok(p) = parse(&data) { prop_assert!(p.len() <= KEYS_MAX) }
        }

        #[test]
        fn round_trips(pairs in proptest::collection::vec(("[A-Za-z][A-Za-z0-9_]{0,20}", "[ -~]{0,40}"), 0..20)) {
            let pairs: Vec<(String, String)> = pairs;
            prop_assert_eq!(parse(&encode(&pairs)).expect("parse"), pairs);
        }
    }
}
