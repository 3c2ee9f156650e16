//! `dnsfence policy validate|check` as users and scripts call them (shared/spec/interfaces.md).

use std::path::PathBuf;
use std::process::{Command, Output};

fn dnsfence(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_dnsfence"))
        .args(args)
        .output()
        .expect("spawn dnsfence")
}

fn testdata(name: &str) -> String {
    format!("{}/../policy/testdata/{name}", env!("CARGO_MANIFEST_DIR"))
}

fn text(bytes: &[u8]) -> &str {
    std::str::from_utf8(bytes).unwrap()
}

#[test]
fn validate_good_file_prints_summary() {
    let out = dnsfence(&["policy", "validate", &testdata("spec-example.yaml")]);
    assert_eq!(text(&out.stderr), "");
    assert_eq!(
        text(&out.stdout),
        "ok: 1 file, 1 policy, 2 rules, 3 patterns\n"
    );
    assert!(out.status.success());
}

#[test]
fn validate_directory_reads_yaml_and_yml_only() {
    let out = dnsfence(&[
        "policy",
        "validate",
        &testdata("good"),
        "--endpoints",
        &testdata("spec-example-endpoints.yaml"),
    ]);
    assert_eq!(text(&out.stderr), "");
    assert_eq!(
        text(&out.stdout),
        "ok: 2 files, 3 policies, 4 rules, 4 patterns, 4 endpoints\n"
    );
    assert!(out.status.success());
}

#[test]
fn validate_counts_with_thousands_separators() {
    let dir = std::env::temp_dir().join(format!("dnsfence-policy-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut doc = String::from(
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: big}\nspec:\n  \
         endpointSelector: {}\n  egress:\n  - toFQDNs:\n",
    );
    for i in 0..10_004 {
        doc.push_str(&format!("    - matchName: host{i}.example.com\n"));
    }
    let file: PathBuf = dir.join("big.yaml");
    std::fs::write(&file, doc).unwrap();
    let out = dnsfence(&["policy", "validate", file.to_str().unwrap()]);
    std::fs::remove_dir_all(&dir).unwrap();
    assert_eq!(
        text(&out.stdout),
        "ok: 1 file, 1 policy, 1 rule, 10,004 patterns\n"
    );
    assert!(out.status.success());
}

#[test]
fn validate_bad_file_lists_every_problem_and_exits_1() {
    let file = testdata("bad/unsupported-fields.yaml");
    let out = dnsfence(&["policy", "validate", &file]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(text(&out.stdout), "");
    let hint = "unsupported field (dnsfence enforces toFQDNs, toEndpoints, toCIDR, toCIDRSet, \
                toEntities, toPorts and icmps in egress, and toCIDR, toCIDRSet, toEndpoints, \
                toEntities, toPorts and icmps in egressDeny)";
    let want: String = [
        (14, "spec.egress[2].toGroups"),
        (24, "spec.egressDeny[0].toServices"),
    ]
    .iter()
    .map(|(line, field)| format!("{file}:{line}: {field}: {hint}\n"))
    .collect();
    assert_eq!(text(&out.stderr), want);
}

#[test]
fn validate_missing_path_and_bad_endpoints_exit_1() {
    let missing = testdata("does-not-exist.yaml");
    let out = dnsfence(&["policy", "validate", &missing]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).starts_with(&format!("{missing}:0: cannot read: ")));

    let endpoints = testdata("bad-endpoints/duplicates-and-bad-ips.yaml");
    let out = dnsfence(&[
        "policy",
        "validate",
        &testdata("spec-example.yaml"),
        "--endpoints",
        &endpoints,
    ]);
    assert_eq!(out.status.code(), Some(1));
    let first = text(&out.stderr).lines().next().unwrap();
    assert_eq!(
        first,
        format!(
            "{endpoints}:13: endpoints[2].name: duplicate endpoint default/a (first at line 7)"
        )
    );
}

