//! The standalone proxy beside the agent, userspace mode (`--no-bpf`; real processes, real
//! signals, bounded in time): both serve one port; the proxy gets the agent's policy over
//! the agent socket and persists it; while the agent is dead the proxy answers alone and keeps
//! what it learns, which the restarted agent receives; a proxy started alone serves from its
//! persisted state; a corrupt state file is set aside in one line and fails closed.
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use dnsfence_tests::dns::{self, TYPE_A};
use dnsfence_tests::upstream::Bundled;
use dnsfence_tests::{Agent, AgentConfig, IoBackend, TempDir, free_addr, poll_until};

/// The agent (or, with `proxy`, the standalone proxy) on `listen`, syncing over `dir`'s
/// socket, with its own state directory.
fn config(dir: &Path, listen: SocketAddr, upstream: SocketAddr, proxy: bool) -> AgentConfig {
    let socket = dir.join("agent.sock");
    let state = dir.join(if proxy { "proxy-state" } else { "agent-state" });
    let mut c = AgentConfig::new(IoBackend::Uring, upstream).args(&[
        "--agent-socket",
        socket.to_str().expect("utf-8"),
        "--state-dir",
        state.to_str().expect("utf-8"),
    ]);
    c.listen = Some(listen);
    c.proxy = proxy;
    c
}

/// The rcode of `name` asked from a fresh source port (the kernel picks the process by the
/// source port's hash) and, like a stub resolver, asked again once after 500 ms without an
/// answer (a SIGKILLed process's socket can take queries for a few ms after it died, while
/// the kernel tears its ring down); None when neither got one.
fn ask(server: SocketAddr, id: u16, name: &str) -> Option<u8> {
    let q = dns::query(id, name, TYPE_A, None);
    (0..2).find_map(|_| {
        dns::udp_exchange(server, &q, Duration::from_millis(500)).map(|a| dns::rcode(&a))
    })
}

#[test]
fn proxy_serves_through_an_agent_crash_and_alone_from_its_state() {
    let upstream = Bundled::start(&[]);
    let dir = TempDir::new("ha");
    let listen = free_addr();
    let mut agent = Agent::start(&config(dir.path(), listen, upstream.addr, false));
    let mut proxy = Agent::start(&config(dir.path(), listen, upstream.addr, true));
    proxy.wait_metric("dnsfence_sync_snapshots_total", 1.0);

    // Both serve the port.
    for i in 0..200u16 {
        assert_eq!(
            ask(listen, i, &format!("both{i}.allowed.test")),
            Some(0),
            "both{i}"
        );
    }
    agent.wait_metric("dnsfence_forwarded_total", 1.0);
    proxy.wait_metric("dnsfence_forwarded_total", 1.0);

    // The agent crashes: the proxy answers alone, and keeps what it learns for the agent.
    agent.process.signal("KILL");
    assert!(agent.process.wait_timeout(Duration::from_secs(5)).is_some());
    for i in 0..50u16 {
        assert_eq!(
            ask(listen, i, &format!("down{i}.allowed.test")),
            Some(0),
            "down{i}"
        );
    }
    assert_eq!(
        ask(listen, 99, "evil.denied.test"),
        Some(5),
        "denied: REFUSED"
    );
    proxy.wait_metric("dnsfence_sync_pending_records", 50.0);

    // The agent returns: it gets them all, and they leave the proxy's buffer.
    let agent = Agent::start(&config(dir.path(), listen, upstream.addr, false));
    agent.wait_metric("dnsfence_sync_observations_total", 50.0);
    agent.wait_metric("dnsfence_fqdn_cache_entries", 50.0);
    let drained = poll_until(Duration::from_secs(10), || {
        (proxy.metric_sum("dnsfence_sync_pending_records") == 0.0).then_some(())
    });
    assert!(drained.is_some(), "{}", proxy.metrics_text());

    // Both killed; the proxy restarted alone serves from its state, at once.
    drop(agent);
    proxy.process.signal("KILL");
    assert!(proxy.process.wait_timeout(Duration::from_secs(5)).is_some());
    let started = Instant::now();
    let alone = Agent::start(&config(dir.path(), listen, upstream.addr, true));
    assert_eq!(ask(listen, 1, "alone.allowed.test"), Some(0));
    assert_eq!(ask(listen, 2, "evil.denied.test"), Some(5));
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "serving after {:?}",
        started.elapsed()
    );
    assert!(
        alone
            .process
            .stderr()
            .contains("serving the policy persisted in"),
        "{}",
        alone.process.stderr()
    );
}

#[test]
fn a_corrupt_state_file_is_set_aside_and_fails_closed() {
    let upstream = Bundled::start(&[]);
    let dir = TempDir::new("ha-corrupt");
    let listen = free_addr();
    let state = dir.path().join("proxy-state");
    std::fs::create_dir_all(&state).expect("state dir");
    std::fs::write(state.join("policy"), b"DFSTATE\0 not really a state file").expect("write");
    let mut c = config(dir.path(), listen, upstream.addr, true);
    c.extra
        .extend(["--first-policy-wait".to_owned(), "100ms".to_owned()]);
    let proxy = Agent::start(&c);
    // Fail closed: an allowed name is refused (no policy), and said in one line.
    assert_eq!(ask(listen, 1, "www.allowed.test"), Some(5));
    let err = proxy.process.stderr();
    let line = err
        .lines()
        .find(|l| l.contains("moved aside"))
        .unwrap_or_else(|| panic!("{err}"));
    assert!(
        line.contains("every query is refused until the agent sends a policy"),
        "{line}"
    );
    assert!(std::fs::read_dir(&state).expect("list").any(|e| {
        e.expect("entry")
            .file_name()
            .to_string_lossy()
            .starts_with("policy.corrupt-")
    }));
    // The agent comes: the proxy takes its policy and answers.
    let mut agent = Agent::start(&config(dir.path(), listen, upstream.addr, false));
    proxy.wait_metric("dnsfence_sync_snapshots_total", 1.0);
    agent.process.signal("KILL");
    assert!(agent.process.wait_timeout(Duration::from_secs(5)).is_some());
    assert_eq!(ask(listen, 2, "www.allowed.test"), Some(0));
}
