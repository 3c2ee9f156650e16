//! The eBPF datapath, end to end (root; real cgroups, real kernel, real clients):
//! redirection of DNS sent to 192.0.2.53 from two client cgroups in one network namespace
//! with one source address, per-cgroup policy, the port-aware egress filter, revocation on
//! reload, expiry, quotas, survival of a kill -9, reuse of the pinned maps by a restarted
//! agent, and `--uninstall`.
use std::net::{IpAddr, SocketAddr, TcpListener};
use std::time::Duration;

use dnsfence_tests::bpf::{
    self, EXCLUSIVE, Env, TWO_ENDPOINTS, cidr_snapshot, require_root, server,
};
use dnsfence_tests::upstream::Bundled;
use dnsfence_tests::{Agent, AgentConfig, poll_until};

const POLICY: &str = r#"apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: a-egress, namespace: default}
spec:
  endpointSelector: {matchLabels: {app: a}}
  egress:
  - toPorts:
    - ports: [{port: "53", protocol: ANY}]
      rules:
        dns: [{matchPattern: "*.allowed.test"}, {matchName: "dnsonly.test"}, {matchPattern: "*.flood.test"}]
  - toFQDNs: [{matchPattern: "*.allowed.test"}, {matchPattern: "*.flood.test"}]
    toPorts: [{ports: [{port: "443", protocol: TCP}]}]
---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: b-egress, namespace: default}
spec:
  endpointSelector: {matchLabels: {app: b}}
  egress:
  - toPorts:
    - ports: [{port: "53", protocol: ANY}]
      rules:
        dns: [{matchPattern: "*.other.test"}]
  - toFQDNs: [{matchPattern: "*.other.test"}]
"#;

/// Its IPv6 twin (documentation prefix, blackholed).
fn server6() -> SocketAddr {
    "[2001:db8::53]:53".parse().unwrap()
}

/// Listeners on an address's ports 443 and 80, so that a refused connect is the filter's
/// doing, never a closed port.
fn listen(ip: IpAddr) -> Vec<TcpListener> {
    listen_on(ip, &[443, 80])
}

fn resolve(env: &Env, client: &str, name: &str, tcp: bool) -> IpAddr {
    env.resolve(client, name, "A", if tcp { &["+tcp"] } else { &[] })
}

fn agent_config(env: &Env, upstream: SocketAddr, extra: &[&str]) -> AgentConfig {
    bpf::agent_config(env, upstream, POLICY, TWO_ENDPOINTS, extra)
}

