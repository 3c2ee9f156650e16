//! Error paths: each file under `testdata/bad*/` lists the errors it must produce, exactly, as
//! `# expect: LINE: reason` lines (`FILE` in a reason stands for the file's own path).

use std::path::{Path, PathBuf};

use crate::{Endpoints, LoadErrors, PolicySet};

fn testdata(dir: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("testdata")
        .join(dir);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no test files in {}", dir.display());
    files
}

fn check_expectations(file: &Path, result: Result<(), LoadErrors>) -> Option<String> {
    let text = std::fs::read_to_string(file).unwrap();
    let shown = file.display().to_string();
    let expected: Vec<String> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# expect: "))
        .map(|l| format!("{shown}:{}", l.replace("FILE", &shown)))
        .collect();
    assert!(!expected.is_empty(), "{shown}: no `# expect:` line");
    let got: Vec<String> = match result {
        Ok(()) => Vec::new(),
        Err(e) => e.errors().iter().map(ToString::to_string).collect(),
    };
    (got != expected).then(|| {
        format!(
            "{shown}\n  expected:\n    {}\n  got:\n    {}",
            expected.join("\n    "),
            got.join("\n    ")
        )
    })
}

#[test]
fn bad_policy_files_report_every_error_at_its_line() {
    let failures: Vec<String> = testdata("bad")
        .iter()
        .filter_map(|f| check_expectations(f, PolicySet::load(std::slice::from_ref(f)).map(|_| ())))
        .collect();
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn bad_endpoints_files_report_every_error_at_its_line() {
    let failures: Vec<String> = testdata("bad-endpoints")
        .iter()
        .filter_map(|f| check_expectations(f, Endpoints::load(f).map(|_| ())))
        .collect();
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

mod semantics {
    use std::net::{IpAddr, SocketAddr};
    use std::path::Path;

    use dnsfence_matcher::Name;

    use crate::{DnsVerdict, Endpoints, PolicySet, Proto, Snapshot};

    const ENDPOINTS: &str = r#"
endpoints:
- {name: uploader, namespace: team-a, labels: {app: uploader, tier: web}, ips: ["10.0.1.5", "fd00::5"], cgroup: /workloads/uploader}
- {name: other, namespace: team-a, labels: {app: other}, ips: ["10.0.1.6"]}
- {name: uploader, namespace: team-b, labels: {app: uploader}, ips: ["10.0.2.5"]}
- {name: batch, namespace: team-b, labels: {app: batch, tier: jobs}, ips: ["10.0.2.6"]}
- {name: kube-dns, namespace: kube-system, labels: {k8s-app: kube-dns}, ips: ["10.96.0.10"]}
- {name: local-dns, namespace: team-a, labels: {app: dns}, ips: ["10.0.1.53"]}
"#;

    const SPEC_EXAMPLE: &str = include_str!("../testdata/spec-example.yaml");

    fn snapshot(policies: &str) -> Snapshot {
        let p =
            PolicySet::from_yaml(Path::new("p.yaml"), policies).unwrap_or_else(|e| panic!("{e}"));
        let e = Endpoints::from_yaml(Path::new("e.yaml"), ENDPOINTS).unwrap();
        Snapshot::compile(&p, &e)
    }

    /// `ep` is `namespace/name`; `server` is `ip:port`.
    fn dns(s: &Snapshot, ep: &str, server: &str, proto: Proto, name: &str) -> DnsVerdict {
        let id = s.endpoint_by_name(ep).unwrap();
        let (server, name) = (server.parse().unwrap(), Name::from_text(name).unwrap());
        let verdict = s.dns_verdict(id, server, proto, &name);
        // The data plane's one walk (`judge`) agrees with the two lookups it replaces.
        let mut judged = s.rule_set();
        assert_eq!(s.judge(id, server, proto, &name, &mut judged), verdict);
        let mut walked = s.rule_set();
        s.fqdn_rules(id, &name, &mut walked);
        let mut a = judged.as_slice().to_vec();
        let mut b = walked.as_slice().to_vec();
        a.sort();
        b.sort();
        assert_eq!(a, b, "judge vs fqdn_rules for {name}");
        verdict
    }

    /// The ports toFQDNs rules open for `name`, as `443/tcp,...` (`*` = all), or `None`.
    fn fqdn(s: &Snapshot, ep: &str, name: &str) -> Option<String> {
        let id = s.endpoint_by_name(ep).unwrap();
        let mut set = s.rule_set();
        if !s.fqdn_rules(id, &Name::from_text(name).unwrap(), &mut set) {
            return None;
        }
        let mut ports: Vec<String> = Vec::new();
        for &rule in set.as_slice() {
            let p = s.rule_ports(rule);
            if p.is_empty() {
                ports.push("*".into());
            }
            ports.extend(p.iter().map(ToString::to_string));
        }
        ports.sort();
        ports.dedup();
        Some(ports.join(","))
    }

    use DnsVerdict::{Allow, Deny, Unrestricted};
    use Proto::{Tcp, Udp};

    #[test]
    fn spec_example_verdicts() {
        let s = snapshot(SPEC_EXAMPLE);
        let kdns = "10.96.0.10:53";
        let cases = [
            ("team-a/uploader", kdns, Udp, "bbc.co.uk", Allow),
            ("team-a/uploader", kdns, Tcp, "BBC.co.uk.", Allow),
            ("team-a/uploader", kdns, Udp, "api.stripe.com", Allow),
            ("team-a/uploader", "8.8.8.8:53", Udp, "bbc.co.uk", Deny), // not kube-dns
            ("team-a/uploader", "10.0.1.53:53", Udp, "bbc.co.uk", Deny), // registered, wrong labels
            ("team-a/uploader", "10.96.0.10:5353", Udp, "bbc.co.uk", Deny), // wrong port
            ("team-a/other", kdns, Udp, "bbc.co.uk", Unrestricted),    // not selected
            ("team-b/uploader", kdns, Udp, "bbc.co.uk", Unrestricted), // CNP confined to team-a
        ];
        for (ep, server, proto, name, want) in cases {
            assert_eq!(
                dns(&s, ep, server, proto, name),
                want,
                "{ep} {server} {proto:?} {name}"
            );
        }
        let fqdn_cases = [
            ("bbc.co.uk", None),
            ("api.stripe.com", Some("443/tcp")),
            ("API.Stripe.com.", Some("443/tcp")),
            ("x.s3.amazonaws.com", Some("443/tcp")),
            ("s3.amazonaws.com", None),
            ("a.b.s3.amazonaws.com", None),
        ];
        for (name, want) in fqdn_cases {
            assert_eq!(fqdn(&s, "team-a/uploader", name).as_deref(), want, "{name}");
        }
        assert_eq!(fqdn(&s, "team-a/other", "api.stripe.com"), None);
        assert!(s.is_restricted(s.endpoint_by_name("team-a/uploader").unwrap()));
        assert!(!s.is_restricted(s.endpoint_by_name("team-a/other").unwrap()));
    }

    /// A CCNP selecting with `selector` that allows all names on UDP/53 to any server.
    fn ccnp_selecting(selector: &str) -> String {
        format!(
            "apiVersion: cilium.io/v2\nkind: CiliumClusterwideNetworkPolicy\nmetadata: {{name: sel}}\n\
             spec:\n  endpointSelector: {selector}\n  egress:\n  - toPorts: [{{ports: [{{port: \"53\", protocol: UDP}}], rules: {{dns: [{{matchName: ok.com}}]}}}}]\n"
        )
    }

    #[test]
    fn selection_by_labels_and_expressions() {
        // (selector, endpoints it must select, in ENDPOINTS order)
        let all = [
            "team-a/uploader",
            "team-a/other",
            "team-b/uploader",
            "team-b/batch",
            "kube-system/kube-dns",
            "team-a/local-dns",
        ];
        let cases: &[(&str, &[&str])] = &[
            ("{}", &all),
            (
                "{matchLabels: {app: uploader}}",
                &["team-a/uploader", "team-b/uploader"],
            ),
            (
                "{matchLabels: {\"k8s:app\": uploader, tier: web}}",
                &["team-a/uploader"],
            ),
            (
                "{matchLabels: {\"any:io.kubernetes.pod.namespace\": team-b}}",
                &["team-b/uploader", "team-b/batch"],
            ),
            (
                "{matchExpressions: [{key: app, operator: In, values: [batch, other]}]}",
                &["team-a/other", "team-b/batch"],
            ),
            (
                "{matchExpressions: [{key: app, operator: NotIn, values: [uploader]}]}",
                &[
                    "team-a/other",
                    "team-b/batch",
                    "kube-system/kube-dns",
                    "team-a/local-dns",
                ],
            ),
            (
                "{matchExpressions: [{key: tier, operator: Exists}]}",
                &["team-a/uploader", "team-b/batch"],
            ),
            (
                "{matchExpressions: [{key: tier, operator: DoesNotExist}, {key: app, operator: Exists}]}",
                &["team-a/other", "team-b/uploader", "team-a/local-dns"],
            ),
            (
                "{matchLabels: {app: uploader}, matchExpressions: [{key: tier, operator: DoesNotExist}]}",
                &["team-b/uploader"],
            ),
        ];
        for (selector, want) in cases {
            let s = snapshot(&ccnp_selecting(selector));
            let got: Vec<&str> = s
                .endpoints()
                .filter(|&ep| s.is_restricted(ep))
                .map(|ep| s.endpoint_name(ep))
                .collect();
            assert_eq!(&got, want, "{selector}");
            for ep in all {
                let v = dns(&s, ep, "1.1.1.1:53", Udp, "ok.com");
                assert_eq!(v == Allow, want.contains(&ep), "{selector} {ep}");
                let v = dns(&s, ep, "1.1.1.1:53", Udp, "no.com");
                assert_eq!(
                    v,
                    if want.contains(&ep) {
                        Deny
                    } else {
                        Unrestricted
                    },
                    "{selector} {ep}"
                );
            }
        }
    }

    #[test]
    fn namespace_confinement_of_cnp_selectors() {
        // Without a namespace: the CNP's own. toEndpoints [{}] in a CNP: endpoints of its
        // namespace; in a CCNP: every registered endpoint.
        let s = snapshot(
            r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: any-peer}          # namespace: default
spec:
  endpointSelector: {}
---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: local, namespace: team-a}
spec:
  endpointSelector: {matchLabels: {app: uploader}}
  egress:
  - toEndpoints: [{}]
    toPorts: [{ports: [{port: "53"}], rules: {dns: []}}]
---
apiVersion: cilium.io/v2
kind: CiliumClusterwideNetworkPolicy
metadata: {name: batch}
spec:
  endpointSelector: {matchLabels: {app: batch}}
  egress:
  - toEndpoints: [{}]
    toPorts: [{ports: [{port: "53"}], rules: {dns: []}}]
"#,
        );
        let up = "team-a/uploader";
        assert_eq!(dns(&s, up, "10.0.1.53:53", Udp, "x.com"), Allow); // team-a peer
        assert_eq!(dns(&s, up, "10.96.0.10:53", Udp, "x.com"), Deny); // kube-system peer
        assert_eq!(dns(&s, up, "9.9.9.9:53", Udp, "x.com"), Deny); // unregistered
        let batch = "team-b/batch";
        assert_eq!(dns(&s, batch, "10.0.1.53:53", Udp, "x.com"), Allow);
        assert_eq!(dns(&s, batch, "10.96.0.10:53", Tcp, "x.com"), Allow);
        assert_eq!(dns(&s, batch, "[fd00::5]:53", Udp, "x.com"), Allow);
        assert_eq!(dns(&s, batch, "9.9.9.9:53", Udp, "x.com"), Deny);
        // A policy without egress rules selects nothing for egress.
        assert_eq!(
            dns(&s, "team-b/uploader", "9.9.9.9:53", Udp, "x.com"),
            Unrestricted
        );
    }

    #[test]
    fn dns_port_and_protocol_coverage() {
        let s = snapshot(
            r#"
apiVersion: cilium.io/v2
kind: CiliumClusterwideNetworkPolicy
metadata: {name: ports}
spec:
  endpointSelector: {matchLabels: {app: uploader}}
  egress:
  - toPorts:
    - ports: [{port: "53", protocol: UDP}]
      rules: {dns: [{matchName: udp.com}]}
    - ports: [{port: 53, protocol: TCP}]
      rules: {dns: [{matchName: tcp.com}]}
    - ports: [{port: "5300"}, {port: "5399"}]
      rules: {dns: [{matchPattern: "*.range.com"}]}
    - ports: [{port: "853", protocol: SCTP}]
      rules: {dns: []}
"#,
        );
        let ep = "team-a/uploader";
        let cases = [
            ("1.1.1.1:53", Udp, "udp.com", Allow),
            ("1.1.1.1:53", Tcp, "udp.com", Deny),
            ("1.1.1.1:53", Tcp, "tcp.com", Allow),
            ("1.1.1.1:53", Udp, "tcp.com", Deny),
            ("1.1.1.1:5300", Udp, "a.range.com", Allow),
            ("1.1.1.1:5399", Tcp, "a.range.com", Allow),
            ("1.1.1.1:5398", Tcp, "a.range.com", Deny),
            ("1.1.1.1:5400", Tcp, "a.range.com", Deny),
            ("1.1.1.1:5350", Tcp, "range.com", Deny),
            ("1.1.1.1:853", Udp, "any.com", Deny), // SCTP covers neither UDP nor TCP
        ];
        for (server, proto, name, want) in cases {
            assert_eq!(
                dns(&s, ep, server, proto, name),
                want,
                "{server} {proto:?} {name}"
            );
        }
    }

    #[test]
    fn specs_form_multiple_documents_and_default_deny() {
        let s = snapshot(
            r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: two-specs, namespace: team-b}
specs:
- endpointSelector: {matchLabels: {app: batch}}
  egress:
  - toPorts: [{ports: [{port: "53"}], rules: {dns: [{matchPattern: "*.a.com"}]}}]
  - toFQDNs: [{matchPattern: "**.a.com"}]
- endpointSelector: {matchLabels: {app: uploader}}
  egress: [{}]
---
---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: more, namespace: team-b}
spec:
  endpointSelector: {matchLabels: {app: batch}}
  egress:
  - toPorts: [{ports: [{port: "53"}], rules: {dns: [{matchName: b.com}]}}]
  - toFQDNs: [{matchName: b.com}, {matchName: x.a.com}]
    toPorts: [{ports: [{port: "443", protocol: TCP}, {port: "8000", endPort: 8080, protocol: TCP}]}]
"#,
        );
        let b = "team-b/batch";
        assert_eq!(dns(&s, b, "1.1.1.1:53", Udp, "x.a.com"), Allow);
        assert_eq!(dns(&s, b, "1.1.1.1:53", Udp, "b.com"), Allow);
        assert_eq!(dns(&s, b, "1.1.1.1:53", Udp, "a.com"), Deny);
        assert_eq!(fqdn(&s, b, "y.z.a.com").as_deref(), Some("*"));
        assert_eq!(
            fqdn(&s, b, "x.a.com").as_deref(),
            Some("*,443/tcp,8000-8080/tcp")
        );
        assert_eq!(
            fqdn(&s, b, "b.com").as_deref(),
            Some("443/tcp,8000-8080/tcp")
        );
        assert_eq!(fqdn(&s, b, "a.com"), None);
        // `egress: [{}]`: selected, nothing allowed.
        let u = "team-b/uploader";
        assert_eq!(dns(&s, u, "1.1.1.1:53", Udp, "b.com"), Deny);
        assert_eq!(fqdn(&s, u, "b.com"), None);
        let summary = PolicySet::from_yaml(Path::new("p"), "---\n")
            .unwrap()
            .summary();
        assert_eq!(summary.policies, 0);
    }

    #[test]
    fn registry_lookups_and_shared_groups() {
        let s = snapshot(&ccnp_selecting("{matchLabels: {app: uploader}}"));
        let up = s.endpoint_by_name("team-a/uploader").unwrap();
        let ip = |t: &str| t.parse::<IpAddr>().unwrap();
        assert_eq!(s.endpoint_by_ip(ip("10.0.1.5")), Some(up));
        assert_eq!(s.endpoint_by_ip(ip("::ffff:10.0.1.5")), Some(up));
        assert_eq!(s.endpoint_by_ip(ip("fd00::5")), Some(up));
        assert_eq!(s.endpoint_by_ip(ip("10.0.1.7")), None);
        assert_eq!(s.endpoint_by_cgroup("/workloads/uploader"), Some(up));
        assert_eq!(s.endpoint_by_cgroup("workloads/uploader/"), Some(up));
        assert_eq!(s.endpoint_by_cgroup("/workloads"), None);
        assert_eq!(s.endpoint_name(up), "team-a/uploader");
        assert_eq!(
            s.endpoint_by_name("other"),
            s.endpoint_by_name("team-a/other")
        );
        assert_eq!(s.endpoint_by_name("uploader"), None, "ambiguous");
        // Both uploaders are selected by the same spec: one compiled group.
        let stats = s.stats();
        assert_eq!((stats.endpoints, stats.restricted, stats.groups), (6, 2, 1));
        // Unknown ids fail closed.
        let bogus = crate::EndpointId(999);
        let server: SocketAddr = "1.1.1.1:53".parse().unwrap();
        assert_eq!(
            s.dns_verdict(bogus, server, Udp, &Name::from_text("ok.com").unwrap()),
            Deny
        );
        assert_eq!(s.endpoint_name(bogus), "");
        let empty = Snapshot::empty();
        assert_eq!(empty.endpoints().count(), 0);
        assert_eq!(empty.rule_ports(dnsfence_matcher::RuleId(0)), &[]);
    }

    /// L3/L4 verdict of `ep` to `ip:port/proto` (None: no L3 rule decides).
    fn l3(s: &Snapshot, ep: &str, ip: &str, port: u16, proto: crate::PortProtocol) -> Option<bool> {
        let id = s.endpoint_by_name(ep).unwrap();
        s.l3_verdict(id, ip.parse().unwrap(), port, proto)
    }

    #[test]
    fn l3_rules_cidrs_exceptions_peers_ports_and_deny() {
        use crate::PortProtocol::{Tcp, Udp};
        let s = snapshot(
            r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: l3, namespace: team-a}
spec:
  endpointSelector: {matchLabels: {app: uploader}}
  egress:
  - toCIDRSet: [{cidr: 10.0.0.0/8, except: [10.1.0.0/16]}]
    toPorts: [{ports: [{port: "5432", protocol: TCP}]}]
  - toCIDR: [192.168.7.7, "2001:db8::/32"]
  - toPorts: [{ports: [{port: "123", protocol: UDP}]}]
  - toEndpoints: [{matchLabels: {app: other}}]
    toPorts: [{ports: [{port: "6379", endPort: 6380, protocol: TCP}]}]
  egressDeny:
  - toCIDR: [10.9.0.0/16]
  - toCIDR: [192.168.7.7/32]
    toPorts: [{ports: [{port: "22"}]}]
"#,
        );
        let ep = "team-a/uploader";
        assert_eq!(l3(&s, ep, "10.2.3.4", 5432, Tcp), Some(true));
        assert_eq!(l3(&s, ep, "10.2.3.4", 5433, Tcp), None, "port");
        assert_eq!(l3(&s, ep, "10.2.3.4", 5432, Udp), None, "protocol");
        assert_eq!(l3(&s, ep, "10.1.3.4", 5432, Tcp), None, "except");
        assert_eq!(
            l3(&s, ep, "10.9.3.4", 5432, Tcp),
            Some(false),
            "egressDeny wins"
        );
        assert_eq!(
            l3(&s, ep, "192.168.7.7", 443, Tcp),
            Some(true),
            "no toPorts: any port"
        );
        assert_eq!(
            l3(&s, ep, "192.168.7.7", 22, Tcp),
            Some(false),
            "denied port"
        );
        assert_eq!(
            l3(&s, ep, "::ffff:192.168.7.7", 443, Tcp),
            Some(true),
            "mapped"
        );
        assert_eq!(l3(&s, ep, "2001:db8::9", 1, Udp), Some(true));
        assert_eq!(
            l3(&s, ep, "8.8.8.8", 123, Udp),
            Some(true),
            "toPorts only: any address"
        );
        assert_eq!(l3(&s, ep, "8.8.8.8", 124, Udp), None);
        // toEndpoints: the peer's registered address, on its ports.
        let peer = "10.0.1.6";
        assert_eq!(l3(&s, ep, peer, 6380, Tcp), Some(true));
        assert_eq!(l3(&s, ep, peer, 6381, Tcp), None);
        // 10.0.1.6 is also in 10.0.0.0/8 (open on 5432), but CIDR rules do not select the
        // cluster's endpoints: Cilium's `ToCIDR` "Only connections destined for outside of
        // the cluster and not targeting the host will be subject to CIDR rules"
        // (pkg/policy/api/egress.go). Review finding: a namespace's "allow the corporate
        // 10/8" opened every pod of the cluster.
        assert_eq!(l3(&s, ep, peer, 5432, Tcp), None, "a pod is not a CIDR");
        // The other namespace's endpoints are not peers of a CNP's toEndpoints.
        assert_eq!(l3(&s, ep, "10.0.2.5", 6380, Tcp), None, "not a peer");
        assert_eq!(
            l3(&s, ep, "10.0.2.5", 5432, Tcp),
            None,
            "a pod is not a CIDR"
        );
        // An unregistered address of the block still is.
        assert_eq!(l3(&s, ep, "10.0.2.99", 5432, Tcp), Some(true));
    }

    #[test]
    fn egress_deny_of_the_server_denies_dns_whatever_the_dns_rules_say() {
        // Review finding: egressDeny was never applied to DNS queries, a resolution and
        // exfiltration channel Cilium closes ("Deny policies take precedence over allow
        // policies", L4 deny over L7 allow: docs.cilium.io security/policy/deny).
        let s = snapshot(
            r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: p, namespace: team-a}
spec:
  endpointSelector: {matchLabels: {app: uploader}}
  egress:
  - toEndpoints: [{matchLabels: {"k8s:io.kubernetes.pod.namespace": kube-system, k8s-app: kube-dns}}]
    toPorts: [{ports: [{port: "53", protocol: ANY}], rules: {dns: [{matchPattern: "*"}]}}]
  - toPorts: [{ports: [{port: "53", protocol: ANY}], rules: {dns: [{matchPattern: "*"}]}}]
  egressDeny:
  - toEndpoints: [{matchLabels: {"k8s:io.kubernetes.pod.namespace": kube-system, k8s-app: kube-dns}}]
  - toCIDR: [192.0.2.0/24]
    toPorts: [{ports: [{port: "53", protocol: TCP}]}]
"#,
        );
        let ep = "team-a/uploader";
        let (kube_dns, other) = ("10.96.0.10:53", "198.51.100.1:53");
        assert_eq!(
            dns(&s, ep, kube_dns, Proto::Udp, "a.example"),
            DnsVerdict::Deny
        );
        assert_eq!(
            dns(&s, ep, kube_dns, Proto::Tcp, "a.example"),
            DnsVerdict::Deny
        );
        assert_eq!(
            dns(&s, ep, other, Proto::Udp, "a.example"),
            DnsVerdict::Allow
        );
        // The deny's port and protocol count: 192.0.2.1 is denied over TCP only.
        assert_eq!(
            dns(&s, ep, "192.0.2.1:53", Proto::Tcp, "a.example"),
            DnsVerdict::Deny
        );
        assert_eq!(
            dns(&s, ep, "192.0.2.1:53", Proto::Udp, "a.example"),
            DnsVerdict::Allow
        );

        // Default allow (enableDefaultDeny false) with "deny all DNS": every query refused.
        let s = snapshot(
            r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: p, namespace: team-a}
