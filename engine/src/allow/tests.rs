use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dnsfence_matcher::Name;
use dnsfence_policy::{EndpointKey, Endpoints, PolicySet, Snapshot};

use super::*;

const POLICY: &str = r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: p, namespace: default}
spec:
  endpointSelector: {matchLabels: {app: client}}
  egress:
  - toFQDNs: [{matchPattern: "*.allowed.test"}]
    toPorts: [{ports: [{port: "443", protocol: TCP}]}]
  - toFQDNs: [{matchName: "any.allowed.test"}]
"#;

const ENDPOINTS: &str = r#"
endpoints:
- {name: client, namespace: default, labels: {app: client}, ips: ["127.0.0.10"]}
- {name: other, namespace: default, labels: {app: client}, ips: ["127.0.0.11"]}
"#;

fn snapshot(policy: &str) -> Arc<Snapshot> {
    let set = PolicySet::from_yaml(std::path::Path::new("p.yaml"), policy).unwrap();
    let eps = Endpoints::from_yaml(std::path::Path::new("e.yaml"), ENDPOINTS).unwrap();
    // The tests' addresses are in 127.0.0.0/8: opened as by `--open-loopback-answers`.
    let node = dnsfence_policy::cidr::NodeFacts {
        open_loopback: true,
        ..Default::default()
    };
    Arc::new(Snapshot::compile_on(&set, &eps, &[], &node))
}

fn client() -> EndpointKey {
    EndpointKey::of("default", "client")
}

fn other() -> EndpointKey {
    EndpointKey::of("default", "other")
}

const HTTPS: PortSpec = PortSpec {
    lo: 443,
    hi: 443,
    protos: PortSpec::TCP,
};

fn key(endpoint: EndpointKey, ip: &str, ports: PortSpec) -> AllowKey {
    AllowKey {
        endpoint,
        ip: ip.parse().unwrap(),
        ports,
    }
}

/// A batch with one group per (name, entries).
fn batch(groups: &[(&str, Vec<AllowKey>)], expires: Instant) -> AllowBatch {
    let mut b = AllowBatch::with_capacity(64);
    for (name, keys) in groups {
        b.begin_group(&Name::from_text(name).unwrap());
        for k in keys {
            b.push(*k, expires);
        }
    }
    b
}

fn write(table: &UserspaceAllowTable, b: &mut AllowBatch) -> Vec<bool> {
    let mut sink = table;
    sink.write(Instant::now(), b);
    b.groups.iter().map(|g| g.ok).collect()
}

#[test]
fn expiry_only_grows() {
    let table = UserspaceAllowTable::new(LedgerConfig::default());
    let t0 = Instant::now();
    let k = key(client(), "127.0.0.5", HTTPS);
    write(
        &table,
        &mut batch(
            &[("a.allowed.test", vec![k])],
            t0 + Duration::from_secs(100),
        ),
    );
    write(
        &table,
        &mut batch(&[("a.allowed.test", vec![k])], t0 + Duration::from_secs(10)),
    );
    let ip: IpAddr = "127.0.0.5".parse().unwrap();
    assert!(table.is_allowed(
        client(),
        ip,
        443,
        PortSpec::TCP,
        t0 + Duration::from_secs(99)
    ));
    // IPv4-mapped IPv6 is the same entry.
    let mapped: IpAddr = "::ffff:127.0.0.5".parse().unwrap();
    assert!(table.is_allowed(client(), mapped, 443, PortSpec::TCP, t0));
    assert_eq!(table.len(), 1);
}

#[test]
fn endpoint_quota_refuses_only_that_endpoints_group() {
    let config = LedgerConfig {
        capacity: 100,
        per_endpoint: 3,
        per_name: 100,
    };
    let table = UserspaceAllowTable::new(config);
    let exp = Instant::now() + Duration::from_secs(60);
    let flood: Vec<_> = (1..=4)
        .map(|i| key(client(), &format!("127.0.1.{i}"), HTTPS))
        .collect();
    let mut b = batch(
        &[
            ("a.allowed.test", flood[..2].to_vec()),
            ("b.allowed.test", flood[2..].to_vec()),
            ("c.allowed.test", vec![key(other(), "127.0.2.1", HTTPS)]),
        ],
        exp,
    );
    // The second group would take `client` to 4 entries: refused whole; `other` unaffected.
    assert_eq!(write(&table, &mut b), vec![true, false, true]);
    assert_eq!(table.len(), 3);
    assert_eq!(table.ledger().stats().endpoint_quota, 1);
    let now = Instant::now();
    let ip = |s: &str| s.parse::<IpAddr>().unwrap();
    assert!(!table.is_allowed(client(), ip("127.0.1.3"), 443, PortSpec::TCP, now));
    assert!(table.is_allowed(other(), ip("127.0.2.1"), 443, PortSpec::TCP, now));
}

