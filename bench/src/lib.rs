//! Shared generators for dnsfence's criterion benchmarks (realistic pattern sets and names).
//!
//! Everything here is deterministic: the same seed gives the same patterns and names on every
//! machine, so figures from different runs measure the same work.
//!
//! The pattern sets imitate real FQDN allow lists: a few hundred to a few thousand registrable
//! domains under a realistic mix of TLDs (a handful of them far more popular than the rest), many
//! hosts per domain, often under shared zones (`svc`, `eu-west-1`, `prod`), and this mix of kinds:
//!
//! | kind | share | example |
//! | --- | --- | --- |
//! | exact name | 50 % | `api-12.eu-west-1.stripe.com` |
//! | `*.suffix` | 25 % | `*.svc.datadoghq.com` |
//! | `**.suffix` | 15 % | `**.prod.github.io` |
//! | mid-label glob | 10 % | `api-*.svc.example.com`, `*-cdn.vilora.io` |
#![forbid(unsafe_code)]

use std::collections::HashSet;

use dnsfence_matcher::{Matcher, MatcherBuilder, Name, Pattern, RuleId};

/// Well-known registrable domains that head every domain list (the busiest ones in allow lists).
const KNOWN_DOMAINS: &[&str] = &[
    "amazonaws.com",
    "googleapis.com",
    "github.com",
    "githubusercontent.com",
    "cloudflare.com",
    "stripe.com",
    "datadoghq.com",
    "sentry.io",
    "slack.com",
    "docker.io",
    "npmjs.org",
    "pypi.org",
    "azure.com",
    "windows.net",
    "okta.com",
    "auth0.com",
    "twilio.com",
    "fastly.net",
    "akamaiedge.net",
    "cloudfront.net",
    "gcr.io",
    "quay.io",
    "hashicorp.com",
    "elastic.co",
    "mongodb.net",
    "snowflakecomputing.com",
    "salesforce.com",
    "atlassian.net",
    "openai.com",
    "segment.io",
];

/// TLDs with cumulative weights out of 100 (`com` dominates, as in real lists).
const TLDS: &[(&str, u32)] = &[
    ("com", 45),
    ("net", 55),
    ("org", 62),
    ("io", 72),
    ("dev", 75),
    ("cloud", 77),
    ("co.uk", 80),
    ("com.au", 82),
    ("de", 85),
    ("fr", 87),
    ("jp", 89),
    ("ai", 92),
    ("app", 95),
    ("sh", 97),
    ("co", 100),
];

const SYLLABLES: &[&str] = &[
    "ab", "ac", "al", "an", "ar", "ba", "be", "bi", "bo", "ca", "co", "da", "de", "di", "el", "en",
    "er", "fa", "fi", "ga", "go", "ha", "in", "io", "ka", "ki", "la", "li", "lo", "ma", "me", "mi",
    "mo", "na", "ne", "no", "or", "pa", "pe", "po", "ra", "re", "ri", "ro", "sa", "se", "si", "so",
    "ta", "te", "ti", "to", "ul", "un", "va", "ve", "vi", "za", "zo", "tr", "st", "qu",
];

const DOMAIN_SUFFIXES: &[&str] = &[
    "", "", "", "labs", "hq", "app", "-cdn", "cloud", "io", "-api",
];

/// Host label words, as seen in real allow lists.
const WORDS: &[&str] = &[
    "api",
    "www",
    "cdn",
    "auth",
    "login",
    "static",
    "img",
    "assets",
    "app",
    "m",
    "mail",
    "smtp",
    "s3",
    "storage",
    "db",
    "cache",
    "metrics",
    "logs",
    "events",
    "ingest",
    "telemetry",
    "gateway",
    "registry",
    "docker",
    "pkg",
    "git",
    "ci",
    "build",
    "status",
    "hooks",
    "ws",
    "push",
    "upload",
    "download",
    "media",
    "video",
    "search",
    "ads",
    "track",
    "sso",
    "id",
    "accounts",
    "billing",
    "pay",
    "checkout",
    "shop",
    "docs",
    "help",
    "support",
    "blog",
    "dev",
    "test",
    "beta",
    "stage",
    "edge",
    "lb",
    "node",
    "worker",
    "queue",
    "stream",
    "web",
    "admin",
    "console",
    "portal",
];