spec:
  endpointSelector: {matchLabels: {app: uploader}}
  enableDefaultDeny: {egress: false}
  egressDeny:
  - toPorts: [{ports: [{port: "53", protocol: ANY}]}]
"#,
        );
        for server in [kube_dns, other] {
            assert_eq!(
                dns(&s, ep, server, Proto::Udp, "x.example"),
                DnsVerdict::Deny
            );
        }
        assert_eq!(
            dns(&s, ep, "198.51.100.1:5353", Proto::Udp, "x.example"),
            DnsVerdict::Unrestricted,
            "another port"
        );
    }

    #[test]
    fn an_l3_or_l4_allow_of_the_server_lets_every_name_through() {
        // Review finding: toEndpoints kube-dns on port 53 without rules.dns refused every
        // query. In Cilium such traffic is plain L4 allowed, and an L3/L4-only rule
        // wildcards the L7 (DNS) rules of the same port and peer.
        let s = snapshot(
            r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: p, namespace: team-a}
spec:
  endpointSelector: {matchLabels: {app: uploader}}
  egress:
  - toEndpoints: [{matchLabels: {"k8s:io.kubernetes.pod.namespace": kube-system, k8s-app: kube-dns}}]
    toPorts: [{ports: [{port: "53", protocol: UDP}]}]
  - toEndpoints: [{matchLabels: {app: dns}}]
    toPorts: [{ports: [{port: "53", protocol: ANY}], rules: {dns: [{matchName: ok.example}]}}]
  - toCIDR: [198.51.100.0/24]
  - toFQDNs: [{matchName: api.example.com}]
"#,
        );
        let ep = "team-a/uploader";
        let (kube_dns, local_dns) = ("10.96.0.10:53", "10.0.1.53:53");
        assert_eq!(
            dns(&s, ep, kube_dns, Proto::Udp, "any.example"),
            DnsVerdict::Allow
        );
        assert_eq!(
            dns(&s, ep, kube_dns, Proto::Tcp, "any.example"),
            DnsVerdict::Deny,
            "the L4 rule is UDP only"
        );
        // The DNS rule of another peer still judges its names.
        assert_eq!(
            dns(&s, ep, local_dns, Proto::Udp, "ok.example"),
            DnsVerdict::Allow
        );
        assert_eq!(
            dns(&s, ep, local_dns, Proto::Udp, "no.example"),
            DnsVerdict::Deny
        );
        // An L3 rule without ports covers port 53 too.
        assert_eq!(
            dns(&s, ep, "198.51.100.7:53", Proto::Tcp, "x.example"),
            DnsVerdict::Allow
        );
        assert_eq!(
            dns(&s, ep, "203.0.113.7:53", Proto::Udp, "x.example"),
            DnsVerdict::Deny
        );
        // The toFQDNs rules are still kept for the answer.
        let id = s.endpoint_by_name(ep).unwrap();
        let name = Name::from_text("api.example.com").unwrap();
        let mut rules = s.rule_set();
        let server: SocketAddr = kube_dns.parse().unwrap();
        assert_eq!(
            s.judge(id, server, Proto::Udp, &name, &mut rules),
            DnsVerdict::Allow
        );
        assert_eq!(rules.as_slice().len(), 1);

        // On the same peer and port, the L4-only rule wildcards the DNS rule.
        let s = snapshot(
            r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: p, namespace: team-a}
