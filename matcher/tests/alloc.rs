//! Lookups allocate nothing: a counting global allocator watches a warm lookup loop.

use dnsfence_matcher::{MatcherBuilder, Name, Pattern, RuleId};

#[global_allocator]
static GLOBAL: dnsfence_testkit::CountingAllocator = dnsfence_testkit::CountingAllocator;

#[test]
fn lookups_do_not_allocate() {
    let mut builder = MatcherBuilder::new();
    let patterns = [
        "api.stripe.com",
        "*.s3.amazonaws.com",
        "**.cilium.io",
        "api-*.x.io",
        "*",
    ];
    for (i, p) in patterns.iter().enumerate() {
        builder.add(Pattern::parse(p).unwrap(), RuleId(i as u32 * 100));
    }
    for i in 0..1000 {
        builder.add(
            Pattern::parse(&format!("host{i}.example.com")).unwrap(),
            RuleId(i % 7),
        );
    }
    let matcher = builder.build();
    let wires: Vec<Vec<u8>> = [
        "API.stripe.com",
        "b.s3.amazonaws.com",
        "a.b.cilium.io",
        "host7.example.com",
        "api-1.x.io",
        "nope.org",
        ".",
    ]
    .iter()
    .map(|t| Name::from_text(t).unwrap().wire().to_vec())
    .collect();
    let mut set = matcher.rule_set();
    let mut hits = 0usize;

    let before = dnsfence_testkit::allocations();
    for _ in 0..1000 {
        for wire in &wires {
            let name = Name::from_wire(wire).unwrap();
            hits += usize::from(matcher.is_match(&name));
            matcher.lookup_into(&name, &mut set);
            hits += set.len();
            matcher.for_each_match(&name, |_| hits += 1);
            hits += usize::from(matcher.is_match_text("host999.example.com"));
        }
    }
    let after = dnsfence_testkit::allocations();
    assert!(hits > 0);
    assert_eq!(
        after - before,
        0,
        "lookups allocated {} times",
        after - before
    );
}