/// Zone labels shared by many hosts of one domain.
const ZONES: &[&str] = &[
    "svc",
    "internal",
    "prod",
    "staging",
    "eu-west-1",
    "us-east-1",
    "us-west-2",
    "ap-south-1",
    "k8s",
    "edge",
    "corp",
    "data",
    "eu",
    "us",
];

/// Characters a `*` may stand for (lowercase: query case is varied separately).
const NAME_CHARS: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789-_";

/// Which kind of pattern a generated line is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `matchName`: an exact name.
    Exact,
    /// `*.suffix`.
    Star,
    /// `**.suffix`.
    DoubleStar,
    /// A glob inside a label: `api-*.svc.example.com`.
    MidGlob,
}

/// One generated pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GenPattern {
    /// The pattern text (lowercase, no trailing dot).
    pub text: String,
    /// Its kind: [`Kind::Exact`] ones are `matchName`s, the others `matchPattern`s.
    pub kind: Kind,
}

impl GenPattern {
    /// Parses the pattern as the field it belongs to (`matchName` for exact names).
    pub fn parse(&self) -> Pattern {
        let parsed = match self.kind {
            Kind::Exact => Pattern::parse_name(&self.text),
            _ => Pattern::parse(&self.text),
        };
        parsed.unwrap_or_else(|e| panic!("generated pattern must be valid: {e}"))
    }
}

/// The registrable domains a set of `n` patterns is spread over: about `2·√n`, at least 4, the
/// well-known ones first (a few hundred at 10k patterns, about 2,000 at 1M).
fn domains(n: usize, rng: &mut fastrand::Rng) -> Vec<String> {
    let count = ((n as f64).sqrt() * 2.0).ceil().max(4.0) as usize;
    let mut seen = HashSet::new();
    let mut out = Vec::with_capacity(count);
    for d in KNOWN_DOMAINS.iter().take(count) {
        seen.insert(d.to_string());
        out.push(d.to_string());
    }
    while out.len() < count {
        let mut label = String::new();
        for _ in 0..rng.usize(2..=4) {
            label.push_str(pick(rng, SYLLABLES));
        }
        label.push_str(pick(rng, DOMAIN_SUFFIXES));
        let roll = rng.u32(0..100);
        let tld = TLDS
            .iter()
            .find(|&&(_, cum)| roll < cum)
            .map_or("com", |&(t, _)| t);
        let domain = format!("{label}.{tld}");
        if seen.insert(domain.clone()) {
            out.push(domain);
        }
    }
    out
}

fn pick<'a>(rng: &mut fastrand::Rng, items: &[&'a str]) -> &'a str {
    items[rng.usize(..items.len())]
}

/// A domain index skewed towards the head of the list: a few domains get most hosts.
fn skewed(rng: &mut fastrand::Rng, len: usize) -> usize {
    let x = rng.f64();
    ((x * x * x) * len as f64) as usize % len
}

/// A host label: a word, often with a number, a region or a second word.
fn host_label(rng: &mut fastrand::Rng) -> String {
    let word = pick(rng, WORDS);
    match rng.u32(0..100) {
        0..30 => word.to_owned(),
        30..60 => format!("{word}-{}", rng.u32(1..1000)),
        60..70 => format!("{word}{}", rng.u32(0..100)),
        70..85 => format!("{word}-{}", pick(rng, ZONES)),
        _ => format!("{word}-{}", pick(rng, WORDS)),
    }
}

/// A suffix under `domain`: the domain itself, a zone of it, or two zones.
fn zoned(rng: &mut fastrand::Rng, domain: &str) -> String {
    match rng.u32(0..100) {
        0..45 => domain.to_owned(),
        45..85 => format!("{}.{domain}", pick(rng, ZONES)),
        _ => format!("{}.{}.{domain}", pick(rng, ZONES), pick(rng, ZONES)),
    }
}

