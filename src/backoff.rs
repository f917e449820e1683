//! Backoff curves: how long to wait before trying something again. Every curve doubles from a
//! first delay up to a cap; the ones that many clients may follow at once (HTTP retries, outage
//! rounds) are also shortened at random, so that clients that failed together do not come back
//! together.
//!
//! Pure functions of the attempt number: nothing here sleeps, reads a clock or draws a random
//! number (the caller passes one in). Deliberately not here: when to give up, how many attempts
//! to make, or what counts as a failure (see `upload::retry` and the callers).

use std::time::Duration;

/// A delay that doubles with each attempt, from `first` up to `cap`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Curve {
    first: Duration,
    cap: Duration,
}

/// The official OpenAI SDKs' wait before a retry of the same request: 0.5 s doubling to 8 s,
/// used with [`Curve::jittered`].
pub(crate) const SDK_RETRY: Curve = Curve::new(Duration::from_millis(500), Duration::from_secs(8));

/// The wait between rounds over every endpoint while all of them are down: 1 s doubling to 60 s,
/// used with [`Curve::jittered`]. The spool is the queue meanwhile.
pub(crate) const OUTAGE: Curve = Curve::new(Duration::from_secs(1), Duration::from_secs(60));

/// Reopening a lost capture device and reconnecting to an MQTT broker: 0.5 s doubling to 30 s,
/// without jitter.
pub(crate) const RECONNECT: Curve = Curve::new(Duration::from_millis(500), Duration::from_secs(30));

/// The most a jittered delay is shortened by: a quarter, as in the SDKs.
const JITTER: f64 = 0.25;

impl Curve {
    pub(crate) const fn new(first: Duration, cap: Duration) -> Curve {
        Curve { first, cap }
    }

    /// The delay before attempt `n` (0 for the first wait): `first · 2^n`, at most the cap.
    pub(crate) fn delay(&self, n: u32) -> Duration {
        self.first.saturating_mul(1u32 << n.min(31)).min(self.cap)
    }

    /// [`Curve::delay`] shortened by up to a quarter: `delay(n) · (1 − 0.25 · random)`, where
    /// `random` is a number in 0..1 drawn by the caller (values outside are clamped, a NaN counts
    /// as 0). Never longer than `delay(n)`.
    pub(crate) fn jittered(&self, n: u32, random: f64) -> Duration {
        let random = if random.is_nan() {
            0.0
        } else {
            random.clamp(0.0, 1.0)
        };
        self.delay(n).mul_f64(1.0 - JITTER * random)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sdk_retries_double_to_8_s_and_jitter_only_shortens() {
        assert_eq!(SDK_RETRY.jittered(0, 0.0), Duration::from_millis(500));
        assert_eq!(SDK_RETRY.jittered(1, 0.0), Duration::from_secs(1));
        assert_eq!(SDK_RETRY.jittered(4, 0.0), Duration::from_secs(8));
        assert_eq!(SDK_RETRY.jittered(40, 0.0), Duration::from_secs(8));
        assert_eq!(SDK_RETRY.jittered(0, 1.0), Duration::from_millis(375));
        assert_eq!(SDK_RETRY.jittered(2, 0.5), Duration::from_millis(1750));
        assert_eq!(SDK_RETRY.jittered(3, 7.0), Duration::from_secs(3));
        assert_eq!(SDK_RETRY.jittered(3, f64::NAN), Duration::from_secs(4));
    }

    #[test]
    fn outage_rounds_double_from_1_s_to_60_s() {
        assert_eq!(OUTAGE.jittered(0, 0.0), Duration::from_secs(1));
        assert_eq!(OUTAGE.jittered(5, 0.0), Duration::from_secs(32));
        assert_eq!(OUTAGE.jittered(6, 0.0), Duration::from_secs(60));
        assert_eq!(OUTAGE.jittered(u32::MAX, 0.0), Duration::from_secs(60));
        assert_eq!(OUTAGE.jittered(6, 1.0), Duration::from_secs(45));
        assert_eq!(OUTAGE.cap, Duration::from_secs(60));
    }

    #[test]
    fn reconnects_double_from_half_a_second_to_30_s() {
        let ms: Vec<u128> = (0..9).map(|n| RECONNECT.delay(n).as_millis()).collect();
        assert_eq!(
            ms,
            [500, 1000, 2000, 4000, 8000, 16000, 30000, 30000, 30000]
        );
        assert_eq!(RECONNECT.delay(u32::MAX), Duration::from_secs(30));
    }
}