#[test]
fn redirects_and_enforces_per_cgroup_through_reload_kill_and_uninstall() {
    if !require_root("datapath") {
        return;
    }
    let _serial = EXCLUSIVE.lock().unwrap_or_else(|e| e.into_inner());
    let env = Env::new("e2e", &["a", "b", "a/nested"]);
    // Answers: one A record per name in 127.N/16 with TTL 1 (raised by --min-ttl).
    // Answer prefixes of this process (another run of this test may be listening on the
    // addresses of its own at the same time).
    let net = 20 + std::process::id() % 200;
    let (prefix4, prefix6) = (format!("127.{net}.0.0/16"), format!("fd00:77:{net}::/64"));
    let upstream = Bundled::start(&[
        "--ttl",
        "1",
        "--ips",
        "1",
        "--prefix4",
        &prefix4,
        "--prefix6",
        &prefix6,
    ]);
    // One IPv4 and one IPv6 listen address on one port: IPv6 DNS goes to the second.
    let port = dnsfence_tests::free_port();
    let listen6 = format!("[::1]:{port}");
    let mut config = agent_config(
        &env,
        upstream.addr,
        &[
            "--min-ttl",
            "30",
            "--reload-interval",
            "200ms",
            "--max-allow-per-endpoint",
            "40",
            "--listen",
            &listen6,
        ],
    );
    config.listen = Some(SocketAddr::from(([127, 0, 0, 1], port)));
    let mut agent = Agent::start(&config);

    // An allowed name resolves through the redirect, over UDP and TCP, and its address is
    // reachable on the allowed port only.
    let www = resolve(&env, "a", "www.allowed.test", false);
    let tcp = resolve(&env, "a", "tcp.allowed.test", true);
    let _l = [listen(www), listen(tcp)];
    assert_eq!(env.connect(Some("a"), SocketAddr::new(www, 443)), Ok(()));
    assert_eq!(env.connect(Some("a"), SocketAddr::new(tcp, 443)), Ok(()));
    assert!(env.denied(Some("a"), SocketAddr::new(www, 80)));
    // A process in a descendant cgroup belongs to the endpoint.
    assert_eq!(
        env.connect(Some("a/nested"), SocketAddr::new(www, 443)),
        Ok(())
    );

    // DNS sent to the proxy's own address (not redirected) is judged like redirected DNS
    // (against the policy server on port 53, not the proxy's port).
    let direct = env.dig(Some("a"), agent.addr, &["www.allowed.test"]);
    assert_eq!(direct.status, "NOERROR", "{}", direct.output);
    assert_eq!(
        env.dig(Some("a"), agent.addr, &["evil.test"]).status,
        "REFUSED"
    );

    // A denied name: REFUSED, UDP and TCP.
    for tcp in [false, true] {
        let args: &[&str] = if tcp {
            &["evil.test", "+tcp"]
        } else {
            &["evil.test"]
        };
        assert_eq!(env.dig(Some("a"), server(), args).status, "REFUSED");
    }
    // Allowed by the DNS rules but not by toFQDNs: resolves, stays unreachable.
    let dns_only = resolve(&env, "a", "dnsonly.test", false);
    let _l2 = listen(dns_only);
    assert!(env.denied(Some("a"), SocketAddr::new(dns_only, 443)));
    // An address never resolved is unreachable.
    let never: IpAddr = format!("127.{net}.250.250").parse().unwrap();
    let _l3 = listen(never);
    assert!(env.denied(Some("a"), SocketAddr::new(never, 443)));
    // The target of a CNAME chain is reachable.
    let chained = resolve(&env, "a", "cname-2-c.allowed.test", false);
    let _l4 = listen(chained);
    assert_eq!(
        env.connect(Some("a"), SocketAddr::new(chained, 443)),
        Ok(())
    );

    // IPv6: DNS to 2001:db8::53 (blackholed) is redirected to the IPv6 listen address, and
    // the AAAA answer's address is reachable on 443 only; an IPv4-mapped destination on a
    // dual-stack socket is judged as the IPv4 address it is.
    let r = env.dig(Some("a"), server6(), &["www.allowed.test", "AAAA"]);
    assert_eq!(r.status, "NOERROR", "{}", r.output);
    assert!(r.output.contains("SERVER: 2001:db8::53#53"), "{}", r.output);
    let v6: IpAddr = r.rdata("AAAA")[0].parse().unwrap();
    let _addr = env.local_address(v6);
    let _l6 = listen(v6);
    assert_eq!(env.connect(Some("a"), SocketAddr::new(v6, 443)), Ok(()));
    assert!(env.denied(Some("a"), SocketAddr::new(v6, 80)));
    // A connection whose packets carry an IPv6 destination-options header is judged by its
    // transport header, like any other.
    const DSTOPTS: &str = "import socket,sys\n\
s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)\n\
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_DSTOPTS, bytes([0, 0, 1, 4, 0, 0, 0, 0]))\n\
s.settimeout(2)\n\
try:\n    s.connect((sys.argv[1], int(sys.argv[2]))); print('connected')\n\
except Exception as e:\n    print(type(e).__name__, e)\n";
    let probe = |port: &str| {
        let out = env.run_in(
            Some("a"),
            "python3",
            &["-c", DSTOPTS, &v6.to_string(), port],
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    assert_eq!(
        probe("443"),
        "connected",
        "extension header on an allowed port"
    );
    assert!(
        probe("80").starts_with("PermissionError"),
        "and still judged"
    );

    let IpAddr::V4(www4) = www else {
        panic!("IPv4")
    };
    let mapped = IpAddr::V6(www4.to_ipv6_mapped());
    assert!(env.denied(Some("a"), SocketAddr::new(mapped, 80)));
    assert_eq!(env.connect(Some("a"), SocketAddr::new(mapped, 443)), Ok(()));

    // The other cgroup, same netns and source address, gets its own policy.
    assert_eq!(
        env.dig(Some("b"), server(), &["www.allowed.test"]).status,
        "REFUSED"
    );
    let other = resolve(&env, "b", "svc.other.test", false);
    let _l5 = listen(other);
    assert_eq!(
        env.connect(Some("b"), SocketAddr::new(other, 80)),
        Ok(()),
        "any port"
    );
    // A toFQDNs rule without toPorts is an L3 allow, ICMP included (as in Cilium)...
    assert_eq!(env.icmp(Some("b"), other, 8), Ok(true), "ping");
    // ...and ICMP to an address no rule allows stays denied.
    assert!(env.icmp_denied(Some("b"), www, 8));
    assert!(env.denied(Some("b"), SocketAddr::new(www, 443)));
    // A process outside both cgroups is untouched: not redirected (the blackhole eats its
    // query) and not filtered.
    assert_eq!(env.dig(None, server(), &["www.allowed.test"]).status, "");
    assert_eq!(env.connect(None, SocketAddr::new(never, 80)), Ok(()));

    // A flood of unique names hits a's quota (40 entries) while b keeps resolving.
    let mut servfail = 0;
    for i in 0..50 {
        let r = env.dig(Some("a"), server(), &[&format!("n{i}.flood.test")]);
        servfail += usize::from(r.status == "SERVFAIL");
    }
    assert!(servfail >= 5, "quota reached: {servfail} SERVFAIL of 50");
    resolve(&env, "b", "after-flood.other.test", false);
    assert!(
        agent
            .metrics_text()
            .contains("dnsfence_allow_refused_total{reason=\"endpoint_quota\"}")
    );

    // A policy edit that removes the name revokes its addresses within one reload.
    let edited = POLICY.replace(
        "  - toFQDNs: [{matchPattern: \"*.allowed.test\"}, {matchPattern: \"*.flood.test\"}]",
        "  - toFQDNs: [{matchPattern: \"*.flood.test\"}]",
    );
    assert_ne!(edited, POLICY);
    std::fs::write(&agent.policy_path, edited).unwrap();
    let revoked = poll_until(Duration::from_secs(5), || {
        env.denied(Some("a"), SocketAddr::new(www, 443))
            .then_some(())
    });
    assert!(
        revoked.is_some(),
        "revoked within a reload: {}",
        agent.process.stderr()
    );
    // Until the name resolves again under the restored policy, it stays unreachable.
    assert_eq!(resolve(&env, "a", "www.allowed.test", false), www);
    assert!(env.denied(Some("a"), SocketAddr::new(www, 443)));
    std::fs::write(&agent.policy_path, POLICY).unwrap();
    poll_until(Duration::from_secs(5), || {
        resolve(&env, "a", "www.allowed.test", false);
        env.connect(Some("a"), SocketAddr::new(www, 443)).ok()
    })
    .expect("reachable again once the restored policy lets an answer write it");

    // kill -9: enforcement continues unchanged; the maps stay pinned.
    agent.process.signal("KILL");
    agent.process.wait_timeout(Duration::from_secs(5));
    let pinned = std::fs::read_dir(&env.pin).unwrap().flatten().any(|d| {
        d.file_name().to_string_lossy().starts_with("maps-v") && d.path().join("df_allow").exists()
    });
    assert!(pinned, "the allow map stays pinned");
    assert_eq!(env.connect(Some("a"), SocketAddr::new(www, 443)), Ok(()));
    assert!(env.denied(Some("a"), SocketAddr::new(www, 80)));
    assert!(env.denied(Some("a"), SocketAddr::new(never, 443)));

    // A restarted agent reuses the maps: the entry is still there, and DNS works again.
    // (--min-ttl 2 from now on: entries of new answers live 3 s.)
    let mut config2 = agent_config(
        &env,
        upstream.addr,
        &["--min-ttl", "2", "--listen", &listen6],
    );
    config2.listen = Some(agent.addr);
    let agent2 = Agent::start(&config2);
    assert_eq!(env.connect(Some("a"), SocketAddr::new(www, 443)), Ok(()));
    assert!(agent2.metric_sum("dnsfence_allow_entries") >= 1.0);

    // Expiry: a fresh name's entry lives 1.5 × max(TTL 1, floor 2) = 3 s; a connection
    // established before it expires survives.
    let short = resolve(&env, "a", "short.allowed.test", false);
    let short_listeners = listen(short);
    assert_eq!(env.connect(Some("a"), SocketAddr::new(short, 443)), Ok(()));
    // A connection opened now, used after the entry expired.
    let established = std::thread::spawn({
        let (procs, ip) = (env.cgroup("a").join("cgroup.procs"), short.to_string());
        move || {
            const HOLD: &str = "import socket,sys,time\n\
s = socket.create_connection((sys.argv[1], 443), timeout=2)\n\
time.sleep(5)\n\
s.sendall(b'still-here')\n\
print('sent')\n";
            std::process::Command::new("sh")
                .args(["-c", "echo $$ > \"$0\" && exec python3 -c \"$1\" \"$2\""])
                .arg(procs)
                .arg(HOLD)
                .arg(ip)
                .output()
                .expect("python3")
        }
    });
    let expired = poll_until(Duration::from_secs(8), || {
        env.denied(Some("a"), SocketAddr::new(short, 443))
            .then_some(())
    });
    assert!(expired.is_some(), "entry expired");
    let out = established.join().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "sent",
        "an established connection survives expiry: {out:?}"
    );
    // The bytes arrived: find the connection that carried them.
    let listener = &short_listeners[0];
    listener.set_nonblocking(true).unwrap();
    let mut carried = false;
    while let Ok((mut conn, _)) = listener.accept() {
        use std::io::Read;
        conn.set_nonblocking(false).unwrap();
        conn.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let mut buf = [0u8; 16];
        if let Ok(n) = conn.read(&mut buf) {
            carried |= &buf[..n] == b"still-here";
        }
    }
    assert!(
        carried,
        "the established connection's bytes arrived after expiry"
    );

    // --uninstall leaves nothing attached or pinned, and nothing redirected or filtered.
    drop(agent2);
    let out = std::process::Command::new(dnsfence_tests::bin("dnsfence"))
        .args(["agent", "--uninstall", "--bpf-pin"])
        .arg(&env.pin)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(!env.pin.exists());
    // Its lock files stay (another process may still hold them) until the pin directory's
    // owner removes them (a test run left thousands of them in /run/dnsfence).
    dnsfence_datapath::loader::remove_lock_files(&env.pin).unwrap();
    let allow_lock = dnsfence_datapath::loader::allow_lock_path(&env.pin);
    let run_dir = allow_lock.parent().unwrap();
    let pin_name = allow_lock
        .file_name()
        .unwrap()
        .to_string_lossy()
        .trim_start_matches("allow")
        .to_owned();
    let left: Vec<_> = std::fs::read_dir(run_dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(&pin_name))
        .collect();
    assert!(left.is_empty(), "lock files left: {left:?}");
    assert!(!env.attached().contains("df_"), "{}", env.attached());
    assert_eq!(env.connect(Some("a"), SocketAddr::new(www, 80)), Ok(()));
    assert_eq!(
        env.dig(Some("a"), server(), &["www.allowed.test"]).status,
        ""
    );
}

/// DNS rebinding onto the node: an allowed name answered with a loopback address opens
/// nothing unless the agent runs with `--open-loopback-answers` (the other tests do: their
/// upstream answers in 127.0.0.0/8), nor, even then, when `--deny-answer-cidr` covers it; the
/// answer itself still reaches the client.
#[test]
fn a_loopback_answer_opens_nothing_without_open_loopback_answers() {
    if !require_root("datapath") {
        return;
    }
    let _serial = EXCLUSIVE.lock().unwrap_or_else(|e| e.into_inner());
    let env = Env::new("rebind", &["a"]);
    let net = 20 + (std::process::id() + 140) % 200;
    let prefix4 = format!("127.{net}.0.0/16");
    let upstream = Bundled::start(&["--ttl", "60", "--ips", "1", "--prefix4", &prefix4]);
    for (open, deny) in [(false, false), (true, false), (true, true)] {
        let mut config = agent_config(&env, upstream.addr, &[]);
        config.open_loopback = open;
        if deny {
            config = config.args(&["--deny-answer-cidr", &format!("10.0.0.0/8,{prefix4}")]);
        }
        let mut agent = Agent::start(&config);
        let name = format!("rebind-{open}-{deny}.allowed.test");
        let www = resolve(&env, "a", &name, false);
        let _l = listen(www);
        let reached = env.connect(Some("a"), SocketAddr::new(www, 443)).is_ok();
        let opens = open && !deny;
        assert_eq!(
            reached, opens,
            "{www} reached with open_loopback {open}, deny {deny}"
        );
        let counted = agent.metric_sum("dnsfence_addresses_in_cluster_total");
        assert_eq!(counted > 0.0, !opens, "{}", agent.metrics_text());
        agent.process.terminate(Duration::from_secs(5));
    }
}

/// Listeners on `ip` at `ports`.
fn listen_on(ip: IpAddr, ports: &[u16]) -> Vec<TcpListener> {
    ports
        .iter()
        .map(|&p| TcpListener::bind((ip, p)).unwrap_or_else(|e| panic!("listen {ip}:{p}: {e}")))
        .collect()
}

#[test]
fn l3_rules_cidrs_peers_ports_and_egress_deny_over_fqdn() {
    if !require_root("datapath") {
        return;
    }
    let _serial = EXCLUSIVE.lock().unwrap_or_else(|e| e.into_inner());
    let env = Env::new("l3", &["a"]);
    let net = 20 + (std::process::id() + 100) % 200;
    let prefix4 = format!("127.{net}.0.0/16");
    let upstream = Bundled::start(&["--ttl", "60", "--ips", "1", "--prefix4", &prefix4]);
    // The address the upstream gives `denied-by-cidr.allowed.test`: an egressDeny covers it.
    let asked = dnsfence_tests::dig(upstream.addr, &["denied-by-cidr.allowed.test", "A"]);
    let deny_ip: IpAddr = asked.rdata("A")[0].parse().unwrap();
    // The address it gives `rebind.allowed.test`: registered below as another workload's
    // (DNS rebinding into the cluster).
    let asked = dnsfence_tests::dig(upstream.addr, &["rebind.allowed.test", "A"]);
    let rebind_ip: IpAddr = asked.rdata("A")[0].parse().unwrap();
    let policy = format!(
        r#"apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {{name: a-l3, namespace: default}}
spec:
  endpointSelector: {{matchLabels: {{app: a}}}}
  egress:
  - toPorts:
    - ports: [{{port: "53", protocol: ANY}}]
      rules:
        dns: [{{matchPattern: "*.allowed.test"}}]
  - toFQDNs: [{{matchPattern: "*.allowed.test"}}]
    toPorts: [{{ports: [{{port: "443", protocol: TCP}}]}}]
  - toCIDRSet: [{{cidr: 127.{net}.200.0/24, except: [127.{net}.200.128/25]}}]
    toPorts: [{{ports: [{{port: "8443", protocol: TCP}}]}}]
  - toEndpoints: [{{matchLabels: {{app: db}}}}]
    toPorts: [{{ports: [{{port: "5432", protocol: TCP}}]}}]
  egressDeny:
  - toCIDR: ["{deny_ip}/32"]
"#
    );
    let endpoints = format!(
        "endpoints:\n\
         - {{name: a, namespace: default, labels: {{app: a}}, cgroup: a}}\n\
         - {{name: db, namespace: default, labels: {{app: db}}, ips: [\"127.{net}.201.1\"]}}\n\
         - {{name: victim, namespace: prod, labels: {{app: victim}}, ips: [\"{rebind_ip}\"]}}\n"
    );
    let mut config = agent_config(&env, upstream.addr, &[]);
    config.policy = policy;
    config.endpoints = endpoints;
    let _agent = Agent::start(&config);

    let ip = |s: String| -> IpAddr { s.parse().unwrap() };
    let (inside, excepted) = (
        ip(format!("127.{net}.200.1")),
        ip(format!("127.{net}.200.200")),
    );
    let peer = ip(format!("127.{net}.201.1"));
    let _l = [
        listen_on(inside, &[8443, 8444]),
        listen_on(excepted, &[8443]),
        listen_on(peer, &[5432, 5433]),
    ];
    // toCIDRSet on 8443/TCP, minus its exception.
    assert_eq!(
        env.connect(Some("a"), SocketAddr::new(inside, 8443)),
        Ok(())
    );
    assert!(env.denied(Some("a"), SocketAddr::new(inside, 8444)));
    assert!(env.denied(Some("a"), SocketAddr::new(excepted, 8443)));
    // toEndpoints as L3: the peer's registered address, on its port only.
    assert_eq!(env.connect(Some("a"), SocketAddr::new(peer, 5432)), Ok(()));
    assert!(env.denied(Some("a"), SocketAddr::new(peer, 5433)));
    // An egressDeny CIDR stays unreachable though a toFQDNs answer points into it...
    let resolved = resolve(&env, "a", "denied-by-cidr.allowed.test", false);
    assert_eq!(resolved, deny_ip);
    let _l2 = listen(deny_ip);
    assert!(env.denied(Some("a"), SocketAddr::new(deny_ip, 443)));
    // ...while another name's answer is reachable as usual.
    let fine = resolve(&env, "a", "fine.allowed.test", false);
    let _l3 = listen(fine);
    assert_eq!(env.connect(Some("a"), SocketAddr::new(fine, 443)), Ok(()));
    // An allowed name resolving to another workload's address opens nothing there: as in
    // Cilium, a registered address is not selected by a toFQDNs rule (DNS rebinding into the
    // cluster). The answer itself is released.
    let rebound = resolve(&env, "a", "rebind.allowed.test", false);
    assert_eq!(rebound, rebind_ip);
    let _l4 = listen(rebind_ip);
    assert!(env.denied(Some("a"), SocketAddr::new(rebind_ip, 443)));
}

/// `world` and CIDR rules reach the addresses outside the cluster only, `cluster` those
/// inside it, as in Cilium, through the datapath's one cluster map: addresses outside
/// loopback (TEST-NET-2 on `lo`), so the node-address exception does not apply. Two hundred
/// registered pods cost no L3 entry (a trie of 16 holds the endpoint's entries); and when the
/// cluster's addresses do not fit their map, those rules fail closed.
#[test]
fn world_and_cidr_rules_reach_outside_the_cluster_and_cluster_inside_it() {
    if !require_root("datapath") {
        return;
    }
    let _serial = EXCLUSIVE.lock().unwrap_or_else(|e| e.into_inner());
    let env = Env::new("scope", &["a"]);
    let net = 20 + (std::process::id() + 70) % 200;
    let upstream = Bundled::start(&["--ttl", "60", "--ips", "1"]);
    let policy = r#"apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: a-scope, namespace: default}
spec:
  endpointSelector: {matchLabels: {app: a}}
  egress:
  - toEntities: [world]
    toPorts: [{ports: [{port: "8443", protocol: TCP}]}]
  - toCIDR: [198.51.100.0/24]
    toPorts: [{ports: [{port: "9443", protocol: TCP}]}]
  - toEntities: [cluster]
    toPorts: [{ports: [{port: "5432", protocol: TCP}]}]
  egressDeny:
  - toCIDR: [198.51.100.128/25]
"#;
    // Two registered pods in the CIDR rules' blocks, and 200 more elsewhere.
    let mut endpoints = String::from(
        "endpoints:\n\
         - {name: a, namespace: default, labels: {app: a}, cgroup: a}\n\
         - {name: pod1, namespace: prod, labels: {app: p}, ips: [\"198.51.100.10\"]}\n\
         - {name: pod2, namespace: prod, labels: {app: p}, ips: [\"198.51.100.130\"]}\n",
    );
    for i in 0..200 {
        endpoints += &format!(
            "- {{name: bulk{i}, namespace: prod, labels: {{app: bulk}}, ips: [\"10.77.{}.{}\"]}}\n",
            i / 100,
            i % 100 + 1
        );
    }
    let ip = |s: &str| -> IpAddr { s.parse().unwrap() };
    let (out1, out2, pod1, pod2) = (
        ip("198.51.100.20"),
        ip("198.51.100.200"),
        ip("198.51.100.10"),
        ip("198.51.100.130"),
    );
    let _addrs: Vec<_> = [out1, out2, pod1, pod2]
        .into_iter()
        .map(|a| env.local_address(a))
        .collect();
    let _l = [
        listen_on(out1, &[8443, 9443, 5432]),
        listen_on(out2, &[8443, 9443]),
        listen_on(pod1, &[8443, 9443, 5432]),
        listen_on(pod2, &[5432]),
    ];
    let to = |ip, port| SocketAddr::new(ip, port);
    let mut config = agent_config(&env, upstream.addr, &["--l3-entries", "16"]);
    config.policy = policy.into();
    config.endpoints = endpoints.clone();
    let agent = Agent::start(&config);
    assert!(
        !agent.process.stderr().contains("map is full"),
        "{}",
        agent.process.stderr()
    );
    // Outside the cluster: world and the CIDR, not cluster.
    assert_eq!(env.connect(Some("a"), to(out1, 8443)), Ok(()), "world");
    assert_eq!(env.connect(Some("a"), to(out1, 9443)), Ok(()), "toCIDR");
    assert!(
        env.denied(Some("a"), to(out1, 5432)),
        "cluster is not world"
    );
    // A registered pod inside the CIDR's block: cluster, not world nor the CIDR.
    assert_eq!(env.connect(Some("a"), to(pod1, 5432)), Ok(()), "cluster");
    assert!(
        env.denied(Some("a"), to(pod1, 8443)),
        "world reaches no pod"
    );
    assert!(
        env.denied(Some("a"), to(pod1, 9443)),
        "a CIDR reaches no pod"
    );
    // The egressDeny CIDR wins outside the cluster, and does not reach the pod inside it.
    assert!(env.denied(Some("a"), to(out2, 8443)), "denied over world");
    assert!(env.denied(Some("a"), to(out2, 9443)), "denied over toCIDR");
    assert_eq!(
        env.connect(Some("a"), to(pod2, 5432)),
        Ok(()),
        "deny CIDR, pod"
    );
    drop(agent);

    // A cluster map too small for the 203 addresses: fail closed. World and the CIDR allow
    // nothing, the deny CIDR denies what it covers; unscoped rules are untouched.
    let mut config = agent_config(&env, upstream.addr, &["--cluster-entries", "8"]);
    config.policy = policy.replace(
        "  egressDeny:",
        &format!("  - toCIDR: [127.{net}.3.1/32]\n    toPorts: [{{ports: [{{port: \"8443\", protocol: TCP}}]}}]\n  egressDeny:"),
    );
    config.endpoints = endpoints;
    // A fresh pin directory: a reused cluster map keeps the size it was created with.
    let _ = std::process::Command::new(dnsfence_tests::bin("dnsfence"))
        .args(["agent", "--uninstall", "--bpf-pin"])
        .arg(&env.pin)
        .output();
    let agent = Agent::start(&config);
    assert!(
        agent.process.stderr().contains("the cluster map is full"),
        "{}",
        agent.process.stderr()
    );
    assert!(env.denied(Some("a"), to(out1, 8443)), "world, map partial");
    assert!(env.denied(Some("a"), to(out1, 9443)), "toCIDR, map partial");
    let node = ip(&format!("127.{net}.3.1"));
    let _lo = listen_on(node, &[8443]);
    assert_eq!(
        env.connect(Some("a"), to(node, 8443)),
        Ok(()),
        "an unscoped rule"
    );
    drop(agent);

    // An IPv6 cluster range containing ::ffff:0:0/96 (where the map keeps IPv4) does not
    // make IPv4 addresses inside.
    let _ = std::process::Command::new(dnsfence_tests::bin("dnsfence"))
        .args(["agent", "--uninstall", "--bpf-pin"])
        .arg(&env.pin)
        .output();
    let mut config = agent_config(&env, upstream.addr, &["--cluster-cidr", "::/64"]);
    config.policy = policy.into();
    config.endpoints =
        "endpoints:\n- {name: a, namespace: default, labels: {app: a}, cgroup: a}\n".into();
    let _agent = Agent::start(&config);
    assert_eq!(
        env.connect(Some("a"), to(out1, 8443)),
        Ok(()),
        "world, ::/64"
    );
    assert!(env.denied(Some("a"), to(out1, 5432)), "cluster, ::/64");
}

#[test]
fn one_agent_per_pin_directory_and_no_uninstall_under_a_running_agent() {
    if !require_root("datapath") {
        return;
    }
    let _serial = EXCLUSIVE.lock().unwrap_or_else(|e| e.into_inner());
    let env = Env::new("lock", &["a", "b"]);
    let upstream = Bundled::start(&["--ttl", "60", "--ips", "1"]);
    let config = agent_config(&env, upstream.addr, &[]);
    let agent = Agent::start(&config);
    // A second agent on the same pins would take over redirection and the maps' books.
    let mut second = Agent::spawn(&agent_config(&env, upstream.addr, &[]));
    let status = second
        .process
        .wait_timeout(Duration::from_secs(10))
        .expect("the second agent exits");
    assert_eq!(status.code(), Some(1));
    let pid = format!("(pid {})", agent.process.pid());
    assert!(
        second
            .process
            .stderr()
            .contains("in use by another dnsfence process")
            && second.process.stderr().contains(&pid),
        "{}",
        second.process.stderr()
    );
    // --uninstall refuses while the agent enforces from the pins.
    let out = std::process::Command::new(dnsfence_tests::bin("dnsfence"))
        .args(["agent", "--uninstall", "--bpf-pin"])
        .arg(&env.pin)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains(&pid));
    assert!(env.attached().contains("df_"), "still attached");
    // The same directory spelled otherwise is the same lock (review2: a trailing slash
    // took another lock file and uninstalled under the running agent).
    let pin = env.pin.to_string_lossy().into_owned();
    let parent = env.pin.parent().unwrap().to_string_lossy().into_owned();
    let name = env.pin.file_name().unwrap().to_string_lossy().into_owned();
    for spelling in [format!("{pin}/"), format!("{parent}//./{name}")] {
        let out = std::process::Command::new(dnsfence_tests::bin("dnsfence"))
            .args(["agent", "--uninstall", "--bpf-pin", &spelling])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1), "{spelling}: {out:?}");
        assert!(env.attached().contains("df_"), "{spelling}: still attached");
    }
    // Once the agent is gone (kill -9 included), the pins are free again.
    drop(agent);
    let out = std::process::Command::new(dnsfence_tests::bin("dnsfence"))
        .args(["agent", "--uninstall", "--bpf-pin"])
        .arg(&env.pin)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
}

