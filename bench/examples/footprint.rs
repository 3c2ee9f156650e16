//! Prints, for each pattern-set size, the compiled matcher's size and a one-shot build time.
//!
//! `cargo run -p dnsfence-bench --release --example footprint [SIZES...]`
//! (sizes default to 10 1000 10000 100000 1000000).

use std::time::Instant;

use dnsfence_bench::{builder, patterns};

fn main() {
    let sizes: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse().expect("sizes are pattern counts"))
        .collect();
    let sizes = if sizes.is_empty() {
        vec![10, 1_000, 10_000, 100_000, 1_000_000]
    } else {
        sizes
    };
    println!("| patterns | nodes | heap bytes | bytes/pattern | parse ms | build ms |");
    println!("| ---: | ---: | ---: | ---: | ---: | ---: |");
    for n in sizes {
        let ps = patterns(n, 0x00d5_fe5e);
        let start = Instant::now();
        let b = builder(&ps);
        let parsed = start.elapsed();
        let start = Instant::now();
        let m = b.build();
        let built = start.elapsed();
        println!(
            "| {n} | {} | {} | {:.1} | {:.1} | {:.1} |",
            m.node_count(),
            m.heap_bytes(),
            m.heap_bytes() as f64 / n as f64,
            parsed.as_secs_f64() * 1e3,
            built.as_secs_f64() * 1e3,
        );
    }
}
