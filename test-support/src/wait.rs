//! Waiting on conditions with a deadline, never on a fixed sleep.

use std::future::Future;
use std::time::{Duration, Instant};

/// Polls `check` every 20 ms until it holds.
///
/// # Panics
/// When `deadline` passes first, naming `what`.
pub async fn eventually<F, Fut>(what: &str, deadline: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let until = Instant::now() + deadline;
    while !check().await {
        assert!(
            Instant::now() < until,
            "timed out after {deadline:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
