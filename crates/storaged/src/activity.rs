//! When this node last served client I/O, so that background work (resync,
//! rebuild, scrub) can yield to clients: with client I/O in the last
//! [`BUSY_WINDOW`], a repair copies in small steps, one step at a time on
//! the whole node ([`busy_slot`]), and pauses after each, keeping the
//! client's latency close to its baseline; with none, it runs at full
//! speed.
//!
//! One relaxed atomic store per client request; the clock is monotonic
//! (milliseconds since the process started).

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Client I/O this recent makes background work yield.
pub const BUSY_WINDOW: Duration = Duration::from_millis(100);
/// A repair step while clients are busy.
pub const BUSY_STEP: u64 = 128 << 10;
/// The pause after each repair step while clients are busy.
pub const BUSY_PAUSE: Duration = Duration::from_millis(2);

static LAST_MS: AtomicU64 = AtomicU64::new(0);
static BUSY_SLOT: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(1);

/// While clients are busy, the one repair step of the node that may run:
/// hold it for the step and its pause. `None` when clients are idle.
pub async fn busy_slot() -> Option<tokio::sync::SemaphorePermit<'static>> {
    if !clients_busy() {
        return None;
    }
    BUSY_SLOT.acquire().await.ok()
}

fn now_ms() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    // +1 so that 0 means "never".
    START.get_or_init(Instant::now).elapsed().as_millis() as u64 + 1
}

/// Records client I/O now.
pub fn touch() {
    LAST_MS.store(now_ms(), Ordering::Relaxed);
}

/// Whether clients did I/O on this node within [`BUSY_WINDOW`].
pub fn clients_busy() -> bool {
    let last = LAST_MS.load(Ordering::Relaxed);
    last != 0 && now_ms().saturating_sub(last) <= BUSY_WINDOW.as_millis() as u64
}

/// The size of the next repair step (at most `full`), and the pause to
/// take after it.
pub fn repair_step(full: u64) -> (u64, Duration) {
    if clients_busy() {
        (BUSY_STEP.min(full), BUSY_PAUSE)
    } else {
        (full, Duration::ZERO)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repairs_take_small_steps_only_while_clients_are_busy() {
        // (This test owns the process-wide clock in this test binary.)
        touch();
        assert!(clients_busy());
        assert_eq!(repair_step(1 << 20), (BUSY_STEP, BUSY_PAUSE));
        std::thread::sleep(BUSY_WINDOW + Duration::from_millis(30));
        assert!(!clients_busy());
        assert_eq!(repair_step(1 << 20), (1 << 20, Duration::ZERO));
    }
}
