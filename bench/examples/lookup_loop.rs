//! A fixed lookup loop for instruction counts under callgrind (stable across noisy machines).
//!
//! `lookup_loop PATTERNS REPS MODE` builds the generated set of PATTERNS, then looks up 4,096
//! generated names REPS times with MODE `match` (`is_match`) or `rules` (`lookup_into`).
//! Instructions per name = (Ir at REPS - Ir at 0 reps) / (REPS × 4096), e.g.
//! `valgrind --tool=callgrind target/release/examples/lookup_loop 100000 10 rules`.

use std::hint::black_box;

use dnsfence_bench::{build, patterns, queries};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [n, reps, mode] = args.as_slice() else {
        eprintln!("usage: lookup_loop PATTERNS REPS match|rules");
        std::process::exit(2);
    };
    let n: usize = n.parse().expect("PATTERNS is a count");
    let reps: usize = reps.parse().expect("REPS is a count");
    let rules = match mode.as_str() {
        "match" => false,
        "rules" => true,
        _ => panic!("MODE is match or rules"),
    };
    let ps = patterns(n, 0x00d5_fe5e);
    let q = queries(&ps, 4096, 0x00d5_fe5e + 1);
    let m = build(&ps);
    let mut out = m.rule_set();
    let mut count = 0usize;
    for _ in 0..reps {
        for name in &q.names {
            if rules {
                m.lookup_into(black_box(name), &mut out);
                count += out.len();
            } else {
                count += usize::from(m.is_match(black_box(name)));
            }
        }
    }
    black_box(count);
}
