//! The standalone proxy beside the agent, userspace mode (`--no-bpf`; real processes, real
//! signals, bounded in time): both serve one port; the proxy gets the agent's policy over
//! the agent socket and persists it; while the agent is dead the proxy answers alone and keeps
//! what it learns, which the restarted agent receives; a proxy started alone serves from its
//! persisted state; a corrupt state file is set aside in one line and fails closed; a
//! graceful stop under load loses at most a bounded share of queries (plain sockets).
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use dnsfence_tests::dns::{self, TYPE_A};
use dnsfence_tests::upstream::Bundled;
use dnsfence_tests::{Agent, AgentConfig, TempDir, free_addr, loadgen_with, poll_until};

/// The agent (or, with `proxy`, the standalone proxy) on `listen`, syncing over `dir`'s
/// socket, with its own state directory.
fn config(dir: &Path, listen: SocketAddr, upstream: SocketAddr, proxy: bool) -> AgentConfig {
    AgentConfig::ha_pair(dir, listen, upstream, proxy)
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

/// The bundled upstream, a directory named after `name` and a free port to share.
fn setup(name: &str) -> (Bundled, TempDir, SocketAddr) {
    (Bundled::start(&[]), TempDir::new(name), free_addr())
}

/// Sends `signal` to `agent` and waits (bounded) until it is gone.
fn stop(agent: &mut Agent, signal: &str) {
    agent.process.signal(signal);
    let gone = agent.process.wait_timeout(Duration::from_secs(10));
    assert!(gone.is_some(), "still running after SIG{signal}");
}

/// `n` names `PREFIX{i}.allowed.test` asked (and answered) while only the proxy serves,
/// then waited for in the proxy's buffer for the agent.
fn learn_alone(proxy: &Agent, listen: SocketAddr, prefix: &str, n: u16) {
    for i in 0..n {
        let name = format!("{prefix}{i}.allowed.test");
        assert_eq!(ask(listen, i, &name), Some(0), "{name}");
    }
    proxy.wait_metric("dnsfence_sync_pending_records", f64::from(n));
}

/// Waits until the proxy's buffer for the agent is empty (all acknowledged).
fn wait_drained(proxy: &Agent) {
    let drained = poll_until(Duration::from_secs(10), || {
        (proxy.metric_sum("dnsfence_sync_pending_records") == 0.0).then_some(())
    });
    assert!(drained.is_some(), "{}", proxy.metrics_text());
}

/// The agent, then the proxy once it has the agent's policy, on `listen`.
fn pair(dir: &TempDir, listen: SocketAddr, upstream: SocketAddr) -> (Agent, Agent) {
    let agent = Agent::start(&config(dir.path(), listen, upstream, false));
    let proxy = Agent::start(&config(dir.path(), listen, upstream, true));
    proxy.wait_metric("dnsfence_sync_snapshots_total", 1.0);
    (agent, proxy)
}

/// Asserts that `process` said `what` on stderr (all of it shown when not).
fn assert_said(process: &Agent, what: &str) {
    let err = process.process.stderr();
    assert!(err.contains(what), "no {what:?} in: {err}");
}

/// The agent with `policy`, its files in `dir` (the same paths on every restart, as a
/// restarted service reads).
fn fixed_files(dir: &Path, listen: SocketAddr, upstream: SocketAddr, policy: &str) -> AgentConfig {
    let mut c = config(dir, listen, upstream, false);
    c.files_in = Some(dir.to_owned());
    c.policy = policy.to_owned();
    c
}

/// The proxy, waiting only 100 ms for an agent's policy when it has none.
fn impatient_proxy(dir: &Path, listen: SocketAddr, upstream: SocketAddr) -> AgentConfig {
    let mut c = config(dir, listen, upstream, true);
    c.extra
        .extend(["--first-policy-wait".to_owned(), "100ms".to_owned()]);
    c
}

/// The tests' policy, also allowing `*.later-denied.test`.
fn wider_policy() -> String {
    let wide = dnsfence_tests::POLICY.replace(
        r#"{matchName: "allowed.test"}]"#,
        r#"{matchName: "allowed.test"}, {matchPattern: "*.later-denied.test"}]"#,
    );
    assert_ne!(wide, dnsfence_tests::POLICY);
    wide
}

/// The agent and the proxy in different pid namespaces (separate pods without `hostPID`):
/// each sees the other's pid as 0 through `SO_PEERCRED`. Review finding (fixed): rustix's
/// wrapper took that pid for a `NonZeroI32` (undefined behaviour) and the proxy never got a
/// policy. Needs root (`unshare --pid`).
#[test]
fn an_agent_and_a_proxy_in_separate_pid_namespaces_sync() {
    if !dnsfence_tests::bpf::require_root("ha (unshare --pid)") {
        return;
    }
    let (upstream, dir, listen) = setup("ha-pidns");
    let _agent = Agent::start(&config(dir.path(), listen, upstream.addr, false));
    let mut c = config(dir.path(), listen, upstream.addr, true);
    c.wrapper = ["unshare", "--pid", "--fork", "--kill-child", "--"]
        .map(str::to_owned)
        .to_vec();
    let proxy = Agent::start(&c);
    proxy.wait_metric("dnsfence_sync_snapshots_total", 1.0);
    assert_said(&proxy, "from the agent in force");
}

#[test]
fn proxy_serves_through_an_agent_crash_and_alone_from_its_state() {
    let (upstream, dir, listen) = setup("ha");
    let (mut agent, mut proxy) = pair(&dir, listen, upstream.addr);

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
    stop(&mut agent, "KILL");
    assert_eq!(
        ask(listen, 99, "evil.denied.test"),
        Some(5),
        "denied: REFUSED"
    );
    learn_alone(&proxy, listen, "down", 50);

    // The agent returns: it gets them all, and they leave the proxy's buffer.
    let agent = Agent::start(&config(dir.path(), listen, upstream.addr, false));
    agent.wait_metric("dnsfence_sync_observations_total", 50.0);
    agent.wait_metric("dnsfence_fqdn_cache_entries", 50.0);
    wait_drained(&proxy);

    // Both killed; the proxy restarted alone serves from its state, at once.
    drop(agent);
    stop(&mut proxy, "KILL");
    let started = Instant::now();
    let alone = Agent::start(&config(dir.path(), listen, upstream.addr, true));
    assert_eq!(ask(listen, 1, "alone.allowed.test"), Some(0));
    assert_eq!(ask(listen, 2, "evil.denied.test"), Some(5));
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "serving after {:?}",
        started.elapsed()
    );
    assert_said(&alone, "policy persisted in");
}

