//! Fixed-bucket latency histograms: filled by a shard on its query path (a short walk over
//! constant bounds, no allocation, no lock), copied out with the shard's counters and summed
//! across shards when the metrics are scraped.

use std::time::Duration;

/// Upper bounds of the buckets, in microseconds (the last bucket is everything above).
/// From 50 µs (a loopback upstream) to 2.5 s (beyond any sane upstream timeout).
pub const BOUNDS_US: [u64; 15] = [
    50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000,
    1_000_000, 2_500_000,
];

/// A latency histogram: counts per bucket of [`BOUNDS_US`] (not cumulative; the last is
/// `+Inf`) and the sum of the observations.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Latency {
    /// Observations per bucket: `buckets[i]` counts those `<= BOUNDS_US[i]` and above the
    /// previous bound; `buckets[15]` those above the last bound.
    pub buckets: [u64; BOUNDS_US.len() + 1],
    /// Sum of the observations, in microseconds.
    pub sum_us: u64,
}

impl Latency {
    /// Counts one observation.
    #[inline]
    pub fn observe(&mut self, d: Duration) {
        let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        let i = BOUNDS_US
            .iter()
            .position(|&bound| us <= bound)
            .unwrap_or(BOUNDS_US.len());
        self.buckets[i] += 1;
        self.sum_us = self.sum_us.saturating_add(us);
    }

    /// Number of observations.
    pub fn count(&self) -> u64 {
        self.buckets.iter().sum()
    }

    /// Adds `other`'s observations (summing shards).
    pub fn add(&mut self, other: &Latency) {
        for (a, b) in self.buckets.iter_mut().zip(other.buckets) {
            *a += b;
        }
        self.sum_us = self.sum_us.saturating_add(other.sum_us);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn observations_land_in_the_bucket_of_their_bound() {
        let mut h = Latency::default();
        for us in [
            0,
            50,
            51,
            100,
            999,
            1_000,
            1_001,
            2_500_000,
            2_500_001,
            u64::MAX / 4,
        ] {
            h.observe(Duration::from_micros(us));
        }
        let mut want = [0u64; 16];
        want[0] = 2; // 0, 50
        want[1] = 2; // 51, 100
        want[4] = 2; // 999, 1000
        want[5] = 1; // 1001
        want[14] = 1; // 2.5 s
        want[15] = 2; // above
        assert_eq!(h.buckets, want);
        assert_eq!(h.count(), 10);
        let mut sum = Latency::default();
        sum.add(&h);
        sum.add(&h);
        assert_eq!(sum.count(), 20);
        assert_eq!(sum.buckets[15], 4);
    }
}
