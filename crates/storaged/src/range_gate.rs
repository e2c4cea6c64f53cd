//! Pausing client I/O to one byte range of a volume while a resync or a
//! scrub works on it, instead of pausing the whole volume: a client write
//! elsewhere in the volume goes on, so a repair costs client latency only
//! where the two meet.
//!
//! Protocol: a repair opens a [`Session`] (a count of active sessions, and
//! one wait, under the volume's I/O gate, for the I/O already in flight),
//! then pauses one range at a time ([`Session::pause`]): new I/O that
//! overlaps it waits, and the pause begins once the overlapping I/O in
//! flight has ended. While no session is open, I/O does not register its
//! range at all (one atomic load).
//!
//! Invariants: while a pause holds a range, no client I/O overlapping it
//! runs; two pauses never hold overlapping ranges at once.

use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use tokio::sync::{Notify, RwLock};

type Range = (u64, u64);

fn overlap(a: Range, b: Range) -> bool {
    a.0 < b.1 && b.0 < a.1
}

#[derive(Default)]
struct State {
    paused: Vec<Range>,
    inflight: Vec<(u64, Range)>,
    next: u64,
}

/// The ranges of one volume that repairs pause, and the client I/O in
/// flight while they may.
#[derive(Default)]
pub struct RangeGate {
    sessions: AtomicUsize,
    state: Mutex<State>,
    changed: Notify,
}

/// Client I/O registered in flight on a range (nothing while no repair
/// session is open).
pub struct Entered<'a> {
    gate: &'a RangeGate,
    id: Option<u64>,
}

impl Drop for Entered<'_> {
    fn drop(&mut self) {
        if let Some(id) = self.id {
            self.gate.lock().inflight.retain(|(i, _)| *i != id);
            self.gate.changed.notify_waiters();
        }
    }
}

/// A repair's right to pause ranges; open while it lives.
pub struct Session<'a> {
    gate: &'a RangeGate,
}

impl Drop for Session<'_> {
    fn drop(&mut self) {
        self.gate.sessions.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A paused range; client I/O to it resumes when this is dropped.
pub struct Paused<'a> {
    gate: &'a RangeGate,
    range: Range,
}

impl Drop for Paused<'_> {
    fn drop(&mut self) {
        let mut st = self.gate.lock();
        if let Some(i) = st.paused.iter().position(|r| *r == self.range) {
            st.paused.swap_remove(i);
        }
        drop(st);
        self.gate.changed.notify_waiters();
    }
}

impl RangeGate {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits until `ready` holds under the lock, then runs `then` under it.
    async fn wait_until<T>(
        &self,
        ready: impl Fn(&State) -> bool,
        then: impl FnOnce(&mut State) -> T,
    ) -> T {
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let mut st = self.lock();
                if ready(&st) {
                    return then(&mut st);
                }
            }
            notified.await;
        }
    }

    /// Client I/O to `[offset, offset + len)`: waits while a repair pauses
    /// an overlapping range. Call it holding the volume's I/O gate.
    pub async fn enter(&self, offset: u64, len: u64) -> Entered<'_> {
        if self.sessions.load(Ordering::SeqCst) == 0 {
            return Entered {
                gate: self,
                id: None,
            };
        }
        let range = (offset, offset + len.max(1));
        let id = self
            .wait_until(
                |st| !st.paused.iter().any(|p| overlap(*p, range)),
                |st| {
                    st.next += 1;
                    let id = st.next;
                    st.inflight.push((id, range));
                    id
                },
            )
            .await;
        Entered {
            gate: self,
            id: Some(id),
        }
    }

    /// Opens a repair session; `io_gate` is the volume's I/O gate, taken
    /// once for writing so that I/O that started unregistered has ended.
    pub async fn session(&self, io_gate: &RwLock<()>) -> Session<'_> {
        self.sessions.fetch_add(1, Ordering::SeqCst);
        let s = Session { gate: self };
        drop(io_gate.write().await);
        s
    }
}

impl<'a> Session<'a> {
    /// Pauses client I/O to `[offset, offset + len)` and waits for the I/O
    /// in flight there to end.
    pub async fn pause(&self, offset: u64, len: u64) -> Paused<'a> {
        let gate = self.gate;
        let range = (offset, offset + len.max(1));
        gate.wait_until(
            |st| !st.paused.iter().any(|p| overlap(*p, range)),
            |st| st.paused.push(range),
        )
        .await;
        let paused = Paused { gate, range };
        gate.wait_until(
            |st| !st.inflight.iter().any(|(_, r)| overlap(*r, range)),
            |_| (),
        )
        .await;
        paused
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    #[tokio::test]
    async fn io_waits_only_for_an_overlapping_pause() {
        let io = RwLock::new(());
        let gate = Arc::new(RangeGate::default());
        let s = gate.session(&io).await;
        let p = s.pause(1 << 20, 1 << 20).await;
        // Elsewhere: at once.
        tokio::time::timeout(Duration::from_millis(100), gate.enter(0, 4096))
            .await
            .expect("I/O outside the paused range must not wait");
        // Overlapping: only after the pause ends.
        let g = gate.clone();
        let t = tokio::spawn(async move {
            let _e = g.enter((1 << 20) + 4096, 4096).await;
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!t.is_finished(), "I/O into a paused range ran");
        drop(p);
        tokio::time::timeout(Duration::from_secs(1), t)
            .await
            .expect("I/O resumes when the pause ends")
            .expect("task");
    }

    #[tokio::test]
    async fn a_pause_waits_for_overlapping_io_in_flight() {
        let io = RwLock::new(());
        let gate = Arc::new(RangeGate::default());
        let s = gate.session(&io).await;
        let e = gate.enter(0, 8192).await;
        let g = gate.clone();
        let (tx, mut rx) = tokio::sync::oneshot::channel();
        let t = tokio::spawn(async move {
            let s = Session { gate: &g };
            g.sessions.fetch_add(1, Ordering::SeqCst);
            let _p = s.pause(4096, 4096).await;
            let _ = tx.send(());
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(
            rx.try_recv().is_err(),
            "the pause began with I/O in flight on its range"
        );
        drop(e);
        tokio::time::timeout(Duration::from_secs(1), t)
            .await
            .expect("the pause begins once the I/O ended")
            .expect("task");
        drop(s);
    }

    #[tokio::test]
    async fn without_a_session_io_registers_nothing() {
        let gate = RangeGate::default();
        let e = gate.enter(0, 4096).await;
        assert!(e.id.is_none());
        assert!(gate.lock().inflight.is_empty());
    }
}