spec:
  endpointSelector: {matchLabels: {app: uploader}}
  egress:
  - toEndpoints: [{matchLabels: {app: dns}}]
    toPorts: [{ports: [{port: "53", protocol: ANY}], rules: {dns: [{matchName: ok.example}]}}]
  - toEndpoints: [{matchLabels: {app: dns}}]
    toPorts: [{ports: [{port: "53", protocol: ANY}]}]
"#,
        );
        assert_eq!(
            dns(&s, ep, local_dns, Proto::Udp, "no.example"),
            DnsVerdict::Allow
        );

        // Review 2: only an allow of the very port (or of every port) wildcards the DNS rules
        // covering a query, as Cilium's wildcardL3L4Rules does; a port range does not, so the
        // DNS rule's names still apply. Where no DNS rule covers the query, any allow lets it
        // through (plain L4 traffic: Cilium redirects nothing there).
        let s = snapshot(
            r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: p, namespace: team-a}
spec:
  endpointSelector: {matchLabels: {app: uploader}}
  egress:
  - toEndpoints: [{matchLabels: {app: dns}}]
    toPorts: [{ports: [{port: "53", protocol: ANY}], rules: {dns: [{matchName: ok.example}]}}]
  - toEndpoints: [{matchLabels: {app: dns}}]
    toPorts: [{ports: [{port: "1", endPort: 10000, protocol: UDP}]}]
  - toEndpoints: [{matchLabels: {"k8s:io.kubernetes.pod.namespace": kube-system, k8s-app: kube-dns}}]
    toPorts: [{ports: [{port: "1", endPort: 10000, protocol: UDP}]}]
"#,
        );
        assert_eq!(
            dns(&s, ep, local_dns, Proto::Udp, "ok.example"),
            DnsVerdict::Allow
        );
        assert_eq!(
            dns(&s, ep, local_dns, Proto::Udp, "exfil.example"),
            DnsVerdict::Deny,
            "a range does not wildcard the DNS rule"
        );
        assert_eq!(
            dns(&s, ep, kube_dns, Proto::Udp, "exfil.example"),
            DnsVerdict::Allow,
            "no DNS rule about kube-dns: plain L4"
        );
        assert_eq!(
            s.dns_reason(
                s.endpoint_by_name(ep).unwrap(),
                Some("10.96.0.10".parse().unwrap()),
                53,
                Proto::Udp,
                &Name::from_text("exfil.example").unwrap()
            ),
            crate::DnsReason::L3Rule
        );
    }

    #[test]
    fn to_services_does_not_wildcard_dns_rules() {
        let text = r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: p, namespace: team-a}
spec:
  endpointSelector: {matchLabels: {app: uploader}}
  egress:
  - toPorts: [{ports: [{port: "53", protocol: UDP}], rules: {dns: [{matchPattern: "*.corp.example"}]}}]
  - toServices: [{k8sService: {serviceName: kube-dns, namespace: kube-system}}]
    toPorts: [{ports: [{port: "53", protocol: UDP}]}]
"#;
        let endpoints = format!(
            "{ENDPOINTS}services:\n- {{name: kube-dns, namespace: kube-system, ips: [\"10.96.0.10\"]}}\n"
        );
        let s = Snapshot::compile(
            &PolicySet::from_yaml(Path::new("p.yaml"), text).unwrap(),
            &Endpoints::from_yaml(Path::new("e.yaml"), &endpoints)
                .unwrap_or_else(|e| panic!("{e}")),
        );
        let ep = "team-a/uploader";
        assert_eq!(
            dns(&s, ep, "10.96.0.10:53", Proto::Udp, "a.corp.example"),
            DnsVerdict::Allow
        );
        assert_eq!(
            dns(
                &s,
                ep,
                "10.96.0.10:53",
                Proto::Udp,
                "exfil.attacker.example"
            ),
            DnsVerdict::Deny
        );
    }

    #[test]
    fn cidr_rules_leave_out_the_cluster_and_the_node() {
        use crate::PortProtocol::Tcp;
        use crate::cidr::{Cidr, NodeFacts};
        let policy = r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: l3, namespace: team-a}
spec:
  endpointSelector: {matchLabels: {app: uploader}}
  egress:
  - toCIDR: [0.0.0.0/0, "::/0"]
  - toCIDRSet: [{cidr: 10.0.1.0/24}]
  egressDeny:
  - toCIDR: [10.0.2.0/24]
