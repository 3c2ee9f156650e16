//! Issue #3 acceptance: hot reload of the policy file (good and broken edits) and the metrics
//! page's per-shard query counters.

use std::path::Path;
use std::time::{Duration, Instant};

use dnsfence_tests::dns::{self, TYPE_A, rcode};
use dnsfence_tests::upstream::{FakeMode, FakeUpstream};
use dnsfence_tests::{Agent, AgentConfig, IoBackend, both_backends, dig, poll_until};

const T: Duration = Duration::from_secs(3);

both_backends! {
    hot_reload_allows_then_keeps_last_good_policy => hot_reload,
    per_shard_query_counters_add_up => per_shard_counters,
}

/// Replaces `path` atomically (write a sibling, rename over), so the agent never reads half a
/// file.
fn replace_file(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).expect("write");
    std::fs::rename(&tmp, path).expect("rename");
}

fn hot_reload(io: IoBackend) {
    let fake = FakeUpstream::start(FakeMode::Answer);
    let agent =
        Agent::start(&AgentConfig::new(io, fake.addr).args(&["--reload-interval", "200ms"]));
    let name = "www.later.test";
    let r = dig(agent.addr, &[name]);
    assert_eq!(r.status, "REFUSED", "{}", r.output);

    // A good edit: the denied name becomes allowed within about 2 s.
    let allowing = dnsfence_tests::POLICY.replace(
        r#"{matchName: "allowed.test"}"#,
        r#"{matchName: "allowed.test"}, {matchPattern: "*.later.test"}"#,
    );
    assert_ne!(allowing, dnsfence_tests::POLICY);
    let edited = Instant::now();
    replace_file(&agent.policy_path, &allowing);
    let took = poll_until(Duration::from_secs(3), || {
        (dig(agent.addr, &["+tries=1", "+time=1", name]).status == "NOERROR")
            .then(|| edited.elapsed())
    })
    .unwrap_or_else(|| {
        panic!(
            "still refused 3 s after the edit: {}",
            agent.process.stderr()
        )
    });
    assert!(took < Duration::from_secs(2), "reload took {took:?}");
    assert!(fake.names().contains(&name.to_owned()));

    // A broken edit: logged, counted, and the last good policy stays in force.
    replace_file(&agent.policy_path, "apiVersion: cilium.io/v2\nkind: [\n");
    let logged = poll_until(Duration::from_secs(3), || {
        agent
            .process
            .stderr()
            .contains("policy reload rejected")
            .then_some(())
    });
    assert!(
        logged.is_some(),
        "no reload error logged: {}",
        agent.process.stderr()
    );
    let stderr = agent.process.stderr();
    assert!(
        stderr.contains(&format!("{}:", agent.policy_path.display())),
        "the error names the file: {stderr}"
    );
    for proto in ["+notcp", "+tcp"] {
        assert_eq!(dig(agent.addr, &[proto, name]).status, "NOERROR", "{proto}");
        assert_eq!(
            dig(agent.addr, &[proto, "www.denied.test"]).status,
            "REFUSED"
        );
    }
    let text = agent.metrics_text();
    let errors = dns::metric_values(&text, "dnsfence_policy_reload_errors_total");
    assert_eq!(errors, [(String::new(), 1.0)], "{text}");
    let generation = dns::metric_values(&text, "dnsfence_policy_generation");
    assert_eq!(generation, [(String::new(), 2.0)], "{text}");
    let mut agent = agent;
    agent.process.assert_running();
}