/// `n` distinct patterns from `seed`: 50 % exact names, 25 % `*.suffix`, 15 % `**.suffix`,
/// 10 % mid-label globs, over about `2·√n` registrable domains.
pub fn patterns(n: usize, seed: u64) -> Vec<GenPattern> {
    let mut rng = fastrand::Rng::with_seed(seed);
    let domains = domains(n, &mut rng);
    let mut seen = HashSet::with_capacity(n);
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let kind = match rng.u32(0..100) {
            0..50 => Kind::Exact,
            50..75 => Kind::Star,
            75..90 => Kind::DoubleStar,
            _ => Kind::MidGlob,
        };
        // Retry a duplicate with the same kind, so duplicates do not skew the mix.
        for _ in 0..1000 {
            let text = pattern_text(&mut rng, kind, &domains);
            if seen.insert(text.clone()) {
                out.push(GenPattern { text, kind });
                break;
            }
        }
    }
    out
}

/// One pattern of `kind` under a domain drawn from `domains`.
fn pattern_text(rng: &mut fastrand::Rng, kind: Kind, domains: &[String]) -> String {
    let domain = &domains[skewed(rng, domains.len())];
    match kind {
        Kind::Exact => {
            let suffix = zoned(rng, domain);
            format!("{}.{suffix}", host_label(rng))
        }
        Kind::Star => {
            let suffix = if rng.bool() {
                zoned(rng, domain)
            } else {
                format!("{}.{}", host_label(rng), zoned(rng, domain))
            };
            format!("*.{suffix}")
        }
        Kind::DoubleStar => {
            let suffix = if rng.u32(0..3) == 0 {
                zoned(rng, domain)
            } else {
                format!("{}.{}", host_label(rng), zoned(rng, domain))
            };
            format!("**.{suffix}")
        }
        Kind::MidGlob => {
            let suffix = zoned(rng, domain);
            let (a, b) = (pick(rng, WORDS), pick(rng, WORDS));
            let glob = match rng.u32(0..4) {
                0 => format!("{a}-*"),
                1 => format!("*-{a}"),
                2 => format!("{a}*"),
                _ => format!("{a}-*-{b}"),
            };
            format!("{glob}.{suffix}")
        }
    }
}

/// Compiles `patterns`, pattern `i` tagged `RuleId(i)`.
pub fn build(patterns: &[GenPattern]) -> Matcher {
    builder(patterns).build()
}

/// A builder holding `patterns`, pattern `i` tagged `RuleId(i)` (to time `build` alone).
pub fn builder(patterns: &[GenPattern]) -> MatcherBuilder {
    let mut builder = MatcherBuilder::new();
    for (i, p) in patterns.iter().enumerate() {
        builder.add(p.parse(), RuleId(i as u32));
    }
    builder
}

/// Random `[-a-z0-9_]` text of a length in `len`.
fn filler(rng: &mut fastrand::Rng, len: std::ops::RangeInclusive<usize>) -> String {
    let n = rng.usize(len);
    (0..n)
        .map(|_| char::from(NAME_CHARS[rng.usize(..NAME_CHARS.len())]))
        .collect()
}

/// A name the pattern matches: each `*` replaced by name characters, `**.` by 1-3 labels.
fn instantiate(rng: &mut fastrand::Rng, pattern: &str) -> String {
    let mut out = String::with_capacity(pattern.len() + 16);
    let rest = match pattern.strip_prefix("**.") {
        Some(rest) => {
            for _ in 0..rng.usize(1..=3) {
                out.push_str(&host_label(rng));
                out.push('.');
            }
            rest
        }
        None => pattern,
    };
    for (i, label) in rest.split('.').enumerate() {
        if i > 0 {
            out.push('.');
        }
        if label == "*" {
            // A whole-label star must still produce a non-empty label.
            out.push_str(&host_label(rng));
            continue;
        }
        for part in label.split_inclusive('*') {
            match part.strip_suffix('*') {
                Some(lit) => {
                    out.push_str(lit);
                    out.push_str(&filler(rng, 0..=6));
                }
                None => out.push_str(part),
            }
        }
    }
    out
}

/// A name near the pattern that it usually does not match: a changed host label, an extra or a
/// missing label, another TLD, or an unrelated domain.
fn near_miss(rng: &mut fastrand::Rng, pattern: &str) -> String {
    let hit = instantiate(rng, pattern);
    let (first, rest) = hit.split_once('.').unwrap_or((hit.as_str(), "com"));
    match rng.u32(0..5) {
        0 => format!("{}x{}.{rest}", host_label(rng), rng.u32(0..100)),
        1 => format!("{}.{hit}", filler(rng, 1..=8)),
        2 => rest.to_owned(),
        3 => format!("{first}.{rest}.{}", pick(rng, &["cn", "ru", "xyz", "top"])),
        _ => format!(
            "{}.{}{}.com",
            host_label(rng),
            pick(rng, SYLLABLES),
            pick(rng, SYLLABLES)
        ),
    }
}

