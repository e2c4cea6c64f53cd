//! Exact fill fractions.
//!
//! Every balance decision compares `used / capacity` of two disks, nodes or
//! domains. Doing it with floats would make a decision depend on rounding;
//! [`Fill`] compares the fractions exactly by cross-multiplying in `u128`,
//! which cannot overflow because capacities are capped at
//! [`DISK_EXTENTS_MAX`](crate::DISK_EXTENTS_MAX) per disk (2^40 × 1,024 disks
//! = 2^50 per cluster, products below 2^100).

use std::cmp::Ordering;

/// `used / capacity` with `capacity > 0`, ordered by value.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Fill {
    used: u64,
    capacity: u64,
}

impl Fill {
    /// `used / capacity`; a zero capacity is treated as 1 so the value stays
    /// defined (callers never rank disks without capacity).
    pub(crate) fn new(used: u64, capacity: u64) -> Self {
        Self {
            used,
            capacity: capacity.max(1),
        }
    }

    /// The fill after one more extent: the quantity the greedy choices
    /// minimise, which spreads extents in proportion to capacity.
    pub(crate) fn after_one_more(used: u64, capacity: u64) -> Self {
        Self::new(used.saturating_add(1), capacity)
    }

    /// True when `self` is at most `other` plus `slack_bp` basis points
    /// (1 bp = 0.01 percentage point of fill).
    pub(crate) fn at_most_plus(self, other: Fill, slack_bp: u64) -> bool {
        // self.used / self.cap <= other.used / other.cap + slack / 10_000
        // <=> 10_000 * su * oc <= (10_000 * ou + slack * oc) * sc
        let (su, sc) = (self.used as u128, self.capacity as u128);
        let (ou, oc) = (other.used as u128, other.capacity as u128);
        let slack = slack_bp as u128;
        10_000 * su * oc <= (10_000 * ou + slack * oc) * sc
    }
}

impl Ord for Fill {
    fn cmp(&self, other: &Self) -> Ordering {
        const SMALL: u64 = 1 << 32;
        if (self.used | self.capacity | other.used | other.capacity) < SMALL {
            // Products of 32-bit values fit in a u64: the common, fast case.
            return (self.used * other.capacity).cmp(&(other.used * self.capacity));
        }
        let left = self.used as u128 * other.capacity as u128;
        let right = other.used as u128 * self.capacity as u128;
        left.cmp(&right)
    }
}

impl PartialOrd for Fill {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl PartialEq for Fill {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Fill {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compares_fractions_exactly() {
        assert_eq!(Fill::new(1, 2), Fill::new(2, 4));
        assert!(Fill::new(1, 3) < Fill::new(1, 2));
        assert!(Fill::new(2, 3) > Fill::new(3, 5));
        let big = 1u64 << 50;
        assert!(Fill::new(big - 1, big) < Fill::new(big, big));
        assert_eq!(Fill::new(0, 0), Fill::new(0, 7));
    }

    #[test]
    fn slack_is_in_basis_points() {
        // 52 % <= 50 % + 2 %, but 53 % is not.
        assert!(Fill::new(52, 100).at_most_plus(Fill::new(50, 100), 200));
        assert!(!Fill::new(53, 100).at_most_plus(Fill::new(50, 100), 200));
        assert!(Fill::new(1, 4).at_most_plus(Fill::new(1, 2), 0));
    }
}
