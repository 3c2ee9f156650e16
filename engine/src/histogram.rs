//! Fixed-bucket latency histograms: filled by a shard on its query path (a short walk over
//! constant bounds, no allocation, no lock), copied out with the shard's counters and summed
//! across shards when the metrics are scraped.

use std::marker::PhantomData;
use std::time::Duration;

/// The bucket bounds of a histogram: 15 upper bounds in nanoseconds (the 16th bucket is
/// everything above).
pub trait Scale {
    /// Upper bounds, ascending, in nanoseconds.
    const BOUNDS_NS: [u64; 15];
}

/// Network round trips: 50 µs (a loopback upstream) to 2.5 s (beyond any sane timeout).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Network;

impl Scale for Network {
    const BOUNDS_NS: [u64; 15] = [
        50_000,
        100_000,
        250_000,
        500_000,
        1_000_000,
        2_500_000,
        5_000_000,
        10_000_000,
        25_000_000,
        50_000_000,
        100_000_000,
        250_000_000,
        500_000_000,
        1_000_000_000,
        2_500_000_000,
    ];
}

/// Work inside the process: 1 µs (a query refused from a warm cache) to 25 ms (a stall).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Local;

impl Scale for Local {
    const BOUNDS_NS: [u64; 15] = [
        1_000, 2_000, 5_000, 10_000, 20_000, 50_000, 100_000, 200_000, 500_000, 1_000_000,
        2_000_000, 5_000_000, 10_000_000, 20_000_000, 25_000_000,
    ];
}

/// A latency histogram on scale `S`: counts per bucket (not cumulative; the last is `+Inf`)
/// and the sum of the observations.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Latency<S> {
    /// Observations per bucket: `buckets[i]` counts those `<= S::BOUNDS_NS[i]` and above the
    /// previous bound; `buckets[15]` those above the last bound.
    pub buckets: [u64; 16],
    /// Sum of the observations, in nanoseconds.
    pub sum_ns: u64,
    scale: PhantomData<S>,
}

impl<S: Scale> Latency<S> {
    /// Counts one observation.
    #[inline]
    pub fn observe(&mut self, d: Duration) {
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        let i = S::BOUNDS_NS
            .iter()
            .position(|&bound| ns <= bound)
            .unwrap_or(S::BOUNDS_NS.len());
        self.buckets[i] += 1;
        self.sum_ns = self.sum_ns.saturating_add(ns);
    }

    /// Number of observations.
    pub fn count(&self) -> u64 {
        self.buckets.iter().sum()
    }

    /// Adds `other`'s observations (summing shards).
    pub fn add(&mut self, other: &Latency<S>) {
        for (a, b) in self.buckets.iter_mut().zip(other.buckets) {
            *a += b;
        }
        self.sum_ns = self.sum_ns.saturating_add(other.sum_ns);
    }

    /// The bounds in seconds with each bucket's count (`+Inf` last), for exposition.
    pub fn seconds(&self) -> impl Iterator<Item = (f64, u64)> + '_ {
        S::BOUNDS_NS
            .iter()
            .map(|&ns| ns as f64 / 1e9)
            .chain([f64::INFINITY])
            .zip(self.buckets)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn observations_land_in_the_bucket_of_their_bound() {
        let mut h = Latency::<Network>::default();
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
        let mut fine = Latency::<Local>::default();
        fine.observe(Duration::from_nanos(1_500));
        fine.observe(Duration::from_nanos(900));
        assert_eq!(fine.buckets[..2], [1, 1]);
        assert_eq!(fine.sum_ns, 2_400);
        let s: Vec<(f64, u64)> = fine.seconds().collect();
        assert_eq!(s[0], (1e-6, 1));
        assert_eq!(s[15], (f64::INFINITY, 0));
    }
}
