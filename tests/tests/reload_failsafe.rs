//! Issue #13 item 1 and issue #11 item 4: reloads never fail open, and a bad policy file harms
//! only what it selects. A real agent, real files, real queries on loopback.

use std::io::Write;
use std::net::{SocketAddr, UdpSocket};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use dnsfence_tests::dns::{self, TYPE_A, rcode};
use dnsfence_tests::upstream::{FakeMode, FakeUpstream};
use dnsfence_tests::{Agent, AgentConfig, IoBackend, TempDir, poll_until};

const T: Duration = Duration::from_secs(5);

/// How long the writer churns the policy file: 30 s by default, as issue 13's acceptance
/// asks (`DNSFENCE_CHURN_SECS` to change it).
fn churn_time() -> Duration {
    let secs = std::env::var("DNSFENCE_CHURN_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(30);
    Duration::from_secs(secs)
}

/// The rcode of `name` asked from source address `from` (`None`: no answer within 1 s). The
/// socket is connected to the agent, so a stray datagram from another process on loopback
/// cannot pass for its answer (one of 1 byte once made `dns::rcode` panic).
fn ask_from(from: [u8; 4], agent: SocketAddr, id: u16, name: &str) -> Option<u8> {
    let s = UdpSocket::bind(SocketAddr::from((from, 0))).expect("bind client");
    s.connect(agent).expect("connect client");
    s.send(&dns::query(id, name, TYPE_A, None)).expect("send");
    dns::recv_reply(&s, Duration::from_secs(1)).map(|r| dns::rcode(&r))
}

fn ask(agent: SocketAddr, name: &str) -> Option<u8> {
    ask_from([127, 0, 0, 1], agent, 0x4242, name)
}

/// Polls until `name` from `from` gets `want`.
fn until_answer(from: [u8; 4], agent: &Agent, name: &str, want: u8, what: &str) {
    poll_until(T, || {
        (ask_from(from, agent.addr, 7, name) == Some(want)).then_some(())
    })
    .unwrap_or_else(|| panic!("{what}: {name} not {want}; {}", agent.process.stderr()));
}

fn metric(agent: &Agent, name: &str) -> f64 {
    agent.metric_sum(name)
}

/// A writer that truncates the policy file, pauses 4 ms and writes it again, 20 times a
/// second, while a client asks denied and allowed names without pause: no denied name is ever
/// answered with anything but REFUSED, and no allowed one refused (the last good policy stays
/// in force throughout). Then an empty file left in place is reported and changes nothing,
/// and a file of comments removes the policy explicitly.
#[test]
fn policy_churn_never_fails_open() {
    let fake = FakeUpstream::start(FakeMode::Answer);
    let agent = Agent::start(
        &AgentConfig::new(IoBackend::Mmsg, fake.addr).args(&["--reload-interval", "50ms"]),
    );
    let stop = Arc::new(AtomicBool::new(false));
    let writes = {
        let (path, stop) = (agent.policy_path.clone(), Arc::clone(&stop));
        std::thread::spawn(move || {
            let mut writes = 0u32;
            while !stop.load(Ordering::Relaxed) {
                let started = Instant::now();
                let mut f = std::fs::File::create(&path).expect("truncate");
                std::thread::sleep(Duration::from_millis(4));
                f.write_all(dnsfence_tests::POLICY.as_bytes())
                    .expect("write");
                drop(f);
                writes += 1;
                std::thread::sleep(Duration::from_millis(50).saturating_sub(started.elapsed()));
            }
            writes
        })
    };
    let deadline = Instant::now() + churn_time();
    let (mut denied, mut allowed) = (0u32, 0u32);
    let (mut wrong, mut examples) = (0u32, Vec::new());
    let mut id = 0u16;
    while Instant::now() < deadline {
        id = id.wrapping_add(1);
        let (name, want) = if id.is_multiple_of(2) {
            denied += 1;
            ("www.denied.test", rcode::REFUSED)
        } else {
            allowed += 1;
            ("www.allowed.test", rcode::NOERROR)
        };
        let got = ask_from([127, 0, 0, 1], agent.addr, id, name);
        if got != Some(want) {
            wrong += 1;
            if examples.len() < 10 {
                examples.push(format!("{name}: {got:?}"));
            }
        }
    }
    stop.store(true, Ordering::Relaxed);
    let writes = writes.join().expect("writer");
    eprintln!(
        "churn: {writes} writes; {denied} denied and {allowed} allowed names asked; {wrong} wrong"
    );
    // The file is whole again (the writer's last write finished), and it churned: the writer
    // aims at 20 writes a second; a CI machine whose two CPUs also run the agent and this
    // test's queries gave it 11.7 (350 in 30 s), so the floor is 8.
    assert!(
        writes as f64 >= churn_time().as_secs_f64() * 8.0,
        "{writes} writes"
    );
    assert!(
        denied > 200 && allowed > 200,
        "{denied} denied, {allowed} allowed asked"
    );
    assert!(
        wrong == 0,
        "{wrong} of {} answers wrong ({denied} denied names asked), e.g. {examples:?}; \
         stderr:\n{}",
        denied + allowed,
        agent.process.stderr()
    );

    // An empty file left in place: reported, counted, and the policy stays in force.
    let errors_before = metric(&agent, "dnsfence_policy_reload_errors_total");
    std::fs::File::create(&agent.policy_path).expect("truncate");
    poll_until(T, || {
        (metric(&agent, "dnsfence_policy_files_rejected") == 1.0).then_some(())
    })
    .unwrap_or_else(|| panic!("empty file not rejected: {}", agent.metrics_text()));
    let stderr = agent.process.stderr();
    let shown = format!("{}:0: empty file", agent.policy_path.display());
    assert!(stderr.contains(&shown), "no {shown:?} in {stderr}");
    assert!(metric(&agent, "dnsfence_policy_reload_errors_total") > errors_before);
    assert_eq!(metric(&agent, "dnsfence_policy_stale"), 1.0);
    for _ in 0..20 {
        assert_eq!(ask(agent.addr, "www.denied.test"), Some(rcode::REFUSED));
        assert_eq!(ask(agent.addr, "www.allowed.test"), Some(rcode::NOERROR));
    }

    // A file of comments: every policy removed, explicitly; the endpoint is unrestricted.
    std::fs::write(&agent.policy_path, "# no egress policy on this node\n").expect("write");
    until_answer(
        [127, 0, 0, 1],
        &agent,
        "www.denied.test",
        rcode::NOERROR,
        "comment file",
    );
    assert_eq!(metric(&agent, "dnsfence_policy_stale"), 0.0);
    let mut agent = agent;
    agent.process.assert_running();
}

/// The policy of endpoint `other` (127.0.0.2): `*.other.test`.
const OTHER: &str = r#"apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: other-egress, namespace: default}
spec:
  endpointSelector: {matchLabels: {app: other}}
  egress:
  - toPorts:
    - ports: [{port: "53", protocol: ANY}]
      rules:
        dns: [{matchPattern: "*.other.test"}]
"#;

fn write(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).expect("write");
    std::fs::rename(&tmp, path).expect("rename");
}

