//! Snapshot queries allocate nothing: a counting global allocator watches a warm query loop.

use std::net::SocketAddr;
use std::path::Path;

use dnsfence_matcher::Name;
use dnsfence_policy::{DnsVerdict, Endpoints, PolicySet, Proto, Snapshot};

#[global_allocator]
static GLOBAL: dnsfence_testkit::CountingAllocator = dnsfence_testkit::CountingAllocator;

#[test]
fn queries_do_not_allocate() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata");
    let policies = PolicySet::load(&[dir.join("spec-example.yaml")]).unwrap();
    let endpoints = Endpoints::load(&dir.join("spec-example-endpoints.yaml")).unwrap();
    let snapshot = Snapshot::compile(&policies, &endpoints);
    let uploader = snapshot.endpoint_by_name("team-a/uploader").unwrap();
    let other = snapshot.endpoint_by_name("team-a/other").unwrap();
    let kube_dns: SocketAddr = "10.96.0.10:53".parse().unwrap();
    let names: Vec<Name> = ["bbc.co.uk", "api.stripe.com", "x.s3.amazonaws.com", "nope."]
        .iter()
        .map(|n| Name::from_text(n).unwrap())
        .collect();
    let mut rules = snapshot.rule_set();
    let source = "fd00::5".parse().unwrap();

    let before = dnsfence_testkit::allocations();
    let mut allowed = 0;
    for _ in 0..100 {
        for name in &names {
            let ep = snapshot.endpoint_by_ip(source).unwrap();
            assert_eq!(snapshot.endpoint_by_cgroup("/workloads/uploader"), Some(ep));
            if snapshot.dns_verdict(ep, kube_dns, Proto::Udp, name) == DnsVerdict::Allow {
                allowed += 1;
            }
            if snapshot.fqdn_rules(ep, name, &mut rules) {
                allowed += snapshot.rule_ports(rules.as_slice()[0]).len();
            }
            let v = snapshot.dns_verdict(other, kube_dns, Proto::Tcp, name);
            assert_eq!(v, DnsVerdict::Unrestricted);
        }
    }
    let after = dnsfence_testkit::allocations();
    assert_eq!(after - before, 0, "queries allocated");
    assert_eq!(uploader, snapshot.endpoint_by_ip(source).unwrap());
    assert_eq!(allowed, 100 * (4 + 2));
}
