//! When to renew this node's certificate, and when to retry after a failure: a small state
//! machine, sans-IO. No clock and no randomness of its own: every input carries `now`, and a
//! failure carries the jitter to apply, so the schedule is tested with made-up times.
//!
//! - The renewal time is `not_before + at% × (not_after − not_before)` (default 50%).
//! - After a failure the next attempt waits a capped exponential backoff with "equal
//!   jitter": `d/2 + jitter × d/2`, where `d = min(cap, min × 2^(failures − 1))`; the cap is
//!   [`Policy::backoff_max`], but at most a tenth of the lifetime, so that a short-lived
//!   certificate is retried about ten times before it expires.
//! - While the certificate is valid, no attempt is ever scheduled past its expiry.

use std::time::{Duration, SystemTime};

/// How the schedule is computed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Policy {
    /// Renew when this percentage of the lifetime has passed (10 to 90).
    pub at_percent: u8,
    /// First retry delay (before jitter).
    pub backoff_min: Duration,
    /// Longest retry delay.
    pub backoff_max: Duration,
}

impl Policy {
    /// The agent's policy: renew at `at_percent`, retries from 1 s doubling to 5 minutes.
    pub fn new(at_percent: u8) -> Self {
        Self {
            at_percent,
            backoff_min: Duration::from_secs(1),
            backoff_max: Duration::from_secs(300),
        }
    }
}

/// The renewal schedule of one certificate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Schedule {
    policy: Policy,
    not_before: SystemTime,
    not_after: SystemTime,
    next: SystemTime,
    failures: u32,
    last_error: Option<String>,
}

impl Schedule {
    /// The schedule of a certificate valid from `not_before` to `not_after`.
    pub fn new(policy: Policy, not_before: SystemTime, not_after: SystemTime) -> Self {
        let mut s = Self {
            policy,
            not_before,
            not_after,
            next: not_before,
            failures: 0,
            last_error: None,
        };
        s.next = s.renew_at();
        s
    }

    fn lifetime(&self) -> Duration {
        self.not_after
            .duration_since(self.not_before)
            .unwrap_or_default()
    }

    /// When the certificate is due for renewal (the policy's percentage of its lifetime).
    pub fn renew_at(&self) -> SystemTime {
        self.not_before + self.lifetime() * u32::from(self.policy.at_percent.min(100)) / 100
    }

    /// When the next attempt is due.
    pub fn next(&self) -> SystemTime {
        self.next
    }