"#;
        let s = snapshot(policy);
        let ep = "team-a/uploader";
        // Registered endpoints (both namespaces) and the node's loopback are left out of
        // 0.0.0.0/0, as they are of `world`; other addresses are in.
        assert_eq!(
            l3(&s, ep, "10.0.1.6", 443, Tcp),
            None,
            "own namespace's pod"
        );
        assert_eq!(
            l3(&s, ep, "10.0.2.5", 443, Tcp),
            None,
            "other namespace's pod"
        );
        assert_eq!(l3(&s, ep, "127.0.0.1", 443, Tcp), None, "the host");
        assert_eq!(l3(&s, ep, "::1", 443, Tcp), None, "the host (IPv6)");
        // A block inside the node's own addresses names the node on purpose: kept.
        let s = snapshot(&policy.replace(
            "  egressDeny:",
            "  - toCIDR: [127.0.0.0/24, \"::1/128\"]\n  egressDeny:",
        ));
        assert_eq!(
            l3(&s, ep, "127.0.0.1", 443, Tcp),
            Some(true),
            "named loopback"
        );
        assert_eq!(
            l3(&s, ep, "::1", 443, Tcp),
            Some(true),
            "named loopback (IPv6)"
        );
        assert_eq!(
            l3(&s, ep, "127.0.1.1", 443, Tcp),
            None,
            "the rest of loopback"
        );
        let s = snapshot(policy);
        assert_eq!(l3(&s, ep, "10.0.1.77", 443, Tcp), Some(true));
        assert_eq!(l3(&s, ep, "203.0.113.9", 443, Tcp), Some(true));
        // An egressDeny CIDR does not reach the pods in it either (Cilium: deny CIDRs select
        // CIDR identities only), while it still denies the rest of its block.
        assert_eq!(l3(&s, ep, "10.0.2.99", 443, Tcp), Some(false));
        // A block inside a cluster range (`--cluster-cidr`) selects nothing.
        let text = PolicySet::from_yaml(Path::new("p.yaml"), policy).unwrap();
        let endpoints = Endpoints::from_yaml(Path::new("e.yaml"), ENDPOINTS).unwrap();
        let node = NodeFacts {
            cluster: vec![Cidr::parse("10.0.0.0/16").unwrap()],
            ..NodeFacts::default()
        };
        let s = Snapshot::compile_on(&text, &endpoints, &[], &node);
        let ep = s.endpoint_by_name(ep).unwrap();
        let port = |ip: &str| s.l3_verdict(ep, ip.parse().unwrap(), 443, Tcp);
        assert_eq!(port("10.0.1.77"), None, "inside the cluster range");
        assert_eq!(port("10.0.2.99"), None, "deny inside the cluster range");
        assert_eq!(port("10.1.0.1"), Some(true), "outside it");
        assert_eq!(
            port("10.96.0.10"),
            None,
            "a pod outside the range is left out too"
        );
        // The pods cost no entry of their own, inside the range or not: the CIDR rules are
        // scoped to the addresses outside the cluster, which the datapath looks up in one
        // map of the cluster's addresses, so an endpoint's L3 entries (per endpoint in the
        // datapath) are bounded by its rules, not by the size of the cluster.
        let pods_inside = |s: &Snapshot| {
            s.l3_table(ep)
                .iter()
                .filter(|e| {
                    e.cidr.len == 32 && Cidr::parse("10.0.0.0/16").unwrap().contains(&e.cidr)
                })
                .count()
        };
        assert_eq!(pods_inside(&s), 0, "{:?}", s.l3_table(ep));
        let without_range = snapshot(policy);
        let ep2 = without_range.endpoint_by_name("team-a/uploader").unwrap();
        assert_eq!(ep2, ep);
        assert_eq!(pods_inside(&without_range), 0);
        let many = (0..200)
            .map(|i| {
                format!(
                    "- {{name: p{i}, namespace: team-b, labels: {{app: x}}, ips: [\"10.7.{}.{}\"]}}\n",
                    i / 100,
                    i % 100
                )
            })
            .collect::<String>();
        let grown = Snapshot::compile(
            &text,
            &Endpoints::from_yaml(Path::new("e.yaml"), &format!("{ENDPOINTS}{many}"))
                .unwrap_or_else(|e| panic!("{e}")),
        );
        let ep3 = grown.endpoint_by_name("team-a/uploader").unwrap();
        assert_eq!(
            grown.l3_table(ep3).len(),
            without_range.l3_table(ep2).len(),
            "200 more pods, no more entries"
        );
        assert_eq!(
            grown.l3_verdict(ep3, "10.7.1.5".parse().unwrap(), 443, Tcp),
            None
        );
        assert_eq!(
            grown.l3_verdict(ep3, "10.7.3.5".parse().unwrap(), 443, Tcp),
            Some(true)
        );
    }

    /// Random CIDR, entity and deny rules over random clusters: the compiled L3 table
    /// (scoped port entries, longest match) gives the verdict of a direct reading of the
    /// rules: a CIDR block or `world` takes an address outside the cluster (a block inside
    /// the node's own addresses: its addresses), `cluster` one inside it, `all` any; a deny
    /// wins over an allow.
    #[test]
    fn l3_tables_agree_with_a_direct_reading_of_the_rules() {
        use crate::PortProtocol::{Tcp, Udp};
        use crate::cidr::{Cidr, NodeFacts};
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        let mut next = move |n: usize| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % n as u64) as usize
        };
        let blocks: [(&str, &[&str]); 8] = [
            ("10.0.0.0/8", &[]),
            ("10.0.0.0/8", &["10.1.0.0/16"]),
            ("10.1.0.0/16", &["10.1.2.0/24"]),
            ("10.1.2.0/24", &[]),
            ("10.1.2.3/32", &[]),
            ("0.0.0.0/0", &["192.0.2.0/25"]),
            ("192.0.2.0/24", &[]),
            ("127.0.0.0/8", &[]),
        ];
        let entities = ["world", "cluster", "all", "host", "world-ipv4"];
        let ports = [
            "",
            "\n    toPorts: [{ports: [{port: \"443\", protocol: TCP}]}]",
            "\n    toPorts: [{ports: [{port: \"53\", protocol: ANY}]}]",
        ];
        let pool = [
            "10.1.2.3",
            "10.1.2.9",
            "10.1.9.9",
            "10.2.0.1",
            "10.200.0.1",
            "127.0.0.1",
            "192.0.2.7",
            "192.0.2.200",
            "198.51.100.1",
            "203.0.113.5",
        ];
        let rule = |next: &mut dyn FnMut(usize) -> usize| -> (String, Vec<String>) {
            // (YAML, and the rule as (kind, block index or entity, port index) for the reader)
            let port = next(ports.len());
            if next(3) == 0 {
                let e = entities[next(entities.len())];
                (
                    format!("  - toEntities: [{e}]{}\n", ports[port]),
                    vec![format!("e:{e}:{port}")],
                )
            } else {
                let b = next(blocks.len());
                let (cidr, except) = blocks[b];
                (
                    format!(
                        "  - toCIDRSet: [{{cidr: {cidr}, except: [{}]}}]{}\n",
                        except.join(", "),
                        ports[port]
                    ),
                    vec![format!("c:{b}:{port}")],
                )
            }
        };
        for round in 0..300 {
            let (mut allow, mut deny) = (Vec::new(), Vec::new());
            let mut text = String::from(
                "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: p, namespace: team-a}\nspec:\n  endpointSelector: {matchLabels: {app: uploader}}\n  egress:\n",
            );
            for _ in 0..1 + next(3) {
                let (yaml, r) = rule(&mut next);
                text += &yaml;
                allow.extend(r);
            }
            if next(2) == 0 {
                text += "  egressDeny:\n";
                for _ in 0..1 + next(2) {
                    let (yaml, r) = rule(&mut next);
                    text += &yaml;
                    deny.extend(r);
                }
            }
            // The cluster: the subject, a few pods from the pool, maybe a range, a node IP.
            let mut pods = vec!["10.50.0.1".to_string()];
            let mut endpoints = String::from(
                "endpoints:\n- {name: uploader, namespace: team-a, labels: {app: uploader}, ips: [\"10.50.0.1\"]}\n",
            );
            for i in 0..next(4) {
                let ip = pool[next(pool.len())];
                if pods.iter().any(|p| p == ip) {
                    continue;
                }
                endpoints += &format!(
                    "- {{name: p{i}, namespace: team-b, labels: {{app: x}}, ips: [\"{ip}\"]}}\n"
                );
                pods.push(ip.to_string());
            }
            let mut node = NodeFacts::default();
            if next(2) == 0 {
                node.cluster.push(Cidr::parse("10.1.0.0/16").unwrap());
            }
            if next(3) == 0 {
                node.host.push(Cidr::parse("192.0.2.7").unwrap());
            }
            let policies = PolicySet::from_yaml(Path::new("p.yaml"), &text)
                .unwrap_or_else(|e| panic!("{e}\n{text}"));
            let registry = Endpoints::from_yaml(Path::new("e.yaml"), &endpoints).unwrap();
            let s = Snapshot::compile_on(&policies, &registry, &[], &node);
            let ep = s.endpoint_by_name("team-a/uploader").unwrap();
            for ip in pool {
                let addr: IpAddr = ip.parse().unwrap();
                let host = Cidr::host(addr);
                let inside = pods.iter().any(|p| p == ip)
                    || node
                        .cluster
                        .iter()
                        .chain(&node.host)
                        .any(|c| c.contains(&host));
                let on_node = |c: &Cidr| node.host.iter().any(|h| h.contains(c));
                let takes = |r: &str, port: u16, proto| {
                    let parts: Vec<&str> = r.split(':').collect();
                    let port_ok = match parts[2] {
                        "0" => true,
                        "1" => port == 443 && proto == Tcp,
                        _ => port == 53,
                    };
                    port_ok
                        && match parts[0] {
                            "e" => match parts[1] {
                                "world" | "world-ipv4" => !inside,
                                "cluster" => inside,
                                "all" => true,
                                _ => node.host.iter().any(|h| h.contains(&host)),
                            },
                            _ => {
                                let (cidr, except) = blocks[parts[1].parse::<usize>().unwrap()];
                                let cidr = Cidr::parse(cidr).unwrap();
                                cidr.contains(&host)
                                    && !except
                                        .iter()
                                        .any(|e| Cidr::parse(e).unwrap().contains(&host))
                                    && (on_node(&cidr) || !inside)
                            }
                        }
                };
                for (port, proto) in [(443, Tcp), (53, Udp), (80, Tcp)] {
                    let want = if deny.iter().any(|r| takes(r, port, proto)) {
                        Some(false)
                    } else if allow.iter().any(|r| takes(r, port, proto)) {
                        Some(true)
                    } else {
                        None
                    };
                    assert_eq!(
                        s.l3_verdict(ep, addr, port, proto),
                        want,
                        "round {round}: {ip}:{port}/{proto:?} (inside: {inside})\n{text}\n{endpoints}{node:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn ingress_and_host_policies_are_accepted_and_reported_not_enforced() {
        let text = r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: both, namespace: team-a}
spec:
  endpointSelector: {matchLabels: {app: uploader}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: other}}]
  egress:
  - toFQDNs: [{matchName: api.stripe.com}]
---
apiVersion: cilium.io/v2
kind: CiliumClusterwideNetworkPolicy
metadata: {name: host}
spec:
  nodeSelector: {matchLabels: {node: a}}
  ingressDeny:
  - fromEntities: [world]
"#;
        let p = PolicySet::from_yaml(Path::new("p.yaml"), text).unwrap_or_else(|e| panic!("{e}"));
        let notes = p.notes();
        assert_eq!(notes.len(), 3, "{notes:?}");
        assert!(notes[0].starts_with("p.yaml:7: note: spec.ingress: not enforced"));
        // In line order: the host policy's nodeSelector comes first.
        assert!(notes[1].contains("spec.nodeSelector: a host policy"));
        assert!(notes[2].contains("spec.ingressDeny: not enforced"));
        // The egress part works; the host policy selects no workload.
        let e = Endpoints::from_yaml(Path::new("e.yaml"), ENDPOINTS).unwrap();
        let s = Snapshot::compile(&p, &e);
        let name = Name::from_text("api.stripe.com").unwrap();
        let server: SocketAddr = "10.96.0.10:53".parse().unwrap();
        let up = s.endpoint_by_name("team-a/uploader").unwrap();
        assert_eq!(
            s.dns_verdict(up, server, Proto::Udp, &name),
            DnsVerdict::Deny
        );
        let batch = s.endpoint_by_name("team-b/batch").unwrap();
        assert!(
            !s.is_restricted(batch),
            "the host policy selects no endpoint"
        );
    }

    #[test]
    fn an_l7_rule_fails_closed_for_its_traffic_and_the_rest_of_the_policy_works() {
        let text = r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: l7, namespace: team-a}
spec:
  endpointSelector: {matchLabels: {app: uploader}}
  egress:
  - toFQDNs: [{matchName: api.stripe.com}]
    toPorts:
    - ports: [{port: "443", protocol: TCP}]
      rules:
        http: [{method: GET}]
    - ports: [{port: "80", protocol: TCP}]
  - toFQDNs: [{matchName: tls.example.com}]
    toPorts:
    - ports: [{port: "443", protocol: TCP}]
      serverNames: [tls.example.com]
  - toCIDR: [10.7.0.0/16]
    toPorts:
    - ports: [{port: "8080", protocol: TCP}]
      rules:
        kafka: [{topic: t}]
"#;
        let p = PolicySet::from_yaml(Path::new("p.yaml"), text).unwrap_or_else(|e| panic!("{e}"));
        let notes = p.notes();
        assert_eq!(notes.len(), 3, "{notes:?}");
        assert!(
            notes[0].contains("rules.http: not enforced by dnsfence (L7)"),
            "{notes:?}"
        );
        assert!(notes[1].contains("serverNames: not enforced"), "{notes:?}");
        let e = Endpoints::from_yaml(Path::new("e.yaml"), ENDPOINTS).unwrap();
        let s = Snapshot::compile(&p, &e);
        let ep = s.endpoint_by_name("team-a/uploader").unwrap();
        let mut rules = s.rule_set();
        // api.stripe.com keeps its plain 80/TCP entry; the HTTP-filtered 443 opens nothing.
        let stripe = Name::from_text("api.stripe.com").unwrap();
        assert!(s.fqdn_rules(ep, &stripe, &mut rules));
        let ports: Vec<_> = rules
            .as_slice()
            .iter()
            .flat_map(|&r| s.rule_ports(r).to_vec())
            .collect();
        assert_eq!(ports.len(), 1, "{ports:?}");
        assert_eq!((ports[0].port, ports[0].end_port), (80, 80));
        // A rule whose only entry is L7 allows nothing: never "every port".
        let tls = Name::from_text("tls.example.com").unwrap();
        assert!(!s.fqdn_rules(ep, &tls, &mut rules));
        assert_eq!(
            l3(
                &s,
                "team-a/uploader",
                "10.7.1.1",
                8080,
                crate::PortProtocol::Tcp
            ),
            None
        );
        assert!(s.is_restricted(ep));
    }

    #[test]
    fn to_entities_all_world_cluster_host_apiserver_and_unknown() {
        use crate::PortProtocol::Tcp;
        use crate::cidr::{Cidr, NodeFacts};
        let text = r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: ent, namespace: team-a}
