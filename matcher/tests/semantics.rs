//! One line per sentence of `shared/spec/policy.md` "Names and patterns": the pattern set, the
//! name, and whether it matches.

use dnsfence_matcher::{MatcherBuilder, Name, Pattern, RuleId};

/// Compiles `patterns` (matchPattern syntax) and checks `name` against them, both from text and
/// from wire format, and against each pattern's Cilium regex.
fn check(patterns: &[&str], name: &str, expect: bool) {
    let mut builder = MatcherBuilder::new();
    for (i, p) in patterns.iter().enumerate() {
        builder.add(Pattern::parse(p).unwrap(), RuleId(i as u32));
    }
    let matcher = builder.build();
    assert_eq!(
        matcher.is_match_text(name),
        expect,
        "patterns {patterns:?} name {name:?} (text)"
    );
    if let Ok(n) = Name::from_text(name) {
        assert_eq!(
            matcher.is_match_wire(n.wire()),
            expect,
            "{patterns:?} {name:?} (wire)"
        );
        let mut upper = n.wire().to_vec();
        upper.make_ascii_uppercase();
        assert_eq!(
            matcher.is_match_wire(&upper),
            expect,
            "{patterns:?} {name:?} (WIRE)"
        );
    }
}

#[test]
fn exact_names() {
    check(&["api.stripe.com"], "api.stripe.com", true);
    check(&["api.stripe.com"], "api.stripe.com.", true);
    check(&["api.stripe.com."], "api.stripe.com", true);
    check(&["api.stripe.com"], "API.Stripe.COM", true);
    check(&["API.STRIPE.COM"], "api.stripe.com", true);
    check(&["api.stripe.com"], "stripe.com", false);
    check(&["api.stripe.com"], "x.api.stripe.com", false);
    check(&["api.stripe.com"], "api.stripe.co", false);
    check(&["api.stripe.com"], "api-stripe.com", false);
    check(&["_srv._tcp.example.com"], "_srv._tcp.example.com", true);
    check(&["  api.stripe.com  "], " api.stripe.com ", true);
}

#[test]
fn star_within_one_label() {
    check(&["*.cilium.io"], "sub.cilium.io", true);
    check(&["*.cilium.io"], "cilium.io", false);
    check(&["*.cilium.io"], "a.b.cilium.io", false);
    check(&["part*ial.com"], "partial.com", true);
    check(&["part*ial.com"], "part-extra-ial.com", true);
    check(&["part*ial.com"], "part.ial.com", false);
    check(&["part*ial.com"], "partxial.org", false);
    check(&["*cilium.io"], "cilium.io", true);
    check(&["*cilium.io"], "wwwcilium.io", true);
    check(&["*cilium.io"], "www.cilium.io", false);
    check(&["api-*.example.com"], "api-eu.example.com", true);
    check(&["api-*.example.com"], "api.example.com", false);
    check(&["a.*.example.com"], "a.b.example.com", true);
    check(&["a.*.example.com"], "a.example.com", false);
    check(&["a.*.example.com"], "b.b.example.com", false);
    check(&["*.*.io"], "a.b.io", true);
    check(&["*.*.io"], "b.io", false);
    check(&["a*b*c.io"], "abc.io", true);
    check(&["a*b*c.io"], "a-x-b-y-c.io", true);
    check(&["a*b*c.io"], "acb.io", false);
    check(&["www.*"], "www.com", true);
    check(&["www.*"], "www.a.com", false);
}

#[test]
fn double_star_prefix_any_depth() {
    check(&["**.cilium.io"], "a.cilium.io", true);
    check(&["**.cilium.io"], "a.b.cilium.io", true);
    check(&["**.cilium.io"], "a.b.c.d.e.cilium.io", true);
    check(&["**.cilium.io"], "cilium.io", false);
    check(&["**.cilium.io"], "xcilium.io", false);
    check(&["**.*.io"], "a.b.io", true);
    check(&["**.*.io"], "b.io", false);
    check(&["**.api-*.io"], "x.y.api-1.io", true);
    check(&["**.api-*.io"], "api-1.io", false);
}

#[test]
fn double_star_elsewhere_is_a_single_star() {
    check(&["a**b.io"], "ab.io", true);
    check(&["a**b.io"], "axxb.io", true);
    check(&["a**b.io"], "a.b.io", false);
    check(&["x.**.io"], "x.y.io", true);
    check(&["x.**.io"], "x.y.z.io", false);
    check(&["***.io"], "a.io", true);
    check(&["***.io"], "a.b.io", false);
    check(&["**x.io"], "abx.io", true);
    check(&["**x.io"], "a.bx.io", false);
}

