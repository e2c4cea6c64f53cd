//! Process-wide counters of the extent store, exported by storaged's
//! metrics endpoint and asserted on by tests.

use std::sync::atomic::AtomicU64;

/// Blocks whose data failed its checksum on read (after one retry).
pub static CHECKSUM_ERRORS: AtomicU64 = AtomicU64::new(0);
