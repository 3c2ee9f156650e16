//! Writes a generated pattern set and query names as text files, one a line (for timing
//! `dnsfence match --patterns-file`).
//!
//! `cargo run -p dnsfence-bench --release --example gen_files -- PATTERNS NAMES DIR`
//! writes `DIR/patterns-PATTERNS.txt` and `DIR/names-NAMES.txt` (names drawn from that set).

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::PathBuf;

use dnsfence_bench::{patterns, queries};

fn main() -> std::io::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [n_patterns, n_names, dir] = args.as_slice() else {
        eprintln!("usage: gen_files PATTERNS NAMES DIR");
        std::process::exit(2);
    };
    let n_patterns: usize = n_patterns.parse().expect("PATTERNS is a count");
    let n_names: usize = n_names.parse().expect("NAMES is a count");
    let dir = PathBuf::from(dir);
    let ps = patterns(n_patterns, 0x00d5_fe5e);
    let mut out = BufWriter::new(File::create(
        dir.join(format!("patterns-{n_patterns}.txt")),
    )?);
    for p in &ps {
        writeln!(out, "{}", p.text)?;
    }
    out.flush()?;
    if n_names > 0 {
        let q = queries(&ps, n_names, 0x00d5_fe5e + 1);
        let mut out = BufWriter::new(File::create(dir.join(format!("names-{n_names}.txt")))?);
        for name in &q.text {
            writeln!(out, "{name}")?;
        }
        out.flush()?;
    }
    Ok(())
}