#[test]
fn a_cgroup_created_or_recreated_after_start_is_enforced_at_once() {
    if !require_root("datapath") {
        return;
    }
    let _serial = EXCLUSIVE.lock().unwrap_or_else(|e| e.into_inner());
    let env = Env::new("late", &["a"]);
    let upstream = Bundled::start(&["--ttl", "60", "--ips", "1"]);
    // Ticks far apart: only the cgroup watch can pick the new cgroup up in time.
    let mut config = agent_config(&env, upstream.addr, &["--reload-interval", "60s"]);
    config
        .endpoints
        .push_str("- {name: late, namespace: default, labels: {app: a}, cgroup: svc/late}\n");
    let _agent = Agent::start(&config);
    let target = SocketAddr::from(([127, 0, 0, 1], dnsfence_tests::free_port()));
    let _l = TcpListener::bind(target).unwrap();
    let late = env.cgroup("svc").join("late");
    for round in 0..2 {
        // Created (round 0: its parent too), or recreated with a new id (round 1).
        std::fs::create_dir_all(&late).unwrap();
        let enforced = poll_until(Duration::from_millis(500), || {
            env.denied(Some("svc/late"), target).then_some(())
        });
        assert!(
            enforced.is_some(),
            "round {round}: the new cgroup was not enforced within 0.5 s"
        );
        std::fs::remove_dir(&late).unwrap();
    }
}