/// Review finding: the agent acknowledges observations once merged and persists its cache
/// only every few seconds, so an agent that crashed in between lost what the proxy had
/// replayed to it. The proxy keeps what was acknowledged a while and sends it again to the
/// next agent.
#[test]
fn what_a_crashed_agent_had_not_persisted_reaches_the_next_one() {
    let (upstream, dir, listen) = setup("ha-unpersisted");
    let (mut agent, proxy) = pair(&dir, listen, upstream.addr);
    stop(&mut agent, "KILL");
    learn_alone(&proxy, listen, "away", 50);

    // The agent returns, takes them all, and crashes before it persists its cache.
    let mut agent = Agent::start(&config(dir.path(), listen, upstream.addr, false));
    agent.wait_metric("dnsfence_fqdn_cache_entries", 50.0);
    wait_drained(&proxy);
    stop(&mut agent, "KILL");

    // The next agent has them.
    let agent = Agent::start(&config(dir.path(), listen, upstream.addr, false));
    agent.wait_metric("dnsfence_fqdn_cache_entries", 50.0);
    assert_said(&proxy, "the agent restarted: the");
}

/// Review finding: the agent merged observations from any peer of its user, whatever role
/// its Hello gave; only a standalone proxy's are taken now, another's connection is closed.
#[test]
fn only_a_proxy_may_send_observations() {
    use dnsfence_sync::proto::{Encoder, Hello, Message, Observation, Observations, Role};
    use std::io::{Read, Write};
    let (upstream, dir, listen) = setup("ha-roles");
    let agent = Agent::start(&config(dir.path(), listen, upstream.addr, false));
    let mut peer = poll_until(Duration::from_secs(10), || {
        std::os::unix::net::UnixStream::connect(dir.path().join("agent.sock")).ok()
    })
    .expect("the agent socket");
    let observation = Observation {
        endpoint_key: dnsfence_policy::EndpointKey::of("default", "client").0,
        name: "evil.denied.test".to_owned(),
        addresses: vec!["192.0.2.9".parse().expect("address")],
        ttl_secs: 300,
        observed_unix_ms: 1,
    };
    let mut bytes = Vec::new();
    for msg in [
        Message::Hello(Hello::new(Role::Observer)),
        Message::Observations(Observations {
            seq: 1,
            items: vec![observation],
        }),
    ] {
        Encoder::new().encode(&msg, &mut bytes).expect("encode");
    }
    peer.write_all(&bytes).expect("send");
    // The agent closes the connection (after its own Hello), and merged nothing.
    peer.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut rest = Vec::new();
    peer.read_to_end(&mut rest).expect("closed by the agent");
    assert_eq!(agent.metric_sum("dnsfence_sync_observations_total"), 0.0);
    assert_eq!(agent.metric_sum("dnsfence_fqdn_cache_entries"), 0.0);
    assert_said(&agent, "only a proxy may");
}

