//! Issue 9 item 3: `dnsfence status` asks the agent and the standalone proxy, says what they
//! are, and exits non-zero when one of them is unreachable.
use std::process::{Command, Output};
use std::time::Duration;

use dnsfence_tests::upstream::Bundled;
use dnsfence_tests::{Agent, AgentConfig, TempDir, bin, free_addr};

fn status(agent: &Agent, proxy: &Agent, extra: &[&str]) -> (Output, String) {
    let out = Command::new(bin("dnsfence"))
        .arg("status")
        .args(["--agent-metrics", &agent.metrics.to_string()])
        .args(["--proxy-metrics", &proxy.metrics.to_string()])
        .args(extra)
        .output()
        .expect("run dnsfence status");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    (out, text)
}

#[test]
fn status_reports_a_killed_proxy_and_fails() {
    let upstream = Bundled::start(&[]);
    let dir = TempDir::new("status");
    let listen = free_addr();
    let agent = Agent::start(&AgentConfig::ha_pair(
        dir.path(),
        listen,
        upstream.addr,
        false,
    ));
    let mut proxy = Agent::start(&AgentConfig::ha_pair(
        dir.path(),
        listen,
        upstream.addr,
        true,
    ));
    proxy.wait_metric("dnsfence_sync_snapshots_total", 1.0);
    agent.wait_probe("/readyz", 200);
    proxy.wait_probe("/readyz", 200);

    let (out, text) = status(&agent, &proxy, &[]);
    assert!(out.status.success(), "{:?}: {text}", out.status);
    for line in [
        format!("agent {}: healthy, ready", agent.metrics),
        format!("proxy {}: healthy, ready", proxy.metrics),
        "policy: generation 1, version 1, 1 endpoints".to_owned(),
        "shards: 1, I/O backend uring".to_owned(),
        "sync: 1 proxies connected".to_owned(),
        "sync: synced with the agent".to_owned(),
    ] {
        assert!(text.contains(&line), "no {line:?} in:\n{text}");
    }

    proxy.process.signal("KILL");
    assert!(proxy.process.wait_timeout(Duration::from_secs(5)).is_some());
    let (out, text) = status(&agent, &proxy, &[]);
    assert_eq!(out.status.code(), Some(1), "{text}");
    let unreachable = format!("proxy {}: UNREACHABLE", proxy.metrics);
    assert!(text.contains(&unreachable), "{text}");
    assert!(
        text.contains(&format!("agent {}: healthy, ready", agent.metrics)),
        "{text}"
    );
    // Left out, the dead proxy does not fail the agent's status.
    let (out, text) = status(&agent, &proxy, &["--skip", "proxy"]);
    assert!(out.status.success(), "{text}");
    assert!(!text.contains("proxy"), "{text}");
}
