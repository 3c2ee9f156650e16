//! Issue #3 acceptance, the process: its io_uring and pinned shard threads, start-up errors,
//! two agents on one port, SIGTERM.

use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use dnsfence_tests::dns::{self, TYPE_A, rcode};
use dnsfence_tests::upstream::{FakeMode, FakeUpstream};
use dnsfence_tests::{Agent, AgentConfig, IoBackend, both_backends, dig, free_addr, free_port};

const T: Duration = Duration::from_secs(3);

both_backends! {
    shards_pinned_one_cpu_each => shards_pinned,
    listen_port_taken_exits_1_with_one_line => port_taken,
    sigterm_exits_0 => sigterm,
    sigterm_answers_in_flight_then_exits_0 => sigterm_in_flight,
}

/// The `anon_inode:[io_uring]` links among the process's file descriptors.
fn io_uring_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("read /proc/PID/fd")
        .flatten()
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .filter(|l| l.to_string_lossy() == "anon_inode:[io_uring]")
        .count()
}

/// (comm, Cpus_allowed_list) of every thread.
fn threads(pid: u32) -> Vec<(String, String)> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .expect("read /proc/PID/task")
        .flatten()
        .map(|t| {
            let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
            let status = t.path().join("status").display().to_string();
            let cpus =
                dnsfence_tests::proc_status_of(&status, "Cpus_allowed_list").unwrap_or_default();
            (comm.trim().to_owned(), cpus)
        })
        .collect()
}

fn shards_pinned(io: IoBackend) {
    if !dnsfence_tests::require_cpus(&format!("shards_pinned({io:?})"), &[0, 1]) {
        return;
    }
    let fake = FakeUpstream::start(FakeMode::Answer);
    let agent = Agent::start(&AgentConfig::new(io, fake.addr).shards(2, Some("0,1")));
    let pid = agent.process.pid();
    let uring = io_uring_fds(pid);
    match io {
        IoBackend::Uring => assert!(uring >= 1, "no io_uring fd with --io uring"),
        IoBackend::Mmsg => assert_eq!(uring, 0, "io_uring fds with --io mmsg"),
    }
    // Shard threads are named `dnsf-shard-N` (the kernel keeps 15 bytes of a name).
    let all = threads(pid);
    let mut shards: Vec<String> = all
        .iter()
        .filter(|(comm, _)| comm.starts_with("dnsf-shard-"))
        .map(|(_, cpus)| cpus.clone())
        .collect();
    shards.sort();
    assert_eq!(shards, ["0", "1"], "shard threads and their CPUs: {all:?}");
    // Pinning shows in the metrics too, with the backend in use.
    let text = agent.metrics_text();
    for shard in 0..2 {
        let line = format!(
            "dnsfence_shard_info{{shard=\"{shard}\",backend=\"{}\",cpu=\"{shard}\"}} 1",
            io.flag()
        );
        assert!(text.contains(&line), "missing {line:?} in\n{text}");
    }
    let r = dig(agent.addr, &["www.allowed.test"]);
    assert_eq!(r.status, "NOERROR", "{}", r.output);
}

#[test]
fn shards_are_pinned_by_default_one_per_cpu_of_the_affinity_mask() {
    let fake = FakeUpstream::start(FakeMode::Answer);
    // One shard per CPU this test process may use (the agent inherits the mask), no --cpus
    // and no --no-pin: the agent pins them itself.
    let mask: Vec<usize> =
        (0..std::thread::available_parallelism().map_or(1, |n| n.get())).collect();
    let mut config = AgentConfig::new(IoBackend::Mmsg, fake.addr).shards(mask.len(), None);
    config.pin_default = true;
    let agent = Agent::start(&config);
    let all = threads(agent.process.pid());
    let mut shards: Vec<String> = all
        .iter()
        .filter(|(comm, _)| comm.starts_with("dnsf-shard-"))
        .map(|(_, cpus)| cpus.clone())
        .collect();
    shards.sort();
    let want: Vec<String> = mask.iter().map(|c| c.to_string()).collect();
    assert_eq!(shards, want, "each shard on its own CPU: {all:?}");
    let placement = format!("on CPUs {}", want.join(","));
    assert!(
        agent.process.stderr().contains(&placement),
        "{}",
        agent.process.stderr()
    );
}

fn port_taken(io: IoBackend) {
    let udp = UdpSocket::bind("127.0.0.1:0").expect("bind plain UDP socket");
    let tcp = std::net::TcpListener::bind("127.0.0.1:0").expect("bind plain TCP listener");
    port_taken_by(io, udp.local_addr().expect("addr"));
    port_taken_by(io, tcp.local_addr().expect("addr"));
}