#[test]
fn a_corrupt_state_file_is_set_aside_and_fails_closed() {
    let (upstream, dir, listen) = setup("ha-corrupt");
    let state = dir.path().join("proxy-state");
    // Private whatever the umask (a directory others may write is refused).
    std::os::unix::fs::DirBuilderExt::mode(std::fs::DirBuilder::new().recursive(true), 0o700)
        .create(&state)
        .expect("state dir");
    std::fs::write(state.join("policy"), b"DFSTATE\0 not really a state file").expect("write");
    let proxy = Agent::start(&impatient_proxy(dir.path(), listen, upstream.addr));
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
    stop(&mut agent, "KILL");
    assert_eq!(ask(listen, 2, "www.allowed.test"), Some(0));
}

/// A state file the proxy cannot open for a reason not its own (here: another user's, mode
/// 0600) is not corrupt: the proxy says why and fails closed, and the file stays where it is
/// (HA review finding: it was moved aside, later pruned, for an EACCES). Needs root (the
/// proxy runs as nobody).
#[test]
fn a_state_file_that_cannot_be_opened_is_not_set_aside() {
    use std::os::unix::fs::{PermissionsExt, chown};
    if !dnsfence_tests::bpf::require_root("ha (setpriv)") {
        return;
    }
    let (upstream, dir, listen) = setup("ha-eacces");
    let state = dir.path().join("proxy-state");
    std::fs::create_dir_all(&state).expect("state dir");
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o700)).expect("chmod");
    chown(&state, Some(65534), Some(65534)).expect("chown");
    let policy = state.join("policy");
    std::fs::write(&policy, b"root's, unreadable to the proxy").expect("write");
    std::fs::set_permissions(&policy, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let mut c = impatient_proxy(dir.path(), listen, upstream.addr);
    c.wrapper = [
        "setpriv",
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        "--",
    ]
    .map(str::to_owned)
    .to_vec();
    let proxy = Agent::start(&c);
    assert_eq!(ask(listen, 1, "www.allowed.test"), Some(5), "fails closed");
    let err = proxy.process.stderr();
    assert!(!err.contains("moved aside"), "{err}");
    assert!(err.contains("Permission denied"), "{err}");
    assert!(policy.exists(), "the file was moved");
}