#[test]
fn name_quota_and_capacity() {
    let config = LedgerConfig {
        capacity: 6,
        per_endpoint: 100,
        per_name: 2,
    };
    let table = UserspaceAllowTable::new(config);
    let exp = Instant::now() + Duration::from_secs(60);
    let k = |i: u8| key(client(), &format!("127.0.3.{i}"), HTTPS);
    let o = |i: u8| key(other(), &format!("127.0.4.{i}"), HTTPS);
    let mut b = batch(
        &[
            ("a.allowed.test", vec![k(1), k(2)]),
            ("a.allowed.test", vec![k(3)]),
            ("b.allowed.test", vec![o(1)]),
            // Five more than the table has room for.
            ("c.allowed.test", (2..7).map(o).collect()),
        ],
        exp,
    );
    assert_eq!(write(&table, &mut b), vec![true, false, true, false]);
    let stats = table.ledger().stats();
    assert_eq!((stats.name_quota, stats.full, stats.entries), (1, 1, 3));
}

/// Review finding: the per-endpoint quota alone (default: a quarter of the table) let four
/// endpoints take all of it. An endpoint also stops at its fair share: it never holds more
/// than is left free.
#[test]
fn endpoints_filling_the_table_together_leave_a_share_free() {
    let config = LedgerConfig {
        capacity: 90,
        per_endpoint: 90,
        per_name: 90,
    };
    let table = UserspaceAllowTable::new(config);
    let exp = Instant::now() + Duration::from_secs(60);
    let fill = |endpoint: EndpointKey, net: u8| {
        let mut written = 0;
        for i in 0..90u8 {
            let mut b = batch(
                &[(
                    "a.allowed.test",
                    vec![key(endpoint, &format!("127.0.{net}.{i}"), HTTPS)],
                )],
                exp,
            );
            written += usize::from(write(&table, &mut b)[0]);
        }
        written
    };
    assert_eq!(fill(client(), 5), 45, "alone: half the table");
    assert_eq!(fill(other(), 6), 23, "the second: half of what is left");
    assert_eq!(table.len(), 68, "a quarter stays free for the others");
    let stats = table.ledger().stats();
    assert_eq!((stats.fair_share, stats.endpoint_quota), (45 + 67, 0));
}

/// A revocation judges the table a slice at a time: every slice is judged, whatever the
/// table's size.
#[test]
fn a_revocation_over_many_slices_judges_every_entry() {
    let n = 3 * REVOKE_SLICE + 17;
    let table = UserspaceAllowTable::new(LedgerConfig {
        capacity: 2 * n,
        per_endpoint: 2 * n,
        per_name: 2 * n,
    });
    table.revoke(snapshot(POLICY));
    let exp = Instant::now() + Duration::from_secs(60);
    for i in 0..n as u32 {
        let ip = std::net::Ipv4Addr::from(0x0a00_0000 | i).to_string();
        // Both endpoints, so that neither reaches its fair share; every third entry by the
        // one name the narrower policy keeps on any port.
        let endpoint = if i % 2 == 0 { client() } else { other() };
        let (name, ports) = if i % 3 == 0 {
            ("any.allowed.test", PortSpec::ALL)
        } else {
            ("a.allowed.test", HTTPS)
        };
        let mut b = batch(&[(name, vec![key(endpoint, &ip, ports)])], exp);
        assert_eq!(write(&table, &mut b), vec![true], "{i}");
    }
    let any_port = n.div_ceil(3);
    let narrower = POLICY.replace("  - toFQDNs: [{matchName: \"any.allowed.test\"}]\n", "");
    assert_eq!(table.revoke(snapshot(&narrower)), any_port);
    assert_eq!(table.len(), n - any_port);
}