#[test]
fn a_reused_smaller_allow_map_is_reported_and_bounds_the_ledger() {
    if !require_root("datapath") {
        return;
    }
    let _serial = EXCLUSIVE.lock().unwrap_or_else(|e| e.into_inner());
    let env = Env::new("resize", &["a"]);
    let upstream = Bundled::start(&["--ttl", "60", "--ips", "1"]);
    let mut first = Agent::start(&agent_config(
        &env,
        upstream.addr,
        &["--allow-entries", "4"],
    ));
    first.process.signal("KILL");
    first.process.wait_timeout(Duration::from_secs(5));
    let mut config = agent_config(&env, upstream.addr, &["--allow-entries", "4096"]);
    config.listen = Some(first.addr);
    let second = Agent::start(&config);
    assert!(
        second
            .process
            .stderr()
            .contains("the pinned allow map holds 4 entries, fewer than --allow-entries 4096"),
        "{}",
        second.process.stderr()
    );
    // The ledger is bounded by the map: one endpoint's third name is refused at its fair
    // share of a 4-entry table (it never holds more than is free; of 4,096 it would hold
    // all five), never as a failed map update.
    for i in 0..5 {
        env.dig(Some("a"), server(), &[&format!("n{i}.allowed.test")]);
    }
    let text = second.metrics_text();
    let refused = |reason: &str| {
        dnsfence_tests::dns::metric_values(&text, "dnsfence_allow_refused_total")
            .iter()
            .filter(|(labels, _)| labels.contains(reason))
            .map(|(_, v)| *v)
            .sum::<f64>()
    };
    assert!(refused("fair_share") >= 1.0, "{text}");
    assert_eq!(refused("map_error"), 0.0, "{text}");
}

/// The programs look an endpoint's cgroup up at most `DF_MAX_DEPTH` (16) levels below the
/// hierarchy's root: an endpoint deeper than that is neither redirected nor enforced, and the
/// agent says so (review finding: it was silent).
#[test]
fn an_endpoint_too_deep_for_the_programs_is_reported() {
    if !require_root("datapath") {
        return;
    }
    let _serial = EXCLUSIVE.lock().unwrap_or_else(|e| e.into_inner());
    // The tests' cgroup root is one level below the hierarchy's: 15 more levels reach 16.
    let at = |name: &str, levels: usize| vec![name; levels].join("/");
    let (fits, deep) = (at("d", 15), at("e", 16));
    let env = Env::new("deep", &["a", &fits]);
    let upstream = Bundled::start(&["--ttl", "60", "--ips", "1"]);
    let endpoints = format!(
        "endpoints:\n- {{name: a, namespace: default, labels: {{app: a}}, cgroup: a}}\n\
         - {{name: fits, namespace: default, labels: {{app: a}}, cgroup: {fits}}}\n\
         - {{name: deep, namespace: default, labels: {{app: a}}, cgroup: {deep}}}\n"
    );
    let agent = Agent::start(&bpf::agent_config(
        &env,
        upstream.addr,
        POLICY,
        &endpoints,
        &[],
    ));
    let said = "the cgroups of 1 endpoints lie deeper than 16 levels below the cgroup \
                hierarchy's root, where the programs do not look: NOT redirected or enforced: \
                default/deep";
    let stderr = agent.process.stderr();
    assert!(!stderr.contains(said), "{stderr}");
    // The deep cgroup appears after start (a pod's container): the watcher's sync says so.
    std::fs::create_dir_all(env.cgroup(&deep)).unwrap();
    let told = poll_until(Duration::from_secs(5), || {
        agent.process.stderr().contains(said).then_some(())
    });
    assert!(told.is_some(), "{}", agent.process.stderr());
    // As it says: 16 levels down the DNS is redirected (refused here); 17 down it is not,
    // and goes to the unreachable server it was addressed to (no answer at all).
    assert_eq!(
        env.dig(Some(&fits), server(), &["evil.test"]).status,
        "REFUSED"
    );
    assert_eq!(env.dig(Some(&deep), server(), &["evil.test"]).status, "");
}