/// Review finding: a proxy restarted with a persisted policy older than the agent's must not
/// answer what the agent's policy now denies (it takes the agent's before it serves).
#[test]
fn a_restarted_proxy_serves_the_agents_newer_policy_not_its_persisted_one() {
    let (upstream, dir, listen) = setup("ha-stale");
    // A large policy, so that compiling it takes a while (the window the finding used).
    let mut patterns = String::new();
    for i in 0..3000 {
        patterns.push_str(&format!("{{matchName: \"n{i}.bulk.test\"}}, "));
    }
    let policy = |extra: &str| {
        format!(
            "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\n\
             metadata: {{name: client-egress, namespace: default}}\nspec:\n  \
             endpointSelector: {{matchLabels: {{app: client}}}}\n  egress:\n  \
             - toPorts:\n    - ports: [{{port: \"53\", protocol: ANY}}]\n      rules:\n        \
             dns: [{patterns}{{matchPattern: \"*.allowed.test\"}}{extra}]\n"
        )
    };
    let mut agent_config = config(dir.path(), listen, upstream.addr, false);
    agent_config.policy = policy(", {matchPattern: \"*.soon-denied.test\"}");
    agent_config
        .extra
        .extend(["--reload-interval".to_owned(), "100ms".to_owned()]);
    let agent = Agent::start(&agent_config);
    let mut proxy = Agent::start(&config(dir.path(), listen, upstream.addr, true));
    proxy.wait_metric("dnsfence_sync_snapshots_total", 1.0);
    stop(&mut proxy, "KILL");
    // The agent narrows its policy while the proxy is down.
    std::fs::write(&agent.policy_path, policy("")).expect("narrow");
    let narrowed = poll_until(Duration::from_secs(10), || {
        (ask(listen, 7, "x.soon-denied.test") == Some(5)).then_some(())
    });
    assert!(narrowed.is_some(), "the agent did not reload");
    // The proxy comes back: from its first answer on, the name is refused.
    let proxy = Agent::spawn(&config(dir.path(), listen, upstream.addr, true));
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut answered_by_proxy = 0;
    let mut i = 0u16;
    while Instant::now() < deadline && answered_by_proxy < 200 {
        i = i.wrapping_add(1);
        let rcode = ask(listen, i, &format!("q{i}.soon-denied.test"));
        assert_ne!(
            rcode,
            Some(0),
            "query {i}: a name the agent now denies was answered"
        );
        if proxy
            .process
            .stderr()
            .contains(&format!(": serving {listen} "))
        {
            answered_by_proxy += 1;
        }
    }
    assert!(answered_by_proxy >= 200, "the proxy did not start serving");
    proxy.wait_metric("dnsfence_refused_total", 1.0);
}

/// An agent restarted with the policy the proxy already has changes nothing in the proxy
/// (its shards keep their tables: issue 8's restart second), and one restarted with another
/// policy still has it applied.
#[test]
fn an_agent_restarted_with_the_same_policy_leaves_the_proxys_tables_alone() {
    let (upstream, dir, listen) = setup("ha-same");
    let wide = fixed_files(dir.path(), listen, upstream.addr, &wider_policy());
    let mut agent = Agent::start(&wide);
    let proxy = Agent::start(&config(dir.path(), listen, upstream.addr, true));
    proxy.wait_metric("dnsfence_sync_snapshots_total", 1.0);
    let generation = proxy.metric_sum("dnsfence_policy_generation");

    // The same policy again: acknowledged, persisted, nothing recompiled or swapped.
    stop(&mut agent, "KILL");
    let mut agent = Agent::start(&wide);
    proxy.wait_metric("dnsfence_sync_snapshots_total", 2.0);
    assert_eq!(
        proxy.metric_sum("dnsfence_policy_generation"),
        generation,
        "{}",
        proxy.process.stderr()
    );
    assert_said(&proxy, "from the agent: the policy in force, unchanged");
    stop(&mut agent, "KILL");
    assert_eq!(ask(listen, 1, "a.later-denied.test"), Some(0));
    assert_eq!(ask(listen, 2, "evil.denied.test"), Some(5));

    // A narrower policy: applied, and the proxy alone refuses what it no longer allows.
    let narrow = AgentConfig {
        policy: dnsfence_tests::POLICY.to_owned(),
        ..wide
    };
    let mut agent = Agent::start(&narrow);
    proxy.wait_metric("dnsfence_sync_snapshots_total", 3.0);
    assert!(proxy.metric_sum("dnsfence_policy_generation") > generation);
    stop(&mut agent, "KILL");
    assert_eq!(ask(listen, 3, "b.later-denied.test"), Some(5));
    assert_eq!(ask(listen, 4, "www.allowed.test"), Some(0));
}

