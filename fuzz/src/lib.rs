//! The bodies of dnsfence's fuzz targets, as plain functions.
//!
//! The libFuzzer targets in `fuzz_targets/` (built by cargo-fuzz on nightly) call these, and so
//! do the seeded-random tests below, which run on stable with `cargo test`: both exercise the
//! same checks. Every check is an assertion; a failing input panics.

use dnsfence_matcher::{MatcherBuilder, Name, Pattern, PatternKind, RuleId};
use regex::Regex;

/// Most patterns one lookup input compiles (more only slows the fuzzer down).
pub const MAX_PATTERNS: usize = 16;

/// `Pattern::parse` (and `parse_name`) on any string must not panic. When a pattern parses:
/// its normalised form reparses to the same pattern, `parse_name` agrees with `parse` on
/// star-free input, and its Cilium regex compiles.
pub fn pattern_parse(input: &str) {
    let as_pattern = Pattern::parse(input);
    let as_name = Pattern::parse_name(input);
    match &as_pattern {
        Ok(p) => {
            let again = Pattern::parse(p.as_str())
                .unwrap_or_else(|e| panic!("normalised {:?} no longer parses: {e}", p.as_str()));
            assert_eq!(
                &again, p,
                "normalised form of {input:?} reparses differently"
            );
            assert_eq!(
                again.as_str(),
                p.as_str(),
                "normalisation is not idempotent"
            );
            assert!(
                p.as_str().ends_with('.'),
                "no trailing dot: {:?}",
                p.as_str()
            );
            assert_eq!(
                p.as_str(),
                p.as_str().to_ascii_lowercase(),
                "not lowercased"
            );
            let re = p.to_anchored_regex();
            Regex::new(&re).unwrap_or_else(|e| panic!("regex {re:?} of {input:?}: {e}"));
        }
        Err(e) => {
            // Errors must render and name the pattern.
            assert!(e.to_string().contains("invalid pattern"), "{e}");
        }
    }
    match (&as_pattern, &as_name) {
        (Ok(p), Ok(n)) => assert_eq!(p, n, "parse and parse_name differ on {input:?}"),
        (Err(_), Ok(n)) => panic!("{input:?} is a valid name {n:?} but not a valid pattern"),
        (Ok(p), Err(_)) => assert!(
            input.contains('*'),
            "{input:?} parses as pattern {p:?} but not as a name"
        ),
        (Err(_), Err(_)) => {}
    }
    if let Ok(p) = Pattern::parse_as(input, PatternKind::Name) {
        assert_eq!(Ok(p), as_name);
    }
}

/// Splits `data` into patterns and a name: lines separated by `\n`, the last line is the name,
/// the ones before it (at most [`MAX_PATTERNS`]) patterns; a pattern line starting with `=` is
/// a `matchName`. Invalid lines are skipped (they must still not panic the parser).
///
/// Returns the verdict for the name read as text, when it is a valid name (for test statistics).
pub fn lookup(data: &[u8]) -> Option<bool> {
    let mut lines: Vec<&[u8]> = data.split(|&b| b == b'\n').collect();
    let name_bytes = lines.pop().unwrap_or_default();
    let mut patterns = Vec::new();
    for line in lines.into_iter().take(MAX_PATTERNS) {
        let text = String::from_utf8_lossy(line);
        let parsed = match text.strip_prefix('=') {
            Some(name) => Pattern::parse_name(name),
            None => Pattern::parse(&text),
        };
        if let Ok(p) = parsed {
            patterns.push(p);
        }
    }

    let mut builder = MatcherBuilder::new();
    for (i, p) in patterns.iter().enumerate() {
        builder.add(p.clone(), RuleId(i as u32));
    }
    let matcher = builder.build();
    let regexes: Vec<Regex> = patterns
        .iter()
        .map(|p| Regex::new(&p.to_anchored_regex()).expect("reference regex compiles"))
        .collect();

    // The name bytes as wire format: must not panic; when valid, must agree with the reference.
    let _ = matcher.is_match_wire(name_bytes);
    if let Ok(name) = Name::from_wire(name_bytes) {
        check_name(&matcher, &regexes, &name);
    }
    let _ = Name::parse_wire_prefix(name_bytes);

    // The name bytes as text.
    let Ok(text) = std::str::from_utf8(name_bytes) else {
        return None;
    };
    let by_text = matcher.is_match_text(text);
    let Ok(name) = Name::from_text(text) else {
        assert!(!by_text, "invalid name {text:?} matched");
        return None;
    };
    assert_eq!(by_text, matcher.is_match(&name));
    // Text and wire forms of one name are the same name.
    let from_wire = Name::from_wire(name.wire()).expect("a name's own wire form parses");
    assert_eq!(from_wire, name);
    assert_eq!(matcher.is_match_wire(name.wire()), by_text);
    check_name(&matcher, &regexes, &name);
    Some(by_text)
}

