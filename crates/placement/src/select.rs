//! The shared building blocks of every decision: sets of fault domains, the
//! widest usable level, the greedy "lowest key on a fresh domain" pick, and
//! the capacity bound for slabs that need distinct domains.
//!
//! Invariants: a pick never returns a node whose domain (at the level asked)
//! is already in the taken set; ties are broken by node index, i.e. by
//! [`NodeId`](crate::NodeId) order, so the same input gives the same pick.

use crate::topology::{DomainLevel, NODES_MAX, Node, NodeId, Topology};

/// A set of domain indices at one level (bit `i` = domain `i`), or a set of
/// node indices.
pub(crate) type Mask = u32;

pub(crate) fn bit(index: u8) -> Mask {
    1 << index
}

/// Width of the tie-break window, in bits of the 2^32 fill scale: fills
/// within 2^25 / 2^32 = 1/128 (0.78 %) of each other are ordered by a hash,
/// not by value.
pub(crate) const JITTER_BITS: u32 = 25;

/// A pseudo-random offset in `[0, 2^JITTER_BITS)` for `node` in a decision
/// identified by `seed`, added to fill scores before comparing them.
///
/// Why: a strict "emptiest first" with ties broken by node id makes the same
/// nodes fill in step and share slab after slab (nodes 3, 4 and 5 end up
/// holding copies of the same slabs), so losing one node would load its few
/// partners with the whole rebuild. Breaking near-ties by a hash of the
/// decision spreads every node's partners over the whole cluster
/// (declustering) at a cost of at most 1/128 in balance. Deterministic: the
/// seed comes from the input.
pub(crate) fn jitter(seed: u64, node: NodeId) -> u64 {
    splitmix64(seed ^ u64::from(node.0).wrapping_mul(0x9E37_79B9_7F4A_7C15)) >> (64 - JITTER_BITS)
}

/// SplitMix64's output function: a fast, well-mixed 64-bit hash.
fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The widest level at which the nodes in `nodes` (a node-index mask) span
/// at least `needed` distinct domains.
pub(crate) fn widest_level(topology: &Topology, nodes: Mask, needed: usize) -> Option<DomainLevel> {
    let mut spans = [0 as Mask; 4];
    for (i, node) in topology.nodes().iter().enumerate() {
        if nodes & (1 << i) != 0 {
            for level in DomainLevel::ALL {
                spans[level.index()] |= bit(node.domain(level));
            }
        }
    }
    DomainLevel::ALL
        .into_iter()
        .find(|&level| spans[level.index()].count_ones() as usize >= needed)
}

/// The widest level at which the nodes `node_indices` are pairwise in
/// distinct domains; `None` if two share a node.
pub(crate) fn distinct_level(
    topology: &Topology,
    node_indices: impl Iterator<Item = usize> + Clone,
) -> Option<DomainLevel> {
    let nodes = topology.nodes();
    DomainLevel::ALL.into_iter().find(|&level| {
        let mut seen: Mask = 0;
        node_indices.clone().all(|ni| {
            let b = bit(nodes[ni].domain(level));
            let fresh = seen & b == 0;
            seen |= b;
            fresh
        })
    })
}

/// Keys fit in this many bits, leaving room for the node index below them.
pub(crate) const KEY_BITS: u32 = 59;
const INDEX_BITS: u32 = 64 - KEY_BITS;
const _: () = assert!(NODES_MAX <= 1 << INDEX_BITS);

/// A key per node index, lower is better, at most `2^KEY_BITS - 1`
/// (`None`: the node takes nothing), packed with the node index so that one
/// `u64` comparison orders by key, then by index. Computed once per decision.
pub(crate) fn node_keys(
    topology: &Topology,
    mut key: impl FnMut(usize, &Node) -> Option<u64>,
) -> [u64; NODES_MAX] {
    let mut packed = [u64::MAX; NODES_MAX];
    for (i, node) in topology.nodes().iter().enumerate() {
        if let Some(k) = key(i, node) {
            packed[i] = (k.min((1 << KEY_BITS) - 1) << INDEX_BITS) | i as u64;
        }
    }
    packed
}

/// The nodes that may take an extent, each with its packed key (see
/// [`node_keys`]) and its domain at one level.
pub(crate) struct Candidates<'k> {
    packed: &'k [u64; NODES_MAX],
    domains: [u8; NODES_MAX],
    /// Node-index mask of each domain's nodes.
    members: [Mask; NODES_MAX],
    /// Node-index mask of the nodes with a key.
    keyed: Mask,
}

impl<'k> Candidates<'k> {
    pub(crate) fn new(
        topology: &Topology,
        level: DomainLevel,
        packed: &'k [u64; NODES_MAX],
    ) -> Self {
        let mut domains = [0; NODES_MAX];
        let mut members = [0; NODES_MAX];
        let mut keyed = 0;
        for (i, node) in topology.nodes().iter().enumerate() {
            let d = node.domain(level);
            domains[i] = d;
            members[d as usize] |= 1 << i;
            if packed[i] != u64::MAX {
                keyed |= 1 << i;
            }
        }
        Self {
            packed,
            domains,
            members,
            keyed,
        }
    }

