//! The corpus of public Cilium policies (`tests/corpus/`, sources in its README): every file
//! validates, or is rejected only for a feature dnsfence does not enforce yet (the allow-list
//! below), and the well-known examples compile to the verdicts Cilium gives them.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use dnsfence_matcher::Name;
use dnsfence_policy::{
    DnsVerdict, EndpointId, Endpoints, PolicySet, PortProto, PortProtocol, Proto, Snapshot,
};

/// Features dnsfence still rejects on purpose (policy/README.md, "Rejected on purpose"), as
/// `(feature, text every error line about it contains)`. A corpus file may be rejected only
/// with error lines that each contain one of these texts: a regression in a supported field
/// (toFQDNs, toEndpoints, toCIDR, ...) makes an error line outside this list and fails the test.
const UNSUPPORTED: &[(&str, &str)] = &[
    ("toGroups", ".toGroups: unsupported field"),
    ("toRequires", ".toRequires: unsupported field"),
    ("toNodes", ".toNodes: unsupported field"),
];

/// Files that are invalid upstream, with the error they must get: Kubernetes would refuse them
/// too. `from_nodes.yaml` spells `apiversion` in lower case.
const INVALID_UPSTREAM: &[(&str, &str)] = &[(
    "cilium/examples/policies/l3/entities/from_nodes.yaml",
    "apiVersion: required field missing",
)];

/// At least this many corpus files validate (policy/README.md records the count; raise it
/// when a feature of `UNSUPPORTED` lands).
const MIN_VALID: usize = 74;

/// A small registry for the compiled verdicts: the workloads the examples select, kube-dns,
/// and one endpoint no example selects.
const ENDPOINTS: &str = "\
endpoints:
- name: test-app
  labels: {app: test-app}
  ips: [10.0.0.1]
- name: my-service
  labels: {app: myService}
  ips: [10.0.0.2]
- name: mediabot
  labels: {org: empire, class: mediabot}
  ips: [10.0.0.3]
- name: frontend
  labels: {role: frontend}
  ips: [10.0.0.4]
- name: backend
  labels: {role: backend}
  ips: [10.0.0.5]
- name: restricted
  labels: {role: restricted}
  ips: [10.0.0.6]
- name: bystander
  labels: {app: bystander}
  ips: [10.0.0.7]
- name: kube-dns
  namespace: kube-system
  labels: {k8s-app: kube-dns}
  ips: [10.96.0.10]
- name: app2
  labels: {id: app2}
  ips: [10.0.0.8]
services:
- name: myservice
  ips: [10.96.7.7]
  backends: [192.0.2.77]
";

fn corpus_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/corpus")
}

fn yaml_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    entries.sort();
    for path in entries {
        if path.is_dir() {
            yaml_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
            out.push(path);
        }
    }
}

fn endpoints() -> Endpoints {
    Endpoints::from_yaml(Path::new("corpus-endpoints.yaml"), ENDPOINTS).unwrap()
}

/// Loads one corpus file (path relative to `tests/corpus/`) and compiles it.
fn snapshot(relative: &str) -> Snapshot {
    let path = corpus_root().join(relative);
    let text = std::fs::read_to_string(&path).unwrap();
    let policies = PolicySet::from_yaml(Path::new(relative), &text)
        .unwrap_or_else(|e| panic!("{relative} should validate:\n{e}"));
    Snapshot::compile(&policies, &endpoints())
}

