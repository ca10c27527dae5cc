//! A gate that lets a packet path log a drop at most once per interval, and says how many it
//! held back meanwhile.
//!
//! A datapath that drops thousands of packets a second for one reason must still tell the
//! operator which SPI, index or peer it was, without one log line per packet. Lock-free, so
//! the packet threads can share one gate.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

/// At most one `allow` per interval returns `Some`.
#[derive(Debug)]
pub struct Throttle {
    start: Instant,
    interval_ms: u64,
    /// Milliseconds after `start` before which nothing more is allowed (0: never allowed yet).
    next_ms: AtomicU64,
    held_back: AtomicU64,
}

impl Throttle {
    /// A gate that opens at most once per `interval` (at least 1 ms).
    pub fn new(interval: Duration) -> Self {
        Self {
            start: Instant::now(),
            interval_ms: u64::try_from(interval.as_millis())
                .unwrap_or(u64::MAX)
                .max(1),
            next_ms: AtomicU64::new(0),
            held_back: AtomicU64::new(0),
        }
    }

    /// [`Throttle::allow_at`] now.
    pub fn allow(&self) -> Option<u64> {
        self.allow_at(Instant::now())
    }

    /// Whether an event at `now` may be logged: `Some(n)` with the `n` events held back since
    /// the last one allowed, else `None` (and this one is counted as held back).
    pub fn allow_at(&self, now: Instant) -> Option<u64> {
        // +1 so that an event at `start` is distinct from "never allowed".
        let at = u64::try_from(now.saturating_duration_since(self.start).as_millis())
            .unwrap_or(u64::MAX)
            .saturating_add(1);
        let next = self.next_ms.load(Relaxed);
        if at >= next
            && self
                .next_ms
                .compare_exchange(next, at.saturating_add(self.interval_ms), Relaxed, Relaxed)
                .is_ok()
        {
            return Some(self.held_back.swap(0, Relaxed));
        }
        self.held_back.fetch_add(1, Relaxed);
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_once_per_interval_and_counts_what_it_held_back() {
        let t = Throttle::new(Duration::from_secs(1));
        let t0 = t.start;
        assert_eq!(t.allow_at(t0), Some(0));
        assert_eq!(t.allow_at(t0 + Duration::from_millis(10)), None);
        assert_eq!(t.allow_at(t0 + Duration::from_millis(999)), None);
        assert_eq!(t.allow_at(t0 + Duration::from_millis(1001)), Some(2));
        assert_eq!(t.allow_at(t0 + Duration::from_millis(1500)), None);
        assert_eq!(t.allow_at(t0 + Duration::from_secs(5)), Some(1));
        // A clock that steps back (another thread's older `now`) is held back, not a panic.
        assert_eq!(t.allow_at(t0), None);
    }

    #[test]
    fn one_of_many_threads_gets_through() {
        let t = std::sync::Arc::new(Throttle::new(Duration::from_secs(3600)));
        let now = Instant::now();
        let allowed: usize = (0..4)
            .map(|_| {
                let t = std::sync::Arc::clone(&t);
                std::thread::spawn(move || (0..1000).filter(|_| t.allow_at(now).is_some()).count())
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|h| h.join().unwrap())
            .sum();
        assert_eq!(allowed, 1);
        assert_eq!(t.held_back.load(Relaxed), 3999);
    }
}