/// With one policy file broken (an unsupported field), the endpoint it selects is refused
/// everything, while an edit of another policy file and a change of the endpoints file still
/// take effect.
#[test]
fn a_bad_policy_fails_closed_only_for_what_it_selects() {
    let fake = FakeUpstream::start(FakeMode::Answer);
    let dir = TempDir::new("policies");
    let other = dir.write("other.yaml", OTHER);
    let dir_arg = dir.path().display().to_string();
    let mut config = AgentConfig::new(IoBackend::Mmsg, fake.addr).args(&[
        "--reload-interval",
        "100ms",
        "--policy",
        &dir_arg,
    ]);
    config.endpoints.push_str(
        "- name: other\n  namespace: default\n  labels: {app: other}\n  ips: [\"127.0.0.2\"]\n",
    );
    let agent = Agent::start(&config);
    let client = [127, 0, 0, 1];
    let (other_ip, third_ip) = ([127, 0, 0, 2], [127, 0, 0, 3]);
    assert_eq!(
        ask_from(other_ip, agent.addr, 1, "www.other.test"),
        Some(rcode::NOERROR)
    );
    assert_eq!(
        ask_from(client, agent.addr, 2, "www.other.test"),
        Some(rcode::REFUSED)
    );

    // other.yaml gets an unsupported field on line 7: `other` is refused everything.
    write(
        &other,
        &OTHER.replace(
            "  - toPorts:",
            "  - toGroups: [{aws: {securityGroupsIds: [sg-1]}}]\n  - toPorts:",
        ),
    );
    until_answer(
        other_ip,
        &agent,
        "www.other.test",
        rcode::REFUSED,
        "broken policy",
    );
    let stderr = agent.process.stderr();
    let located = format!("{}:7: spec.egress[0].toGroups", other.display());
    assert!(stderr.contains(&located), "no {located:?} in {stderr}");
    assert!(stderr.contains("denied everything"), "{stderr}");
    assert_eq!(metric(&agent, "dnsfence_policy_fail_closed_endpoints"), 1.0);
    assert_eq!(metric(&agent, "dnsfence_policy_files_rejected"), 1.0);
    assert_eq!(metric(&agent, "dnsfence_policy_reload_errors_total"), 1.0);

    // Another policy file's edit still takes effect.
    let allowing = dnsfence_tests::POLICY.replace(
        r#"{matchName: "allowed.test"}"#,
        r#"{matchName: "allowed.test"}, {matchPattern: "*.later.test"}"#,
    );
    write(&agent.policy_path, &allowing);
    until_answer(
        client,
        &agent,
        "www.later.test",
        rcode::NOERROR,
        "edit of another file",
    );

    // So does an endpoints change: a new workload at 127.0.0.3 under the client's policy.
    assert_eq!(
        ask_from(third_ip, agent.addr, 3, "www.allowed.test"),
        Some(rcode::REFUSED),
        "unknown source before"
    );
    let mut endpoints = config.endpoints.clone();
    endpoints.push_str(
        "- name: third\n  namespace: default\n  labels: {app: client}\n  ips: [\"127.0.0.3\"]\n",
    );
    write(&agent.endpoints_path, &endpoints);
    until_answer(
        third_ip,
        &agent,
        "www.later.test",
        rcode::NOERROR,
        "endpoints change",
    );

    // The broken policy's endpoint is still refused, even names another policy would allow.
    for name in ["www.other.test", "www.allowed.test"] {
        assert_eq!(
            ask_from(other_ip, agent.addr, 4, name),
            Some(rcode::REFUSED),
            "{name}"
        );
    }
    // Fixing the file restores it.
    write(&other, OTHER);
    until_answer(other_ip, &agent, "www.other.test", rcode::NOERROR, "fix");
    assert_eq!(metric(&agent, "dnsfence_policy_fail_closed_endpoints"), 0.0);
    assert_eq!(metric(&agent, "dnsfence_policy_stale"), 0.0);
    assert!(fake.names().iter().all(|n| !n.contains("denied")));
}