spec:
  endpointSelector: {matchLabels: {app: uploader}}
  egress:
  - toEntities: [world]
    toPorts: [{ports: [{port: "443", protocol: TCP}]}]
  - toEntities: [cluster]
    toPorts: [{ports: [{port: "8080", protocol: TCP}]}]
  - toEntities: [host]
    toPorts: [{ports: [{port: "9100", protocol: TCP}]}]
  - toEntities: [kube-apiserver]
    toPorts: [{ports: [{port: "6443", protocol: TCP}]}]
  - toEntities: [remote-node]
    toPorts: [{ports: [{port: "10250", protocol: TCP}]}]
  - toEntities: [health]
  egressDeny:
  - toEntities: [all]
    toPorts: [{ports: [{port: "25", protocol: TCP}]}]
"#;
        let p = PolicySet::from_yaml(Path::new("p.yaml"), text).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(p.notes().len(), 1, "{:?}", p.notes());
        assert!(p.notes()[0].contains("\"health\" is not known to dnsfence"));
        let with_nodes =
            format!("{ENDPOINTS}nodes:\n- {{name: n2, ips: [\"172.16.0.2\", \"fd00:16::2\"]}}\n");
        let e = Endpoints::from_yaml(Path::new("e.yaml"), &with_nodes)
            .unwrap_or_else(|e| panic!("{e}"));
        let node = NodeFacts {
            cluster: vec![Cidr::parse("10.0.0.0/8").unwrap()],
            kube_apiserver: vec![Cidr::parse("192.0.2.10").unwrap()],
            ..NodeFacts::default()
        };
        let s = Snapshot::compile_on(&p, &e, &[], &node);
        let ep = "team-a/uploader";
        // world: outside the cluster ranges, the node and the registered endpoints.
        assert_eq!(l3(&s, ep, "8.8.8.8", 443, Tcp), Some(true));
        assert_eq!(l3(&s, ep, "2001:db8::1", 443, Tcp), Some(true));
        assert_eq!(
            l3(&s, ep, "10.9.9.9", 443, Tcp),
            None,
            "a cluster range is not world"
        );
        assert_eq!(
            l3(&s, ep, "127.0.0.1", 443, Tcp),
            None,
            "the node is not world"
        );
        // cluster: ranges, registered endpoints, the node.
        assert_eq!(l3(&s, ep, "10.9.9.9", 8080, Tcp), Some(true));
        assert_eq!(l3(&s, ep, "10.0.1.6", 8080, Tcp), Some(true));
        assert_eq!(l3(&s, ep, "8.8.8.8", 8080, Tcp), None);
        // remote-node: the registry's other nodes, on its port; they are inside the cluster.
        assert_eq!(l3(&s, ep, "172.16.0.2", 10250, Tcp), Some(true));
        assert_eq!(l3(&s, ep, "fd00:16::2", 10250, Tcp), Some(true));
        assert_eq!(l3(&s, ep, "172.16.0.3", 10250, Tcp), None);
        assert_eq!(l3(&s, ep, "172.16.0.2", 8080, Tcp), Some(true), "cluster");
        assert_eq!(l3(&s, ep, "172.16.0.2", 443, Tcp), None, "not world");
        // host, kube-apiserver.
        assert_eq!(l3(&s, ep, "127.0.0.1", 9100, Tcp), Some(true));
        assert_eq!(l3(&s, ep, "192.0.2.10", 6443, Tcp), Some(true));
        // egressDeny all on 25 wins everywhere.
        assert_eq!(l3(&s, ep, "8.8.8.8", 25, Tcp), Some(false));
        // Without --kube-apiserver, that entity allows nothing; without --cluster-cidr the
        // ranges are world.
        let bare = Snapshot::compile(&p, &e);
        assert_eq!(l3(&bare, ep, "192.0.2.10", 6443, Tcp), None);
        assert_eq!(l3(&bare, ep, "10.9.9.9", 443, Tcp), Some(true));
        assert_eq!(
            l3(&bare, ep, "10.0.1.6", 443, Tcp),
            None,
            "registered: not world"
        );
    }

    #[test]
    fn egress_deny_alone_puts_the_endpoint_under_default_deny() {
        let s = snapshot(
            r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: deny-only, namespace: team-a}
spec:
  endpointSelector: {matchLabels: {app: uploader}}
  egressDeny:
  - toCIDR: [10.9.0.0/16]
"#,
        );
        let id = s.endpoint_by_name("team-a/uploader").unwrap();
        assert!(s.is_restricted(id));
        assert_eq!(
            l3(
                &s,
                "team-a/uploader",
                "10.9.0.1",
                80,
                crate::PortProtocol::Tcp
            ),
            Some(false)
        );
    }

    /// Cilium's `enableDefaultDeny`: a spec with `egress: false` adds its rules without putting
    /// the endpoints it selects under default deny; any selecting spec that keeps default deny
    /// puts them under it; `egress: true` without rules does too.
    #[test]
    fn enable_default_deny_false_adds_rules_without_default_deny() {
        use crate::PortProtocol::Tcp;
        let s = snapshot(
            r#"
apiVersion: cilium.io/v2
kind: CiliumClusterwideNetworkPolicy
metadata: {name: broad}
spec:
  endpointSelector: {}
  enableDefaultDeny: {egress: false, ingress: false}
  egress:
  - toCIDR: [10.7.0.0/16]
  - toEndpoints: [{matchLabels: {k8s-app: kube-dns, io.kubernetes.pod.namespace: kube-system}}]
    toPorts: [{ports: [{port: "53", protocol: UDP}], rules: {dns: [{matchPattern: "*.ok.com"}]}}]
  egressDeny:
  - toCIDR: [169.254.169.254/32]
---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: strict, namespace: team-b}
spec:
  endpointSelector: {matchLabels: {app: batch}}
  egress:
  - toFQDNs: [{matchName: api.ok.com}]
---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: quiet, namespace: team-a}
spec:
  endpointSelector: {matchLabels: {app: other}}
  enableDefaultDeny: {egress: false}
  egress:
  - toCIDR: [10.8.0.0/16]
---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: lock, namespace: team-b}
spec:
  endpointSelector: {matchLabels: {app: uploader}}
  enableDefaultDeny: {egress: true}
"#,
        );
        let kdns = "10.96.0.10:53";
        // Selected by the default-allow policy only: everything but the denied address, and
        // the DNS rule still judges the queries it covers (those to kube-dns).
        let up = "team-a/uploader";
        assert!(s.is_restricted(s.endpoint_by_name(up).unwrap()));
        assert_eq!(l3(&s, up, "8.8.8.8", 443, Tcp), Some(true));
        assert_eq!(l3(&s, up, "169.254.169.254", 80, Tcp), Some(false));
        assert_eq!(dns(&s, up, kdns, Udp, "a.ok.com"), Allow);
        assert_eq!(dns(&s, up, kdns, Udp, "evil.com"), Deny);
        assert_eq!(dns(&s, up, "8.8.8.8:53", Udp, "evil.com"), Unrestricted);
        // Also selected by a policy that keeps default deny: default deny, with both
        // policies' rules (and the broad policy's egressDeny).
        let batch = "team-b/batch";
        assert!(s.is_restricted(s.endpoint_by_name(batch).unwrap()));
        assert_eq!(l3(&s, batch, "8.8.8.8", 443, Tcp), None);
        assert_eq!(l3(&s, batch, "10.7.0.1", 443, Tcp), Some(true));
        assert_eq!(l3(&s, batch, "169.254.169.254", 80, Tcp), Some(false));
        assert_eq!(dns(&s, batch, kdns, Udp, "a.ok.com"), Allow);
        assert_eq!(dns(&s, batch, "8.8.8.8:53", Udp, "a.ok.com"), Deny);
        assert_eq!(fqdn(&s, batch, "api.ok.com").as_deref(), Some("*"));
        // `enableDefaultDeny: {egress: true}` without rules: default deny, nothing allowed.
        let locked = "team-b/uploader";
        assert!(s.is_restricted(s.endpoint_by_name(locked).unwrap()));
        assert_eq!(l3(&s, locked, "8.8.8.8", 443, Tcp), None);
        assert_eq!(l3(&s, locked, "169.254.169.254", 80, Tcp), Some(false));
        assert_eq!(dns(&s, locked, kdns, Udp, "a.ok.com"), Allow);
        assert_eq!(dns(&s, locked, kdns, Udp, "evil.com"), Deny);
        // Without the broad policy, a default-allow policy with plain allows only restricts
        // nothing: the endpoint is not enforced.
        let quiet = PolicySet::from_yaml(
            Path::new("q.yaml"),
            r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: quiet, namespace: team-a}
spec:
  endpointSelector: {matchLabels: {app: other}}
  enableDefaultDeny: {egress: false}
  egress:
  - toCIDR: [10.8.0.0/16]
  - toFQDNs: [{matchName: api.ok.com}]
"#,
        )
        .unwrap();
        let e = Endpoints::from_yaml(Path::new("e.yaml"), ENDPOINTS).unwrap();
        let q = Snapshot::compile(&quiet, &e);
        let other = q.endpoint_by_name("team-a/other").unwrap();
        assert!(!q.is_restricted(other));
        assert_eq!(dns(&q, "team-a/other", kdns, Udp, "evil.com"), Unrestricted);
    }

    /// Under `enableDefaultDeny.egress: false` an L7 entry cannot fail closed (the endpoint is
    /// default allow), so it is rejected; a non-boolean value is rejected too.
    #[test]
    fn enable_default_deny_rejects_what_it_cannot_keep_closed() {
        let text = r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: l7, namespace: team-a}
spec:
  endpointSelector: {}
  enableDefaultDeny: {egress: false, ingress: "no"}
  egress:
  - toFQDNs: [{matchName: api.ok.com}]
    toPorts:
    - ports: [{port: "443", protocol: TCP}]
      rules: {http: [{method: GET}]}
"#;
        let err = PolicySet::from_yaml(Path::new("p.yaml"), text)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("p.yaml:7: spec.enableDefaultDeny.ingress: expected true or false"),
            "{err}"
        );
        assert!(
            err.contains(
                "p.yaml:11: spec.egress[0].toPorts[0].rules.http: an L7 entry under \
                 enableDefaultDeny.egress: false cannot be enforced"
            ),
            "{err}"
        );
    }

    /// `reserved:` label sources: in `toEndpoints`, a lone `reserved:NAME` selects the entity
    /// NAME (also in a CNP, whose namespace is not added to it); unknown or mixed ones get a
    /// note and allow nothing; in an `endpointSelector` they select no dnsfence endpoint.
    #[test]
    fn reserved_labels_select_entities_and_nothing_else() {
        use crate::PortProtocol::Tcp;
        use crate::cidr::{Cidr, NodeFacts};
        let text = r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: res, namespace: team-a}