fn check(extra: &[&str], names: &[&str]) -> Output {
    let policy = testdata("spec-example.yaml");
    let endpoints = testdata("spec-example-endpoints.yaml");
    let mut args = vec![
        "policy",
        "check",
        "--policy",
        &policy,
        "--endpoints",
        &endpoints,
    ];
    args.extend_from_slice(extra);
    args.extend_from_slice(names);
    dnsfence(&args)
}

#[test]
fn check_spec_example_documented_verdicts() {
    let out = check(
        &["--endpoint", "team-a/uploader"],
        &[
            "bbc.co.uk",
            "api.stripe.com",
            "x.s3.amazonaws.com",
            "s3.amazonaws.com",
            "API.Stripe.COM.",
        ],
    );
    assert_eq!(text(&out.stderr), "");
    assert_eq!(
        text(&out.stdout),
        "bbc.co.uk\tdns=allow\tfqdn=deny\n\
         api.stripe.com\tdns=allow\tfqdn=allow\tports=443/tcp\n\
         x.s3.amazonaws.com\tdns=allow\tfqdn=allow\tports=443/tcp\n\
         s3.amazonaws.com\tdns=allow\tfqdn=deny\n\
         API.Stripe.COM.\tdns=allow\tfqdn=allow\tports=443/tcp\n"
    );
    assert!(out.status.success());
}

#[test]
fn check_server_port_and_proto() {
    let ep = ["--endpoint", "team-a/uploader"];
    let cases: &[(&[&str], &str)] = &[
        (&["--server", "10.96.0.10"], "dns=allow"), // kube-dns
        (&["--server", "8.8.8.8"], "dns=deny"),     // not selected by toEndpoints
        (&["--server", "10.96.0.10", "--proto", "tcp"], "dns=allow"), // protocol ANY
        (&["--port", "5353"], "dns=deny"),
    ];
    for (extra, want) in cases {
        let args: Vec<&str> = ep.iter().chain(extra.iter()).copied().collect();
        let out = check(&args, &["bbc.co.uk"]);
        assert_eq!(
            text(&out.stdout),
            format!("bbc.co.uk\t{want}\tfqdn=deny\n"),
            "{extra:?}"
        );
        assert!(out.status.success());
    }
}

#[test]
fn check_unrestricted_endpoint_allows_everything() {
    // team-b/uploader carries app=uploader but the CNP is confined to team-a.
    let out = check(&["--endpoint", "team-b/uploader"], &["bbc.co.uk"]);
    assert_eq!(
        text(&out.stdout),
        "bbc.co.uk\tdns=allow\tfqdn=allow\tports=any\n"
    );
    assert_eq!(
        text(&out.stderr),
        "note: no egress policy selects team-b/uploader: its egress is unrestricted\n"
    );
    assert!(out.status.success());
}

