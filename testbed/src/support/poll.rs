//! Waiting for the cluster to get somewhere: a poll with a deadline, never a
//! bare sleep.

use std::future::Future;
use std::time::{Duration, Instant};

/// Calls `check` every 100 ms until it gives `Some`, and returns that; panics
/// saying what did not happen once `within` has passed.
pub async fn eventually<T, F, Fut>(what: &str, within: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + within;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(Instant::now() < deadline, "{what}: not within {within:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