/// A workload's connects in a loop for argv[3] seconds: prints how many reached
/// argv[1]:argv[2], and how many were tried.
const CONNECT_LOOP: &str = r#"import socket,sys,time
end=time.time()+float(sys.argv[3]); ok=0; tries=0
while time.time()<end:
    tries+=1
    try:
        socket.create_connection((sys.argv[1],int(sys.argv[2])),timeout=0.5).close(); ok+=1
    except Exception:
        time.sleep(0.0005)
print(ok, tries)
"#;

/// Review finding (fixed): an agent of a new map layout attached its programs over fresh,
/// empty maps and detached the older programs at once, so until its first endpoint sync (after
/// two walks of the allow map) no workload was redirected or enforced. The older programs now
/// stay attached, judging from their own maps, until the endpoints are written.
#[test]
fn a_new_map_layout_takes_over_without_a_gap_in_enforcement() {
    use dnsfence_datapath::maps::ABI;
    if !require_root("datapath") {
        return;
    }
    let _serial = EXCLUSIVE.lock().unwrap_or_else(|e| e.into_inner());
    let env = Env::new("gap", &["a"]);
    let upstream = Bundled::start(&["--ttl", "60", "--ips", "1"]);
    let net = 20 + (std::process::id() + 230) % 200;
    let never: IpAddr = format!("127.{net}.30.1").parse().unwrap();
    let _l = listen_on(never, &[443]);
    let first = Agent::start(&agent_config(&env, upstream.addr, &[]));
    assert!(env.denied(Some("a"), SocketAddr::new(never, 443)));
    // Gone without uninstalling: its pinned programs keep enforcing. Its maps become an
    // older layout's, as an agent of the previous version would have left them.
    drop(first);
    let current = env.pin.join(format!("maps-v{ABI}"));
    let older = env.pin.join(format!("maps-v{}", ABI - 1));
    let (ip, port) = (never.to_string(), "443".to_owned());
    // Twice: an upgrade whose agent starts at once, and one whose first start stopped after
    // installing (its new maps pinned, with no endpoint in them) before its first sync.
    for stalled_first in [false, true] {
        std::fs::rename(&current, &older).unwrap();
        if stalled_first {
            drop(env.install(None, 1024));
        }
        assert!(env.denied(Some("a"), SocketAddr::new(never, 443)));
        let (reached, tried) = std::thread::scope(|s| {
            let probe = s
                .spawn(|| env.run_in(Some("a"), "python3", &["-c", CONNECT_LOOP, &ip, &port, "4"]));
            std::thread::sleep(Duration::from_millis(500));
            let next = Agent::start(&agent_config(&env, upstream.addr, &[]));
            let out = probe.join().unwrap();
            let text = String::from_utf8_lossy(&out.stdout).trim().to_owned();
            // (The stalled start carried the older entries over already.)
            assert_eq!(
                next.process.stderr().contains("carried"),
                !stalled_first,
                "{}",
                next.process.stderr()
            );
            let mut it = text.split(' ').map(|n| {
                n.parse::<u64>()
                    .unwrap_or_else(|_| panic!("{text:?} {out:?}"))
            });
            (it.next().unwrap(), it.next().unwrap())
        });
        assert!(tried > 100, "{tried} connects tried");
        assert_eq!(
            reached, 0,
            "stalled first start {stalled_first}: connects reached a never-resolved address \
             during the upgrade"
        );
        assert!(!older.exists(), "the older maps are still pinned");
        assert!(env.denied(Some("a"), SocketAddr::new(never, 443)));
    }
}

/// An agent of a new map layout (ABI) carries the allow entries of the older layout's pinned
/// maps over into its own before its programs enforce, judges them by their names like any
/// restored entry, and unpins the older maps: an upgrade does not cut workloads off the
/// addresses they resolved before it.
#[test]
fn an_upgrade_to_a_new_map_layout_carries_allow_entries_over() {
    use dnsfence_datapath::maps::{ABI, Addr, AllowMapKey, NameValue, Spec};
    use dnsfence_policy::EndpointKey;
    if !require_root("datapath") {
        return;
    }
    let _serial = EXCLUSIVE.lock().unwrap_or_else(|e| e.into_inner());
    let env = Env::new("carry", &["a"]);
    let upstream = Bundled::start(&["--ttl", "60", "--ips", "1"]);
    let net = 20 + (std::process::id() + 190) % 200;
    let kept: IpAddr = format!("127.{net}.10.1").parse().unwrap();
    let gone: IpAddr = format!("127.{net}.10.2").parse().unwrap();
    let _l = listen_on(kept, &[443]);
    let _m = listen_on(gone, &[443]);
    // The older layout's maps, as its agent left them (bpftool: no program of ours made
    // them): one entry a's policy allows by name, one it does not.
    let old = env.pin.join(format!("maps-v{}", ABI - 1));
    std::fs::create_dir_all(&old).unwrap();
    let bpftool = |args: &[&str]| {
        let out = std::process::Command::new("bpftool")
            .args(args)
            .output()
            .expect("bpftool");
        assert!(out.status.success(), "bpftool {args:?}: {out:?}");
    };
    let hex = |bytes: &[u8]| -> Vec<String> { bytes.iter().map(|b| format!("{b:02x}")).collect() };
    let allow = old.join("df_allow");
    let names = old.join("df_allow_names");
    for (path, value, name) in [(&allow, "8", "df_allow"), (&names, "256", "df_allow_names")] {
        let path = path.to_str().unwrap();
        bpftool(&[
            "map", "create", path, "type", "hash", "key", "32", "value", value, "entries", "64",
            "name", name,
        ]);
    }
    let uptime: f64 = std::fs::read_to_string("/proc/uptime")
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let expires = ((uptime + 300.0) * 1e9) as u64;
    let endpoint = EndpointKey::of("default", "a").0;
    // And one that expired long ago: not carried.
    let expired: IpAddr = format!("127.{net}.10.3").parse().unwrap();
    for (ip, name, expires) in [
        (kept, "kept.allowed.test", expires),
        (gone, "gone.other.test", expires),
        (expired, "old.allowed.test", 1),
    ] {
        let key = AllowMapKey {
            endpoint,
            addr: Addr::of(ip),
            spec: Spec {
                lo: 443,
                hi: 443,
                protos: 1,
                ..Spec::default()
            },
        };
        // The key's bytes, field by field, as `struct df_allow_key` lays them out.
        let mut k = key.endpoint.to_ne_bytes().to_vec();
        k.extend_from_slice(&key.addr.0);
        k.extend_from_slice(&key.spec.lo.to_ne_bytes());
        k.extend_from_slice(&key.spec.hi.to_ne_bytes());
        k.extend_from_slice(&[key.spec.protos, 0, 0, 0]);
        let mut wire = Vec::new();
        for label in name.split('.') {
            wire.push(label.len() as u8);
            wire.extend_from_slice(label.as_bytes());
        }
        wire.push(0);
        let v = NameValue::of(&wire).unwrap();
        let mut n = vec![v.len];
        n.extend_from_slice(&v.wire);
        for (path, value) in [(&allow, expires.to_ne_bytes().to_vec()), (&names, n)] {
            let mut args = vec![
                "map".to_owned(),
                "update".into(),
                "pinned".into(),
                path.to_str().unwrap().into(),
                "key".into(),
                "hex".into(),
            ];
            args.extend(hex(&k));
            args.extend(["value".to_owned(), "hex".into()]);
            args.extend(hex(&value));
            bpftool(&args.iter().map(String::as_str).collect::<Vec<_>>());
        }
    }
    let agent = Agent::start(&agent_config(&env, upstream.addr, &[]));
    let stderr = agent.process.stderr();
    assert!(
        stderr.contains(&format!(
            "carried 2 allow entries over from the older map layout at {}",
            old.display()
        )),
        "{stderr}"
    );
    assert!(!old.exists(), "the older maps are still pinned");
    // Allowed with no DNS query since the upgrade; the other name's entry is revoked.
    assert_eq!(env.connect(Some("a"), SocketAddr::new(kept, 443)), Ok(()));
    assert!(
        poll_until(Duration::from_secs(5), || env
            .denied(Some("a"), SocketAddr::new(gone, 443))
            .then_some(()))
        .is_some(),
        "an entry the policy does not allow by name survived the upgrade"
    );
    drop(agent);

    // An older directory whose entries cannot be copied (here: another key size) is left
    // pinned for a later start, and said so.
    let env = Env::new("carry-bad", &["a"]);
    let old = env.pin.join(format!("maps-v{}", ABI - 1));
    std::fs::create_dir_all(&old).unwrap();
    let path = old.join("df_allow");
    bpftool(&[
        "map",
        "create",
        path.to_str().unwrap(),
        "type",
        "hash",
        "key",
        "40",
        "value",
        "8",
        "entries",
        "4",
        "name",
        "df_allow",
    ]);
    let agent = Agent::start(&agent_config(&env, upstream.addr, &[]));
    let stderr = agent.process.stderr();
    assert!(
        stderr.contains("carried 0 allow entries over")
            && stderr.contains("the older maps stay pinned"),
        "{stderr}"
    );
    assert!(
        path.exists(),
        "the older maps were unpinned although nothing was carried"
    );
}

