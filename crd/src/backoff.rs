//! The one backoff every retry of both binaries uses — waits that double
//! from a first to a cap ([`Doubling`]) — and how every watch backs off
//! while the API server is away ([`watch`]): 0.8 s doubling to 10 s, each wait stretched by a random
//! 0–100 % (so N agents do not come back in step), started afresh once the
//! watch delivers again or after 2 minutes without errors.
//!
//! client-go's reflector caps at 30 s, which with the same jitter means up to
//! a minute between attempts: measured, a 30 s kube-apiserver restart then
//! took 50–67 s to recover from. 10 s (up to 20 s) keeps each watch's
//! attempts during an outage to about one per 10–20 s — for 1,000 agents
//! about 70 connection attempts a second, below what their kubelets' lease
//! renewals cost the API server every second anyway (one per node per 10 s).

use std::time::Duration;

use kube::runtime::utils::ResetTimerBackoff;
use kube::runtime::watcher::ExponentialBackoff;

/// The first wait after an error.
pub const FIRST: Duration = Duration::from_millis(800);
/// The longest wait before jitter.
pub const CAP: Duration = Duration::from_secs(10);
/// Errors this long ago no longer lengthen the next wait.
const FORGET_AFTER: Duration = Duration::from_secs(120);

/// Waits that double from `first` up to `cap`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Doubling {
    pub first: Duration,
    pub cap: Duration,
}

impl Doubling {
    pub const fn new(first: Duration, cap: Duration) -> Self {
        Doubling { first, cap }
    }

    /// The wait after the `n`-th failure in a row (1-based): first, 2×,
    /// 4×, … up to the cap.
    pub fn after(&self, n: u32) -> Duration {
        let factor = 1u32
            .checked_shl(n.saturating_sub(1).min(16))
            .unwrap_or(u32::MAX);
        self.first.saturating_mul(factor).min(self.cap)
    }

    /// The wait after `previous` (`None`: the first failure).
    pub fn next(&self, previous: Option<Duration>) -> Duration {
        previous.map_or(self.first, |w| w.saturating_mul(2).min(self.cap))
    }
}

/// A fresh backoff for one watch (`WatchStreamExt::backoff`): [`FIRST`]
/// doubling to [`CAP`], jittered (so the watches of many nodes do not come
/// back in step), forgotten after two quiet minutes. backon's, because
/// kube's watcher takes it.
pub fn watch() -> ResetTimerBackoff<ExponentialBackoff> {
    let exponential = backon::ExponentialBuilder::default()
        .with_min_delay(FIRST)
        .with_max_delay(CAP)
        .with_factor(2.0)
        .with_jitter()
        .without_max_times();
    ResetTimerBackoff::new(exponential.into(), FORGET_AFTER)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubling_waits_reach_the_cap_and_stay() {
        let d = Doubling::new(Duration::from_secs(1), Duration::from_secs(10));
        let after: Vec<u64> = (1..=6).map(|n| d.after(n).as_secs()).collect();
        assert_eq!(after, [1, 2, 4, 8, 10, 10]);
        assert_eq!(d.after(u32::MAX), d.cap);
        let mut wait = None;
        let next: Vec<u64> = (0..6)
            .map(|_| {
                wait = Some(d.next(wait));
                wait.unwrap().as_secs()
            })
            .collect();
        assert_eq!(next, after);
    }

    #[test]
    fn waits_double_from_the_first_to_the_cap_with_at_most_as_much_again() {
        let waits: Vec<Duration> = watch().take(8).collect();
        let mut base = FIRST;
        for wait in waits {
            assert!(wait >= base && wait <= base * 2, "{wait:?} for {base:?}");
            base = (base * 2).min(CAP);
        }
    }
}