spec:
  endpointSelector: {matchLabels: {app: uploader}}
  egress:
  - toEndpoints: [{matchLabels: {"reserved:host": ""}}]
    toPorts: [{ports: [{port: "9100", protocol: TCP}]}]
  - toEndpoints: [{matchLabels: {"reserved:world": ""}}, {matchLabels: {app: other}}]
    toPorts: [{ports: [{port: "443", protocol: TCP}]}]
  - toEndpoints: [{matchLabels: {"reserved:kube-apiserver": ""}}]
    toPorts: [{ports: [{port: "6443", protocol: TCP}]}]
  - toEndpoints: [{matchLabels: {"reserved:init": ""}}]
  - toEndpoints: [{matchLabels: {"reserved:bogus": ""}}]
  - toEndpoints: [{matchLabels: {"reserved:host": "", app: other}}]
    toPorts: [{ports: [{port: "7000", protocol: TCP}]}]
  - toEndpoints: [{matchLabels: {"reserved:host": ""}}]
    toPorts: [{ports: [{port: "53", protocol: UDP}], rules: {dns: [{matchPattern: "*"}]}}]
  egressDeny:
  - toEndpoints: [{matchLabels: {"reserved:world": ""}}]
    toPorts: [{ports: [{port: "25", protocol: TCP}]}]
---
apiVersion: cilium.io/v2
kind: CiliumClusterwideNetworkPolicy
metadata: {name: health}
spec:
  endpointSelector: {matchLabels: {"reserved:health": ""}}
  egress:
  - toEntities: [all]
"#;
        let p = PolicySet::from_yaml(Path::new("p.yaml"), text).unwrap_or_else(|e| panic!("{e}"));
        let notes = p.notes();
        let expected = [
            "p.yaml:14: note: spec.egress[3].toEndpoints[0]: reserved:init is an identity \
             dnsfence cannot tell",
            "p.yaml:15: note: spec.egress[4].toEndpoints[0]: reserved:bogus is no reserved \
             identity dnsfence knows",
            "p.yaml:16: note: spec.egress[5].toEndpoints[0]: reserved:host: dnsfence endpoints \
             carry no reserved: labels",
            "p.yaml:28: note: spec.endpointSelector: reserved:health: dnsfence endpoints carry \
             no reserved: labels",
        ];
        assert_eq!(notes.len(), expected.len(), "{notes:#?}");
        for (note, want) in notes.iter().zip(expected) {
            assert!(
                note.starts_with(want),
                "{note}\n  does not start with\n{want}"
            );
        }
        let e = Endpoints::from_yaml(Path::new("e.yaml"), ENDPOINTS).unwrap();
        let node = NodeFacts {
            kube_apiserver: vec![Cidr::parse("192.0.2.10").unwrap()],
            ..NodeFacts::default()
        };
        let s = Snapshot::compile_on(&p, &e, &[], &node);
        let ep = "team-a/uploader";
        assert_eq!(l3(&s, ep, "127.0.0.1", 9100, Tcp), Some(true), "host");
        assert_eq!(l3(&s, ep, "::1", 9100, Tcp), Some(true), "host");
        assert_eq!(l3(&s, ep, "8.8.8.8", 9100, Tcp), None);
        assert_eq!(l3(&s, ep, "8.8.8.8", 443, Tcp), Some(true), "world");
        assert_eq!(l3(&s, ep, "2001:db8::1", 443, Tcp), Some(true), "world");
        assert_eq!(
            l3(&s, ep, "127.0.0.1", 443, Tcp),
            None,
            "the node is not world"
        );
        assert_eq!(l3(&s, ep, "10.0.1.6", 443, Tcp), Some(true), "the k8s peer");
        assert_eq!(l3(&s, ep, "192.0.2.10", 6443, Tcp), Some(true), "apiserver");
        assert_eq!(l3(&s, ep, "8.8.8.8", 25, Tcp), Some(false), "deny world");
        assert_eq!(l3(&s, ep, "127.0.0.1", 7000, Tcp), None, "mixed: nothing");
        assert_eq!(l3(&s, ep, "10.0.1.6", 7000, Tcp), None, "mixed: nothing");
        // The DNS rule towards reserved:host: the node's addresses are its servers.
        assert_eq!(dns(&s, ep, "127.0.0.1:53", Udp, "a.com"), Allow);
        assert_eq!(dns(&s, ep, "10.96.0.10:53", Udp, "a.com"), Deny);
        // reserved:health selects no dnsfence endpoint.
        let batch = s.endpoint_by_name("team-b/batch").unwrap();
        assert!(!s.is_restricted(batch));
    }

    /// `port: "0"` is every port (Cilium's wildcard), for L3 rules, toFQDNs and DNS rules.
    #[test]
    fn port_zero_is_every_port() {
        use crate::PortProtocol::{Tcp, Udp as U};
        let s = snapshot(
            r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: zero, namespace: team-a}
spec:
  endpointSelector: {matchLabels: {app: uploader}}
  egress:
  - toCIDR: [10.7.0.0/16]
    toPorts: [{ports: [{port: "0", protocol: TCP}]}]
  - toFQDNs: [{matchName: api.ok.com}]
    toPorts: [{ports: [{port: 0, protocol: UDP}]}]
"#,
        );
        let ep = "team-a/uploader";
        assert_eq!(l3(&s, ep, "10.7.0.1", 1, Tcp), Some(true));
        assert_eq!(l3(&s, ep, "10.7.0.1", 65535, Tcp), Some(true));
        assert_eq!(l3(&s, ep, "10.7.0.1", 53, U), None, "TCP only");
        assert_eq!(fqdn(&s, ep, "api.ok.com").as_deref(), Some("0-65535/udp"));
        // DNS rules on port 0 (and on ranges) are refused, as Cilium refuses them:
        // testdata/bad/cilium-port-rules.yaml.
    }

    /// Review findings 3, 5, 8, 9, 10: where a CNP's namespace applies, and what Cilium
    /// does with deny rules' L7 parts.
    #[test]
    fn namespaces_of_cnp_selectors_follow_cilium() {
        use crate::PortProtocol::Tcp;
        // An empty namespace is the default one (Kubernetes: the request's), not none.
        let s = snapshot(
            r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: p, namespace: ""}
spec:
  endpointSelector: {}
  egress: [{}]
"#,
        );
        let e = Endpoints::from_yaml(
            Path::new("e.yaml"),
            "endpoints:\n- {name: c, namespace: default, labels: {app: c}, ips: [\"10.0.9.1\"]}\n",
        )
        .unwrap();
        let p = PolicySet::from_yaml(
            Path::new("p.yaml"),
            "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: p, namespace: \"\"}\nspec:\n  endpointSelector: {}\n  egress: [{}]\n",
        )
        .unwrap();
        let only_default = Snapshot::compile(&p, &e);
        let c = only_default.endpoint_by_name("default/c").unwrap();
        assert!(
            only_default.is_restricted(c),
            "namespace \"\" enforced nothing"
        );
        assert!(!s.is_restricted(s.endpoint_by_name("team-a/uploader").unwrap()));

        // toEndpoints on namespace labels, or with a reserved: requirement, is not confined
        // to the CNP's namespace (Cilium's getEndpointSelector); a plain one is.
        let with_namespace_labels = ENDPOINTS.replace(
            "labels: {app: batch, tier: jobs}",
            "labels: {app: batch, tier: jobs, io.cilium.k8s.namespace.labels.team: b}",
        );
        assert_ne!(with_namespace_labels, ENDPOINTS);
        let s = |policy: &str| {
            Snapshot::compile(
                &PolicySet::from_yaml(Path::new("p.yaml"), policy).unwrap(),
                &Endpoints::from_yaml(Path::new("e.yaml"), &with_namespace_labels).unwrap(),
            )
        };
        let s = s(r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: p, namespace: team-a}
spec:
  endpointSelector: {matchLabels: {app: uploader}}
  egress:
  - toEndpoints: [{matchLabels: {"k8s:io.cilium.k8s.namespace.labels.team": b}}]
    toPorts: [{ports: [{port: "80", protocol: TCP}]}]
  - toEndpoints: [{matchLabels: {app: batch}, matchExpressions: [{key: "reserved:init", operator: DoesNotExist}]}]
    toPorts: [{ports: [{port: "81", protocol: TCP}]}]
  - toEndpoints: [{matchLabels: {app: batch}}]
    toPorts: [{ports: [{port: "82", protocol: TCP}]}]
"#);
        let ep = "team-a/uploader";
        // team-b/batch (10.0.2.6) carries the namespace label.
        assert_eq!(
            l3(&s, ep, "10.0.2.6", 80, Tcp),
            Some(true),
            "namespace labels"
        );
        assert_eq!(l3(&s, ep, "10.0.2.5", 80, Tcp), None, "no namespace label");
        assert_eq!(
            l3(&s, ep, "10.0.2.6", 81, Tcp),
            Some(true),
            "reserved: requirement"
        );
        assert_eq!(l3(&s, ep, "10.0.2.6", 82, Tcp), None, "plain: confined");

        // An endpointSelector naming another namespace: the match is replaced by the
        // policy's own, with a note (Cilium: "removing illegal namespace match").
        let text = r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: p, namespace: team-a}
spec:
  endpointSelector: {matchLabels: {"k8s:io.kubernetes.pod.namespace": team-b, app: uploader}}
  egress: [{}]
  egressDeny:
  - toPorts: [{ports: [{port: "80", protocol: TCP}], rules: {http: [{method: GET}]}}]
"#;
        let p = PolicySet::from_yaml(Path::new("p.yaml"), text).unwrap_or_else(|e| panic!("{e}"));
        let notes: Vec<&str> = p
            .policies
            .iter()
            .flat_map(|p| &p.notes)
            .map(|(_, n)| n.as_str())
            .collect();
        assert!(
            notes
                .iter()
                .any(|n| n.contains("replaced by io.kubernetes.pod.namespace=team-a")),
            "{notes:?}"
        );
        assert!(
            notes
                .iter()
                .any(|n| n.contains("rules.http has no meaning in egressDeny")),
            "{notes:?}"
        );
        let s = snapshot(text);
        assert!(s.is_restricted(s.endpoint_by_name("team-a/uploader").unwrap()));
        assert!(!s.is_restricted(s.endpoint_by_name("team-b/uploader").unwrap()));
        assert_eq!(
            l3(&s, ep, "203.0.113.1", 80, Tcp),
            Some(false),
            "the deny's ports"
        );
    }

    /// `toServices` reaches the addresses (ClusterIPs and backends) of the services the
    /// registry knows by name or by their own labels, in the policy's namespace unless it
    /// names another, on the rule's ports; a service the registry does not know allows
    /// nothing. Mutual authentication (dnsfence cannot do it) loads with a note and its rule
    /// allows nothing while the rest of the policy works. `authentication.mode: disabled`
    /// asks for nothing.
    #[test]
    fn to_services_and_authentication() {
        use crate::PortProtocol::{Tcp, Udp};
        let text = r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: svc, namespace: team-a}
spec:
  endpointSelector: {matchLabels: {app: uploader}}
  egress:
  - toServices:
    - k8sService: {serviceName: db}
    - k8sServiceSelector: {selector: {matchLabels: {external: "yes"}}, namespace: shared}
    - k8sService: {serviceName: unknown}
    toPorts: [{ports: [{port: "5432", protocol: TCP}]}]
  - toEndpoints: [{matchLabels: {app: other}}]
    authentication: {mode: required}
  - toCIDR: [10.7.0.0/16]
    auth: {type: "null"}
  - toCIDR: [10.8.0.0/16]
    authentication: {mode: disabled}
  - toFQDNs: [{matchName: api.ok.com}]
  - toServices: [{k8sService: {serviceName: dns, namespace: kube-system}}]
    toPorts: [{ports: [{port: "53", protocol: ANY}], rules: {dns: [{matchName: via.service.com}]}}]
