//! Shared generators for dnsfence's criterion benchmarks (realistic pattern sets and names).
#![forbid(unsafe_code)]