fn port_taken_by(io: IoBackend, taken: std::net::SocketAddr) {
    let mut config = AgentConfig::new(io, free_addr());
    config.listen = Some(taken);
    let mut agent = Agent::spawn(&config);
    let status = agent
        .process
        .wait_timeout(Duration::from_secs(10))
        .expect("agent kept running on a taken port");
    assert_eq!(status.code(), Some(1), "{}", agent.process.stderr());
    let stderr = agent.process.stderr();
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "exactly one line on stderr: {stderr:?}");
    assert!(
        lines[0].contains(&taken.to_string()),
        "names the address: {stderr:?}"
    );
}

#[test]
fn invalid_or_unreadable_policy_exits_1_with_file_line_reason() {
    let fake = FakeUpstream::start(FakeMode::Answer);
    let cases = [
        // An unsupported field on line 11.
        (
            dnsfence_tests::POLICY.replace(
                "  - toFQDNs:",
                "  - toGroups: [{aws: {securityGroupsIds: [sg-1]}}]\n  - toFQDNs:",
            ),
            Some(11),
        ),
        // A YAML syntax error.
        ("apiVersion: cilium.io/v2\nkind: [\n".to_owned(), None),
        // A pattern with an invalid character, line 10.
        (
            dnsfence_tests::POLICY.replace("*.allowed.test\"}, {", "bad!name\"}, {"),
            Some(10),
        ),
    ];
    for (policy, line) in cases {
        let mut config = AgentConfig::new(IoBackend::Mmsg, fake.addr);
        config.policy = policy;
        let mut agent = Agent::spawn(&config);
        let status = agent
            .process
            .wait_timeout(Duration::from_secs(10))
            .expect("agent started with an invalid policy");
        let stderr = agent.process.stderr();
        assert_eq!(status.code(), Some(1), "{stderr}");
        let prefix = format!("{}:", agent.policy_path.display());
        let located = stderr.lines().find_map(|l| {
            let rest = &l[l.find(&prefix)? + prefix.len()..];
            let (n, reason) = rest.split_once(": ")?;
            Some((n.parse::<u32>().ok()?, reason.to_owned()))
        });
        let (n, reason) = located.unwrap_or_else(|| panic!("no FILE:LINE: reason in {stderr:?}"));
        assert!(!reason.trim().is_empty(), "{stderr}");
        if let Some(line) = line {
            assert_eq!(n, line, "{stderr}");
        }
    }
    // Unreadable: a path that does not exist.
    let mut config = AgentConfig::new(IoBackend::Mmsg, fake.addr);
    config.extra = vec![
        "--policy".into(),
        "/nonexistent/dnsfence/policy.yaml".into(),
    ];
    let mut agent = Agent::spawn(&config);
    let status = agent
        .process
        .wait_timeout(Duration::from_secs(10))
        .expect("agent started without its policy");
    let stderr = agent.process.stderr();
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("/nonexistent/dnsfence/policy.yaml:"),
        "names the file: {stderr}"
    );
}

#[test]
fn wildcard_listen_is_refused_with_one_line() {
    let fake = FakeUpstream::start(FakeMode::Answer);
    let mut config = AgentConfig::new(IoBackend::Mmsg, fake.addr);
    config.listen = Some(SocketAddr::from(([0, 0, 0, 0], free_port())));
    let mut agent = Agent::spawn(&config);
    let status = agent
        .process
        .wait_timeout(Duration::from_secs(10))
        .expect("agent started on a wildcard address");
    let stderr = agent.process.stderr();
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("name the address"), "{stderr}");
}

/// `--coalesce` (issue 12 item 4) reaches the shards: an agent coalescing completions answers
/// every query, sequential ones included (each wait ends at its bound with one completion);
/// an out-of-range value is refused at start.
#[test]
fn coalescing_agent_answers_and_bad_values_are_refused() {
    let fake = FakeUpstream::start(FakeMode::Answer);
    let config = AgentConfig::new(IoBackend::Uring, fake.addr).args(&["--coalesce", "2ms"]);
    let mut agent = Agent::start(&config);
    for i in 0..20u16 {
        let q = dns::query(i, "www.allowed.test", TYPE_A, None);
        let raw = dns::udp_exchange(agent.addr, &q, T).expect("answer");
        assert_eq!(dns::rcode(&raw), rcode::NOERROR);
    }
    agent.process.assert_running();
    agent.wait_metric("dnsfence_io_coalesced_waits_total", 10.0);
    // Without the flag, no wait coalesces.
    let plain = Agent::start(&AgentConfig::new(IoBackend::Uring, fake.addr));
    for i in 0..5u16 {
        let q = dns::query(i, "www.allowed.test", TYPE_A, None);
        dns::udp_exchange(plain.addr, &q, T).expect("answer");
    }
    plain.wait_metric("dnsfence_io_waits_total", 5.0);
    assert_eq!(plain.metric_sum("dnsfence_io_coalesced_waits_total"), 0.0);
    let bad = AgentConfig::new(IoBackend::Uring, fake.addr).args(&["--coalesce", "11ms"]);
    let mut bad = Agent::spawn(&bad);
    let status = bad.process.wait_timeout(Duration::from_secs(10));
    let stderr = bad.process.stderr();
    assert_eq!(status.and_then(|s| s.code()), Some(2), "{stderr}");
    assert!(stderr.contains("over 10ms"), "{stderr}");
}

