//! dnsfence-loadgen: open-loop DNS load generator and bundled upstream.
fn main() {}