    /// The current certificate's expiry.
    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }

    /// Whether an attempt is due at `now`.
    pub fn due(&self, now: SystemTime) -> bool {
        now >= self.next
    }

    /// How long until the next attempt (zero when due).
    pub fn until_due(&self, now: SystemTime) -> Duration {
        self.next.duration_since(now).unwrap_or_default()
    }

    /// Failed attempts since the last success.
    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// Why the last attempt failed, if it did.
    pub fn last_error(&self) -> Option<&str> {
        self.last_error.as_deref()
    }

    /// The longest retry delay for this certificate.
    pub fn backoff_cap(&self) -> Duration {
        self.policy
            .backoff_max
            .min(self.lifetime() / 10)
            .max(self.policy.backoff_min)
    }

    /// A new certificate is in use (renewed here or replaced from outside): start over.
    pub fn succeeded(&mut self, not_before: SystemTime, not_after: SystemTime) {
        *self = Self::new(self.policy, not_before, not_after);
    }

    /// An attempt at `now` failed for `reason`; `jitter` in `[0, 1]` (clamped) spreads the
    /// retries of many nodes. Returns the delay until the next attempt.
    pub fn failed(&mut self, now: SystemTime, reason: String, jitter: f64) -> Duration {
        self.failures = self.failures.saturating_add(1);
        self.last_error = Some(reason);
        let cap = self.backoff_cap();
        let exp = 2u32.saturating_pow(self.failures.saturating_sub(1).min(31));
        let d = self.policy.backoff_min.saturating_mul(exp).min(cap);
        let jitter = if jitter.is_nan() {
            0.0
        } else {
            jitter.clamp(0.0, 1.0)
        };
        let mut delay = d / 2 + (d / 2).mul_f64(jitter);
        if now < self.not_after {
            // Never past the expiry while the certificate is valid.
            delay = delay.min(self.not_after.duration_since(now).unwrap_or_default());
        }
        self.next = now + delay;
        delay
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const T0: Duration = Duration::from_secs(1_700_000_000);

    fn at(secs: f64) -> SystemTime {
        SystemTime::UNIX_EPOCH + T0 + Duration::from_secs_f64(secs)
    }

    #[test]
    fn renews_at_half_life_and_backs_off_capped() {
        // A 24 h certificate: renewal at 12 h; retries 0.5-1 s, 1-2 s, 2-4 s, ... up to 5 min.
        let mut s = Schedule::new(Policy::new(50), at(0.0), at(86_400.0));
        assert_eq!(s.renew_at(), at(43_200.0));
        assert!(!s.due(at(43_199.0)));
        assert!(s.due(at(43_200.0)));
        let now = at(43_200.0);
        let delays: Vec<Duration> = (0..12)
            .map(|_| s.failed(now, "issuer down".into(), 1.0))
            .collect();
        assert_eq!(delays[0], Duration::from_secs(1));
        assert_eq!(delays[1], Duration::from_secs(2));
        assert_eq!(delays[8], Duration::from_secs(256));
        assert_eq!(delays[9], Duration::from_secs(300));
        assert_eq!(delays[11], Duration::from_secs(300));
        assert_eq!(s.failures(), 12);
        assert_eq!(s.last_error(), Some("issuer down"));
        assert_eq!(s.failed(now, "x".into(), 0.0), Duration::from_secs(150));

        s.succeeded(at(50_000.0), at(136_400.0));
        assert_eq!((s.failures(), s.last_error()), (0, None));
        assert_eq!(s.next(), at(93_200.0));
    }

    #[test]
    fn short_lived_certificates_retry_often_and_never_past_expiry() {
        // 20 s (+2 s backdating): cap 2.2 s.
        let mut s = Schedule::new(Policy::new(50), at(0.0), at(22.0));
        assert_eq!(s.renew_at(), at(11.0));
        assert_eq!(s.backoff_cap(), Duration::from_millis(2200));
        for _ in 0..5 {
            s.failed(at(11.0), "down".into(), 1.0);
        }
        assert_eq!(s.next(), at(13.2));
        // Half a second before expiry, the retry is at the expiry at the latest.
        s.failed(at(21.5), "down".into(), 1.0);
        assert_eq!(s.next(), at(22.0));
        // Past expiry it keeps trying at the capped pace.
        s.failed(at(30.0), "down".into(), 1.0);
        assert_eq!(s.next(), at(32.2));
    }

    proptest! {
        #[test]
        fn schedule_properties(
            start in 0u64..1_000_000,
            life_ms in 10_000u64..(400 * 86_400_000),
            pct in 10u8..=90,
            fails in proptest::collection::vec((0u64..1_000_000_000, 0.0f64..=1.0), 1..40),
        ) {
            let nb = at(start as f64);
            let na = nb + Duration::from_millis(life_ms);
            let mut s = Schedule::new(Policy::new(pct), nb, na);
            let life = Duration::from_millis(life_ms);
            // The renewal time is the percentage of the lifetime, inside the validity.
            let r = s.renew_at().duration_since(nb).unwrap();
            let want = life.as_secs_f64() * f64::from(pct) / 100.0;
            prop_assert!((r.as_secs_f64() - want).abs() < 0.001);
            prop_assert!(s.renew_at() < na);
            prop_assert_eq!(s.next(), s.renew_at());
            let cap = s.backoff_cap();
            prop_assert!(cap <= Duration::from_secs(300));
            prop_assert!(cap <= (life / 10).max(Duration::from_secs(1)));
            let mut now = s.renew_at();
            let mut last_full = Duration::ZERO;
            for (i, (step_ms, jitter)) in fails.iter().enumerate() {
                let d = s.failed(now, "e".into(), *jitter);
                prop_assert_eq!(s.failures() as usize, i + 1);
                prop_assert!(d <= cap);
                prop_assert_eq!(s.next(), now + d);
                if now < na {
                    prop_assert!(s.next() <= na, "retry scheduled past expiry");
                } else {
                    prop_assert!(d >= Duration::from_millis(500));
                }
                // Without jitter the delays never shrink.
                let full = Duration::from_secs(1)
                    .saturating_mul(2u32.saturating_pow((i as u32).min(31)))
                    .min(cap);
                prop_assert!(full >= last_full);
                last_full = full;
                now += Duration::from_millis(*step_ms % (2 * life_ms));
            }
            s.succeeded(now, now + life);
            prop_assert_eq!(s.failures(), 0);
            prop_assert!(s.next() > now);
        }
    }
}