#[test]
fn reload_revokes_what_the_new_policy_does_not_justify() {
    let table = UserspaceAllowTable::new(LedgerConfig::default());
    table.revoke(snapshot(POLICY));
    let exp = Instant::now() + Duration::from_secs(60);
    let mut b = batch(
        &[
            ("a.allowed.test", vec![key(client(), "127.0.4.1", HTTPS)]),
            (
                "any.allowed.test",
                vec![key(client(), "127.0.4.2", PortSpec::ALL)],
            ),
            // Not justified: port 80 is opened by no rule; evil.test by no selector.
            (
                "a.allowed.test",
                vec![key(
                    client(),
                    "127.0.4.3",
                    PortSpec {
                        lo: 80,
                        hi: 80,
                        protos: PortSpec::TCP,
                    },
                )],
            ),
            ("evil.test", vec![key(client(), "127.0.4.4", PortSpec::ALL)]),
        ],
        exp,
    );
    write(&table, &mut b);
    assert_eq!(table.len(), 2, "{:?}", table.ledger().stats());
    assert_eq!(table.ledger().stats().unjustified, 2);
    // The new policy keeps only the pattern rule: the any-port entry of `any.allowed.test`
    // (a name the pattern also matches, but on 443 only) goes, the 443 one stays.
    let narrower = POLICY.replace("  - toFQDNs: [{matchName: \"any.allowed.test\"}]\n", "");
    assert_eq!(table.revoke(snapshot(&narrower)), 1);
    let now = Instant::now();
    let ip = |s: &str| s.parse::<IpAddr>().unwrap();
    assert!(table.is_allowed(client(), ip("127.0.4.1"), 443, PortSpec::TCP, now));
    assert!(!table.is_allowed(client(), ip("127.0.4.2"), 22, PortSpec::TCP, now));
    // A policy without the endpoint's rules revokes everything of it.
    let none = POLICY.replace("*.allowed.test", "*.elsewhere.test");
    let none = none.replace("any.allowed.test", "any.elsewhere.test");
    assert_eq!(table.revoke(snapshot(&none)), 1);
    assert!(table.is_empty());
    // And later writes are judged by it (a query in flight across the reload).
    let mut late = batch(
        &[("a.allowed.test", vec![key(client(), "127.0.4.1", HTTPS)])],
        exp,
    );
    write(&table, &mut late);
    assert!(table.is_empty());
}

/// Review finding: an address two allowed names share was remembered only under the name
/// that wrote it (or pushed its expiry later); a reload that dropped that name revoked it
/// although the other name still allowed it.
#[test]
fn an_entry_two_names_share_stays_while_either_is_allowed() {
    let both = POLICY.replace(
        "  - toFQDNs: [{matchName: \"any.allowed.test\"}]\n",
        "  - toFQDNs: [{matchName: \"a.names.test\"}, {matchName: \"b.names.test\"}]\n    \
         toPorts: [{ports: [{port: \"443\", protocol: TCP}]}]\n",
    );
    assert_ne!(both, POLICY);
    let table = UserspaceAllowTable::new(LedgerConfig::default());
    table.revoke(snapshot(&both));
    let now = Instant::now();
    // Per address: `a` first, for longer; then `b` for the same address, expiring sooner
    // (twice: the second time through must remember the name too).
    for ip in ["127.0.5.1", "127.0.5.2"] {
        for (name, secs) in [("a.names.test", 300), ("b.names.test", 60)] {
            let mut b = batch(
                &[(name, vec![key(client(), ip, HTTPS)])],
                now + Duration::from_secs(secs),
            );
            assert_eq!(write(&table, &mut b), [true], "{name} {ip}");
        }
    }
    // `a` is no longer allowed: `b` still is, so the entries stay.
    let only_b = both.replace("{matchName: \"a.names.test\"}, ", "");
    assert_ne!(only_b, both);
    assert_eq!(table.revoke(snapshot(&only_b)), 0);
    let ip = "127.0.5.1".parse::<IpAddr>().unwrap();
    assert!(table.is_allowed(client(), ip, 443, PortSpec::TCP, Instant::now()));
    let ip2 = "127.0.5.2".parse::<IpAddr>().unwrap();
    assert!(table.is_allowed(client(), ip2, 443, PortSpec::TCP, Instant::now()));
    // Neither: they go.
    let neither = only_b.replace(
        "{matchName: \"b.names.test\"}",
        "{matchName: \"c.names.test\"}",
    );
    assert_eq!(table.revoke(snapshot(&neither)), 2);
    assert!(!table.is_allowed(client(), ip, 443, PortSpec::TCP, Instant::now()));
}