/// An IPv6 L3 prefix covers no IPv4 destination: in the `df_cidr` trie IPv4 prefixes live
/// at `::ffff:0:0/96` and below, inside `::/0`, so an IPv6 rule short enough to contain that
/// region must not decide for IPv4 (review2: `toCIDR: ::/0` opened every IPv4 address, and
/// `egressDeny: ::/0` closed IPv4 addresses the policy allows). `policy check --to` agrees.
#[test]
fn an_ipv6_prefix_decides_nothing_for_ipv4() {
    if !require_root("datapath") {
        return;
    }
    let _serial = EXCLUSIVE.lock().unwrap_or_else(|e| e.into_inner());
    let env = Env::new("l3v6", &["a", "b"]);
    let net = 20 + (std::process::id() + 150) % 200;
    let upstream = Bundled::start(&["--ttl", "60"]);
    let policy = format!(
        r#"apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {{name: a-v6, namespace: default}}
spec:
  endpointSelector: {{matchLabels: {{app: a}}}}
  egress:
  - toCIDR: ["::/0"]
    toPorts: [{{ports: [{{port: "9443", protocol: TCP}}]}}]
---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {{name: b-v6, namespace: default}}
spec:
  endpointSelector: {{matchLabels: {{app: b}}}}
  egress:
  - toCIDR: ["127.{net}.0.0/16"]
    toPorts: [{{ports: [{{port: "9443", protocol: TCP}}]}}]
  egressDeny:
  - toCIDR: ["::/0"]
"#
    );
    let endpoints = "endpoints:\n\
         - {name: a, namespace: default, labels: {app: a}, cgroup: a}\n\
         - {name: b, namespace: default, labels: {app: b}, cgroup: b}\n";
    let mut config = agent_config(&env, upstream.addr, &[]);
    config.policy = policy;
    config.endpoints = endpoints.into();
    let _agent = Agent::start(&config);
    let v4: IpAddr = format!("127.{net}.9.1").parse().unwrap();
    let _l = listen_on(v4, &[9443]);
    let to = SocketAddr::new(v4, 9443);
    assert!(env.denied(Some("a"), to), "::/0 must not allow IPv4 {to}");
    assert_eq!(
        env.connect(Some("b"), to),
        Ok(()),
        "egressDeny ::/0 must not deny IPv4 {to}"
    );
}

/// The agent's cgroup watcher syncs the maps with the snapshot it loaded, which can be the
/// one a reload is replacing: the reload syncs the new snapshot before publishing it, so a
/// watcher event in between synced the old one after it (review2: a new egressDeny was
/// undone until the next tick). An older generation than the last synced one is ignored.
#[test]
fn an_older_snapshot_does_not_undo_a_newer_sync() {
    if !require_root("datapath") {
        return;
    }
    let _serial = EXCLUSIVE.lock().unwrap_or_else(|e| e.into_inner());
    let env = Env::new("gen", &["a"]);
    let net = 20 + (std::process::id() + 170) % 200;
    let old = cidr_snapshot(net, 9443, "", 1);
    let new = cidr_snapshot(
        net,
        9443,
        &format!("  egressDeny:\n  - toCIDR: [\"127.{net}.9.1/32\"]\n"),
        2,
    );
    let mut dp = env.install(None, 1024);
    let v4: IpAddr = format!("127.{net}.9.1").parse().unwrap();
    let _l = listen_on(v4, &[9443]);
    let to = SocketAddr::new(v4, 9443);
    dp.sync_endpoints(&old).unwrap();
    assert_eq!(env.connect(Some("a"), to), Ok(()));
    dp.sync_endpoints(&new).unwrap();
    assert!(env.denied(Some("a"), to), "the reload's deny");
    // The watcher, holding the snapshot the reload replaced.
    dp.sync_endpoints(&old).unwrap();
    assert!(
        env.denied(Some("a"), to),
        "an older snapshot undid the deny"
    );
    drop(dp);
}