/// The trie's verdict and rule ids for a valid `name` must equal the set of patterns whose
/// Cilium regex matches the lowercased name with its trailing dot.
fn check_name(matcher: &dnsfence_matcher::Matcher, regexes: &[Regex], name: &Name) {
    let text = name.to_string();
    let want: Vec<RuleId> = regexes
        .iter()
        .enumerate()
        .filter(|(_, re)| re.is_match(&text))
        .map(|(i, _)| RuleId(i as u32))
        .collect();
    let got = matcher.matches(name);
    assert_eq!(got, want, "rule ids for {text:?}");
    assert_eq!(
        matcher.is_match(name),
        !want.is_empty(),
        "verdict for {text:?}"
    );
    let mut set = matcher.rule_set();
    matcher.lookup_into(name, &mut set);
    let mut ids = set.as_slice().to_vec();
    ids.sort_unstable();
    assert_eq!(ids, want, "lookup_into for {text:?}");
}

#[cfg(test)]
mod tests {
    //! Seeded-random inputs for the targets, so `cargo test` exercises them on stable. The
    //! alphabets are small so that random patterns and names often meet.

    use super::*;

    const CASES: usize = 5000;

    fn random_text(rng: &mut fastrand::Rng, alphabet: &[&str], max_len: usize) -> String {
        let len = rng.usize(0..=max_len);
        (0..len)
            .map(|_| alphabet[rng.usize(..alphabet.len())])
            .collect()
    }

    #[test]
    fn pattern_parse_random() {
        let mut rng = fastrand::Rng::with_seed(0x5eed_0001);
        let alphabet = [
            "a", "b", "Z", "0", "-", "_", ".", ".", "*", "*", "**.", " ", "\t", "/", "é", "\u{0}",
        ];
        for _ in 0..CASES {
            let s = random_text(&mut rng, &alphabet, 24);
            pattern_parse(&s);
        }
        // Long inputs around the 255-character limit.
        for _ in 0..200 {
            let s = random_text(&mut rng, &["a", "b.", "*", "ab"], 200);
            pattern_parse(&s);
        }
        for s in [
            "", ".", "*", "**", "**.", "*.", "a..b", "**.a", " A.b. ", "a*", "=a",
        ] {
            pattern_parse(s);
        }
    }

    fn random_label(rng: &mut fastrand::Rng, alphabet: &[&str]) -> String {
        let mut label = random_text(rng, alphabet, 4);
        if label.is_empty() {
            label.push('a');
        }
        label
    }

    fn random_input(rng: &mut fastrand::Rng) -> Vec<u8> {
        let pattern_alphabet = ["a", "b", "A", "-", "*", "*", "**"];
        let name_alphabet = ["a", "b", "B", "-", "ab", "ba"];
        let mut input = Vec::new();
        for _ in 0..rng.usize(0..=6) {
            if rng.u32(0..8) == 0 {
                input.push(b'=');
            }
            let mut labels: Vec<String> = (0..rng.usize(1..=4))
                .map(|_| random_label(rng, &pattern_alphabet))
                .collect();
            if rng.u32(0..4) == 0 {
                labels.insert(0, "**".into());
            }
            let tail = if rng.bool() { "." } else { "" };
            input.extend_from_slice(format!("{}{tail}", labels.join(".")).as_bytes());
            input.push(b'\n');
        }
        match rng.u32(0..10) {
            // Sometimes random bytes, sometimes a wire-format name, mostly a text name.
            0 => input.extend((0..rng.usize(0..12)).map(|_| rng.u8(..))),
            1 => {
                for _ in 0..rng.usize(0..=4) {
                    let label = random_label(rng, &name_alphabet);
                    input.push(label.len() as u8);
                    input.extend_from_slice(label.as_bytes());
                }
                input.push(0);
            }
            _ => {
                let labels: Vec<String> = (0..rng.usize(0..=5))
                    .map(|_| random_label(rng, &name_alphabet))
                    .collect();
                input.extend_from_slice(labels.join(".").as_bytes());
            }
        }
        input
    }

    #[test]
    fn lookup_random() {
        let mut rng = fastrand::Rng::with_seed(0x5eed_0002);
        let (mut hits, mut misses) = (0, 0);
        for _ in 0..CASES {
            let input = random_input(&mut rng);
            match lookup(&input) {
                Some(true) => hits += 1,
                Some(false) => misses += 1,
                None => {}
            }
        }
        // The alphabets are small enough that both verdicts are common.
        assert!(
            hits > CASES / 10 && misses > CASES / 10,
            "{hits} hits, {misses} misses"
        );
    }

    #[test]
    fn lookup_known_cases() {
        let cases: &[&[u8]] = &[
            b"",
            b"\n",
            b"*.cilium.io\nsub.cilium.io",
            b"*.cilium.io\ncilium.io",
            b"**.cilium.io\na.b.CILIUM.io.",
            b"part*ial.com\npart-extra-ial.com",
            b"*\n",
            b"**.\n.",
            b"=a.b\n\x01a\x01b\x00",
            b"*.b\n\x01a\x01b\x00",
            b"a\n\xc0\x0c",
        ];
        for case in cases {
            let _ = lookup(case);
        }
    }
}
