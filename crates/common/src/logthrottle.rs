//! Warnings that repeat for one reason (a server down, a flood of bad messages) are written
//! once per interval per reason, with the number left out since the last line: an outage
//! costs a line every few seconds, not thousands a second, and the count still shows its size.

use std::{
    sync::{Mutex, PoisonError},
    time::{Duration, Instant},
};

/// One line per reason per interval. Reasons are few and fixed (`&'static str`), so they are
/// kept in a short list rather than a map.
#[derive(Debug)]
pub struct LogThrottle {
    interval: Duration,
    reasons: Mutex<Vec<Reason>>,
}

#[derive(Debug)]
struct Reason {
    key: &'static str,
    written_at: Instant,
    left_out: u64,
}

impl LogThrottle {
    /// A throttle writing at most one line per reason every `interval`; usable in a `static`.
    pub const fn new(interval: Duration) -> Self {
        Self {
            interval,
            reasons: Mutex::new(Vec::new()),
        }
    }

    /// Whether a line for `reason` should be written now: `Some(left_out)`, the lines for it
    /// left out since the last one written, or `None` to leave this one out (it is counted).
    pub fn admit(&self, reason: &'static str) -> Option<u64> {
        self.admit_at(reason, Instant::now())
    }

    fn admit_at(&self, reason: &'static str, now: Instant) -> Option<u64> {
        // Never held across an await; a poisoned lock only means a panic while counting.
        let mut reasons = self.reasons.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(entry) = reasons.iter_mut().find(|entry| entry.key == reason) else {
            reasons.push(Reason {
                key: reason,
                written_at: now,
                left_out: 0,
            });
            return Some(0);
        };
        if now.saturating_duration_since(entry.written_at) < self.interval {
            entry.left_out += 1;
            return None;
        }
        entry.written_at = now;
        Some(std::mem::take(&mut entry.left_out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_reason_per_interval_with_the_count_left_out() {
        let throttle = LogThrottle::new(Duration::from_secs(10));
        let start = Instant::now();
        let at = |ms: u64| start + Duration::from_millis(ms);

        assert_eq!(
            throttle.admit_at("lookup", at(0)),
            Some(0),
            "the first is written"
        );
        for ms in 1..=1700 {
            assert_eq!(throttle.admit_at("lookup", at(ms)), None);
        }
        // Another reason has its own allowance.
        assert_eq!(throttle.admit_at("rpc", at(5)), Some(0));
        assert_eq!(throttle.admit_at("rpc", at(6)), None);
        // Still inside the interval.
        assert_eq!(throttle.admit_at("lookup", at(9_999)), None);
        // Past it: written, with what was left out in between.
        assert_eq!(throttle.admit_at("lookup", at(10_000)), Some(1701));
        assert_eq!(throttle.admit_at("lookup", at(10_001)), None);
        assert_eq!(throttle.admit_at("rpc", at(10_005)), Some(1));
        // A quiet reason is written at once, with nothing left out.
        assert_eq!(throttle.admit_at("rpc", at(60_000)), Some(0));
        assert_eq!(throttle.admit_at("lookup", at(60_000)), Some(1));
    }
}