#[test]
fn sweep_removes_expired_entries_in_slices() {
    let table = UserspaceAllowTable::new(LedgerConfig::default());
    let t0 = Instant::now();
    let keys: Vec<_> = (0..10)
        .map(|i| key(client(), &format!("127.0.5.{i}"), HTTPS))
        .collect();
    write(
        &table,
        &mut batch(
            &[("a.allowed.test", keys[..6].to_vec())],
            t0 + Duration::from_secs(1),
        ),
    );
    write(
        &table,
        &mut batch(
            &[("b.allowed.test", keys[6..].to_vec())],
            t0 + Duration::from_secs(9),
        ),
    );
    // Extending one short entry keeps it past the first sweep (its stale heap item is skipped).
    write(
        &table,
        &mut batch(
            &[("c.allowed.test", vec![keys[0]])],
            t0 + Duration::from_secs(9),
        ),
    );
    let later = t0 + Duration::from_secs(5);
    assert_eq!(table.sweep(later, 2), 2);
    assert_eq!(table.sweep(later, 100), 3);
    assert_eq!(table.sweep(later, 100), 0);
    assert_eq!(table.len(), 5);
    assert_eq!(table.sweep(t0 + Duration::from_secs(10), 100), 5);
    assert!(table.is_empty());
}

#[test]
fn tables_sized_at_start_never_rehash_up_to_the_capacity() {
    let config = LedgerConfig {
        capacity: 5000,
        per_endpoint: 5000,
        per_name: 5000,
    };
    let table = UserspaceAllowTable::new(config);
    let before = {
        let l = table.ledger();
        (
            l.entries.capacity(),
            l.names.index.capacity(),
            l.expiries.capacity(),
        )
    };
    let exp = Instant::now() + Duration::from_secs(60);
    for i in 0..5000u32 {
        let ip = std::net::Ipv4Addr::from(0x0a00_0000 | i);
        // One entry per endpoint: no endpoint is held back at its fair share (without a
        // snapshot, every endpoint's entries are justified).
        let k = key(EndpointKey(u64::from(i)), &ip.to_string(), HTTPS);
        let name = format!("n{i}.allowed.test");
        assert_eq!(
            write(&table, &mut batch(&[(&name, vec![k])], exp)),
            vec![true]
        );
    }
    let l = table.ledger();
    assert_eq!(l.stats().entries, 5000);
    let after = (
        l.entries.capacity(),
        l.names.index.capacity(),
        l.expiries.capacity(),
    );
    assert_eq!(before, after, "a table grew (rehashed) below its capacity");
}

/// DNS rebinding: a name the policy allows resolving to an address inside the cluster (a
/// pod, a service, another node, a `--cluster-cidr` range) opens nothing there, as in Cilium
/// (those addresses carry their own identities, which no FQDN selector selects); a reload
/// that registers a pod at an address already allowed revokes the entry. Loopback stays
/// allowed (node-local; the tests' servers live there).
#[test]
fn an_answer_pointing_into_the_cluster_opens_nothing_there() {
    let endpoints = |extra: &str| {
        format!(
            "{ENDPOINTS}- {{name: db, namespace: prod, labels: {{app: db}}, ips: [\"10.0.3.7\"]}}\n{extra}"
        )
    };
    let compile = |eps: &str| {
        let set = PolicySet::from_yaml(std::path::Path::new("p.yaml"), POLICY).unwrap();
        let eps = Endpoints::from_yaml(std::path::Path::new("e.yaml"), eps).unwrap();
        let node = dnsfence_policy::cidr::NodeFacts {
            cluster: vec![dnsfence_policy::cidr::Cidr::parse("10.96.0.0/12").unwrap()],
            open_loopback: true,
            ..Default::default()
        };
        Arc::new(Snapshot::compile_on(&set, &eps, &[], &node))
    };
    let table = UserspaceAllowTable::new(LedgerConfig::default());
    table.revoke(compile(&endpoints("")));
    let exp = Instant::now() + Duration::from_secs(60);
    let mut b = batch(
        &[
            ("a.allowed.test", vec![key(client(), "10.0.3.7", HTTPS)]),
            ("b.allowed.test", vec![key(client(), "10.96.0.10", HTTPS)]),
            ("c.allowed.test", vec![key(client(), "203.0.113.5", HTTPS)]),
            ("d.allowed.test", vec![key(client(), "198.51.100.9", HTTPS)]),
            ("e.allowed.test", vec![key(client(), "127.0.4.1", HTTPS)]),
            (
                "f.allowed.test",
                vec![key(client(), "::ffff:10.0.3.7", HTTPS)],
            ),
        ],
        exp,
    );
    write(&table, &mut b);
    let stats = table.ledger().stats();
    assert_eq!((stats.entries, stats.in_cluster), (3, 3), "{stats:?}");
    let now = Instant::now();
    let ip = |s: &str| s.parse::<IpAddr>().unwrap();
    let allowed = |s: &str| table.is_allowed(client(), ip(s), 443, PortSpec::TCP, now);
    assert!(!allowed("10.0.3.7"), "a pod");
    assert!(!allowed("10.96.0.10"), "the cluster range");
    assert!(allowed("203.0.113.5") && allowed("198.51.100.9") && allowed("127.0.4.1"));
    // A pod registered later at 198.51.100.9: the reload revokes the entry.
    let later =
        endpoints("- {name: new, namespace: prod, labels: {app: new}, ips: [\"198.51.100.9\"]}\n");
    assert_eq!(table.revoke(compile(&later)), 1);
    let now = Instant::now();
    assert!(!table.is_allowed(client(), ip("198.51.100.9"), 443, PortSpec::TCP, now));
    assert!(table.is_allowed(client(), ip("203.0.113.5"), 443, PortSpec::TCP, now));
}

