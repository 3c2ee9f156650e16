//! Differential test: the compiled trie against one anchored regex per pattern, built the way
//! Cilium builds them, on random pattern sets and names.

use dnsfence_matcher::{MatcherBuilder, Name, Pattern, RuleId};
use proptest::prelude::*;
use regex::Regex;

/// Labels drawn from a small alphabet so that random names often hit random patterns.
fn label() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => prop::sample::select(vec!["a", "b", "ab", "ba", "api", "x-1", "_t", "com", "io"])
            .prop_map(str::to_owned),
        1 => "[-a-b0-9_]{1,5}",
        1 => "[-A-Za-z0-9_]{60,63}",
    ]
}

fn name() -> impl Strategy<Value = String> {
    (
        prop::collection::vec(label(), 0..6),
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(|(labels, dot, upper)| {
            let mut s = labels.join(".");
            if dot {
                s.push('.');
            }
            if upper {
                s = s.to_uppercase();
            }
            s
        })
}

fn pattern_label() -> impl Strategy<Value = String> {
    prop_oneof![
        6 => prop::sample::select(vec!["a", "b", "ab", "api", "x-1", "_t", "com", "io"])
            .prop_map(str::to_owned),
        2 => Just("*".to_owned()),
        1 => Just("**".to_owned()),
        2 => prop::sample::select(vec!["a*", "*b", "a*b", "*a*", "ap*i", "x-*", "**a"])
            .prop_map(str::to_owned),
    ]
}

fn pattern() -> impl Strategy<Value = String> {
    (
        prop::collection::vec(pattern_label(), 1..5),
        0..8u8,
        any::<bool>(),
    )
        .prop_map(|(labels, prefix, dot)| {
            let mut s = labels.join(".");
            if prefix == 0 {
                s = format!("**.{s}");
            }
            if dot {
                s.push('.');
            }
            s
        })
}

/// The reference verdict: a name that is not valid matches nothing; otherwise Cilium's regex.
fn reference(regexes: &[(Regex, u32)], name: &str) -> Vec<u32> {
    let Ok(parsed) = Name::from_text(name) else {
        return Vec::new();
    };
    let fqdn = parsed.to_string();
    let mut ids: Vec<u32> = regexes
        .iter()
        .filter(|(re, _)| re.is_match(&fqdn))
        .map(|(_, id)| *id)
        .collect();
    ids.sort_unstable();
    ids.dedup();
    ids
}

proptest! {
    // 400 pattern sets x 30 names = 12,000 generated names per run.
    #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

    #[test]
    fn trie_agrees_with_cilium_regexes(
        patterns in prop::collection::vec((pattern(), 0..6u32), 1..12),
        names in prop::collection::vec(name(), 30),
    ) {
        let mut builder = MatcherBuilder::new();
        let mut regexes = Vec::new();
        for (p, id) in &patterns {
            let parsed = Pattern::parse(p).unwrap();
            regexes.push((Regex::new(&parsed.to_anchored_regex()).unwrap(), *id));
            builder.add(parsed, RuleId(*id));
        }
        let matcher = builder.build();
        for name in &names {
            let expect = reference(&regexes, name);
            let got: Vec<u32> = Name::from_text(name)
                .map(|n| matcher.matches(&n).into_iter().map(|r| r.0).collect())
                .unwrap_or_default();
            prop_assert_eq!(&got, &expect, "patterns {:?} name {:?}", patterns, name);
            prop_assert_eq!(matcher.is_match_text(name), !expect.is_empty());
        }
    }

    #[test]
    fn wire_and_text_agree(name in name()) {
        if let Ok(n) = Name::from_text(&name) {
            let again = Name::from_wire(n.wire()).unwrap();
            prop_assert_eq!(&again, &n);
            prop_assert_eq!(Name::from_text(&n.to_string()).unwrap(), n);
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..300)) {
        let mut builder = MatcherBuilder::new();
        builder.add(Pattern::parse("*").unwrap(), RuleId(0));
        let m = builder.build();
        let _ = m.is_match_wire(&bytes);
        let _ = Name::parse_wire_prefix(&bytes);
        let _ = Pattern::parse(&String::from_utf8_lossy(&bytes));
    }
}