/// Randomly upper-cases about a third of the letters (clients send 0x20-mixed case).
fn mix_case(rng: &mut fastrand::Rng, name: &str) -> String {
    name.chars()
        .map(|c| {
            if rng.u32(0..3) == 0 {
                c.to_ascii_uppercase()
            } else {
                c
            }
        })
        .collect()
}

/// Encodes a valid text name (no trailing dot needed) as an uncompressed wire-format name.
pub fn to_wire(text: &str) -> Vec<u8> {
    let text = text.strip_suffix('.').unwrap_or(text);
    let mut wire = Vec::with_capacity(text.len() + 2);
    if !text.is_empty() {
        for label in text.split('.') {
            wire.push(u8::try_from(label.len()).expect("label under 256 bytes"));
            wire.extend_from_slice(label.as_bytes());
        }
    }
    wire.push(0);
    wire
}

/// Query names for a pattern set, in three forms.
#[derive(Debug, Clone)]
pub struct Queries {
    /// As a client wrote them (mixed case, no trailing dot).
    pub text: Vec<String>,
    /// Uncompressed wire form of each.
    pub wire: Vec<Vec<u8>>,
    /// Pre-parsed.
    pub names: Vec<Name>,
    /// Lowercased with a trailing dot: what the regex reference is matched against.
    pub normalized: Vec<String>,
}

/// `n` query names from `seed`: about half are built to match a pattern of `patterns`, the rest
/// are near misses (same domains, other hosts, other TLDs); a third of them in mixed case.
/// Names that would be invalid (too long) are skipped.
pub fn queries(patterns: &[GenPattern], n: usize, seed: u64) -> Queries {
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut q = Queries {
        text: Vec::with_capacity(n),
        wire: Vec::with_capacity(n),
        names: Vec::with_capacity(n),
        normalized: Vec::with_capacity(n),
    };
    while q.text.len() < n {
        let pattern = &patterns[rng.usize(..patterns.len())].text;
        let name = if rng.bool() {
            instantiate(&mut rng, pattern)
        } else {
            near_miss(&mut rng, pattern)
        };
        let text = if rng.u32(0..3) == 0 {
            mix_case(&mut rng, &name)
        } else {
            name
        };
        let Ok(parsed) = Name::from_text(&text) else {
            continue;
        };
        q.wire.push(to_wire(&text));
        q.normalized.push(parsed.to_string());
        q.names.push(parsed);
        q.text.push(text);
    }
    q
}

/// The Cilium-style reference: every pattern's anchored regex joined into one alternation,
/// `^(?:re1|re2|...)$` in effect (each alternative carries its own anchors), matched against the
/// lowercased name with its trailing dot.
///
/// Only the compiled-program size limit is raised (10k patterns exceed the default); the lazy
/// DFA keeps the crate's default cache, as an application that just calls `Regex::new` would.
/// Go's `regexp`, which Cilium uses, has no DFA at all, so this reference is the stronger one.
pub fn cilium_regex(patterns: &[Pattern]) -> regex::Regex {
    let joined: Vec<String> = patterns.iter().map(Pattern::to_anchored_regex).collect();
    regex::RegexBuilder::new(&joined.join("|"))
        .size_limit(1 << 30)
        .build()
        .expect("reference regex compiles")
}

/// The same patterns as a [`regex::RegexSet`] (one anchored regex each), with the same limits
/// as [`cilium_regex`].
pub fn cilium_regex_set(patterns: &[Pattern]) -> regex::RegexSet {
    regex::RegexSetBuilder::new(patterns.iter().map(Pattern::to_anchored_regex))
        .size_limit(1 << 30)
        .build()
        .expect("reference regex set compiles")
}