#[test]
fn all_stars_match_everything_and_the_root() {
    for p in ["*", "**", "*.", "**.", "***"] {
        check(&[p], "example.com", true);
        check(&[p], "a.b.c.d.example.com", true);
        check(&[p], ".", true);
        check(&[p], "", true);
        check(&[p], "_dmarc.x", true);
        // Invalid names match nothing, not even `*`.
        check(&[p], "a..b", false);
        check(&[p], "bad name.com", false);
    }
    // A star pattern with an inner dot is not "all stars".
    check(&["*.*"], ".", false);
    check(&["*.*"], "a.b", true);
    check(&["*.*"], "a", false);
}

#[test]
fn apex_is_never_matched_by_a_wildcard() {
    check(&["*.x"], "x", false);
    check(&["**.x"], "x", false);
    check(&["*.x", "x"], "x", true);
    check(&["**.x", "x"], "x", true);
}

#[test]
fn root_is_matched_only_by_all_stars() {
    check(&["com"], ".", false);
    check(&["*.com"], ".", false);
    check(&["**.com"], ".", false);
}

#[test]
fn invalid_names_match_nothing() {
    let l64 = "a".repeat(64);
    let long = vec!["abcdefghi"; 26].join(".");
    for name in [
        "a..b.io", ".b.io", "a b.io", "a*b.io", "a/b.io", "é.io", &l64, &long,
    ] {
        check(&["**.io", "*", "a*b.io"], name, false);
    }
}

#[test]
fn overlapping_patterns_report_every_rule() {
    let mut builder = MatcherBuilder::new();
    for (p, id) in [
        ("api.example.com", 1),
        ("*.example.com", 2),
        ("**.example.com", 3),
        ("api*.example.com", 4),
        ("*", 5),
        ("other.com", 6),
        ("*.example.com", 7),
        ("api.example.com", 1),
    ] {
        builder.add(Pattern::parse(p).unwrap(), RuleId(id));
    }
    let m = builder.build();
    let name = Name::from_text("API.example.com").unwrap();
    let ids: Vec<u32> = m.matches(&name).into_iter().map(|r| r.0).collect();
    assert_eq!(ids, [1, 2, 3, 4, 5, 7]);
    let mut set = m.rule_set();
    m.lookup_into(&name, &mut set);
    assert_eq!(set.len(), 6);
    assert!(set.contains(RuleId(7)) && !set.contains(RuleId(6)));
    let deep = Name::from_text("a.api.example.com").unwrap();
    let ids: Vec<u32> = m.matches(&deep).into_iter().map(|r| r.0).collect();
    assert_eq!(ids, [3, 5]);
    m.lookup_into(&deep, &mut set);
    assert_eq!(set.len(), 2);
}

#[test]
fn empty_matcher_matches_nothing() {
    let m = MatcherBuilder::new().build();
    assert!(!m.is_match_text("example.com"));
    assert!(!m.is_match_text("."));
}

#[test]
fn match_name_rejects_stars() {
    assert!(Pattern::parse_name("*.cilium.io").is_err());
    assert!(Pattern::parse_name("cilium.io").is_ok());
}

#[test]
fn many_globs_at_one_node_agree_with_the_regexes() {
    // Hundreds of mid-label globs under one domain: the lookup only tries the globs whose
    // first byte can match, so check every kind of first byte against the reference.
    let mut patterns = Vec::new();
    for i in 0..300 {
        let c = char::from(b'a' + (i % 26) as u8);
        patterns.push(match i % 4 {
            0 => format!("{c}{i}-*.svc.example.com"),
            1 => format!("*-{c}{i}.svc.example.com"),
            2 => format!("{c}*{i}.svc.example.com"),
            _ => format!("*{c}*.svc.example.com"),
        });
    }
    let mut builder = MatcherBuilder::new();
    let mut regexes = Vec::new();
    for (i, p) in patterns.iter().enumerate() {
        let parsed = Pattern::parse(p).unwrap();
        regexes.push(regex::Regex::new(&parsed.to_anchored_regex()).unwrap());
        builder.add(parsed, RuleId(i as u32));
    }
    let matcher = builder.build();
    for i in 0..400 {
        let c = char::from(b'a' + (i % 26) as u8);
        for name in [
            format!("{c}{i}-x.svc.example.com"),
            format!("y-{c}{i}.svc.example.com"),
            format!("{c}zz{i}.svc.example.com"),
            format!("0{c}0.svc.example.com"),
            format!("{i}.svc.example.com"),
        ] {
            let n = Name::from_text(&name).unwrap();
            let fqdn = n.to_string();
            let expect: Vec<u32> = regexes
                .iter()
                .enumerate()
                .filter(|(_, re)| re.is_match(&fqdn))
                .map(|(i, _)| i as u32)
                .collect();
            let got: Vec<u32> = matcher.matches(&n).into_iter().map(|r| r.0).collect();
            assert_eq!(got, expect, "{name}");
        }
    }
}
