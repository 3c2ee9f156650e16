//! `dnsfence match`: check names against a pattern set, as `shared/spec/interfaces.md` says.

use std::fs::File;
use std::io::{self, BufRead, BufReader, BufWriter, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use dnsfence_matcher::{Matcher, MatcherBuilder, Name, Pattern, RuleId};

/// Arguments of `dnsfence match`.
#[derive(Debug, clap::Args)]
pub struct MatchArgs {
    /// A matchPattern (without `*` it is an exact name). Repeatable.
    #[arg(long = "pattern", value_name = "P")]
    patterns: Vec<String>,
    /// A file of patterns, one a line; blank lines and `#` comments are skipped. Repeatable.
    #[arg(long = "patterns-file", value_name = "FILE")]
    patterns_files: Vec<PathBuf>,
    /// Names to check; without any, names are read from stdin, one a line.
    #[arg(value_name = "NAME")]
    names: Vec<String>,
}

/// Runs the command: exit 0 after printing one verdict a name, 2 on an invalid pattern.
pub fn run(args: &MatchArgs) -> ExitCode {
    let matcher = match compile(args) {
        Ok(matcher) => matcher,
        Err(e) => {
            eprintln!("dnsfence match: {e:#}");
            return ExitCode::from(2);
        }
    };
    match print_verdicts(&matcher, args) {
        Ok(()) => ExitCode::SUCCESS,
        // A closed stdout (`| head`) is the reader's choice, not a failure.
        Err(e)
            if e.downcast_ref::<io::Error>().map(io::Error::kind)
                == Some(io::ErrorKind::BrokenPipe) =>
        {
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("dnsfence match: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn compile(args: &MatchArgs) -> Result<Matcher> {
    let mut builder = MatcherBuilder::new();
    for p in &args.patterns {
        builder.add(Pattern::parse(p)?, RuleId(0));
    }
    for path in &args.patterns_files {
        let file = File::open(path).with_context(|| format!("{}", path.display()))?;
        let mut reader = BufReader::new(file);
        let mut line = String::new();
        let mut number = 0usize;
        loop {
            line.clear();
            let read = reader
                .read_line(&mut line)
                .with_context(|| format!("{}:{}", path.display(), number + 1))?;
            if read == 0 {
                break;
            }
            number += 1;
            let text = line.trim();
            if text.is_empty() || text.starts_with('#') {
                continue;
            }
            let pattern =
                Pattern::parse(text).with_context(|| format!("{}:{number}", path.display()))?;
            builder.add(pattern, RuleId(0));
        }
    }
    Ok(builder.build())
}

fn print_verdicts(matcher: &Matcher, args: &MatchArgs) -> Result<()> {
    let stdout = io::stdout().lock();
    let mut out = BufWriter::with_capacity(1 << 16, stdout);
    let mut verdict = |name: &[u8]| -> io::Result<()> {
        let hit = std::str::from_utf8(name)
            .ok()
            .and_then(|text| Name::from_text(text).ok())
            .is_some_and(|name| matcher.is_match(&name));
        out.write_all(name)?;
        out.write_all(if hit { b"\tmatch\n" } else { b"\tnomatch\n" })
    };
    if args.names.is_empty() {
        let mut input = BufReader::with_capacity(1 << 16, io::stdin().lock());
        let mut line = Vec::with_capacity(256);
        loop {
            line.clear();
            if input.read_until(b'\n', &mut line)? == 0 {
                break;
            }
            let name = line.strip_suffix(b"\n").unwrap_or(&line);
            let name = name.strip_suffix(b"\r").unwrap_or(name);
            verdict(name)?;
        }
    } else {
        for name in &args.names {
            verdict(name.as_bytes())?;
        }
    }
    out.flush()?;
    Ok(())
}