/// The cluster map's boundary keys through partial -> full -> an IPv6 range over the IPv4
/// region -> none: `::/0` says "unknown" exactly while the prefixes do not fit, the IPv4
/// shadow "outside" exactly while an IPv6 range contains its region, and the prefixes are
/// the snapshot's after each sync; `world` reaches an outside address in every full state.
#[test]
fn the_cluster_map_follows_partial_full_and_ipv6_range_states() {
    use dnsfence_policy::cidr::{Cidr, NodeFacts};
    use dnsfence_policy::{Endpoints, PolicySet, Snapshot};
    use std::path::Path;
    if !require_root("datapath") {
        return;
    }
    let _serial = EXCLUSIVE.lock().unwrap_or_else(|e| e.into_inner());
    let env = Env::new("clmap", &["a"]);
    let policy = PolicySet::from_yaml(
        Path::new("p.yaml"),
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: a, namespace: default}\nspec:\n  endpointSelector: {matchLabels: {app: a}}\n  egress:\n  - toEntities: [world]\n    toPorts: [{ports: [{port: \"8443\", protocol: TCP}]}]\n",
    )
    .unwrap();
    let mut generation = 0;
    let mut snapshot = |pods: usize, v6_range: bool| {
        let mut text = String::from(
            "endpoints:\n- {name: a, namespace: default, labels: {app: a}, cgroup: a}\n",
        );
        for i in 0..pods {
            text += &format!(
                "- {{name: p{i}, namespace: prod, labels: {{app: p}}, ips: [\"10.78.0.{}\"]}}\n",
                i + 1
            );
        }
        let node = NodeFacts {
            cluster: if v6_range {
                vec![Cidr::parse("::/64").unwrap()]
            } else {
                Vec::new()
            },
            ..NodeFacts::default()
        };
        let e = Endpoints::from_yaml(Path::new("e.yaml"), &text).unwrap();
        let mut s = Snapshot::compile_on(&policy, &e, &[], &node);
        generation += 1;
        s.set_generation(generation);
        s
    };
    let mut dp = env.install(None, 10);
    // (prefix length, first address byte pair of the key, value) of every entry.
    let dump = || -> Vec<(u32, String, u8)> {
        let path = env.pin.join("maps-v3/df_cluster");
        let out = std::process::Command::new("bpftool")
            .args(["-j", "map", "dump", "pinned"])
            .arg(&path)
            .output()
            .expect("bpftool");
        let text = String::from_utf8_lossy(&out.stdout);
        let entries: Vec<serde_json::Value> = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("bpftool dump {path:?}: {e}: {text}"));
        let byte = |v: &serde_json::Value| {
            u8::from_str_radix(v.as_str().unwrap().trim_start_matches("0x"), 16).unwrap()
        };
        let mut out: Vec<(u32, String, u8)> = entries
            .iter()
            .map(|e| {
                let key: Vec<u8> = e["key"].as_array().unwrap().iter().map(byte).collect();
                let len = u32::from_le_bytes(key[..4].try_into().unwrap());
                let addr = std::net::Ipv6Addr::from(<[u8; 16]>::try_from(&key[4..20]).unwrap());
                (len, addr.to_string(), byte(&e["value"][0]))
            })
            .collect();
        out.sort();
        out
    };
    let boundary = |d: &[(u32, String, u8)]| -> Vec<(u32, String, u8)> {
        d.iter()
            .filter(|(len, addr, _)| {
                (*len, addr.as_str()) == (0, "::")
                    || (*len, addr.as_str()) == (96, "::ffff:0.0.0.0")
            })
            .cloned()
            .collect()
    };
    let out1: IpAddr = "198.51.100.41".parse().unwrap();
    let _addr = env.local_address(out1);
    let _l = listen_on(out1, &[8443]);
    let world = || env.connect(Some("a"), SocketAddr::new(out1, 8443));

    // 10 pods + the node's 4 prefixes for 8 free entries: partial, fail closed.
    let sync = dp.sync_endpoints(&snapshot(10, false)).unwrap();
    assert!(sync.cluster_partial, "{sync:?}");
    let d = dump();
    assert_eq!(
        boundary(&d),
        [(0, "::".into(), 2), (96, "::ffff:0.0.0.0".into(), 2)],
        "{d:?}"
    );
    assert_eq!(d.len(), 10, "{d:?}");
    assert!(
        env.denied(Some("a"), SocketAddr::new(out1, 8443)),
        "partial"
    );
    // 4 pods: full, the boundary keys gone, every prefix there.
    let sync = dp.sync_endpoints(&snapshot(4, false)).unwrap();
    assert!(!sync.cluster_partial, "{sync:?}");
    let d = dump();
    assert_eq!(boundary(&d), [], "{d:?}");
    // 4 pods, 127.0.0.0/8, ::1/128, 0.0.0.0/32, ::/128.
    assert_eq!(d.len(), 8, "{d:?}");
    assert_eq!(world(), Ok(()), "full");
    // An IPv6 range over the IPv4 region (3 pods, 127.0.0.0/8, 0.0.0.0/32, ::/64, the shadow:
    // full):
    // the shadow says outside.
    let sync = dp.sync_endpoints(&snapshot(3, true)).unwrap();
    assert!(!sync.cluster_partial, "{sync:?}");
    let d = dump();
    assert_eq!(boundary(&d), [(96, "::ffff:0.0.0.0".into(), 0)], "{d:?}");
    assert!(
        d.iter()
            .any(|(len, addr, v)| (*len, addr.as_str(), *v) == (64, "::", 1)),
        "{d:?}"
    );
    assert_eq!(world(), Ok(()), "::/64");
    // And gone again with the range.
    dp.sync_endpoints(&snapshot(4, false)).unwrap();
    let d = dump();
    assert_eq!(boundary(&d), [], "{d:?}");
    assert_eq!(d.len(), 8, "{d:?}");
    assert_eq!(world(), Ok(()), "no range");
    drop(dp);
}

#[test]
fn an_endpoint_whose_l3_entries_do_not_fit_fails_closed() {
    if !require_root("datapath") {
        return;
    }
    let _serial = EXCLUSIVE.lock().unwrap_or_else(|e| e.into_inner());
    let env = Env::new("l3full", &["a"]);
    let upstream = Bundled::start(&["--ttl", "60", "--ips", "1"]);
    let net = 20 + (std::process::id() + 50) % 200;
    // Three prefixes for a, a trie of two.
    let mut config = agent_config(&env, upstream.addr, &["--l3-entries", "2"]);
    // (Into a's policy, the first document.)
    config.policy = config.policy.replacen(
        "\n---\n",
        &format!("\n  - toCIDR: [127.{net}.1.0/24, 127.{net}.2.0/24, 127.{net}.3.0/24]\n---\n"),
        1,
    );
    let agent = Agent::start(&config);
    assert!(
        agent
            .process
            .stderr()
            .contains("the L3 prefix map is full: 1 endpoints are denied"),
        "{}",
        agent.process.stderr()
    );
    let inside: IpAddr = format!("127.{net}.1.1").parse().unwrap();
    let _l = listen_on(inside, &[80]);
    // Enforced, nothing allowed: never left unenforced because its entries did not fit.
    assert!(env.denied(Some("a"), SocketAddr::new(inside, 80)));
    // DNS still goes to the proxy.
    assert_eq!(
        env.dig(Some("a"), server(), &["evil.test"]).status,
        "REFUSED"
    );
}

/// An endpoint whose entry the endpoints map refuses (full) is reported by name, and the
/// others are still written: the first refusal ended the whole sync (at start the agent did
/// not start; at a reload every later endpoint, the stale L3 entries and the cluster map's
/// final keys stayed unwritten).
#[test]
fn an_endpoint_the_endpoints_map_refuses_leaves_the_others_enforced() {
    if !require_root("datapath") {
        return;
    }
    let _serial = EXCLUSIVE.lock().unwrap_or_else(|e| e.into_inner());
    let env = Env::new("epfull", &["a", "b"]);
    let upstream = Bundled::start(&["--ttl", "60"]);
    let config = agent_config(&env, upstream.addr, &["--endpoint-entries", "1"]);
    let agent = Agent::start(&config);
    let stderr = agent.process.stderr();
    assert!(
        stderr.contains("the endpoints map refused the entries of 1 endpoints"),
        "{stderr}"
    );
    let written = if stderr.contains("default/a (") {
        "b"
    } else {
        assert!(stderr.contains("default/b ("), "{stderr}");
        "a"
    };
    // Redirected and judged: neither policy allows this name.
    assert_eq!(
        env.dig(Some(written), server(), &["evil.test"]).status,
        "REFUSED"
    );
}

/// `icmps` in the egress program: ICMP and ICMPv6 of an enforced endpoint are judged by type
/// against its L3 table (they used to be refused whatever the policy said). An L3 rule
/// without ports allows ICMP, `toPorts` with protocol ANY does not, an `egressDeny` with
/// `icmps` wins, and an endpoint no policy selects is not touched.
#[test]
fn icmp_by_type_from_icmps_and_l3_rules() {
    if !require_root("datapath") {
        return;
    }
    let _serial = EXCLUSIVE.lock().unwrap_or_else(|e| e.into_inner());
    let env = Env::new("icmp", &["a", "b"]);
    let net = 20 + (std::process::id() + 175) % 200;
    let upstream = Bundled::start(&["--ttl", "60"]);
    let policy = format!(
        r#"apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {{name: a-icmp, namespace: default}}
spec:
  endpointSelector: {{matchLabels: {{app: a}}}}
  egress:
  - toCIDR: ["127.{net}.210.0/24", "::1/128"]
    icmps: [{{fields: [{{type: 8}}, {{type: 128, family: IPv6}}]}}]
  - toCIDR: ["127.{net}.211.0/24"]
  - toCIDR: ["127.{net}.212.0/24"]
    toPorts: [{{ports: [{{port: "0", protocol: ANY}}]}}]
  egressDeny:
  - toCIDR: ["127.{net}.211.128/25"]
    icmps: [{{fields: [{{type: 8}}]}}]
"#
    );
    let mut config = agent_config(&env, upstream.addr, &[]);
    config.policy = policy;
    config.endpoints = TWO_ENDPOINTS.into();
    let _agent = Agent::start(&config);
    let ip = |s: String| -> IpAddr { s.parse().unwrap() };
    let echo_ok = |client, to: IpAddr, t| {
        assert_eq!(
            env.icmp(Some(client), to, t),
            Ok(true),
            "{client} -> {to} type {t}"
        );
    };
    let refused = |client, to: IpAddr, t| {
        assert!(
            env.icmp_denied(Some(client), to, t),
            "{client} -> {to} type {t}: {:?}",
            env.icmp(Some(client), to, t)
        );
    };
    // icmps: echo requests (v4 and v6) only.
    echo_ok("a", ip(format!("127.{net}.210.1")), 8);
    refused("a", ip(format!("127.{net}.210.1")), 13);
    echo_ok("a", "::1".parse().unwrap(), 128);
    refused("a", "::1".parse().unwrap(), 139);
    // An L3 rule without ports: everything, ICMP included, less what egressDeny denies.
    echo_ok("a", ip(format!("127.{net}.211.1")), 8);
    refused("a", ip(format!("127.{net}.211.200")), 8);
    // Every port over ANY is TCP, UDP and SCTP: not ICMP. No rule at all: refused.
    refused("a", ip(format!("127.{net}.212.1")), 8);
    refused("a", ip(format!("127.{net}.213.1")), 8);
    // An endpoint no policy selects.
    echo_ok("b", ip(format!("127.{net}.213.1")), 8);
    // A ping socket (SOCK_DGRAM, IPPROTO_ICMP): its connect() passes the connect hook (it has
    // no type to judge), its packets are judged by type.
    let _ping = PingGroupRange::allow_root();
    assert_eq!(
        ping_socket(&env, "a", ip(format!("127.{net}.210.1"))),
        "reply"
    );
    assert!(
        ping_socket(&env, "a", ip(format!("127.{net}.213.1"))).contains("PermissionError"),
        "no rule: the echo is refused"
    );
}

/// An echo request from a connected ping socket inside `client`'s cgroup: `reply`, or what
/// went wrong.
fn ping_socket(env: &Env, client: &str, to: IpAddr) -> String {
    const PROBE: &str = r#"import socket, struct, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_ICMP)
s.settimeout(2)
try:
    s.connect((sys.argv[1], 0))
    s.send(struct.pack('!BBHHH', 8, 0, 0, 0, 1) + b'dnsfence')
    print('reply' if s.recv(2048)[0] == 0 else 'other')
except Exception as e:
    print(type(e).__name__, e)
"#;
    let out = env.run_in(Some(client), "python3", &["-c", PROBE, &to.to_string()]);
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout).trim(),
        String::from_utf8_lossy(&out.stderr).trim()
    )
}

/// `net.ipv4.ping_group_range` widened to let root open ping sockets (the default, `1 0`,
/// lets no group), put back on drop.
struct PingGroupRange(String);

impl PingGroupRange {
    const PATH: &str = "/proc/sys/net/ipv4/ping_group_range";

    fn allow_root() -> PingGroupRange {
        let old = std::fs::read_to_string(Self::PATH).expect("ping_group_range");
        std::fs::write(Self::PATH, "0 0").expect("set ping_group_range");
        PingGroupRange(old)
    }
}

impl Drop for PingGroupRange {
    fn drop(&mut self) {
        let _ = std::fs::write(Self::PATH, self.0.trim());
    }
}