"#;
        let p = PolicySet::from_yaml(Path::new("p.yaml"), text).unwrap_or_else(|e| panic!("{e}"));
        let notes = p.notes();
        let expected = [
            "p.yaml:14: note: spec.egress[1].authentication.mode: required: dnsfence cannot do \
             mutual authentication: this rule allows nothing",
            "p.yaml:16: note: spec.egress[2].auth.type: null: dnsfence cannot do mutual",
        ];
        assert_eq!(notes.len(), expected.len(), "{notes:#?}");
        for (note, want) in notes.iter().zip(expected) {
            assert!(
                note.starts_with(want),
                "{note}\n  does not start with\n{want}"
            );
        }
        let endpoints = format!(
            "{ENDPOINTS}{}",
            r#"
services:
- {name: db, namespace: team-a, selector: {app: db}, ips: ["10.96.1.1"], backends: ["10.1.1.1"]}
- {name: db, namespace: team-b, selector: {app: db}, ips: ["10.96.2.2"]}
- {name: ext, namespace: shared, labels: {external: "yes"}, ips: ["10.96.3.3"], backends: ["203.0.113.7"]}
- {name: ext2, namespace: team-a, labels: {external: "yes"}, ips: ["10.96.4.4"]}
- {name: dns, namespace: kube-system, ips: ["10.96.0.53"]}
"#
        );
        let e =
            Endpoints::from_yaml(Path::new("e.yaml"), &endpoints).unwrap_or_else(|e| panic!("{e}"));
        let s = Snapshot::compile(&p, &e);
        let ep = "team-a/uploader";
        // By name, in the policy's namespace: its ClusterIP and backend, on the port only.
        assert_eq!(l3(&s, ep, "10.96.1.1", 5432, Tcp), Some(true));
        assert_eq!(l3(&s, ep, "10.1.1.1", 5432, Tcp), Some(true), "backend");
        assert_eq!(l3(&s, ep, "10.96.1.1", 5433, Tcp), None, "port");
        assert_eq!(l3(&s, ep, "10.96.1.1", 5432, Udp), None, "protocol");
        assert_eq!(l3(&s, ep, "10.96.2.2", 5432, Tcp), None, "team-b's db");
        // By the service's own labels, in the namespace named.
        assert_eq!(l3(&s, ep, "10.96.3.3", 5432, Tcp), Some(true));
        assert_eq!(
            l3(&s, ep, "203.0.113.7", 5432, Tcp),
            Some(true),
            "external backend"
        );
        assert_eq!(l3(&s, ep, "10.96.4.4", 5432, Tcp), None, "other namespace");
        // toServices + toPorts is never "every destination on 5432".
        assert_eq!(l3(&s, ep, "8.8.8.8", 5432, Tcp), None);
        // A selector-less service's backends are not `cluster` (its slices may list any
        // address); a selector service's (its pods) are.
        let cluster = PolicySet::from_yaml(
            Path::new("c.yaml"),
            "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: c, namespace: team-a}\n\
             spec:\n  endpointSelector: {matchLabels: {app: uploader}}\n  egress:\n  \
             - toEntities: [cluster]\n",
        )
        .unwrap();
        let c = Snapshot::compile(&cluster, &e);
        assert_eq!(
            l3(&c, ep, "203.0.113.7", 80, Tcp),
            None,
            "selector-less backend"
        );
        assert_eq!(
            l3(&c, ep, "10.96.3.3", 80, Tcp),
            Some(true),
            "its ClusterIP"
        );
        assert_eq!(
            l3(&c, ep, "10.1.1.1", 80, Tcp),
            Some(true),
            "a selector service's pod"
        );
        // A DNS rule towards a service (without a selector: toServices only).
        assert_eq!(
            dns(
                &s,
                ep,
                "10.96.0.53:53",
                crate::Proto::Udp,
                "via.service.com"
            ),
            Allow
        );
        assert_eq!(
            dns(
                &s,
                ep,
                "10.96.0.54:53",
                crate::Proto::Udp,
                "via.service.com"
            ),
            Deny
        );
        assert_eq!(l3(&s, ep, "10.0.1.6", 80, Tcp), None, "auth: nothing");
        assert_eq!(l3(&s, ep, "10.7.0.1", 80, Tcp), None, "auth: nothing");
        assert_eq!(l3(&s, ep, "10.8.0.1", 80, Tcp), Some(true), "disabled");
        assert_eq!(fqdn(&s, ep, "api.ok.com").as_deref(), Some("*"));
        assert!(s.is_restricted(s.endpoint_by_name(ep).unwrap()));
        // No services known (the file source without `services`): the rule allows nothing.
        let bare = Endpoints::from_yaml(Path::new("e.yaml"), ENDPOINTS).unwrap();
        let s = Snapshot::compile(&p, &bare);
        assert_eq!(l3(&s, ep, "10.96.1.1", 5432, Tcp), None);
        assert_eq!(l3(&s, ep, "8.8.8.8", 5432, Tcp), None);
        assert_eq!(
            dns(
                &s,
                ep,
                "10.96.0.53:53",
                crate::Proto::Udp,
                "via.service.com"
            ),
            Deny
        );
        // Validated like any field; mixed with another L3 selector, as Cilium refuses; and not
        // under default allow, where "nothing" would let the traffic through.
        let bad = r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: svc, namespace: team-a}
spec:
  endpointSelector: {}
  egress:
  - toServices: [{k8sService: {namespace: x}}]
  - toServices: [{k8sService: {serviceName: a}}]
    toCIDR: [10.0.0.0/8]
  - authentication: {mode: 3}
---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: open, namespace: team-a}
spec:
  endpointSelector: {}
  enableDefaultDeny: {egress: false}
  egress:
  - toCIDR: [10.0.0.0/8]
    authentication: {mode: required}
"#;
        let err = PolicySet::from_yaml(Path::new("b.yaml"), bad)
            .unwrap_err()
            .to_string();
        for want in [
            "b.yaml:8: spec.egress[0].toServices[0].k8sService.serviceName: required field missing",
            "b.yaml:9: spec.egress[1]: toCIDR/toCIDRSet, toEntities, toServices and \
             toFQDNs/toEndpoints cannot be combined",
            "b.yaml:11: spec.egress[2].authentication.mode: expected a string",
            "b.yaml:20: spec.egress[0].authentication.mode: required: mutual authentication \
             under enableDefaultDeny.egress: false cannot be enforced",
        ] {
            assert!(err.contains(want), "no {want:?} in\n{err}");
        }
    }

    /// `icmps`: ICMP / ICMPv6 types as the L4 part of a rule (allow and deny); an L3 rule
    /// without `toPorts` allows ICMP too, `protocol: ANY` does not (it is TCP, UDP, SCTP).
    #[test]
    fn icmps_allow_and_deny_icmp_types() {
        use crate::PortProtocol::{Icmp, Icmp6, Tcp};
        let s = snapshot(
            r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: icmp, namespace: team-a}
spec:
  endpointSelector: {matchLabels: {app: uploader}}
  egress:
  - toCIDR: [10.7.0.0/16, "2001:db8::/32"]
    icmps: [{fields: [{type: 8, family: IPv4}, {type: "128", family: IPv6}]}]
  - toCIDR: [10.6.0.0/16, "2001:db9::/32"]
    icmps: [{fields: [{type: EchoRequest}, {type: NeighborSolicitation, family: IPv6}]}]
  - toCIDR: [10.8.0.0/16]
  - toCIDR: [10.9.0.0/16]
    toPorts: [{ports: [{port: "0", protocol: ANY}]}]
  - icmps: [{fields: [{type: 3}]}]
  - toFQDNs: [{matchName: api.ok.com}]
    icmps: [{fields: [{type: 8}]}]
  egressDeny:
  - toCIDR: [10.8.9.0/24]
    icmps: [{fields: [{type: 8}]}]
"#,
        );
        let ep = "team-a/uploader";
        assert_eq!(l3(&s, ep, "10.7.0.1", 8, Icmp), Some(true), "echo");
        // Cilium's type names, per family: EchoRequest is 8 (IPv4), NeighborSolicitation 135.
        assert_eq!(l3(&s, ep, "10.6.0.1", 8, Icmp), Some(true), "EchoRequest");
        assert_eq!(l3(&s, ep, "10.6.0.1", 0, Icmp), None, "EchoReply not named");
        assert_eq!(l3(&s, ep, "2001:db9::1", 135, Icmp6), Some(true));
        assert_eq!(l3(&s, ep, "2001:db9::1", 128, Icmp6), None);
        assert_eq!(l3(&s, ep, "10.7.0.1", 13, Icmp), None, "timestamp");
        assert_eq!(l3(&s, ep, "10.7.0.1", 8, Tcp), None, "not TCP port 8");
        assert_eq!(l3(&s, ep, "2001:db8::1", 128, Icmp6), Some(true));
        assert_eq!(l3(&s, ep, "2001:db8::1", 8, Icmp6), None);
        assert_eq!(l3(&s, ep, "10.8.0.1", 13, Icmp), Some(true), "L3 only: all");
        assert_eq!(l3(&s, ep, "10.8.0.1", 443, Tcp), Some(true));
        assert_eq!(l3(&s, ep, "10.9.0.1", 8, Icmp), None, "ANY is not ICMP");
        assert_eq!(l3(&s, ep, "10.9.0.1", 443, Tcp), Some(true));
        assert_eq!(
            l3(&s, ep, "8.8.8.8", 3, Icmp),
            Some(true),
            "no L3: anywhere"
        );
        assert_eq!(l3(&s, ep, "8.8.8.8", 3, Icmp6), None, "family");
        assert_eq!(l3(&s, ep, "10.8.9.1", 8, Icmp), Some(false), "denied echo");
        assert_eq!(l3(&s, ep, "10.8.9.1", 13, Icmp), Some(true));
        assert_eq!(fqdn(&s, ep, "api.ok.com").as_deref(), Some("8/icmp"));

        let bad = r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: icmp, namespace: team-a}
spec:
  endpointSelector: {}
  egress:
  - toCIDR: [10.0.0.0/8]
    icmps: [{fields: [{type: 8}]}]
    toPorts: [{ports: [{port: "80"}]}]
  - icmps: [{fields: [{type: EchoRequst}, {type: 300}, {type: 8, family: IPv5}]}]
  - icmps: [{fields: []}]
  - icmps: [{fields: [{type: NeighborSolicitation}, {type: PacketTooBig, family: IPv6}]}]
"#;
        let err = PolicySet::from_yaml(Path::new("b.yaml"), bad)
            .unwrap_err()
            .to_string();
        for want in [
            "b.yaml:8: spec.egress[0]: icmps and toPorts cannot be combined",
            "b.yaml:11: spec.egress[1].icmps[0].fields[0].type: expected an ICMP type: a number \
             0-255 or one of Cilium's IPv4 type names",
            "b.yaml:11: spec.egress[1].icmps[0].fields[1].type: expected an ICMP type",
            "b.yaml:11: spec.egress[1].icmps[0].fields[2].family: unknown family \"IPv5\"",
            "b.yaml:12: spec.egress[2].icmps[0].fields: empty list",
            // An IPv6 name under the default family (IPv4) is no IPv4 type.
            "b.yaml:13: spec.egress[3].icmps[0].fields[0].type: expected an ICMP type",
        ] {
            assert!(err.contains(want), "no {want:?} in\n{err}");
        }
    }

    /// DNS rules under `toCIDR`/`toCIDRSet` and `toEntities` judge the server the query was
    /// addressed to by address (and `toEndpoints` beside a `reserved:` entity by both).
    #[test]
    fn dns_rules_towards_cidrs_and_entities() {
        use crate::cidr::{Cidr, NodeFacts};
        let text = r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: dns-by-address, namespace: team-a}
