//! The standalone proxy in eBPF mode (root; real cgroups, real kernel): while the agent is
//! dead, a name first resolved through the proxy is reachable at once (the proxy wrote the
//! pinned allow map itself), and the restarted agent receives it.
use std::net::{IpAddr, SocketAddr, TcpListener};
use std::time::Duration;

use dnsfence_tests::bpf::{self, EXCLUSIVE, Env, TWO_ENDPOINTS, require_root};
use dnsfence_tests::upstream::Bundled;
use dnsfence_tests::{Agent, AgentConfig, TempDir, free_port};

const POLICY: &str = r#"apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: a-egress, namespace: default}
spec:
  endpointSelector: {matchLabels: {app: a}}
  egress:
  - toPorts:
    - ports: [{port: "53", protocol: ANY}]
      rules:
        dns: [{matchPattern: "*.allowed.test"}]
  - toFQDNs: [{matchPattern: "*.allowed.test"}]
    toPorts: [{ports: [{port: "443", protocol: TCP}]}]
"#;

fn config(env: &Env, dir: &TempDir, upstream: SocketAddr, port: u16, proxy: bool) -> AgentConfig {
    let socket = dir.path().join("agent.sock");
    let state = dir
        .path()
        .join(if proxy { "proxy-state" } else { "agent-state" });
    let mut c = bpf::agent_config(
        env,
        upstream,
        POLICY,
        TWO_ENDPOINTS,
        &[
            "--agent-socket",
            socket.to_str().expect("utf-8"),
            "--state-dir",
            state.to_str().expect("utf-8"),
        ],
    );
    c.listen = Some(SocketAddr::from(([127, 0, 0, 1], port)));
    c.proxy = proxy;
    c
}

#[test]
fn the_proxy_opens_new_names_while_the_agent_is_dead() {
    if !require_root("ha_datapath") {
        return;
    }
    let _serial = EXCLUSIVE.lock().unwrap_or_else(|e| e.into_inner());
    let env = Env::new("ha", &["a", "b"]);
    let upstream = Bundled::start(&[]);
    let port = free_port();
    let dir = TempDir::new("ha-bpf");
    let mut agent = Agent::start(&config(&env, &dir, upstream.addr, port, false));
    let proxy = Agent::start(&config(&env, &dir, upstream.addr, port, true));
    proxy.wait_metric("dnsfence_sync_snapshots_total", 1.0);

    agent.process.signal("KILL");
    assert!(agent.process.wait_timeout(Duration::from_secs(5)).is_some());
    // Resolved through the redirect while only the proxy runs (dig retries once).
    let ip: IpAddr = env.resolve("a", "new-while-down.allowed.test", "A", &["+tries=2"]);
    let _listener = TcpListener::bind((ip, 443)).expect("listen on the answer's address");
    assert_eq!(
        env.connect(Some("a"), SocketAddr::new(ip, 443)),
        Ok(()),
        "the proxy's allow entry opens it"
    );
    assert!(
        env.denied(Some("a"), SocketAddr::new(ip, 80)),
        "only the rule's port"
    );
    proxy.wait_metric("dnsfence_sync_pending_records", 1.0);

    // The agent returns and receives what the proxy learned.
    let agent = Agent::start(&config(&env, &dir, upstream.addr, port, false));
    agent.wait_metric("dnsfence_sync_observations_total", 1.0);
    drop(proxy);
    drop(agent);
}