/// Node facts with `--open-loopback-answers` as given and `deny` as `--deny-answer-cidr`.
fn node_facts(open_loopback: bool, deny: &[&str]) -> dnsfence_policy::cidr::NodeFacts {
    dnsfence_policy::cidr::NodeFacts {
        open_loopback,
        deny_answers: deny
            .iter()
            .map(|c| dnsfence_policy::cidr::Cidr::parse(c).unwrap())
            .collect(),
        ..Default::default()
    }
}

/// DNS rebinding onto the node: an allowed name answered with a node-local address
/// (unspecified, loopback, link-local: the cloud metadata service) opens nothing by default;
/// `--open-loopback-answers` opens loopback, and only loopback; `--deny-answer-cidr` ranges
/// open nothing, loopback included when it is given there.
#[test]
fn an_answer_pointing_at_the_node_itself_opens_nothing_unless_loopback_is_opened() {
    let node_local = [
        "0.0.0.0",
        "0.1.2.3",
        "::",
        "127.0.0.1",
        "127.9.9.9",
        "::1",
        "::ffff:127.0.0.1",
        "169.254.169.254",
        "fe80::1",
        "fd00:ec2::254",
        "168.63.129.16",
        "100.100.100.200",
        "::ffff:169.254.169.254",
    ];
    let outside = ["203.0.113.5", "10.1.2.3", "2001:db8::5", "169.255.0.1"];
    let denied = ["127.0.0.0/8", "10.1.0.0/16"];
    for (open_loopback, deny) in [(false, &[][..]), (true, &[][..]), (true, &denied[..])] {
        let set = PolicySet::from_yaml(std::path::Path::new("p.yaml"), POLICY).unwrap();
        let eps = Endpoints::from_yaml(std::path::Path::new("e.yaml"), ENDPOINTS).unwrap();
        let node = node_facts(open_loopback, deny);
        let table = UserspaceAllowTable::new(LedgerConfig::default());
        table.revoke(Arc::new(Snapshot::compile_on(&set, &eps, &[], &node)));
        let exp = Instant::now() + Duration::from_secs(60);
        let groups: Vec<(String, Vec<AllowKey>)> = node_local
            .iter()
            .chain(&outside)
            .enumerate()
            .map(|(i, ip)| (format!("n{i}.allowed.test"), vec![key(client(), ip, HTTPS)]))
            .collect();
        let groups: Vec<(&str, Vec<AllowKey>)> = groups
            .iter()
            .map(|(n, k)| (n.as_str(), k.clone()))
            .collect();
        let mut b = batch(&groups, exp);
        write(&table, &mut b);
        let now = Instant::now();
        let allowed = |s: &str| {
            table.is_allowed(
                client(),
                s.parse::<IpAddr>().unwrap(),
                443,
                PortSpec::TCP,
                now,
            )
        };
        for ip in node_local {
            let loopback = ip.starts_with("127.") || ip == "::1" || ip == "::ffff:127.0.0.1";
            assert_eq!(
                allowed(ip),
                // The deny list holds 127.0.0.0/8, not ::1.
                open_loopback && loopback && (deny.is_empty() || ip == "::1"),
                "{ip} with open_loopback {open_loopback}, deny {deny:?}"
            );
        }
        for ip in outside {
            let in_denied = ip.starts_with("10.1.") && !deny.is_empty();
            assert_eq!(allowed(ip), !in_denied, "{ip}, deny {deny:?}");
        }
    }
}