/// Review finding: a snapshot the proxy put in force but could not persist (its shards judge
/// by it) must not leave the older policy recorded as in force: when the agent goes back to
/// that policy, the proxy applies it again instead of keeping the wider one.
#[test]
fn a_snapshot_that_failed_part_way_is_not_mistaken_for_the_policy_in_force() {
    let (upstream, dir, listen) = setup("ha-partway");
    let mut narrow = fixed_files(dir.path(), listen, upstream.addr, dnsfence_tests::POLICY);
    narrow
        .extra
        .extend(["--reload-interval".to_owned(), "100ms".to_owned()]);
    let wide_policy = wider_policy();
    let mut agent = Agent::start(&narrow);
    let proxy = Agent::start(&config(dir.path(), listen, upstream.addr, true));
    proxy.wait_metric("dnsfence_sync_snapshots_total", 1.0);

    // From now on the proxy cannot persist its policy: a directory where the file goes.
    let persisted = dir.path().join("proxy-state").join("policy");
    std::fs::remove_file(&persisted).expect("the persisted policy");
    std::fs::create_dir_all(persisted.join("in-the-way")).expect("a directory in the way");
    let failed = |version: u64| {
        let line = format!("policy snapshot {version} in force but not persisted");
        poll_until(Duration::from_secs(10), || {
            proxy.process.stderr().contains(&line).then_some(())
        })
        .unwrap_or_else(|| panic!("{}", proxy.process.stderr()))
    };
    // Wider (put in force, not persisted), then back to the narrow policy.
    std::fs::write(&agent.policy_path, &wide_policy).expect("widen");
    failed(2);
    std::fs::write(&agent.policy_path, dnsfence_tests::POLICY).expect("narrow again");
    failed(3);
    stop(&mut agent, "KILL");
    // The proxy alone judges by the narrow policy.
    assert_eq!(
        ask(listen, 1, "a.later-denied.test"),
        Some(5),
        "{}",
        proxy.process.stderr()
    );
    assert_eq!(ask(listen, 2, "www.allowed.test"), Some(0));
}

/// Review finding: a persisted policy that is intact but cannot be compiled (written by
/// another version, say) made the proxy exit; it fails closed instead, in one line, and takes
/// the agent's policy when the agent comes.
#[test]
fn a_persisted_policy_that_cannot_be_compiled_fails_closed() {
    use dnsfence_sync::state::{Kind, StateDir};
    let (upstream, dir, listen) = setup("ha-uncompilable");
    let (mut agent, mut proxy) = pair(&dir, listen, upstream.addr);
    stop(&mut agent, "KILL");
    stop(&mut proxy, "KILL");

    // A node fact this build cannot parse, in a file with a good checksum.
    let state = StateDir::open(dir.path().join("proxy-state")).expect("the proxy's state");
    let loaded = state
        .load("policy", Kind::POLICY_SNAPSHOT)
        .expect("readable")
        .expect("persisted");
    let mut msg: serde_json::Value = serde_json::from_slice(&loaded.payload).expect("json");
    msg["node"]["cluster_cidrs"] = serde_json::json!(["10.0.0.0/99"]);
    let payload = serde_json::to_vec(&msg).expect("encode");
    state
        .save("policy", Kind::POLICY_SNAPSHOT, loaded.version, &payload)
        .expect("save");
    drop(state);

    let proxy = Agent::start(&impatient_proxy(dir.path(), listen, upstream.addr));
    assert_eq!(ask(listen, 1, "www.allowed.test"), Some(5));
    let err = proxy.process.stderr();
    assert!(
        err.lines()
            .any(|l| l.contains("cannot be used") && l.contains("every query is refused")),
        "{err}"
    );
    let _agent = Agent::start(&config(dir.path(), listen, upstream.addr, false));
    proxy.wait_metric("dnsfence_sync_snapshots_total", 1.0);
}

/// Review finding: a snapshot the proxy could not persist was never saved again (the agent
/// sends each version once), so a proxy restarted while the agent was away served the older
/// persisted policy. Now the proxy keeps the connection (observations go on) and saves it
/// again every second until it works.
#[test]
fn a_snapshot_that_could_not_be_persisted_is_saved_again() {
    let (upstream, dir, listen) = setup("ha-retry");
    let mut wide = fixed_files(dir.path(), listen, upstream.addr, &wider_policy());
    wide.extra
        .extend(["--reload-interval".to_owned(), "100ms".to_owned()]);
    let mut agent = Agent::start(&wide);
    let mut proxy = Agent::start(&config(dir.path(), listen, upstream.addr, true));
    proxy.wait_metric("dnsfence_sync_snapshots_total", 1.0);

    // The temp file of the next save cannot be made: the persisted (wide) policy stays.
    let obstacle = dir.path().join("proxy-state").join(".policy.tmp");
    std::fs::create_dir_all(obstacle.join("in-the-way")).expect("a directory in the way");
    std::fs::write(&agent.policy_path, dnsfence_tests::POLICY).expect("narrow");
    let said = |what: &str| {
        poll_until(Duration::from_secs(10), || {
            proxy.process.stderr().contains(what).then_some(())
        })
        .unwrap_or_else(|| panic!("no {what:?} in: {}", proxy.process.stderr()))
    };
    said("policy snapshot 2 in force but not persisted");
    // Tried again on the same connection, said once.
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(proxy.metric_sum("dnsfence_sync_connections_total"), 1.0);
    let err = proxy.process.stderr();
    assert_eq!(err.matches("not persisted").count(), 1, "{err}");
    // The disk comes back: the snapshot is persisted on a retry.
    std::fs::remove_dir_all(&obstacle).expect("remove the obstacle");
    said("policy snapshot 2 from the agent in force, persisted now");

    // Both gone; the proxy alone serves what it persisted: the narrow policy.
    stop(&mut agent, "KILL");
    stop(&mut proxy, "KILL");
    let _alone = Agent::start(&config(dir.path(), listen, upstream.addr, true));
    assert_eq!(ask(listen, 1, "a.later-denied.test"), Some(5));
    assert_eq!(ask(listen, 2, "www.allowed.test"), Some(0));
}