#[test]
fn two_agents_share_a_port() {
    let fake = FakeUpstream::start(FakeMode::Answer);
    let first = Agent::start(&AgentConfig::new(IoBackend::Uring, fake.addr));
    let mut second_config = AgentConfig::new(IoBackend::Mmsg, fake.addr);
    second_config.listen = Some(first.addr);
    let second = Agent::start(&second_config);
    let mut agents = [first, second];
    // Queries from many source ports are spread over both; every one is answered.
    for i in 0..50u16 {
        let q = dns::query(i, "www.allowed.test", TYPE_A, None);
        let raw = dns::udp_exchange(agents[0].addr, &q, T).expect("answer");
        assert_eq!(dns::rcode(&raw), rcode::NOERROR);
    }
    for a in &mut agents {
        a.process.assert_running();
        let status = a.process.terminate(Duration::from_secs(5));
        assert_eq!(
            status.and_then(|s| s.code()),
            Some(0),
            "{}",
            a.process.stderr()
        );
    }
}

fn sigterm(io: IoBackend) {
    let fake = FakeUpstream::start(FakeMode::Answer);
    let mut agent = Agent::start(&AgentConfig::new(io, fake.addr).shards(2, None));
    for proto in ["+notcp", "+tcp"] {
        assert_eq!(
            dig(agent.addr, &[proto, "www.allowed.test"]).status,
            "NOERROR"
        );
    }
    // A TCP client still connected must not hold the exit up.
    let _idle = dns::tcp_connect(agent.addr, T);
    let start = Instant::now();
    let status = agent.process.terminate(Duration::from_secs(3));
    let took = start.elapsed();
    let stderr = agent.process.stderr();
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(0),
        "exit after SIGTERM ({took:?}): {stderr}"
    );
    assert!(took < Duration::from_secs(2), "SIGTERM took {took:?}");
}

fn sigterm_in_flight(io: IoBackend) {
    // A query in flight to an upstream that never answers: the drain answers it SERVFAIL at
    // the upstream timeout, then the agent exits 0.
    let fake = FakeUpstream::start(FakeMode::Silent);
    let mut agent =
        Agent::start(&AgentConfig::new(io, fake.addr).args(&["--upstream-timeout", "1s"]));
    let client = dns::udp_client(T);
    let q = dns::query(0x1f1f, "www.allowed.test", TYPE_A, None);
    client.send_to(&q, agent.addr).expect("send");
    dnsfence_tests::poll_until(T, || (!fake.names().is_empty()).then_some(()))
        .expect("query reached the upstream");
    let start = Instant::now();
    agent.process.signal("TERM");
    let reply = dns::recv_reply(&client, T).expect("silence for a query in flight at SIGTERM");
    assert_eq!(dns::rcode(&reply), rcode::SERVFAIL);
    let status = agent.process.wait_timeout(Duration::from_secs(3));
    let took = start.elapsed();
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(0),
        "{}",
        agent.process.stderr()
    );
    assert!(
        took < Duration::from_secs(2),
        "drain took {took:?} (timeout 1s)"
    );
}

/// The agent runs with transparent huge pages off (engine::startup::small_pages_only: the
/// start-up p99 of a process joining a busy node, bench/RESULTS.md), and on again with
/// `DNSFENCE_HUGE_PAGES` set. Read from the kernel: `THP_enabled` in /proc/PID/status.
#[test]
fn the_agent_runs_without_transparent_huge_pages() {
    let thp = |pid: u32| -> Option<String> {
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .ok()?
            .lines()
            .find_map(|l| l.strip_prefix("THP_enabled:").map(|v| v.trim().to_owned()))
    };
    if thp(std::process::id()).is_none() {
        eprintln!("skipped: this kernel does not show THP_enabled");
        return;
    }
    let fake = FakeUpstream::start(FakeMode::Answer);
    let agent = Agent::start(&AgentConfig::new(IoBackend::Mmsg, fake.addr));
    assert_eq!(thp(agent.process.pid()).as_deref(), Some("0"));
    drop(agent);
    let mut config = AgentConfig::new(IoBackend::Mmsg, fake.addr);
    config.wrapper = vec!["env".into(), "DNSFENCE_HUGE_PAGES=1".into()];
    let agent = Agent::start(&config);
    assert_eq!(thp(agent.process.pid()).as_deref(), Some("1"));
}
