//! Resiliency: how a slab is made redundant, and what that costs.
//!
//! A slab of resiliency `r` is `r.width()` extents, each on its own fault
//! domain: whole copies for `simple` / `mirror-N`, `k` data and `m` parity
//! shards for `parity-k+m`.
//!
//! Invariants (enforced by the constructors, so every value is valid):
//! mirrors have 1 to 3 copies; parity has `k >= 2`, `m` in {1, 2} and
//! `k + m <= NODES_MAX`, so the width of any slab fits in one cluster.

use std::fmt;
use std::str::FromStr;

use crate::error::PlacementError;
use crate::topology::NODES_MAX;

/// The redundancy of a slab. Parse it from `simple`, `mirror-2`, `mirror-3`
/// or `parity-K+M` (e.g. `parity-4+2`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Resiliency {
    kind: Kind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Kind {
    /// `copies` whole copies; 1 is `simple`.
    Mirror { copies: u8 },
    /// `data` data shards and `parity` parity shards.
    Parity { data: u8, parity: u8 },
}

/// Parity schemes need at least this many data shards.
pub const PARITY_DATA_MIN: usize = 2;
/// Parity schemes have at most this many parity shards.
pub const PARITY_PARITY_MAX: usize = 2;
/// Mirrors have at most this many copies.
pub const MIRROR_COPIES_MAX: usize = 3;

const _: () = assert!(PARITY_DATA_MIN < NODES_MAX);
const _: () = assert!(MIRROR_COPIES_MAX <= NODES_MAX);

impl Resiliency {
    /// One copy, no redundancy.
    pub const SIMPLE: Self = Self {
        kind: Kind::Mirror { copies: 1 },
    };
    /// Two whole copies on two fault domains.
    pub const MIRROR_2: Self = Self {
        kind: Kind::Mirror { copies: 2 },
    };
    /// Three whole copies on three fault domains.
    pub const MIRROR_3: Self = Self {
        kind: Kind::Mirror { copies: 3 },
    };

    /// `copies` whole copies (1 is `simple`); 1 to 3.
    pub fn mirror(copies: usize) -> Result<Self, PlacementError> {
        match copies {
            1..=MIRROR_COPIES_MAX => Ok(Self {
                kind: Kind::Mirror {
                    copies: copies as u8,
                },
            }),
            _ => Err(PlacementError::InvalidResiliency {
                input: format!("mirror-{copies}"),
                reason: format!("a mirror has 1 to {MIRROR_COPIES_MAX} copies"),
            }),
        }
    }

    /// `data` data shards plus `parity` parity shards: `data >= 2`,
    /// `parity` 1 or 2, and `data + parity <= NODES_MAX`.
    pub fn parity(data: usize, parity: usize) -> Result<Self, PlacementError> {
        let refuse = |reason: String| PlacementError::InvalidResiliency {
            input: format!("parity-{data}+{parity}"),
            reason,
        };
        if data < PARITY_DATA_MIN {
            return Err(refuse(format!(
                "parity needs at least {PARITY_DATA_MIN} data shards"
            )));
        }
        if !(1..=PARITY_PARITY_MAX).contains(&parity) {
            return Err(refuse(format!(
                "parity has 1 to {PARITY_PARITY_MAX} parity shards"
            )));
        }
        if data + parity > NODES_MAX {
            return Err(refuse(format!(
                "{} shards need {} fault domains, a cluster has at most {NODES_MAX} nodes",
                data + parity,
                data + parity
            )));
        }
        Ok(Self {
            kind: Kind::Parity {
                data: data as u8,
                parity: parity as u8,
            },
        })
    }

    /// Extents per slab, which is also the number of distinct fault domains
    /// a slab needs.
    pub fn width(self) -> usize {
        match self.kind {
            Kind::Mirror { copies } => copies as usize,
            Kind::Parity { data, parity } => (data + parity) as usize,
        }
    }

    /// The number of distinct fault domains a slab needs: one per extent.
    pub fn fault_domains_needed(self) -> usize {
        self.width()
    }

    /// Extents' worth of volume data one slab holds: 1 for a mirror, `k` for
    /// parity.
    pub fn data_extents(self) -> usize {
        match self.kind {
            Kind::Mirror { .. } => 1,
            Kind::Parity { data, .. } => data as usize,
        }
    }

    /// Extents that must be read to recreate a lost extent: 1 copy for a
    /// mirror, any `k` shards for parity.
    pub fn extents_to_rebuild(self) -> usize {
        self.data_extents()
    }

    /// How many extents of one slab may be lost without losing data.
    pub fn failures_tolerated(self) -> usize {
        match self.kind {
            Kind::Mirror { copies } => copies as usize - 1,
            Kind::Parity { parity, .. } => parity as usize,
        }
    }

    /// True for `parity-k+m`.
    pub fn is_parity(self) -> bool {
        matches!(self.kind, Kind::Parity { .. })
    }