fn per_shard_counters(io: IoBackend) {
    const UDP: u64 = 120;
    const TCP: u64 = 10;
    let fake = FakeUpstream::start(FakeMode::Answer);
    let agent = Agent::start(&AgentConfig::new(io, fake.addr).shards(2, None));
    // Counters are published about every 100 ms: wait until the readiness probes show and the
    // value holds still.
    let probes = agent.probes_answered as f64;
    let mut last = -1.0;
    let baseline = poll_until(T, || {
        std::thread::sleep(Duration::from_millis(150));
        let now = agent.metric_sum("dnsfence_queries_total");
        let stable = now == last && now >= probes;
        last = now;
        stable.then_some(now)
    })
    .expect("queries_total settles after start");

    // Each UDP query from its own socket (own source port), so SO_REUSEPORT spreads them.
    for i in 0..UDP {
        let name = if i % 3 == 0 {
            "www.denied.test"
        } else {
            "www.allowed.test"
        };
        let q = dns::query(i as u16, name, TYPE_A, None);
        let reply = dns::udp_exchange(agent.addr, &q, T).expect("answer");
        assert!(matches!(
            dns::rcode(&reply),
            rcode::NOERROR | rcode::REFUSED
        ));
    }
    let mut conn = dns::tcp_connect(agent.addr, T);
    for i in 0..TCP {
        dns::tcp_send(
            &mut conn,
            &dns::query(i as u16, "www.allowed.test", TYPE_A, None),
        )
        .expect("send");
        dns::tcp_recv(&mut conn).expect("TCP answer");
    }
    let want = baseline + (UDP + TCP) as f64;
    let per_shard = poll_until(T, || {
        let v = agent.metric("dnsfence_queries_total");
        let sum: f64 = v.iter().map(|(_, n)| n).sum();
        (sum == want).then_some(v)
    })
    .unwrap_or_else(|| {
        panic!(
            "dnsfence_queries_total does not add up to {want}: {:?}",
            agent.metric("dnsfence_queries_total")
        )
    });
    let labels: Vec<&str> = per_shard.iter().map(|(l, _)| l.as_str()).collect();
    assert_eq!(labels, [r#"shard="0""#, r#"shard="1""#]);
    assert!(
        per_shard.iter().all(|(_, n)| *n > 0.0),
        "both shards took queries: {per_shard:?}"
    );
    // The outcome counters account for every query too.
    let text = agent.metrics_text();
    let sum = |m: &str| -> f64 { dns::metric_values(&text, m).iter().map(|(_, v)| v).sum() };
    let refused = sum("dnsfence_refused_total");
    let forwarded = sum("dnsfence_forwarded_total");
    assert_eq!(
        refused + forwarded,
        want,
        "refused {refused} + forwarded {forwarded}"
    );
    assert_eq!(forwarded, fake.names().len() as f64);
    // The I/O layer's counters are published too: every UDP query came in as a datagram
    // (upstream answers add more) and every TCP query on an accepted connection.
    let udp_rx = sum("dnsfence_io_udp_rx_total");
    assert!(udp_rx >= UDP as f64, "dnsfence_io_udp_rx_total {udp_rx}");
    assert!(sum("dnsfence_io_tcp_accepted_total") >= 1.0);
}

/// Idle connections to the metrics listener (open, nothing sent) do not stall a scrape.
#[test]
fn idle_metrics_connections_do_not_stall_a_scrape() {
    let fake = FakeUpstream::start(FakeMode::Answer);
    let agent = Agent::start(&AgentConfig::new(IoBackend::Mmsg, fake.addr));
    let _ = agent.metrics_text(); // the listener is up
    let idle: Vec<std::net::TcpStream> = (0..50)
        .map(|_| std::net::TcpStream::connect(agent.metrics).expect("connect"))
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let started = Instant::now();
    let text = dns::http_get(agent.metrics, "/metrics").expect("scrape");
    let took = started.elapsed();
    assert!(text.contains("dnsfence_policy_generation 1"), "{text}");
    assert!(
        took < Duration::from_secs(1),
        "scrape took {took:?} with 50 idle connections"
    );
    drop(idle);
}

/// `--flow-log` gets one JSON line per query, visible while the agent runs.
#[test]
fn flow_log_has_a_line_per_query() {
    let fake = FakeUpstream::start(FakeMode::Answer);
    let log = std::env::temp_dir().join(format!("dnsfence-flow-{}.jsonl", std::process::id()));
    let _ = std::fs::remove_file(&log);
    let log_arg = log.display().to_string();
    let agent =
        Agent::start(&AgentConfig::new(IoBackend::Mmsg, fake.addr).args(&["--flow-log", &log_arg]));
    for (id, name) in [(1u16, "Flow.Allowed.Test"), (2, "flow.denied.test")] {
        let q = dns::query(id, name, TYPE_A, None);
        dns::udp_exchange(agent.addr, &q, T).expect("answer");
    }
    let lines = poll_until(T, || {
        let text = std::fs::read_to_string(&log).ok()?;
        let flows: Vec<serde_json::Value> = text
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .filter(|v: &serde_json::Value| v["name"].as_str() != Some("probe.allowed.test."))
            .filter(|v| v["name"].as_str().is_some_and(|n| n.starts_with("flow.")))
            .collect();
        (flows.len() == 2).then_some(flows)
    })
    .unwrap_or_else(|| panic!("flow log: {:?}", std::fs::read_to_string(&log)));
    assert_eq!(lines[0]["name"], "flow.allowed.test.");
    assert_eq!(lines[0]["verdict"], "Forward");
    assert_eq!(lines[0]["rcode"], 0);
    assert!(lines[0]["upstream_us"].as_i64().unwrap() >= 0);
    assert!(lines[0]["endpoint"].is_string());
    assert_eq!(lines[1]["name"], "flow.denied.test.");
    assert_eq!(lines[1]["verdict"], "Refuse");
    assert_eq!(lines[1]["rcode"], i64::from(rcode::REFUSED));
    // Every workload's queries are in it: readable by its owner only (review finding).
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&log)
        .expect("flow log")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "flow log mode {mode:o}");
    drop(agent);
    let _ = std::fs::remove_file(&log);
}