    pub(crate) fn domain(&self, node: usize) -> u8 {
        self.domains[node]
    }

    /// The node with the smallest key whose domain is not in `taken`. Ties
    /// go to the lower node index.
    pub(crate) fn pick(&self, taken: Mask) -> Option<usize> {
        let mut blocked: Mask = 0;
        let mut domains = taken & ((1 << NODES_MAX) - 1);
        while domains != 0 {
            blocked |= self.members[domains.trailing_zeros() as usize];
            domains &= domains - 1;
        }
        let mut free = self.keyed & !blocked;
        let mut best = u64::MAX;
        while free != 0 {
            best = best.min(self.packed[free.trailing_zeros() as usize]);
            free &= free - 1;
        }
        (best != u64::MAX).then_some((best & ((1 << INDEX_BITS) - 1)) as usize)
    }

    /// `count` nodes on pairwise distinct domains, none in `taken`, each
    /// time the one with the smallest key; `None` if there are fewer.
    pub(crate) fn pick_many(&self, mut taken: Mask, count: usize) -> Option<Vec<usize>> {
        let mut chosen = Vec::with_capacity(count);
        for _ in 0..count {
            let ni = self.pick(taken)?;
            taken |= bit(self.domains[ni]);
            chosen.push(ni);
        }
        Some(chosen)
    }
}

/// The most slabs of `width` extents, each on `width` distinct domains, that
/// fit in domains with `free[d]` free extents: the largest `s` with
/// `sum(min(free[d], s)) >= width * s`. Exact: a domain gives at most one
/// extent per slab, and whenever the inequality holds a greedy that always
/// serves the domains with the most free extents places `s` slabs.
pub(crate) fn slabs_max(free: &[u64], width: usize) -> u64 {
    let width = width.max(1) as u64;
    let total: u64 = free.iter().sum();
    let upper = total / width;
    let fits = |s: u64| -> bool {
        let supply: u128 = free.iter().map(|&f| f.min(s) as u128).sum();
        supply >= width as u128 * s as u128
    };
    if free.iter().all(|&f| f <= upper) {
        return upper;
    }
    // fits(0) holds and the set of s that fit is an interval [0, s*].
    let (mut low, mut high) = (0, upper);
    while low < high {
        let mid = low + (high - low).div_ceil(2);
        if fits(mid) {
            low = mid;
        } else {
            high = mid - 1;
        }
    }
    low
}

/// For the next slab of `width` extents over domains with `free[d]` free
/// extents: the set of "tight" domains and how many of them the slab must use
/// so that the pool can still hold [`slabs_max`] − 1 more slabs afterwards.
///
/// With `s = slabs_max`, a domain with `free >= s` loses one unit of
/// `min(free, s)` whether it is used or not, a smaller one only when used; so
/// the slab keeps the bound iff it uses at least `tight - slack` tight
/// domains, where `slack = sum(min(free, s)) - width * s`. Usually that is 0
/// and the choice is free; it bites when one domain is much larger than the
/// others and the pool fills up.
pub(crate) fn tight_domains(free: &[u64; NODES_MAX], width: usize) -> (usize, Mask) {
    let s = slabs_max(free, width);
    if s == 0 {
        return (0, 0);
    }
    let mut tight: Mask = 0;
    let mut supply: u128 = 0;
    for (d, &f) in free.iter().enumerate() {
        if f >= s {
            tight |= bit(d as u8);
        }
        supply += f.min(s) as u128;
    }
    let slack = supply - width as u128 * s as u128;
    let must = (tight.count_ones() as u128).saturating_sub(slack);
    (must.min(width as u128) as usize, tight)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Exhaustive check of `slabs_max` against a brute-force greedy that
    /// always serves the domains with the most free extents.
    #[test]
    fn slabs_max_matches_greedy() {
        fn greedy(free: &[u64], width: usize) -> u64 {
            let mut f = free.to_vec();
            let mut slabs = 0;
            loop {
                f.sort_unstable_by(|a, b| b.cmp(a));
                if f.len() < width || f[width - 1] == 0 {
                    return slabs;
                }
                for x in f.iter_mut().take(width) {
                    *x -= 1;
                }
                slabs += 1;
            }
        }
        for width in 1..=4 {
            for a in 0..6u64 {
                for b in 0..6u64 {
                    for c in 0..9u64 {
                        for d in 0..4u64 {
                            let free = [a, b, c, d];
                            assert_eq!(
                                slabs_max(&free, width),
                                greedy(&free, width),
                                "{free:?} w{width}"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn tight_domains_bite_only_when_needed() {
        let mut free = [0u64; NODES_MAX];
        free[..4].copy_from_slice(&[10, 10, 10, 10]);
        assert_eq!(tight_domains(&free, 3).0, 0);
        // One domain as large as all the others: it must be in every slab.
        free[..4].copy_from_slice(&[5, 2, 2, 0]);
        let (must, tight) = tight_domains(&free, 2);
        assert_eq!((must, tight), (1, 0b1));
    }
}
