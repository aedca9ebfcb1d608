//! Waiting for the cluster to get somewhere: a poll with a deadline, never a
//! bare sleep.

use std::future::Future;
use std::time::{Duration, Instant};

/// Calls `check` every 100 ms until it gives `Some`, and returns that; panics
/// saying what did not happen once `within` has passed.
pub async fn eventually<T, F, Fut>(what: &str, within: Duration, check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    eventually_or(what, within, check, String::new).await
}

/// [`eventually`], and on timeout the panic adds what `describe` says (the
/// state of the bed, for a reader of the failed run).
pub async fn eventually_or<T, F, Fut>(
    what: &str,
    within: Duration,
    mut check: F,
    describe: impl FnOnce() -> String,
) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + within;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        if Instant::now() >= deadline {
            panic!("{what}: not within {within:?}\n{}", describe());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