/// A reload that would leave a cgroup-only endpoint unrestricted (`--unknown-source allow`
/// cannot recognise it without eBPF) is rejected like a broken edit, as it is at start.
#[test]
fn reload_refuses_what_start_refuses() {
    let fake = FakeUpstream::start(FakeMode::Answer);
    let agent = Agent::start(&AgentConfig::new(IoBackend::Mmsg, fake.addr).args(&[
        "--reload-interval",
        "200ms",
        "--unknown-source",
        "allow",
    ]));
    let mut endpoints = std::fs::read_to_string(&agent.endpoints_path).unwrap();
    endpoints.push_str("- name: cgroup-only\n  namespace: default\n  cgroup: kubepods/pod1\n");
    std::fs::write(&agent.endpoints_path, endpoints).unwrap();
    let rejected = poll_until(Duration::from_secs(5), || {
        let text = agent.metrics_text();
        let errors = dns::metric_values(&text, "dnsfence_policy_reload_errors_total");
        (errors == [(String::new(), 1.0)]).then_some(text)
    })
    .unwrap_or_else(|| panic!("reload not rejected: {}", agent.process.stderr()));
    let generation = dns::metric_values(&rejected, "dnsfence_policy_generation");
    assert_eq!(generation, [(String::new(), 1.0)]);
    assert!(
        agent.process.stderr().contains("cgroup only"),
        "{}",
        agent.process.stderr()
    );
}

/// A flow log an older build made under the umask is made private at start; one reached
/// through a symlink is left as it is (said), never the link's target changed (review: a
/// `--flow-log /dev/null` made the host's /dev/null 0600).
#[test]
fn an_existing_flow_log_is_made_private_but_not_through_a_link() {
    use std::os::unix::fs::PermissionsExt;
    let fake = FakeUpstream::start(FakeMode::Answer);
    let dir = std::env::temp_dir().join(format!("dnsfence-flowperm-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let log = dir.join("flows.jsonl");
    let target = dir.join("target.jsonl");
    let link = dir.join("link.jsonl");
    for f in [&log, &target] {
        std::fs::write(f, "").unwrap();
        std::fs::set_permissions(f, std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    std::os::unix::fs::symlink(&target, &link).unwrap();
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    for (path, want) in [(&log, 0o600), (&link, 0o644)] {
        let arg = path.display().to_string();
        let mut agent =
            Agent::start(&AgentConfig::new(IoBackend::Mmsg, fake.addr).args(&["--flow-log", &arg]));
        let stderr = agent.process.stderr();
        assert_eq!(mode(path), want, "{arg}: {stderr}");
        assert_eq!(
            stderr.contains("is readable by others"),
            want != 0o600,
            "{arg}: {stderr}"
        );
        agent.process.terminate(Duration::from_secs(5));
    }
    let _ = std::fs::remove_dir_all(&dir);
}