#[test]
fn check_unknown_or_ambiguous_endpoint_exits_2() {
    let out = check(&["--endpoint", "nobody"], &["a.com"]);
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(text(&out.stdout), "");
    let out = check(&["--endpoint", "uploader"], &["a.com"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("ambiguous"),
        "{}",
        text(&out.stderr)
    );
    // A unique bare name works.
    let out = check(&["--endpoint", "other"], &["a.com"]);
    assert!(out.status.success());
}

#[test]
fn check_with_invalid_policy_reports_and_exits_1() {
    let bad = testdata("bad/bad-ports.yaml");
    let endpoints = testdata("spec-example-endpoints.yaml");
    let out = dnsfence(&[
        "policy",
        "check",
        "--policy",
        &bad,
        "--endpoints",
        &endpoints,
        "--endpoint",
        "other",
        "a.com",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(text(&out.stdout), "");
    assert_eq!(text(&out.stderr).lines().count(), 7);
}

#[test]
fn check_l3_destinations_say_which_rule_decides() {
    let dir = std::env::temp_dir().join(format!("dnsfence-l3-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let policy = dir.join("p.yaml");
    std::fs::write(
        &policy,
        r#"apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: db, namespace: team-a}
spec:
  endpointSelector: {matchLabels: {app: uploader}}
  egress:
  - toCIDRSet: [{cidr: 10.0.0.0/8, except: [10.66.0.0/16]}]
    toPorts: [{ports: [{port: "5432", protocol: TCP}]}]
  - toCIDR: [10.77.0.0/16]
    icmps: [{fields: [{type: 8}, {type: "128", family: IPv6}]}]
  - toCIDR: [10.78.0.0/16]
  egressDeny:
  - toCIDR: [10.9.0.0/16]
"#,
    )
    .unwrap();
    let endpoints = testdata("spec-example-endpoints.yaml");
    let out = dnsfence(&[
        "policy",
        "check",
        "--policy",
        policy.to_str().unwrap(),
        "--endpoints",
        &endpoints,
        "--endpoint",
        "team-a/uploader",
        "--to",
        "10.0.0.5:5432/tcp",
        "--to",
        "10.0.0.5:5433/tcp",
        "--to",
        "10.66.0.5:5432/tcp",
        "--to",
        "10.9.0.5:5432/tcp",
        "--to",
        "10.77.0.5:8/icmp",
        "--to",
        "10.77.0.5:13/icmp",
        "--to",
        "10.78.0.5:13/icmp",
        "--to",
        "10.0.0.5:8/icmp",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout),
        "10.0.0.5:5432/tcp\tl3=allow\tby=l3-rule\n\
         10.0.0.5:5433/tcp\tl3=deny\tby=default-deny\n\
         10.66.0.5:5432/tcp\tl3=deny\tby=default-deny\n\
         10.9.0.5:5432/tcp\tl3=deny\tby=egressDeny\n\
         10.77.0.5:8/icmp\tl3=allow\tby=l3-rule\n\
         10.77.0.5:13/icmp\tl3=deny\tby=default-deny\n\
         10.78.0.5:13/icmp\tl3=allow\tby=l3-rule\n\
         10.0.0.5:8/icmp\tl3=deny\tby=default-deny\n"
    );
    let bad = dnsfence(&[
        "policy",
        "check",
        "--policy",
        policy.to_str().unwrap(),
        "--endpoints",
        &endpoints,
        "--endpoint",
        "team-a/uploader",
        "--to",
        "10.0.0.5:5432",
    ]);
    assert_eq!(bad.status.code(), Some(2));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn validate_accepts_ingress_and_says_it_is_not_enforced() {
    let dir = std::env::temp_dir().join(format!("dnsfence-ingress-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let policy = dir.join("p.yaml");
    std::fs::write(
        &policy,
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: x}\nspec:\n  \
         endpointSelector: {}\n  ingress:\n  - fromEntities: [world]\n  egress:\n  - toFQDNs: \
         [{matchName: a.example}]\n",
    )
    .unwrap();
    let out = dnsfence(&["policy", "validate", policy.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stderr),
        format!(
            "{}:6: note: spec.ingress: not enforced: dnsfence enforces egress only (ingress is \
             the CNI's job)\n",
            policy.display()
        )
    );
    assert!(text(&out.stdout).starts_with("ok: 1 file, 1 policy"));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn check_resolves_entities_with_the_agents_node_flags() {
    let dir = std::env::temp_dir().join(format!("dnsfence-ent-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let policy = dir.join("p.yaml");
    std::fs::write(
        &policy,
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: w, namespace: \
         team-a}\nspec:\n  endpointSelector: {matchLabels: {app: uploader}}\n  egress:\n  - \
         toEntities: [world]\n    toPorts: [{ports: [{port: \"443\", protocol: TCP}]}]\n",
    )
    .unwrap();
    let endpoints = testdata("spec-example-endpoints.yaml");
    let run = |extra: &[&str]| {
        let mut args = vec![
            "policy",
            "check",
            "--policy",
            policy.to_str().unwrap(),
            "--endpoints",
            &endpoints,
            "--endpoint",
            "team-a/uploader",
            "--to",
            "10.9.9.9:443/tcp",
        ];
        args.extend_from_slice(extra);
        let out = dnsfence(&args);
        text(&out.stdout).to_string()
    };
    assert_eq!(run(&[]), "10.9.9.9:443/tcp\tl3=allow\tby=l3-rule\n");
    assert_eq!(
        run(&["--cluster-cidr", "10.0.0.0/8"]),
        "10.9.9.9:443/tcp\tl3=deny\tby=default-deny-fqdn-never\n",
        "a cluster range is not world, nor opened by a toFQDNs answer"
    );
    // The unspecified addresses reach the node itself (the kernel delivers a datagram sent
    // to 0.0.0.0 or :: over loopback): not world either.
    for unspecified in [
        "0.0.0.0:443/tcp",
        "[::]:443/tcp",
        "[::ffff:0.0.0.0]:443/tcp",
    ] {
        let out = dnsfence(&[
            "policy",
            "check",
            "--policy",
            policy.to_str().unwrap(),
            "--endpoints",
            &endpoints,
            "--endpoint",
            "team-a/uploader",
            "--to",
            unspecified,
        ]);
        assert_eq!(
            text(&out.stdout),
            format!("{unspecified}\tl3=deny\tby=default-deny-fqdn-never\n")
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `--to` tells a default-deny that a toFQDNs answer could open from one it never opens (the
/// node's own addresses, loopback unless --open-loopback-answers, the cluster's ranges and
/// --deny-answer-cidr), with the agent's flags.
#[test]
fn check_says_which_addresses_no_fqdn_answer_opens() {
    let run = |extra: &[&str]| {
        let mut args = vec![
            "--endpoint",
            "team-a/uploader",
            "--to",
            "127.0.0.1:443/tcp",
            "--to",
            "[::ffff:127.0.0.1]:443/tcp",
            "--to",
            "198.51.100.7:443/tcp",
            "--to",
            "[2001:db8::7]:443/tcp",
            "--to",
            "169.254.169.254:80/tcp",
        ];
        args.extend_from_slice(extra);
        let out = check(&args, &[]);
        assert!(out.status.success(), "{}", text(&out.stderr));
        text(&out.stdout)
            .lines()
            .map(|l| l.rsplit_once("by=").unwrap().1.to_owned())
            .collect::<Vec<_>>()
    };
    let (never, deny) = ("default-deny-fqdn-never", "default-deny");
    assert_eq!(run(&[]), [never, never, deny, deny, never]);
    assert_eq!(
        run(&["--open-loopback-answers"]),
        [deny, deny, deny, deny, never]
    );
    assert_eq!(
        run(&[
            "--open-loopback-answers",
            "--deny-answer-cidr",
            "198.51.100.0/24,2001:db8::/32"
        ]),
        [deny, deny, never, never, never]
    );
    // Loopback stays closed under --open-loopback-answers when a denied range covers it.
    assert_eq!(
        run(&[
            "--open-loopback-answers",
            "--deny-answer-cidr",
            "127.0.0.0/8"
        ]),
        [never, never, deny, deny, never]
    );
}

#[test]
fn check_to_endpoint_checks_each_registered_address() {
    let dir = std::env::temp_dir().join(format!("dnsfence-to-ep-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let policy = dir.join("p.yaml");
    std::fs::write(
        &policy,
        r#"apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: peers, namespace: team-a}
spec:
  endpointSelector: {matchLabels: {app: other}}
  egress:
  - toEndpoints: [{matchLabels: {app: uploader}}]
    toPorts: [{ports: [{port: "8080", protocol: TCP}]}]
"#,
    )
    .unwrap();
    let endpoints = testdata("spec-example-endpoints.yaml");
    let args = |targets: &[&str]| {
        let mut a = vec![
            "policy",
            "check",
            "--policy",
            policy.to_str().unwrap(),
            "--endpoints",
            &endpoints,
            "--endpoint",
            "team-a/other",
        ];
        for t in targets {
            a.extend(["--to-endpoint", t]);
        }
        dnsfence(&a)
    };
    let out = args(&[
        "team-a/uploader:8080/tcp",
        "team-a/uploader:22/tcp",
        "kube-dns:53/udp",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout),
        "team-a/uploader(10.0.1.5):8080/tcp\tl3=allow\tby=l3-rule\n\
         team-a/uploader(fd00::5):8080/tcp\tl3=allow\tby=l3-rule\n\
         team-a/uploader(10.0.1.5):22/tcp\tl3=deny\tby=default-deny-fqdn-never\n\
         team-a/uploader(fd00::5):22/tcp\tl3=deny\tby=default-deny-fqdn-never\n\
         kube-dns(10.96.0.10):53/udp\tl3=deny\tby=default-deny-fqdn-never\n"
    );
    // Ambiguous (uploader is in two namespaces), unknown, or malformed: exit 2, one line.
    for bad in ["uploader:8080/tcp", "nobody:80/tcp", "team-a/uploader:8080"] {
        let out = args(&[bad]);
        assert_eq!(out.status.code(), Some(2), "{bad}: {}", text(&out.stderr));
        assert_eq!(
            text(&out.stderr).lines().count(),
            1,
            "{}",
            text(&out.stderr)
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `--explain` says why each query is forwarded or refused: the L3 rules about the server
/// decide before the DNS rules (an egressDeny refuses, an L3/L4 allow lets every name
/// through, as in Cilium), and the default line format stays as the spec gives it.
#[test]
fn check_explain_names_the_deciding_rule() {
    let dir = std::env::temp_dir().join(format!("dnsfence-explain-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let policy = dir.join("p.yaml");
    let endpoints = dir.join("e.yaml");
    std::fs::write(
        &policy,
        r#"apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: p, namespace: team-a}
spec:
  endpointSelector: {matchLabels: {app: client}}
  egress:
  - toPorts:
    - ports: [{port: "53", protocol: ANY}]
      rules: {dns: [{matchPattern: "*.allowed.test"}]}
  - toCIDR: [198.51.100.0/24]
    toPorts: [{ports: [{port: "53", protocol: UDP}]}]
  egressDeny:
  - toCIDR: [192.0.2.0/24]
"#,
    )
    .unwrap();
    std::fs::write(
        &endpoints,
        "endpoints:\n- {name: client, namespace: team-a, labels: {app: client}, ips: [\"10.0.0.1\"]}\n\
         - {name: free, namespace: team-b, labels: {app: free}, ips: [\"10.0.0.2\"]}\n",
    )
    .unwrap();
    let (policy, endpoints) = (policy.to_str().unwrap(), endpoints.to_str().unwrap());
    let run = |endpoint: &str, server: &str, names: &[&str]| {
        let mut args = vec![
            "policy",
            "check",
            "--policy",
            policy,
            "--endpoints",
            endpoints,
            "--endpoint",
            endpoint,
            "--server",
            server,
            "--explain",
        ];
        args.extend_from_slice(names);
        let out = dnsfence(&args);
        assert!(out.status.success(), "{}", text(&out.stderr));
        text(&out.stdout).to_string()
    };
    assert_eq!(
        run(
            "team-a/client",
            "203.0.113.53",
            &["a.allowed.test", "evil.test"]
        ),
        "a.allowed.test\tdns=allow\tfqdn=deny\tby=dns-rule\n\
         evil.test\tdns=deny\tfqdn=deny\tby=default-deny\n"
    );
    assert_eq!(
        run("team-a/client", "198.51.100.53", &["evil.test"]),
        "evil.test\tdns=allow\tfqdn=deny\tby=l3-rule\n"
    );
    assert_eq!(
        run("team-a/client", "192.0.2.53", &["a.allowed.test"]),
        "a.allowed.test\tdns=deny\tfqdn=deny\tby=egressDeny\n"
    );
    assert_eq!(
        run("team-b/free", "192.0.2.53", &["evil.test"]),
        "evil.test\tdns=allow\tfqdn=allow\tports=any\tby=unrestricted\n"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
