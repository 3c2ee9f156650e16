//! Without `--upstream` (eBPF mode), each query goes to the DNS server its workload
//! addressed, as the redirect recorded it, when that server is a trusted one
//! (`--dns-server`): UDP and TCP, IPv4 and IPv6, both I/O backends; a server the workload
//! chose is refused and never asked (root; real cgroups, real kernel, dig inside a cgroup,
//! servers on port 53 of local addresses).
use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use dnsfence_tests::bpf::{self, EXCLUSIVE, Env, TWO_ENDPOINTS, require_root};
use dnsfence_tests::upstream::{FakeMode, FakeUpstream};
use dnsfence_tests::{Agent, IoBackend, TempDir, bin, free_port, poll_until};

/// `a` may resolve `*.allowed.test` from any server; `b` is not restricted by this policy.
const POLICY: &str = r#"apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: a-dns, namespace: default}
spec:
  endpointSelector: {matchLabels: {app: a}}
  egress:
  - toPorts:
    - ports: [{port: "53", protocol: ANY}]
      rules:
        dns: [{matchPattern: "*.allowed.test"}]
"#;

fn addr(s: &str) -> SocketAddr {
    s.parse().expect("address")
}

#[test]
fn without_upstream_each_query_goes_to_the_server_its_workload_addressed() {
    if !require_root("original_server") {
        return;
    }
    let _serial = EXCLUSIVE.lock().unwrap_or_else(|e| e.into_inner());
    let env = Env::new("origin", &["a", "b"]);
    let _v6 = env.local_address("fd00:53::53".parse().expect("address"));
    let one = FakeUpstream::start_on(addr("127.0.0.77:53"), FakeMode::Answer);
    let two = FakeUpstream::start_on(addr("127.0.0.78:53"), FakeMode::Answer);
    let six = FakeUpstream::start_on(addr("[fd00:53::53]:53"), FakeMode::Answer);
    // The workload's own server: it would answer anything (and open egress to it).
    let rogue = FakeUpstream::start_on(addr("127.0.0.79:53"), FakeMode::Answer);
    let seen = |u: &FakeUpstream, name: &str| u.names().iter().any(|n| n == name);

    for io in [IoBackend::Uring, IoBackend::Mmsg] {
        let port = free_port();
        let v6_listen = format!("[::1]:{port}");
        let mut config = bpf::agent_config(
            &env,
            one.addr,
            POLICY,
            TWO_ENDPOINTS,
            &[
                "--listen",
                &v6_listen,
                "--dns-server",
                "127.0.0.77:53",
                "--dns-server",
                "127.0.0.78:53",
                "--dns-server",
                "[fd00:53::53]:53",
            ],
        );
        config.io = io;
        config.upstream = None;
        config.listen = Some(SocketAddr::from(([127, 0, 0, 1], port)));
        let mut agent = Agent::start(&config);
        let tag = format!("{io:?}").to_lowercase();

        // UDP to the first server: answered by it, and by it only.
        let name = format!("udp-{tag}.allowed.test");
        let r = env.dig(Some("a"), one.addr, &[&name, "A"]);
        assert_eq!(r.status, "NOERROR", "{io:?}: {}", r.output);
        assert!(
            r.output.contains("SERVER: 127.0.0.77#53(127.0.0.77)"),
            "{}",
            r.output
        );
        assert!(seen(&one, &name) && !seen(&two, &name) && !seen(&six, &name));

        // TCP to the second.
        let name = format!("tcp-{tag}.allowed.test");
        let r = env.dig(Some("a"), two.addr, &[&name, "A", "+tcp"]);
        assert_eq!(r.status, "NOERROR", "{io:?}: {}", r.output);
        assert!(seen(&two, &name) && !seen(&one, &name) && !seen(&six, &name));

        // IPv6, UDP and TCP, to the third.
        for extra in [&[][..], &["+tcp"][..]] {
            let name = format!("v6{}-{tag}.allowed.test", extra.len());
            let mut args = vec![name.as_str(), "A"];
            args.extend_from_slice(extra);
            let r = env.dig(Some("a"), six.addr, &args);
            assert_eq!(r.status, "NOERROR", "{io:?} {extra:?}: {}", r.output);
            assert!(r.output.contains("SERVER: fd00:53::53#53"), "{}", r.output);
            assert!(seen(&six, &name) && !seen(&one, &name) && !seen(&two, &name));
        }

        // A server that is not a trusted one: refused, and never asked.
        let name = format!("rogue-{tag}.allowed.test");
        for extra in [&[][..], &["+tcp"][..]] {
            let mut args = vec![name.as_str(), "A"];
            args.extend_from_slice(extra);
            let r = env.dig(Some("a"), rogue.addr, &args);
            assert_eq!(r.status, "REFUSED", "{io:?} {extra:?}: {}", r.output);
        }
        assert!(rogue.names().is_empty(), "{:?}", rogue.names());

        // A denied name reaches no server.
        let name = format!("evil-{tag}.denied.test");
        let r = env.dig(Some("a"), one.addr, &[&name, "A"]);
        assert_eq!(r.status, "REFUSED", "{}", r.output);
        assert!(!seen(&one, &name) && !seen(&two, &name) && !seen(&six, &name));

        // Sent to the proxy's own address there is no server to forward to: SERVFAIL.
        let name = format!("direct-{tag}.allowed.test");
        let r = env.dig(Some("a"), addr(&format!("127.0.0.1:{port}")), &[&name, "A"]);
        assert_eq!(r.status, "SERVFAIL", "{}", r.output);
        assert!(!seen(&one, &name) && !seen(&two, &name) && !seen(&six, &name));
        let counted = poll_until(Duration::from_secs(5), || {
            (agent.metric_sum("dnsfence_no_upstream_total") == 1.0).then_some(())
        });
        assert!(counted.is_some(), "{}", agent.metrics_text());

        let counted = poll_until(Duration::from_secs(5), || {
            (agent.metric_sum("dnsfence_untrusted_server_total") == 2.0).then_some(())
        });
        assert!(counted.is_some(), "{}", agent.metrics_text());
        agent.process.terminate(Duration::from_secs(10));
        assert!(
            agent.process.stderr().contains(
                "(the server each workload addressed, if one of: 127.0.0.77:53, \
                 127.0.0.78:53, [fd00:53::53]:53)"
            ),
            "{}",
            agent.process.stderr()
        );
    }
}

#[test]
fn no_bpf_without_upstream_is_refused_with_the_reason() {
    let dir = TempDir::new("no-upstream");
    let policy = dir.write("policy.yaml", POLICY);
    let endpoints = dir.write("endpoints.yaml", TWO_ENDPOINTS);
    let out = Command::new(bin("dnsfence"))
        .args([
            "agent",
            "--no-bpf",
            "--listen",
            "127.0.0.1:5300",
            "--policy",
        ])
        .arg(policy)
        .arg("--endpoints")
        .arg(endpoints)
        .output()
        .expect("run dnsfence");
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--upstream is required with --no-bpf") && err.lines().count() == 1,
        "{err}"
    );
}