#[test]
fn every_corpus_file_validates_or_names_an_unsupported_feature() {
    let root = corpus_root();
    let mut files = Vec::new();
    yaml_files(&root, &mut files);
    assert!(files.len() >= 75, "corpus missing? {} files", files.len());
    let endpoints = endpoints();
    let mut valid = 0;
    let mut with_notes = 0;
    let mut by_feature: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    let mut unexpected = Vec::new();
    for path in &files {
        let relative = path
            .strip_prefix(&root)
            .unwrap()
            .to_string_lossy()
            .into_owned();
        let text = std::fs::read_to_string(path).unwrap();
        let errors = match PolicySet::from_yaml(Path::new(&relative), &text) {
            Ok(policies) => {
                // It compiles, too (no panic on any shape the corpus has).
                let _ = Snapshot::compile(&policies, &endpoints);
                valid += 1;
                if !policies.notes().is_empty() {
                    with_notes += 1;
                }
                continue;
            }
            Err(errors) => errors,
        };
        let upstream = INVALID_UPSTREAM
            .iter()
            .find(|(file, _)| *file == relative)
            .map(|&(_, text)| text);
        for line in errors.to_string().lines() {
            if let Some(text) = upstream
                && line.contains(text)
            {
                by_feature
                    .entry("invalid upstream")
                    .or_default()
                    .push(relative.clone());
                continue;
            }
            match UNSUPPORTED.iter().find(|(_, text)| line.contains(text)) {
                Some((feature, _)) => by_feature
                    .entry(feature)
                    .or_default()
                    .push(relative.clone()),
                None => unexpected.push(line.to_string()),
            }
        }
    }
    for list in by_feature.values_mut() {
        list.dedup();
    }
    let rejected: std::collections::BTreeSet<&String> = by_feature.values().flatten().collect();
    println!(
        "corpus: {} files, {valid} valid ({with_notes} with notes), {} rejected",
        files.len(),
        rejected.len()
    );
    for (feature, list) in &by_feature {
        println!("  {feature}: {} ({})", list.len(), list.join(", "));
    }
    assert!(
        unexpected.is_empty(),
        "rejected for a reason outside the allow-list of unsupported features:\n{}",
        unexpected.join("\n")
    );
    assert_eq!(valid + rejected.len(), files.len());
    assert!(
        valid >= MIN_VALID,
        "only {valid} files validate (was {MIN_VALID})"
    );
}

fn ep(s: &Snapshot, name: &str) -> EndpointId {
    s.endpoint_by_name(name)
        .unwrap_or_else(|| panic!("no endpoint {name}"))
}

fn name(text: &str) -> Name {
    Name::from_text(text).unwrap()
}

fn l3(s: &Snapshot, from: &str, to: &str, port: u16, proto: PortProtocol) -> Option<bool> {
    s.l3_verdict(ep(s, from), to.parse::<IpAddr>().unwrap(), port, proto)
}

fn dns(s: &Snapshot, from: &str, server: &str, proto: Proto, qname: &str) -> DnsVerdict {
    let server = server.parse::<SocketAddr>().unwrap();
    let verdict = s.dns_verdict(ep(s, from), server, proto, &name(qname));
    // The data plane's one walk (`judge`) agrees with the two lookups it replaces.
    let mut judged = s.rule_set();
    let one_walk = s.judge(ep(s, from), server, proto, &name(qname), &mut judged);
    assert_eq!(one_walk, verdict, "judge vs dns_verdict: {from} {qname}");
    let mut walked = s.rule_set();
    s.fqdn_rules(ep(s, from), &name(qname), &mut walked);
    let sorted = |r: &dnsfence_matcher::RuleSet| {
        let mut v = r.as_slice().to_vec();
        v.sort();
        v
    };
    assert_eq!(
        sorted(&judged),
        sorted(&walked),
        "judge vs fqdn_rules: {from} {qname}"
    );
    verdict
}

/// The ports of the toFQDNs rules that allow `from` to reach `qname`; None when no rule does.
fn fqdn_ports(s: &Snapshot, from: &str, qname: &str) -> Option<Vec<PortProto>> {
    let mut rules = s.rule_set();
    if !s.fqdn_rules(ep(s, from), &name(qname), &mut rules) {
        return None;
    }
    let mut ports: Vec<PortProto> = rules
        .as_slice()
        .iter()
        .flat_map(|&r| s.rule_ports(r).iter().copied())
        .collect();
    ports.sort();
    Some(ports)
}