/// `enableDefaultDeny: {egress: false}` in eBPF mode: an endpoint selected only by such a
/// policy keeps reaching everything (TCP, ICMP) but what its `egressDeny` denies, and its DNS
/// rule still judges the queries it covers; an endpoint also selected by a policy with
/// default deny is enforced as usual.
#[test]
fn default_allow_policies_deny_only_what_they_deny() {
    if !require_root("datapath") {
        return;
    }
    let _serial = EXCLUSIVE.lock().unwrap_or_else(|e| e.into_inner());
    let env = Env::new("defallow", &["a", "b"]);
    let net = 20 + (std::process::id() + 125) % 200;
    let upstream = Bundled::start(&["--ttl", "60"]);
    let policy = format!(
        r#"apiVersion: cilium.io/v2
kind: CiliumClusterwideNetworkPolicy
metadata: {{name: broad}}
spec:
  endpointSelector: {{}}
  enableDefaultDeny: {{egress: false}}
  egress:
  - toPorts:
    - ports: [{{port: "53", protocol: ANY}}]
      rules:
        dns: [{{matchPattern: "*.allowed.test"}}]
  egressDeny:
  - toCIDR: ["127.{net}.66.0/24"]
---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {{name: b-strict, namespace: default}}
spec:
  endpointSelector: {{matchLabels: {{app: b}}}}
  egress:
  - toCIDR: ["127.{net}.65.0/24"]
    toPorts: [{{ports: [{{port: "9443", protocol: TCP}}]}}]
"#
    );
    let mut config = agent_config(&env, upstream.addr, &[]);
    config.policy = policy;
    config.endpoints = TWO_ENDPOINTS.into();
    let _agent = Agent::start(&config);
    let ip = |s: String| -> IpAddr { s.parse().unwrap() };
    let (open, denied) = (ip(format!("127.{net}.65.1")), ip(format!("127.{net}.66.1")));
    let _l = [listen_on(open, &[9443, 9444]), listen_on(denied, &[9443])];
    // a: default allow, less the egressDeny prefix.
    assert_eq!(env.connect(Some("a"), SocketAddr::new(open, 9444)), Ok(()));
    assert_eq!(env.icmp(Some("a"), open, 8), Ok(true));
    assert!(env.denied(Some("a"), SocketAddr::new(denied, 9443)));
    assert!(env.icmp_denied(Some("a"), denied, 8));
    // Its DNS rule still judges the DNS it covers (every server on port 53 here).
    assert_eq!(
        env.dig(Some("a"), server(), &["www.allowed.test", "A"])
            .status,
        "NOERROR"
    );
    assert_eq!(
        env.dig(Some("a"), server(), &["www.other.test", "A"])
            .status,
        "REFUSED"
    );
    // b: also selected by a default-deny policy: its own rule, and the broad deny.
    assert_eq!(env.connect(Some("b"), SocketAddr::new(open, 9443)), Ok(()));
    assert!(env.denied(Some("b"), SocketAddr::new(open, 9444)));
    assert!(env.denied(Some("b"), SocketAddr::new(denied, 9443)));
}

/// Over a new endpoints map the older programs stay attached until every endpoint's entry is
/// written: not when one was refused, which only they still enforce (review finding: the
/// sync that went on past a refusal detached them, and the refused endpoint ran unenforced).
#[test]
fn older_programs_stay_while_an_endpoint_entry_is_refused() {
    if !require_root("datapath") {
        return;
    }
    let _serial = EXCLUSIVE.lock().unwrap_or_else(|e| e.into_inner());
    let env = Env::new("refusedetach", &["a", "b"]);
    let net = 20 + (std::process::id() + 195) % 200;
    let policy = format!(
        r#"apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {{name: ab, namespace: default}}
spec:
  endpointSelector: {{matchExpressions: [{{key: app, operator: Exists}}]}}
  egress:
  - toCIDR: ["127.{net}.9.0/24"]
    toPorts: [{{ports: [{{port: "9443", protocol: TCP}}]}}]
"#
    );
    let p = dnsfence_policy::PolicySet::from_yaml(std::path::Path::new("p.yaml"), &policy)
        .expect("the test policy");
    let e = dnsfence_policy::Endpoints::from_yaml(std::path::Path::new("e.yaml"), TWO_ENDPOINTS)
        .expect("the test endpoints");
    let snapshot = |generation| {
        let mut s = dnsfence_policy::Snapshot::compile_on(
            &p,
            &e,
            &[],
            &dnsfence_policy::cidr::NodeFacts::default(),
        );
        s.set_generation(generation);
        s
    };
    let v4: IpAddr = format!("127.{net}.9.1").parse().unwrap();
    let _l = listen_on(v4, &[9443, 9444]);
    let closed = SocketAddr::new(v4, 9444);

    let mut dp = env.install(None, 1024);
    dp.sync_endpoints(&snapshot(1)).unwrap();
    assert!(env.denied(Some("a"), closed) && env.denied(Some("b"), closed));
    drop(dp);
    // A new endpoints map of one entry: the older programs stay attached over the old maps.
    std::fs::remove_file(
        env.pin
            .join(format!("maps-v{}", dnsfence_datapath::maps::ABI))
            .join("df_endpoints"),
    )
    .unwrap();
    let mut dp = env.install_endpoints(1);
    let waiting = dp.awaiting_detach();
    assert!(waiting > 0);
    let sync = dp.sync_endpoints(&snapshot(2)).unwrap();
    assert_eq!(sync.refused.len(), 1, "{sync:?}");
    assert_eq!(
        dp.awaiting_detach(),
        waiting,
        "detached with an endpoint refused"
    );
    // Both still enforced: the refused one by the older programs.
    assert!(env.denied(Some("a"), closed) && env.denied(Some("b"), closed));
    drop(dp);
}

/// A restart of the same build keeps the programs it attached (no verifier work): the same
/// link pins stay, and the kept programs enforce what the new process syncs into the pinned
/// maps. Where a map pin was made anew since (the kept programs would not see it), the
/// programs are loaded and attached again, and enforce through the new map.
#[test]
fn a_restart_of_the_same_build_keeps_its_programs_over_the_same_maps() {
    if !require_root("datapath") {
        return;
    }
    let _serial = EXCLUSIVE.lock().unwrap_or_else(|e| e.into_inner());
    let env = Env::new("keep", &["a"]);
    let net = 20 + (std::process::id() + 190) % 200;
    let snapshot = |port: u16, generation| cidr_snapshot(net, port, "", generation);
    let install = || env.install(None, 1024);
    let links = || {
        let mut names: Vec<String> = std::fs::read_dir(env.pin.join("links"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        names
    };
    let v4: IpAddr = format!("127.{net}.9.1").parse().unwrap();
    let _l = listen_on(v4, &[9443, 9444]);
    let (first, second) = (SocketAddr::new(v4, 9443), SocketAddr::new(v4, 9444));

    let mut dp = install();
    assert!(!dp.reused_programs(), "nothing was attached before");
    dp.sync_endpoints(&snapshot(9443, 1)).unwrap();
    assert_eq!(env.connect(Some("a"), first), Ok(()));
    let attached = links();
    assert_eq!(
        attached.len(),
        dnsfence_datapath::PROGRAMS.len(),
        "{attached:?}"
    );
    drop(dp);

    // The same build again: the same links, and what it syncs is enforced by them.
    let mut dp = install();
    assert!(dp.reused_programs());
    assert_eq!(links(), attached);
    dp.sync_endpoints(&snapshot(9444, 2)).unwrap();
    assert!(
        env.denied(Some("a"), first),
        "the kept programs missed the new sync"
    );
    assert_eq!(env.connect(Some("a"), second), Ok(()));
    drop(dp);

    // A link detached behind our back (its pin stays, its cgroup reads 0): attached again.
    let egress = attached
        .iter()
        .find(|l| l.starts_with("df_egress@"))
        .unwrap();
    let pinned = env.pin.join("links").join(egress);
    let out = std::process::Command::new("bpftool")
        .args(["link", "detach", "pinned"])
        .arg(&pinned)
        .output()
        .expect("bpftool");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut dp = install();
    assert!(!dp.reused_programs(), "kept a detached link");
    let again = links();
    assert!(again.iter().all(|l| !attached.contains(l)), "{again:?}");
    dp.sync_endpoints(&snapshot(9444, 3)).unwrap();
    assert!(
        env.denied(Some("a"), first),
        "egress not enforced after the detach"
    );
    assert_eq!(env.connect(Some("a"), second), Ok(()));
    drop(dp);

    // Another cgroup root on the same pin directory: its own programs, not the root's.
    let other = env.cgroup_root.join("keep-other-root");
    std::fs::create_dir_all(&other).unwrap();
    let dp = env.install(Some(&other), 1024);
    assert!(!dp.reused_programs(), "kept links of another cgroup");
    drop(dp);
    std::fs::remove_dir(&other).unwrap();
    let mut dp = install();
    assert!(!dp.reused_programs(), "the links are the other root's now");
    dp.sync_endpoints(&snapshot(9444, 4)).unwrap();
    assert!(env.denied(Some("a"), first));
    drop(dp);
    let attached = links();

    // A map pin made anew: the programs are attached again, over the new map.
    std::fs::remove_file(
        env.pin
            .join(format!("maps-v{}", dnsfence_datapath::maps::ABI))
            .join("df_endpoints"),
    )
    .unwrap();
    let mut dp = install();
    assert!(
        !dp.reused_programs(),
        "kept programs that use a map no longer pinned"
    );
    // Over a fresh map the older programs stay attached until the endpoints are synced.
    assert_eq!(dp.awaiting_detach(), attached.len());
    assert_eq!(links().len(), 2 * attached.len());
    dp.sync_endpoints(&snapshot(9443, 5)).unwrap();
    assert_eq!(dp.awaiting_detach(), 0);
    let now = links();
    assert_eq!(now.len(), attached.len(), "{now:?}");
    assert!(now.iter().all(|l| !attached.contains(l)), "{now:?}");
    assert_eq!(env.connect(Some("a"), first), Ok(()));
    assert!(env.denied(Some("a"), second));
    drop(dp);
}