    /// Storage efficiency as an exact fraction `(data, raw)`: `(1, 3)` for
    /// mirror-3, `(4, 6)` for parity-4+2.
    pub fn efficiency_ratio(self) -> (usize, usize) {
        (self.data_extents(), self.width())
    }

    /// Storage efficiency: usable bytes per raw byte (0.333… for mirror-3,
    /// 0.666… for parity-4+2).
    pub fn efficiency(self) -> f64 {
        let (data, raw) = self.efficiency_ratio();
        data as f64 / raw as f64
    }
}

impl fmt::Display for Resiliency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.kind {
            Kind::Mirror { copies: 1 } => write!(f, "simple"),
            Kind::Mirror { copies } => write!(f, "mirror-{copies}"),
            Kind::Parity { data, parity } => write!(f, "parity-{data}+{parity}"),
        }
    }
}

fn parse_count(digits: &str) -> Option<usize> {
    if digits.is_empty() || digits.len() > 3 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

impl FromStr for Resiliency {
    type Err = PlacementError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        let refuse = |reason: &str| PlacementError::InvalidResiliency {
            input: input.to_string(),
            reason: reason.to_string(),
        };
        const EXPECTED: &str = "expected simple, mirror-2, mirror-3 or parity-K+M";
        if input == "simple" {
            return Ok(Self::SIMPLE);
        }
        if let Some(copies) = input.strip_prefix("mirror-") {
            let copies = parse_count(copies).ok_or_else(|| refuse(EXPECTED))?;
            if copies < 2 {
                return Err(refuse("a mirror has 2 or 3 copies (one copy is `simple`)"));
            }
            return Self::mirror(copies).map_err(|e| match e {
                PlacementError::InvalidResiliency { reason, .. } => refuse(&reason),
                other => other,
            });
        }
        if let Some(shards) = input.strip_prefix("parity-") {
            let (data, parity) = shards.split_once('+').ok_or_else(|| refuse(EXPECTED))?;
            let data = parse_count(data).ok_or_else(|| refuse(EXPECTED))?;
            let parity = parse_count(parity).ok_or_else(|| refuse(EXPECTED))?;
            return Self::parity(data, parity).map_err(|e| match e {
                PlacementError::InvalidResiliency { reason, .. } => refuse(&reason),
                other => other,
            });
        }
        Err(refuse(EXPECTED))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_every_valid_name() {
        for name in ["simple", "mirror-2", "mirror-3", "parity-2+1", "parity-4+2"] {
            let r: Resiliency = name.parse().expect(name);
            assert_eq!(r.to_string(), name);
        }
        for data in PARITY_DATA_MIN..=15 {
            for parity in 1..=PARITY_PARITY_MAX {
                let name = format!("parity-{data}+{parity}");
                match name.parse::<Resiliency>() {
                    Ok(r) => {
                        assert!(data + parity <= NODES_MAX);
                        assert_eq!(r.to_string(), name);
                        assert_eq!(r.width(), data + parity);
                    }
                    Err(_) => assert!(data + parity > NODES_MAX, "{name} refused"),
                }
            }
        }
    }

    #[test]
    fn refuses_nonsense_with_a_reason() {
        for bad in [
            "",
            "mirror",
            "mirror-1",
            "mirror-4",
            "mirror-+2",
            "Mirror-2",
            "parity-1+1",
            "parity-4+3",
            "parity-4+0",
            "parity-15+2",
            "parity-4++2",
            "parity-+4+2",
            "parity-4",
            "parity-4+2 ",
            "raid5",
        ] {
            let err = bad.parse::<Resiliency>().expect_err(bad);
            assert_eq!(err.code(), "S2D:Placement:InvalidResiliency", "{bad}");
            assert!(err.to_string().contains(&format!("{bad:?}")), "{err}");
        }
        let err = "parity-15+2".parse::<Resiliency>().expect_err("too wide");
        assert!(err.to_string().contains("17 shards"), "{err}");
    }

    #[test]
    fn efficiency_and_fault_domains() {
        let cases = [
            ("simple", 1, 1, 0, 1.0),
            ("mirror-2", 2, 1, 1, 0.5),
            ("mirror-3", 3, 1, 2, 1.0 / 3.0),
            ("parity-2+1", 3, 2, 1, 2.0 / 3.0),
            ("parity-4+2", 6, 4, 2, 4.0 / 6.0),
        ];
        for (name, width, data, tolerated, efficiency) in cases {
            let r: Resiliency = name.parse().expect(name);
            assert_eq!(r.width(), width, "{name}");
            assert_eq!(r.fault_domains_needed(), width, "{name}");
            assert_eq!(r.data_extents(), data, "{name}");
            assert_eq!(r.failures_tolerated(), tolerated, "{name}");
            assert!((r.efficiency() - efficiency).abs() < 1e-12, "{name}");
        }
    }
}
