//! SendTargets (RFC 7143 appendix C): which targets this portal offers.
//! One target per volume the provider lists, named `iqn.2026-01.io.s2d:<volume>`,
//! each reachable at the portal with portal group tag 1.
//!
//! Invariant: the answer lists only volumes the provider reports, in its
//! (sorted) order.

use std::net::SocketAddr;

use crate::config::{target_iqn, volume_of_iqn};
use crate::registry::Registry;

/// `ip:port,1`, with brackets around IPv6 addresses.
fn address(portal: SocketAddr) -> String {
    match portal {
        SocketAddr::V4(a) => format!("{}:{},1", a.ip(), a.port()),
        SocketAddr::V6(a) => format!("[{}]:{},1", a.ip(), a.port()),
    }
}

/// The key=value pairs answering `SendTargets=<value>`. `own` is the volume
/// of a normal session (which may only ask about its own target).
pub async fn send_targets(
    registry: &Registry,
    value: &str,
    own: Option<&str>,
    portal: SocketAddr,
) -> Vec<(String, String)> {
    let volumes = registry.provider.list().await;
    let wanted: Vec<String> = match (value, own) {
        ("All", None) => volumes.into_iter().map(|v| v.name).collect(),
        ("", Some(o)) | ("All", Some(o)) => vec![o.to_string()],
        (name, _) => match volume_of_iqn(name) {
            Some(v) if volumes.iter().any(|x| x.name == v) && own.is_none_or(|o| o == v) => {
                vec![v.to_string()]
            }
            _ => Vec::new(),
        },
    };
    let mut out = Vec::new();
    for v in wanted {
        out.push(("TargetName".to_string(), target_iqn(&v)));
        out.push(("TargetAddress".to_string(), address(portal)));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses() {
        assert_eq!(
            address("127.0.0.1:3260".parse().expect("addr")),
            "127.0.0.1:3260,1"
        );
        assert_eq!(address("[::1]:3260".parse().expect("addr")), "[::1]:3260,1");
    }
}