/// Review finding: a connection that fails once made (a listener that is not an agent, or
/// one that closes at once) is retried with a growing delay, not in a tight loop.
#[test]
fn a_connection_that_fails_at_once_is_retried_with_backoff() {
    let (upstream, dir, listen) = setup("ha-backoff");
    let socket = dir.path().join("agent.sock");
    let listener = std::os::unix::net::UnixListener::bind(&socket).expect("bind");
    listener.set_nonblocking(true).expect("nonblocking");
    // Not waited for: with no agent it serves only after --first-policy-wait.
    let _proxy = Agent::spawn(&impatient_proxy(dir.path(), listen, upstream.addr));
    // Accept and close at once, for 3 s.
    let until = Instant::now() + Duration::from_secs(3);
    let mut accepted = 0;
    while Instant::now() < until {
        match listener.accept() {
            Ok((stream, _)) => {
                accepted += 1;
                drop(stream);
            }
            Err(_) => std::thread::sleep(Duration::from_millis(5)),
        }
    }
    // 200 ms, doubling: about 4 connections in 3 s (a tight loop made hundreds).
    assert!(
        (1..=10).contains(&accepted),
        "{accepted} connections in 3 s"
    );
}

/// Review finding: the proxy takes policy only from a listener of its own user (or root): a
/// process of another user that binds the socket path (a shared directory, the agent away)
/// is refused, and nothing it sends is applied or persisted. Needs root (to run the
/// impostor as another user).
#[test]
fn the_proxy_refuses_a_listener_of_another_user() {
    if !dnsfence_tests::bpf::require_root("ha impostor") {
        return;
    }
    let upstream = Bundled::start(&[]);
    let dir = TempDir::new("ha-impostor");
    let shared = dir.path().join("shared");
    std::fs::create_dir_all(&shared).expect("dir");
    for d in [dir.path(), shared.as_path()] {
        let ok = std::process::Command::new("chmod")
            .arg("1777")
            .arg(d)
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "chmod");
    }
    let listen = free_addr();
    let mut agent_config = config(&shared, listen, upstream.addr, false);
    let mut proxy_config = config(&shared, listen, upstream.addr, true);
    let state = dir.path().join("proxy-state");
    for c in [&mut agent_config, &mut proxy_config] {
        for (i, a) in c.extra.clone().iter().enumerate() {
            if a == "--state-dir" {
                c.extra[i + 1] = state
                    .with_extension(if c.proxy { "p" } else { "a" })
                    .display()
                    .to_string();
            }
        }
    }
    let mut agent = Agent::start(&agent_config);
    let proxy = Agent::start(&proxy_config);
    proxy.wait_metric("dnsfence_sync_snapshots_total", 1.0);
    stop(&mut agent, "TERM");
    assert_eq!(ask(listen, 1, "evil.denied.test"), Some(5));

    // `nobody` binds the path and pushes a policy allowing every name.
    let script = dir.write("impostor.py", IMPOSTOR);
    let socket = shared.join("agent.sock");
    let mut impostor = std::process::Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "/usr/bin/python3",
        ])
        .arg(&script)
        .arg(&socket)
        .spawn()
        .expect("impostor");
    let served = poll_until(Duration::from_secs(5), || {
        proxy
            .process
            .stderr()
            .contains("another user: refusing its policy")
            .then_some(())
    });
    let rcode = ask(listen, 2, "evil.denied.test");
    let _ = impostor.kill();
    let _ = impostor.wait();
    assert!(served.is_some(), "{}", proxy.process.stderr());
    assert_eq!(rcode, Some(5), "a name the impostor allowed was answered");
    assert_eq!(proxy.metric_sum("dnsfence_sync_snapshots_total"), 1.0);
}

