//! How long to wait before trying again something that failed: a store that refused a
//! flush, a PostgreSQL that is not up yet at start, a repair that did not finish.

use std::time::Duration;

/// Longest wait between retries while the store is failing.
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// First wait after a failure.
const FIRST_BACKOFF: Duration = Duration::from_millis(100);

/// Exponential backoff with jitter: about 100 ms, 200 ms, 400 ms ... up to 30 s, each
/// scaled by a random factor in [0.5, 1) so many instances do not retry in step.
pub fn backoff(failures: u32) -> Duration {
    let exp = FIRST_BACKOFF.saturating_mul(1 << failures.saturating_sub(1).min(16));
    exp.min(MAX_BACKOFF).mul_f64(0.5 + fastrand::f64() / 2.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_capped() {
        for _ in 0..100 {
            let first = backoff(1);
            assert!(first >= Duration::from_millis(50) && first < FIRST_BACKOFF);
            let fourth = backoff(4);
            assert!(fourth >= Duration::from_millis(400) && fourth < Duration::from_millis(800));
            assert!(backoff(u32::MAX) < MAX_BACKOFF);
            assert!(backoff(u32::MAX) >= MAX_BACKOFF / 2);
        }
    }
}