/// Cilium's canonical toFQDNs example: kube-dns through `toEndpoints` with a DNS rule, and a
/// `toFQDNs` name on every port.
#[test]
fn fqdn_example_allows_kube_dns_and_the_name() {
    use DnsVerdict::{Allow, Deny, Unrestricted};
    let s = snapshot("cilium/examples/policies/l3/fqdn/fqdn.yaml");
    let q = "my-remote-service.com";
    // (server, transport, name, verdict): protocol ANY covers UDP and TCP; matchPattern "*"
    // lets any name be resolved, but only through kube-dns on port 53.
    let cases = [
        ("10.96.0.10:53", Proto::Udp, q, Allow),
        ("10.96.0.10:53", Proto::Tcp, q, Allow),
        ("10.96.0.10:53", Proto::Udp, "x.org", Allow),
        ("8.8.8.8:53", Proto::Udp, q, Deny),
        ("10.96.0.10:5353", Proto::Udp, q, Deny),
    ];
    for (server, proto, qname, verdict) in cases {
        assert_eq!(
            dns(&s, "default/test-app", server, proto, qname),
            verdict,
            "{server} {proto:?} {qname}"
        );
    }
    // The name is allowed on every port (no toPorts: no port list); another name is not.
    assert_eq!(fqdn_ports(&s, "default/test-app", q), Some(vec![]));
    assert_eq!(fqdn_ports(&s, "default/test-app", "other.com"), None);
    // Nothing else is reachable by L3 rules: the DNS rule is the DNS layer's.
    assert_eq!(
        l3(&s, "default/test-app", "1.2.3.4", 443, PortProtocol::Tcp),
        None
    );
    // An endpoint the policy does not select is not enforced.
    assert!(!s.is_restricted(ep(&s, "default/bystander")));
    assert_eq!(
        dns(&s, "default/bystander", "8.8.8.8:53", Proto::Udp, q),
        Unrestricted
    );
}

/// The getting-started example: `specs` with a toFQDNs rule on 443/TCP for the mediabot and
/// kube-dns for every endpoint of the namespace (`matchLabels: {}`).
#[test]
fn getting_started_dns_port_example() {
    let s = snapshot("cilium/examples/policies/getting-started/dns-port.yaml");
    let tcp443 = PortProto {
        port: 443,
        end_port: 443,
        proto: PortProtocol::Tcp,
    };
    assert_eq!(
        fqdn_ports(&s, "default/mediabot", "api.twitter.com"),
        Some(vec![tcp443])
    );
    assert_eq!(fqdn_ports(&s, "default/mediabot", "twitter.com"), None);
    // The second spec selects every endpoint of `default`: DNS through kube-dns, no names.
    assert!(s.is_restricted(ep(&s, "default/bystander")));
    assert_eq!(
        dns(
            &s,
            "default/bystander",
            "10.96.0.10:53",
            Proto::Udp,
            "a.com"
        ),
        DnsVerdict::Allow
    );
    assert_eq!(fqdn_ports(&s, "default/bystander", "api.twitter.com"), None);
    // kube-dns itself lives in kube-system: a CNP of `default` does not select it.
    assert!(!s.is_restricted(ep(&s, "kube-system/kube-dns")));
}

#[test]
fn cidr_example_honours_except() {
    let s = snapshot("cilium/examples/policies/l3/cidr/cidr.yaml");
    let tcp = PortProtocol::Tcp;
    assert_eq!(
        l3(&s, "default/my-service", "20.1.1.1", 80, tcp),
        Some(true)
    );
    assert_eq!(l3(&s, "default/my-service", "20.1.1.2", 80, tcp), None);
    assert_eq!(
        l3(&s, "default/my-service", "10.1.2.3", 5432, tcp),
        Some(true)
    );
    // 10.96.0.0/12 is excepted from 10.0.0.0/8.
    assert_eq!(l3(&s, "default/my-service", "10.96.0.1", 80, tcp), None);
}

#[test]
fn egress_deny_example_wins_over_to_entities_all() {
    let s = snapshot("cilium/examples/policies/l3/egress-deny/egress-deny.yaml");
    let tcp = PortProtocol::Tcp;
    // toEntities: all allows everything ...
    assert_eq!(l3(&s, "default/frontend", "1.2.3.4", 443, tcp), Some(true));
    // ... but the backend (egressDeny toEndpoints) stays denied.
    assert_eq!(l3(&s, "default/frontend", "10.0.0.5", 80, tcp), Some(false));
}