/// An entry written before its range was given to `--deny-answer-cidr` goes at the reload
/// that gives it (the agent restarted with the flag, or the proxy's next snapshot).
#[test]
fn a_reload_that_denies_a_range_revokes_its_entries() {
    let set = PolicySet::from_yaml(std::path::Path::new("p.yaml"), POLICY).unwrap();
    let eps = Endpoints::from_yaml(std::path::Path::new("e.yaml"), ENDPOINTS).unwrap();
    let compile = |deny: &[&str]| {
        Arc::new(Snapshot::compile_on(
            &set,
            &eps,
            &[],
            &node_facts(false, deny),
        ))
    };
    let table = UserspaceAllowTable::new(LedgerConfig::default());
    table.revoke(compile(&[]));
    let exp = Instant::now() + Duration::from_secs(60);
    let mut b = batch(
        &[
            ("a.allowed.test", vec![key(client(), "10.1.2.3", HTTPS)]),
            ("b.allowed.test", vec![key(client(), "203.0.113.5", HTTPS)]),
        ],
        exp,
    );
    write(&table, &mut b);
    let allowed = |s: &str| {
        let ip = s.parse::<IpAddr>().unwrap();
        table.is_allowed(client(), ip, 443, PortSpec::TCP, Instant::now())
    };
    assert!(allowed("10.1.2.3") && allowed("203.0.113.5"));
    table.revoke(compile(&["10.1.0.0/16"]));
    assert!(
        !allowed("10.1.2.3"),
        "a denied range's entry outlived the reload"
    );
    assert!(allowed("203.0.113.5"));
}

/// The start-up prefault spreads its placeholder entries over the whole bucket array (each
/// page written) without growing the tables, for capacities on both sides of a power of two.
#[test]
fn the_prefault_spans_every_bucket_without_growing() {
    for n in [1usize, 7, 8, 1000, 4096, 4097, 65_536, 100_000] {
        let mut entries = EntryTable::with_capacity(n);
        let capacity = entries.capacity();
        let buckets = (capacity * 8 / 7).next_power_of_two();
        let stride = prefault_stride(capacity, n) as usize;
        assert!(stride * (n - 1) < buckets, "n {n}: past the last bucket");
        assert!(stride * n * 2 > buckets, "n {n}: half the buckets left out");
        entries.prefault(n);
        assert_eq!(entries.capacity(), capacity, "n {n}");
        assert_eq!(entries.len(), 0);
        let mut names = NameTable::with_capacity(n);
        let capacity = names.index.capacity();
        names.prefault(n);
        assert_eq!(names.index.capacity(), capacity, "n {n}");
    }
}

/// An entry restored without its name (read from the map between its writer's two inserts)
/// takes the name when restored again with it, and is judged by it: a reload that drops that
/// name revokes it although another rule still opens its port spec (review finding: it
/// stayed nameless, kept by port spec alone).
#[test]
fn a_nameless_restored_entry_takes_its_name_later() {
    let mut ledger = Ledger::new(LedgerConfig::default());
    let mut removed = Vec::new();
    ledger.revoke(snapshot(POLICY), &mut removed);
    let k = key(client(), "127.0.5.1", HTTPS);
    let exp = Instant::now() + Duration::from_secs(60);
    ledger.restore(k, exp, None);
    ledger.restore(k, exp, Some(&Name::from_text("gone.allowed.test").unwrap()));
    // Another rule keeps 443/TCP open for the endpoint; gone.allowed.test is no longer one.
    let narrower = POLICY.replace(
        "toFQDNs: [{matchPattern: \"*.allowed.test\"}]",
        "toFQDNs: [{matchPattern: \"*.kept.test\"}]",
    );
    assert_ne!(narrower, POLICY);
    ledger.revoke(snapshot(&narrower), &mut removed);
    assert_eq!(removed, [k], "judged by its name, not its port spec");
}