/// Parses the callgrind gate's baselines file (`NAME INSTRUCTIONS-PER-ITERATION` a line,
/// `#` comments, blank lines). Any other line is an error naming its number: a gate that
/// silently skipped a workload whose baseline it could not read would pass whatever the code
/// did.
pub fn parse_baselines(text: &str) -> Result<std::collections::BTreeMap<String, f64>, String> {
    let mut out = std::collections::BTreeMap::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let fields: Vec<&str> = line.split_whitespace().collect();
        let value = match fields.as_slice() {
            [_, v] => v.parse::<f64>().ok().filter(|v| v.is_finite() && *v > 0.0),
            _ => None,
        };
        let Some(value) = value else {
            return Err(format!(
                "line {}: {line:?} is not `NAME INSTRUCTIONS` (a positive number)",
                i + 1
            ));
        };
        if out.insert(fields[0].to_owned(), value).is_some() {
            return Err(format!("line {}: {} listed twice", i + 1, fields[0]));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod baseline_tests {
    use super::parse_baselines;

    #[test]
    fn baselines_parse_or_fail_with_the_line() {
        let ok = parse_baselines("# c\n\ncore/denied 1722.8\nmatcher/x 5\n").unwrap();
        assert_eq!(ok.len(), 2);
        assert_eq!(ok["core/denied"], 1722.8);
        for bad in [
            "core/denied\n",
            "core/denied 1722.8 extra\n",
            "core/denied lots\n",
            "core/denied -3\n",
            "core/denied NaN\n",
            "a 1\na 2\n",
        ] {
            let e = parse_baselines(bad).unwrap_err();
            assert!(e.starts_with("line "), "{bad:?}: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_and_distinct() {
        let a = patterns(2000, 7);
        assert_eq!(a, patterns(2000, 7));
        assert_ne!(a, patterns(2000, 8));
        let distinct: HashSet<_> = a.iter().map(|p| &p.text).collect();
        assert_eq!(distinct.len(), a.len());
    }

    #[test]
    fn kind_mix_is_as_documented() {
        let ps = patterns(20_000, 1);
        let share = |k| ps.iter().filter(|p| p.kind == k).count() as f64 / ps.len() as f64;
        for (kind, want) in [
            (Kind::Exact, 0.50),
            (Kind::Star, 0.25),
            (Kind::DoubleStar, 0.15),
            (Kind::MidGlob, 0.10),
        ] {
            let got = share(kind);
            assert!((got - want).abs() < 0.03, "{kind:?}: {got:.3}, want {want}");
        }
    }

    #[test]
    fn queries_hit_and_miss() {
        let ps = patterns(5000, 3);
        let m = build(&ps);
        let q = queries(&ps, 4000, 4);
        let hits = q.names.iter().filter(|n| m.is_match(n)).count();
        let rate = hits as f64 / q.names.len() as f64;
        assert!((0.5..0.8).contains(&rate), "hit rate {rate}");
        assert!(
            q.text
                .iter()
                .any(|t| t.bytes().any(|b| b.is_ascii_uppercase()))
        );
        for (wire, name) in q.wire.iter().zip(&q.names) {
            assert_eq!(&Name::from_wire(wire).unwrap(), name);
        }
    }

    #[test]
    fn instantiated_names_match_their_pattern() {
        let ps = patterns(3000, 5);
        let mut rng = fastrand::Rng::with_seed(6);
        for p in &ps {
            let mut b = MatcherBuilder::new();
            b.add(p.parse(), RuleId(0));
            let m = b.build();
            let name = instantiate(&mut rng, &p.text);
            assert!(m.is_match_text(&name), "{} should match {name}", p.text);
        }
    }

    #[test]
    fn trie_agrees_with_regex_reference() {
        let ps = patterns(300, 9);
        let parsed: Vec<Pattern> = ps.iter().map(GenPattern::parse).collect();
        let m = build(&ps);
        let re = cilium_regex(&parsed);
        let set = cilium_regex_set(&parsed);
        let q = queries(&ps, 3000, 10);
        for (name, norm) in q.names.iter().zip(&q.normalized) {
            assert_eq!(m.is_match(name), re.is_match(norm), "{norm}");
            assert_eq!(m.is_match(name), set.is_match(norm), "{norm}");
        }
    }

    #[test]
    fn footprint_within_budget() {
        // The target is at most 150 heap bytes per compiled pattern.
        let ps = patterns(20_000, 11);
        let m = build(&ps);
        let per = m.heap_bytes() as f64 / m.pattern_count() as f64;
        assert!(per <= 150.0, "{per:.1} bytes per pattern");
    }
}