spec:
  endpointSelector: {matchLabels: {app: uploader}}
  egress:
  - toCIDRSet: [{cidr: 10.53.0.0/16, except: [10.53.9.0/24]}]
    toPorts: [{ports: [{port: "53", protocol: UDP}], rules: {dns: [{matchName: cidr.ok.com}]}}]
  - toEntities: [host]
    toPorts: [{ports: [{port: "53", protocol: ANY}], rules: {dns: [{matchName: host.ok.com}]}}]
  - toEndpoints: [{matchLabels: {"reserved:kube-apiserver": ""}}, {matchLabels: {app: dns}}]
    toPorts: [{ports: [{port: "53", protocol: UDP}], rules: {dns: [{matchName: mixed.ok.com}]}}]
"#;
        let p = PolicySet::from_yaml(Path::new("p.yaml"), text).unwrap_or_else(|e| panic!("{e}"));
        assert!(p.notes().is_empty(), "{:?}", p.notes());
        let e = Endpoints::from_yaml(Path::new("e.yaml"), ENDPOINTS).unwrap();
        let node = NodeFacts {
            host: vec![Cidr::parse("192.0.2.7").unwrap()],
            kube_apiserver: vec![Cidr::parse("192.0.2.10").unwrap()],
            ..NodeFacts::default()
        };
        let s = Snapshot::compile_on(&p, &e, &[], &node);
        let ep = "team-a/uploader";
        let cases = [
            ("10.53.1.1:53", "cidr.ok.com", Allow),
            ("10.53.9.1:53", "cidr.ok.com", Deny), // the exception
            ("10.54.1.1:53", "cidr.ok.com", Deny),
            ("10.53.1.1:53", "host.ok.com", Deny), // not the node
            ("192.0.2.7:53", "host.ok.com", Allow),
            ("192.0.2.7:53", "cidr.ok.com", Deny),
            ("192.0.2.10:53", "mixed.ok.com", Allow), // reserved:kube-apiserver
            ("10.0.1.53:53", "mixed.ok.com", Allow),  // the registered app=dns endpoint
            ("10.96.0.10:53", "mixed.ok.com", Deny),
        ];
        for (server, name, want) in cases {
            assert_eq!(dns(&s, ep, server, Udp, name), want, "{server} {name}");
        }
        assert_eq!(dns(&s, ep, "192.0.2.7:53", Tcp, "host.ok.com"), Allow);
        assert_eq!(
            dns(&s, ep, "10.53.1.1:53", Tcp, "cidr.ok.com"),
            Deny,
            "UDP only"
        );
    }

    /// Services stand for the pods their selector picks: a `toEndpoints` selector reaches a
    /// service's addresses (ClusterIPs and backends) when it selects every pod the service can
    /// pick, for DNS servers and for L3 alike; never when a pod behind it might not match.
    #[test]
    fn services_are_reached_by_selectors_that_select_all_their_pods() {
        use crate::PortProtocol::Tcp as T;
        use crate::cidr::NodeFacts;
        let endpoints = format!(
            "{ENDPOINTS}{}",
            r#"
services:
- {name: kube-dns, namespace: kube-system, labels: {k8s-app: kube-dns}, selector: {k8s-app: kube-dns}, ips: ["10.96.0.10", "fd00:96::a"], backends: ["10.244.9.9"]}
- {name: db, namespace: team-a, selector: {app: db, tier: data}, ips: ["10.96.5.5"]}
- {name: db, namespace: team-b, selector: {app: db, tier: data}, ips: ["10.96.6.6"]}
"#
        );
        let text = r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: svc, namespace: team-a}
spec:
  endpointSelector: {matchLabels: {app: uploader}}
  egress:
  - toEndpoints: [{matchLabels: {"k8s:io.kubernetes.pod.namespace": kube-system, k8s-app: kube-dns}}]
    toPorts: [{ports: [{port: "53", protocol: ANY}], rules: {dns: [{matchPattern: "*"}]}}]
  - toEndpoints: [{matchLabels: {app: db}}]
    toPorts: [{ports: [{port: "5432", protocol: TCP}]}]
  - toEndpoints: [{matchLabels: {app: db}, matchExpressions: [{key: tier, operator: NotIn, values: [cache]}]}]
    toPorts: [{ports: [{port: "5433", protocol: TCP}]}]
  - toEndpoints: [{matchLabels: {app: db}, matchExpressions: [{key: version, operator: NotIn, values: [v1]}]}]
    toPorts: [{ports: [{port: "5434", protocol: TCP}]}]
  - toEndpoints: [{matchLabels: {app: db}, matchExpressions: [{key: canary, operator: DoesNotExist}]}]
    toPorts: [{ports: [{port: "5435", protocol: TCP}]}]
  - toEndpoints: [{matchLabels: {app: db, version: v2}}]
    toPorts: [{ports: [{port: "5436", protocol: TCP}]}]
  - toEntities: [world]
    toPorts: [{ports: [{port: "8080", protocol: TCP}]}]
"#;
        let p = PolicySet::from_yaml(Path::new("p.yaml"), text).unwrap_or_else(|e| panic!("{e}"));
        let e =
            Endpoints::from_yaml(Path::new("e.yaml"), &endpoints).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(e.services.len(), 3);
        let s = Snapshot::compile_on(&p, &e, &[], &NodeFacts::default());
        let ep = "team-a/uploader";
        // DNS: the ClusterIPs and the backend, nothing else.
        for server in ["10.96.0.10:53", "[fd00:96::a]:53", "10.244.9.9:53"] {
            assert_eq!(dns(&s, ep, server, Udp, "example.com"), Allow, "{server}");
        }
        assert_eq!(dns(&s, ep, "10.96.0.11:53", Udp, "example.com"), Deny);
        // Service addresses never identify a client.
        assert!(s.endpoint_by_ip("10.96.5.5".parse().unwrap()).is_none());
        // L3: the namespace is the policy's (team-a's db only).
        assert_eq!(l3(&s, ep, "10.96.5.5", 5432, T), Some(true));
        assert_eq!(l3(&s, ep, "10.96.6.6", 5432, T), None, "team-b's db");
        // NotIn on a key the service fixes to another value: every pod matches.
        assert_eq!(
            l3(&s, ep, "10.96.5.5", 5433, T),
            Some(true),
            "tier NotIn cache"
        );
        // NotIn or DoesNotExist on a key a pod may carry, or a label the service does not
        // fix: some pod behind it might not match, so not the service.
        assert_eq!(l3(&s, ep, "10.96.5.5", 5434, T), None, "version NotIn v1");
        assert_eq!(
            l3(&s, ep, "10.96.5.5", 5435, T),
            None,
            "canary DoesNotExist"
        );
        assert_eq!(l3(&s, ep, "10.96.5.5", 5436, T), None, "version v2");
        // Service addresses are inside the cluster: not `world`.
        assert_eq!(l3(&s, ep, "10.96.5.5", 8080, T), None, "world");
        assert_eq!(l3(&s, ep, "203.0.113.9", 8080, T), Some(true), "world");

        // Without the service, the kube-dns ClusterIP is only a registered endpoint's address
        // when the endpoints file says so (the old workaround): here it does, so drop the
        // fake endpoint and the service to see the rule deny.
        let bare = ENDPOINTS.replace(
            r#"- {name: kube-dns, namespace: kube-system, labels: {k8s-app: kube-dns}, ips: ["10.96.0.10"]}"#,
            "",
        );
        assert_ne!(bare, ENDPOINTS);
        let e = Endpoints::from_yaml(Path::new("e.yaml"), &bare).unwrap();
        let s = Snapshot::compile_on(&p, &e, &[], &NodeFacts::default());
        assert_eq!(dns(&s, ep, "10.96.0.10:53", Udp, "example.com"), Deny);
    }

    #[test]
    fn snapshot_is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<Snapshot>();
        check::<std::sync::Arc<Snapshot>>();
    }

    #[test]
    fn ten_thousand_patterns_compile_and_answer() {
        use std::fmt::Write;
        let mut doc = String::from(
            "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: big, namespace: team-a}\n\
             spec:\n  endpointSelector: {}\n  egress:\n  - toPorts:\n    - ports: [{port: \"53\"}]\n      rules:\n        dns:\n",
        );
        for i in 0..5_000 {
            writeln!(doc, "        - matchPattern: \"*.svc{i}.example.com\"").unwrap();
        }
        doc.push_str("  - toFQDNs:\n");
        for i in 0..5_000 {
            writeln!(doc, "    - matchName: \"host{i}.example.org\"").unwrap();
        }
        doc.push_str("    toPorts: [{ports: [{port: \"443\", protocol: TCP}]}]\n");
        let p = PolicySet::from_yaml(Path::new("big.yaml"), &doc).unwrap();
        assert_eq!(p.summary().patterns, 10_000);
        let s = snapshot(&doc);
        assert_eq!(s.stats().groups, 1, "all team-a endpoints share one group");
        for ep in ["team-a/uploader", "team-a/other", "team-a/local-dns"] {
            assert_eq!(
                dns(&s, ep, "1.1.1.1:53", Udp, "a.svc4999.example.com"),
                Allow
            );
            assert_eq!(dns(&s, ep, "1.1.1.1:53", Udp, "a.svc0.example.com"), Allow);
            assert_eq!(dns(&s, ep, "1.1.1.1:53", Udp, "svc17.example.com"), Deny);
            assert_eq!(
                dns(&s, ep, "1.1.1.1:53", Udp, "a.svc5000.example.com"),
                Deny
            );
            assert_eq!(
                fqdn(&s, ep, "host4321.example.org").as_deref(),
                Some("443/tcp")
            );
            assert_eq!(fqdn(&s, ep, "host5000.example.org"), None);
        }
        assert_eq!(
            dns(&s, "team-b/batch", "1.1.1.1:53", Udp, "x.com"),
            Unrestricted
        );
    }
}

#[test]
fn load_collects_policy_and_endpoint_errors_and_reads_directories() {
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata");
    let good = crate::load(
        &[data.join("good")],
        Some(&data.join("spec-example-endpoints.yaml")),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(good.endpoints().count(), 4);
    assert_eq!(good.generation(), 0);
    let set = PolicySet::load(&[data.join("good")]).unwrap();
    assert_eq!(set.files.len(), 2, "notes.txt is not read: {:?}", set.files);

    let errors = crate::load(
        &[data.join("bad/bad-ports.yaml")],
        Some(&data.join("bad-endpoints/bad-fields.yaml")),
    )
    .unwrap_err();
    let files: Vec<&str> = errors
        .errors()
        .iter()
        .map(|e| e.file.file_name().unwrap().to_str().unwrap())
        .collect();
    assert_eq!(files.iter().filter(|f| **f == "bad-ports.yaml").count(), 7);
    assert_eq!(files.iter().filter(|f| **f == "bad-fields.yaml").count(), 8);
    assert_eq!(errors.to_string().lines().count(), 15);

    let empty = std::env::temp_dir().join(format!("dnsfence-policy-empty-{}", std::process::id()));
    std::fs::create_dir_all(&empty).unwrap();
    std::fs::write(empty.join(".hidden.yaml"), "not: read").unwrap();
    let errors = PolicySet::load(std::slice::from_ref(&empty)).unwrap_err();
    std::fs::remove_dir_all(&empty).unwrap();
    assert_eq!(
        errors.to_string(),
        format!(
            "{}:0: no *.yaml or *.yml files in directory",
            empty.display()
        )
    );
}
