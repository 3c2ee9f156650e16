//! Matcher benchmarks: lookup cost per name as the pattern count grows from 10 to 1M, compile
//! time, and the Cilium-style regex reference side by side.
//!
//! Run with `cargo bench -p dnsfence-bench --bench matcher`. Groups:
//! - `lookup/name/N`: `Matcher::is_match` on a pre-parsed [`Name`], N patterns.
//! - `lookup/wire/N`: `Name::from_wire` then `is_match`: the per-query cost in the proxy.
//! - `lookup/rules/N`: `lookup_into` a reused `RuleSet` (every matching rule id).
//! - `build/N`: `MatcherBuilder::build` from parsed patterns; `parse_build/N` from text.
//! - `reference/{trie,alternation,regex_set}/N`: the trie against the Cilium-style regexes.
//! - `cold/wire/N`: `Name::from_wire` then `is_match` over 1M distinct names (drawn from the
//!   100k-pattern set, the same names for every N), each visited once per pass: a working set
//!   far larger than the caches, so lookups pay for the trie's cache misses.
//!
//! Each lookup iteration is one name (cycling through 4,096 generated names, about half hits),
//! so the reported time is the time per name. Setup prints each set's footprint to stderr.

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, SamplingMode, criterion_group, criterion_main};
use dnsfence_bench::{
    GenPattern, build, builder, cilium_regex, cilium_regex_set, patterns, queries,
};
use dnsfence_matcher::{Name, Pattern};

const SEED: u64 = 0x00d5_fe5e;
/// Names cycled through per benchmark (a power of two).
const QUERIES: usize = 4096;

fn lookup(c: &mut Criterion) {
    let mut group = c.benchmark_group("lookup");
    group
        .sample_size(30)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_millis(1500));
    for n in [10, 1_000, 10_000, 100_000, 1_000_000] {
        let ps = patterns(n, SEED);
        let start = Instant::now();
        let m = build(&ps);
        let built = start.elapsed();
        let q = queries(&ps, QUERIES, SEED + 1);
        let hits = q.names.iter().filter(|name| m.is_match(name)).count();
        eprintln!(
            "footprint: {n} patterns, {} nodes, {} heap bytes, {:.1} bytes/pattern, \
             parse+build {:.1} ms, hit rate {:.2}",
            m.node_count(),
            m.heap_bytes(),
            m.heap_bytes() as f64 / n as f64,
            built.as_secs_f64() * 1e3,
            hits as f64 / QUERIES as f64,
        );
        group.bench_function(BenchmarkId::new("name", n), |b| {
            let mut i = 0;
            b.iter(|| {
                i = (i + 1) & (QUERIES - 1);
                m.is_match(black_box(&q.names[i]))
            })
        });
        group.bench_function(BenchmarkId::new("wire", n), |b| {
            let mut i = 0;
            b.iter(|| {
                i = (i + 1) & (QUERIES - 1);
                Name::from_wire(black_box(&q.wire[i])).is_ok_and(|name| m.is_match(&name))
            })
        });
        group.bench_function(BenchmarkId::new("rules", n), |b| {
            let mut out = m.rule_set();
            let mut i = 0;
            b.iter(|| {
                i = (i + 1) & (QUERIES - 1);
                m.lookup_into(black_box(&q.names[i]), &mut out);
                out.len()
            })
        });
    }
    group.finish();
}

fn compile(c: &mut Criterion) {
    let mut group = c.benchmark_group("build");
    group
        .sample_size(10)
        .sampling_mode(SamplingMode::Flat)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3));
    for n in [1_000, 10_000, 100_000] {
        let ps = patterns(n, SEED);
        let b = builder(&ps);
        group.bench_function(BenchmarkId::from_parameter(n), |bench| {
            bench.iter(|| black_box(&b).build())
        });
        group.bench_function(BenchmarkId::new("parse_build", n), |bench| {
            bench.iter(|| build(black_box(&ps)))
        });
    }
    group.finish();
}

fn reference(c: &mut Criterion) {
    let mut group = c.benchmark_group("reference");
    group
        .sample_size(20)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_millis(1500));
    for n in [10, 1_000, 10_000] {
        let ps = patterns(n, SEED);
        let parsed: Vec<Pattern> = ps.iter().map(GenPattern::parse).collect();
        let m = build(&ps);
        let start = Instant::now();
        let re = cilium_regex(&parsed);
        let re_built = start.elapsed();
        let start = Instant::now();
        let set = cilium_regex_set(&parsed);
        let set_built = start.elapsed();
        eprintln!(
            "reference: {n} patterns, alternation built in {:.1} ms, regex set in {:.1} ms",
            re_built.as_secs_f64() * 1e3,
            set_built.as_secs_f64() * 1e3,
        );
        let q = queries(&ps, QUERIES, SEED + 1);
        group.bench_function(BenchmarkId::new("trie", n), |b| {
            let mut i = 0;
            b.iter(|| {
                i = (i + 1) & (QUERIES - 1);
                m.is_match(black_box(&q.names[i]))
            })
        });
        group.bench_function(BenchmarkId::new("alternation", n), |b| {
            let mut i = 0;
            b.iter(|| {
                i = (i + 1) & (QUERIES - 1);
                re.is_match(black_box(&q.normalized[i]))
            })
        });
        group.bench_function(BenchmarkId::new("regex_set", n), |b| {
            let mut i = 0;
            b.iter(|| {
                i = (i + 1) & (QUERIES - 1);
                set.is_match(black_box(&q.normalized[i]))
            })
        });
    }
    group.finish();
}

/// Distinct names of the cold group (a power of two).
const COLD_NAMES: usize = 1 << 20;

fn cold(c: &mut Criterion) {
    let mut group = c.benchmark_group("cold");
    group
        .sample_size(20)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3));
    // The same 1M names for every pattern count: those the 100k set generates (as the
    // `dnsfence match` comparison in bench/RESULTS.md uses them).
    let wire = queries(&patterns(100_000, SEED), COLD_NAMES, SEED + 2).wire;
    for n in [10, 10_000, 100_000, 1_000_000] {
        let m = build(&patterns(n, SEED));
        let hits = wire
            .iter()
            .filter(|w| Name::from_wire(w).is_ok_and(|name| m.is_match(&name)))
            .count();
        eprintln!(
            "cold: {n} patterns, {} heap bytes, hit rate {:.2} over {COLD_NAMES} names",
            m.heap_bytes(),
            hits as f64 / COLD_NAMES as f64
        );
        group.bench_function(BenchmarkId::new("wire", n), |b| {
            let mut i = 0;
            b.iter(|| {
                i = (i + 1) & (COLD_NAMES - 1);
                Name::from_wire(black_box(&wire[i])).is_ok_and(|name| m.is_match(&name))
            })
        });
    }
    group.finish();
}

criterion_group!(benches, lookup, compile, reference, cold);
criterion_main!(benches);