/// A process posing as the agent: Hello, then a policy allowing every name.
const IMPOSTOR: &str = r#"import json, os, socket, struct, sys, time
path = sys.argv[1]
try: os.unlink(path)
except FileNotFoundError: pass
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.bind(path); os.chmod(path, 0o777); s.listen(4)
def frame(t, body):
    b = json.dumps(body).encode()
    return b"DFSY" + struct.pack(">HHI", 1, t, len(b)) + b
POLICY = 'apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: all, namespace: default}\nspec:\n  endpointSelector: {matchLabels: {app: client}}\n  egress:\n  - toPorts:\n    - ports: [{port: "53", protocol: ANY}]\n      rules:\n        dns: [{matchPattern: "*"}]\n'
EPS = 'endpoints:\n- {name: client, namespace: default, labels: {app: client}, ips: ["127.0.0.1", "::1"]}\n'
end = time.time() + 20
s.settimeout(0.5)
while time.time() < end:
    try: c, _ = s.accept()
    except socket.timeout: continue
    try:
        c.sendall(frame(1, {"role": "agent", "protocol_version": 1, "pid": os.getpid(), "instance": "0000000000000001"}))
        c.sendall(frame(2, {"version": 999, "policy_files": [{"path": "/evil.yaml", "content": POLICY}], "endpoints": {"path": "/eps.yaml", "content": EPS}, "node": {"cluster_cidrs": [], "node_ips": [], "kube_apiserver": []}}))
    except OSError: pass
    c.close()
"#;

/// Without eBPF a stopping process `connect()`s its UDP listen sockets to themselves (the
/// kernel's SO_REUSEPORT choice skips connected sockets), answers what they hold, then exits.
/// A datagram the kernel steered to a socket in the instant before it was connected can still
/// be lost: the bound asserted is 0.2 % of what was sent from the second of the SIGTERM on
/// (measured: 0 lost in every run so far, at 5,000 qps; 44 to 134 before the drain).
#[test]
fn sigterm_without_bpf_loses_at_most_a_bound() {
    let (upstream, dir, listen) = setup("ha-drain-nobpf");
    let (mut agent, mut proxy) = pair(&dir, listen, upstream.addr);
    let names: String = (0..200).map(|i| format!("n{i}.allowed.test A\n")).collect();
    let file = dir.write("names.txt", &names);
    let stop_under_load = |who: &str, process: &mut dnsfence_tests::Process| {
        let at = format!("1.0:kill -TERM {}", process.pid());
        let report = loadgen_with(listen, &file, 5000, 3.0, &["--at", &at]);
        assert!(
            process.wait_timeout(Duration::from_secs(10)).is_some(),
            "the {who} exits after its drain"
        );
        let n = |v: &serde_json::Value| v.as_u64().unwrap_or(0);
        // Queries sent from the second of the SIGTERM on: what the stop can cost. (The ha
        // tests run in parallel on few CPUs: an earlier second can time out from load alone.)
        let (mut sent, mut lost) = (0, 0);
        for second in report["timeline"].as_array().expect("timeline") {
            if n(&second["t_s"]) >= 1 {
                sent += n(&second["sent"]);
                lost += n(&second["timeouts"]);
            }
        }
        eprintln!(
            "SIGTERM {who} (no eBPF): from the SIGTERM on, sent {sent}, lost {lost} (whole run: \
             sent {}, lost {})",
            n(&report["sent"]),
            n(&report["timeouts"])
        );
        assert!(sent > 0, "{report}");
        assert!(
            lost * 500 <= sent,
            "SIGTERM {who}: {lost} of {sent} lost: {report}"
        );
        assert_eq!(
            report["rcodes"]["NOERROR"].as_u64(),
            Some(n(&report["answered"])),
            "{report}"
        );
    };
    stop_under_load("agent", &mut agent.process);
    // The agent returns before the proxy stops: someone must serve.
    let agent = Agent::start(&config(dir.path(), listen, upstream.addr, false));
    proxy.wait_metric("dnsfence_sync_snapshots_total", 2.0);
    stop_under_load("proxy", &mut proxy.process);
    drop(agent);
}