#[test]
fn port_range_and_default_deny_examples() {
    let s = snapshot("cilium/examples/policies/l4/l4_port_range.yaml");
    let (tcp, udp) = (PortProtocol::Tcp, PortProtocol::Udp);
    // toPorts alone: every destination, ports 80-444/TCP.
    assert_eq!(l3(&s, "default/my-service", "9.9.9.9", 80, tcp), Some(true));
    assert_eq!(
        l3(&s, "default/my-service", "9.9.9.9", 444, tcp),
        Some(true)
    );
    assert_eq!(l3(&s, "default/my-service", "9.9.9.9", 445, tcp), None);
    assert_eq!(l3(&s, "default/my-service", "9.9.9.9", 80, udp), None);

    let s = snapshot("cilium/examples/policies/l3/egress-default-deny/egress-default-deny.yaml");
    assert!(s.is_restricted(ep(&s, "default/restricted")));
    assert_eq!(l3(&s, "default/restricted", "9.9.9.9", 80, tcp), None);
    assert_eq!(
        dns(
            &s,
            "default/restricted",
            "10.96.0.10:53",
            Proto::Udp,
            "a.com"
        ),
        DnsVerdict::Deny
    );
}

/// An L7 entry (here TLS `serverNames`) is left out: the endpoint is under default deny and
/// the port stays closed (fail closed for that rule).
#[test]
fn sni_example_fails_closed() {
    let s = snapshot("cilium/examples/policies/l4/l4_sni.yaml");
    assert!(s.is_restricted(ep(&s, "default/my-service")));
    assert_eq!(
        l3(&s, "default/my-service", "1.1.1.1", 443, PortProtocol::Tcp),
        None
    );
}

/// Cilium's `toServices` example reaches the service the registry knows (its ClusterIP and
/// backends, every port) and nothing else; the examples of what dnsfence accepts but cannot
/// enforce load with a note, and the rule allows nothing: mutual authentication, and a
/// `port: "0"` (every port) entry with a `listener` (L7).
#[test]
fn services_auth_and_listener_examples() {
    let notes = |relative: &str| {
        let path = corpus_root().join(relative);
        let text = std::fs::read_to_string(&path).unwrap();
        PolicySet::from_yaml(Path::new(relative), &text)
            .unwrap_or_else(|e| panic!("{relative} should validate:\n{e}"))
            .notes()
            .join("\n")
    };
    let p = "cilium/examples/policies/";
    let services = format!("{p}l3/service/service.yaml");
    assert_eq!(notes(&services), "");
    let s = snapshot(&services);
    for (ip, want) in [
        ("10.96.7.7", Some(true)),
        ("192.0.2.77", Some(true)),
        ("10.0.0.1", None),
    ] {
        assert_eq!(
            l3(&s, "default/app2", ip, 8080, PortProtocol::Tcp),
            want,
            "{ip}"
        );
    }
    let auth = notes(&format!("{p}auth/auth.yaml"));
    assert!(
        auth.contains("auth.type: null: dnsfence cannot do mutual authentication"),
        "{auth}"
    );
    let listener = notes(&format!("{p}l4/wildcard_port_listener.yaml"));
    assert!(listener.contains("listener: not enforced"), "{listener}");
    let s = snapshot(&format!("{p}l4/wildcard_port_listener.yaml"));
    assert!(s.is_restricted(ep(&s, "default/my-service")));
    for port in [80, 443, 8080] {
        assert_eq!(
            l3(&s, "default/my-service", "8.8.8.8", port, PortProtocol::Tcp),
            None
        );
    }
}

/// Cilium's ICMP example: echo requests (IPv4 type 8, IPv6 type 128) to anywhere, nothing else.
#[test]
fn icmp_example_allows_echo_requests_only() {
    let s = snapshot("cilium/examples/policies/l4/icmp.yaml");
    let at = |to: &str, t: u16, proto| l3(&s, "default/my-service", to, t, proto);
    assert_eq!(at("8.8.8.8", 8, PortProtocol::Icmp), Some(true));
    assert_eq!(at("2001:db8::1", 128, PortProtocol::Icmp6), Some(true));
    assert_eq!(at("8.8.8.8", 13, PortProtocol::Icmp), None);
    assert_eq!(at("2001:db8::1", 8, PortProtocol::Icmp6), None);
    assert_eq!(at("8.8.8.8", 8, PortProtocol::Tcp), None);
}
